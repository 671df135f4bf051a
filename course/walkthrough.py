# %% [markdown]
# # MoE routing, one handful of tokens at a time
#
# An executable lecture: run it as a script (`python course/walkthrough.py`, a few seconds on a CPU) or open
# it as a notebook (VS Code / Jupyter read the `# %%` cells). It follows T = 8 tokens through one
# MoE block with E = 4 experts and k = 2 experts per token, printing every intermediate, and checks
# each number computed by hand against the project's own code (router.py, model.py, losses.py).
#
#     x (T, d) --router--> logits (T, E) --top-k--> idx, gates (T, k)
#                                                      |
#           sort the T*k (token, expert) pairs by expert, run each expert on its segment,
#           multiply by the gate, add back to the token:  y (T, d)

# %%
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from losses import coupling_loss, load_balancing_loss, specialization_loss, z_loss  # noqa: E402
from model import GPTConfig, MoE, grouped_matmul  # noqa: E402
from router import EigenRouter, eigenbasis_scores, expert_counts, route_reference, select_topk  # noqa: E402

torch.manual_seed(0)
torch.set_grad_enabled(False)                           # a lecture: values only, no gradients
torch.set_printoptions(precision=3, sci_mode=False, linewidth=120)
T, E, k, d, f = 8, 4, 2, 16, 8
cfg = GPTConfig(n_layer=1, n_head=2, n_embd=d, n_experts=E, top_k=k, expert_hidden=f)
moe = MoE(cfg)
with torch.no_grad():  # weights at a scale where the numbers say something (a fresh model's, std 0.02,
    moe.router.weight.normal_(0.0, 1.0)                 # give logits of +-0.1 and every gate ~0.5)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        w.normal_(0.0, 0.5)
x = torch.randn(T, d)                                   # the block input of 8 tokens


CHECKS = []


def section(title):
    """The cell's heading in the printed output too (a script has no markdown cells)."""
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}")


def check(name, mine, library, tol=1e-5):
    """Print a number computed by hand next to the library's, and stop if they disagree."""
    mine, library = torch.as_tensor(mine, dtype=torch.float32), torch.as_tensor(library, dtype=torch.float32)
    ok = torch.allclose(mine, library, atol=tol, rtol=tol)
    show = lambda t: "[" + ", ".join(f"{v:.4g}" for v in t.flatten()[:4].tolist()) + (
        "]" if t.numel() <= 4 else ", ...]")
    print(f"  {name:<36} by hand {show(mine):<36} library {show(library):<36} {'agree' if ok else 'DIFFER'}")
    assert ok, name
    CHECKS.append(name)


# %% [markdown]
# ## 1. The router: logits, then probabilities
# The softmax router is one matrix W (E, d): the logit of expert e for token t is the dot product
# of x_t with row e. p = softmax(a) over all E experts is the routing distribution the losses use.

# %%
section("1. The router: logits, then probabilities")
W = moe.router.weight                                   # (E, d)
logits = x @ W.T                                        # (T, E)
p = logits.softmax(dim=-1)                              # (T, E), rows sum to 1
print("logits a (T, E):\n", logits)
print("p = softmax(a):\n", p)
check("router logits", logits, moe.router.logits(x, None))

# %% [markdown]
# ## 2. The top-k choice and the tie rule
# Each token takes the k experts of largest logit. When two logits are equal the lower expert
# index wins: a stable descending sort gives that rule; `torch.topk` promises no order on ties.
#
#     a row [1, 3, 3, 2], k = 2:   sorted by (-value, index)  ->  experts 1, 2   (not 2, 1)
#
# The gates mix the k chosen experts: the softmax over the chosen logits, which is the same as p
# renormalised over the chosen experts.

# %%
section("2. The top-k choice and the tie rule")
tie_row = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
print("tie row", tie_row.tolist(), "-> experts", select_topk(tie_row, 2).tolist())
order = sorted(range(E), key=lambda e: (-logits[0, e].item(), e))   # by hand for token 0
idx = select_topk(logits, k)                            # (T, k)
gates = route_reference(logits, k).gates                # (T, k) the routing pass of router.py
print("selected experts idx (T, k):\n", idx)
print("gates (T, k):\n", gates)
check("token 0's experts", order[:k], idx[0])
check("gates = p renormalised", p.gather(1, idx) / p.gather(1, idx).sum(1, keepdim=True), gates)

