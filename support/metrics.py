"""
Routing metrics (the glossary of docs/design.md §5), accumulated over evaluation batches.

Notation: T tokens, E routed experts, k experts per token, L MoE layers.

Reference values (asserted in test_all.py):
  metric                      uniform routing        collapse onto one expert
  load CV = std/mean          0                      sqrt(E-1)
  max/mean load               1                      E
  MaxVio (global, batch)      0                      E-1
  dead experts (<0.1/E load)  0                      E-1
  routing entropy / log E     1 (uniform p)          0 (one-hot p)
  top-k mass M                k/E (uniform p)        1 (one-hot p)
  co-activation cos^2         ~1/f (independent)     1 (identical experts); also given times f
  dropped pairs (capacity c)  0 (dropless)           1 - c/E (k=1, one expert takes every pair)
  NMI(layer l, layer l+1)     0 if independent       1 if one is a relabelling of the other
  experts used by a label     E (spread evenly)      1 (exp of the entropy of its top-1 experts)
  routing fluctuation         0 (no token's set of experts changed since the last evaluation) ... 1 (all did)
  token-id binding            1 (each id always to one set: hash) ... ~1/C(E,k) (sets at random, ids seen often)
  logit_mean, logit_top       each expert's mean logit, and the largest logit's mean: the scale of the router
"""

import math

import torch
import torch.nn.functional as F


def load_stats(counts):
    """counts (E,) tokens per expert -> CV, max/mean and dead experts of load_e = count_e / sum."""
    load = counts.double() / counts.sum().clamp_min(1)
    E = load.numel()
    mean = load.mean()
    return {"cv": (load.std(unbiased=False) / mean).item(),
            "max_mean": (load.max() / mean).item(),
            "dead": int((load < 0.1 / E).sum().item())}


def max_violation(counts):
    """MaxVio of Wang et al. 2024 (arXiv 2408.15664, §4.1): (max_e load_e - mean_e load_e) / mean_e load_e,
    load_e the (token, expert) pairs expert e received: 0 when balanced, E-1 when one expert takes all.
    Over one batch's counts it is MaxVio_batch, over a whole split's MaxVio_global."""
    load = counts.double()
    mean = load.mean()
    return ((load.max() - mean) / mean).item() if mean > 0 else 0.0


def entropy(probs):
    """Per-token entropy -sum_e p log p (nats), probs (T, E) -> (T,)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1)


def mutual_information(joint):
    """joint (A, B) counts -> (I(X;Y), H(X), H(Y), H(Y|X)) in nats."""
    P = joint.double() / joint.sum().clamp_min(1)
    px, py = P.sum(1), P.sum(0)
    nz = P > 0
    mi = (P[nz] * (P[nz] / (px[:, None] * py[None, :])[nz]).log()).sum().item()
    hx = -(px[px > 0] * px[px > 0].log()).sum().item()
    hy = -(py[py > 0] * py[py > 0].log()).sum().item()
    return mi, hx, hy, hy - mi


def experts_used(counts):
    """exp(entropy) of a load over experts: the number of experts it is spread over (1 to E)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def nmi(joint):
    """Normalised mutual information 2 I / (H(X) + H(Y)) (arithmetic normalisation), 0 if both constant."""
    mi, hx, hy, _ = mutual_information(joint)
    return 0.0 if hx + hy == 0 else 2 * mi / (hx + hy)


def coactivation_cos2(z):
    """Mean squared cosine between the intermediates of co-activated experts, z (T, k, f), over tokens
    and the k(k-1) ordered pairs: the specialization loss R_sp (losses.py) divided by k(k-1)."""
    k = z.shape[1]
    if k < 2:
        return 0.0
    unit = F.normalize(z.detach().double(), dim=-1, eps=1e-8)                 # (T, k, f)
    cos2 = (unit @ unit.transpose(1, 2)).pow(2)                                # (T, k, k)
    return ((cos2.sum(dim=(1, 2)) - cos2.diagonal(dim1=1, dim2=2).sum(-1)) / (k * (k - 1))).mean().item()


def expert_sets(r):
    """(T, k) each token's selected experts in ascending order (a set: the order within the top-k is not
    kept), -1 for a dropped pair (a capacity, expert choice), int16."""
    idx = r.idx if r.kept is None else r.idx.masked_fill(~r.kept, -1)
    return idx.sort(dim=-1).values.to(torch.int16).cpu()


def fluctuation(sets, previous):
    """Routing fluctuation (StableMoE, Dai et al. 2022, §2.2): the fraction of tokens whose set of selected
    experts differs from `previous`, the same tokens' sets at the last evaluation: sets (T, k) sorted rows."""
    return (sets != previous).any(dim=-1).double().mean().item()


def id_binding(ids, sets):
    """Token-id binding: per token id, the share of its occurrences sent to its most common set of experts,
    averaged over the ids weighted by their count (= the sum of those largest counts / T). ids (T,), sets
    (T, k) sorted rows. 1 for a hash table; near 1/C(E,k) where the set ignores the id."""
    set_id = torch.unique(sets, dim=0, return_inverse=True)[1]          # (T,) one number per distinct set
    n_sets = int(set_id.max()) + 1
    codes, counts = torch.unique(ids.long().cpu() * n_sets + set_id, return_counts=True)  # each (id, set) pair
    owner = codes // n_sets                                              # the id of each pair
    best = torch.zeros(int(owner.max()) + 1, dtype=counts.dtype).scatter_reduce(0, owner, counts, "amax")
    return best.sum().item() / len(ids)


