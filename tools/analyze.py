"""
Make routing visible: PNG plots of a run, from its out_dir/log.jsonl and out_dir/ckpt.pt.

    python analyze.py out          # every plot below + out/index.html that shows them all
    python analyze.py OUT_DIR --text="The quick brown fox"   # an imported model routing any text
                                   # (prints each token's experts and gates per layer too)

From the log (train.py also draws these at the end of a run):
- loss.png             train/val loss and the auxiliary terms over training
- expert_load.png      layer x expert load at the last evaluation, and load CV over training
- load_history.png     per layer: expert load at every evaluation (collapse and recovery show up)
- routing_curves.png   per layer over training: every routing metric in the log (entropy, top-k
                       mass, co-activation cos^2, NMI between consecutive layers, NMI(expert,
                       source) on the synthetic task, and each router's own: ERMoE's beta, the
                       sigmoid router's bias range, ...)
From the checkpoint, on a probe batch of validation data:
- expert_cosine.png    expert x expert mean cos^2 of the SwiGLU intermediates, every expert run
                       on the same tokens (what the specialization loss pushes apart)
- transitions.png      top-1 transition matrices P(expert at layer l+1 | expert at layer l)
- tokens.png           a passage with each token coloured by its top-1 expert, per layer
- router.png           per layer: the router's probability p of selected vs other experts, and its
                       (E, E) expert similarity (ERMoE: subspace overlaps; linear routers: cosine
                       of the router rows)
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from rundir import ArgParser, UserError, check_writable_dir, read_log


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    return written


# ------------------------------------------------------------------------------------------------
# plots from the checkpoint: run the model on a probe batch

@torch.no_grad()
def probe(model, idx):
    """Run the model on idx (B, S); returns each MoE layer's input (T, d) and its Routing."""
    moes = [b.mlp for b in model.blocks if hasattr(b.mlp, "router")]
    inputs = [None] * len(moes)
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0].flatten(0, 1)))
             for i, m in enumerate(moes)]
    _, _, routes = model(idx)
    for h in hooks:
        h.remove()
    return moes, inputs, routes


@torch.no_grad()
def expert_cos2(moe, x, ids):
    """(E, E) mean over tokens of cos^2 between experts' intermediates when all run on the same x."""
    T = x.shape[0]
    coords = moe.router(x, ids).inputs  # the experts' inputs where the router makes them (ERMoE)
    tok = torch.arange(T)
    z = torch.stack([F.silu(h @ moe.w_gate[e]) * (h @ moe.w_up[e])
                     for e in range(moe.w_up.shape[0])
                     for h in [moe.expert_inputs(x, coords, tok, e).float()]])  # (E, T, f)
    zn = F.normalize(z, dim=-1)
    return torch.einsum("itf,jtf->ijt", zn, zn).pow(2).mean(-1)                 # (E, E)


def plot_matrices(mats, titles, path, label, vmax=None):
    n = len(mats)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1, 3.4), squeeze=False)
    for ax, m, t in zip(axes[0], mats, titles):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=t, xticks=range(m.shape[1]), yticks=range(m.shape[0]))
    fig.colorbar(im, ax=list(axes[0]), label=label)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tokens(pieces, top1, path, source=None):
    """pieces: N token strings; top1 (L, N) expert ids -> one coloured row per layer.
    With source (N,) labels (synthetic task), a last row shows each token's source."""
    rows = [f"layer {i}" for i in range(top1.shape[0])]
    if source is not None:
        top1, rows = np.concatenate([top1, source[None]]), rows + ["source"]
    L, N = top1.shape
    E = int(top1.max()) + 1
    fig, ax = plt.subplots(figsize=(0.32 * N + 1.5, 0.45 * L + 1.6))
    ax.imshow(top1, cmap=plt.get_cmap("tab10" if E <= 10 else "tab20"), vmin=0, vmax=9 if E <= 10 else 19,
              aspect="auto")
    ax.set_xticks(range(N), [repr(p)[1:-1] for p in pieces], rotation=90, fontsize=8, family="monospace")
    ax.set_yticks(range(L), rows)
    for layer in range(L):
        for j in range(N):
            ax.text(j, layer, str(int(top1[layer, j])), ha="center", va="center", fontsize=6, color="white")
    ax.set_title("top-1 expert of each token (colour and number), per MoE layer"
                 + (" (last row: the token's source)" if source is not None else ""))
    return save(fig, path)


