"""
Train a GPT-MoE. nanoGPT layout: the settings are declared once, below (training) and in GPTConfig
(model.py); override them with config files and --key=value, e.g.

    python train.py                                   # the teaching run (CPU preset without a GPU)
    python train.py config/ermoe.py --max_iters=500   # a config file, then overrides
    python train.py --init_from=resume --max_iters=2000   # continue out/ckpt.pt with its own settings
    torchrun --standalone --nproc_per_node=2 train.py # DDP, one process per GPU (gloo on CPU)

Loss (docs/design.md §3): CE + c_lb*L_lb + c_z*L_z + c_sp*R_sp + c_cp*R_cp (+ mu_ortho * penalty).
Every `eval_interval` steps: val loss and per-layer routing metrics (metrics.py) are printed and
appended to out_dir/log.jsonl, and out_dir/ckpt.pt is written atomically. At the end: samples and
PNG plots (analyze.py).

Nothing is lost (rundir.py): every setting, the data and the model size are checked before any
file is touched, and a mistake ends in one `error:` line; a new run refuses an out_dir that holds
another run (unless overwrite=True); one run per out_dir (a lock); the NaN guard runs before every
checkpoint, so a checkpoint on disk is always finite; Ctrl-C stops cleanly at the last checkpoint.
"""

