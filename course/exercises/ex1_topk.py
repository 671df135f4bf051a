"""
Exercise 1: the top-k choice with the tie rule, and the gates.

Task: for logits (T, E), return the indices (T, k) of the k largest logits of every row, best first,
where equal logits go to the LOWER expert index. Then compute the gates (T, k): the softmax over the
selected logits (renormalize=True), or the full-softmax probability p at the selected experts
(renormalize=False).

Hint: torch.topk does not promise which index wins a tie. A stable sort does: sort each row in
descending order with stable=True, or build the order yourself with key (-value, index).
Check: python -m pytest exercises -k ex1
"""

import torch


def topk(logits, k):
    """logits (T, E) fp32 -> idx (T, k) int64, best first, ties to the lower index."""
    raise NotImplementedError


def gates(logits, idx, renormalize=True):
    """logits (T, E), idx (T, k) -> gates (T, k): softmax over the selected logits, or p there."""
    raise NotImplementedError
