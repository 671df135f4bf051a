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
    python course/demos.py hash             # a learned router vs a hash table on the default run (and ERMoE, dense)
    python course/demos.py hash-why         # the gap taken apart: frozen routers, a learned id table, a balanced hash
    python course/demos.py ermoe            # ERMoE as config/ermoe.py sets it against the softmax router, 5 seeds
    python course/demos.py ermoe-search     # why ERMoE collapsed on text: one change each from its earlier form
    python course/demos.py hash-bpe         # the same on GPT-2 BPE tokens of the same text
    python course/demos.py balance          # auxiliary-loss-free balancing (Wang et al. 2024) vs L_lb vs none: MaxVio
    python course/demos.py capacity         # bits of a fact table per parameter: dense sizes, E = 4, 8, 16, iso-total
    python course/demos.py capacity-exposures   # dense d=32 and E=8 at 125 and 500 exposures
    python course/demos.py routing          # learned vs hash on a task built to separate them, and on one that is not
    python course/demos.py regularisers     # R_sp and R_cp on the default run, paired by seed: none, Hu et al., 10x
    python course/demos.py regularisers-facts   # the same on the capacity task
    python course/demos.py collapse         # routing collapse and three cures
    python course/demos.py coupling         # the coupling loss, dose-response
    python course/demos.py specialization   # the specialization loss against its random floor
    python course/demos.py wallclock        # dense vs MoE for the same wall-clock time, and for the same FLOPs
    python course/demos.py crossover        # the same time at 4x the tokens per step (batch 48, 500 steps)
    python course/demos.py crossover-top1   # the same with top-1 routing (Switch Transformer): a cheaper MoE step
    python course/demos.py verdicts         # every paired comparison of docs/demo_*.json, Holm-corrected
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

import torch  # noqa: E402

from support.rundir import ArgParser, UserError, cli, read_log  # noqa: E402
from course import tables as T  # noqa: E402
from support.stats import interval  # noqa: E402
from tools.ablate import QUICK, REPO, final_eval, run_variants  # noqa: E402

SYNTHETIC = ["config/synthetic.py", *QUICK, "--c_sp=0.0", "--c_cp=0.0"]  # the quick ablation of tools/ablate.py
TEXT = ["--num_samples=0"]                                                # the default run, without samples