import ast
import hashlib
import math
import os
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from losses import aux_losses
from metrics import RoutingStats
from model import GPT, GPTConfig
from router import ROUTERS
from rundir import (Interrupted, RunLock, UserError, all_finite, append_log, check_writable_dir, cli,
                    describe_run, load_checkpoint, read_log, remove_stale_temp_files, rewrite_log, save_checkpoint)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                 # where ckpt.pt, log.jsonl and the plots go
    init_from: str = "scratch"           # 'scratch' or 'resume' (continue out_dir/ckpt.pt with its settings)
    overwrite: bool = False              # let a new run replace the run already in out_dir (else refused)
    eval_interval: int = 100             # evaluate, log routing metrics and checkpoint every this many steps
    log_interval: int = 10               # print and log a train line every this many steps
    eval_iters: int = 40                 # batches per evaluation (the same batches every time)
    num_samples: int = 2                 # text samples printed at the end (0 = none)
    sample_tokens: int = 120             # tokens per sample
    # data
    dataset: str = "shakespeare"         # data/<dataset>/input.txt (GPT-2 BPE), or 'synthetic' (data.SyntheticMixture)
    batch_size: int = 32                 # sequences per micro-step and process
    gradient_accumulation_steps: int = 0  # micro-steps per update over all processes; 0 = one per process
    # MoE losses (coefficients; each term is also logged unscaled)
    c_lb: float = 0.01                   # load balancing (routers may default to 0: ermoe, sigmoid, hash)
    c_z: float = 1e-3                    # router z-loss (routers may default to 0: ermoe, sigmoid, hash)
    c_sp: float = 2e-3                   # specialization loss (Hu et al. 2026, Eq. 4); 0 = off
    c_cp: float = 1e-3                   # cross-layer coupling loss (Hu et al. 2026, Eq. 7); 0 = off
    mu_ortho: float = 1e-2               # soft orthogonality penalty, only with ermoe_basis='penalty'
    # optimizer: AdamW, linear warmup then cosine decay to min_lr
    learning_rate: float = 1e-3          # peak learning rate
    max_iters: int = 1000                # optimizer steps in all (0 = evaluate only)
    weight_decay: float = 0.1            # AdamW decay on matrices (not on norms and routers)
    beta1: float = 0.9                   # AdamW beta1, in [0, 1)
    beta2: float = 0.95                  # AdamW beta2, in [0, 1)
    grad_clip: float = 1.0               # clip the gradient norm to this; 0 = off
    warmup_iters: int = 100              # linear warmup steps
    lr_decay_iters: int = 0              # cosine decay length; 0 = max_iters
    min_lr: float = 1e-4                 # learning rate at the end of the decay, <= learning_rate
    # system
    device: str = "auto"                 # 'auto' (cuda if present, else cpu with the CPU preset) | 'cpu' | 'cuda[:N]'
    dtype: str = "auto"                  # 'auto' (bfloat16 autocast on CUDA, else float32) | 'bfloat16' | 'float32'
    compile: bool = True                 # torch.compile the model (off in the CPU preset unless set)
    seed: int = 1337                     # seed of the initialisation and the training batches
    expert_parallel: int = 1             # N > 1: each MoE layer's experts split over N processes (torchrun; parallel.py)
    balance_stats: str = "global"        # L_lb's statistics over all processes' batches ('global') or each one's ('local')

    def __post_init__(self):
        ints = {"eval_interval": 1, "log_interval": 1, "eval_iters": 1, "sample_tokens": 1, "batch_size": 1,
                "num_samples": 0, "gradient_accumulation_steps": 0, "max_iters": 0, "warmup_iters": 0,
                "lr_decay_iters": 0, "seed": 0}
        for name, low in ints.items():
            _require(getattr(self, name) >= low, f"{name} must be >= {low}, got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                _require(math.isfinite(value) and value >= 0, f"{f.name} must be a finite number >= 0, got {value}")
        _require(self.beta1 < 1 and self.beta2 < 1, f"beta1 and beta2 must be < 1, got {self.beta1}, {self.beta2}")
        _require(self.min_lr <= self.learning_rate, f"min_lr ({self.min_lr}) must be <= learning_rate ({self.learning_rate})")
        _require(self.learning_rate / (1 - self.beta1) < torch.finfo(torch.float32).max,  # AdamW's first step size
                 f"learning_rate={self.learning_rate} overflows float32 in AdamW's first step (lr / (1 - beta1))")
        _require(self.init_from in ("scratch", "resume"), f"init_from must be scratch or resume, got '{self.init_from}'")
        _require(self.dtype in ("auto", "bfloat16", "float32"), f"dtype must be auto, bfloat16 or float32, got '{self.dtype}'")
        _require(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
                 f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        _require(self.dataset != "", "dataset is empty: give a name under data/, or synthetic")
        _require(self.expert_parallel >= 1, f"expert_parallel must be >= 1 (1 = off), got {self.expert_parallel}")
        _require(self.balance_stats in ("global", "local"), f"balance_stats must be global or local, got '{self.balance_stats}'")
        _require(self.out_dir != "", "out_dir is empty: give a directory, e.g. --out_dir=out")


def _require(ok, message):
    if not ok:
        raise UserError(message)


# Without a GPU, `python train.py` runs this small model instead (< 10 min on 2 CPU cores).
# Keys set explicitly in a config file or on the command line still win.
CPU_PRESET = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, n_experts=4, top_k=2,
                  batch_size=16, max_iters=500, eval_interval=100, eval_iters=10, log_interval=20,
                  warmup_iters=50, learning_rate=2e-3, min_lr=2e-4, compile=False, sample_tokens=60)
# What a resumed run may change; any other setting comes from the checkpoint, and a different value
# on the command line is refused (it would silently continue another experiment).
RESUMABLE = ("init_from", "out_dir", "overwrite", "max_iters", "lr_decay_iters", "eval_interval", "log_interval",
             "eval_iters", "num_samples", "sample_tokens", "device", "dtype", "compile", "router_impl", "dispatch",
             "expert_parallel")

# ------------------------------------------------------------------------------------------------
# settings: defaults <- preset <- config files <- --key=value (or <- the checkpoint, on resume)


def default_settings():
    """Every key --key=value accepts, with its declared default. Model widths stay 0 ("derive
    from the final settings") until GPTConfig is built from the final values."""
    return {f.name: f.default for cls in (TrainConfig, GPTConfig) for f in fields(cls)}


def setting_notes():
    """Each setting's trailing comment where it is declared (TrainConfig above, GPTConfig)."""
    import inspect
    import re
    text = inspect.getsource(TrainConfig) + inspect.getsource(GPTConfig)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\w+)\s*:\s*\w+\s*=[^#\n]*#\s*(.*)$", text, re.M)}


def read_config_file(path):
    """The settings a config file assigns (a Python file of `key = value` lines)."""
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a directory")
    try:
        code = compile(open(path, encoding="utf-8").read(), path, "exec")
    except SyntaxError as err:
        raise UserError(f"config file {path} line {err.lineno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path} ({err})") from None
    scope = {}
    try:
        exec(code, {}, scope)
    except Exception as err:  # the user's code: report its line, not our traceback
        tb, line = err.__traceback__, "?"
        while tb is not None:
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else line
            tb = tb.tb_next
        raise UserError(f"config file {path} line {line} raised {type(err).__name__}: {err}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_")
            and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def coerce(key, value, defaults, origin):
    """value as the type of the setting's default (an int is accepted for a float)."""
    if key not in defaults:
        import difflib
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see python train.py --help"
        raise UserError(f"unknown setting '{key}' ({origin}); {hint}")
    want = type(defaults[key])
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise UserError(f"setting '{key}' expects {want.__name__}, got {value!r} ({origin})")
    return value


def parse_args(argv, defaults):
    """Config files first, then --key=value, over `defaults` -> (values, explicitly set keys)."""
    values, explicit = dict(defaults), set()
    bare = [a for a in argv if a.startswith("--") and "=" not in a]
    if bare:  # checked first: `--n_layer 4` would otherwise read 4 as a config file
        raise UserError(f"expected --key=value, got '{bare[0]}'")
    for arg in sorted(argv, key=lambda a: a.startswith("--")):
        if arg.startswith("--"):
            key, _, raw = arg[2:].partition("=")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = raw  # a bare word is a string
            pairs, origin = [(key, value)], "command line"
        else:
            pairs, origin = read_config_file(arg).items(), arg
        for key, value in pairs:
            values[key] = coerce(key, value, defaults, origin)
            explicit.add(key)
    return values, explicit


def saved_settings(ckpt, defaults, path):
    """The settings stored in a checkpoint, checked like the command line (model_args wins)."""
    config, model_args = ckpt["config"], ckpt["model_args"]
    if not isinstance(config, dict) or not isinstance(model_args, dict):
        raise UserError(f"checkpoint {path} has no settings (config/model_args are not dicts)")
    unknown = sorted(set(model_args) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise UserError(f"checkpoint {path} has model settings this version does not know: {', '.join(unknown)}")
    merged = {k: v for k, v in config.items() if k in defaults}  # settings retired since are ignored
    merged.update(model_args)
    return {**defaults, **{k: coerce(k, v, defaults, path) for k, v in merged.items()}}


def resolve(values):
    """Checked TrainConfig and GPTConfig from flat settings (GPTConfig derives the widths)."""
    try:
        model_cfg = GPTConfig(**{f.name: values[f.name] for f in fields(GPTConfig)})
    except ValueError as err:
        raise UserError(str(err)) from None
    return TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig)}), model_cfg


