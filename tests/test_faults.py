"""
What ends real runs, replayed: signals (one process, and under torchrun with and without expert
parallelism), a process of the run that dies or hangs, a full disk (real and injected), memory that
runs out (injected), a checkpoint of an older format, a scheduler's requeue (--init_from=auto) and
timed checkpoints. Each ends in one line, keeps the last checkpoint, and resumes bit for bit. The
references: an uninterrupted run of the same settings (the resumed losses equal to the bit), the file's
hash before the fault (a checkpoint left untouched), and for the old checkpoints (tests/ckpt_format1,
tests/ckpt_format2) the losses recorded by the code that wrote them.
"""

import errno
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY, assert_loadable_and_finite, cli, train, train_losses

LONG = ["--max_iters=100000", "--eval_interval=1000", "--lr_decay_iters=50", "--warmup_iters=2", "--dropout=0.1"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def temp_files(out_dir):
    return [p for p in os.listdir(out_dir) if ".tmp." in p]


def start(out_dir, *args, script=("train.py",), launcher=(sys.executable,), **kw):
    """train.py (or a wrapper) as a scheduler starts it: its own session, output piped."""
    return subprocess.Popen([*launcher, *script, f"--out_dir={out_dir}", *TINY, *LONG, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def wait_for(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"{prefix!r} never printed: {proc.communicate(timeout=60)[1][-3000:]}")


def our_lines(stderr):
    """The lines train.py printed (torchrun adds its own log lines and traceback around them)."""
    return [l for l in stderr.splitlines() if l.startswith(("error:", "stopped by", "warning:"))]


# ------------------------------------------------------------------------------------------------
# signals

def test_sigterm_checkpoints_the_step_says_so_and_resumes_bit_for_bit(tmp_path):
    proc = start(tmp_path / "run")
    wait_for(proc, "iter 5:")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and len(err.strip().splitlines()) == 1, err
    n = assert_loadable_and_finite(tmp_path / "run")["iter_num"]
    assert err.strip() == (f"stopped by SIGTERM at iter {n}: checkpoint written to {tmp_path / 'run'}/ckpt.pt; "
                           f"continue with --init_from=resume")
    assert json.loads(open(tmp_path / "run" / "log.jsonl").read().splitlines()[-1]) == {"iter": n, "stopped": "SIGTERM"}
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["iter_num"] == 0   # best.pt left as it was
    assert not temp_files(tmp_path / "run")
    code, _, err = cli("train", f"--out_dir={tmp_path / 'run'}", "--init_from=resume", f"--max_iters={n + 3}")
    assert code == 0, err
    train(tmp_path / "full", *LONG, f"--max_iters={n + 3}")
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "run")
    assert sorted(b) == list(range(1, n + 4)) and all(a[i] == b[i] for i in a), (a, b)


def test_sigusr1_stops_with_138_and_an_inherited_ignored_sigint_stays_ignored(tmp_path):
    proc = start(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as nohup or `&`
    wait_for(proc, "iter 3:")
    proc.send_signal(signal.SIGINT)
    wait_for(proc, "iter 6:")  # still training
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 138 and our_lines(err) == [err.strip()] and "stopped by SIGUSR1 at iter" in err, err
    assert assert_loadable_and_finite(tmp_path)["iter_num"] >= 6


SECOND_SIGNAL = """
import os, signal, sys, torch
sys.path.insert(0, os.getcwd())
import train
real, calls = torch.save, [0]
def save(obj, f, *a, **k):  # the stop's checkpoint (the second): half written, then Ctrl-C
    calls[0] += 1
    if calls[0] == 2:
        open(f, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)
    return real(obj, f, *a, **k)
torch.save = save
sys.exit(train.cli(train.main, sys.argv[1:]))
"""


def test_a_second_signal_during_the_stop_checkpoint_leaves_the_previous_one(tmp_path):
    proc = start(tmp_path, script=("-c", SECOND_SIGNAL),  # SIGINT live, whatever started the tests (`&` ignores it)
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(proc, "iter 2:")
    before = sha(tmp_path / "ckpt.pt")   # the evaluation's at iter 0
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "stopped by a second SIGINT at iter" in err and "last good checkpoint" in err and "(iter 0)" in err, err
    assert sha(tmp_path / "ckpt.pt") == before and not temp_files(tmp_path)


def no_process_mentions(path):
    """No process left whose command line names path (the workers of a torchrun that ended)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(path).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:
            pass
    return not found


@pytest.mark.parametrize("layout", ["ddp", "expert_parallel"])
def test_sigterm_under_torchrun_stops_both_processes_after_one_step(tmp_path, layout):
    # as SLURM at the time limit: every process of the job gets SIGTERM, and torchrun forwards it again
    proc = start(tmp_path, *(["--expert_parallel=2"] if layout == "expert_parallel" else []), launcher=TORCHRUN)
    wait_for(proc, "iter 3:")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = our_lines(err)
    n = assert_loadable_and_finite(tmp_path)["iter_num"]
    assert lines == [f"stopped by SIGTERM at iter {n}: checkpoint written to {tmp_path}/ckpt.pt; continue with "
                     f"--init_from=resume"], err[-3000:]
    records = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert records[-1] == {"iter": n, "stopped": "SIGTERM"} and sum("stopped" in r for r in records) == 1
    assert not temp_files(tmp_path) and no_process_mentions(tmp_path)
    code, out, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", f"--max_iters={n + 1}",
                         "--expert_parallel=1")   # one process goes on from the whole model
    assert code == 0 and f"resumed from {tmp_path}/ckpt.pt at iter {n}" in out, err


PEER = """
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
import train
real, calls = train.train_step, [0]
def step(*a, **k):  # rank 1 at its 4th step: dies (kill -9), or hangs outside any collective, deaf to SIGTERM
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 4:
        if os.environ["PEER"] == "dies":
            os.kill(os.getpid(), signal.SIGKILL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (stuck in C code, say: torchrun's SIGKILL ends it)
        time.sleep(3600)
    return real(*a, **k)
train.train_step = step
sys.exit(train.cli(train.main, sys.argv[1:], quiet=os.environ["RANK"] != "0"))
"""


@pytest.mark.parametrize("peer", ["dies", "hangs"])
def test_a_lost_process_ends_the_others_with_one_line_and_no_hang(tmp_path, peer):
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    proc = start(tmp_path / "run", "--eval_interval=2", script=(str(script),), launcher=TORCHRUN,
                 env={**os.environ, "PEER": peer})
    wait_for(proc, "iter 3:")
    if peer == "hangs":  # rank 0 waits in the step's all-reduce for ever: the scheduler gives up
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-3000:]
    assert ("another process of this run failed or ended at iter 3" if peer == "dies" else
            "stopped by SIGTERM at iter 3: the step did not end within 20 s") in lines[0], lines
    assert lines[0].endswith(f"the last good checkpoint is {tmp_path / 'run'}/ckpt.pt (iter 2)"), lines
    assert assert_loadable_and_finite(tmp_path / "run")["iter_num"] == 2 and not temp_files(tmp_path / "run")
    assert no_process_mentions(tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# a scheduler's requeue, timed checkpoints

def test_init_from_auto_starts_a_run_then_resumes_it_bit_for_bit(tmp_path):
    common = ["--init_from=auto", "--eval_interval=2", "--lr_decay_iters=8", "--dropout=0.1"]
    (tmp_path / "auto").mkdir()
    # a run killed before any checkpoint
    (tmp_path / "auto" / "log.jsonl").write_text('{"iter": 0, "train_loss": 9.0}\n')
    out = train(tmp_path / "auto", *common, "--max_iters=2")
    assert "resumed" not in out and min(train_losses(tmp_path / "auto")) == 1   # started over
    out = train(tmp_path / "auto", *common, "--max_iters=4")                     # the same command, requeued
    assert f"resumed from {tmp_path / 'auto'}/ckpt.pt at iter 2" in out
    train(tmp_path / "full", *common, "--max_iters=4")
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "auto")
    assert sorted(b) == [1, 2, 3, 4] and a == b
    before = sha(tmp_path / "auto" / "ckpt.pt")
    out = train(tmp_path / "auto", *common, "--max_iters=4")                     # requeued once more: finished
    assert "nothing to train" in out and "the run is finished" in out and sha(tmp_path / "auto" / "ckpt.pt") == before


def test_ckpt_interval_s_writes_checkpoints_between_evaluations_and_changes_no_number(tmp_path, monkeypatch):
    from support import rundir
    saved, real = [], rundir.save_checkpoint
    monkeypatch.setattr(rundir, "save_checkpoint", lambda ckpt, *a: saved.append(ckpt["iter_num"]) or real(ckpt, *a))
    train(tmp_path / "timed", "--max_iters=4", "--eval_interval=1000", "--ckpt_interval_s=1e-9")
    assert saved == [0, 1, 2, 3, 4]       # after every step (the interval has always passed), the final evaluation
    saved.clear()
    train(tmp_path / "plain", "--max_iters=4", "--eval_interval=1000")
    assert saved == [0, 4] and train_losses(tmp_path / "timed") == train_losses(tmp_path / "plain")


# ------------------------------------------------------------------------------------------------
# a full disk, memory

def first_checkpoint(out_dir):
    """A run evaluated at iter 0 only: its checkpoint holds no AdamW state yet (a third of the next one's size)."""
    train(out_dir, "--max_iters=0")
    return sha(out_dir / "ckpt.pt"), os.path.getsize(out_dir / "ckpt.pt")


def mounted_tmpfs(path, size):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("limit", ["file size", "tmpfs"])
def test_a_real_full_disk_is_one_line_and_the_old_checkpoint_stays_byte_identical(tmp_path, limit):
    run = tmp_path / "disk"
    if limit == "tmpfs" and not mounted_tmpfs(run, "900k"):
        pytest.skip("this machine does not let the test mount a tmpfs (needs root and CAP_SYS_ADMIN); "
                    "the file size limit replays the same failure")
    try:
        before, size = first_checkpoint(run)

        def small_files():  # a file may grow to 1.5x the first checkpoint: the second one (with AdamW state) fails
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # the write fails with EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (size * 3 // 2, size * 3 // 2))
        res = subprocess.run([sys.executable, "train.py", f"--out_dir={run}", "--init_from=resume", "--max_iters=2",
                              "--eval_interval=2"], cwd=REPO, capture_output=True, text=True, timeout=300,
                             preexec_fn=small_files if limit == "file size" else None)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"error: cannot write ckpt.pt in {run} (") and "MB are free there" in res.stderr
        assert f"the previous checkpoint {run}/ckpt.pt is intact" in res.stderr
        assert sha(run / "ckpt.pt") == before and not temp_files(run)
    finally:
        if limit == "tmpfs":
            subprocess.run(["umount", str(run)])


def test_injected_write_errors_are_one_line_and_leave_nothing_half_written(tmp_path, monkeypatch):
    import builtins
    from support import rundir
    before, _ = first_checkpoint(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # half a file, then the error a full disk gives
        open(f, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=2", "--eval_interval=2")
    assert code == 1 and err.count("\n") == 1 and "cannot write ckpt.pt in" in err and \
        "(No space left on device)" in err
    assert "is intact" in err and sha(tmp_path / "ckpt.pt") == before and not temp_files(tmp_path)

    def writer_fails(obj, f, *a, **k):  # what torch's own zip writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 369088 vs 368980")
    monkeypatch.setattr(torch, "save", writer_fails)
    code, _, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=2", "--eval_interval=2")
    assert code == 1 and err.count("\n") == 1 and "the write stopped short: torch's unexpected pos" in err, err
    assert sha(tmp_path / "ckpt.pt") == before and not temp_files(tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    log = tmp_path / "log.jsonl"
    real_open, armed = builtins.open, [True]

    def log_fills_up(path, mode="r", *a, **k):  # the third line appended to the log: half of it, then a full disk
        fh = real_open(path, mode, *a, **k)
        if str(path) == str(log) and mode == "a" and armed[0]:
            write = fh.write

            def half(text):
                if len(open(log).read().splitlines()) >= 3:
                    write(text[:len(text) // 2])
                    fh.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                return write(text)
            fh.write = half
        return fh
    monkeypatch.setattr(rundir, "open", log_fills_up, raising=False)
    code, _, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=6", "--eval_interval=6")
    assert code == 1 and err.count("\n") == 1 and "cannot write log.jsonl in" in err and "(iter 0)" in err, err
    assert open(log).read().endswith("}\n") and sha(tmp_path / "ckpt.pt") == before   # no half line, no new checkpoint


def test_a_plot_that_cannot_be_written_is_a_warning_and_the_run_succeeds(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, path, **kw):
        open(path, "wb").write(b"half a picture")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    code, out, err = cli("train", f"--out_dir={tmp_path}", *TINY, "--max_iters=2", "--eval_interval=2")
    assert code == 0 and "wrote" not in out, err
    assert err.splitlines() == [f"warning: cannot write {tmp_path}/{name}.png (No space left on device); that plot is "
                                f"skipped" for name in ("loss", "expert_load", "load_history", "routing_curves")]
    assert not list(tmp_path.glob("*.png")) and assert_loadable_and_finite(tmp_path)["iter_num"] == 2


@pytest.mark.parametrize("where, error, said", [
    ("train_step", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.19 GiB of which 1.06 GiB is free."),
     "(CUDA out of memory. Tried to allocate 2.00 GiB)"),
    ("evaluate", RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                              "memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"),
     "(CPU: can't allocate memory: you tried to allocate 4294967296 bytes)"),
])
def test_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch, where, error, said):
    import train as train_module
    real, calls = getattr(train_module, where), [0]

    def fails(*a, **k):  # the third call: a step after the checkpoint at iter 2, or the evaluation at iter 4
        calls[0] += 1
        if calls[0] == 3:
            raise error
        return real(*a, **k)
    monkeypatch.setattr(train_module, where, fails)
    code, _, err = cli("train", f"--out_dir={tmp_path}", *TINY, "--max_iters=6", "--eval_interval=2")
    at = 2 if where == "train_step" else 4
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: out of memory at iter {at} {said}: lower --batch_size=4 or --block_size=16; to keep "
                          f"the tokens per step, raise --gradient_accumulation_steps as batch_size falls (e.g. "
                          f"--batch_size=2 --gradient_accumulation_steps=2"), err
    assert err.strip().endswith(f"the last good checkpoint is {tmp_path}/ckpt.pt (iter 2)"), err
    assert assert_loadable_and_finite(tmp_path)["iter_num"] == 2 and not temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------
# old checkpoints, what a checkpoint records, durability

OLD = os.path.join(REPO, "tests", "ckpt_format1")  # written by the code of dc78c1e (before formats were recorded)
OLD_LOSSES = {5: 4.173153400421143, 6: 4.14520788192749, 7: 4.146365642547607, 8: 4.13345193862915}  # its run of 8


def sample_and_resume(old_dir, run_dir, losses):
    """An old run's folder, copied to run_dir: sample.py writes a sample, and train.py resumes it to step 8
    with the losses its own code had at steps 5-8, to 1e-5 (measured: resumed with a fresh AdamW, step 6 is
    1e-4 off; with other batches, 1e-3): the weights, AdamW's state and both RNG states come back."""
    shutil.copytree(old_dir, run_dir)
    code, out, err = cli("sample", f"--out_dir={run_dir}", "--num_samples=1", "--max_new_tokens=30")
    assert code == 0 and len(out.split("---------------")[0]) > 30, err
    code, out, err = cli("train", f"--out_dir={run_dir}", "--init_from=resume", "--max_iters=8")
    assert code == 0 and "resumed from" in out, err
    got = train_losses(run_dir)
    assert sorted(got) == [5, 6, 7, 8] and all(math.isclose(got[i], losses[i], rel_tol=1e-5) for i in got), got


def test_a_checkpoint_of_format_1_samples_resumes_and_converts(tmp_path):
    old = torch.load(os.path.join(OLD, "ckpt.pt"), weights_only=True)
    assert "format" not in old and old["iter_num"] == 4
    sample_and_resume(OLD, tmp_path / "run", OLD_LOSSES)
    new = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert new["format"] == 3 and new["torch"] == str(torch.__version__)    # upgraded 1 -> 2 -> 3 on load
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if os.path.exists(os.path.join(REPO, ".git")) and head.returncode == 0:
        assert new["commit"].split("-")[0] == head.stdout.strip(), new["commit"]
    code, _, err = cli("tools.convert", "to-hf", OLD, tmp_path / "hf")                # out to a Mixtral folder
    assert code == 0, err
    code, _, err = cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "back")  # and in again: the same weights
    assert code == 0, err
    back = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)["model"]
    assert set(back) == set(old["model"]) and all(torch.equal(back[k], v) for k, v in old["model"].items())
    torch.save({**old, "format": 99, "torch": "9.0", "commit": "abc"}, tmp_path / "run" / "ckpt.pt")
    code, _, err = cli("sample", f"--out_dir={tmp_path / 'run'}", "--last")
    assert code == 1 and "has format 99 (written by torch 9.0 at commit abc); this code reads formats 1 to 3" in err


# written by the code of db80131 (before the core/atlas split): gpt-oss's experts and router bias and every
# backbone option an import sets, each away from its default, so that every such field of model_args is in it:
#   python train.py config/families/gpt_oss.py $TINY --n_kv_head=1 --head_dim=24 --rotary_dim=8
#     --rope_theta=1000000.0 --norm_eps=1e-06 --qk_norm=True --qk_norm_per_head=True --qkv_bias=True
#     --tie_embeddings=False --n_shared=1 --shared_gate=True --first_dense_layers=1 --eval_interval=4 --seed=5
# with --max_iters=4 (this checkpoint) and --max_iters=8 (the losses of its steps 5-8 below)
OLD_ATLAS = os.path.join(REPO, "tests", "ckpt_format2")
OLD_ATLAS_LOSSES = {5: 4.192000865936279, 6: 4.181103229522705, 7: 4.153510570526123, 8: 4.163982391357422}


def test_a_checkpoint_of_format_2_with_every_family_and_import_field_samples_and_resumes(tmp_path):
    old = torch.load(os.path.join(OLD_ATLAS, "ckpt.pt"), weights_only=True)
    assert old["format"] == 2 and old["iter_num"] == 4
    assert old["model_args"]["expert_act"] == "gpt_oss" and old["model_args"]["qk_norm_per_head"]
    sample_and_resume(OLD_ATLAS, tmp_path / "run", OLD_ATLAS_LOSSES)
    # format 2 -> 3 (support/rundir.py families_apart): the run settings out of model_args, the gated shared
    # expert's weights under families.GatedShared's names
    new = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert new["format"] == 3 and not {"router_impl", "expert_init"} & set(new["model_args"])
    assert {"router_impl", "expert_init"} <= set(new["config"]) and new["model_args"]["shared_gate"]
    moved = {"blocks.1.mlp.shared.gate.weight", "blocks.1.mlp.shared.expert.c_gate.weight"}
    assert moved <= set(new["model"]) and not [k for k in new["model"] if ".shared_gate." in k or ".shared.c_" in k]
    code, _, err = cli("tools.convert", "to-hf", OLD_ATLAS, tmp_path / "hf")  # refused by name: no Mixtral has these
    assert code == 1 and err.strip() == (f"error: {OLD_ATLAS}/ckpt.pt cannot be exported to Mixtral: n_shared=1: "
                                         "Mixtral has no shared experts"), err


def test_a_checkpoint_is_flushed_to_the_disk_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    from support import rundir
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or
                        real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", str(a), str(b))) or real_replace(a, b))
    rundir.save_checkpoint({"model": {"w": torch.ones(3)}}, str(tmp_path), best=True)
    tmp, ckpt = f"{tmp_path}/ckpt.pt.tmp.{os.getpid()}", f"{tmp_path}/ckpt.pt"
    assert calls == [("fsync", tmp), ("replace", tmp, ckpt), ("fsync", str(tmp_path)),
                     ("replace", f"{tmp_path}/best.pt.tmp.{os.getpid()}", f"{tmp_path}/best.pt"),
                     ("fsync", str(tmp_path))], calls