DENSE = [*TEXT, "--n_experts=0"]
ERMOE_FIXED = ["config/ermoe.py", *TEXT]                                  # ERMoE as its config file sets it
ERMOE_BEFORE = [*ERMOE_FIXED, "--ermoe_input=coords", "--ermoe_rank=16", "--select_bias=False"]  # collapsed on text
HASH = [*TEXT, "--router=hash"]
BPE = ["--dataset=shakespeare_bpe", "--max_iters=1000"]
LEARNED_HASH_LOSSES = [*TEXT, "--select_bias=True", "--c_lb=0.0", "--c_z=0.0", "--c_cp=0.0"]
NANOGPT_NET = [*DENSE, "--pos_emb=learned", "--mlp=gelu", "--norm=layernorm"]  # GPT-2's parts, as nanoGPT has them
FACTS = ["config/facts.py"]  # 196,608 bits, 8,192 records; 2,000 steps of 512 records: 125 exposures each
STEPS_4X = ["--max_iters=8000", "--eval_interval=2000"]  # 500 exposures per record

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
        "hash (a fixed random token-id table)": HASH,
        "learned (softmax, the default)": TEXT,
        "learned, hash's losses (select bias; c_lb = c_z = c_cp = 0)": LEARNED_HASH_LOSSES,
        "ERMoE (config/ermoe.py; loss-free bias, c_lb = c_z = 0, R_cp on)": ERMOE_FIXED,
        "dense (n_experts=0)": DENSE}),
    # the same question on GPT-2 BPE tokens (the ids the text uses: an 11,712-wide output layer); 1,000 steps,
    # 2.5 passes over the 302k training tokens (a BPE step took ~2.5x a character one here: results §5)
    "hash-bpe": dict(variants={
        "hash, BPE (a fixed random token-id table)": [*HASH, *BPE],
        "learned, BPE (softmax, the default)": [*TEXT, *BPE]}),
    # the gap taken apart: each arm one change from the learned default (hash and learned shared with `hash`)
    "hash-why": dict(variants={
        "hash (a fixed random token-id table)": HASH,
        "learned (softmax, the default)": TEXT,
        "frozen random linear router (router_frozen_from=0)": [*TEXT, "--router_frozen_from=0"],
        "learned, frozen after 10 % (router_frozen_from=200)": [*TEXT, "--router_frozen_from=200"],
        "learned token-id table (router=token_table)": [*TEXT, "--router=token_table"],
        "hash, frequency-balanced table (hash_balanced)": [*HASH, "--hash_balanced=True"]}),
    "ermoe": dict(variants={
        "softmax + L_lb (the default)": TEXT,
        "ERMoE (config/ermoe.py: experts read the token, loss-free bias)": ERMOE_FIXED}),
    # why it collapsed: one change each from ERMoE as it was configured before (its experts read r = d/E = 16
    # coordinates, R_cp on as for every router), then the candidate fixes
    "ermoe-search": dict(seeds=3, variants={
        "softmax + L_lb (the default)": TEXT,
        "ERMoE before (r = 16 coordinates, R_cp on)": ERMOE_BEFORE,
        "before, c_cp=0": [*ERMOE_BEFORE, "--c_cp=0.0"],
        "before, experts read the token": [*ERMOE_BEFORE, "--ermoe_input=token"],
        "before, beta fixed at 10": [*ERMOE_BEFORE, "--ermoe_beta_learned=False"],
        "before, rank 64": [*ERMOE_BEFORE, "--ermoe_rank=64"],
        "before, loss-free bias": [*ERMOE_BEFORE, "--select_bias=True"],
        "before, L_lb (c_lb=0.01)": [*ERMOE_BEFORE, "--c_lb=0.01"],
        "rank 64 coordinates, c_cp=0": [*ERMOE_FIXED, "--ermoe_input=coords", "--select_bias=False", "--c_cp=0.0"],
        "rank 64 coordinates, loss-free bias": [*ERMOE_FIXED, "--ermoe_input=coords"],
        "the token, c_cp=0": [*ERMOE_FIXED, "--select_bias=False", "--c_cp=0.0"],
        "the token, loss-free bias (config/ermoe.py)": ERMOE_FIXED}),
    # each neighbour changes one thing: the balancing (L_lb -> the bias), the z-loss, the gating (softmax -> sigmoid)
    "balance": dict(variants={
        "softmax + L_lb (the default)": TEXT,
        "softmax, no balancing (c_lb=0)": [*TEXT, "--c_lb=0.0"],
        "softmax + loss-free bias, c_z = 1e-3 (c_lb=0)": [*TEXT, "--select_bias=True", "--c_lb=0.0"],
        "softmax + loss-free bias, c_z = 0": [*TEXT, "--select_bias=True", "--c_lb=0.0", "--c_z=0.0"],
        "sigmoid + bias, loss-free (DeepSeek-V3; c_z = 0)": [*TEXT, "--router=sigmoid"]}),
    "wallclock": dict(variants=lambda out_dir: wallclock_variants(out_dir)),
    "crossover": dict(variants=lambda out_dir: crossover_variants(out_dir, "crossover")),
    "crossover-top1": dict(variants=lambda out_dir: crossover_variants(out_dir, "crossover-top1", TOP_1, "MoE top-1")),
    # every MoE at d = 32, where the width is not the bottleneck; dense at three widths, and for each E the
    # iso-total dense control: the MoE's total parameters in one dense MLP (ffn_hidden = E * f, f = 64)
    "capacity": dict(seeds=3, variants={
        "dense d=32": [*FACTS, "--n_experts=0"],
        "dense d=48": [*FACTS, "--n_embd=48", "--n_experts=0"],
        "dense d=64": [*FACTS, "--n_embd=64", "--n_experts=0"],
        "MoE d=32, E=4": [*FACTS, "--n_experts=4"],
        "MoE d=32, E=8": [*FACTS, "--n_experts=8"],
        "MoE d=32, E=16": [*FACTS, "--n_experts=16"],
        "dense d=32, iso-total E=4 (MLP 256 wide)": [*FACTS, "--n_experts=0", "--ffn_hidden=256"],
        "dense d=32, iso-total E=8 (MLP 512 wide)": [*FACTS, "--n_experts=0", "--ffn_hidden=512"],
        "dense d=32, iso-total E=16 (MLP 1024 wide)": [*FACTS, "--n_experts=0", "--ffn_hidden=1024"]}),
    # dense d=32 and E=8 at 125 and at 500 exposures per record (the 2,000-step runs are capacity's): a model at
    # a capacity limit stores no more bits per parameter when it sees the table 4x as often
    "capacity-exposures": dict(seeds=3, variants={
        "dense d=32, 2,000 steps": [*FACTS, "--n_experts=0"],
        "dense d=32, 8,000 steps": [*FACTS, "--n_experts=0", *STEPS_4X],
        "MoE d=32, E=8, 2,000 steps": [*FACTS, "--n_experts=8"],
        "MoE d=32, E=8, 8,000 steps": [*FACTS, "--n_experts=8", *STEPS_4X]}),
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
    # the collapse preset: softmax router, top-1, gates = p, no balancing loss, high learning rate; ERMoE without
    # the select bias its defaults add (router.py), so that its arm tests the bounded cosine score alone
    "collapse": dict(seeds=3, variants={
        "no balancing": ["config/collapse.py", "--num_samples=0"],
        "L_lb (c_lb=0.01)": ["config/collapse.py", "--num_samples=0", "--c_lb=0.01"],
        "ERMoE, its geometry alone (no loss, no bias)": ["config/collapse.py", "--num_samples=0", "--router=ermoe",
                                                          "--select_bias=False"],
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
    step-time ratio, or its FLOPs: GPT.flops_per_token; then the hash MoE and the dense model given its time."""
    ratio, ratio_hash = measured_ratio(out_dir, "wallclock"), measured_ratio(out_dir, "wallclock-hash", moe=HASH[1:])
    from model import GPT, GPTConfig
    flops = {}
    for name, extra in (("dense", dict(n_experts=0)), ("moe", {})):
        with torch.device("meta"):
            flops[name] = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                                        **extra)).flops_per_token()
    same_time, same_flops = round(2000 * ratio), round(2000 * flops["moe"] / flops["dense"])
    hash_time = round(2000 * ratio_hash)
    return {"MoE, 8 experts top-2 (the default, 2,000 steps)": TEXT,
            f"dense, the same time ({same_time:,} steps; step-time ratio {ratio:.3f})":
                [*DENSE, f"--max_iters={same_time}"],
            f"dense, the same FLOPs ({same_flops:,} steps)": [*DENSE, f"--max_iters={same_flops}"],
            "hash MoE (a fixed token-id table, 2,000 steps)": HASH,
            f"dense, the hash MoE's time ({hash_time:,} steps; step-time ratio {ratio_hash:.3f})":
                [*DENSE, f"--max_iters={hash_time}"]}


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
# each demo's table (course/tables.py: columns over per-seed numbers), figure and notes

LOSS_KEYS = [("val_loss", "val loss, whole split")]


def show_default(runs, path):
    T.figure_losses(runs, path)
    names = list(runs)
    return [T.Column("parameters total / active", "params", "params", 2),
            T.Column("val loss (whole split)", "val_loss", "mean", 4),
            T.Column("per seed", "val_loss", "seeds", 4),
            T.Column("standard error of one run (largest)", "se", "worst", 4),
            T.Column("- dense (paired)", "val_loss", "paired", 4, names[0])], ""


NANOGPT_OWN = (1.8983, 0.0044)  # nanoGPT's own code, this recipe, seed 1337, whole val split (docs/results.md)


def show_nanogpt(runs, path):
    names = list(runs)
    fig, ax = T.plt.subplots(figsize=(8, 4))
    T.bar_panel(ax, runs, "val_loss", "val loss, whole split (95 % t interval over seeds)")
    ax.axhspan(NANOGPT_OWN[0] - 1.96 * NANOGPT_OWN[1], NANOGPT_OWN[0] + 1.96 * NANOGPT_OWN[1], color="k", alpha=0.15,
               label=f"nanoGPT's own code: {NANOGPT_OWN[0]} (one seed, ± 1.96 standard errors)")
    ax.legend(fontsize=8)
    T.save(fig, path)
    mean, half = interval([r["val_loss"] for r in runs[names[0]]])
    inside = abs(mean - NANOGPT_OWN[0]) <= half + 1.96 * NANOGPT_OWN[1]
    return T.loss_columns(names[0]), (
        f"\nnanoGPT's own code on the same split: {NANOGPT_OWN[0]:.4f} ± {NANOGPT_OWN[1]:.4f} (standard error, one "
        f"seed). Its network in this loop: {mean:.4f} ± {half:.4f}; the difference {mean - NANOGPT_OWN[0]:+.4f} is "
        f"{'within' if inside else 'outside'} the two intervals combined.\n")


def show_hash(runs, path):
    T.figure_routing_curves(runs, path)
    names = list(runs)
    learned = [n for n in names[1:] if n.startswith("learned") and "(softmax, the default)" in n]
    extra = [T.Column("- learned (paired)", "val_loss", "paired", 4, learned[0])] if learned else []
    extra += [T.Column("- dense (paired)", "val_loss", "paired", 4, names[-1])] if names[-1].startswith("dense") else []
    return T.loss_columns(names[0], extra + [T.Column("load CV", "cv"),
                                             T.Column("routing entropy / log E", "entropy_norm"),
                                             T.Column("fluctuation (final)", "fluctuation"),
                                             T.Column("token-id binding", "id_binding")]), ""


def show_ermoe(runs, path):
    T.figure_routing_curves(runs, path, (("val_loss", ""), ("dead", "dead experts (summed over layers)"),
                                         ("cv", "load CV"), ("logit_top", "largest logit (ERMoE: beta x cosine)")))
    return T.loss_columns(list(runs)[0], [T.Column("dead experts (of 4x8)", "dead", "mean", 1),
                                          T.Column("worst seed", "dead", "worst", 0), T.Column("load CV", "cv"),
                                          T.Column("top-k mass", "topk_mass"),
                                          T.Column("largest logit", "logit_top", "mean", 1)]), ""


def show_balance(runs, path):
    keys = [("val_loss", "val loss, whole split"), ("maxvio_global", "MaxVio_global (whole val split)"),
            ("maxvio_batch", "MaxVio_batch (batches of 768 tokens)")]
    T.figure_bars(runs, path, keys)
    names = list(runs)
    # each arm against the arm it differs from in one thing (DEMOS' order): L_lb removed or replaced by
    # the bias; then the z-loss removed; then the gating (softmax -> sigmoid)
    bases = dict(zip(names, [names[0], names[0], names[0], names[2], names[3]]))
    columns = T.loss_columns(names[0], [T.Column("- its one-change neighbour (paired)", "val_loss",
                                                  "paired", 4, "@row"),
                                        T.Column("MaxVio_global", "maxvio_global"),
                                        T.Column("MaxVio_batch", "maxvio_batch"),
                                        T.Column("dead experts (of 4x8)", "dead", "mean", 1)])
    return columns, "", bases


def bits_per_parameter(runs):
    """Each run's bits per total parameter (Allen-Zhu & Li's count: embeddings included) and per non-embedding one."""
    for records in runs.values():
        for r in records:
            r["bits_per_total"] = r["bits"] / r["params"]["total"]
            r["bits_per_nonembedding"] = r["bits"] / (r["params"]["total"] - r["params"].get("embedding", 0))


def exposures(args, facts):
    """How often a run of train.py with these arguments sees each person's record: batch_size x max_iters / N."""
    import train
    settings, _ = train.setup([a if a.startswith("--") else os.path.join(REPO, a) for a in args])
    return settings.values["batch_size"] * settings.values["max_iters"] / facts.N, settings.values


def capacity_notes(facts):
    seen, values = exposures(FACTS, facts)
    return (f"\nExposures: every person's record is seen {seen:.0f} times ({values['batch_size']} records "
            f"a step, {values['max_iters']:,} steps, {facts.N:,} people), unless a row says otherwise. The table "
            f"holds {facts.bits:,.0f} bits. Allen-Zhu & Li count every parameter (embeddings included): ~2 bits per "
            f"parameter at 1,000 exposures, ~1 at 100; the non-embedding count leaves out the token "
            f"embedding (tied).\n")


CAPACITY_COLUMNS = [T.Column("parameters total / active", "params", "params", 1),
                    T.Column("bits stored", "bits", "mean", 0),
                    T.Column("bits / total parameter", "bits_per_total", "mean", 2),
                    T.Column("bits / non-embedding parameter", "bits_per_nonembedding", "mean", 2)]


def show_capacity(runs, path):
    from support.tasks import TASKS
    facts = TASKS["facts"]()
    T.figure_capacity(runs, path, facts.bits)
    names = list(runs)
    bits_per_parameter(runs)
    iso = {n: next((m for m in names if m.startswith(f"dense d=32, iso-total E={n.split('E=')[1].split(',')[0]} ")),
                   None)
           for n in names if n.startswith("MoE")}
    bases = {n: iso.get(n) or n for n in names}  # an MoE against the dense MLP of its total parameters
    columns = [*CAPACITY_COLUMNS, T.Column(f"- {names[0]} (paired)", "bits", "paired", 0, names[0]),
               T.Column("- its iso-total dense (paired)", "bits", "paired", 0, "@row")]
    return columns, capacity_notes(facts), bases


def show_capacity_exposures(runs, path):
    """Each model against itself at a quarter of the steps: bits, and bits per total parameter."""
    from support.tasks import TASKS
    facts = TASKS["facts"]()
    bits_per_parameter(runs)
    variants = DEMOS["capacity-exposures"]["variants"]
    T.figure_exposures(runs, path, {n: exposures(variants[n], facts)[0] for n in runs}, facts.bits)
    bases = {n: n.replace("8,000 steps", "2,000 steps") for n in runs}
    # one paired column: bits and bits per parameter differ by a constant factor, the same test twice
    columns = [*CAPACITY_COLUMNS, T.Column("bits / total parameter - 2,000 steps (paired)", "bits_per_total",
                                           "paired", 3, "@row")]
    return columns, capacity_notes(facts), bases


def show_routing(runs, path):
    fig, axes = T.plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, task in zip(axes, ("facts_binary", "synthetic")):
        T.bar_panel(ax, runs, "val_loss", f"{task}: val loss", [n for n in runs if n.startswith(task)])
    T.save(fig, path)
    base = {n: f"{n.split(':')[0]}: learned (softmax)" for n in runs}
    cols = [T.Column("val loss", "val_loss"), T.Column("- learned (paired)", "val_loss", "paired", 3, "@row"),
            T.Column("bits stored", "bits", "mean", 0),
            T.Column("experts used by the answers (of 16)", "query_experts", "mean", 2),
            T.Column("NMI(expert, source)", "source_nmi")]
    return cols, "", base


def show_regularisers(runs, path):
    names = list(runs)
    bits = "bits" in runs[names[0]][0]
    keys = [("val_loss", "val loss")] + ([("bits", "bits stored")] if bits else []) + \
        [("coact_floor", "co-act cos² × f"), ("entropy_norm", "routing entropy / log E"),
         ("next_nmi", "NMI(layer l, l+1)")]
    T.figure_paired_lines(runs, path, keys)
    digits = {"bits": 0, "coact_floor": 2, "val_loss": 4}
    cols = [T.Column(t, k, "mean", digits.get(k, 3)) for k, t in keys]
    cols.append(T.Column("val loss - none (paired)", "val_loss", "paired", 4, names[0]))
    if bits:
        cols.append(T.Column("bits - none (paired)", "bits", "paired", 0, names[0]))
    return cols, ""


def show_collapse(runs, path):
    T.figure_load_history(runs, path)
    return [T.Column("val loss", "val_loss"), T.Column("dead experts (of 4x16)", "dead", "mean", 1),
            T.Column("worst seed", "dead", "worst", 0), T.Column("layer-0 load CV", "layer0_cv"),
            T.Column("max/mean load (worst layer)", "max_max_mean", "mean", 2)], ""


METRICS = [("val_loss", "val loss"), ("entropy_norm", "routing entropy / log E"), ("topk_mass", "top-k mass"),
           ("next_nmi", "NMI(layer l, l+1)"), ("source_nmi", "NMI(expert, source)"),
           ("coact_floor", "co-act cos² × f (1 = random)")]


def show_coupling(runs, path):
    keys = [k for k in METRICS if k[0] != "coact_floor"]
    T.figure_dose(runs, path, keys, "c_cp")
    return [T.Column(t, k) for k, t in keys] + [T.Column(f"val loss - {list(runs)[0]} (paired)", "val_loss", "paired",
                                                         3, list(runs)[0])], ""


def show_specialization(runs, path):
    keys = [METRICS[0], METRICS[-1], METRICS[4], METRICS[1]]
    T.figure_grouped_bars(runs, path, keys, ("random", "upcycle"))
    return [T.Column(t, k, "mean", 2 if k == "coact_floor" else 3) for k, t in keys], ""


def show_wallclock(runs, path):
    fig, axes = T.plt.subplots(1, 2, figsize=(11, 4))
    T.loss_curves(axes[0], runs, "by step", (1.5, 2.2))
    T.bar_panel(axes[1], runs, "val_loss", "val loss, whole split (95 % t interval)")
    T.save(fig, path)
    names = list(runs)
    hash_time = [n for n in names if n.startswith("dense, the hash MoE's time")]
    extra = [T.Column("- dense at the hash MoE's time (paired)", "val_loss", "paired", 4,
                      hash_time[0])] if hash_time else []
    return T.loss_columns(names[0], extra), T.wall_times(runs)


def show_hash_bpe(runs, path):
    """As `hash`, with the runs' own times: a BPE step's cost beside a character step's is the shape's price."""
    return show_hash(runs, path)[0], T.wall_times(runs)


SHOW = {"default": show_default, "nanogpt": show_nanogpt, "hash": show_hash, "hash-why": show_hash,
        "hash-bpe": show_hash_bpe,
        "capacity-exposures": show_capacity_exposures,
        "ermoe": show_ermoe, "ermoe-search": show_ermoe, "balance": show_balance, "wallclock": show_wallclock,
        "crossover": show_wallclock,
        "crossover-top1": show_wallclock, "capacity": show_capacity, "routing": show_routing,
        "regularisers": show_regularisers, "regularisers-facts": show_regularisers, "collapse": show_collapse,
        "coupling": show_coupling, "specialization": show_specialization}


def tables(demo, runs, seeds, docs):
    """The demo's figure, table and notes from per-seed numbers -> (markdown, the JSON document)."""
    shown = SHOW[demo](runs, T.figure_path(docs, demo))
    columns, notes = shown[:2]
    bases = shown[2] if len(shown) > 2 else None   # per-row bases of '@row' columns (routing: each task's learned arm)
    if bases:
        md = render_per_row(runs, columns, bases)
    else:
        md = T.render(runs, columns)
    head = (f"`python course/demos.py {demo}`: seeds {seeds}; mean ± the half-width of the 95 % t interval over seeds "
            f"(paired columns: of the difference seed by seed, 'real' when it excludes 0); the numbers of the whole "
            f"val split (a task's whole table or fixed sample), layer means of the routing metrics. Per-seed "
            f"numbers: demo_{demo}.json.\n\n")
    doc = {"demo": demo, "command": f"python course/demos.py {demo}", "seeds": seeds,
           "columns": [c._asdict() for c in columns], "bases": bases, "runs": runs}
    return head + md + notes, doc


def render_per_row(runs, columns, bases):
    """T.render, where a paired column's base is '@row': each row's own base variant (itself: '–')."""
    lines = ["| variant | " + " | ".join(c.title for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for name in runs:
        cells = [T.cell(runs, name, c._replace(base=bases[name]) if c.base == "@row" else c) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    parser = ArgParser(prog="python course/demos.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", choices=[*DEMOS, "verdicts"], help="a demo, or 'verdicts': every paired comparison of "
                        "the docs' JSON files with Holm's correction (docs/verdicts.md)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 (0-2 where a demo says so)")
    parser.add_argument("--out_dir", default="out-demos")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"), help="where the figure, table and JSON go")
    parser.add_argument("--jobs", type=int, default=1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1),
                        help="runs at a time (default: 2 on a CPU, each with its share of the cores; 1 on a GPU)")
    parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--tables_only", action="store_true",
                        help="rebuild the table and figure from docs/demo_NAME.json, without training")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.docs):
        raise UserError(f"--docs={args.docs} is not a directory")
    if args.demo == "verdicts":
        md, n, kept = T.holm_table(args.docs)
        text = (f"Every paired comparison of the demos' tables ({n}), each a paired t test of its seeds; Holm's "
                f"step-down correction (1979) over all {n} at once: {kept} keep an adjusted p <= 0.05. Written by "
                f"`python course/demos.py verdicts` from docs/demo_*.json.\n\n" + md)
        with open(os.path.join(args.docs, "verdicts.md"), "w") as fh:
            fh.write(text)
        print(text)
        return
    args.seeds = args.seeds or list(range(DEMOS[args.demo].get("seeds", 5)))
    if min(args.seeds) < 0 or args.jobs < 1:
        raise UserError(f"seeds must be >= 0 and --jobs >= 1, got {args.seeds} and {args.jobs}")
    stem = os.path.join(args.docs, f"demo_{args.demo}")
    if args.tables_only:
        if not os.path.isfile(stem + ".json"):
            raise UserError(f"{stem}.json not found: run the demo first (python course/demos.py {args.demo})")
        with open(stem + ".json") as fh:
            doc = json.load(fh)
        runs, seeds = doc["runs"], doc["seeds"]
    else:
        variants, out_dir = DEMOS[args.demo]["variants"], os.path.abspath(args.out_dir)
        if callable(variants):  # measured on this machine first (wallclock, crossover, crossover-top1)
            variants = variants(out_dir)
        dirs = {name: [run_dir(out_dir, a, s) for s in args.seeds] for name, a in variants.items()}
        place = {(name, s): d for name in variants for s, d in zip(args.seeds, dirs[name])}
        if run_variants(variants, [], args.seeds, out_dir, args.dry, args.jobs, lambda n, s: place[n, s]) is None:
            return
        runs = {name: [T.numbers(final_eval(d), read_log(os.path.join(d, "log.jsonl"))) for d in dirs[name]]
                for name in variants}
        seeds = args.seeds
    md, doc = tables(args.demo, runs, seeds, args.docs)
    with open(stem + ".json", "w") as fh:  # --tables_only: the same runs, the columns as this code draws them
        json.dump(doc, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    print(md)
    print(f"wrote {stem}.md, {stem}.png and {stem}.json")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
