"""
The tools a user runs on runs and models, end to end: analyze, ablate, bench, corpus preparation,
and the compiled training step.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from losses import aux_losses
from model import GPT, GPTConfig
from router import ROUTERS as ROUTER_CLASSES
from tests.helpers import REPO, ROUTERS, TINY, cli, train

@pytest.mark.parametrize("args", [[], ["--losses", "--steps=1"], ["--model", "--steps=1"]])
def test_bench_smoke_runs(args):
    code, out, err = cli("bench", *args)
    assert code == 0, err[-2000:]
    assert {"": "vs compile", "--losses": "overhead", "--model": "MFU"}[args[0] if args else ""] in out


def test_triton_kernels_do_not_spill_on_h100():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--resources"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[0].endswith(("_fwd", "_bwd"))]
    assert len(rows) >= 20
    for row in rows:
        regs, stack, wide = int(row[-3]), int(row[-2]), row[-1]
        assert stack == 0 and regs <= 255 and wide == "yes", row
    assert "no spills" in res.stdout and "64-bit row offsets everywhere" in res.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_train_step_with_inductor(dtype):
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2))

    def step(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, ce, routes = model(idx, idx)
            aux, _ = aux_losses(routes, c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)
        return ce + aux

    idx = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(step, fullgraph=True)          # inductor, the default backend
    loss = compiled(idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(idx)
    eager.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    assert torch.allclose(loss, eager, **tol)
    assert all(torch.allclose(a, p.grad, **tol) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("router", ROUTERS)
def test_analyze_writes_every_plot_for_every_router(tmp_path, router):
    import matplotlib.image
    from support.rundir import read_log
    out = tmp_path / router
    train(out, "config/synthetic.py", "--vocab_size=256", "--max_iters=2", "--eval_interval=2", f"--router={router}")
    code, stdout, err = cli("tools.analyze", out)
    assert code == 0, err
    for name in ("loss", "expert_load", "load_history", "routing_curves", "expert_cosine", "transitions", "tokens",
                 "router"):
        assert f"{name}.png" in stdout
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name
    assert "tokens.png" in (out / "index.html").read_text()
    layers = read_log(out / "log.jsonl")[-1]["layers"]
    assert all("source_nmi" in m for m in layers)
    own = set(ROUTER_CLASSES[router](GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_experts=4,
                                               router=router)).metrics())
    assert own <= set(layers[0])  # the router's own metrics reach the log (and the curves)


@pytest.mark.parametrize("demo", ["collapse", "coupling", "specialization"])
def test_demo_tables_and_figures_from_finished_runs(tmp_path, demo):
    """demos.py on runs that are already finished (copies of one real tiny run's log, with known val
    losses): it trains nothing, and its table holds each variant's mean ± half-spread over the seeds."""
    from course import demos
    from support.rundir import read_log
    train(tmp_path / "real", "config/synthetic.py", "--vocab_size=256", "--max_iters=2", "--eval_interval=2")
    records = read_log(tmp_path / "real" / "log.jsonl")
    variants = list(demos.DEMOS[demo]["variants"])
    for i, name in enumerate(variants):
        for seed in (0, 1):
            where = demos.run_dir(tmp_path / "runs" / demo, name, seed)
            os.makedirs(where)
            with open(os.path.join(where, "log.jsonl"), "w") as fh:
                for r in records:
                    fh.write(json.dumps({**r, "val_loss": 1 + 0.1 * i + 0.01 * seed} if "val_loss" in r else r) + "\n")
    (tmp_path / "docs").mkdir()
    code, out, err = cli("course.demos", demo, "--seeds", "0", "1", "--out_dir", tmp_path / "runs", "--docs", tmp_path / "docs")
    assert code == 0, err
    assert out.count("already done") == 2 * len(variants)
    table = (tmp_path / "docs" / f"demo_{demo}.md").read_text()
    for i, name in enumerate(variants):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[1] == f"{1 + 0.1 * i + 0.005:.3f} ± 0.005", row
    assert "nan" not in table
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "docs" / f"demo_{demo}.png")
    assert image.shape[0] > 100 and image.std() > 0


def test_ablation_harness_dry_run_has_every_router():
    code, out, err = cli("tools.ablate", "--quick", "--dry")
    assert code == 0, err
    cmds = out.strip().splitlines()
    from tools.ablate import VARIANTS
    assert len(cmds) == len(VARIANTS) * 2 and all("train.py config/synthetic.py" in c for c in cmds)
    for name in ROUTERS[1:]:  # every router of the registry is a row (hash: the no-learning baseline)
        assert sum(f"--router={name}" in c for c in cmds) >= 2, name
    assert sum("--n_experts=0" in c for c in cmds) == 2


def stream_corpus(path, megabytes):
    """A generated corpus: Shakespeare's text repeated with a counter, `megabytes` MB."""
    base = open(os.path.join(REPO, "data", "shakespeare", "input.txt")).read()
    with open(path, "w") as fh:
        for i in range(int(megabytes * 1e6 / len(base)) + 1):
            fh.write(f"Part {i}.\n" + base)


PEAK_RSS = """
import resource, sys
sys.argv = ["tools/prepare.py", *sys.argv[1:]]
import runpy
try:
    runpy.run_path("tools/prepare.py", run_name="__main__")
except SystemExit:
    pass
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_prepare_streams_equals_a_one_shot_encoding_with_flat_memory_and_is_atomic(tmp_path):
    from support.data import gpt2_encoding, load_split, prepare
    names = [f"stream-test-{os.getpid()}-{i}" for i in range(3)]
    try:
        stream_corpus(tmp_path / "small.txt", 2)
        stream_corpus(tmp_path / "large.txt", 10)
        peaks = []
        for name, src in zip(names, ("small.txt", "large.txt")):
            res = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / src), name, "--workers=2"],
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0 and "peak" in res.stdout, res.stderr[-2000:]
            peaks.append([int(v) for v in res.stdout.split("peak")[1].split()])
        text = open(tmp_path / "small.txt").read()
        folder = prepare(names[0])
        stream = np.concatenate([load_split(folder, "train"), load_split(folder, "val")])
        assert stream[-1] == 50256 and np.array_equal(stream[:-1], np.array(gpt2_encoding().encode_ordinary(text)))
        (main_small, worker_small), (main_large, worker_large) = peaks   # KiB: 5x the corpus, the same memory
        assert main_large - main_small < 30_000 and worker_large - worker_small < 30_000, peaks
        # kill -9 in the middle: nothing that loads is left behind
        proc = subprocess.Popen([sys.executable, "tools/prepare.py", str(tmp_path / "large.txt"), names[2],
                                 "--workers=2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
        proc.stderr.read(20)                                # it has started writing progress
        proc.kill()
        proc.wait()
        code, _, err = cli("train", *TINY, f"--dataset={names[2]}", f"--out_dir={tmp_path / 'run'}")
        assert code == 1 and "no prepared bins" in err and not (tmp_path / "run").exists()
    finally:
        import shutil
        for name in names:
            shutil.rmtree(os.path.join(REPO, "data", name), ignore_errors=True)
