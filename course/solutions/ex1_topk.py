"""Exercise 1, a reference solution (the instructor's key; delete this folder before handing out)."""

import torch


def topk(logits, k):
    rows = [sorted(range(logits.shape[1]), key=lambda e: (-row[e], e))[:k] for row in logits.tolist()]
    return torch.tensor(rows, dtype=torch.int64)


def gates(logits, idx, renormalize=True):
    chosen = logits.gather(1, idx)
    if renormalize:
        w = (chosen - chosen.max(dim=1, keepdim=True).values).exp()
        return w / w.sum(dim=1, keepdim=True)
    return chosen.exp() / logits.exp().sum(dim=1, keepdim=True)