def setup(argv):
    """Settings of this run -> (TrainConfig, GPTConfig, checkpoint or None). Touches no file."""
    defaults = default_settings()
    values, explicit = parse_args(argv, defaults)
    if values["init_from"] == "resume":
        ckpt = load_checkpoint(values["out_dir"], hint="nothing to resume; drop --init_from=resume to start a run")
        saved = saved_settings(ckpt, defaults, os.path.join(values["out_dir"], "ckpt.pt"))
        wanted = {**saved, **{k: values[k] for k in explicit}}
        cfg, model_cfg = resolve(wanted)
        final = {**asdict(cfg), **asdict(model_cfg)}
        conflicts = [k for k in sorted(explicit) if k not in RESUMABLE and final[k] != saved[k]]
        if conflicts:
            raise UserError(f"resuming keeps the checkpoint's settings, but {', '.join(f'--{k}={values[k]!r}' for k in conflicts)} "
                            f"differ from it ({', '.join(f'{k}={saved[k]!r}' for k in conflicts)}); settings that may "
                            f"change on resume: {', '.join(RESUMABLE)}")
        if cfg.max_iters <= ckpt["iter_num"]:
            raise UserError(f"the checkpoint is at iter {ckpt['iter_num']} and max_iters={cfg.max_iters}: nothing to "
                            f"train (give a larger --max_iters)")
        return cfg, model_cfg, ckpt
    if values["device"] == "auto" and not torch.cuda.is_available():
        preset = {k: v for k, v in CPU_PRESET.items() if k not in explicit}
        values.update(preset)
        print(f"no GPU found: running the CPU preset ({', '.join(f'{k}={v}' for k, v in preset.items())})")
    if values["router"] in ROUTERS:  # the router's own default coefficients (e.g. no L_lb for ERMoE)
        values.update({k: v for k, v in ROUTERS[values["router"]].defaults.items() if k not in explicit})
    cfg, model_cfg = resolve(values)
    if model_cfg.top_k == 1 and model_cfg.gate_renorm and model_cfg.n_experts > 0:
        print("note: top_k=1 with gate_renorm=True makes every gate 1: the router then learns only "
              "from the auxiliary losses (set gate_renorm=False for Switch-style gates = p)")
    return cfg, model_cfg, None


