"""
The plots of a run's log (out_dir/log.jsonl), drawn by train.py at the end of a run and by
tools/analyze.py (which adds the plots that probe a checkpoint):

- loss.png             train/val loss and the auxiliary terms over training
- expert_load.png      layer x expert load at the last evaluation, and load CV over training
- load_history.png     per layer: expert load at every evaluation (collapse and recovery show up)
- routing_curves.png   per layer over training: every routing metric in the log (entropy, top-k
                       mass, co-activation cos^2, NMI between consecutive layers, NMI(expert,
                       source) on the synthetic task, and each router's own: ERMoE's beta, the
                       sigmoid router's bias range, ...)
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from support.rundir import read_log  # noqa: E402


def save(fig, path):
    """The figure as a PNG; a file that cannot be written (a full disk) is a warning line, not an error:
    a plot is redrawn from the log at any time (tools/analyze.py). -> the path, or None."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as err:
        if os.path.exists(path):
            os.remove(path)  # not half a picture
        sys.stderr.write(f"warning: cannot write {path} ({err.strerror or err}); that plot is skipped\n")
        path = None
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# plots from the log

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
    for k in aux:
        axes[0, 1].plot(*zip(*[(r["iter"], r[k]) for r in records if k in r]), label=k)
    if aux:
        axes[0, 1].set(xlabel="iter", title="auxiliary terms (unscaled, summed over layers)")
        axes[0, 1].legend()
    return save(fig, path)


def evals_of(records):
    return [r for r in records if r.get("layers")]


def plot_load(evals, path):
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
    return save(fig, path)


def plot_load_history(evals, path):
    L, E = len(evals[0]["layers"]), len(evals[0]["layers"][0]["load"])
    fig, axes = plt.subplots(1, L, figsize=(2.2 + 1.2 * L + 0.15 * E * L, 4), squeeze=False)
    iters = [r["iter"] for r in evals]
    for layer, ax in enumerate(axes[0]):
        hist = np.array([r["layers"][layer]["load"] for r in evals]) * E  # (evals, E)
        im = ax.imshow(hist, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
        ax.set(title=f"layer {layer}", xlabel="expert", xticks=range(E))
        ax.set_yticks(range(len(iters)), iters if layer == 0 else [])
    axes[0, 0].set_ylabel("iter")
    fig.colorbar(im, ax=axes[0, -1], label="load x E (1 = uniform)")
    return save(fig, path)


TITLES = {"entropy_norm": "routing entropy / log E", "topk_mass": "top-k mass", "coact_cos2": "co-activation cos^2",
          "coact_floor": "co-activation cos^2 x f (1 = random)", "next_nmi": "NMI(layer l, l+1)",
          "source_nmi": "NMI(expert, source)", "dropped": "dropped pairs (capacity)"}
NOT_CURVES = {"load", "cv", "max_mean", "dead", "entropy", "next_cond_entropy"}  # in expert_load.png or redundant


def plot_routing_curves(evals, path):
    """One panel per numeric metric of the layers (a router's own metrics included)."""
    keys = []
    for m in evals[-1]["layers"]:
        keys += [k for k, v in m.items() if k not in NOT_CURVES and k not in keys and isinstance(v, (int, float))]
    keys = [k for k in keys if k != "dropped" or any(m.get(k) for r in evals for m in r["layers"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    iters = [r["iter"] for r in evals]
    for key, ax in zip(keys, axes[0]):
        for layer in range(len(evals[-1]["layers"])):
            if key in evals[-1]["layers"][layer]:
                ax.plot(iters, [r["layers"][layer].get(key, np.nan) for r in evals], "o-", ms=3, label=f"layer {layer}")
        ax.set(title=TITLES.get(key, key), xlabel="iter")
    axes[0, 0].legend(fontsize=7)
    return save(fig, path)


def plot_run(out_dir):
    """The plots that need only the log; returns the paths written."""
    records = read_log(os.path.join(out_dir, "log.jsonl"))
    written = [plot_losses(records, os.path.join(out_dir, "loss.png"))]
    evals = evals_of(records)
    if evals:
        written += [plot_load(evals, os.path.join(out_dir, "expert_load.png")),
                    plot_load_history(evals, os.path.join(out_dir, "load_history.png")),
                    plot_routing_curves(evals, os.path.join(out_dir, "routing_curves.png"))]
    return [path for path in written if path]
