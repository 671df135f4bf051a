"""
Short runs recorded before a refactor, replayed after it: every router, every family config and the
switches the course compares train 20 steps of the tiny shape, and each training loss and the final
val loss must equal the numbers in tests/recorded_runs.json, recorded by the code of an earlier commit
(its "commit" field). A change that moves any of them changed what a user's run computes.

    python tests/test_recorded_runs.py --record    # rewrite the file (only when a change is meant to)

Exact equality holds on one machine and torch version (one thread, fixed seeds, deterministic CPU
kernels); the file records the torch version, and on another one the test compares to 1e-5 instead.
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import REPO, TINY, cli, train_losses  # noqa: E402  (first: it sets TRITON_INTERPRET)
from families import ROUTERS  # noqa: E402  (the registry with the course's token table)

RECORDED = os.path.join(REPO, "tests", "recorded_runs.json")
STEPS = ["--max_iters=20", "--eval_interval=20", "--seed=3"]
TINY_MOE = [a for a in TINY if not a.startswith(("--n_experts=", "--top_k="))]  # a family keeps its own E and k
FAMILIES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "config", "families", "*.py")))

CASES = {
    **{f"router={r}": [*TINY, f"--router={r}"] for r in ROUTERS},
    **{f"family={f}": [f"config/families/{f}.py", *TINY_MOE] for f in FAMILIES},
    "dense": [*TINY, "--n_experts=0"],
    "nanoGPT's network": [*TINY, "--n_experts=0", "--pos_emb=learned", "--mlp=gelu", "--norm=layernorm"],
    "naive dispatch": [*TINY, "--dispatch=naive"],
    "shared expert": [*TINY, "--n_shared=1"],
    "no regularisers": [*TINY, "--c_sp=0.0", "--c_cp=0.0"],
    "select bias": [*TINY, "--select_bias=True", "--c_lb=0.0"],
}


def run(name, out_dir):
    """-> {iter: training loss} and the final val loss of the case's run."""
    from support.rundir import read_log
    torch.set_num_threads(1)
    args = [a if a.startswith("--") else os.path.join(REPO, a) for a in CASES[name]]
    code, out, err = cli("train", f"--out_dir={out_dir}", *args, *STEPS)
    assert code == 0, out[-2000:] + err
    log = read_log(os.path.join(out_dir, "log.jsonl"))
    val = [r["val_loss"] for r in log if "val_loss" in r]
    return {"train": {str(i): loss for i, loss in train_losses(out_dir).items()}, "val": val[-1]}


@pytest.mark.parametrize("name", list(CASES))
def test_a_recorded_short_run_gives_the_same_losses(name, tmp_path):
    recorded = json.load(open(RECORDED))
    assert set(recorded["runs"]) == set(CASES), "a case was added or removed: record again (module docstring)"
    got, want = run(name, tmp_path), recorded["runs"][name]
    assert list(got["train"]) == list(want["train"])
    if recorded["torch"] == str(torch.__version__):
        assert got == want, (got, want)
    else:
        assert got["train"] == pytest.approx(want["train"], rel=1e-5) and \
            got["val"] == pytest.approx(want["val"], rel=1e-5)


def record():
    import subprocess
    import tempfile
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    runs = {}
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            runs[name] = run(name, tmp)
        print(f"{name}: val {runs[name]['val']:.4f}", flush=True)
    with open(RECORDED, "w") as f:
        json.dump({"commit": commit.stdout.strip(), "torch": str(torch.__version__), "steps": STEPS, "runs": runs},
                  f, indent=1)
        f.write("\n")
    print(f"wrote {RECORDED} ({len(runs)} runs)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_recorded_runs.py --record")
    record()