# ------------------------------------------------------------------------------------------------
# what the settings need from this machine: a device, the data, enough memory

def pick_device(cfg, model_cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device} but no CUDA device is available (use --device=cpu)")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UserError(f"device={device} but there are {torch.cuda.device_count()} CUDA devices")
    if model_cfg.router_impl == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
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


def open_data(cfg, model_cfg, master, rank=0, world=1):
    """-> batch(split, generator, device, rank=0, world=1) -> (x, y, source labels or None), and the
    mixture if synthetic. With world > 1 each process gets its slice of one global batch."""
    from data import SyntheticMixture, get_batch, load_split, max_token_id, prepare
    B, S = cfg.batch_size, model_cfg.block_size
    if cfg.dataset == "synthetic":  # generated on the fly; the mixture itself is fixed (seed 0)
        if model_cfg.vocab_size < 16:
            raise UserError(f"dataset=synthetic needs vocab_size >= 16, got {model_cfg.vocab_size}")
        mixture = SyntheticMixture(vocab=min(256, model_cfg.vocab_size))

        def synthetic(split, gen, device, rank=0, world=1):
            return tuple(t[rank * B:(rank + 1) * B] for t in mixture.batch(B * world, S, gen, device))
        return synthetic, mixture
    folder = prepare(cfg.dataset, verbose=master)
    splits = {split: load_split(folder, split) for split in ("train", "val")}
    for split, data in splits.items():
        if len(data) <= S:
            raise UserError(f"dataset '{cfg.dataset}': the {split} split has {len(data):,} tokens, fewer than "
                            f"block_size+1 = {S + 1} (use a smaller --block_size or more text)")
    top = max_token_id(folder)
    if top >= model_cfg.vocab_size:
        raise UserError(f"dataset '{cfg.dataset}' has token id {top}, outside vocab_size={model_cfg.vocab_size}")
    return (lambda split, gen, device, rank=0, world=1:
            (*get_batch(splits[split], B, S, gen, device, rank, world), None)), None


# ------------------------------------------------------------------------------------------------
# optimisation

