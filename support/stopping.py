"""
What ends a run from outside, and how it is recognised: signals (a scheduler's SIGTERM, Ctrl-C,
SLURM's SIGUSR1), a process of the run that died, memory that ran out, a disk that is full. This
file holds the mechanics and imports nothing of the project; support/launch.py's Watch acts on them
around the training loop (all processes after the same step: the checkpoint, one line, the exit
status), support/rundir.py when a checkpoint or the log cannot be written.

- SIGTERM, SIGINT and SIGUSR1 in the training loop: the handler only notes the signal. The step
  finishes, every process learns of it from the step's all-reduce, then together they write ckpt.pt
  and exit with 128 + the signal's number, as a shell reports a process it ended (143, 130, 138).
  Megatron-LM's --exit-signal-handler and Lightning's SLURM requeue do the same. A signal that was
  ignored when the process started (nohup, a `&` job's SIGINT) stays ignored.
- A second signal ends the run at once: a checkpoint being written is removed, the previous one
  stays. The same signal again within a second is the same request (SLURM signals every process of
  a job step and torchrun forwards what it got: a worker receives the signal twice).
- A Python handler runs only between bytecodes of the main thread, so a process waiting in a
  collective for a peer that is stuck never runs it. The handler's C half also writes the signal's
  number to a pipe (signal.set_wakeup_fd); with several processes a thread reads it and, if no
  forward pass has finished for DEADLINE_S (a heartbeat: slow evaluations go on beating, a process
  waiting in a collective does not) before the step's end is reached, prints one line and ends the
  process: before torchrun's SIGKILL, 30 s after its SIGTERM (SLURM's KillWait is 30 s too). A peer
  that died outright makes gloo raise in the collective ("Connection reset by peer"): peer_failure names it.
"""

import os
import select
import shutil
import signal
import threading
import time

import torch

CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEADLINE_S = 20   # after a signal, the longest wait for a forward pass, several processes (torchrun's SIGKILL: 30 s)
SAME_REQUEST_S = 1.0


class Signalled(KeyboardInterrupt):
    """A signal that ends the run now (outside the loop, or a second one): KeyboardInterrupt's place."""

    def __init__(self, signum, again=False):
        super().__init__(signum)
        self.signum, self.again = signum, again


def name_of(signum):
    return signal.Signals(signum).name