class RoutingStats:
    """
    Accumulates routing of every MoE layer over batches; `summary()` gives per-layer metrics.
    With n_labels > 0, update() also takes a label per token (e.g. the synthetic task's source)
    and the summary gains NMI(top-1 expert, label) per layer: the specialization metric. With the
    token ids, the summary gains the token-id binding, and given the sets of the last evaluation of
    the same tokens (`sets()`), the routing fluctuation.
    """

    def __init__(self, n_labels=0):
        self.layers, self.pairs, self.n, self.batches, self.n_labels = None, None, 0, 0, n_labels
        self.ids, self.chosen = [], None   # token ids and per layer each token's expert set, batch by batch

    def sets(self):
        """Per layer, every token's set of experts (T, k), in the order the batches came."""
        return [torch.cat(c) for c in self.chosen] if self.chosen else None

    @torch.no_grad()
    def update(self, routes, labels=None, ids=None):
        if not routes:
            return
        E = routes[0].logits.shape[1]
        if self.layers is None:
            self.layers = [{"counts": torch.zeros(E, dtype=torch.float64), "entropy": 0.0, "mass": 0.0,
                            "logits": torch.zeros(E, dtype=torch.float64), "top_logit": 0.0, "finite": True,
                            "cos2": 0.0, "dropped": 0.0, "maxvio_batch": 0.0,
                            "source": torch.zeros(E, max(self.n_labels, 1), dtype=torch.float64)}
                           for _ in routes]
            self.pairs = [torch.zeros(E, E, dtype=torch.float64) for _ in routes[1:]]
            self.chosen = [[] for _ in routes]
        T = routes[0].idx.shape[0]
        for chosen, r in zip(self.chosen, routes):
            chosen.append(expert_sets(r))
        if ids is not None:
            self.ids.append(ids.reshape(-1).cpu())
        for acc, r in zip(self.layers, routes):
            acc["counts"] += r.counts.double().cpu()
            acc["maxvio_batch"] += max_violation(r.counts)
            acc["entropy"] += entropy(r.probs).sum().item()
            a = r.logits.detach().double()                             # (T, E) the scale of the router's logits
            acc["finite"] = acc["finite"] and bool(torch.isfinite(a).all())  # (hash: -inf off its table)
            if acc["finite"]:
                acc["logits"] += a.sum(dim=0).cpu()
                acc["top_logit"] += a.max(dim=-1).values.sum().item()
            acc["mass"] += r.mass.double().sum().item()
            acc["cos2"] += coactivation_cos2(r.acts) * T
            acc["f"] = r.acts.shape[-1]
            if r.kept is not None:  # capacity factor: the (token, expert) pairs that were dropped
                acc["dropped"] += (~r.kept).double().mean().item() * T
        top1 = [r.idx[:, 0].cpu() for r in routes]                     # (T,) per layer
        ones = torch.ones(T, dtype=torch.float64)
        for joint, a, b in zip(self.pairs, top1[:-1], top1[1:]):
            joint.index_put_((a, b), ones, accumulate=True)
        if labels is not None:
            for acc, a in zip(self.layers, top1):
                acc["source"].index_put_((a, labels.reshape(-1).cpu()), ones, accumulate=True)
        self.n += T
        self.batches += 1

    def summary(self, previous=None):
        """List of per-layer dicts; layer l also carries the coupling to layer l+1. previous: the sets()
        of the last evaluation of the same tokens, for the routing fluctuation."""
        if self.layers is None:
            return []
        out, sets = [], self.sets()
        ids = torch.cat(self.ids) if self.ids else None
        E = self.layers[0]["counts"].numel()
        for i, acc in enumerate(self.layers):
            m = load_stats(acc["counts"])
            m["entropy"] = acc["entropy"] / self.n
            m["entropy_norm"] = m["entropy"] / math.log(E) if E > 1 else 0.0
            m["topk_mass"] = acc["mass"] / self.n
            m["coact_cos2"] = acc["cos2"] / self.n
            m["coact_floor"] = m["coact_cos2"] * acc["f"]    # in units of the random floor 1/f
            m["load"] = (acc["counts"] / acc["counts"].sum()).tolist()
            if acc["finite"]:  # the mean logit of each expert, and of the largest one (ERMoE: beta times the cosine)
                m["logit_mean"] = (acc["logits"] / self.n).tolist()
                m["logit_top"] = acc["top_logit"] / self.n
            m["dropped"] = acc["dropped"] / self.n
            m["maxvio_global"] = max_violation(acc["counts"])          # over every batch seen
            m["maxvio_batch"] = acc["maxvio_batch"] / self.batches     # the mean over batches
            if self.n_labels:
                m["source_nmi"] = nmi(acc["source"])
                m["experts_per_label"] = [round(experts_used(col), 4) for col in acc["source"].T]
            if ids is not None:
                m["id_binding"] = id_binding(ids, sets[i])
            if previous is not None and previous[i].shape == sets[i].shape:
                m["fluctuation"] = fluctuation(sets[i], previous[i])
            if i < len(self.pairs):
                mi, hx, hy, h_cond = mutual_information(self.pairs[i])
                m["next_nmi"] = nmi(self.pairs[i])
                m["next_cond_entropy"] = h_cond
            out.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()})
        return out

    def transitions(self):
        """Row-normalised top-1 transition matrices T^l[e, e'] = P(e' at l+1 | e at l)."""
        return [j / j.sum(1, keepdim=True).clamp_min(1) for j in (self.pairs or [])]