# %% [markdown]
# ## 2b. A trap at k = 1: renormalised gates teach the router nothing
# With one expert per token, "p renormalised over the chosen" is p_e / p_e = 1 for every token,
# whatever W is. The block's output no longer depends on the router's weights (only *which*
# expert, a discrete choice, does), so the loss sends the router no gradient at all and it never
# learns. Switch Transformer gates by p itself at k = 1; so does this project (`gate_renorm` only
# applies from k = 2).

# %%
section("2b. A trap at k = 1: renormalised gates teach the router nothing")
with torch.enable_grad():
    W = moe.router.weight.detach().clone().requires_grad_(True)
    a1 = x @ W.T                                         # (T, E)
    top1 = a1.argmax(dim=-1, keepdim=True)               # (T, 1) the chosen expert
    expert_out = torch.randn(T, d)                       # stands for the chosen expert's output
    for name, g in (("renormalised", a1.gather(1, top1).softmax(dim=-1)),        # = 1 for every token
                    ("p (Switch)", a1.softmax(dim=-1).gather(1, top1))):        # p of the chosen expert
        (grad,) = torch.autograd.grad((g * expert_out).pow(2).sum(), W, retain_graph=True)
        print(f"  k=1, gates {name:<13} {' '.join(f'{v:.3f}' for v in g[:4, 0].tolist())} ...   "
              f"router gradient norm {grad.norm():.4f}")
one = MoE(GPTConfig(n_layer=1, n_head=2, n_embd=d, n_experts=E, top_k=1, expert_hidden=f))
one.router.weight.copy_(moe.router.weight)
check("library gates at k=1 = p", a1.softmax(dim=-1).gather(1, top1), one.router(x).gates)

# %% [markdown]
# ## 3. Sort the (token, expert) pairs by expert
# The T*k pairs are flattened (token-major) and sorted by expert, stably, so each expert's pairs
# become one contiguous segment. The counts per expert give the segment ends (offsets).
#
#     pairs  (t0,e?) (t0,e?) (t1,e?) ...             16 rows
#     sorted [ e0 e0 e0 | e1 e1 e1 e1 | e2 ... | e3 ... ]
#     offs            ^3          ^7      ...        ^16

# %%
section("3. Sort the (token, expert) pairs by expert")
flat = idx.reshape(-1)                                  # (T*k,) expert of each pair
perm = torch.sort(flat, stable=True).indices            # (T*k,) pair order, grouped by expert
tok = perm // k                                         # (T*k,) the token of each sorted row
counts = expert_counts(idx, E)                          # (E,)
offs = counts.cumsum(0)                                 # (E,) segment ends
print("row : token slot expert")
for row, pair in enumerate(perm.tolist()):
    print(f"{row:>3} : {pair // k:>5} {pair % k:>4} {flat[pair].item():>6}")
print("counts", counts.tolist(), "offsets", offs.tolist())
check("counts = pairs per expert", [int((idx == e).sum()) for e in range(E)], counts)

# %% [markdown]
# ## 4. One grouped matmul for all experts
# Row segment e of the sorted inputs is multiplied by expert e's weights. `grouped_matmul` does all
# segments in one call (a grouped GEMM on the GPU); here each segment is also done by hand.
# Every expert is a SwiGLU: silu(h W_gate) * (h W_up), then W_down.

# %%
section("4. One grouped matmul for all experts")
h = x[tok]                                              # (T*k, d) inputs in expert order
a = F.silu(grouped_matmul(h, moe.w_gate, offs.int())) * grouped_matmul(h, moe.w_up, offs.int())  # (T*k, f)
out = grouped_matmul(a, moe.w_down, offs.int())         # (T*k, d)
starts = [0] + offs.tolist()[:-1]
by_hand = torch.cat([F.silu(h[s:t] @ moe.w_gate[e]) * (h[s:t] @ moe.w_up[e]) @ moe.w_down[e]
                     for e, (s, t) in enumerate(zip(starts, offs.tolist()))])
check("grouped matmul = per-expert matmuls", by_hand, out)

# %% [markdown]
# ## 5. Gate, then add back to the tokens
# Each row's output is multiplied by its gate and added to its token: y_t = sum_j g_tj E_idx_tj(x_t).

