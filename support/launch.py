"""
Where a run runs: its device and dtype, its processes (torchrun: DDP, expert parallelism), and
whether the model fits in memory. Everything is checked before a file is touched.

    env = start(cfg, model_cfg)   # env.device, env.dtype, env.ddp, env.rank, env.world, env.master,
                                  # env.accum (micro-steps per process and step), env.autocast
    env.attach(model, cfg)        # expert parallel: keep this rank's experts; env.fwd: DDP and compile wrap it
    share(env, fn, *args)         # fn on the first process only; its UserError is raised on every one
    with env.watch(run, where, config, model) as watch:  # the training loop: signals, divergence, out of memory,
        watch.step_end(iter_num, snapshot)        # a process lost, each one line; a signal's checkpoint
    end(env)                      # the process groups torn down, their threads joined

On a CPU, Processes also tells glibc to keep freed memory (keep_freed_memory: page faults cost the
MoE step 5-10 % here: `python bench.py --malloc`).

What several processes add to a training step is here too, as methods of `env` that do nothing
with one process (train.train_step calls them): `micro_step` (DDP syncs gradients on the last
micro-step only), `pool` (L_lb's statistics of the global batch), `mean` (the logged numbers of all
processes, and in the same all-reduce what any process asks of the step's end: a signal came, a
timed checkpoint is due; see support/stopping.py), `finish_grads` (expert parallel averages its
gradients itself; one clipping norm over the whole model) and `step_load` (the bias update of a
router with select_bias sees every process's load).
"""

import ctypes
import hashlib
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: its functions take `group=group.WORLD` as
# a default argument, evaluated at import. DDP imports it lazily, i.e. after init_process_group,
# and those defaults would then keep the group alive after destroy_process_group; gloo's worker
# threads outlived Python and now and then aborted the process at exit ("terminate called without
# an active exception", about 1 run in 10 on a loaded 2-core machine).
import torch.distributed.nn.functional  # noqa: F401

from support import stopping
from support.rundir import Diverged, Interrupted, Stopped, UserError, check_finite
from support.stopping import CAUGHT, DEADLINE_S, Signalled, name_of, signals


