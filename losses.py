"""
MoE auxiliary losses: pure functions of the routing the dispatcher actually used (docs/design.md §3).

Notation: T tokens, E routed experts, k experts per token, f expert hidden width, L MoE layers.

- load_balancing_loss: Switch Transformer (Fedus et al. 2021, Eq. 4-6) with the GShard/Megatron
  normalisation L_lb = E * sum_e f_e * P_e, f_e = count_e / (T*k), P_e = mean_t p_{t,e}.
  1 at perfectly uniform routing, E when every token goes to one expert with one-hot p.
- z_loss: ST-MoE (Zoph et al. 2022, Eq. 5), L_z = mean_t (logsumexp_e a_{t,e})^2.
- specialization_loss: Hu et al. 2026 (arXiv 2602.14159), Eq. 4. For every token, the squared
  cosine between the SwiGLU intermediates z = silu(x W_gate) * (x W_up) of its k routed experts,
  summed over ordered pairs i != j, mean over tokens. Our reading, where the equation leaves a
  choice: ordered pairs (each unordered pair counts twice), mean over tokens, sum over layers.
- coupling_loss: Hu et al. 2026, Eq. 7. With M^l_t the mass of the *full* softmax of layer l on the
  experts it selected (before renormalisation: the renormalised gates sum to 1 and would carry no
  gradient; for most routers the selection is the top-k of p),
  R_cp = - mean_t sum_{l=1}^{L-1} M^l_t * M^{l+1}_t. Our reading: mean over tokens, sum over the
  L-1 consecutive pairs.
- sequence_balance_loss: DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437,
  Eq. 17-20): L_lb per sequence, f_e = E/(k S) #{t: e in top-k of p_t}, P_e = mean_t p_te over the
  S tokens of one sequence, then the mean over sequences. The top-k is of the scores themselves,
  without a balancing bias (the paper's Topk(s)); p the normalised scores (sigmoid: s / sum s).
- StepBalance: the global-batch load balancing of Qiu et al. 2025 (arXiv 2501.11873): L_lb with f_e
  from the counts of every micro-batch of the step so far (and of every process), P_e from this
  micro-batch; the running mean over micro-batches is Megatron's global_aux_loss.
- aux_losses: all of the above for every MoE layer of a forward pass, unscaled and combined with
  their coefficients. Per-layer terms are summed over layers, as each layer adds its own term.

All terms are computed in fp32.
"""

import torch

from router import expert_counts

# Each loss has two forms: the public function of the full probabilities (the reference, tested
# against brute force), and aux_losses' form of the per-layer statistics in the Routing (what the
# fused routing pass, kernels.py, already produced), which training uses so that p is never
# materialised. The two are tested against each other.


def load_balancing_loss(probs, idx):
    """probs (T, E) full softmax, idx (T, k) selected experts -> scalar E * sum_e f_e P_e."""
    T, E = probs.shape
    f = expert_counts(idx, E).float() / (T * idx.shape[1])                         # (E,) no gradient
    return E * (f * probs.float().mean(dim=0)).sum()


