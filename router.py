"""
Routers: from a token's hidden state to its routing decision. One interface, one registry.

Notation: T tokens (batch x sequence, flattened), d model width, E routed experts, k experts per
token, f expert width, r the ERMoE basis rank.

A router defines logits a (T, E) (fp32) whose softmax p is its routing distribution, and, where its
choice is not the top-k of a, `select`. `Router.forward` does the rest alike for every router (ERMoE and
expert choice have their own): the selection (the k largest, ties to the lower index), the gates (p
renormalised over the k selected), the routed scale, a capacity, and the statistics the losses need.

  router         logits a                          p                        selection
  softmax        x W^T                             softmax(x W^T)           top-k of a
  ermoe          beta * ||P_e^T x|| / ||x||        softmax(beta s)          top-k of p + bias (or of a)
  sigmoid        log sigmoid(x W^T)                sigmoid / sum sigmoid    top-k of sigmoid + bias (in groups)
  hash           0 at the token's k experts, -inf  uniform over them        a fixed table
  cosine         cos(x W_p, e_i) / tau             softmax(cos / tau)       top-k of a
  expert_choice  x W^T                             softmax(x W^T)           each expert its top-c tokens

Read `Router.forward`, `route_reference` and `select_topk` first: the routing of the default run.
Then the other routers, where the routing pass may run fused (`topk_route`), and ERMoE. Router math
is fp32 even under bf16 autocast; the design notes are in docs/design.md §1-2 and docs/routers.md.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import kernels
from support.compat import require_project_kernels

require_project_kernels(kernels)  # not Hugging Face's package of the same name, which transformers imports


class Routing(NamedTuple):
    """What one MoE layer decided (the router fills it; the MoE block adds `acts` after its dispatch)."""
    gates: torch.Tensor                     # (T, k) fp32 mixing weights (0 for a dropped pair)
    idx: torch.Tensor                       # (T, k) int64 selected experts, best first
    counts: torch.Tensor                    # (E,) int32 (token, expert) pairs per expert
    lse: torch.Tensor                       # (T,) logsumexp of the logits (z-loss)
    mass: torch.Tensor                      # (T,) p summed over the selected experts (coupling loss)
    psum: torch.Tensor                      # (E,) p summed over the tokens (load balancing)
    logits: Optional[torch.Tensor] = None   # (T, E) fp32, p = softmax(logits)
    expert_inputs: Optional[torch.Tensor] = None  # (T, E, r) what each expert reads, where the router makes it (ERMoE)
    kept: Optional[torch.Tensor] = None     # (T, k) bool, the pairs that run (expert choice, a capacity); None: all
    penalty: Optional[torch.Tensor] = None  # ERMoE soft-orthogonality penalty ('penalty' basis mode)
    acts: Optional[torch.Tensor] = None     # (T, k, f) SwiGLU activations of the selected experts (the MoE block's)

    @property
    def probs(self):
        """(T, E) the router's routing distribution p, materialised only when asked for."""
        return self.logits.softmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# the interface, and the routing pass in PyTorch

