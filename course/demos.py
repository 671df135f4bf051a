"""
The experiments that show why MoE routing matters, one command each: every variant with 3 seeds
(train.py runs, two at a time on a CPU), then a table and a figure in docs/ (docs/results.md and
docs/teaching.md read them out). Every number is from the whole val split (or a task's whole table,
or its fixed sample of 1,024 sequences), mean ± half the spread between seeds.

    python course/demos.py default          # dense vs MoE on the default run, beside nanoGPT's published figure
    python course/demos.py capacity         # bits of a fact table stored: dense vs E = 4, 8, 16 at the same compute
    python course/demos.py routing          # a learned router vs a hash table, on a task built to separate them and on one that does not
    python course/demos.py regularisers     # R_sp and R_cp on the default run, paired by seed: none, Hu et al., 10x
    python course/demos.py regularisers-facts   # the same on the capacity task
    python course/demos.py collapse         # routing collapse and three cures
    python course/demos.py coupling         # the coupling loss, dose-response
    python course/demos.py specialization   # the specialization loss against its random floor
    python course/demos.py routing --seeds 0 --dry   # print the commands only

A run is kept in out-demos/runs/<key>-s<seed>, the key a hash of its resolved settings: an interrupted
demo picks up where it stopped, and two demos that need the same run share it. Paired comparisons
("- none" columns) take the difference seed by seed: same seed and batches (and the same initialisation
where both arms have the same architecture).
"""

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from support.plots import plt  # noqa: E402
from support.rundir import ArgParser, UserError, cli, read_log  # noqa: E402
from tools.ablate import QUICK, REPO, final, final_eval, run_variants  # noqa: E402

SYNTHETIC = ["config/synthetic.py", *QUICK, "--c_sp=0.0", "--c_cp=0.0"]  # the quick ablation of tools/ablate.py
TEXT = ["--num_samples=0"]                                                # the default run, without samples

DEMOS = {
    "default": dict(variants={
        "dense (n_experts=0)": [*TEXT, "--n_experts=0"],
        "MoE, 8 experts top-2 (the default)": TEXT}),
    "capacity": dict(variants={
        "dense": ["config/facts.py", "--n_experts=0"],
        "E=4": ["config/facts.py", "--n_experts=4"],
        "E=8": ["config/facts.py"],
        "E=16": ["config/facts.py", "--n_experts=16"]}),
    "routing": dict(variants={
        "facts_binary: dense": ["config/facts_binary.py", "--n_experts=0"],
        "facts_binary: hash": ["config/facts_binary.py", "--router=hash"],
        "facts_binary: learned (softmax)": ["config/facts_binary.py"],
        "synthetic: dense": [*SYNTHETIC, "--n_experts=0"],
        "synthetic: hash": [*SYNTHETIC, "--router=hash"],
        "synthetic: learned (softmax)": SYNTHETIC}),
    "regularisers": dict(variants={
        "none (c_sp = c_cp = 0)": [*TEXT, "--c_sp=0.0", "--c_cp=0.0"],
        "Hu et al. (c_sp = 2e-3, c_cp = 1e-3)": TEXT,
        "10x (c_sp = 2e-2, c_cp = 1e-2)": [*TEXT, "--c_sp=0.02", "--c_cp=0.01"]}),
    "regularisers-facts": dict(variants={
        "none (c_sp = c_cp = 0)": ["config/facts.py"],
        "Hu et al. (c_sp = 2e-3, c_cp = 1e-3)": ["config/facts.py", "--c_sp=0.002", "--c_cp=0.001"],
        "10x (c_sp = 2e-2, c_cp = 1e-2)": ["config/facts.py", "--c_sp=0.02", "--c_cp=0.01"]}),
    # the collapse preset: softmax router, top-1, gates = p, no balancing loss, high learning rate
    "collapse": dict(variants={
        "no balancing": ["config/collapse.py", "--num_samples=0"],
        "L_lb (c_lb=0.01)": ["config/collapse.py", "--num_samples=0", "--c_lb=0.01"],
        "ERMoE (no loss)": ["config/collapse.py", "--num_samples=0", "--router=ermoe"],
        "sigmoid + bias (no loss)": ["config/collapse.py", "--num_samples=0", "--router=sigmoid"]}),
    # the synthetic task; the coupling loss alone (no R_sp) at growing strength
    "coupling": dict(variants={
        f"c_cp={c:g}": ["config/synthetic.py", *QUICK, "--c_lb=0.01", "--c_sp=0.0", f"--c_cp={c}"]
        for c in (0.0, 1e-3, 1e-2, 0.1)}),
    # the specialization loss alone (no R_cp) at growing strength, from random or upcycled experts
    "specialization": dict(variants={
        f"{init}, c_sp={c:g}": ["config/synthetic.py", *QUICK, "--c_lb=0.01", "--c_cp=0.0", f"--c_sp={c}",
                                f"--expert_init={init}"]
        for init in ("random", "upcycle") for c in (0.0, 2e-3, 0.1)}),
}


