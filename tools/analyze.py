"""
Make routing visible: PNG plots of a run, from its out_dir/log.jsonl and out_dir/ckpt.pt.

    python tools/analyze.py out          # every plot below + out/index.html that shows them all
    python tools/analyze.py OUT_DIR --text="The quick brown fox"   # a model routing any text
                                         # (prints each token's experts and gates per layer too)

From the log: loss.png, expert_load.png, load_history.png, routing_curves.png (support/plots.py,
which train.py also draws at the end of a run). From the checkpoint (best.pt if the run has one),
on a probe batch of validation data:
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from families import from_checkpoint  # noqa: E402
from support.data import load_tokenizer, open_dataset  # noqa: E402
from support.metrics import RoutingStats  # noqa: E402
from support.plots import plt, plot_run, save  # noqa: E402
from support.rundir import ArgParser, UserError, check_writable_dir, cli, load_checkpoint  # noqa: E402


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
    expert_inputs = moe.router(x, ids).expert_inputs  # what the experts read, where the router makes it (ERMoE)
    z = torch.stack([moe.expert(e, (x if expert_inputs is None else expert_inputs[:, e]).float())[0]
                     for e in range(moe.w_up.shape[0])])  # (E, T, f) SwiGLU activations (a family's own: MoE.expert)
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


def probe_batch(ckpt, n_tokens=48, text=None, out_dir=None):
    """A probe batch: ids (B, S), the first n_tokens as strings, their labels (a synthetic task's).
    With `text`: that text, tokenised by the checkpoint's own tokenizer."""
    cfg = ckpt["config"]
    gen = torch.Generator().manual_seed(0)
    B, S = 8, cfg["block_size"]
    enc = load_tokenizer(ckpt.get("tokenizer") or out_dir)  # a run's tokenizer, or an imported model's
    if text is not None:
        ids = enc.encode_ordinary(text)[:S]
        if not ids:
            raise UserError("--text gives no tokens")
        if max(ids) >= cfg["vocab_size"]:
            raise UserError(f"the text has token id {max(ids)}, outside the model's vocabulary of {cfg['vocab_size']}")
        return torch.tensor([ids]), [enc.decode([t]) for t in ids[:n_tokens]], None
    data = open_dataset(cfg["dataset"], cfg["vocab_size"], verbose=False)
    x, _, labels = data.batch("val", B, S, gen, "cpu")
    if data.tokenizer is None:  # a synthetic task: its token ids, and each token's label
        return x, [f"{int(t)}" for t in x[0, :n_tokens]], labels[0, :n_tokens].numpy()
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
    best = os.path.exists(os.path.join(out_dir, "best.pt"))
    ckpt = load_checkpoint(out_dir, name="best.pt" if best else "ckpt.pt")
    model = from_checkpoint(ckpt["model_args"])[1]
    model.load_state_dict(ckpt["model"])
    model.eval()
    if model.config.n_experts == 0:
        return []
    if text is None and "source" in ckpt:
        raise UserError(f"{out_dir} holds an imported model: give the text to route with --text=... or --text_file=...")
    x, pieces, source = probe_batch(ckpt, text=text, out_dir=out_dir)
    moes, inputs, routes = probe(model, x)
    if text is not None:
        print(trace(pieces, routes))
    L = len(moes)
    cos2 = [expert_cos2(m, h, x.reshape(-1)).fill_diagonal_(float("nan"))  # diagonal is 1
            for m, h in zip(moes, inputs)]
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
    return [path for path in written if path]  # (None: a file that could not be written, warned about)


CAPTIONS = {  # what each figure shows, for index.html
    "loss": "Train and val loss over training; right: every auxiliary loss term, unscaled, summed over layers.",
    "expert_load": "Load of every expert in every MoE layer at the last evaluation (x E: 1 = its fair share), and "
                   "how uneven the load was over training (CV: 0 = uniform, sqrt(E-1) = one expert takes all).",
    "load_history": "Each layer's expert load at every evaluation, top to bottom: collapse and recovery show up here.",
    "routing_curves": "Every routing metric of the log over training, one line per layer (entropy, top-k mass, "
                      "co-activation, agreement of consecutive layers, and the router's own numbers).",
    "expert_cosine": "Mean cos^2 between two experts' SwiGLU intermediates when both run on the same tokens: how "
                     "alike the experts compute (what the specialization loss pushes apart).",
    "transitions": "P(top-1 expert at layer l+1 | top-1 expert at layer l): a sharp matrix means consecutive layers "
                   "agree on experts (what the coupling loss rewards).",
    "tokens": "A passage, each token coloured and numbered by its top-1 expert in every MoE layer (a synthetic "
              "task's last row: the token's true source).",
    "router": "Top: the router's probability of the experts it selected vs the others. Bottom: its own similarity "
              "of the experts (ERMoE: subspace overlap; linear routers: cosine of the router rows).",
}


def write_index(out_dir, paths):
    def item(p):
        name = os.path.basename(p)
        caption = CAPTIONS.get(name[:-4], "")
        return f'<h3>{name}</h3><p>{caption}</p><img src="{name}" style="max-width:100%">'
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as fh:
        fh.write(f"<html><body><h2>routing plots: {out_dir}</h2>\n" + "\n".join(map(item, paths)) +
                 "\n</body></html>\n")
    return path


def main(argv):
    parser = ArgParser(prog="python tools/analyze.py",
                       description="routing plots of a run (or of an imported model on any text)")
    parser.add_argument("out_dir", nargs="?", default="out",
                        help="a train.py run directory, or tools/convert.py's OUT_DIR")
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
    sys.exit(cli(main, sys.argv[1:]))
