"""
What the system tests share: the tiny run settings, an entry point run in this process, a run's
losses, file hashes (to show that a refused command changed nothing).
"""

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():  # the Triton kernels run in the interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one thread per worker (and the processes it starts),
    os.environ["OMP_NUM_THREADS"] = "1"     # or the workers' thread pools spin-wait on each other
    torch.set_num_threads(1)

# The conformance list: every router here passes every test parametrised by ROUTERS.
ROUTERS = ["softmax", "ermoe", "sigmoid", "hash", "cosine", "token_table"]

TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--n_experts=4", "--top_k=2", "--eval_iters=2", "--log_interval=1", "--num_samples=0", "--compile=False"]


def require(module, reason):
    """Import `module`, or skip the test (with the reason) only when it is not installed at all; an
    import that fails for any other reason fails the test."""
    import importlib
    import importlib.util
    import pytest
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {reason}")
    return importlib.import_module(module)


def cli(entry, *argv):
    """An entry point run in this process exactly as its __main__ runs it: (exit status, stdout, stderr).
    Any exception other than the handled ones propagates, i.e. fails the test (a traceback)."""
    import contextlib
    import importlib
    import io
    from support.rundir import cli as run_cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(importlib.import_module(entry).main, [str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def train(out_dir, *args):
    """train.py in this process with the tiny settings; asserts that it succeeded."""
    code, out, err = cli("train", f"--out_dir={out_dir}", *TINY, *args)
    assert code == 0, out[-2000:] + err
    return out


def train_subprocess(out_dir, *args, launcher=(sys.executable,), timeout=300, **kw):
    cmd = [*launcher, os.path.join(REPO, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def train_losses(out_dir):
    from support.rundir import read_log
    return {r["iter"]: r["train_loss"] for r in read_log(os.path.join(out_dir, "log.jsonl"))
            if "train_loss" in r and "val_loss" not in r}


def file_hashes(*dirs):
    import hashlib
    return {os.path.join(root, name): hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for d in dirs for root, _, names in os.walk(d) for name in names}


def assert_loadable_and_finite(out_dir):
    from support.rundir import all_finite, load_checkpoint, read_log
    ckpt = load_checkpoint(str(out_dir))
    assert all_finite(ckpt["model"].values())
    read_log(os.path.join(out_dir, "log.jsonl"))
    return ckpt


def settings_of(*argv):
    """train.py's resolved settings for a command line, without training."""
    import train
    settings, _ = train.setup(["--device=cpu", *argv])
    return settings.build(train.TrainConfig, train.FamilyConfig)