class Router(nn.Module):
    """Base of every router: the block input x (T, d) -> Routing. A router defines logits(x, ids);
    where its choice is not the top-k of the logits, also select(a, ids) (and topk_of_logits = False)."""
    defaults = {}        # default loss coefficients of this router (train.py applies them unless set)
    topk_of_logits = True  # the selection is the top-k of the logits (so the fused Triton pass applies)
    select_bias = False    # selects by a bias b, update() after every step (sigmoid: always; softmax, ERMoE: if set)
    score_gates = False    # unrenormalised gates: p at the selection; True: the score exp(a) (sigmoid: s itself)
    impl = "auto"          # where the routing pass runs (IMPLS below; train.py sets its router_impl)

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.k = cfg.n_experts, cfg.top_k
        self.read_width = cfg.n_embd  # the width of the rows the experts read (ERMoE: its rank r)
        # at k=1 a renormalised gate is always 1 (no router gradient): the gate is the score (Switch's p)
        self.renorm = cfg.gate_renorm and cfg.top_k > 1
        self.routed_scale, self.capacity_factor = cfg.routed_scale, cfg.capacity_factor
        self.select_bias = self.select_bias or cfg.select_bias
        if self.select_bias:
            self.register_buffer("bias", torch.zeros(self.n_experts))    # (E,) in the checkpoint, no gradient
            self.topk_of_logits, self.rate = False, cfg.bias_update_rate

    def forward(self, x, ids=None):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            a = self.logits(x, ids)                                      # (T, E) fp32
            if not self.topk_of_logits:                                  # the router's own selection
                r = route_reference(a, self.k, self.renorm, self.select(a, ids), self.score_gates)
            elif self.impl != "torch":  # (train.py decides 'auto' once for the device; topk_route, if left 'auto')
                r = topk_route(a, self.k, self.impl, self.renorm)        # compiled or Triton: the same Routing
            else:
                r = route_reference(a, self.k, self.renorm)
        return self.finish(r, x)

    def select(self, a, ids):
        """idx (T, k) where topk_of_logits is False: here the top-k of p + b (select_bias: ERNIE-4.5, LongCat)."""
        return select_topk(a.softmax(dim=-1) + self.bias, self.k)

    def finish(self, r, x):
        """The routed scale (DeepSeek-V3: 2.5); a capacity if one is set (dropped pairs get gate 0)."""
        gates, kept = (r.gates * self.routed_scale if self.routed_scale != 1.0 else r.gates), r.kept  # (T, k)
        if self.capacity_factor > 0:
            kept = capacity_mask(r.idx, self.capacity_factor, self.n_experts)
            gates = gates * kept
        return r._replace(gates=gates, kept=kept)

    def metrics(self):
        """This router's own evaluation metrics (e.g. ERMoE's geometry), a dict of floats."""
        return {}

    def similarity(self):
        """An (E, E) similarity of the experts for the plots, or None."""
        return None

    @torch.no_grad()
    def update(self, counts):
        """After every optimizer step (select_bias), with the step's load (E,) of every process: loss-free balancing
        (Wang et al. 2024, arXiv 2408.15664, Alg. 1), b_e += rate * sign(mean load - load_e)."""
        if self.select_bias:
            load = counts.float()
            self.bias += self.rate * torch.sign(load.mean() - load)


def route_reference(logits, k, renormalize=True, idx=None, score_gates=False):
    """The routing pass in plain PyTorch: logits (T, E) -> Routing. The selection is the top-k of the
    logits unless a router gives its own `idx` (T, k). The gates: p renormalised over the selected, or
    (renormalize=False) p itself, or the router's score exp(a) where score_gates (sigmoid: s itself)."""
    a = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (T, E) fp32 (fp64 kept for gradcheck)
    lse = a.logsumexp(dim=-1)                                       # (T,)
    p = (a - lse[:, None]).exp()                                    # (T, E) full softmax
    if idx is None:
        idx = select_topk(a, k)                                     # (T, k)
    top = p.gather(1, idx)                                          # (T, k) p at the selected experts
    if renormalize:
        gates = a.gather(1, idx).softmax(dim=-1)                    # (T, k) = p renormalised over the k selected
    elif score_gates:
        gates = a.gather(1, idx).exp()                              # (T, k) the score (sigmoid: a = log s)
    else:
        gates = top
    mass = top.sum(dim=-1)                                          # (T,)
    return Routing(gates, idx, expert_counts(idx, a.shape[1]), lse, mass, p.sum(dim=0), a)