def get_lr(it, cfg):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device_type):
    """AdamW; no weight decay on norms, biases and anything of the router (incl. ERMoE P, lambda, beta)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


class Diverged(UserError):
    """The loss or the weights became NaN/inf."""


def train_step(model, optimizer, next_batch, accum, coefs, grad_clip, autocast, log_terms, ddp, routers,
               ep=None, balance_group=None):
    """One optimizer step: `accum` micro-batches of forward + losses + backward, then the NaN/inf
    guard (before the update, so the weights stay finite), clipping, the AdamW update, and the
    routers' per-step hooks (e.g. the sigmoid router's bias) with the step's load of every process.
    ep: an expert-parallel layout (parallel.py), which syncs and clips its gradients itself.
    Returns (CE loss, unscaled auxiliary terms) averaged over the micro-batches (and processes)."""
    ce_sum, total_sum, terms_sum, counts = 0.0, 0.0, {}, 0
    hooked = any(r.per_step for r in routers)
    for micro in range(accum):
        X, Y, _ = next_batch()
        if isinstance(model, DDP):  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            _, ce, routes = model(X, Y)
            aux, terms = aux_losses(routes, **coefs, all_terms=log_terms,  # zero-coefficient terms: log steps only
                                    balance_group=balance_group)
            loss = (ce + aux) / accum
        loss.backward()
        ce_sum = ce_sum + ce.detach() / accum
        total_sum = total_sum + loss.detach()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / accum
        if hooked:
            counts = counts + torch.stack([r.counts for r in routes])    # (L, E) load of the step
    if ep is not None:
        ep.sync_grads(model)
    stats = torch.stack([ce_sum, total_sum, *terms_sum.values()]).float()
    if ddp:  # a NaN on any process stops every process; the logged terms are means over processes
        dist.all_reduce(stats)
        stats /= dist.get_world_size()
    ce_f, total_f, *terms_f = stats.tolist()  # the one host sync of a step: needed to stop before the update
    if not math.isfinite(total_f):
        raise Diverged(f"loss is {total_f}")
    if grad_clip > 0 and ep is not None:
        ep.clip_grad_norm(model, grad_clip)
    elif grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hooked:
        if ddp:  # every process applies the same update from the global load
            dist.all_reduce(counts)
        for router, c in zip(routers, counts):
            router.update(c)
    return ce_f, dict(zip(terms_sum, terms_f))


@torch.no_grad()
def evaluate(model, batch, cfg, autocast, device, mixture):
    """Mean loss on the same eval_iters batches of each split, and routing metrics on val."""
    model.eval()
    result, stats = {}, RoutingStats(n_labels=mixture.n_sources if mixture else 0)
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(1 if split == "train" else 2)  # same batches for every seed
        losses = []
        for _ in range(cfg.eval_iters):
            X, Y, labels = batch(split, gen, device)
            with autocast:
                _, loss, routes = model(X, Y)
            losses.append(loss.float())
            if split == "val":
                stats.update(routes, labels)
        result[f"{split}_loss"] = torch.stack(losses).mean().item()
    model.train()
    layers = stats.summary()
    for m, router in zip(layers, model.routers()):
        m.update(router.metrics())  # each router's own: ERMoE geometry, the sigmoid router's bias, ...
    return result, layers


# ------------------------------------------------------------------------------------------------
# the run

def share(fn, ddp, *args):
    """Run fn on rank 0 only; under DDP every rank raises the same UserError if rank 0 failed."""
    value, message = None, None
    if not ddp or dist.get_rank() == 0:
        try:
            value = fn(*args)
        except UserError as err:
            message = str(err)
    if ddp:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)
    return value


def prepare_out_dir(cfg, ckpt):
    """Lock out_dir, refuse to replace another run, then cut the log back to the checkpoint."""
    check_writable_dir(cfg.out_dir)
    lock = RunLock(cfg.out_dir).acquire()
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if ckpt:
        kept = []
        if os.path.exists(log_path):  # keep the log up to the checkpoint; the rest is redone
            kept = [r for r in read_log(log_path) if r["iter"] < ckpt["iter_num"]
                    or (r["iter"] == ckpt["iter_num"] and "val_loss" not in r)]
    else:
        existing = describe_run(cfg.out_dir)
        if existing and not cfg.overwrite:
            raise UserError(f"{cfg.out_dir} already holds a run ({existing}); resume it with --init_from=resume, "
                            f"choose another --out_dir, or pass --overwrite=True to replace it")
        kept = []
        if os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
            os.remove(os.path.join(cfg.out_dir, "ckpt.pt"))
    lock.mark()
    remove_stale_temp_files(cfg.out_dir)
    rewrite_log(log_path, kept)
    return lock, log_path


def main(argv):
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once in a log file too
    if {"-h", "--help"} & set(argv):
        notes = setting_notes()
        print(__doc__ + "\nsettings (--key=default  what it is):\n" +
              "\n".join(f"  {f'--{k}={v!r}':<34} {notes.get(k, '')}" for k, v in default_settings().items()))
        return
    ddp = "RANK" in os.environ
    try:
        run(argv, ddp, int(os.environ.get("RANK", 0)))
    except KeyboardInterrupt:  # outside the training loop, which says where it stopped
        raise Interrupted("interrupted (the checkpoint in out_dir, if any, is intact)") from None


def run(argv, ddp, rank):
    cfg, model_cfg, ckpt = setup(argv)
    device, dtype = pick_device(cfg, model_cfg)
    check_memory(model_cfg, device)
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    accum = cfg.gradient_accumulation_steps or world
    if accum % world != 0:
        raise UserError(f"gradient_accumulation_steps={accum} must be a multiple of the {world} processes "
                        f"(or 0 = one micro-step per process)")
    accum //= world
    N = cfg.expert_parallel
    if N > 1:  # parallel.py: the experts of every layer split over N processes
        for ok, why in ((ddp, "needs several processes: torchrun --nproc_per_node=N train.py ..."),
                        (world % N == 0, f"must divide the number of processes ({world})"),
                        (model_cfg.n_experts % N == 0, f"must divide n_experts ({model_cfg.n_experts})"),
                        (model_cfg.dispatch == "sorted", "needs dispatch=sorted"),
                        (model_cfg.capacity_factor == 0, "needs capacity_factor=0 (dropless)")):
            if not ok:
                raise UserError(f"expert_parallel={N} {why}")
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    master = rank == 0
    share(open_data, ddp, cfg, model_cfg, master)  # rank 0 checks the data and tokenises it once
    batch, mixture = open_data(cfg, model_cfg, master)  # then every process opens it (cached bins)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    if ckpt:  # checked before the out_dir is touched; a checkpoint always holds the whole model
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"checkpoint weights do not match its model_args ({str(err).splitlines()[0]})") from None
    ep = None
    if N > 1:
        from parallel import ExpertParallel
        ep = ExpertParallel(N)
        ep.shard(model)  # keep this rank's E/N experts of every layer
    optimizer = make_optimizer(model, cfg, "cuda" if device.startswith("cuda") else "cpu")
    if ckpt and ckpt["optimizer"] is not None:  # None: imported weights (convert.py), a fresh optimizer
        try:
            optimizer.load_state_dict(ep.shard_optimizer_state(ckpt["optimizer"], optimizer, model) if ep
                                      else ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"checkpoint optimizer state does not match the model ({str(err).splitlines()[0]})") from None
    lock, log_path = share(prepare_out_dir, ddp, cfg, ckpt) or (None, os.path.join(cfg.out_dir, "log.jsonl"))
    try:
        loop(cfg, model_cfg, ckpt, model, optimizer, device, dtype, accum, world, rank, ddp, ep, batch, mixture,
             log_path)
    finally:
        if ddp:
            dist.destroy_process_group()


def loop(cfg, model_cfg, ckpt, model, optimizer, device, dtype, accum, world, rank, ddp, ep, batch, mixture,
         log_path):
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # one global batch per step, sliced per process
    iter_num, best_val, saved_iter = 0, float("inf"), None
    if ckpt:
        if ckpt["batch_rng"]:  # (none: imported weights) one state resumes any number of processes
            batch_gen.set_state(ckpt["batch_rng"][0])
        torch.set_rng_state(ckpt["torch_rng"])
        iter_num, best_val, saved_iter = ckpt["iter_num"], ckpt["best_val"], ckpt["iter_num"]
        if master:
            print(f"resumed from {cfg.out_dir}/ckpt.pt at iter {iter_num}")
    total, active = model.num_params()
    if master:
        widths = f"expert width f={model_cfg.expert_hidden}" if model_cfg.n_experts else f"MLP width {model_cfg.ffn_hidden}"
        print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token "
              f"({model_cfg.n_experts} experts, top-{model_cfg.top_k}, {widths}, router={model_cfg.router})")
    fwd = torch.compile(model) if cfg.compile else model
    if ddp and ep is None:  # plain data parallel; expert parallel syncs its gradients itself (parallel.py)
        fwd = DDP(fwd, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
    balance_group = dist.group.WORLD if ddp and cfg.balance_stats == "global" else None
    coefs = {k: getattr(cfg, k) for k in ("c_lb", "c_z", "c_sp", "c_cp", "mu_ortho")}
    settings = {**asdict(cfg), **asdict(model_cfg)}

    def checkpoint():
        state, opt = ep.full_state(model, optimizer) if ep else (model.state_dict(), optimizer.state_dict())
        if master:
            save_checkpoint({"model": state, "optimizer": opt, "model_args": asdict(model_cfg), "config": settings,
                             "iter_num": iter_num, "best_val": best_val, "batch_rng": [batch_gen.get_state()],
                             "torch_rng": torch.get_rng_state()}, cfg.out_dir)

    def stop(why):
        kept = f"the last good checkpoint is {cfg.out_dir}/ckpt.pt (iter {saved_iter})" if saved_iter is not None \
            else "no checkpoint was written"
        return f"{why} at iter {iter_num}; stopped without saving: {kept}"

    tokens_per_iter = cfg.batch_size * model_cfg.block_size * accum * world
    t_start = t_last = time.time()
    start_iter = iter_num
    try:
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                result, layers = evaluate(model, batch, cfg, autocast, device, mixture)
                finite = torch.tensor(float(all_finite(model.parameters())))
                if ddp:  # every process decides alike (an expert-parallel rank holds only its experts)
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not (math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"]) and finite.item()):
                    raise Diverged(stop(f"evaluation loss is train {result['train_loss']}, val {result['val_loss']} "
                                        f"or the weights are not finite"))
                best_val = min(best_val, result["val_loss"])
                if iter_num != saved_iter:
                    checkpoint()
                    saved_iter = iter_num
                if master:
                    print(f"eval {iter_num}: train {result['train_loss']:.4f}, val {result['val_loss']:.4f}")
                    for i, m in enumerate(layers):
                        extra = f" source NMI {m['source_nmi']:.3f}" if "source_nmi" in m else ""
                        print(f"  moe layer {i}: load cv {m['cv']:.3f} max/mean {m['max_mean']:.2f} dead {m['dead']} "
                              f"entropy {m['entropy_norm']:.3f} top-k mass {m['topk_mass']:.3f}{extra}")
                    append_log(log_path, {"iter": iter_num, **result, "layers": layers,
                                          "final": iter_num >= cfg.max_iters})
            if iter_num >= cfg.max_iters:
                break
            log_step = (iter_num + 1) % cfg.log_interval == 0
            try:
                lossf, terms = train_step(fwd, optimizer, lambda: batch("train", batch_gen, device, rank, world), accum,
                                          coefs, cfg.grad_clip, autocast, log_step, ddp, model.routers(), ep,
                                          balance_group)
            except Diverged as err:
                raise Diverged(stop(str(err))) from None
            iter_num += 1
            if master and log_step:
                now = time.time()
                dt = (now - t_last) / cfg.log_interval
                t_last = now
                eta = (cfg.max_iters - iter_num) * (now - t_start) / (iter_num - start_iter)
                terms_f = {k: round(float(v), 6) for k, v in terms.items()}
                scaled = " ".join(f"{k} {v:.3f}" for k, v in terms_f.items())
                print(f"iter {iter_num}: loss {lossf:.4f} | {scaled} | {dt * 1000:.0f} ms, "
                      f"{tokens_per_iter / dt:,.0f} tok/s, eta {eta / 60:.1f} min")
                append_log(log_path, {"iter": iter_num, "train_loss": lossf, "lr": lr, **terms_f,
                                      **{f"{k}_scaled": round(coefs[f"c_{k}" if k != "ortho" else "mu_ortho"] * v, 6)
                                         for k, v in terms_f.items()}})
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at iter {iter_num}; "
                        + (f"the last checkpoint is {cfg.out_dir}/ckpt.pt (iter {saved_iter})" if saved_iter is not None
                           else "no checkpoint was written")) from None

    if master:
        print(f"done: {iter_num - start_iter} steps in {(time.time() - t_start) / 60:.1f} min, best val loss {best_val:.4f}")
        if ep:  # generation would need every process in step: sample from the checkpoint instead
            print(f"note: no samples with expert_parallel; python sample.py --out_dir={cfg.out_dir} reads the checkpoint")
        finish(model, cfg, device, samples=not mixture and not ep)  # synthetic tokens are not text
    if ddp:  # a check that every replica holds the same weights: a hash of the whole model per rank
        state = ep.full_state(model, optimizer)[0] if ep else model.state_dict()
        digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in state.values()))
        hashes = [None] * world
        dist.all_gather_object(hashes, digest.hexdigest())
        if master:
            print(f"ranks hold identical weights: {len(set(hashes)) == 1}")
            append_log(log_path, {"iter": iter_num, "param_hashes": hashes})


def finish(model, cfg, device, samples):
    """Samples and plots at the end (the checkpoint is already safe on disk)."""
    from analyze import plot_run
    from data import load_tokenizer
    if samples and cfg.num_samples > 0:
        enc = load_tokenizer(cfg.out_dir)  # an imported model's own tokenizer.json, else GPT-2's
        start = torch.tensor([enc.encode_ordinary("\n")], device=device)
        for _ in range(cfg.num_samples):
            out = model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=200, n_vocab=enc.n_vocab)
            print("---------------\n" + enc.decode(out[0].tolist()))
    for path in plot_run(cfg.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:], quiet=int(os.environ.get("RANK", 0)) != 0))
