"""
Three demos for a lecture: each is one command, runs every variant with 3 seeds (train.py runs in
out-demos/<demo>/<variant>-s<seed>, resumable like ablate.py), and writes a figure and a table to
docs/ (docs/demos.md reads them out).

    python course/demos.py collapse         # routing collapse and its cures (collapse preset, 16 experts, top-1)
    python course/demos.py coupling         # coupling loss dose-response: c_cp in {0, 1e-3, 1e-2, 0.1}
    python course/demos.py specialization   # specialization loss vs its random floor, random vs upcycled experts
    python course/demos.py collapse --seeds 0 --dry   # print the commands only

Options: --seeds (default 0 1 2), --out_dir (default out-demos), --docs (default docs).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from support.plots import plt  # noqa: E402
from support.rundir import ArgParser, UserError, cli, read_log  # noqa: E402
from tools.ablate import QUICK, REPO, final_eval, run_dir, run_variants  # noqa: E402

BASE_SYNTHETIC = ["config/synthetic.py", *QUICK, "--num_samples=0", "--c_lb=0.01"]

DEMOS = {
    # the collapse preset: softmax router, top-1, gates = p, no balancing loss, high learning rate
    "collapse": dict(base=["config/collapse.py", "--num_samples=0"], variants={
        "no balancing": [],
        "L_lb (c_lb=0.01)": ["--c_lb=0.01"],
        "ERMoE (no loss)": ["--router=ermoe"],
        "sigmoid + bias (no loss)": ["--router=sigmoid"],
    }),
    # the synthetic task; the coupling loss alone (no R_sp) at growing strength
    "coupling": dict(base=BASE_SYNTHETIC + ["--c_sp=0.0"], variants={
        f"c_cp={c:g}": [f"--c_cp={c}"] for c in (0.0, 1e-3, 1e-2, 0.1)}),
    # the specialization loss alone (no R_cp) at growing strength, from random or upcycled experts
    "specialization": dict(base=BASE_SYNTHETIC + ["--c_cp=0.0"], variants={
        f"{init}, c_sp={c:g}": [f"--c_sp={c}", f"--expert_init={init}"]
        for init in ("random", "upcycle") for c in (0.0, 2e-3, 0.1)}),
}


def spread(values):
    """(mean, half the range): the seed spread shown as an error bar."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def final_layers(out_dir, name, seeds):
    """Per seed: the final evaluation record of the run."""
    return [final_eval(run_dir(out_dir, name, s)) for s in seeds]


def value(record, key):
    """A metric of an evaluation record: the val loss, or the mean over its MoE layers."""
    return record[key] if key == "val_loss" else np.mean([m[key] for m in record["layers"] if key in m])


def table(rows, columns):
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"