def select_topk(scores, k):
    """Top-k of scores (T, E) fp32, ties to the lower index -> idx (T, k) int64.
    A stable descending sort gives the tie rule (torch.topk promises none); a NaN counts as the largest."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (T, E), ties: lower first
    return order[:, :k]                                                         # (T, k)


def expert_counts(idx, n_experts):
    """Pairs routed to each expert: idx (T, k) -> (E,) int32. scatter_add, not bincount: no host sync."""
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int32, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))


def capacity_mask(idx, capacity_factor, n_experts):
    """(T, k) bool: the pairs within their expert's first ceil(capacity_factor * T * k / E) in token, then slot
    order (Switch, GShard: first come, first served). Not causal: earlier tokens decide (docs/design.md §1)."""
    flat = idx.reshape(-1)                                          # (T*k,)
    order = torch.sort(flat, stable=True).indices                   # pairs grouped by expert, token order within
    counts = expert_counts(idx, n_experts)
    start = (counts.cumsum(0) - counts)[flat[order]]                # (T*k,) first row of each row's expert
    rank = torch.empty_like(flat).scatter_(0, order, torch.arange(flat.numel(), device=idx.device) - start)
    return (rank < math.ceil(capacity_factor * idx.shape[0] * idx.shape[1] / n_experts)).view_as(idx)  # T, k


def _cosine_matrix(rows):  # (E, E) cosine similarity of the rows
    unit = F.normalize(rows.detach().float(), dim=-1)
    return unit @ unit.T


class SoftmaxRouter(Router):
    """The linear router of Switch / GShard / Mixtral: a = x W^T. select_bias: the top-k of p + b, b a bias
    that only selects, balanced as the sigmoid router's (ERNIE-4.5, LongCat; Router.select)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weight = nn.Parameter(torch.randn(self.n_experts, cfg.n_embd) * 0.02)

    def logits(self, x, ids):
        return F.linear(x, self.weight.float())                         # (T, E)

    def similarity(self):
        return _cosine_matrix(self.weight)


