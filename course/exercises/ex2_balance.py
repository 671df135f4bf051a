"""
Exercise 2: the load-balancing loss and the router z-loss.

Task:
- load_balancing(probs, idx): L_lb = E * sum_e f_e * P_e with f_e = count_e / (T*k), the fraction of
  the T*k (token, expert) assignments that went to e (no gradient), and P_e = mean over tokens of
  probs[:, e]. It is 1 when every expert gets the same share and E/k at total collapse.
- z_loss(logits): the mean over tokens of (logsumexp over experts of the logits)^2.

Hint: counts come from idx (T, k): how many times does each expert appear? One-hot or
scatter_add; the gradient must flow through P_e only.
"""

import torch


def load_balancing(probs, idx):
    """probs (T, E) full softmax, idx (T, k) selected experts -> scalar L_lb."""
    raise NotImplementedError


def z_loss(logits):
    """logits (T, E) -> scalar mean_t logsumexp(a_t)^2."""
    raise NotImplementedError
