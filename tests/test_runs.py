"""
Runs end to end, the way a user starts them: the command line, --help, resume, crashes (kill -9,
Ctrl-C, NaN), locks, and every bad input ending in one `error:` line with the files unchanged. The
references: an uninterrupted run of the same settings (a resumed run's losses equal to the bit), the
files' hashes before the command (a refused command changes nothing), and the widths by the iso-compute
formula worked by hand.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

# first: tests.helpers sets TRITON_INTERPRET before triton loads
from tests.helpers import (REPO, ROUTERS, TINY, assert_loadable_and_finite, cli, file_hashes, require, settings_of,
                           train, train_losses, train_subprocess)
from losses import aux_losses
from model import GPT, GPTConfig


@pytest.mark.parametrize("router", ROUTERS)
def test_bad_input_for_every_router_is_one_error_line(router, tmp_path):
    for args, message in ((["--top_k=5"], "top_k must be in [1, n_experts=4]"),
                          (["--n_embd=30", "--n_head=4"], "must be divisible by n_head"),
                          (["--capacity_factor=-1.0"], "capacity_factor must be >= 0")):
        code, out, err = cli("train", f"--out_dir={tmp_path}", *TINY, f"--router={router}", *args)
        assert code == 1 and err.strip().splitlines() == [err.strip()] and message in err, (args, err)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("router", ROUTERS)
def test_tiny_model_loss_falls(router):
    from support.data import get_batch, load_split, prepare
    data = load_split(prepare("shakespeare"), "train")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, n_experts=4, top_k=2, router=router))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    X, Y = get_batch(data, 8, 32, gen, "cpu")  # one fixed batch: the loss must fall on it
    losses = []
    for _ in range(30):
        _, ce, routes = model(X, Y)
        aux, _ = aux_losses(routes, dict(c_lb=0.01))
        (ce + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(ce.item())
    assert losses[-1] < losses[0] - 2.0, losses


@pytest.mark.parametrize("router", ROUTERS)
def test_resume_restores_settings_and_continues_exactly(tmp_path, router):
    common = [f"--router={router}", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8", "--warmup_iters=2",
              "--dataset=synthetic", "--vocab_size=64"]
    train(tmp_path / "full", "--max_iters=8", *common)
    train(tmp_path / "half", "--max_iters=4", *common)
    # only what may change: every other setting (router, dataset, sizes...) comes from the checkpoint
    code, out, err = cli("train", f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=8")
    assert code == 0, err
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "half")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[i] == b[i] for i in range(1, 9)), (a, b)
    for name in ("ckpt.pt", "log.jsonl", "loss.png", "expert_load.png"):
        assert (tmp_path / "half" / name).stat().st_size > 0


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A finished tiny Shakespeare run, a finished synthetic run, and spare files for bad inputs."""
    root = tmp_path_factory.mktemp("runs")
    train(root / "run", "--max_iters=2", "--eval_interval=2")
    train(root / "synth", "--max_iters=1", "--dataset=synthetic", "--vocab_size=64")
    (root / "a_file").write_text("not a directory")
    (root / "syntax.py").write_text("n_layer = 4\nbatch_size = = 3\n")
    (root / "raises.py").write_text("n_layer = 4\nbatch_size = 1 / 0\n")
    (root / "adir.py").mkdir()
    (root / "broken_tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    for name, extra in (("nokeys", None), ("mismatch", None), ("badlog", None), ("keyless", None), ("nondict", None)):
        import shutil
        shutil.copytree(root / "run", root / name)
    ckpt = torch.load(root / "run" / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, root / "nokeys" / "ckpt.pt")
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "n_embd": 64, "n_head": 4}}, root / "mismatch" / "ckpt.pt")
    with open(root / "badlog" / "log.jsonl", "r+") as fh:
        lines = fh.readlines()
        fh.seek(0)
        fh.writelines(lines[:1] + ["{not json\n"] + lines[1:])
    with open(root / "keyless" / "log.jsonl", "a") as fh:
        fh.write('{"val_loss": 1.0}\n')
    with open(root / "nondict" / "log.jsonl", "a") as fh:
        fh.write("[1, 2, 3]\n")
    os.makedirs(root / "ablation" / "dense-s0")
    (root / "ablation" / "dense-s0" / "log.jsonl").write_text('{"iter": 0}\n{"iter": 1, oops\n{"iter": 2}\n')
    return root