# %%
section("5. Gate, then add back to the tokens")
y = torch.zeros(T, d).index_add(0, tok, out * gates.reshape(-1)[perm, None])   # (T, d)
y_block, routing = moe(x.view(1, T, d))
check("MoE output", y, y_block.view(T, d))
print("y[0] =", y[0, :6], "...")

# %% [markdown]
# ## 6. The auxiliary losses, by hand
# - load balancing: L_lb = E * sum_e f_e P_e, f_e = count_e / (T k), P_e = mean_t p_te
#   (1 when balanced, E/k at total collapse);
# - z-loss: mean_t (logsumexp_e a_te)^2, keeps the logits small;
# - specialization (Hu et al. 2026, Eq. 4): mean over tokens of the squared cosine between the
#   SwiGLU intermediates z of the token's k experts, over ordered pairs;
# - coupling (Hu et al., Eq. 7): -mean_t M^1_t M^2_t, M the mass of p on the selected experts, for
#   consecutive layers (here: the layer with itself and with a second router).

# %%
section("6. The auxiliary losses, by hand")
f_e = counts.float() / (T * k)
P_e = p.mean(dim=0)
check("L_lb", E * (f_e * P_e).sum(), load_balancing_loss(p, idx))
check("L_z", (logits.logsumexp(dim=-1) ** 2).mean(), z_loss(logits))
z = routing.acts.view(T, k, f)                             # the intermediates the dispatch kept
cos2 = sum(F.cosine_similarity(z[t, i], z[t, j], dim=0) ** 2 for t in range(T) for i in range(k)
           for j in range(k) if i != j) / T
check("R_sp", cos2, specialization_loss(z))
print(f"  random floor of one pair's cos^2: 1/f = {1 / f:.3f}; "
      f"this layer's mean pair: {cos2.item() / (k * (k - 1)):.3f}")
p2 = torch.softmax(x @ torch.randn(E, d).T * 0.5, dim=-1)  # a second layer's probabilities
idx2 = select_topk(p2.log(), k)
M1, M2 = p.gather(1, idx).sum(1), p2.gather(1, idx2).sum(1)
check("R_cp", -(M1 * M2).mean(), coupling_loss([p, p2], idx_list=[idx, idx2]))

# %% [markdown]
# ## 7. ERMoE: the score is a cosine to a subspace
# Expert e owns an orthonormal basis P_e (d, r). The token's coordinates in it are u_e = P_e^T x;
# the score s_e = ||u_e|| / ||x|| is the cosine of the angle between x and the subspace span(P_e):
# 1 if x lies in it, 0 if x is orthogonal to it. The logits are beta * s.
#
#              x
#             /|
#            / |   s_e = cos(angle) = ||P_e^T x|| / ||x||
#           /  |
#     -----o---+------ span(P_e)
#            P_e P_e^T x

# %%
section("7. ERMoE: the score is a cosine to a subspace")
ecfg = GPTConfig(n_layer=1, n_head=2, n_embd=d, n_experts=E, top_k=k, router="ermoe", ermoe_rank=4)
ermoe = EigenRouter(ecfg)
P = ermoe.bases()                                       # (E, d, r) orthonormal columns
print("P_0^T P_0 = I:", torch.allclose(P[0].T @ P[0], torch.eye(4), atol=1e-5))
u0 = P[0].T @ x[0]                                      # (r,) token 0 in expert 0's basis
check("s_0 of token 0", u0.norm() / x[0].norm(), eigenbasis_scores(x, P)[0, 0])
inside = P[1] @ torch.randn(4)                          # a vector in expert 1's subspace
print("scores of a vector inside span(P_1):", eigenbasis_scores(inside[None], P)[0])
ermoe_routing = ermoe(x)
check("ERMoE logits = beta * s", ermoe.beta() * eigenbasis_scores(x, P), ermoe_routing.logits)
print("ERMoE picks", ermoe_routing.idx[:4].tolist(), "for the first 4 tokens; the experts read x itself",
      "(ermoe_input='coords': only their r coordinates lambda * u, "
      "the form that collapsed on text: docs/design.md §2)")

# %% [markdown]
# ## What next
# Read router.py (the routers, one interface), model.py (MoE.forward_naive, then forward_sorted),
# losses.py, then run `python train.py config/synthetic.py` and `python tools/analyze.py out-synthetic`.
# The exercises (`course/exercises/`) ask you to write each piece above yourself.

# %%
print(f"\nall {len(CHECKS)} checks agree: the numbers by hand are the library's")
