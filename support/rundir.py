"""
What a training run keeps in its out_dir, and how nothing in it gets lost.

    out_dir/ckpt.pt     model, optimizer, settings and RNG states at the last evaluation, or where a
                        signal stopped the run, or at the last --ckpt_interval_s
    out_dir/best.pt     the same at the evaluation with the lowest val loss so far
    out_dir/log.jsonl   one JSON object per line: train steps and evaluations
    out_dir/.lock       held (flock) by the one train.py that writes this out_dir

train.py sees one small interface, `Run`: open (lock, refuse to replace another run, cut the log
back to the checkpoint), checkpoint, log, check_finite. What ends a run from outside (a signal, a
diverged step, memory that ran out, a process of the run that died) is watched around the loop by
support/launch.py's Watch, which says in one line where the run stopped and which checkpoint is intact.

- A checkpoint is written to a temp file named after the process, flushed to the disk (fsync) and
  renamed over ckpt.pt, then the directory is flushed: the rename is atomic, so a crash, kill -9 or
  a power loss at any moment leaves the previous checkpoint or the new one, never half of one. A
  temp file left by a killed process is removed by the next run. A write that fails (a full disk)
  is one line with the space needed and free; the temp file is removed.
- A checkpoint records its format (FORMAT), the project's commit and the torch version that wrote
  it. An older format is brought up to this one on load (UPGRADES); a newer one is refused by name.
- The log is append-only while training. On resume it is cut back to the checkpoint's iteration
  by writing a temp file and renaming it, so it too is either the old or the new log.
- One run per out_dir: an exclusive flock on out_dir/.lock. The kernel releases it when the
  process ends, however it ends, so a crashed run never leaves a stale lock behind.
- Everything a user can get wrong is reported as a `UserError` with one line naming the file or
  setting; the entry points print it as `error: ...` and exit non-zero, without a traceback.
"""

import argparse
import difflib
import errno
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from support.stopping import signals, space, tensor_bytes, write_failure

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is skipped there
    fcntl = None

CKPT_KEYS = ("model", "optimizer", "model_args", "config", "iter_num", "best_val", "batch_rng", "torch_rng")
FORMAT = 3  # 1: the checkpoints before the format was recorded; 2: + format, commit, torch; 3: the families
           # apart from the core (router_impl and expert_init are run settings; the Qwen shared gate's keys).
           # Format 3 refuses three settings format 2 took: router_bias with router=sigmoid, renorm_floor with
           # ERMoE or expert choice (which ignored it), top_k above n_experts with zero_experts
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """Something the user can fix: printed as one `error:` line, never as a traceback."""
    exit_status, prefix = 1, "error: "


class Interrupted(UserError):
    """A signal that ended the run where nothing could be saved; exit status 128 + its number, as a shell's."""

    def __init__(self, message, signum=None):
        super().__init__(message)
        self.exit_status = 128 + (signum or signal.SIGINT)


class Stopped(Interrupted):
    """A signal that stopped the run with a checkpoint written: a line that is not an error."""
    prefix = ""


class Diverged(UserError):
    """The loss or the weights became NaN/inf."""


class ArgParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported as a UserError (one `error:` line), no
    abbreviations (`--num_sample=1` is a mistake, not --num_samples) and a "did you mean"."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        words = message.split("unrecognized arguments: ")[-1].split() if "unrecognized arguments" in message else []
        known = [flag for action in self._actions for flag in action.option_strings]
        close = [difflib.get_close_matches(w.split("=")[0], known, n=1) for w in words if w.startswith("-")]
        hint = f"; did you mean '{close[0][0]}'?" if close and close[0] else ""
        raise UserError(f"{message}{hint} (see {self.prog} --help)")


