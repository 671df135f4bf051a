"""
Exercise 8: a new router through the router interface.

Task: write a centroid router. Expert e has a learned centroid c_e in R^d; the logit of token t for
expert e is the negative squared distance to it: a[t, e] = -||x_t - c_e||^2. Everything else (top-k,
gates, counts, the statistics of the losses, the fused kernel) comes from the base class
router.Router: you only write __init__ (create the centroids as an nn.Parameter of shape (E, d),
small random values, e.g. 0.02 * randn) and logits(x, ids) -> (T, E).

The grader registers your class in router.ROUTERS under the name 'centroid' and trains a tiny GPT
with it, so it must work like any other router (`--router=centroid` would work the same way).
Hint: ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; or torch.cdist(x, c) ** 2.
"""

import torch
import torch.nn as nn

from router import Router


class CentroidRouter(Router):
    def __init__(self, cfg):
        super().__init__(cfg)
        raise NotImplementedError

    def logits(self, x, ids):
        raise NotImplementedError