def sequence_balance_loss(probs, k, seq_len):
    """probs (T, E), T = B * seq_len in sequence order -> mean_b sum_e f_be P_be (DeepSeek-V3, Eq. 17-20)."""
    T, E = probs.shape
    p = probs.float().view(T // seq_len, seq_len, E)                                # (B, S, E)
    top = p.topk(k, dim=-1).indices.flatten(1)                                      # (B, S*k) unbiased top-k
    hits = torch.zeros(p.shape[0], E, device=p.device).scatter_add_(1, top, torch.ones_like(top, dtype=p.dtype))
    return ((hits * E / (k * seq_len)) * p.mean(dim=1)).sum(dim=-1).mean()          # f_be carries no gradient


class StepBalance:
    """aux_losses' `pool` for the global-batch balance (Qiu et al. 2025): f_e of layer l from the counts of
    every micro-batch of this step so far (summed over processes by `reduce`, a function that all-reduces
    a tensor in place; None: one process), P_e from this micro-batch. Call reset() at every step."""

    def __init__(self, reduce=None, world=1):
        self.reduce, self.world, self.seen = reduce, world, {}

    def reset(self):
        self.seen = {}

    def __call__(self, layer, counts, psum, T):
        counts = counts.detach().double().clone()                         # (E,) this micro-batch's
        if self.reduce is not None:
            self.reduce(counts)                                           # ... of every process
        total, n = self.seen.get(layer, (0.0, 0))
        total, n = total + counts, n + 1
        self.seen[layer] = (total, n)
        return total / n / self.world, psum, T     # counts per T local tokens, so f_e = mean count / (T_global k)


def z_loss(logits):
    """logits (T, E) -> mean_t logsumexp(a_t)^2."""
    return logits.float().logsumexp(dim=-1).pow(2).mean()


def specialization_loss(z, eps=1e-8):
    """z (T, k, f) intermediates of each token's selected experts -> mean_t sum_{i!=j} cos^2."""
    T, k, f = z.shape
    if k < 2:
        return z.new_zeros((), dtype=torch.float32)
    z = z.to(torch.promote_types(z.dtype, torch.float32))                   # fp32 (fp64 kept for gradcheck)
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(eps)                    # (T, k, f) unit rows
    cos = zn @ zn.transpose(1, 2)                                          # (T, k, k)
    off = 1.0 - torch.eye(k, device=z.device)                               # ordered pairs i != j
    return (cos.pow(2) * off).sum(dim=(1, 2)).mean()  # a mask multiply, not boolean indexing: compiles


class SpecializationLoss(torch.autograd.Function):
    """specialization_loss from the Gram matrices G = z z^T (T, k, k), forward and backward one bmm
    each: cos^2_ij = G_ij^2 / (s_i s_j), s_i = max(G_ii, eps^2). Backward, for i != j:
    dL/dG_ij = 2 G_ij / (s_i s_j), dL/dG_ii = -2 sum_j cos^2_ij / s_i (where G_ii > eps^2), and
    dz = (D + D^T) z. Autograd through the reference reads and writes (T, k, f) about four times more
    (CPU, T=768, k=2, f=192: 0.45 against 0.74 ms forward and backward); tested against it."""

    @staticmethod
    def forward(ctx, z, eps):
        T, k, f = z.shape
        G = torch.bmm(z, z.transpose(1, 2))                                  # (T, k, k)
        diag = G.diagonal(dim1=1, dim2=2)                                   # (T, k) squared norms
        s = diag.clamp_min(eps * eps)
        inv = 1.0 / (s[:, :, None] * s[:, None, :])                         # (T, k, k)
        off = 1.0 - torch.eye(k, device=z.device, dtype=z.dtype)
        cos2 = G * G * inv * off                                            # (T, k, k), 0 on the diagonal
        ctx.save_for_backward(z, G, inv, s, diag > eps * eps, off, cos2)
        return cos2.sum(dim=(1, 2)).mean()

    @staticmethod
    def backward(ctx, grad):
        z, G, inv, s, above, off, cos2 = ctx.saved_tensors
        D = 2 * G * inv * off + torch.diag_embed(-2 * cos2.sum(dim=2) / s * above)  # (T, k, k) dL/dG
        return torch.bmm((D + D.transpose(1, 2)) * (grad / z.shape[0]), z), None


def topk_mass(probs, k):
    """M_t = sum of the k largest full-softmax probabilities, (T, E) -> (T,)."""
    return probs.float().topk(k, dim=-1).values.sum(dim=-1)


def coupling_loss(probs_list, k=None, idx_list=None):
    """probs_list: full softmax (T, E) of consecutive MoE layers -> -mean_t sum_l M^l_t M^{l+1}_t (0 if L < 2).
    M is the mass of the experts each layer selected: give idx_list (T, k) per layer for a router
    whose selection is not the top-k of its probabilities (sigmoid + bias, hash); with k alone the
    selection is taken to be the top-k of p."""
    if idx_list is None:
        masses = [topk_mass(p, k) for p in probs_list]                                 # (T,) per layer
    else:
        masses = [p.float().gather(1, i).sum(dim=-1) for p, i in zip(probs_list, idx_list)]
    return torch.stack([a * b for a, b in zip(masses[:-1], masses[1:])]).sum(0).mean().neg() if len(masses) > 1 \
        else torch.zeros(())


# each term's name (in the log) -> the setting that scales it
COEFFICIENTS = {"lb": "c_lb", "z": "c_z", "sp": "c_sp", "cp": "c_cp", "seq": "c_seq", "ortho": "mu_ortho"}


def aux_losses(routes, coefs=None, all_terms=True, pool=None, seq_len=None):
    """
    routes: one router.Routing per MoE layer; coefs: {setting: coefficient} for the settings of
    COEFFICIENTS (c_lb, c_z, c_sp, c_cp, mu_ortho; a missing one is 0). Returns (total, terms): total
    is the scalar sum of coefficient * term; terms maps each name to its unscaled value (a tensor). A
    term whose coefficient is 0 is computed only if all_terms (for the log), and then without graph.
    pool: (layer, counts, psum, T) -> L_lb's statistics over more than this batch: the batches of every
    process (support/parallel.pooled_balance) or of every micro-batch of the step (StepBalance), so
    that L_lb, the one term that is not a mean over tokens, is the loss of the global batch (equal
    local batch sizes assumed). None: this batch alone. seq_len: the sequence length, for L_seq.
    """
    coefs = coefs or {}
    unknown = set(coefs) - set(COEFFICIENTS.values())
    if unknown:
        raise ValueError(f"unknown coefficient(s) {sorted(unknown)}; known: {sorted(COEFFICIENTS.values())}")
    if not routes:
        return torch.zeros(()), {}
    T, k = routes[0].idx.shape
    total, values = routes[0].logits.new_zeros(()), {}
    for name, setting in COEFFICIENTS.items():
        coef = coefs.get(setting, 0.0)
        if coef == 0.0 and not all_terms:
            continue
        if (name == "seq" and not (seq_len and coef)) or (name == "ortho" and routes[0].penalty is None):
            continue  # DeepSeek-V3's sequence-wise balance only where asked; ERMoE's penalty only in its mode
        with torch.set_grad_enabled(torch.is_grad_enabled() and coef != 0.0):
            if name == "lb":  # E sum_e f_e P_e, f_e = count_e / (T k), P_e = psum_e / T; pooled: over more batches
                value = 0
                for layer, r in enumerate(routes):
                    counts, psum, n = pool(layer, r.counts, r.psum, T) if pool else (r.counts, r.psum, T)
                    value = value + counts.numel() * ((counts.float() / (n * k)) * (psum.float() / n)).sum()
            elif name == "z":
                value = sum(r.lse.pow(2).mean() for r in routes)
            elif name == "sp":  # by the Gram matrices (SpecializationLoss), in fp32; 0 with one expert per token
                value = sum(SpecializationLoss.apply(r.acts.to(torch.promote_types(r.acts.dtype, torch.float32)), 1e-8)
                            for r in routes) if k > 1 else total.new_zeros(())
            elif name == "cp":  # the masses M^l of consecutive layers
                value = -sum(a.mass * b.mass for a, b in zip(routes[:-1], routes[1:])).mean() if len(routes) > 1 \
                    else total.new_zeros(())
            elif name == "seq":
                value = sum(sequence_balance_loss(r.probs, k, seq_len) for r in routes)
            else:  # "ortho": ERMoE's soft-orthogonality penalty
                value = sum(r.penalty for r in routes)
        values[name] = value
        if coef != 0.0:
            total = total + coef * value
    return total, values