def settings_key(args):
    """A hash of the settings train.py resolves from these arguments (seed and out_dir aside): the same
    run under any demo's name."""
    import train
    settings, _ = train.setup([a if a.startswith("--") else os.path.join(REPO, a) for a in args])  # config files
    values = {k: v for k, v in settings.values.items() if k not in ("out_dir", "overwrite", "seed")}
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def run_dir(out_dir, args, seed):
    return os.path.join(out_dir, "runs", f"{settings_key(args)}-s{seed}")


# ------------------------------------------------------------------------------------------------
# numbers from finished runs

def spread(values):
    """(mean, half the range): the seed spread shown as an error bar."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def fmt(values, digits=3):
    mean, half = spread(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def value(record, key):
    """A number of a run's final evaluation: the loss, the bits, or a layer mean of a routing metric."""
    numbers = final(record)
    if key in ("val_loss", "bits"):
        return numbers[key]
    if key == "query_experts":  # the facts tasks: experts used by the answering positions (label 1)
        return np.mean([m["experts_per_label"][1] for m in numbers["layers"]])
    return np.mean([m[key] for m in numbers["layers"] if key in m])


def table(rows, columns):
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"


def paired(runs, name, base, key="val_loss", digits=3):
    """The difference to `base` seed by seed (same seed, same batches): mean ± half spread."""
    if name == base:
        return "–"
    return fmt([value(a, key) - value(b, key) for a, b in zip(runs[name], runs[base])], digits)


def metric_table(runs, keys, base=None):
    rows = []
    for name, records in runs.items():
        cells = [fmt([value(r, key) for r in records], 2 if key == "coact_floor" else 3) for key, _ in keys]
        rows.append((name, cells + ([paired(runs, name, base)] if base else [])))
    return table(rows, [title for _, title in keys] + ([f"val loss - {base.split(' (')[0]} (paired)"] if base else []))


METRICS = [("val_loss", "val loss"), ("entropy_norm", "routing entropy / log E"), ("topk_mass", "top-k mass"),
           ("next_nmi", "NMI(layer l, l+1)"), ("source_nmi", "NMI(expert, source)"),
           ("coact_floor", "co-act cos² × f (1 = random)")]


def bar_panel(ax, runs, key, title, names=None):
    names = names or list(runs)
    ys = [spread([value(r, key) for r in runs[n]]) for n in names]
    ax.bar(range(len(names)), [m for m, _ in ys], yerr=[h for _, h in ys], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), [n.split(" (")[0].split(": ")[-1] for n in names], rotation=20, fontsize=8)
    lo, hi = min(m - h for m, h in ys), max(m + h for m, h in ys)
    if key == "val_loss":  # the differences are small: no bar from zero
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set(title=title)


# ------------------------------------------------------------------------------------------------
# one table and one figure per demo; runs: {variant: [final evaluation record per seed]}