def fmt(values, digits=3):
    mean, half = spread(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


# ------------------------------------------------------------------------------------------------

def show_collapse(out_dir, variants, seeds, path):
    """Load history of every layer for seed 0 of each variant, and dead experts / imbalance per variant."""
    names = list(variants)
    L = None
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.1 * len(names) + 0.8), squeeze=False, layout="constrained")
    rows = []
    for i, name in enumerate(names):
        evals = [r for r in read_log(os.path.join(run_dir(out_dir, name, seeds[0]), "log.jsonl")) if r.get("layers")]
        L, E = len(evals[-1]["layers"]), len(evals[-1]["layers"][0]["load"])
        hist = np.concatenate([np.array([r["layers"][layer]["load"] for r in evals]) * E for layer in range(L)], axis=1)
        ax = axes[i, 0]
        im = ax.imshow(hist, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
        ax.set_title(name, loc="left")
        ax.set_ylabel("evaluation")
        ax.set_xticks([layer * E + E / 2 - 0.5 for layer in range(L)],
                      [f"layer {layer}" for layer in range(L)] if i == len(names) - 1 else [])
        for layer in range(1, L):
            ax.axvline(layer * E - 0.5, color="k", lw=1)
        final = final_layers(out_dir, name, seeds)
        dead = [sum(m["dead"] for m in r["layers"]) for r in final]
        cv0 = [r["layers"][0]["cv"] for r in final]
        worst = [max(m["max_mean"] for m in r["layers"]) for r in final]
        rows.append((name, [fmt([r["val_loss"] for r in final]), fmt(dead, 1), f"{max(dead)}",
                            fmt(cv0), fmt(worst, 2)]))
    fig.colorbar(im, ax=axes[:, 0], label="load x E (1 = uniform, 0 = dead)")
    fig.suptitle(f"expert load at every evaluation, the {E} experts of each layer side by side (seed {seeds[0]})")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return table(rows, ["val loss", f"dead experts (of {L}x{E})", "worst seed", "layer-0 load CV",
                        "max/mean load (worst layer)"])


def dose_panels(out_dir, variants, seeds, keys, path, xs, xlabel):
    """One panel per metric: layer mean vs the variant's x, mean and spread over seeds."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.3), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        ys = []
        for name in variants:
            final = final_layers(out_dir, name, seeds)
            vals = [value(r, key) for r in final]
            ys.append(spread(vals))
        ax.errorbar(xs, [m for m, _ in ys], yerr=[h for _, h in ys], fmt="o-", capsize=3)
        ax.set(title=title, xlabel=xlabel)
        if min(xs) > 0 or len(set(xs)) > 3:
            ax.set_xscale("symlog", linthresh=1e-3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


METRICS = [("val_loss", "val loss"), ("entropy_norm", "routing entropy / log E"), ("topk_mass", "top-k mass"),
           ("next_nmi", "NMI(layer l, l+1)"), ("source_nmi", "NMI(expert, source)"),
           ("coact_floor", "co-act cos² × f (1 = random)")]


def metric_table(out_dir, variants, seeds, keys):
    rows = []
    for name in variants:
        final = final_layers(out_dir, name, seeds)
        cells = []
        for key, _ in keys:
            vals = [value(r, key) for r in final]
            cells.append(fmt(vals, 2 if key == "coact_floor" else 3))
        rows.append((name, cells))
    return table(rows, [title for _, title in keys])


def show_coupling(out_dir, variants, seeds, path):
    keys = [k for k in METRICS if k[0] != "coact_floor"]
    dose_panels(out_dir, variants, seeds, keys, path, [float(n.split("=")[1]) for n in variants], "c_cp")
    return metric_table(out_dir, variants, seeds, keys)


def show_specialization(out_dir, variants, seeds, path):
    keys = [METRICS[0], METRICS[-1], METRICS[4], METRICS[1]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        for j, init in enumerate(("random", "upcycle")):
            names = [n for n in variants if n.startswith(init)]
            ys = [spread([value(r, key) for r in final_layers(out_dir, n, seeds)]) for n in names]
            xs = np.arange(len(names)) + 0.38 * (j - 0.5)
            ax.bar(xs, [m for m, _ in ys], width=0.36, yerr=[h for _, h in ys], capsize=3, label=f"{init} experts")
            ax.set_xticks(np.arange(len(names)), [n.split(", ")[1] for n in names])
        if key == "coact_floor":
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set_yscale("log")
        if key == "val_loss":  # the differences are small: no bar from zero
            ax.set_ylim(min(p.get_height() for p in ax.patches) - 0.01, max(p.get_height() for p in ax.patches) + 0.01)
        ax.set(title=title)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return metric_table(out_dir, variants, seeds, keys)


SHOW = {"collapse": show_collapse, "coupling": show_coupling, "specialization": show_specialization}


def main(argv):
    parser = ArgParser(prog="python course/demos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", choices=list(DEMOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out_dir", default="out-demos")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"), help="where the figure and table go")
    parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if min(args.seeds) < 0:
        raise UserError(f"seeds must be >= 0, got {args.seeds}")
    if not os.path.isdir(args.docs):
        raise UserError(f"--docs={args.docs} is not a directory")
    demo = DEMOS[args.demo]
    out_dir = os.path.join(args.out_dir, args.demo)
    if run_variants(demo["variants"], demo["base"], args.seeds, out_dir, args.dry) is None:
        return
    figure = os.path.join(args.docs, f"demo_{args.demo}.png")
    md = SHOW[args.demo](out_dir, demo["variants"], args.seeds, figure)
    md = (f"`python course/demos.py {args.demo}`: train.py {' '.join(demo['base'])}, seeds {args.seeds}; "
          f"mean ± half the spread between seeds, layer means at the final evaluation.\n\n" + md)
    with open(os.path.join(args.docs, f"demo_{args.demo}.md"), "w") as fh:
        fh.write(md)
    print(md)
    print(f"wrote {figure} and {os.path.join(args.docs, f'demo_{args.demo}.md')}")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