def cli(main, argv, quiet=False):
    """Run an entry point's main(argv): a UserError (or Ctrl-C) becomes one `error:` line on stderr
    and a non-zero exit status, returned; `quiet` (DDP ranks but the first) prints nothing. The
    signal handlers of a training run stay until the line is out (a signal then changes nothing)."""
    try:
        try:
            main(argv)
        except KeyboardInterrupt as caught:
            err = Interrupted("interrupted", getattr(caught, "signum", None))
        except UserError as caught:
            err = caught
        else:
            return 0
        if not quiet:  # one write of the whole line: torchrun's own log lines share this stream
            sys.stderr.write(f"{err.prefix}{err}\n")
            sys.stderr.flush()
        return err.exit_status
    finally:
        signals.release()


# ------------------------------------------------------------------------------------------------
# checkpoint

def load_checkpoint(out_dir, hint="run train.py with this out_dir first", name="ckpt.pt"):
    """out_dir/ckpt.pt (or another checkpoint file of the run), checked for every key a run needs,
    in this version's format (an older one brought up to it)."""
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} ({hint})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the file is not a checkpoint of ours
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} is unreadable ({first})") from None
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    found = ckpt.get("format", 1)
    if found not in UPGRADES and found != FORMAT:
        raise UserError(f"checkpoint {path} has format {found!r} (written by torch {ckpt.get('torch')} at commit "
                        f"{ckpt.get('commit')}); this code reads formats 1 to {FORMAT}: use the code that wrote it")
    while ckpt.get("format", 1) != FORMAT:
        ckpt = UPGRADES[ckpt.get("format", 1)](ckpt)
    return ckpt


def families_apart(ckpt):
    """Format 2 -> 3: router_impl and expert_init move from model_args to the run's config (where the routing
    runs and how the experts start are not the network); a gated shared expert's weights move under it
    (mlp.shared.* -> mlp.shared.expert.*, mlp.shared_gate -> mlp.shared.gate)."""
    if not all(isinstance(ckpt[k], dict) for k in ("model_args", "config", "model")):
        return {**ckpt, "format": 3}  # refused where it is read, naming what is wrong
    model_args = dict(ckpt["model_args"])
    config = {**ckpt["config"], **{k: model_args.pop(k) for k in ("router_impl", "expert_init") if k in model_args}}
    weights = ckpt["model"]
    if model_args.get("shared_gate"):
        def moved(key):
            key = key.replace(".mlp.shared_gate.", ".mlp.shared.gate.")
            return key.replace(".mlp.shared.c_", ".mlp.shared.expert.c_")
        weights = {moved(k): v for k, v in weights.items()}
    return {**ckpt, "model_args": model_args, "config": config, "model": weights, "format": 3}


# A change that must change what a checkpoint holds bumps FORMAT and adds the step from the format before:
# old checkpoints keep loading (tests/ckpt_format1 and tests/ckpt_format2, tested in CI).
UPGRADES = {
    1: lambda ckpt: {**ckpt, "format": 2, "commit": None, "torch": None},  # who wrote it was not recorded
    2: families_apart,
}


