"""
The experiments that show why MoE routing matters, one command each: every variant of a headline
comparison with 5 seeds, of the task and course demos with 3 (train.py runs, two at a time on a CPU:
a run of the default shape takes 2.7-5 min at one thread, so a demo of 5 seeds of it takes 20-36 min
on 2 cores; demos share their runs), then a table and a figure in docs/ (docs/results.md and the
README read them out). Every number is from the whole val split (or a task's whole table, or its
fixed sample of 1,024 sequences). The statistics are support/stats.py's: the mean over seeds with
its 95 % t interval; a comparison takes the difference seed by seed (the same seed gives both arms
the same batches, and the same initialisation where they have the same architecture), with its 95 %
t interval, and calls it real only when the interval excludes zero. No arm is tuned after looking:
every arm of a demo runs the same recipe.

    python course/demos.py default          # dense vs MoE on the default run, beside nanoGPT's published figure
    python course/demos.py nanogpt          # nanoGPT's network in this loop, then each modern part alone
    python course/demos.py hash             # a learned router vs a hash table on the default run
    python course/demos.py balance          # auxiliary-loss-free balancing (Wang et al. 2024) vs L_lb vs none: MaxVio
    python course/demos.py capacity         # bits of a fact table stored per parameter: dense sizes vs E = 4, 8, 16
    python course/demos.py routing          # learned vs hash on a task built to separate them, and on one that is not
    python course/demos.py regularisers     # R_sp and R_cp on the default run, paired by seed: none, Hu et al., 10x
    python course/demos.py regularisers-facts   # the same on the capacity task
    python course/demos.py collapse         # routing collapse and three cures
    python course/demos.py coupling         # the coupling loss, dose-response
    python course/demos.py specialization   # the specialization loss against its random floor
    python course/demos.py wallclock        # dense vs MoE for the same wall-clock time, and for the same FLOPs
    python course/demos.py crossover        # the same time at 4x the tokens per step (batch 48, 500 steps)
    python course/demos.py crossover-top1   # the same with top-1 routing (Switch Transformer): a cheaper MoE step
    python course/demos.py routing --seeds 0 --dry   # print the commands only

A run is kept in out-demos/runs/<key>-s<seed>, the key a hash of the settings it changes from the
declared defaults: an interrupted demo picks up where it stopped, and two demos that need the same run
share it.
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
from support.stats import fmt_interval, fmt_paired, interval  # noqa: E402
from tools.ablate import QUICK, REPO, final, final_eval, run_variants  # noqa: E402

SYNTHETIC = ["config/synthetic.py", *QUICK, "--c_sp=0.0", "--c_cp=0.0"]  # the quick ablation of tools/ablate.py
TEXT = ["--num_samples=0"]                                                # the default run, without samples

DENSE = [*TEXT, "--n_experts=0"]
ERMOE = [*TEXT, "--router=ermoe"]                                         # its defaults: c_lb = c_z = 0
NANOGPT_NET = [*DENSE, "--pos_emb=learned", "--mlp=gelu", "--norm=layernorm"]  # GPT-2's parts, as nanoGPT has them
FACTS = ["config/facts.py"]  # 196,608 bits; the largest model below would hold 2 bits x 80k parameters at most

DEMOS = {
    "default": dict(variants={
        "dense (n_experts=0)": DENSE,
        "MoE, 8 experts top-2 (the default)": TEXT}),
    "nanogpt": dict(variants={
        "nanoGPT's network (learned positions, 4d GELU MLP, LayerNorm)": NANOGPT_NET,
        "+ rotary positions": [*NANOGPT_NET, "--pos_emb=rope"],
        "+ SwiGLU MLP (8d/3 -> 384 wide)": [*NANOGPT_NET, "--mlp=swiglu"],
        "+ RMSNorm": [*NANOGPT_NET, "--norm=rmsnorm"],
        "all three: the dense twin of the default": DENSE}),
    "hash": dict(variants={
        "learned (softmax, the default)": TEXT,
        "hash (a fixed random token-id table)": [*TEXT, "--router=hash"]}),
    "ermoe": dict(seeds=3, variants={  # the search: one change each from ERMoE as configured (config/ermoe.py)
        "softmax + L_lb (the default)": TEXT,
        "ERMoE as configured": ERMOE,
        "ERMoE, c_cp=0": [*ERMOE, "--c_cp=0.0"],
        "ERMoE, experts read the token": [*ERMOE, "--ermoe_input=token"],
        "ERMoE, beta fixed at 10": [*ERMOE, "--ermoe_beta_learned=False"],
        "ERMoE, beta learned from 1": [*ERMOE, "--ermoe_beta=1.0"],
        "ERMoE, partitioned bases": [*ERMOE, "--ermoe_basis=partitioned"],
        "ERMoE, rank 64": [*ERMOE, "--ermoe_rank=64"],
        "ERMoE, loss-free bias": [*ERMOE, "--select_bias=True"],
        "ERMoE, L_lb (c_lb=0.01)": [*ERMOE, "--c_lb=0.01"]}),
    "balance": dict(variants={
        "softmax + L_lb (the default)": TEXT,
        "softmax, no balancing (c_lb=0)": [*TEXT, "--c_lb=0.0"],
        "sigmoid + bias, loss-free (DeepSeek-V3)": [*TEXT, "--router=sigmoid"]}),
    "wallclock": dict(variants=lambda out_dir: wallclock_variants(out_dir)),
    "crossover": dict(variants=lambda out_dir: crossover_variants(out_dir, "crossover")),
    "crossover-top1": dict(variants=lambda out_dir: crossover_variants(out_dir, "crossover-top1", TOP_1, "MoE top-1")),
    "capacity": dict(seeds=3, variants={  # 6 arms x 5 seeds would take ~30 min
        "dense d=16": [*FACTS, "--n_embd=16", "--n_experts=0"],
        "dense d=32": [*FACTS, "--n_embd=32", "--n_experts=0"],
        "dense d=48": [*FACTS, "--n_embd=48", "--n_experts=0"],
        "MoE d=16, E=4": [*FACTS, "--n_embd=16", "--n_experts=4"],
        "MoE d=16, E=8": [*FACTS, "--n_embd=16", "--n_experts=8"],
        "MoE d=16, E=16": [*FACTS, "--n_embd=16", "--n_experts=16"]}),
    "routing": dict(seeds=3, variants={
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
    "regularisers-facts": dict(seeds=3, variants={
        "none (c_sp = c_cp = 0)": ["config/facts.py"],
        "Hu et al. (c_sp = 2e-3, c_cp = 1e-3)": ["config/facts.py", "--c_sp=0.002", "--c_cp=0.001"],
        "10x (c_sp = 2e-2, c_cp = 1e-2)": ["config/facts.py", "--c_sp=0.02", "--c_cp=0.01"]}),
    # the collapse preset: softmax router, top-1, gates = p, no balancing loss, high learning rate
    "collapse": dict(seeds=3, variants={
        "no balancing": ["config/collapse.py", "--num_samples=0"],
        "L_lb (c_lb=0.01)": ["config/collapse.py", "--num_samples=0", "--c_lb=0.01"],
        "ERMoE (no loss)": ["config/collapse.py", "--num_samples=0", "--router=ermoe"],
        "sigmoid + bias (no loss)": ["config/collapse.py", "--num_samples=0", "--router=sigmoid"]}),
    # the synthetic task; the coupling loss alone (no R_sp) at growing strength
    "coupling": dict(seeds=3, variants={
        f"c_cp={c:g}": ["config/synthetic.py", *QUICK, "--c_lb=0.01", "--c_sp=0.0", f"--c_cp={c}"]
        for c in (0.0, 1e-3, 1e-2, 0.1)}),
    # the specialization loss alone (no R_cp) at growing strength, from random or upcycled experts
    "specialization": dict(seeds=3, variants={
        f"{init}, c_sp={c:g}": ["config/synthetic.py", *QUICK, "--c_lb=0.01", "--c_cp=0.0", f"--c_sp={c}",
                                f"--expert_init={init}"]
        for init in ("random", "upcycle") for c in (0.0, 2e-3, 0.1)}),
}


def step_time_ratio(extra=(), moe=(), steps=40):
    """t(MoE step) / t(dense step) of train.py's training step of the default run with the settings
    `extra` (and the MoE's own `moe`; tools/breakdown.py: forward, the auxiliary losses, backward,
    clipping, AdamW), on this machine, one thread, the two interleaved in one process."""
    from tools.breakdown import default_steps, interleaved
    torch.set_num_threads(1)
    times = interleaved(default_steps(extra, moe), steps)
    return float(times["MoE"][0] / times["dense"][0])


def measured_ratio(out_dir, name, extra=(), moe=()):
    """step_time_ratio(extra, moe), measured once and kept in out_dir/<name>.json: a rerun finds the same runs."""
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        print("measuring the step-time ratio of MoE and dense, side by side ...", flush=True)
        with open(path, "w") as fh:
            json.dump({"ratio": round(step_time_ratio(extra, moe), 4)}, fh)
    with open(path) as fh:
        return json.load(fh)["ratio"]


def wallclock_variants(out_dir):
    """The MoE default run (2,000 steps) and the dense model given its time: its steps times the measured
    step-time ratio, or its FLOPs: GPT.flops_per_token."""
    ratio = measured_ratio(out_dir, "wallclock")
    from model import GPT, GPTConfig
    flops = {}
    for name, extra in (("dense", dict(n_experts=0)), ("moe", {})):
        with torch.device("meta"):
            flops[name] = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                                        **extra)).flops_per_token()
    same_time, same_flops = round(2000 * ratio), round(2000 * flops["moe"] / flops["dense"])
    return {"MoE, 8 experts top-2 (the default, 2,000 steps)": TEXT,
            f"dense, the same time ({same_time:,} steps; step-time ratio {ratio:.3f})": [*DENSE, f"--max_iters={same_time}"],
            f"dense, the same FLOPs ({same_flops:,} steps)": [*DENSE, f"--max_iters={same_flops}"]}


BATCH_4X = ["--batch_size=48"]  # 4x the default's tokens per step; 500 steps: the default's tokens in all
TOP_1 = ["--top_k=1"]           # Switch Transformer's routing: one expert per token, each as wide as the dense MLP


def crossover_variants(out_dir, name, moe=(), label="MoE"):
    """The same time at 4x the tokens per step, where bench.py --breakdown measures a smaller MoE step
    overhead than at the default's batch: does the MoE (with its settings `moe`) win on the wall clock
    there? The dense arms are the same runs for every MoE tried."""
    ratio = measured_ratio(out_dir, name, BATCH_4X, moe)
    same_time = round(500 * ratio)
    return {f"{label}, batch 48 (500 steps)": [*TEXT, *BATCH_4X, *moe, "--max_iters=500"],
            f"dense, batch 48, the same time ({same_time:,} steps; step-time ratio {ratio:.3f})":
                [*DENSE, *BATCH_4X, f"--max_iters={same_time}"],
            "dense, batch 48, the same steps (500): the MoE's gain per step": [*DENSE, *BATCH_4X, "--max_iters=500"]}


def settings_key(args):
    """A hash of the settings train.py resolves from these arguments where they differ from the declared
    defaults (seed and out_dir aside): the same run under any demo's name, and a new setting with its
    default changes no key."""
    import train
    settings, _ = train.setup([a if a.startswith("--") else os.path.join(REPO, a) for a in args])  # config files
    values = {k: v for k, v in settings.values.items()
              if k not in ("out_dir", "overwrite", "seed") and v != settings.defaults[k]}
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def run_dir(out_dir, args, seed):
    return os.path.join(out_dir, "runs", f"{settings_key(args)}-s{seed}")


# ------------------------------------------------------------------------------------------------
# numbers from finished runs

def fmt(values, digits=3):
    """The mean over seeds ± the half-width of its 95 % t interval."""
    return fmt_interval(values, digits)


def value(record, key):
    """A number of a run's final evaluation: the loss, the bits, or a layer mean of a routing metric."""
    numbers = final(record)
    if key in ("val_loss", "bits"):
        return numbers[key]
    if key == "maxvio_batch":  # over batches of the training size: the fixed-batch evaluation, not the whole split
        return np.mean([m[key] for m in record["layers"]])
    if key == "dead":          # summed over layers
        return sum(m[key] for m in numbers["layers"])
    if key == "query_experts":  # the facts tasks: experts used by the answering positions (label 1)
        return np.mean([m["experts_per_label"][1] for m in numbers["layers"]])
    return np.mean([m[key] for m in numbers["layers"] if key in m])