def keep_freed_memory():
    """On Linux with glibc: serve CPU tensors from the heap and keep what is freed for the next ones.
    glibc as it comes maps fresh pages for large blocks and gives them back when freed, so many new
    activations and gradients page-fault on their first write: the default MoE training step took
    ~4,800 faults (median step) on this project's 2-core machine, 1 with this, and went from
    1.34-1.40x the dense step to 1.25-1.31x (`python bench.py --malloc`; one MoE layer at E=64, k=8:
    1.79x -> 1.56x the dense MLP). The price: up to 1 GiB of freed
    memory stays with the process. PyTorch's CPU tuning guide suggests another allocator (jemalloc,
    tcmalloc) for the same reason; this needs nothing installed. Elsewhere (macOS, musl) it does nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3   # glibc's <malloc.h>
    return all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, 32 << 20),   # blocks up to 32 MiB (glibc's maximum) from the heap
        (M_TRIM_THRESHOLD, 1 << 30),    # free memory at the heap's top given back only beyond 1 GiB
        (M_TOP_PAD, 64 << 20)))         # the heap grows 64 MiB at a time


def pick_device(cfg, model_cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device} but no CUDA device is available (use --device=cpu)")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UserError(f"device={device} but there are {torch.cuda.device_count()} CUDA devices")
    if cfg.router_impl == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("router_impl=triton needs a CUDA device (on a CPU, TRITON_INTERPRET=1 runs the kernel in "
                        "Triton's interpreter, slowly; or use router_impl=torch)")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def check_memory(model_cfg, device):
    """Refuse a model that cannot fit, before allocating it."""
    n = model_cfg.param_count()
    need = 16 * n  # fp32 weights, gradients and AdamW's two moments
    if device.startswith("cuda"):
        have, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, device
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        raise UserError(f"the model has {n / 1e6:,.0f}M parameters: about {need / 2**30:,.1f} GiB for weights, "
                        f"gradients and AdamW state, more than the {have / 2**30:,.1f} GiB of {where}")


def start(cfg, model_cfg):
    """Check the device, the memory and the process layout, then join the process group (torchrun)."""
    device, dtype = pick_device(cfg, model_cfg)
    check_memory(model_cfg, device)
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1))) if ddp else (0, 1)
    accum = cfg.gradient_accumulation_steps or world
    if accum % world != 0:
        raise UserError(f"gradient_accumulation_steps={accum} must be a multiple of the {world} processes "
                        f"(or 0 = one micro-step per process)")
    N = cfg.expert_parallel
    if N > 1:  # support/parallel.py: the experts of every layer split over N processes
        for ok, why in ((ddp, "needs several processes: torchrun --nproc_per_node=N train.py ..."),
                        (world % N == 0, f"must divide the number of processes ({world})"),
                        (model_cfg.n_experts % N == 0, f"must divide n_experts ({model_cfg.n_experts})"),
                        (model_cfg.dispatch == "sorted", "needs dispatch=sorted"),
                        (model_cfg.capacity_factor == 0, "needs capacity_factor=0 (dropless)"),
                        (not {"expert_bias", "zero_experts", "gate_input"} & set(getattr(model_cfg, "changed", ())),
                         "has no expert_bias, zero_experts or gate_input"),
                        (model_cfg.router != "expert_choice",
                         "needs a token-choice router (expert choice drops pairs)")):
            if not ok:
                raise UserError(f"expert_parallel={N} {why}")
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    return Processes(device, dtype, rank, world, accum // world, ddp)


class Processes:
    """The device and processes of a run, and what several processes add to a step."""

    def __init__(self, device, dtype, rank=0, world=1, accum=1, ddp=False):
        self.device, self.dtype, self.rank, self.world, self.accum, self.ddp = device, dtype, rank, world, accum, ddp
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        if self.device_type == "cpu":
            keep_freed_memory()
        self.autocast = torch.autocast(self.device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
        self.master = rank == 0
        self.ep = None      # a support.parallel.ExpertParallel once the experts are split over processes
        self.fwd = None     # the module train_step calls (attach: compiled, DDP); None: the model itself
        self.pool = None    # losses.aux_losses' pool: L_lb's statistics over every process's batch
        self.asks = None    # -> this process's requests for the step's end, while a Watch runs (below)
        self.agreed = None  # what all processes asked at the last step: summed by mean()

    def attach(self, model, cfg):
        """Expert parallel: keep this rank's experts of every layer (call after loading the full weights). Sets
        self.fwd, the module to call: torch.compile'd if asked, wrapped in DDP for plain data parallelism."""
        if cfg.expert_parallel > 1:
            from support.parallel import ExpertParallel
            self.ep = ExpertParallel(cfg.expert_parallel)
            self.ep.shard(model)
        if self.ddp and cfg.balance_stats == "global":
            from support.parallel import pooled_balance
            self.pool = pooled_balance(dist.group.WORLD)
        fwd = torch.compile(model) if cfg.compile else model
        if self.ddp and self.ep is None:  # expert parallel syncs its gradients itself
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd = DDP(fwd, device_ids=[int(os.environ["LOCAL_RANK"])] if self.device_type == "cuda" else None)
        self.fwd = fwd

    def micro_step(self, micro):
        """DDP all-reduces the gradients only on the last micro-step of a step."""
        if hasattr(self.fwd, "require_backward_grad_sync"):
            self.fwd.require_backward_grad_sync = micro == self.accum - 1

    def mean(self, stats):
        """stats (n,) -> the mean over processes (a NaN on any process reaches every one). The same
        all-reduce carries every process's requests for the step's end (self.agreed: how many processes
        got each signal, how many have a timed checkpoint due), so that all of them act after the same
        step with no collective of their own (what it costs: `python bench.py --parallel`)."""
        asks = self.asks() if self.asks else []
        if self.ddp:
            both = torch.cat([stats, torch.tensor(asks, dtype=stats.dtype, device=stats.device)])
            dist.all_reduce(both)
            stats, self.agreed = both[:len(stats)] / self.world, both[len(stats):]
        else:
            self.agreed = asks
        return stats

    def finish_grads(self, model, max_norm):
        """The step's gradients complete (expert parallel: the replicated parameters' averaged over processes),
        then clipped to max_norm (0: not clipped)."""
        if self.ep is not None:
            self.ep.sync_grads(model)
            if max_norm > 0:
                self.ep.clip_grad_norm(model, max_norm)
        elif max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def step_load(self, counts):
        """counts (L, E) of this process's micro-batches -> those of every process (the same update everywhere)."""
        if self.ddp:
            dist.all_reduce(counts)
        return counts

    def watch(self, run, where, config, model):
        """The training loop runs inside (Watch, below): a signal is acted on at the step's end, together;
        whatever else ends the loop is one line. run: support.rundir.Run; where(): the iteration; model:
        its forward passes are the heartbeat that tells a slow process from one stuck in a collective."""
        return Watch(run, where, self, config, model)

    def full_state(self, model, optimizer):
        """(model state, optimizer state) of the whole model: with expert parallelism gathered from every rank."""
        return self.ep.full_state(model, optimizer) if self.ep else (model.state_dict(), optimizer.state_dict())