BAD_INPUTS = [  # (entry point, arguments; RUN = a finished run, R = the fixture's folder), what the error names
    ("train", ["--log_interval=0"], "log_interval must be >= 1"),
    ("train", ["--eval_interval=0"], "eval_interval must be >= 1"),
    ("train", ["--eval_iters=0"], "eval_iters must be >= 1"),
    ("train", ["--batch_size=0"], "batch_size must be >= 1"),
    ("train", ["--gradient_accumulation_steps=-1"], "gradient_accumulation_steps must be >= 0"),
    ("train", ["--n_head=0"], "n_head must be >= 1"),
    ("train", ["--n_embd=-8"], "n_embd must be >= 1"),
    ("train", ["--block_size=0"], "block_size must be >= 1"),
    ("train", ["--vocab_size=0"], "vocab_size must be >= 1"),
    ("train", ["--expert_hidden=-1"], "expert_hidden must be >= 0"),
    ("train", ["--router=ermoe", "--ermoe_rank=-1"], "ermoe_rank must be >= 0"),
    ("train", ["--router=ermoe", "--ermoe_rank=33"], "ermoe_rank must be <= n_embd"),
    ("train", ["--router=ermoe", "--ermoe_basis=spherical"], "unknown ermoe_basis 'spherical'"),
    ("train", ["--router=ermoe", "--ermoe_basis=partitioned", "--ermoe_rank=16"], "partitioned needs"),
    ("train", ["--router=topk"], "unknown router 'topk'"),
    ("train", ["--top_k=5"], "top_k must be in [1, n_experts=4]"),
    ("train", ["--n_embd=30", "--n_head=4"], "must be divisible by n_head"),
    ("train", ["--learning_rate=-1"], "learning_rate must be a finite number >= 0"),
    ("train", ["--learning_rate=1e309"], "learning_rate must be a finite number >= 0, got inf"),
    ("train", ["--min_lr=0.1", "--learning_rate=0.01"], "min_lr (0.1) must be <= learning_rate"),
    ("train", ["--learning_rate=1e38"], "overflows float32 in AdamW's first step"),
    ("train", ["--beta1=1.0"], "beta1 and beta2 must be < 1"),
    ("train", ["--beta2=1.5"], "beta1 and beta2 must be < 1"),
    ("train", ["--dropout=1.5"], "dropout must be in [0, 1)"),
    ("train", ["--weight_decay=-1"], "weight_decay must be a finite number >= 0"),
    ("train", ["--c_lb=-0.01"], "c_lb must be a finite number >= 0"),
    ("train", ["--max_iters=-1"], "max_iters must be >= 0"),
    ("train", ["--seed=-1"], "seed must be >= 0"),
    ("train", ["--init_from=pretrained"], "init_from must be scratch, resume or auto"),
    ("train", ["--device=tpu"], "device must be auto, cpu, cuda or cuda:N"),
    ("train", ["--device=cuda"], "no CUDA device is available"),
    ("train", ["--dtype=float16"], "dtype must be auto, bfloat16 or float32"),
    ("train", ["--n_kv_head=3"], "n_kv_head (3) must divide n_head (2)"),
    ("train", ["--norm_eps=-1e-5"], "norm_eps must be in [0, 1)"),
    ("train", ["--rope_theta=0.0"], "rope_theta must be > 0"),
    ("train", ["--shared_gate=True"], "shared_gate needs shared experts"),
    ("train", ["--expert_init=pretrained"], "unknown expert_init 'pretrained'"),
    ("train", ["--router=hash", "--router_impl=triton"], "router=hash has no fused routing pass"),
    ("train", ["--hash_balanced=True"], "hash_balanced needs router=hash and a text dataset, got router=softmax"),
    ("train", ["--router=hash", "--hash_balanced=True", "--dataset=synthetic"], "hash_balanced needs router=hash"),
    ("train", ["--router_impl=triton", "TRITON_INTERPRET=0"], "router_impl=triton needs a CUDA device"),
    ("train", ["--n_experts=1000000"], "more than the"),
    ("train", ["--block_size=1000000"], "fewer than block_size+1"),
    ("train", ["--vocab_size=50"], "outside vocab_size=50"),
    ("train", ["--dataset=synthetic", "--vocab_size=8"], "synthetic needs vocab_size >= 16"),
    ("train", ["--dataset=no_such_corpus"], "dataset 'no_such_corpus': no text file"),
    ("train", ["--dataset=EMPTY"], "too little text"),
    ("train", ["--dataset="], "dataset is empty"),
    ("train", ["--out_dir="], "out_dir is empty"),
    ("train", ["--out_dir=R/a_file"], "is a file, not a directory"),
    ("train", ["--out_dir=/proc/nanomoe-test"], "cannot write to out_dir"),
    ("train", ["--bogus=1"], "unknown setting 'bogus'"),
    ("train", ["--n_layers=1"], "did you mean 'n_layer'?"),
    ("train", ["--batch_size=abc"], "setting 'batch_size' expects int"),
    ("train", ["--n_layer", "4"], "expected --key=value"),
    ("train", ["config/no_such_file.py"], "config file not found"),
    ("train", ["R/syntax.py"], "syntax.py line 2: invalid syntax"),
    ("train", ["R/raises.py"], "raises.py line 2 raised ZeroDivisionError"),
    ("train", ["R/adir.py"], "is a directory"),
    ("train", [], "already holds a run (ckpt.pt and log.jsonl)"),
    ("train", ["--init_from=resume", "--out_dir=R/synth"], "nothing to train"),
    ("train", ["--init_from=resume", "--max_iters=4", "--n_embd=64"], "--n_embd=64 differ from it (n_embd=32)"),
    ("train", ["--init_from=resume", "--max_iters=4", "--out_dir=R/nokeys"], "incomplete: missing optimizer"),
    ("train", ["--init_from=resume", "--max_iters=4", "--out_dir=R/mismatch"], "weights do not match"),
    ("train", ["--init_from=resume", "--max_iters=4", "--out_dir=R/badlog"], "log.jsonl line 2 is not JSON"),
    ("train", ["--init_from=resume", "--out_dir=R/a_dir_without_a_run"], "no checkpoint at"),
    ("sample", ["--device=cuda"], "no CUDA device is available"),
    ("sample", ["--top_k=-1"], "--top_k must be >= 0"),
    ("sample", ["--temperature=-1"], "--temperature must be a finite number >= 0"),
    ("sample", ["--start="], "--start is empty"),
    ("sample", ["--num_samples=0"], "--num_samples must be >= 1"),
    ("sample", ["--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    ("sample", ["--out_dir=R/synth", "--start=Hello"],
     "trained on a synthetic task (synthetic): its tokens are not text"),
    ("sample", ["--start=Größe"], "characters outside this model's alphabet: 'ßö'"),
    ("sample", ["--out_dir=R/nowhere"], "(train one with python train.py --out_dir="),
    ("tools.analyze", ["R/nondict"], "log.jsonl line 5 is not a log record"),
    ("tools.analyze", ["R/keyless"], "log.jsonl line 5 is not a log record"),
    ("tools.analyze", ["R/nowhere"], "no run directory"),
    ("tools.analyze", ["R/a_file"], "no run directory"),
    ("tools.analyze", ["RUN", "extra"], "unrecognized arguments: extra"),
    ("tools.ablate", ["--out_dir=R/ablation", "--variants", "dense", "--seeds", "0"],
     "dense-s0/log.jsonl line 2 is not JSON"),
    ("tools.ablate", ["--variants", "nonsense"], "unknown variant(s) ['nonsense']"),
    ("tools.ablate", ["--seeds", "-1", "--dry"], "seeds must be >= 0"),
    ("tools.ablate", ["--dataset=no_such_corpus"], "no data/no_such_corpus/input.txt, no prepared bins"),
    ("tools.prepare", ["R/nowhere.txt", "x"], "nowhere.txt does not exist"),
    ("tools.prepare", ["R/syntax.py", "a/b"], "NAME must be a plain folder name"),
    ("tools.prepare", ["R/syntax.py", "x", "--val_fraction=1.5"], "--val_fraction must be in (0, 1)"),
    ("tools.prepare", ["R/syntax.py", "x", "--tokenizer=R/none.json"], "tokenizer R/none.json not found"),
    ("tools.prepare", ["R/syntax.py", "x", "--tokenizer=R/broken_tokenizer.json"],
     "cannot read tokenizer R/broken_tokenizer.json"),
    ("tools.convert", ["to-hf", "RUN", "R/a_file"], "is a file, not a directory"),
    ("bench", ["--steps=0"], "--reps and --steps must be >= 1"),
    ("bench", ["--reps=0"], "--reps and --steps must be >= 1"),
    ("bench", ["--bw=-1"], "--bw must be a positive bandwidth"),
    ("bench", ["--resources"], "run it with TRITON_INTERPRET=0"),
]


def test_every_bad_input_gives_one_error_line_and_changes_nothing(finished_runs, monkeypatch):
    root = finished_runs
    empty = os.path.join(REPO, "data", f"empty-{os.getpid()}")
    os.makedirs(empty)
    open(os.path.join(empty, "input.txt"), "w").close()
    try:
        for entry, args, message in BAD_INPUTS:
            argv = [a.replace("R/", f"{root}/").replace("EMPTY", os.path.basename(empty)) for a in args
                    if not a.startswith("TRITON_INTERPRET")]
            argv = [str(root / "run") if a == "RUN" else a for a in argv]
            message = message.replace("R/", f"{root}/")
            if entry in ("train", "sample") and not any(a.startswith("--out_dir") for a in argv):
                argv.append(f"--out_dir={root / 'run'}")
            if entry == "train" and "--init_from=resume" not in argv:  # a resumed run takes the saved settings
                argv = [*TINY, *argv]
            with monkeypatch.context() as m:
                m.setenv("TRITON_INTERPRET", "0" if "TRITON_INTERPRET=0" in args else "1")
                before = file_hashes(root, empty)
                code, out, err = cli(entry, *argv)
                after = file_hashes(root, empty)
            lines = err.strip().splitlines()
            assert code != 0 and lines and lines[-1].startswith("error:"), (entry, args, out[-500:], err)
            assert message in lines[-1], (entry, args, lines[-1])
            assert len(lines) == 1, (entry, args, err)
            assert before == after, (entry, args, set(before.items()) ^ set(after.items()))
    finally:
        import shutil
        shutil.rmtree(empty)
    assert len(BAD_INPUTS) >= 40


def test_a_damaged_meta_json_is_one_error_line_and_deleting_it_prepares_again(tmp_path):
    name = f"damaged-{os.getpid()}"
    folder = os.path.join(REPO, "data", name)
    os.makedirs(folder)
    try:
        with open(os.path.join(folder, "input.txt"), "w") as fh:
            fh.write(open(os.path.join(REPO, "data", "shakespeare", "input.txt")).read()[:20000])
        train(tmp_path / "first", f"--dataset={name}", "--max_iters=0")
        with open(os.path.join(folder, "meta.json"), "r+") as fh:
            fh.truncate(10)                              # half a file, newer than input.txt
        before = file_hashes(folder)
        code, out, err = cli("train", *TINY, f"--out_dir={tmp_path / 'second'}", f"--dataset={name}", "--max_iters=0")
        assert code == 1 and err.count("\n") == 1 and "meta.json is not JSON" in err, err
        assert file_hashes(folder) == before and not (tmp_path / "second").exists()
        os.remove(os.path.join(folder, "meta.json"))
        train(tmp_path / "second", f"--dataset={name}", "--max_iters=0")
    finally:
        import shutil
        shutil.rmtree(folder)


@pytest.mark.parametrize("entry, args, message", [
    ("train.py", ["--batch_size=0"], "batch_size must be >= 1"),
    ("sample.py", ["--out_dir=/nonexistent"], "no checkpoint at /nonexistent/ckpt.pt"),
    ("tools/analyze.py", ["/nonexistent"], "no run directory /nonexistent"),
])
def test_command_line_errors_have_no_traceback(entry, args, message):
    res = subprocess.run([sys.executable, entry, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [f"error: {res.stderr.strip()[7:]}"]
    assert message in res.stderr and "Traceback" not in res.stderr


def test_a_new_run_never_replaces_another_and_overwrite_does(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    before = file_hashes(tmp_path)
    code, _, err = cli("train", f"--out_dir={tmp_path}", *TINY, "--max_iters=2")
    assert code == 1 and "already holds a run" in err and file_hashes(tmp_path) == before
    out = train(tmp_path, "--max_iters=1", "--eval_interval=1", "--overwrite=True", "--seed=7")
    assert "iter 1:" in out and max(train_losses(tmp_path)) == 1


def test_nan_guard_never_writes_a_non_finite_checkpoint(tmp_path):
    # the repro: the update itself diverges (finite loss, NaN weights); the evaluation that
    # follows sees it and stops before saving
    code, out, err = cli("train", f"--out_dir={tmp_path / 'a'}", *TINY, "--max_iters=30", "--eval_interval=1",
                         "--learning_rate=1e3", "--min_lr=0.0", "--grad_clip=0.0", "--warmup_iters=0")
    assert code == 1 and err.count("\n") == 1 and "last good checkpoint" in err, err
    saved = assert_loadable_and_finite(tmp_path / "a")
    assert f"(iter {saved['iter_num']})" in err
    # a NaN loss: stopped before the update, the checkpoint of the last evaluation kept
    train(tmp_path / "b", "--max_iters=2", "--eval_interval=2")
    good = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    code, _, err = cli("train", f"--out_dir={tmp_path / 'c'}", *TINY, "--max_iters=6", "--eval_interval=2",
                       "--learning_rate=1e30", "--min_lr=0.0", "--warmup_iters=0")
    assert code == 1 and "loss is nan" in err or "loss is inf" in err or "not finite" in err, err
    assert_loadable_and_finite(tmp_path / "c")
    assert good["iter_num"] == 2


def test_a_second_run_in_the_same_out_dir_is_refused(tmp_path):
    import signal
    first = subprocess.Popen([sys.executable, "train.py", f"--out_dir={tmp_path}", *TINY, "--max_iters=100000",
                              "--eval_interval=1000"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (pytest -n ignores it)
    try:
        for line in first.stdout:  # training has started (the lock names its holder before that)
            if line.startswith("iter 2:"):
                break
        code, _, err = cli("train", f"--out_dir={tmp_path}", *TINY, "--max_iters=2", "--overwrite=True")
        assert code == 1 and f"in use by another train.py (pid {first.pid})" in err, err
        first.send_signal(2)  # Ctrl-C: the step ends, a checkpoint, one line, exit 130, nothing left behind
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 130 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("stopped by SIGINT at iter")
        assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
        assert f"at iter {assert_loadable_and_finite(tmp_path)['iter_num']}:" in stderr
    finally:
        first.kill()


KILL_IN_SAVE = """
import os, signal, sys, runpy, torch
real, calls = torch.save, [0]
def save(obj, f, *a, **k):  # the second checkpoint: half a file, then kill -9
    calls[0] += 1
    if calls[0] == 2:
        open(f, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_9_in_training_and_in_the_checkpoint_write_then_exact_resume(tmp_path):
    common = ["--max_iters=8", "--eval_interval=2", "--dropout=0.1"]
    train(tmp_path / "full", *common)
    # 1. kill -9 inside the checkpoint write (at iter 2): the iter-0 checkpoint and the log survive
    res = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, f"--out_dir={tmp_path / 'a'}", *TINY, *common],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == -9
    assert [p for p in os.listdir(tmp_path / "a") if ".tmp." in p]         # the torn temp file
    assert assert_loadable_and_finite(tmp_path / "a")["iter_num"] == 0
    # 2. kill -9 at a moment during training
    proc = subprocess.Popen([sys.executable, "train.py", f"--out_dir={tmp_path / 'b'}", *TINY, *common],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 5:"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert assert_loadable_and_finite(tmp_path / "b")["iter_num"] == 4
    for run in ("a", "b"):  # resume: removes the temp file, continues bit for bit
        cli_code, _, err = cli("train", f"--out_dir={tmp_path / run}", "--init_from=resume", "--max_iters=8")
        assert cli_code == 0, err
        assert not [p for p in os.listdir(tmp_path / run) if ".tmp." in p]
        a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / run)
        assert sorted(b) == list(range(1, 9)) and all(a[i] == b[i] for i in a), (run, a, b)


def test_torn_last_log_line_is_dropped_on_resume(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"iter": 3, "train_lo')                    # a write cut by a crash
    code, _, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=3")
    assert code == 0, err
    assert max(train_losses(tmp_path)) == 3


def test_derived_widths_follow_the_final_settings(tmp_path):
    def widths(*argv):
        _, m = settings_of(*argv)
        return m.ffn_hidden, m.expert_hidden
    assert widths("--n_embd=128", "--n_head=4", "--top_k=2") == (384, 192)   # 8/3*128 -> 384, / k
    assert widths("--n_embd=128", "--n_head=4", "--top_k=1") == (384, 384)
    assert widths("--n_embd=128", "--n_head=4", "--top_k=2", "--n_shared=1") == (384, 128)  # / (k + shared)
    assert widths("--n_embd=64", "--n_head=4") == (192, 96)
    assert widths("--n_embd=128", "--n_head=4", "--expert_hidden=64")[1] == 64    # explicit wins
    assert widths("--n_embd=128", "--n_head=4", "--ffn_hidden=300")[1] == 150     # derived from ffn_hidden
    _, m = settings_of("--n_embd=128", "--n_head=4", "--n_experts=4", "--router=ermoe")
    assert m.ermoe_rank == 64                                                      # n_embd // 2
    _, m = settings_of("--n_embd=128", "--n_head=4", "--n_experts=4", "--router=ermoe", "--ermoe_basis=partitioned")
    assert m.ermoe_rank == 32                                                      # n_embd // n_experts
    config = tmp_path / "wide.py"
    config.write_text("n_embd = 128\nn_head = 4\ntop_k = 1\n")
    assert widths(str(config)) == widths("--n_embd=128", "--n_head=4", "--top_k=1")
    # --help shows the value each setting will take and where it came from
    helptext = subprocess.run([sys.executable, "train.py", "--router=ermoe", "--help"], cwd=REPO, capture_output=True,
                              text=True).stdout
    line = {l.split("=")[0].strip(): l for l in helptext.splitlines() if l.strip().startswith("--")}
    for key, value, origin in (("ffn_hidden", 384, "derived"), ("expert_hidden", 192, "derived"),
                               ("ermoe_rank", 64, "derived"), ("router", "'ermoe'", "command line"),
                               ("c_lb", 0.0, "router ermoe"), ("c_sp", 0.002, "default"),
                               ("vocab_size", 65, "dataset shakespeare_char")):
        assert f"--{key}={value} " in line[f"--{key}"] and f"[{origin}]" in line[f"--{key}"], line[f"--{key}"]
    for key in ("ffn_hidden", "expert_hidden", "ermoe_rank"):  # what 0 means stays in the declaration's comment
        assert "0 = derived" in line[f"--{key}"], line[f"--{key}"]
    if not torch.cuda.is_available():
        assert "[CPU preset]" in line["--batch_size"] and "[CPU preset]" in line["--n_embd"]


def test_a_prepared_set_that_does_not_add_up_is_one_error_line(tmp_path):
    """Bins from elsewhere: a train.bin that is not a whole number of tokens, or not the count meta.json
    records, and a meta.json with the wrong types: one error line, the set and the run untouched."""
    import shutil
    from support.data import prepare
    name = f"bins-{os.getpid()}"
    folder = os.path.join(REPO, "data", name)
    shutil.copytree(prepare("shakespeare_char", verbose=False), folder,
                    ignore=shutil.ignore_patterns("input.txt"))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    try:
        cases = [
            ("train.bin", lambda p: open(p, "ab").write(b"\x01"), "not a whole number of uint16 tokens"),
            ("train.bin", lambda p: open(p, "ab").write(b"\x01\x00"), "meta.json says"),
            ("meta.json", lambda p: json.dump({**meta, "dtype": "float32"}, open(p, "w")), "dtype is 'float32'"),
            ("meta.json", lambda p: json.dump({**meta, "tokens": {"train": "1000"}}, open(p, "w")), "tokens is"),
            ("val.bin", lambda p: os.remove(p), "val.bin is missing"),
        ]
        for fname, damage, message in cases:
            shutil.copy(os.path.join(folder, fname), tmp_path / "keep") \
                if os.path.exists(os.path.join(folder, fname)) else None
            damage(os.path.join(folder, fname))
            before = file_hashes(folder)
            code, out, err = cli("train", *TINY, f"--dataset={name}", f"--out_dir={tmp_path / 'run'}", "--max_iters=1",
                                 f"--vocab_size={meta['vocab_size']}")
            assert code == 1 and err.count("\n") == 1 and message in err, (fname, err)
            assert file_hashes(folder) == before and not (tmp_path / "run").exists()
            shutil.copy(tmp_path / "keep", os.path.join(folder, fname))     # repaired for the next case
        train(tmp_path / "run", f"--dataset={name}", "--max_iters=1", "--eval_interval=1")   # the repaired set trains
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_sample_refuses_abbreviations_and_suggests_the_option():
    code, out, err = cli("sample", "--num_sample=1")
    assert code == 1 and err.count("\n") == 1 and "unrecognized arguments: --num_sample=1" in err
    assert "did you mean '--num_samples'?" in err


def test_wandb_offline_run_gets_every_term_and_routing_metric(tmp_path, monkeypatch):
    require("wandb", "run tracking is optional")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # its own process, as users run it: wandb's finish() only tells its service process to close the run's
    # file (wandb 0.31, a message with no reply); the process's exit waits for the service to finish writing
    done = train_subprocess(tmp_path / "run", "--max_iters=2", "--eval_interval=2", "--wandb_log=True",
                            "--wandb_run_name=tiny")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, os.listdir(tmp_path / "wandb")
    # an offline run is one protobuf log (run-*.wandb); the names of what was logged are in it as text
    record = next((tmp_path / "wandb" / runs[0]).glob("run-*.wandb")).read_bytes()
    for key in ("train_loss", "lb", "z", "sp", "cp", "lb_scaled", "lr", "val_loss", "layer0/cv", "layer1/entropy_norm",
                "layer0/topk_mass", "layer0/coact_cos2", "whole/val_loss", "params/total", "tiny", "wandb_project"):
        assert key.encode() in record, key
    assert "iter 2:" in done.stdout
