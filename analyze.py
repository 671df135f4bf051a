"""
Make routing visible: PNG plots from a run's out_dir/log.jsonl (written by train.py).

    python analyze.py out          # re-draw the plots of the run in out/

- loss.png         train and val loss over training (+ the auxiliary terms, unscaled)
- expert_load.png  layer x expert load at the last evaluation (uniform = 1/E everywhere), and
                   the load CV of each layer over training (collapse and recovery show up here)
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no log at {path}: run train.py with out_dir={out_dir} first")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_losses(records, path):
    train = [(r["iter"], r["train_loss"]) for r in records if "train_loss" in r and "val_loss" not in r]
    val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    aux = sorted({k for r in records for k in ("lb", "z", "sp", "cp", "ortho") if k in r})
    fig, axes = plt.subplots(1, 2 if aux else 1, figsize=(11 if aux else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train (per step)", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set(xlabel="iter", ylabel="cross-entropy", title="loss")
    ax.legend()
    if aux:
        ax = axes[0, 1]
        for k in aux:
            pts = [(r["iter"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), label=k)
        ax.set(xlabel="iter", title="auxiliary terms (unscaled, summed over layers)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(records, path):
    evals = [r for r in records if r.get("layers")]
    if not evals:
        return False
    load = np.array([m["load"] for m in evals[-1]["layers"]])  # (L, E)
    L, E = load.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * L + 3))
    im = axes[0].imshow(load * E, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
    axes[0].set(xlabel="expert", ylabel="MoE layer", xticks=range(E), yticks=range(L),
                title=f"expert load x E at iter {evals[-1]['iter']} (1 = uniform)")
    fig.colorbar(im, ax=axes[0])
    iters = [r["iter"] for r in evals]
    for layer in range(L):
        axes[1].plot(iters, [r["layers"][layer]["cv"] for r in evals], "o-", label=f"layer {layer}")
    axes[1].set(xlabel="iter", ylabel="load CV (0 = uniform)", title="load imbalance over training")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_run(out_dir):
    """Draw every plot the log supports; returns the paths written."""
    records = read_log(out_dir)
    written = [os.path.join(out_dir, "loss.png")]
    plot_losses(records, written[0])
    if plot_load(records, os.path.join(out_dir, "expert_load.png")):
        written.append(os.path.join(out_dir, "expert_load.png"))
    return written


if __name__ == "__main__":
    for p in plot_run(sys.argv[1] if len(sys.argv) > 1 else "out"):
        print(f"wrote {p}")
