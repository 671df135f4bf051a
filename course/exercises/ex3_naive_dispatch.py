"""
Exercise 3: the naive dispatch loop.

Task: y_t = sum_j gates[t, j] * Expert_{idx[t, j]}(x_t), where expert e is a SwiGLU:
Expert_e(h) = (silu(h @ w_gate[e]) * (h @ w_up[e])) @ w_down[e].
Loop over the experts: find the (token, slot) pairs that chose e, run expert e on those tokens,
multiply by their gates, and add the result to their rows of y.

Shapes: x (T, d), idx and gates (T, k), w_gate and w_up (E, d, f), w_down (E, f, d) -> y (T, d).
Hint: torch.where(idx == e) gives the tokens and slots; index_add (not in-place on a view) keeps
autograd happy.
"""

import torch
import torch.nn.functional as F


def naive_dispatch(x, idx, gates, w_gate, w_up, w_down):
    raise NotImplementedError
