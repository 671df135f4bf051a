"""
Exercise 6: the ERMoE eigenbasis score.

Task: expert e owns P[e] (d, r) with orthonormal columns. The score of token t for expert e is the
cosine between x_t and the subspace spanned by P[e]: s[t, e] = ||P[e]^T x_t|| / ||x_t||.
Guard ||x_t|| with a minimum of 1e-6.

Shapes: x (T, d), P (E, d, r) -> s (T, E), each in [0, 1].
Hint: torch.einsum("td,edr->ter", x, P) gives every token's coordinates in every basis at once.
"""

import torch


def eigenbasis_score(x, P):
    raise NotImplementedError
