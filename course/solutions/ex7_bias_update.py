"""Exercise 7, a reference solution."""

import torch


def bias_update(bias, counts, rate):
    load = counts.float()
    return bias + rate * torch.sign(load.mean() - load)
