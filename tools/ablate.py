"""
Ablation harness: the same data, seeds and steps for every routing variant, then one markdown
table and overlay plots.

    python tools/ablate.py --quick                     # synthetic task, 2 seeds, < 15 min on 2 CPU cores
    python tools/ablate.py --seeds 0 1 2               # the synthetic task at config/synthetic.py's length
    python tools/ablate.py --dataset=shakespeare --max_iters=300   # the CPU preset on tiny Shakespeare
    python tools/ablate.py --quick --dry               # print the commands only

Each run is `train.py` in its own out_dir (out_dir/<variant>-s<seed>); a run whose log already
ends with its final evaluation is not run again, so an interrupted ablation picks up where it
stopped. Writes out_dir/ablation.md and out_dir/ablation.png.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: train.py is there
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from families import ROUTERS  # noqa: E402  (the registry with the course's token table)
from support.data import DATA_DIR, source_of  # noqa: E402
from support.plots import plt  # noqa: E402
from support.tasks import TASKS  # noqa: E402
from support.rundir import ArgParser, UserError, cli, read_log  # noqa: E402
from support.stats import interval  # noqa: E402

VARIANTS = {  # name -> train.py overrides; the defaults are c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3
    "dense": ["--n_experts=0"],
    "softmax + L_z, no L_lb": ["--c_lb=0.0", "--c_sp=0.0", "--c_cp=0.0"],
    "softmax + L_lb + L_z": ["--c_sp=0.0", "--c_cp=0.0"],
    "+ R_sp": ["--c_cp=0.0"],
    "+ R_cp": ["--c_sp=0.0"],
    "+ R_sp + R_cp": [],
    # every other router of the registry, with its own default coefficients and no regulariser
    **{name: [f"--router={name}", "--c_sp=0.0", "--c_cp=0.0"] for name in ROUTERS if name != "softmax"},
    "ermoe + R_sp + R_cp": ["--router=ermoe"],
}
QUICK = ["--max_iters=300", "--eval_interval=50", "--eval_iters=4", "--batch_size=8", "--block_size=64",
         "--n_layer=3", "--log_interval=50"]
COLUMNS = [("val_loss", "val loss", "{:.3f}"), ("cv", "load CV", "{:.3f}"), ("dead", "dead", "{:.1f}"),
           ("entropy_norm", "entropy/logE", "{:.3f}"), ("coact_cos2", "co-act cos²", "{:.4f}"),
           ("coact_floor", "co-act cos² × f", "{:.2f}"),
           ("next_nmi", "NMI l→l+1", "{:.3f}"), ("source_nmi", "NMI(expert, source)", "{:.3f}")]
SKIP = {"load", "entropy", "max_mean", "next_cond_entropy", "topk_mass", "logit_top"}  # lists, or shown another way


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_dir(out_dir, name, seed):
    """Where the run of one variant and seed lives."""
    return os.path.join(out_dir, f"{slug(name)}-s{seed}")


def final_eval(run_dir):
    """The last evaluation record of a finished run, or None."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    evals = [r for r in read_log(path) if "val_loss" in r]
    return evals[-1] if evals and evals[-1].get("final") else None


def final(record):
    """The numbers of a finished run's last evaluation: those of the whole val split (or a task's whole
    table or fixed sample), which every table here reports."""
    return record.get("whole") or record


def score(record):
    return final(record)["val_loss"]


def summarise(record):
    """Per-run numbers: val loss, layer means of every numeric routing metric (dead experts summed),
    so a router's own metrics (ERMoE's beta, the sigmoid router's bias range, ...) come along."""
    numbers = final(record)
    out = {"val_loss": numbers["val_loss"], **({"bits": numbers["bits"]} if "bits" in numbers else {})}
    layers = numbers.get("layers") or []
    keys = {k for m in layers for k, v in m.items() if isinstance(v, (int, float)) and k not in SKIP}
    for key in sorted(keys):
        vals = [m[key] for m in layers if key in m]
        out[key] = float(np.sum(vals) if key == "dead" else np.mean(vals))
    if not out.get("dropped"):  # dropless runs: no column of zeros
        out.pop("dropped", None)
    return out


def columns(results):
    """(key, title, format) of every column the table shows: the known metrics, then the routers' own."""
    known = {key for key, _, _ in COLUMNS}
    extra = sorted({k for runs in results.values() for r in runs for k in r} - known)
    cols = [c for c in COLUMNS if any(c[0] in r for runs in results.values() for r in runs)]
    return cols + [(k, k, "{:.3g}") for k in extra]


