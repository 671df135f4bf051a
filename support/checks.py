"""
The checks of the model's settings (model.GPTConfig and families.FamilyConfig call them when
built), kept out of the reader's way: every core field in range, every combination meaningful, one
ValueError that names the field; ERMoE's rank, left at 0, is derived (model.py derives the MLP and
expert widths: the iso-compute rule; families.check_family checks the families' own settings).
"""

import math


def check_and_derive(cfg, routers, head_size=0):
    """Check every field of a model.GPTConfig, then derive ERMoE's rank if left at 0. Raises ValueError naming
    the field. routers: router.py's registry; head_size: a head's width where it is set apart (families.py),
    0: n_embd // n_head."""
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        require(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("ffn_hidden", "n_experts", "n_shared", "expert_hidden", "ermoe_rank"):
        require(getattr(cfg, name) >= 0, f"{name} must be >= 0 (0 = derived/off), got {getattr(cfg, name)}")
    for name, low in (("routed_scale", 0), ("capacity_factor", None), ("bias_update_rate", None), ("ermoe_beta", 0)):
        value = getattr(cfg, name)  # finite and > low, or >= 0 where low is None
        require(math.isfinite(value) and (value > low if low is not None else value >= 0),
                 f"{name} must be {'> 0' if low is not None else '>= 0'}, got {value}")
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
    for name, choices in (("router", tuple(routers)), ("dispatch", ("sorted", "naive")),
                          ("ermoe_basis", ("independent", "partitioned", "penalty")),
                          ("ermoe_input", ("coords", "token")),
                          ("pos_emb", ("rope", "learned")), ("mlp", ("swiglu", "gelu")),
                          ("norm", ("rmsnorm", "layernorm"))):
        require(getattr(cfg, name) in choices, f"unknown {name} '{getattr(cfg, name)}' ({'|'.join(choices)})")
    if cfg.router == "ermoe" and cfg.n_experts > 0:
        if cfg.ermoe_rank == 0:  # half the width: experts read enough of the token (docs/design.md §2)
            cfg.ermoe_rank = max(1, cfg.n_embd // (cfg.n_experts if cfg.ermoe_basis == "partitioned" else 2))
        require(cfg.ermoe_rank <= cfg.n_embd, f"ermoe_rank must be <= n_embd={cfg.n_embd} (an orthonormal "
                 f"basis of R^d has at most d vectors), got {cfg.ermoe_rank}")
        require(cfg.ermoe_basis != "partitioned" or cfg.n_experts * cfg.ermoe_rank <= cfg.n_embd,
                 f"ermoe_basis=partitioned needs n_experts*ermoe_rank <= n_embd, got "
                 f"{cfg.n_experts}*{cfg.ermoe_rank} > {cfg.n_embd}")


def require(ok, message):
    if not ok:
        raise ValueError(message)
