"""
Routers: from a token's hidden state to router logits over the experts, and the shared top-k rule.

Notation: T tokens (batch x sequence, flattened), d model width, E routed experts, k experts per
token, r basis rank of an ERMoE expert.

Two routers, one selection rule (docs/design.md §1):
- `SoftmaxRouter`: the usual learned linear map, a = x W_r^T (Switch / GShard / Mixtral).
- `EigenRouter`: the ERMoE eigenbasis router (Cheng et al. 2025, arXiv 2511.10971). Expert e owns
  an orthonormal basis P_e (d, r); the score s_{t,e} = ||P_e^T x_t|| / ||x_t|| is the cosine
  between the token and the expert's subspace, the logits are beta * s. The paper is about vision
  and does not spell out its method for language models; the formulation here (docs/design.md §2) is
  this project's reading of it: the coordinates u_e = P_e^T x used for routing are also the
  expert's input, scaled per direction by a learnable lambda.
- `select_topk`: the k largest logits, ties to the lower expert index, gates = softmax over the
  selected logits (= the full softmax renormalised over the top k).

Design notes
- Router math is fp32 on purpose, also under bf16 autocast: logits are small, tie-prone and feed
  a discrete choice; bf16 rounding would flip selections between otherwise identical runs.
- Ties: torch.topk does not promise which index wins a tie; a stable descending sort does (the
  lower index comes first). Sorting E values per token is cheap next to the experts; the fused
  kernel in kernels.py gives the same answer in one pass.
- Orthonormality of P_e is kept exact by a QR map: the free parameter is any d x r matrix, P_e is
  the Q factor (signs fixed so that diag(R) > 0, which makes the map smooth and unique). A penalty
  alone would only keep P_e near-orthonormal; it exists as the ablation mode 'penalty'.
- The router has no weight decay (see train.py): decay pulls router weights to zero, i.e. the
  routing towards uniform; for ERMoE it would fight the basis parametrisation.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def select_topk(logits, k, renormalize=True):
    """Top-k selection (docs/design.md §1). logits (T, E) fp32 -> gates (T, k) fp32, idx (T, k) int64."""
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # (T, E), ties: lower first
    idx = order[:, :k]                                                          # (T, k)
    top = logits.gather(-1, idx)                                                # (T, k)
    if renormalize:
        gates = top.softmax(dim=-1)                       # = p renormalised over the k selected
    else:
        gates = (top - logits.logsumexp(dim=-1, keepdim=True)).exp()  # = p at the selected experts
    return gates, idx


def expert_counts(idx, n_experts):
    """Tokens routed to each expert: idx (T, k) -> (E,) int32. scatter_add, not bincount: no host sync."""
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int32, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))


class SoftmaxRouter(nn.Module):
    """a = x W^T, computed in fp32: logits (T, E)."""

    def __init__(self, n_embd, n_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, n_embd) * 0.02)

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())  # (T, E) fp32


# ------------------------------------------------------------------------------------------------
# ERMoE eigenbasis router

def eigenbasis_scores(x, P, eps=1e-6):
    """s_{t,e} = ||P_e^T x_t|| / ||x_t||, the cosine between x_t and span(P_e). x (T, d), P (E, d, r)."""
    u = torch.einsum("td,edr->ter", x, P)                         # (T, E, r) coordinates
    return u.norm(dim=-1) / x.norm(dim=-1, keepdim=True).clamp_min(eps)  # (T, E)


def orthonormal(raw):
    """Q factor of the QR decomposition with diag(R) > 0: (..., d, r) -> orthonormal columns."""
    q, r = torch.linalg.qr(raw)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))         # (..., r)
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


class EigenRouter(nn.Module):
    """
    ERMoE router. forward(x) returns the basis coordinates u (T, E, r) = P_e^T x and ||x|| (T,);
    the logits beta * ||u_e|| / ||x|| and the top-k are computed from them in one fused pass
    (kernels.eigen_route; its reference is eigenbasis_scores above). The experts take lambda * u.

    basis modes:
      'independent': each expert its own orthonormal P_e (subspaces may overlap)
      'partitioned': P_e are column blocks of one orthogonal d x d matrix (disjoint subspaces; with
                     E*r = d every token satisfies sum_e s_{t,e}^2 = 1)
      'penalty'    : P_e free, pulled towards orthonormality by mu * sum_e ||P_e^T P_e - I||_F^2
                     (the soft ablation; the penalty is returned by `penalty()`)
    """

    def __init__(self, n_embd, n_experts, rank, basis="independent", beta_init=10.0, beta_max=100.0):
        super().__init__()
        d, E, r = n_embd, n_experts, rank
        self.E, self.r, self.basis, self.beta_max = E, r, basis, beta_max
        if basis == "partitioned":
            if E * r > d:
                raise ValueError(f"partitioned ERMoE needs n_experts*rank <= n_embd, got {E}*{r} > {d}")
            self.raw = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        elif basis in ("independent", "penalty"):
            init = torch.randn(E, d, r) / math.sqrt(d)
            self.raw = nn.Parameter(orthonormal(init) if basis == "penalty" else init)
        else:
            raise ValueError(f"unknown ermoe_basis '{basis}' (independent|partitioned|penalty)")
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta_init)))
        self.lam = nn.Parameter(torch.ones(E, r))  # per-direction scales of the expert inputs

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

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):  # QR and coordinates in fp32
            x = x.float()
            u = torch.einsum("td,edr->ter", x, self.bases())                 # (T, E, r)
            return u, x.norm(dim=-1)                                         # (T, E, r), (T,)

    def penalty(self):
        """sum_e ||P_e^T P_e - I||_F^2 (0 in the exact modes, up to rounding)."""
        P = self.bases()
        gram = P.transpose(1, 2) @ P                                         # (E, r, r)
        return (gram - torch.eye(self.r, device=P.device)).pow(2).sum()

    @torch.no_grad()
    def overlaps(self):
        """(E, E) subspace overlaps ||P_i^T P_j||_F^2 / r: 1 on the diagonal, 0 for disjoint subspaces."""
        P = self.bases()
        flat = P.transpose(1, 2).reshape(self.E * self.r, -1)               # (E*r, d)
        cross = (flat @ flat.T).reshape(self.E, self.r, self.E, self.r)     # (E, r, E, r)
        return cross.pow(2).sum(dim=(1, 3)) / self.r

    @torch.no_grad()
    def geometry(self):
        """ERMoE geometry metrics: max_e ||P_e^T P_e - I||_F, mean_{i!=j} overlap, beta."""
        P, overlap = self.bases(), self.overlaps()
        eye = torch.eye(self.r, device=P.device)
        ortho = max((P[e].T @ P[e] - eye).norm().item() for e in range(self.E))
        off = overlap.sum() - overlap.diagonal().sum()
        mean_overlap = (off / max(self.E * (self.E - 1), 1)).item()
        return {"ortho_err": ortho, "overlap": mean_overlap, "beta": self.beta().item()}
