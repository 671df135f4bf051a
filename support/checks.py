"""
The checks of the model's settings (model.GPTConfig calls them when it is built), kept out of the
reader's way: every field in range, every combination meaningful, one ValueError that names the
field; ERMoE's rank, left at 0, is derived (model.py derives the MLP and expert widths: the
iso-compute rule).
"""

import math


def check_and_derive(cfg, routers, impls, impl_problem):
    """Check every field of a model.GPTConfig, then derive ERMoE's rank if left at 0. Raises ValueError naming
    the field. routers, impls, impl_problem: router.py's registry, implementations and their limits."""
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        _require(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("ffn_hidden", "n_experts", "n_shared", "expert_hidden", "ermoe_rank", "n_kv_head", "head_dim",
                 "zero_experts", "first_dense_layers", "hash_layers"):
        _require(getattr(cfg, name) >= 0, f"{name} must be >= 0 (0 = derived/off), got {getattr(cfg, name)}")
    for name, low in (("rope_theta", 0), ("routed_scale", 0), ("capacity_factor", None), ("bias_update_rate", None),
                      ("renorm_floor", None), ("swiglu_limit", None), ("ermoe_beta", 0)):
        value = getattr(cfg, name)  # finite and > low, or >= 0 where low is None
        _require(math.isfinite(value) and (value > low if low is not None else value >= 0),
                 f"{name} must be {'> 0' if low is not None else '>= 0'}, got {value}")
    _require(0 <= cfg.norm_eps < 1, f"norm_eps must be in [0, 1) (0 = the dtype's epsilon), got {cfg.norm_eps}")
    if cfg.n_kv_head == 0:
        cfg.n_kv_head = cfg.n_head
    _require(cfg.n_head % cfg.n_kv_head == 0, f"n_kv_head ({cfg.n_kv_head}) must divide n_head ({cfg.n_head})")
    _require(not cfg.shared_gate or cfg.n_shared > 0, "shared_gate needs shared experts (n_shared > 0)")
    _require(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.head_dim == 0:
        _require(cfg.n_embd % cfg.n_head == 0, f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}) "
                 f"(or give head_dim)")
        cfg.head_dim = cfg.n_embd // cfg.n_head
    _require(cfg.head_dim % 2 == 0, f"head size {cfg.head_dim} must be even (rotary)")
    _require(cfg.rotary_dim % 2 == 0 and 0 <= cfg.rotary_dim <= cfg.head_dim,
             f"rotary_dim must be even and in [0, head size {cfg.head_dim}] (0 = all), got {cfg.rotary_dim}")
    _require(cfg.mlp == "swiglu" or cfg.n_experts == 0,
             "mlp=gelu is nanoGPT's dense MLP: set n_experts=0 (experts are SwiGLU)")
    _require(not cfg.qk_norm_per_head or cfg.qk_norm, "qk_norm_per_head needs qk_norm=True")
    _require(cfg.n_group >= 1 and 1 <= cfg.topk_group <= cfg.n_group,
             f"need n_group >= 1 and 1 <= topk_group <= n_group, got {cfg.n_group} and {cfg.topk_group}")
    if cfg.n_group > 1 and cfg.n_experts > 0:
        _require(cfg.router == "sigmoid", f"n_group applies to router=sigmoid (DeepSeek-V3), not {cfg.router}")
        _require(cfg.n_experts % cfg.n_group == 0, f"n_group ({cfg.n_group}) must divide n_experts ({cfg.n_experts})")
        _require(cfg.topk_group * cfg.n_experts // cfg.n_group >= cfg.top_k,
                 f"topk_group={cfg.topk_group} groups of {cfg.n_experts // cfg.n_group} experts hold fewer than "
                 f"top_k={cfg.top_k} experts")
    _require(cfg.n_experts == 0 or 1 <= cfg.top_k <= cfg.n_experts + cfg.zero_experts,
             f"top_k must be in [1, n_experts={cfg.n_experts}], got {cfg.top_k}")
    _require(cfg.first_dense_layers <= cfg.n_layer and cfg.hash_layers <= cfg.n_layer,
             f"first_dense_layers ({cfg.first_dense_layers}) and hash_layers ({cfg.hash_layers}) must be <= n_layer "
             f"({cfg.n_layer})")
    linear = ("softmax", "sigmoid")  # the switches of other families apply to the linear routers
    for name, on, routers_ok in (("router_bias", cfg.router_bias, linear), ("gate_input", cfg.gate_input, linear),
                                 ("zero_experts", cfg.zero_experts > 0, linear),
                                 ("select_bias", cfg.select_bias, ("softmax", "ermoe")),
                                 ("hash_layers", cfg.hash_layers > 0, ("sigmoid",)),
                                 ("score_fn", cfg.score_fn != "sigmoid", ("sigmoid",))):
        _require(not on or cfg.n_experts == 0 or cfg.router in routers_ok,
                 f"{name} applies to router={' or '.join(routers_ok)}, not {cfg.router}")
    _require(not (cfg.select_bias or cfg.zero_experts or cfg.gate_input) or cfg.router_impl in ("auto", "torch"),
             f"router_impl={cfg.router_impl}: the fused routing pass has no select_bias, zero_experts or gate_input "
             f"(use auto or torch)")
    for name, choices in (("router", tuple(routers)), ("dispatch", ("sorted", "naive")), ("router_impl", impls),
                          ("expert_init", ("random", "upcycle")),
                          ("ermoe_basis", ("independent", "partitioned", "penalty")),
                          ("ermoe_input", ("coords", "token")),
                          ("pos_emb", ("rope", "learned")), ("mlp", ("swiglu", "gelu")),
                          ("norm", ("rmsnorm", "layernorm")),
                          ("score_fn", ("sigmoid", "sqrt_softplus")), ("expert_act", ("swiglu", "gpt_oss"))):
        _require(getattr(cfg, name) in choices, f"unknown {name} '{getattr(cfg, name)}' ({'|'.join(choices)})")
    if cfg.n_experts > 0:
        why = impl_problem(cfg.router, cfg.router_impl, cfg.n_experts, cfg.top_k)
        _require(why is None, why)
    if cfg.router == "ermoe" and cfg.n_experts > 0:
        if cfg.ermoe_rank == 0:  # half the width: experts read enough of the token (docs/design.md §2)
            cfg.ermoe_rank = max(1, cfg.n_embd // (cfg.n_experts if cfg.ermoe_basis == "partitioned" else 2))
        _require(cfg.ermoe_rank <= cfg.n_embd, f"ermoe_rank must be <= n_embd={cfg.n_embd} (an orthonormal "
                 f"basis of R^d has at most d vectors), got {cfg.ermoe_rank}")
        _require(cfg.ermoe_basis != "partitioned" or cfg.n_experts * cfg.ermoe_rank <= cfg.n_embd,
                 f"ermoe_basis=partitioned needs n_experts*ermoe_rank <= n_embd, got "
                 f"{cfg.n_experts}*{cfg.ermoe_rank} > {cfg.n_embd}")


def _require(ok, message):
    if not ok:
        raise ValueError(message)