@functools.lru_cache(maxsize=None)
def code_commit():
    """The project's git commit ('-dirty' if tracked files differ from it), None if not a git checkout."""
    if not os.path.exists(os.path.join(REPO, ".git")):
        return None
    try:
        git = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, timeout=30)
        head = git(["git", "rev-parse", "HEAD"])
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def save_checkpoint(ckpt, out_dir, best=False):
    """Atomic and durable: a temp file of this process, flushed to the disk, renamed over ckpt.pt,
    then the directory flushed, the standard sequence (LWN, "Ensuring data reaches disk", 2011;
    SQLite and git do the same): without the fsyncs a crash of the machine can keep the rename and
    lose the data. An interrupt or an error during the write removes the temp file and leaves the
    previous checkpoint in place; a failed write (a full disk) is one line. best: also make best.pt
    this checkpoint (a second name for the same file, renamed into place: no copy)."""
    tmp, path = os.path.join(out_dir, f"ckpt.pt.tmp.{os.getpid()}"), os.path.join(out_dir, "ckpt.pt")
    link = os.path.join(out_dir, f"best.pt.tmp.{os.getpid()}")
    stage, reason = "ckpt.pt", None
    try:
        torch.save({**ckpt, "format": FORMAT, "commit": code_commit(), "torch": str(torch.__version__)}, tmp)
        fsync(tmp)
        os.replace(tmp, path)
        stage = "the directory"           # the new ckpt.pt is in place; its rename may not be durable yet
        fsync(out_dir)
        if best:
            stage = "best.pt"
            try:
                os.link(path, link)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, link)
                fsync(link)
            os.replace(link, os.path.join(out_dir, "best.pt"))
            fsync(out_dir)
    except BaseException as err:
        for leftover in (tmp, link):
            if os.path.exists(leftover):
                os.remove(leftover)
        reason = write_failure(err) if isinstance(err, Exception) else None
        if reason is None:
            raise
    if reason is None:
        return
    # (the space is measured once the error is gone: until then torch's writer holds the removed file open)
    kept = ("the previous checkpoint " + path + " is intact" if stage == "ckpt.pt" and os.path.exists(path) else
            "no checkpoint was written before" if stage == "ckpt.pt" else
            f"{path} is the new checkpoint, but its rename may not survive a power loss"
            if stage == "the directory" else
            f"{path} is written, best.pt is the previous")
    raise UserError(f"cannot write {stage} in {out_dir} ({reason}): {space(out_dir, tensor_bytes(ckpt))}; {kept}")


def fsync(path):
    """Flush a file, or a directory's entries, to the disk (a directory: POSIX only; a filesystem that
    cannot flush a directory, EINVAL, is left as it is)."""
    if os.path.isdir(path) and not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def all_finite(tensors):
    """True if every floating-point tensor holds only finite values (one pass, one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ------------------------------------------------------------------------------------------------
# log

def read_log(path):
    """The records of a log.jsonl. A line that is not a JSON object with an `iter` is an error that
    names the file and line, except a last line cut short by a crash (no newline), which is dropped."""
    if not os.path.isfile(path):
        raise UserError(f"no log at {path} (run train.py with this out_dir first)")
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    torn = lines[-1] != ""            # the file does not end with a newline: the last write was cut
    records = []
    for n, line in enumerate(lines[:-1] if not torn else lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if torn and n == len(lines):
                break
            raise UserError(f"{path} line {n} is not JSON ({err.msg}); fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            raise UserError(f"{path} line {n} is not a log record (a JSON object with an integer 'iter')")
        records.append(record)
    return records


def append_log(path, record):
    """One record at the end of the log. A write that fails (a full disk) is cut off again: no half line."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError:
        try:
            os.truncate(path, size)
        except OSError:
            pass  # the write's own error is the one to report; a torn last line is dropped on resume anyway
        raise


def rewrite_log(path, records):
    """Replace the log by `records`, atomically and durably (temp file, fsync, rename, fsync the directory)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(path) or ".")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------------
# the out_dir itself

def check_writable_dir(out_dir, setting="out_dir"):
    """The directory exists or can be created, and a file can be written in it."""
    if not out_dir:
        raise UserError(f"{setting} is empty: give a directory, e.g. --{setting}=out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{setting}={out_dir} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-probe.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write to {setting}={out_dir} ({err.strerror or err})") from None


class RunLock:
    """An exclusive flock on out_dir/.lock for the life of this process."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, ".lock")
        self.fh = None

    def acquire(self):
        if fcntl is None:
            return self
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise UserError(f"{os.path.dirname(self.path)} is in use by another train.py ({holder}); "
                            "wait for it to finish or use another --out_dir") from None
        return self

    def mark(self):
        """Write who holds the lock (only once the run is sure to start: a refused run changes nothing)."""
        if self.fh is not None:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.write(f"pid {os.getpid()}\n")
            self.fh.flush()


def describe_run(out_dir):
    """A short description of the run already in out_dir, or None if there is none."""
    ckpt, log = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    parts = []
    if os.path.isfile(ckpt):
        parts.append("ckpt.pt")
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        parts.append("log.jsonl")
    return " and ".join(parts) or None


