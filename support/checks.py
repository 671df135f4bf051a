"""
The checks of the settings (model.GPTConfig, families.FamilyConfig and train.TrainConfig call them when
built), kept out of the reader's way: every field in range, every combination meaningful, one
ValueError that names the field; ERMoE's rank, left at 0, is derived (model.py derives the MLP and
expert widths: the iso-compute rule; families.check_family checks the families' own settings).
"""

import importlib.util
import math
from dataclasses import asdict

import torch


def check_and_derive(cfg, routers, head_size=0):
    """Check every field of a model.GPTConfig, then derive ERMoE's rank if left at 0. Raises ValueError naming
    the field. routers: router.py's registry; head_size: a head's width where it is set apart (families.py),
    0: n_embd // n_head."""
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        require(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    require_ranges(cfg, ("ffn_hidden", "n_experts", "n_shared", "expert_hidden", "ermoe_rank"),
                   (("routed_scale", 0), ("capacity_factor", None), ("bias_update_rate", None), ("ermoe_beta", 0)))
    require(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    if head_size == 0:
        require(cfg.n_embd % cfg.n_head == 0, f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        head_size = cfg.n_embd // cfg.n_head
    require(head_size % 2 == 0, f"head size {head_size} must be even (rotary)")
    require(cfg.mlp == "swiglu" or cfg.n_experts == 0,
             "mlp=gelu is nanoGPT's dense MLP: set n_experts=0 (experts are SwiGLU)")
    require(cfg.n_group >= 1 and 1 <= cfg.topk_group <= cfg.n_group,
             f"need n_group >= 1 and 1 <= topk_group <= n_group, got {cfg.n_group} and {cfg.topk_group}")
    if cfg.n_group > 1 and cfg.n_experts > 0:
        require(cfg.router == "sigmoid", f"n_group applies to router=sigmoid (DeepSeek-V3), not {cfg.router}")
        require(cfg.n_experts % cfg.n_group == 0, f"n_group ({cfg.n_group}) must divide n_experts ({cfg.n_experts})")
        require(cfg.topk_group * cfg.n_experts // cfg.n_group >= cfg.top_k,
                 f"topk_group={cfg.topk_group} groups of {cfg.n_experts // cfg.n_group} experts hold fewer than "
                 f"top_k={cfg.top_k} experts")
    require(cfg.n_experts == 0 or 1 <= cfg.top_k <= cfg.n_experts,
             f"top_k must be in [1, n_experts={cfg.n_experts}], got {cfg.top_k}")
    require(not cfg.select_bias or cfg.n_experts == 0 or cfg.router in ("softmax", "ermoe"),
             f"select_bias applies to router=softmax or ermoe, not {cfg.router}")
    require_choices(cfg, (("router", tuple(routers)), ("dispatch", ("sorted", "naive")),
                          ("ermoe_basis", ("independent", "partitioned", "penalty")),
                          ("ermoe_input", ("coords", "token")), ("pos_emb", ("rope", "learned")),
                          ("mlp", ("swiglu", "gelu")), ("norm", ("rmsnorm", "layernorm"))))
    if cfg.router == "ermoe" and cfg.n_experts > 0:
        if cfg.ermoe_rank == 0:  # half the width: experts read enough of the token (docs/design.md §2)
            cfg.ermoe_rank = max(1, cfg.n_embd // (cfg.n_experts if cfg.ermoe_basis == "partitioned" else 2))
        require(cfg.ermoe_rank <= cfg.n_embd, f"ermoe_rank must be <= n_embd={cfg.n_embd} (an orthonormal "
                 f"basis of R^d has at most d vectors), got {cfg.ermoe_rank}")
        require(cfg.ermoe_basis != "partitioned" or cfg.n_experts * cfg.ermoe_rank <= cfg.n_embd,
                 f"ermoe_basis=partitioned needs n_experts*ermoe_rank <= n_embd, got "
                 f"{cfg.n_experts}*{cfg.ermoe_rank} > {cfg.n_embd}")


def check_run(cfg, impls):
    """Check every setting of a train.TrainConfig (a ValueError naming it); impls: router.IMPLS."""
    ints = {"eval_interval": 1, "log_interval": 1, "eval_iters": 1, "sample_tokens": 1, "batch_size": 1,
            "num_samples": 0, "gradient_accumulation_steps": 0, "max_iters": 0, "warmup_iters": 0,
            "lr_decay_iters": 0, "seed": 0}
    for name, low in ints.items():
        require(getattr(cfg, name) >= low, f"{name} must be >= {low}, got {getattr(cfg, name)}")
    for name, value in asdict(cfg).items():
        if isinstance(value, float):
            require(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
    require(cfg.beta1 < 1 and cfg.beta2 < 1, f"beta1 and beta2 must be < 1, got {cfg.beta1}, {cfg.beta2}")
    require(cfg.min_lr <= cfg.learning_rate,
             f"min_lr ({cfg.min_lr}) must be <= learning_rate ({cfg.learning_rate})")
    require(cfg.learning_rate / (1 - cfg.beta1) < torch.finfo(torch.float32).max,  # AdamW's first step size
             f"learning_rate={cfg.learning_rate} overflows float32 in AdamW's first step (lr / (1 - beta1))")
    require(cfg.init_from in ("scratch", "resume", "auto"),
             f"init_from must be scratch, resume or auto, got '{cfg.init_from}'")
    require(cfg.dtype in ("auto", "bfloat16", "float32"),
             f"dtype must be auto, bfloat16 or float32, got '{cfg.dtype}'")
    cuda_n = cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()
    require(cfg.device in ("auto", "cpu", "cuda") or cuda_n,
             f"device must be auto, cpu, cuda or cuda:N, got '{cfg.device}'")
    require(cfg.router_impl in impls, f"unknown router_impl '{cfg.router_impl}' ({'|'.join(impls)})")
    require(cfg.expert_init in ("random", "upcycle"),
             f"unknown expert_init '{cfg.expert_init}' (random|upcycle)")
    require(cfg.dataset != "", "dataset is empty: give a name under data/, or a task such as synthetic")
    require(cfg.expert_parallel >= 1, f"expert_parallel must be >= 1 (1 = off), got {cfg.expert_parallel}")
    require(cfg.balance_stats in ("global", "local", "step"),
             f"balance_stats must be global, local or step, got '{cfg.balance_stats}'")
    require(cfg.out_dir != "", "out_dir is empty: give a directory, e.g. --out_dir=out")
    require(cfg.router_frozen_from >= -1,
             f"router_frozen_from must be >= -1 (-1 = never), got {cfg.router_frozen_from}")
    require(not cfg.wandb_log or importlib.util.find_spec("wandb") is not None,
             "wandb_log=True needs the wandb package (pip install wandb)")


def require_ranges(cfg, counts, numbers):
    """counts: the settings that must be >= 0 (0 = derived/off); numbers: (setting, low) pairs that must be finite
    and > low, or >= 0 where low is None."""
    for name in counts:
        require(getattr(cfg, name) >= 0, f"{name} must be >= 0 (0 = derived/off), got {getattr(cfg, name)}")
    for name, low in numbers:
        value = getattr(cfg, name)
        require(math.isfinite(value) and (value > low if low is not None else value >= 0),
                f"{name} must be {'> 0' if low is not None else '>= 0'}, got {value}")


def require_choices(cfg, pairs):
    """(setting, its choices) pairs: each setting one of its choices."""
    for name, choices in pairs:
        require(getattr(cfg, name) in choices, f"unknown {name} '{getattr(cfg, name)}' ({'|'.join(choices)})")


def require(ok, message):
    if not ok:
        raise ValueError(message)