def table(rows, columns):
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"


def paired(runs, name, base, key="val_loss", digits=3):
    """The difference to `base` seed by seed (same seed, same batches), its 95 % t interval and verdict."""
    if name == base:
        return "–"
    return fmt_paired([value(r, key) for r in runs[name]], [value(r, key) for r in runs[base]], digits)


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
    ys = [interval([value(r, key) for r in runs[n]]) for n in names]
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


NANOGPT_OWN = (1.8983, 0.0044)  # nanoGPT's own code, this recipe, seed 1337, whole val split (docs/results.md)


def paired_table(runs, base, extra=(), params=True):
    """The common table: parameters, val loss, its difference to `base` seed by seed, other metrics."""
    rows = []
    for name, records in runs.items():
        p = records[0]["params"]
        cells = [f"{p['total'] / 1e6:.2f}M / {p['active'] / 1e6:.2f}M"] if params else []
        cells += [fmt([value(r, "val_loss") for r in records], 4), paired(runs, name, base, digits=4)]
        cells += [fmt([value(r, key) for r in records], digits) for key, _, digits in extra]
        rows.append((name, cells))
    head = ["parameters total / active"] if params else []
    return table(rows, head + ["val loss (whole split)", f"- {base.split(' (')[0]} (paired)"] + [t for _, t, _ in extra])