class Signals:
    """This process's handlers for CAUGHT (one instance: signals are the process's). Modes: 'defer'
    in the training loop (note the first signal, act at the step's end), 'raise' after it (a signal
    raises Signalled at once), 'note' while a run ends with its own line (nothing more to do)."""

    def __init__(self):
        self.previous, self.mode, self.first, self.at = {}, "raise", None, 0.0
        self.settled = threading.Event()   # the step's end was reached: the deadline no longer applies
        self.beat = threading.Event()      # a forward pass finished (the process is not stuck)
        self.wakeup = None                 # (read end, write end, the wakeup fd before ours, the thread)

    def catch(self, deadline=None, on_deadline=None):
        """Install the handlers (main thread only; elsewhere Python refuses and nothing changes).
        deadline: with several processes, on_deadline(signum) runs if the step has not ended by then."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.first, self.mode = None, "defer"
        self.settled.clear()
        for sig in CAUGHT:
            handler = signal.getsignal(sig)
            if handler == signal.SIG_IGN or sig in self.previous:
                continue
            self.previous[sig] = handler
            signal.signal(sig, self._handle)
        if deadline and self.wakeup is None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            watcher = threading.Thread(target=self._watch, args=(read, deadline, on_deadline), daemon=True)
            self.wakeup = (read, write, signal.set_wakeup_fd(write), watcher)
            watcher.start()

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first is None:
            self.first, self.at = signum, now
            if self.mode == "raise":
                raise Signalled(signum)
        elif self.mode != "note" and not (signum == self.first and now - self.at < SAME_REQUEST_S):
            raise Signalled(signum, again=True)

    def _watch(self, read, deadline, on_deadline):
        while True:
            select.select([read], [], [])
            data = os.read(read, 64)
            if not data:            # release() closed the pipe
                return
            got = [b for b in data if b in CAUGHT]  # (any signal with a Python handler writes here)
            if got:
                break
        while not self.settled.is_set():  # every forward pass restarts the deadline
            self.beat.clear()
            if not self.beat.wait(deadline) and not self.settled.is_set():
                on_deadline(got[0])
                return

    def asked(self):
        """One flag per signal in CAUGHT: the first signal this process got."""
        return [float(sig == self.first) for sig in CAUGHT]

    def release(self):
        """The handlers and the wakeup fd as they were before catch()."""
        for sig, handler in self.previous.items():
            if handler is not None:  # (None: a handler installed from C, which Python cannot put back)
                signal.signal(sig, handler)
        self.previous, self.mode = {}, "raise"
        if self.wakeup is not None:
            read, write, before, watcher = self.wakeup
            signal.set_wakeup_fd(before)
            os.close(write)         # the watching thread reads the end of the pipe and returns
            self.settled.set()
            watcher.join()          # gone before Python shuts down, like gloo's threads (launch.end)
            os.close(read)
            self.wakeup = None


signals = Signals()


def say_and_exit(line, signum, show):
    """From the watching thread while the main thread is blocked: one line, then the exit status of
    the signal. os.write, not print: the main thread may hold the lock of sys.stderr."""
    if show:
        os.write(2, (line + "\n").encode())
    os._exit(128 + signum)


# ------------------------------------------------------------------------------------------------
# failures that are not the code's: one line each

def peer_failure(err):
    """The reason, if err is a collective that failed because another process of the run ended, else
    None. gloo raises a RuntimeError from its tcp transport ("[.../gloo/transport/tcp/pair.cc:537]
    Read error [127.0.0.1]:10909: Connection reset by peer. This is typically caused by ..."); the
    other backends raise torch's DistError."""
    text = str(err).strip()
    if not (isinstance(err, getattr(torch.distributed, "DistError", ())) or "/gloo/transport/" in text):
        return None
    return text.splitlines()[0].split("] ", 1)[-1].split(". ", 1)[0] if text else type(err).__name__


def out_of_memory(err):
    """What the allocator said, if err is a failed allocation, else None: CUDA's OutOfMemoryError,
    Python's MemoryError, or the CPU allocator's RuntimeError ("[enforce fail at alloc_cpu.cpp:127]
    err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12")."""
    text = str(err).strip()
    if "DefaultCPUAllocator: " in text:
        return "CPU: " + text.split("DefaultCPUAllocator: ", 1)[1].split(". ", 1)[0]
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return ". ".join(text.splitlines()[0].split(". ")[:2])[:200] if text else type(err).__name__
    return None


def lower_memory(batch_size, block_size, accum):
    """What to lower after an out-of-memory error, keeping the tokens per step where possible.
    accum: micro-steps per update over all processes (gradient_accumulation_steps as it resolved)."""
    if batch_size > 1:
        return (f"lower --batch_size={batch_size} or --block_size={block_size}; to keep the tokens per step, raise "
                f"--gradient_accumulation_steps as batch_size falls (e.g. --batch_size={batch_size // 2} "
                f"--gradient_accumulation_steps={2 * accum} if batch_size is even)")
    return f"lower --block_size={block_size} or the model's size (batch_size is 1 already)"


def write_failure(err):
    """The reason, if err is a failed write: an OSError, or the RuntimeError of torch's zip writer
    (a full disk shows as "[enforce fail at inline_container.cc:...] . unexpected pos ..."), else None."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = str(err)
    if isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "the write stopped short: torch's " + text.strip().splitlines()[0].split("] ", 1)[-1].strip(" .")[:120]
    return None


def space(out_dir, need):
    """What the error line of a failed write says about the space: needed and free, in MB."""
    try:
        free = f"{shutil.disk_usage(out_dir).free / 1e6:,.1f} MB are free there"
    except OSError:
        free = "the free space is unknown"
    return f"a checkpoint needs about {need / 1e6:,.1f} MB, {free}"


def tensor_bytes(obj):
    """The bytes of the tensors in a (nested) checkpoint: about what torch.save writes."""
    if torch.is_tensor(obj):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