def share(env, fn, *args):
    """Run fn on the first process only; under DDP every process raises the same UserError if it failed."""
    value, message = None, None
    if env.master:
        try:
            value = fn(*args)
        except UserError as err:
            message = str(err)
    if env.ddp:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)
    return value


def all_ranks_min(env):
    """A reduce for rundir.check_finite: every process decides alike (one holds a NaN: all stop)."""
    return (lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN)) if env.ddp else None


def all_ranks_sum(env):
    """A function that sums a tensor over every process in place (None with one process)."""
    return (lambda t: dist.all_reduce(t)) if env.ddp else None


def weight_hashes(env, weights):
    """The sha256 of every process's whole model, gathered (identical replicas: one value)."""
    digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in weights.values())).hexdigest()
    hashes = [None] * env.world
    dist.all_gather_object(hashes, digest)
    return hashes


def end(env):
    """Destroy the process groups while Python is alive: the last reference to each goes, and its
    worker threads are joined here, not during interpreter shutdown (see the imports). Drop the DDP
    wrapper first: its reducer frees a group it holds the last reference to with the GIL held,
    while a gloo thread may wait for the GIL to free a finished collective's tensor: a deadlock
    (seen at the end of a run, now and then)."""
    if env.ddp:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# the training loop's watch: what ends a run from outside, acted on by all processes alike