def table(results, seeds):
    """Markdown: mean over seeds ± the half-width of its 95 % t interval (support/stats.py)."""
    cols = columns(results)
    lines = ["| variant | " + " | ".join(title for _, title, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, runs in results.items():
        cells = []
        for key, _, fmt in cols:
            vals = [r[key] for r in runs if key in r]
            if not vals:
                cells.append("–")
                continue
            mean, half = interval(vals)
            cell = fmt.format(mean) + (" ± " + fmt.format(half) if len(vals) > 1 else "")
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nmean over seeds {seeds} ± the half-width of its 95 % t interval; " \
        "metrics are layer means (dead experts: summed over layers) at the final evaluation.\n"


def overlay(out_dir, names, seeds, path):
    runs = {}
    for name in names:
        logs = [os.path.join(run_dir(out_dir, name, seed), "log.jsonl") for seed in seeds]
        runs[name] = [[(r["iter"], summarise({k: v for k, v in r.items() if k != "whole"}))  # the curves: fixed batches
                       for r in read_log(log) if "val_loss" in r]
                      for log in logs if os.path.exists(log)]
    keys = [(k, t) for k, t in (("val_loss", "val loss"), ("cv", "load CV"),
                                ("entropy_norm", "routing entropy / log E"),
                                ("next_nmi", "NMI(layer l, l+1)"), ("source_nmi", "NMI(expert, source)"))
            if any(k in m for curves in runs.values() for c in curves for _, m in c)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    for i, (name, curves) in enumerate(runs.items()):
        if not curves:
            continue
        for (key, title), ax in zip(keys, axes):
            pts = [(it, np.mean([c[i][1][key] for c in curves if i < len(c) and key in c[i][1]]))
                   for i, (it, m) in enumerate(curves[0]) if key in m]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=plt.get_cmap("tab20")(i % 20), label=name)  # > 10 variants
            ax.set(title=title, xlabel="iter")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_variants(variants, base, seeds, out_dir, dry=False, jobs=1, place=None):
    """Run `train.py *base *overrides` for every variant and seed, `jobs` at a time (each with its
    share of the cores), in place(name, seed) (default out_dir/<variant>-s<seed>); a finished run
    is kept. -> {variant: [summarise(final evaluation) per seed]}"""
    place = place or (lambda name, seed: run_dir(out_dir, name, seed))
    todo = []
    for name in variants:
        for seed in seeds:
            where = place(name, seed)
            cmd = [sys.executable, "train.py", *base, f"--out_dir={where}", f"--seed={seed}", *variants[name]]
            if dry:
                print(" ".join(cmd))
            elif final_eval(where):
                print(f"{name}, seed {seed}: already done")
            else:
                todo.append((name, seed, where, cmd + ["--overwrite=True"]))  # an unfinished run starts over
    if dry:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    t0, running, n = time.time(), [], len(todo)
    while todo or running:
        while todo and len(running) < jobs:
            name, seed, where, cmd = todo.pop(0)
            out = tempfile.TemporaryFile("w+")
            running.append((name, seed, where, cmd, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out,
                                                                     text=True), out))
        time.sleep(0.2)
        for job in [j for j in running if j[4].poll() is not None]:
            running.remove(job)
            name, seed, where, cmd, proc, out = job
            out.seek(0)
            if proc.returncode != 0:
                last = ([line for line in out.read().splitlines() if line.strip()] or ["(no output)"])[-1]
                raise UserError(f"run '{name}' seed {seed} failed ({' '.join(cmd[1:])}): {last}")
            done = n - len(todo) - len(running)
            eta = (time.time() - t0) / done * (n - done) / min(jobs, max(n - done, 1)) * min(jobs, n)
            print(f"[{done}/{n}] {name}, seed {seed}: val loss {score(final_eval(where)):.4f} "
                  f"({time.time() - t0:.0f} s so far, eta {eta / 60:.1f} min)", flush=True)
    return {name: [summarise(final_eval(place(name, s))) for s in seeds] for name in variants}


def main(argv):
    parser = ArgParser(prog="python tools/ablate.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs of a smaller model (< 15 min on 2 cores)")
    parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dataset", default="synthetic", help="synthetic (config/synthetic.py) or a text dataset")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="a subset of the variant names")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with its share of the cores")
    args, extra = parser.parse_known_args(argv)  # anything else goes to every train.py run
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if min(args.seeds) < 0:
        raise UserError(f"seeds must be >= 0, got {args.seeds}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.dataset not in TASKS and source_of(args.dataset)[0] is None and \
            not os.path.isfile(os.path.join(DATA_DIR, args.dataset, "meta.json")):
        raise UserError(f"dataset '{args.dataset}': no data/{args.dataset}/input.txt, no prepared bins, and not a task")
    bad = [a for a in extra if not a.startswith("--") or "=" not in a]
    if bad:
        raise UserError(f"arguments for train.py must be --key=value, got {bad}")
    out_dir = args.out_dir or f"out-ablation-{args.dataset}{'-quick' if args.quick else ''}"
    base = ["config/synthetic.py"] if args.dataset == "synthetic" else [f"--dataset={args.dataset}"]
    base += (QUICK if args.quick else []) + ["--num_samples=0"] + extra

    results = run_variants({name: VARIANTS[name] for name in args.variants}, base, args.seeds, out_dir, args.dry,
                           args.jobs)
    if args.dry:
        return
    md = table(results, args.seeds)
    header = f"Ablation on `{args.dataset}`{' (quick)' if args.quick else ''}: train.py {' '.join(base)}\n\n"
    with open(os.path.join(out_dir, "ablation.md"), "w") as fh:
        fh.write(header + md)
    with open(os.path.join(out_dir, "ablation.json"), "w") as fh:  # the per-seed numbers of every cell
        json.dump({"command": f"python tools/ablate.py {' '.join(argv)}", "seeds": args.seeds,
                   "columns": [{"key": k, "title": t, "format": f} for k, t, f in columns(results)],
                   "runs": results}, fh, indent=1)
    overlay(out_dir, args.variants, args.seeds, os.path.join(out_dir, "ablation.png"))
    print(header + md)
    print(f"wrote {out_dir}/ablation.md, ablation.json and ablation.png")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
