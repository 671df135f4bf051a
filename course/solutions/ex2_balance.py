"""Exercise 2, a reference solution."""

import torch


def load_balancing(probs, idx):
    T, E = probs.shape
    k = idx.shape[1]
    counts = torch.stack([(idx == e).sum() for e in range(E)]).float()
    return E * ((counts / (T * k)) * probs.mean(dim=0)).sum()


def z_loss(logits):
    m = logits.max(dim=1, keepdim=True).values
    lse = m.squeeze(1) + (logits - m).exp().sum(dim=1).log()
    return (lse ** 2).mean()