def plot_router(moes, routes, path):
    """Per layer: p of the selected vs the other experts, and the router's expert similarity."""
    L = len(moes)
    sims = [m.router.similarity() for m in moes]
    rows = 2 if any(s is not None for s in sims) else 1
    fig, axes = plt.subplots(rows, L, figsize=(3.4 * L, 3.2 * rows), squeeze=False)
    for layer, (r, sim) in enumerate(zip(routes, sims)):
        p = r.probs.detach().cpu()                                               # (T, E)
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(1, r.idx.cpu(), True)
        ax = axes[0, layer]
        ax.hist([p[~chosen].numpy(), p[chosen].numpy()], bins=30, range=(0, 1), stacked=True,
                label=["not selected", "selected"])
        ax.set(title=f"layer {layer}: router p", xlabel="p", yscale="log")
        ax.legend(fontsize=7)
        if rows == 2 and sim is not None:
            im = axes[1, layer].imshow(sim.cpu(), cmap="viridis", vmin=0, vmax=1)
            axes[1, layer].set(title=f"layer {layer}: expert similarity")
    if rows == 2:
        fig.colorbar(im, ax=list(axes[1]), label="router's similarity of experts")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def probe_batch(cfg, n_tokens=48, text=None, out_dir=None):
    """A probe batch: ids (B, S), the first n_tokens as strings, their sources (synthetic task).
    With `text`: that text, tokenised by the checkpoint's own tokenizer (or GPT-2's)."""
    from data import SyntheticMixture, get_batch, load_split, load_tokenizer, prepare
    gen = torch.Generator().manual_seed(0)
    B, S = 8, cfg["block_size"]
    if text is not None:
        enc = load_tokenizer(out_dir)
        ids = enc.encode_ordinary(text)[:S]
        if not ids:
            raise UserError("--text gives no tokens")
        if max(ids) >= cfg["vocab_size"]:
            raise UserError(f"the text has token id {max(ids)}, outside the model's vocabulary of {cfg['vocab_size']}")
        return torch.tensor([ids]), [enc.decode([t]) for t in ids[:n_tokens]], None
    if cfg["dataset"] == "synthetic":
        x, _, labels = SyntheticMixture(vocab=min(256, cfg["vocab_size"])).batch(B, S, gen, "cpu")
        return x, [f"{int(t)}" for t in x[0, :n_tokens]], labels[0, :n_tokens].numpy()
    val = load_split(prepare(cfg["dataset"]), "val")
    enc = load_tokenizer(out_dir)
    x, _ = get_batch(val, B, S, gen, "cpu")
    return x, [enc.decode([int(t)]) for t in x[0, :n_tokens]], None


def trace(pieces, routes, n=24):
    """The walkthrough's table for real text: each token's experts and gates, layer by layer."""
    lines = ["token              " + " ".join(f"layer {i:<9}" for i in range(len(routes)))]
    for t, piece in enumerate(pieces[:n]):
        cells = []
        for r in routes:
            cells.append(",".join(f"{int(e)}:{float(g):.2f}" for e, g in zip(r.idx[t], r.gates[t]))[:15].ljust(15))
        lines.append(f"{repr(piece)[1:-1][:18]:<18} " + " ".join(cells))
    return "\n".join(lines)


def plot_checkpoint(out_dir, text=None):
    from model import GPT, GPTConfig
    from rundir import load_checkpoint
    ckpt = load_checkpoint(out_dir)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    if model.config.n_experts == 0:
        return []
    if text is None and "source" in ckpt:
        raise UserError(f"{out_dir} holds an imported model: give the text to route with --text=... or --text_file=...")
    from metrics import RoutingStats
    x, pieces, source = probe_batch(ckpt["config"], text=text, out_dir=out_dir)
    moes, inputs, routes = probe(model, x)
    if text is not None:
        print(trace(pieces, routes))
    L = len(moes)
    cos2 = [expert_cos2(m, h, x.reshape(-1)).fill_diagonal_(float("nan")) for m, h in zip(moes, inputs)]  # diagonal is 1
    written = [plot_matrices(cos2, [f"layer {i}" for i in range(L)], os.path.join(out_dir, "expert_cosine.png"),
                             "mean cos^2 between experts (diagonal hidden)")]
    stats = RoutingStats()
    stats.update(routes)
    if L > 1:
        written.append(plot_matrices(stats.transitions(), [f"layer {i} -> {i + 1}" for i in range(L - 1)],
                                     os.path.join(out_dir, "transitions.png"), "P(next expert | expert)", vmax=1))
    top1 = torch.stack([r.idx[:, 0].view(x.shape)[0, :len(pieces)] for r in routes]).numpy()  # (L, N)
    written.append(plot_tokens(pieces, top1, os.path.join(out_dir, "tokens.png"), source))
    written.append(plot_router(moes, routes, os.path.join(out_dir, "router.png")))
    return written


def write_index(out_dir, paths):
    items = "\n".join(f'<h3>{os.path.basename(p)}</h3><img src="{os.path.basename(p)}" style="max-width:100%">'
                      for p in paths)
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as fh:
        fh.write(f"<html><body><h2>routing plots: {out_dir}</h2>\n{items}\n</body></html>\n")
    return path


def main(argv):
    parser = ArgParser(prog="python analyze.py", description="routing plots of a run (or of an imported model on any text)")
    parser.add_argument("out_dir", nargs="?", default="out", help="a train.py run directory, or convert.py's OUT_DIR")
    parser.add_argument("--text", default=None, help="route this text instead of a batch of the run's data")
    parser.add_argument("--text_file", default=None, help="route the text of this file")
    args = parser.parse_args(argv)
    out_dir, text = args.out_dir, args.text
    if args.text_file is not None:
        if not os.path.isfile(args.text_file):
            raise UserError(f"--text_file={args.text_file} does not exist")
        text = open(args.text_file, encoding="utf-8", errors="replace").read()
    if not os.path.isdir(out_dir):
        raise UserError(f"no run directory {out_dir} (run train.py with --out_dir={out_dir} first)")
    check_writable_dir(out_dir, "run directory")  # the plots go next to the log
    paths = []
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        try:
            paths = plot_run(out_dir)
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise UserError(f"{out_dir}/log.jsonl has records without the fields train.py writes "
                            f"({type(err).__name__}: {err})") from None
    else:
        print(f"note: no log.jsonl in {out_dir}: only the plots that probe the model")
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        paths += plot_checkpoint(out_dir, text)
    else:
        print(f"note: no checkpoint in {out_dir}: the plots that probe the model are skipped")
    if not paths:
        raise UserError(f"{out_dir} has neither a log.jsonl nor a ckpt.pt")
    for p in paths + [write_index(out_dir, paths)]:
        print(f"wrote {p}")


if __name__ == "__main__":
    from rundir import cli
    sys.exit(cli(main, sys.argv[1:]))