class Watch:
    """Around the training loop (env.watch): the signal handlers (support/stopping.py); at every
    step's end what the processes asked in its all-reduce (step_end); whatever else ends the loop
    becomes one line (one_line), with the exit status of a signal if one came."""

    def __init__(self, run, where, env, config, model):
        self.run, self.where, self.env, self.config, self.model, self.hook = run, where, env, config, model, None

    def __enter__(self):
        self.run.saved_at = time.monotonic()
        run, where = self.run, self.where  # (not self: the watching thread must not hold env, its groups)
        signals.catch(DEADLINE_S if self.env.ddp else None, lambda signum: past_deadline(run, where, signum))
        if self.env.ddp:
            self.hook = self.model.register_forward_hook(lambda *_: signals.beat.set())
        self.env.asks = self.asks
        return self

    def __exit__(self, kind, err, traceback):
        self.env.asks = None
        if self.hook is not None:
            self.hook.remove()
        if err is not None:
            signals.mode = "note"  # the run ends with its own line: a signal now changes nothing
            line = self.one_line(err, self.where())
            if line is not err:
                raise line from None
            return False
        signals.mode = "raise"     # after the loop (samples, plots) a signal ends the run at once
        signals.settled.set()
        got = torch.tensor(signals.asked())
        if self.env.ddp:           # a signal that reached some processes only: all of them stop alike
            dist.all_reduce(got)
        if got.any():              # it came during the final evaluation, whose checkpoint is written
            first = next(sig for sig, n in zip(CAUGHT, got.tolist()) if n)
            raise Stopped(f"stopped by {name_of(first)} after the last step (iter {self.where()}): "
                          f"{self.run.out_dir}/ckpt.pt is the final checkpoint; samples and plots skipped", first)
        return False

    def asks(self):
        """This process's requests for the step's end (mean() carries them): the signal it got, and
        whether --ckpt_interval_s has passed since the last checkpoint."""
        every = self.config.get("ckpt_interval_s", 0)
        return [*signals.asked(), float(0 < every <= time.monotonic() - self.run.saved_at)]

    def step_end(self, iter_num, snapshot):
        """What the processes asked in the step's all-reduce: after a signal, ckpt.pt (best.pt is left as
        it is), a log record, one line and the exit status 128 + the signal (Stopped); after
        --ckpt_interval_s, ckpt.pt. snapshot(): the checkpoint (a collective with expert parallelism:
        every process calls it, as all of them agree on what was asked)."""
        asked = self.env.agreed.tolist() if torch.is_tensor(self.env.agreed) else self.env.agreed
        signum = next((sig for sig, n in zip(CAUGHT, asked) if n), None)
        if signum is not None:
            signals.settled.set()  # every process reached the step's end: no deadline while writing
        if (signum is None and not asked[-1]) or iter_num >= self.config["max_iters"]:
            return  # (after the last step the final evaluation writes the checkpoint)
        ckpt = snapshot()
        check_finite({}, ckpt["model"].values(), all_ranks_min(self.env))
        self.run.checkpoint(ckpt, iter_num, best=False)
        if signum is not None:
            self.run.log({"iter": iter_num, "stopped": name_of(signum)})
            raise Stopped(f"stopped by {name_of(signum)} at iter {iter_num}: checkpoint written to "
                          f"{self.run.out_dir}/ckpt.pt; continue with --init_from=resume", signum)

    def one_line(self, err, at):
        """The one line for what ended the loop at iteration `at` (err itself: already one line, or a bug)."""
        if isinstance(err, Stopped) or not isinstance(err, (Exception, KeyboardInterrupt)):
            return err
        last = self.run.last()
        if isinstance(err, KeyboardInterrupt):  # a second signal, or Ctrl-C where the handler is not ours
            signum = getattr(err, "signum", signal.SIGINT)
            what = None
            if isinstance(err, Signalled):
                what = f"a second {name_of(signum)}" if err.again else name_of(signum)
            return Interrupted(f"stopped by {what} at iter {at}; {last}" if what else
                               f"interrupted at iter {at}; {last}", signum)
        if isinstance(err, Diverged):
            line = Diverged(f"{err} at iter {at}; stopped without saving: {last}")
        elif stopping.out_of_memory(err):
            c, accum = self.config, self.env.accum * self.env.world
            line = UserError(f"out of memory at iter {at} ({stopping.out_of_memory(err)}): "
                             f"{stopping.lower_memory(c['batch_size'], c['block_size'], accum)}; {last}")
        elif self.env.ddp and stopping.peer_failure(err):
            line = UserError(f"another process of this run failed or ended at iter {at} "
                             f"({stopping.peer_failure(err)}); stopped without saving: {last}")
        else:
            return err  # a UserError already says it all (a full disk); anything else is a bug: its traceback
        if signals.first is not None:
            line.exit_status = 128 + signals.first
        return line


def past_deadline(run, where, signum):
    """(the watching thread) The step did not end DEADLINE_S after the signal: one line, the exit."""
    stopping.say_and_exit(f"error: stopped by {name_of(signum)} at iter {where()}: the step did not end within "
                          f"{DEADLINE_S} s of it (a process of the run is gone or stuck); stopped without saving: "
                          f"{run.last()}", signum, run.master)