def show_nanogpt(runs, dirs, path):
    names = list(runs)
    fig, ax = plt.subplots(figsize=(8, 4))
    bar_panel(ax, runs, "val_loss", "val loss, whole split (95 % t interval over seeds)")
    ax.axhspan(NANOGPT_OWN[0] - 1.96 * NANOGPT_OWN[1], NANOGPT_OWN[0] + 1.96 * NANOGPT_OWN[1], color="k", alpha=0.15,
               label=f"nanoGPT's own code: {NANOGPT_OWN[0]} (one seed, ± 1.96 standard errors)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    mean, half = interval([value(r, "val_loss") for r in runs[names[0]]])
    inside = abs(mean - NANOGPT_OWN[0]) <= half + 1.96 * NANOGPT_OWN[1]
    return paired_table(runs, names[0]) + (
        f"\nnanoGPT's own code on the same split: {NANOGPT_OWN[0]:.4f} ± {NANOGPT_OWN[1]:.4f} (standard error, one "
        f"seed). Its network in this loop: {mean:.4f} ± {half:.4f}; the difference {mean - NANOGPT_OWN[0]:+.4f} is "
        f"{'within' if inside else 'outside'} the two intervals combined.\n")


def show_hash(runs, dirs, path):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    bar_panel(axes[0], runs, "val_loss", "val loss, whole split")
    bar_panel(axes[1], runs, "entropy_norm", "routing entropy / log E")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return paired_table(runs, list(runs)[0], [("cv", "load CV", 3), ("entropy_norm", "routing entropy / log E", 3)])


def show_balance(runs, dirs, path):
    keys = [("val_loss", "val loss, whole split"), ("maxvio_global", "MaxVio_global (whole val split)"),
            ("maxvio_batch", "MaxVio_batch (batches of 768 tokens)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (key, title), ax in zip(keys, axes):
        bar_panel(ax, runs, key, title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return paired_table(runs, list(runs)[0], [("maxvio_global", "MaxVio_global", 3), ("maxvio_batch", "MaxVio_batch", 3),
                                              ("dead", "dead experts (of 4x8)", 1)])


def show_capacity(runs, dirs, path):
    names = list(runs)
    bits = {n: [value(r, "bits") for r in runs[n]] for n in names}
    params = {n: runs[n][0]["params"] for n in names}
    from support.tasks import TASKS
    table_bits = TASKS["facts"]().bits
    dense = [n for n in names if n.startswith("dense")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for group, style in ((dense, "o-"), ([n for n in names if n not in dense], "s")):
        xs = [params[n]["total"] for n in group]
        ys = [interval(bits[n]) for n in group]
        axes[0].errorbar(xs, [m for m, _ in ys], yerr=[h for _, h in ys], fmt=style, capsize=3,
                         label="dense, 3 sizes" if group is dense else "MoE at dense d=16's active compute (E = 4, 8, 16)")
        axes[1].plot(xs, [m / x for (m, _), x in zip(ys, xs)], style, label="per total parameter" if group is dense else None)
        if group is not dense:
            axes[1].plot(xs, [m / params[n]["active"] for (m, _), n in zip(ys, group)], "s", mfc="none",
                         label="MoE per active parameter")
    x = np.array([min(p["total"] for p in params.values()), max(p["total"] for p in params.values())])
    for rate in (1, 2):
        axes[0].plot(x, rate * x, "k--" if rate == 2 else "k:", lw=1, label=f"{rate} bit{'s' * (rate > 1)} per parameter")
    axes[0].axhline(table_bits, color="tab:red", lw=1, label=f"the whole table: {table_bits:,.0f} bits")
    axes[0].set(xscale="log", yscale="log", xlabel="total parameters", ylabel="bits stored",
                title="bits stored against total parameters")
    axes[1].set(xscale="log", xlabel="total parameters", ylabel="bits / parameter", title="bits per parameter")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    rows = []
    for n in names:
        p, m = params[n], np.mean(bits[n])
        rows.append((n, [f"{p['total'] / 1e3:,.1f}k / {p['active'] / 1e3:,.1f}k", fmt(bits[n], 0),
                         f"{m / p['total']:.2f}", f"{m / p['active']:.2f}",
                         paired(runs, n, names[0], "bits", 0)]))
    import train
    settings, _ = train.setup([os.path.join(REPO, FACTS[0])])
    facts = TASKS["facts"]()
    exposures = settings.values["batch_size"] * settings.values["max_iters"] / facts.N
    biggest = max(p["total"] for p in params.values())
    return table(rows, ["parameters total / active", "bits stored", "bits / total parameter", "bits / active parameter",
                        "- dense d=16 (paired)"]) + (
        f"\nExposures: every person's record is seen {exposures:.0f} times ({settings.values['batch_size']} records "
        f"a step, {settings.values['max_iters']:,} steps, {facts.N:,} people). Every model is capacity-limited: the "
        f"table holds {table_bits:,.0f} bits, {table_bits / biggest:.1f}x the largest model's {biggest:,} parameters "
        f"(Allen-Zhu & Li: ~1 bit per parameter at 100 exposures, ~2 at 1,000).\n")


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
        ys = [interval([value(r, key) for r in records]) for records in runs.values()]
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
            ys = [interval([value(r, key) for r in runs[n]]) for n in names]
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


def show_wallclock(runs, dirs, path):
    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        curves = [[(r["iter"], r["val_loss"]) for r in read_log(os.path.join(d, "log.jsonl")) if "val_loss" in r]
                  for d in dirs[name]]
        axes[0].plot([it for it, _ in curves[0]], np.mean([[v for _, v in c] for c in curves], axis=0), "o-", ms=3,
                     label=name.split(" (")[0])
    axes[0].set(xlabel="iter", ylabel="val loss (fixed batches, mean of seeds)", ylim=(1.5, 2.2), title="by step")
    axes[0].legend(fontsize=8)
    bar_panel(axes[1], runs, "val_loss", "val loss, whole split (95 % t interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    times = {n: fmt([r["time_s"] for r in runs[n]], 0) for n in names}
    return paired_table(runs, names[0]) + "\nthe runs' own wall times (s, two runs at a time, one thread each): " + \
        "; ".join(f"{n.split(' (')[0]}: {t}" for n, t in times.items()) + "\n"


SHOW = {"default": show_default, "ermoe": show_hash, "nanogpt": show_nanogpt, "hash": show_hash, "balance": show_balance,
        "wallclock": show_wallclock, "crossover": show_wallclock, "crossover-top1": show_wallclock,
        "capacity": show_capacity, "routing": show_routing, "regularisers": show_regularisers,
        "regularisers-facts": show_regularisers, "collapse": show_collapse, "coupling": show_coupling,
        "specialization": show_specialization}


def main(argv):
    parser = ArgParser(prog="python course/demos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", choices=list(DEMOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 (0-2 where a demo says so)")
    parser.add_argument("--out_dir", default="out-demos")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"), help="where the figure and table go")
    parser.add_argument("--jobs", type=int, default=1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1),
                        help="runs at a time (default: 2 on a CPU, each with its share of the cores; 1 on a GPU)")
    parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or list(range(DEMOS[args.demo].get("seeds", 5)))
    if min(args.seeds) < 0 or args.jobs < 1:
        raise UserError(f"seeds must be >= 0 and --jobs >= 1, got {args.seeds} and {args.jobs}")
    if not os.path.isdir(args.docs):
        raise UserError(f"--docs={args.docs} is not a directory")
    variants, out_dir = DEMOS[args.demo]["variants"], os.path.abspath(args.out_dir)
    if callable(variants):  # measured on this machine first (wallclock, crossover, crossover-top1)
        variants = variants(out_dir)
    dirs = {name: [run_dir(out_dir, a, s) for s in args.seeds] for name, a in variants.items()}
    place = {(name, s): d for name in variants for s, d in zip(args.seeds, dirs[name])}
    if run_variants(variants, [], args.seeds, out_dir, args.dry, args.jobs, lambda n, s: place[n, s]) is None:
        return
    runs = {name: [final_eval(d) for d in dirs[name]] for name in variants}
    figure = os.path.join(args.docs, f"demo_{args.demo}.png")
    md = SHOW[args.demo](runs, dirs, figure)
    md = (f"`python course/demos.py {args.demo}`: seeds {args.seeds}; mean ± the half-width of the 95 % t interval "
          f"over seeds (paired columns: of the difference seed by seed, 'real' when it excludes 0); the "
          f"numbers of the whole val split (a task's whole table or fixed sample), layer means of the routing "
          f"metrics.\n\n" + md)
    with open(os.path.join(args.docs, f"demo_{args.demo}.md"), "w") as fh:
        fh.write(md)
    print(md)
    print(f"wrote {figure} and {os.path.join(args.docs, f'demo_{args.demo}.md')}")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
