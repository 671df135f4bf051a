"""
Why ERMoE's experts died on text, measured (docs/design.md §2): one run of the default text task with
ERMoE in its earlier form (experts reading r = d/E = 16 coordinates, the coupling loss on), evaluated
every 50 steps, then
its logged routing read back and one batch's gradients taken from its last checkpoint.

    python course/ermoe_collapse.py                 # ~5 min on 2 cores: the run, docs/ermoe_collapse.png and .json
    python course/ermoe_collapse.py --seed 1 --out_dir out-collapse-s1

What it shows, per MoE layer: each expert's load over training (the dead ones: below 0.1/E), each
expert's mean cosine score s_te = ||P_e^T x_t|| / ||x_t|| over the evaluation tokens (logit / beta),
beta and the mean top-1 cosine, and at the end the gradient that the language-model loss alone sends
to each expert's basis, against the expert's load: an expert that no token selects gets none.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from support.plots import plt  # noqa: E402
from support.rundir import ArgParser, UserError, cli, load_checkpoint, read_log  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = ["config/ermoe.py", "--ermoe_input=coords", "--ermoe_rank=16", "--select_bias=False", "--num_samples=0",
          "--eval_interval=50"]


def basis_gradients(out_dir):
    """From the run's last checkpoint: the norm of the language-model loss's gradient (no auxiliary loss)
    on each expert's basis, and each expert's share of the (token, expert) pairs, on 8 training batches."""
    from families import from_checkpoint
    from support.data import open_dataset
    ckpt = load_checkpoint(out_dir)
    model = from_checkpoint(ckpt["model_args"])[1]
    model.load_state_dict(ckpt["model"])
    data = open_dataset("shakespeare_char", model.config.vocab_size, False)
    gen = torch.Generator().manual_seed(0)
    loads = []
    for _ in range(8):
        X, Y, _ = data.batch("train", 12, model.config.block_size, gen, "cpu")
        _, loss, routes = model(X, Y)
        loss.backward()
        loads.append(torch.stack([r.counts.double() / r.counts.sum() for r in routes]))  # (L, E)
    grads = [r.raw.grad.flatten(1).norm(dim=1).tolist() for r in model.routers()]          # (L, E)
    return grads, torch.stack(loads).mean(0).tolist()


def figure(log, grads, loads, path):
    evals = [r for r in log if r.get("layers") and "val_loss" in r and "whole" not in r]
    L, E = len(evals[-1]["layers"]), len(evals[-1]["layers"][0]["load"])
    its = [r["iter"] for r in evals]
    fig, axes = plt.subplots(4, L, figsize=(3.6 * L, 11), squeeze=False)
    for layer in range(L):
        load = np.array([r["layers"][layer]["load"] for r in evals]) * E               # (evals, E)
        beta = np.array([r["layers"][layer]["beta"] for r in evals])
        score = np.array([r["layers"][layer]["logit_mean"] for r in evals]) / beta[:, None]  # (evals, E) mean s
        dead = load[-1] < 0.1
        for e in range(E):
            style = dict(color="tab:red" if dead[e] else "tab:blue", lw=1.5 if dead[e] else 0.8)
            axes[0, layer].plot(its, load[:, e], **style)
            axes[1, layer].plot(its, score[:, e], **style)
        axes[0, layer].set(title=f"layer {layer}: load x E (red: dead at the end)", ylim=(0, None))
        axes[1, layer].set(title="mean cosine to each subspace")
        axes[2, layer].plot(its, beta, "k-", label="beta")
        axes[2, layer].plot(its, np.array([r["layers"][layer]["logit_top"] for r in evals]) / beta * 10, "g-",
                            label="top-1 cosine x 10")
        axes[2, layer].legend(fontsize=7)
        axes[3, layer].scatter(np.array(loads[layer]) * E, grads[layer],
                               c=["tab:red" if d else "tab:blue" for d in dead])
        axes[3, layer].set(xlabel="load x E (8 batches)", ylabel="|grad of the LM loss| on P_e", title="at the end")
    for ax in axes[:3].flat:
        ax.set_xlabel("iter")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    parser = ArgParser(prog="python course/ermoe_collapse.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="out-ermoe-collapse")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"))
    args = parser.parse_args(argv)
    if not os.path.isdir(args.docs):
        raise UserError(f"--docs={args.docs} is not a directory")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not (os.path.exists(log_path) and any(r.get("final") for r in read_log(log_path))):
        cmd = [sys.executable, "train.py", *BEFORE, f"--seed={args.seed}", f"--out_dir={os.path.abspath(args.out_dir)}",
               "--overwrite=True"]
        print(" ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            raise UserError("the run failed (its error line is above)")
    log = read_log(log_path)
    grads, loads = basis_gradients(args.out_dir)
    path = os.path.join(args.docs, "ermoe_collapse.png")
    figure(log, grads, loads, path)
    final = [r for r in log if r.get("final")][-1]
    summary = {"command": f"python course/ermoe_collapse.py --seed {args.seed}", "seed": args.seed,
               "dead_per_layer": [m["dead"] for m in final["layers"]],
               "basis_grad_norm": grads, "load": loads,
               "evaluations": [{"iter": r["iter"], "layers": [{k: m[k] for k in ("load", "beta", "logit_mean",
                                                                                  "logit_top", "dead", "topk_mass")
                                                                       if k in m}
                                                               for m in r["layers"]]}
                               for r in log if r.get("layers") and "val_loss" in r]}
    with open(os.path.join(args.docs, "ermoe_collapse.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    for layer, (g, ld) in enumerate(zip(grads, loads)):
        print(f"layer {layer}: " + ", ".join(f"expert {e}: load {x * len(g):.2f}, |grad P| {v:.2e}" for e, (v, x) in
                                             enumerate(zip(g, ld))))
    print(f"wrote {path} and {os.path.join(args.docs, 'ermoe_collapse.json')}")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