def show_default(runs, dirs, path):
    names = list(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        curves = [[(r["iter"], r["val_loss"]) for r in read_log(os.path.join(d, "log.jsonl")) if "val_loss" in r]
                  for d in dirs[name]]
        its = [it for it, _ in curves[0]]
        ax.plot(its, np.mean([[v for _, v in c] for c in curves], axis=0), "o-", ms=3, label=name)
    ax.axhline(1.88, color="k", ls="--", lw=1, label="nanoGPT's published figure (CPU recipe), ~1.88")
    ax.set(xlabel="iter", ylabel="val loss (fixed batches, mean of seeds)", ylim=(1.4, 2.6),
           title="character-level Shakespeare, nanoGPT's CPU recipe")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    rows = []
    for name, records in runs.items():
        p = records[0]["params"]
        per_seed = ", ".join(f"{value(r, 'val_loss'):.4f}" for r in records)
        rows.append((name, [f"{p['total'] / 1e6:.2f}M / {p['active'] / 1e6:.2f}M", fmt([value(r, "val_loss") for r in records], 4),
                            per_seed, f"{np.mean([final(r)['se'] for r in records]):.4f}", paired(runs, name, names[0], digits=4)]))
    return table(rows, ["parameters total / active", "val loss (whole split)", "per seed", "standard error of one run",
                        "- dense (paired)"])


def show_capacity(runs, dirs, path):
    names = list(runs)
    bits = {n: [value(r, "bits") for r in runs[n]] for n in names}
    params = {n: runs[n][0]["params"] for n in names}
    from support.tasks import TASKS
    total_bits = TASKS["facts"]().bits
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(len(names))
    ys = [spread(bits[n]) for n in names]
    axes[0].bar(xs, [m for m, _ in ys], yerr=[h for _, h in ys], capsize=3)
    axes[0].plot(xs, [2 * params[n]["active"] for n in names], "k_", ms=30, mew=2, label="2 bits x active parameters")
    axes[0].axhline(total_bits, color="tab:red", ls="--", label=f"the whole table: {total_bits:,.0f} bits")
    axes[0].set_xticks(xs, names)
    axes[0].set(title="bits of the table stored (mean ± half spread, 3 seeds)", ylabel="bits")
    axes[0].legend(fontsize=8)
    for key, label in (("active", "per active parameter"), ("total", "per parameter (all experts)")):
        axes[1].plot(xs, [np.mean(bits[n]) / params[n][key] for n in names], "o-", label=label)
    axes[1].axhline(2.0, color="k", ls="--", lw=1, label="2 bits per parameter (Allen-Zhu & Li, dense)")
    axes[1].set_xticks(xs, names)
    axes[1].set(title="bits stored per parameter", ylabel="bits / parameter")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    dense = bits[names[0]]
    rows = []
    for n in names:
        p, m = params[n], np.mean(bits[n])
        gains = [b - d for b, d in zip(bits[n], dense)]               # paired: the same seed
        mean, half = spread(gains)
        rows.append((n, [f"{p['total'] / 1e3:,.1f}k / {p['active'] / 1e3:,.1f}k", fmt(bits[n], 0),
                         ", ".join(f"{b / 1e3:.1f}k" for b in bits[n]),
                         "–" if n == names[0] else f"{mean:,.0f} ± {half:,.0f} ({mean / max(half, 1e-9):.1f} spreads)",
                         f"{m / p['total']:.2f}", f"{m / p['active']:.2f}"]))
    return table(rows, ["parameters total / active", "bits stored", "per seed", "gain over dense (paired by seed)",
                        "bits / parameter", "bits / active parameter"])


def show_routing(runs, dirs, path):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, task in zip(axes[:2], ("facts_binary", "synthetic")):
        bar_panel(ax, runs, "val_loss", f"{task}: val loss", [n for n in runs if n.startswith(task)])
    facts = [n for n in runs if n.startswith("facts_binary") and "dense" not in n]
    for n in facts:
        layers = [[m["experts_per_label"][1] for m in final(r)["layers"]] for r in runs[n]]
        axes[2].plot(range(len(layers[0])), np.mean(layers, axis=0), "o-", label=n.split(": ")[1])
    axes[2].set(title="facts_binary: experts the answering position uses", xlabel="MoE layer",
                ylabel="exp(entropy of its top-1 expert)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    rows = []
    for n, records in runs.items():
        task = n.split(":")[0]
        learned = f"{task}: learned (softmax)"
        facts = task == "facts_binary"
        rows.append((n, [fmt([value(r, "val_loss") for r in records]),
                         paired(runs, n, learned) if n != learned else "–",
                         fmt([value(r, "bits") for r in records], 0) if facts else "–",
                         fmt([value(r, "query_experts") for r in records], 2) if facts and "dense" not in n else "–",
                         fmt([value(r, "source_nmi") for r in records]) if not facts and "dense" not in n else "–"]))
    return table(rows, ["val loss", "- learned (paired)", "bits stored", "experts used by the answers (of 16)",
                        "NMI(expert, source)"])


def show_regularisers(runs, dirs, path):
    names = list(runs)
    keys = [("val_loss", "val loss"), ("coact_floor", "co-act cos² × f"), ("entropy_norm", "routing entropy / log E"),
            ("next_nmi", "NMI(layer l, l+1)")]
    if "bits" in final(runs[names[0]][0]):
        keys.insert(1, ("bits", "bits stored"))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.6), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        base = [value(r, key) for r in runs[names[0]]]
        for s in range(len(base)):  # one line per seed: the pairing
            ax.plot(range(len(names)), [value(runs[n][s], key) - base[s] for n in names], "o-", alpha=0.7,
                    label=f"seed {s}")
        ax.axhline(0, color="k", lw=1)
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names])
        ax.set(title=f"{title} - none (paired)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    rows = []
    for n in names:
        cells = [fmt([value(r, k) for r in runs[n]], 0 if k == "bits" else (2 if k == "coact_floor" else 4 if k == "val_loss" else 3))
                 for k, _ in keys]
        cells.append(paired(runs, n, names[0], digits=4))
        if "bits" in final(runs[n][0]):
            cells.append(paired(runs, n, names[0], "bits", 0))
        rows.append((n, cells))
    extra = ["bits - none (paired)"] if "bits" in final(runs[names[0]][0]) else []
    return table(rows, [t for _, t in keys] + ["val loss - none (paired)"] + extra)


def show_collapse(runs, dirs, path):
    """Load history of every layer for the first seed of each variant, and dead experts / imbalance."""
    names = list(runs)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.1 * len(names) + 0.8), squeeze=False, layout="constrained")
    rows = []
    for i, name in enumerate(names):
        evals = [r for r in read_log(os.path.join(dirs[name][0], "log.jsonl")) if r.get("layers")]
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
        layers = [final(r)["layers"] for r in runs[name]]
        dead = [sum(m["dead"] for m in ls) for ls in layers]
        rows.append((name, [fmt([value(r, "val_loss") for r in runs[name]]), fmt(dead, 1), f"{max(dead)}",
                            fmt([ls[0]["cv"] for ls in layers]), fmt([max(m["max_mean"] for m in ls) for ls in layers], 2)]))
    fig.colorbar(im, ax=axes[:, 0], label="load x E (1 = uniform, 0 = dead)")
    fig.suptitle(f"expert load at every evaluation, the {E} experts of each layer side by side (first seed)")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return table(rows, ["val loss", f"dead experts (of {L}x{E})", "worst seed", "layer-0 load CV",
                        "max/mean load (worst layer)"])


