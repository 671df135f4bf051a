"""
The settings of a run: declared once (TrainConfig here, GPTConfig in model.py), read from config
files and --key=value, checked, and, on resume, taken from the checkpoint.

    python train.py --help      # every setting, its default and what it is (the comments below)

Order: the declared defaults <- the CPU preset (no GPU, fresh runs) <- the router's own default
coefficients (e.g. no L_lb for ERMoE) <- config files <- --key=value. On resume the checkpoint's
settings replace the defaults, and a command-line value that differs is refused unless the setting
may change on resume (RESUMABLE). Every check raises a UserError naming the setting; nothing here
touches a file.
"""

import ast
import math
import os
import types
from dataclasses import asdict, dataclass, fields

import torch

from model import GPTConfig
from router import ROUTERS
from rundir import UserError, load_checkpoint


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