def remove_stale_temp_files(out_dir):
    """Temp files of a killed run (only called while holding the lock, so none is in use)."""
    for name in os.listdir(out_dir):
        if ".tmp." in name and name.split(".tmp.")[0] in ("ckpt.pt", "best.pt", "log.jsonl"):
            os.remove(os.path.join(out_dir, name))


# ------------------------------------------------------------------------------------------------
# the interface train.py uses

class Run:
    """The out_dir of one training run. Every process has one; only the first (master) writes."""

    def __init__(self, out_dir, master=True):
        self.out_dir, self.master, self.lock = out_dir, master, None
        self.log_path = os.path.join(out_dir, "log.jsonl")
        self.saved_iter = None       # the iteration of the checkpoint on disk
        self.saved_at = time.monotonic()  # when it was written (or the loop began): --ckpt_interval_s
        self.tracker = None          # also gets every record (support/tracking.py), if set

    def open(self, ckpt, overwrite):
        """Lock out_dir, refuse to replace another run, then cut the log back to the checkpoint."""
        check_writable_dir(self.out_dir)
        self.lock = RunLock(self.out_dir).acquire()
        kept = []
        if ckpt:
            self.saved_iter = ckpt["iter_num"]
            if os.path.exists(self.log_path):  # keep the log up to the checkpoint; the rest is redone
                kept = [r for r in read_log(self.log_path) if r["iter"] < ckpt["iter_num"]
                        or (r["iter"] == ckpt["iter_num"] and "val_loss" not in r)]
        else:
            existing = describe_run(self.out_dir)
            if existing and not overwrite:
                raise UserError(f"{self.out_dir} already holds a run ({existing}); resume it with --init_from=resume, "
                                f"choose another --out_dir, or pass --overwrite=True to replace it")
            for name in ("ckpt.pt", "best.pt"):
                if os.path.exists(os.path.join(self.out_dir, name)):
                    os.remove(os.path.join(self.out_dir, name))
        try:
            self.lock.mark()
            remove_stale_temp_files(self.out_dir)
            rewrite_log(self.log_path, kept)
        except OSError as err:
            raise self.write_failed("log.jsonl", err) from None
        return self

    def resumed(self, iter_num):
        """A process that did not open() the directory learns where the checkpoint is."""
        self.saved_iter = iter_num

    def checkpoint(self, ckpt, iter_num, best):
        """Write ckpt.pt (and best.pt if best) from the first process (every process calls this); the
        log is flushed to the disk first, so that it holds every record up to the checkpoint."""
        if iter_num == self.saved_iter and not best:
            return
        if self.master:
            if os.path.exists(self.log_path):
                fsync(self.log_path)
            save_checkpoint(ckpt, self.out_dir, best)
        self.saved_iter, self.saved_at = iter_num, time.monotonic()

    def log(self, record):
        if self.master:
            try:
                append_log(self.log_path, record)
            except OSError as err:
                raise self.write_failed("log.jsonl", err) from None
            if self.tracker is not None:
                self.tracker.log(record)

    def write_failed(self, what, err):
        path = os.path.join(self.out_dir, "ckpt.pt")
        need = os.path.getsize(path) if os.path.exists(path) else 0
        return UserError(f"cannot write {what} in {self.out_dir} ({write_failure(err)}): {space(self.out_dir, need)}; "
                         f"{self.last()}")

    def last(self):
        return (f"the last good checkpoint is {self.out_dir}/ckpt.pt (iter {self.saved_iter})"
                if self.saved_iter is not None else "no checkpoint was written")


def check_finite(losses, params, reduce=None):
    """Raise Diverged unless the evaluation losses and the weights are finite (checked before every
    checkpoint, so a checkpoint on disk is always finite). reduce: makes every process decide alike."""
    finite = torch.tensor(float(all(map(math.isfinite, losses.values())) and all_finite(params)))
    if reduce:
        reduce(finite)
    if not finite.item():
        raise Diverged(f"evaluation loss is {', '.join(f'{k} {v}' for k, v in losses.items())} or the weights are "
                       f"not finite" if losses else "the weights are not finite")