class SigmoidRouter(SoftmaxRouter):
    """DeepSeek-V3 (arXiv 2412.19437, §2.1.2): scores s = sigmoid(x W^T) as logits a = log s (p = s / sum s);
    the k experts of largest s + b are selected, b a bias that only selects (Router.update); with n_group
    > 1 only within the topk_group best groups, a group scored by its two largest s + b. Gates: s
    renormalised, or s (gate_renorm=False), times routed_scale."""
    defaults = dict(c_lb=0.0, c_z=0.0)  # balanced by the bias instead
    topk_of_logits = False              # the selection is not the top-k of the logits
    select_bias = True                  # always: the bias b of Router, balanced per step
    score_gates = True

    def __init__(self, cfg):
        super().__init__(cfg)                                            # the linear router's weight
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group

    def logits(self, x, ids):
        return F.logsigmoid(F.linear(x, self.weight.float()))             # (T, E) log s

    def select(self, a, ids):
        """The k experts of s + b (T, E), within the topk_group best groups -> idx (T, k)."""
        choice = a.exp() + self.bias                                      # DeepSeek-V3 Eq. 16: bias to select
        if self.n_group > 1:
            T, E = choice.shape
            groups = choice.view(T, self.n_group, E // self.n_group)      # (T, G, E/G)
            score = groups.topk(min(2, E // self.n_group), dim=-1).values.sum(-1)  # (T, G)
            best = select_topk(score, self.topk_group)                 # (T, topk_group), ties: lower group
            allowed = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~allowed.repeat_interleave(E // self.n_group, dim=1), -math.inf)
        return select_topk(choice, self.k)

    def metrics(self):
        return {"bias_range": (self.bias.max() - self.bias.min()).item()}


def random_table(vocab_size, n_experts, k):
    """A fixed random token id -> k distinct experts table (vocab_size, k) (hash layers)."""
    return torch.rand(vocab_size, n_experts).argsort(dim=1)[:, :k]


class HashRouter(Router):
    """Hash layers (Roller et al. 2021, arXiv 2106.04426): every token id goes to k fixed random experts (a
    table in the checkpoint), gates 1/k. Nothing is learned: the baseline that shows what learning adds."""
    defaults = dict(c_lb=0.0, c_z=0.0, c_cp=0.0)  # constants here: no router parameter to move
    topk_of_logits = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("table", random_table(cfg.vocab_size, cfg.n_experts, cfg.top_k))  # (V, k) distinct

    def logits(self, x, ids):
        if ids is None:
            raise ValueError("router=hash needs the token ids")
        logits = torch.full((x.shape[0], self.n_experts), -math.inf, device=x.device)
        return logits.scatter(1, self.table[ids], 0.0)                   # (T, E) p uniform over the k experts

    def select(self, a, ids):
        return self.table[ids]                                           # (T, k) in the table's order


class CosineRouter(Router):
    """X-MoE (Chi et al. 2022, §3): a = cos(x W_p, e_i) / tau, x projected to 16 dimensions, e_i an expert
    embedding, tau learned: the comparison for ERMoE's cosine-to-subspace score. Our choices: 1/tau
    starts at 10 (ERMoE's beta) and is at most 100; the embeddings start orthogonal."""

    def __init__(self, cfg):
        super().__init__(cfg)
        d_low = min(16, cfg.n_embd)                                      # X-MoE's 16 dimensions
        self.proj = nn.Parameter(torch.randn(d_low, cfg.n_embd) * 0.02)  # (d_low, d)
        self.centroids = nn.Parameter(nn.init.orthogonal_(torch.empty(cfg.n_experts, d_low)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))      # log(1/tau)

    def scale(self):
        return self.log_scale.exp().clamp(max=100.0)

    def logits(self, x, ids):
        h = F.normalize(F.linear(x, self.proj.float()), dim=-1)         # (T, d_low) on the unit sphere
        e = F.normalize(self.centroids.float(), dim=-1)                  # (E, d_low)
        return self.scale() * (h @ e.T)                                  # (T, E) cosines / tau

    def metrics(self):
        return {"scale": self.scale().item()}

    def similarity(self):
        return _cosine_matrix(self.centroids)


class ExpertChoiceRouter(SoftmaxRouter):
    """Expert choice (Zhou et al. 2022, §3): each expert takes the c tokens of the batch of largest p_te,
    c = ceil(capacity_factor * T * k / E) (0 counts as 1), gates p. Every token lists all E experts, the
    chosen first, `kept` marking them (the dispatch computes all E and discards the rest). Balanced by
    construction; not causal: a token's experts depend on later tokens (docs/design.md §2)."""
    defaults = dict(c_lb=0.0)  # balanced by construction
    topk_of_logits = False

    def __init__(self, cfg):
        super().__init__(cfg)                                            # the linear router's weight and logits
        self.choice_factor = cfg.capacity_factor or 1.0
        self.capacity_factor = 0.0  # its own capacity, not the token-choice one of Router.finish

    def forward(self, x, ids=None):  # the experts choose, not the tokens
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = self.logits(x.float(), ids)                               # (T, E)
            T, E = a.shape
            lse = a.logsumexp(dim=-1)                                     # (T,)
            p = (a - lse[:, None]).exp()                                  # (T, E)
            c = min(T, math.ceil(self.choice_factor * T * self.k / E))
            chosen_tok = select_topk(p.T, c)                           # (E, c) each expert's tokens, ties: lower
            chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(0, chosen_tok.T, True)  # (T, E)
            by_score = torch.sort(p, dim=1, descending=True, stable=True).indices           # (T, E)
            idx = by_score.gather(1, torch.sort((~chosen.gather(1, by_score)).to(torch.uint8), dim=1,
                                                stable=True).indices)    # (T, E) the chosen first, by p
            kept = chosen.gather(1, idx)                                  # (T, E)
            gates = p.gather(1, idx) * kept                               # (T, E)
            return self.finish(Routing(gates, idx, chosen.sum(0, dtype=torch.int32), lse, (p * chosen).sum(-1),
                                       p.sum(0), a, kept=kept), x)


# ------------------------------------------------------------------------------------------------
# where the routing pass runs: PyTorch (route_reference), torch.compile, or the Triton kernel

IMPLS = ("auto", "torch", "compile", "triton")
_compiled_reference = None


def choose_impl(impl, E, k, x):
    """'auto' -> the Triton kernel for a CUDA tensor x where it fits, else PyTorch; any other impl as given."""
    if impl != "auto":
        return impl
    return "triton" if x.is_cuda and kernels.triton_unsupported(E, k, x.dtype) is None else "torch"


def topk_route(logits, k, impl="torch", renormalize=True):
    """The routing pass: logits (T, E) -> Routing, by `impl`; the same result for every impl."""
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"need 1 <= k <= E, got k={k}, E={E}")
    impl = choose_impl(impl, E, k, logits)
    if impl == "torch":
        return route_reference(logits, k, renormalize)
    if impl == "compile":
        global _compiled_reference
        if _compiled_reference is None:
            # dynamic=True: one graph for every T (static shapes hit the recompile limit at the 9th)
            _compiled_reference = torch.compile(route_reference, fullgraph=True, dynamic=True)
        return _compiled_reference(logits, k, renormalize)
    if impl == "triton":
        gates, idx, lse, mass, counts, psum = kernels.fused_route(logits, k, renormalize)
        return Routing(gates, idx, counts, lse, mass, psum, logits)
    raise ValueError(f"unknown impl '{impl}' ({'|'.join(IMPLS)})")


# ------------------------------------------------------------------------------------------------
# ERMoE eigenbasis router

def eigen_score(u, xnorm):
    """s_te = ||u_e|| / ||x_t|| (T, E), u = P_e^T x (T, E, r): the cosine to span(P_e); ||x|| >= 1e-6."""
    return u.norm(dim=-1) / xnorm.clamp_min(1e-6)[:, None]


def eigenbasis_scores(x, P):
    """The ERMoE score of tokens x (T, d) for orthonormal bases P (E, d, r) -> s (T, E) in [0, 1]."""
    return eigen_score(torch.einsum("td,edr->ter", x, P), x.norm(dim=-1))


def eigen_route(u, xnorm, beta, k, r, impl="torch", renormalize=True):
    """The ERMoE routing pass: u (T, E*r), ||x|| (T,), beta () -> Routing, logits beta * s (fused on Triton)."""
    if r < 1 or u.shape[1] % r != 0:
        raise ValueError(f"u has {u.shape[1]} coordinates per token, not a multiple of the rank r={r}")
    E = u.shape[1] // r
    if choose_impl(impl, E, k, u) == "triton":
        logits, gates, idx, lse, mass, counts, psum = kernels.fused_eigen_route(u, xnorm, beta, k, r, renormalize)
        return Routing(gates, idx, counts, lse, mass, psum, logits)
    logits = beta.float() * eigen_score(u.float().unflatten(1, (E, r)), xnorm.float())  # (T, E)
    return topk_route(logits, k, impl, renormalize)


def orthonormal(raw):
    """Q factor of the QR decomposition with diag(R) > 0: (..., d, r) -> orthonormal columns."""
    q, r = torch.linalg.qr(raw)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))         # (..., r)
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


class EigenRouter(Router):
    """ERMoE (Cheng et al. 2025, arXiv 2511.10971), this project's language-model reading (docs/design.md
    §2): expert e owns an orthonormal basis P_e (d, r); the logits are beta * s, s_te = ||P_e^T x_t|| /
    ||x_t|| the cosine between the token and the expert's subspace. The experts read the token (the
    default), or with ermoe_input='coords' the coordinates P_e^T x scaled by a learned lambda. Bases:
    'independent' (each its own), 'partitioned' (blocks of one orthogonal d x d matrix: disjoint),
    'penalty' (free, pulled to orthonormal by mu * ||P^T P - I||^2)."""
    # No balancing loss (the paper's claim) but the loss-free bias: without it experts die, R_cp turning their
    # subspaces away from the tokens until none selects them, and fewer without R_cp (docs/design.md §2)
    defaults = dict(c_lb=0.0, c_z=0.0, select_bias=True)

    def __init__(self, cfg, beta_max=100.0):
        super().__init__(cfg)
        d, E, r, basis = cfg.n_embd, cfg.n_experts, cfg.ermoe_rank, cfg.ermoe_basis
        self.E, self.r, self.basis, self.beta_max = E, r, basis, beta_max
        self.read_coords = cfg.ermoe_input == "coords"
        self.read_width = r if self.read_coords else d
        if basis == "partitioned":  # (GPTConfig has checked the mode and the rank)
            self.raw = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        else:
            init = torch.randn(E, d, r) / math.sqrt(d)
            self.raw = nn.Parameter(orthonormal(init) if basis == "penalty" else init)
        log_beta = torch.tensor(math.log(cfg.ermoe_beta))
        if cfg.ermoe_beta_learned:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)
        self.lam = nn.Parameter(torch.ones(E, r)) if self.read_coords else None  # per-direction input scales

    def bases(self):
        """P (E, d, r) in fp32."""
        raw = self.raw.float()
        if self.basis == "independent":
            return orthonormal(raw)
        if self.basis == "partitioned":
            Q = orthonormal(raw)[:, :self.E * self.r]                     # (d, E*r)
            return rearrange(Q, "d (e r) -> e d r", e=self.E)             # (E, d, r)
        return raw

    def beta(self):
        return self.log_beta.exp().clamp(max=self.beta_max)

    def forward(self, x, ids=None):
        with torch.autocast(device_type=x.device.type, enabled=False):  # QR and coordinates in fp32
            x = x.float()
            u = torch.einsum("td,edr->ter", x, self.bases())                 # (T, E, r)
            if self.select_bias:  # the loss-free bias selects: the top-k of p + b
                a = self.beta() * eigen_score(u, x.norm(dim=-1))             # (T, E)
                routing = route_reference(a, self.k, self.renorm, self.select(a, ids))
            else:
                routing = eigen_route(u.flatten(1), x.norm(dim=-1), self.beta(), self.k, self.r, self.impl, self.renorm)
        penalty = self.penalty() if self.basis == "penalty" else None
        inputs = u * self.lam if self.read_coords else None
        return self.finish(routing._replace(expert_inputs=inputs, penalty=penalty), x)

    def penalty(self):
        """sum_e ||P_e^T P_e - I||_F^2 (0 in the exact modes, up to rounding)."""
        P = self.bases()
        gram = P.transpose(1, 2) @ P                                         # (E, r, r)
        return (gram - torch.eye(self.r, device=P.device)).pow(2).sum()

    @torch.no_grad()
    def similarity(self):
        """(E, E) subspace overlaps ||P_i^T P_j||_F^2 / r: 1 on the diagonal, 0 for disjoint subspaces."""
        P = self.bases()
        flat = P.transpose(1, 2).reshape(self.E * self.r, -1)               # (E*r, d)
        cross = (flat @ flat.T).reshape(self.E, self.r, self.E, self.r)     # (E, r, E, r)
        return cross.pow(2).sum(dim=(1, 3)) / self.r

    @torch.no_grad()
    def metrics(self):
        """Geometry: max_e ||P_e^T P_e - I||_F, mean_{i!=j} subspace overlap, beta."""
        P, overlap = self.bases(), self.similarity()
        gram_err = P.transpose(1, 2) @ P - torch.eye(self.r, device=P.device)            # (E, r, r)
        off = (overlap.sum() - overlap.diagonal().sum()) / max(self.E * (self.E - 1), 1)
        return {"ortho_err": gram_err.norm(dim=(1, 2)).max().item(), "overlap": off.item(), "beta": self.beta().item()}


ROUTERS = {"softmax": SoftmaxRouter, "ermoe": EigenRouter, "sigmoid": SigmoidRouter, "hash": HashRouter,
           "cosine": CosineRouter, "expert_choice": ExpertChoiceRouter}  # families.py adds the course's token table
