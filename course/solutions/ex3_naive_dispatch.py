"""Exercise 3, a reference solution."""

import torch
import torch.nn.functional as F


def naive_dispatch(x, idx, gates, w_gate, w_up, w_down):
    y = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        tok, slot = torch.where(idx == e)
        h = x[tok]
        out = (F.silu(h @ w_gate[e]) * (h @ w_up[e])) @ w_down[e]
        y = y.index_add(0, tok, out * gates[tok, slot, None])
    return y
