"""Exercise 4, a reference solution."""

import torch
import torch.nn.functional as F

from model import grouped_matmul


def sorted_dispatch(x, idx, gates, w_gate, w_up, w_down):
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    tok = order // k
    counts = torch.bincount(flat, minlength=w_gate.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    h = x[tok]
    a = F.silu(grouped_matmul(h, w_gate, offs)) * grouped_matmul(h, w_up, offs)
    out = grouped_matmul(a, w_down, offs) * gates.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, tok, out)