def show_coupling(runs, dirs, path):
    keys = [k for k in METRICS if k[0] != "coact_floor"]
    xs = [float(n.split("=")[1]) for n in runs]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.3), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        ys = [spread([value(r, key) for r in records]) for records in runs.values()]
        ax.errorbar(xs, [m for m, _ in ys], yerr=[h for _, h in ys], fmt="o-", capsize=3)
        ax.set(title=title, xlabel="c_cp")
        ax.set_xscale("symlog", linthresh=1e-3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return metric_table(runs, keys, base=list(runs)[0])


def show_specialization(runs, dirs, path):
    keys = [METRICS[0], METRICS[-1], METRICS[4], METRICS[1]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        for j, init in enumerate(("random", "upcycle")):
            names = [n for n in runs if n.startswith(init)]
            ys = [spread([value(r, key) for r in runs[n]]) for n in names]
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
    return metric_table(runs, keys)


SHOW = {"default": show_default, "capacity": show_capacity, "routing": show_routing, "regularisers": show_regularisers,
        "regularisers-facts": show_regularisers, "collapse": show_collapse, "coupling": show_coupling,
        "specialization": show_specialization}


def main(argv):
    parser = ArgParser(prog="python course/demos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", choices=list(DEMOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out_dir", default="out-demos")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"), help="where the figure and table go")
    parser.add_argument("--jobs", type=int, default=1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1),
                        help="runs at a time (default: 2 on a CPU, each with its share of the cores; 1 on a GPU)")
    parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if min(args.seeds) < 0 or args.jobs < 1:
        raise UserError(f"seeds must be >= 0 and --jobs >= 1, got {args.seeds} and {args.jobs}")
    if not os.path.isdir(args.docs):
        raise UserError(f"--docs={args.docs} is not a directory")
    variants, out_dir = DEMOS[args.demo]["variants"], os.path.abspath(args.out_dir)
    dirs = {name: [run_dir(out_dir, a, s) for s in args.seeds] for name, a in variants.items()}
    place = {(name, s): d for name in variants for s, d in zip(args.seeds, dirs[name])}
    if run_variants(variants, [], args.seeds, out_dir, args.dry, args.jobs, lambda n, s: place[n, s]) is None:
        return
    runs = {name: [final_eval(d) for d in dirs[name]] for name in variants}
    figure = os.path.join(args.docs, f"demo_{args.demo}.png")
    md = SHOW[args.demo](runs, dirs, figure)
    md = (f"`python course/demos.py {args.demo}`: seeds {args.seeds}; mean ± half the spread between seeds; the "
          f"numbers of the whole val split (a task's whole table or fixed sample), layer means of the routing "
          f"metrics.\n\n" + md)
    with open(os.path.join(args.docs, f"demo_{args.demo}.md"), "w") as fh:
        fh.write(md)
    print(md)
    print(f"wrote {figure} and {os.path.join(args.docs, f'demo_{args.demo}.md')}")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
