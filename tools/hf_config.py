"""
The config.json of a Hugging Face MoE checkpoint -> this project's FamilyConfig settings (families.py), key by key
(tools/convert.py from-hf reads the tensors with them). Every key of a family's transformers config is
read here, with transformers' own default where config.json lacks it; or refused, naming it, where it
changes the computation and this model has no counterpart (unless its value switches it off); or
ignored, the reason beside it. tests/test_import_keys.py walks the keys of the installed transformers'
config of every family and the names its modeling code reads, so a key a new release adds fails until
it is placed here (docs/real-models.md lists them).
"""

import math

from support.rundir import UserError

IGNORED = {  # keys of every family that do not change the imported model's forward pass, and why
    "_name_or_path": "where transformers loaded the config from",
    "transformers_version": "the version that wrote the file",
    "model_type": "the family is named by `architectures`",
    "architectures": "read first: it picks the family",
    "dtype": "the storage dtype: weights are read in theirs and computed in fp32",
    "torch_dtype": "the storage dtype (the older name of `dtype`)",
    "id2label": "the labels of a classification head (a causal LM has none)",
    "label2id": "the labels of a classification head (a causal LM has none)",
    "problem_type": "the loss of a classification head (a causal LM has none)",
    "is_encoder_decoder": "False for every decoder-only family here",
    "return_dict": "how the forward returns its values, not the values",
    "output_attentions": "what the forward also returns, not its values",
    "output_hidden_states": "what the forward also returns, not its values",
    "output_router_logits": "what the forward also returns, not its values",
    "use_cache": "the key-value cache of generation: the same tokens either way (sample.py caches too)",
    "chunk_size_feed_forward": "feed-forward chunks compute the same values",
    "initializer_range": "the initialisation, which trained weights replace",
    "bos_token_id": "a token id for generation and tokenisation",
    "eos_token_id": "a token id for generation and tokenisation",
    "pad_token_id": "a token id for padding; transformers also gives its embedding row no gradient, "
                    "fine-tuning here does",
    "attention_dropout": "dropout, off at inference (an import here sets dropout=0)",
    "router_aux_loss_coef": "a training-loss coefficient (fine-tuning here takes c_lb)",
    "router_jitter_noise": "noise on the router's input in training only (transformers checks `self.training`)",
    "num_nextn_predict_layers": "multi-token-prediction layers beside the model, not in its forward pass",
    "num_mtp_modules": "multi-token-prediction modules beside the model (MiniMax-M2), not in its forward pass",
    "mtp_transformer_layers": "multi-token-prediction layers beside the model (MiniMax-M2), not in its forward pass",
    "use_mtp": "multi-token prediction in the original training (MiniMax-M2), not in the forward pass",
    "auto_map": "the original remote code; transformers' own class is the reference here",
}
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")  # read by rope_of

# architecture -> where its MoE lives, its aliases (transformers' attribute_map), the keys it reads with
# transformers' defaults, the keys refused unless at the value that switches them off (their default), its
# own ignored keys with the reason, and for keys only the released checkpoints carry (their remote code's),
# the one value transformers' model assumes (any other is refused)
FAMILIES = {
    "MixtralForCausalLM": dict(
        moe="block_sparse_moe", experts=("w1", "w3", "w2"), width="intermediate_size", n_experts="num_local_experts",
        aliases={"num_experts": "num_local_experts"}, rope_theta=1e6,
        read=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=2,
                  num_local_experts=8),
        refused=dict(sliding_window=None)),
    "OlmoeForCausalLM": dict(
        moe="mlp", experts=("gate_proj", "up_proj", "down_proj"), width="intermediate_size", n_experts="num_experts",
        aliases={"num_local_experts": "num_experts"}, qk_norm=True,
        read=dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=8,
                  num_experts=64, norm_topk_prob=False),
        refused=dict(attention_bias=False, clip_qkv=None, sliding_window=None)),
    "Qwen2MoeForCausalLM": dict(
        moe="mlp", experts=("gate_proj", "up_proj", "down_proj"), width="moe_intermediate_size",
        n_experts="num_experts", aliases={}, shared="shared_expert",
        read=dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=None, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts_per_tok=4, num_experts=60,
                  moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False,
                  qkv_bias=True),
        refused=dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None,
                     decoder_sparse_step=1, mlp_only_layers=None),
        ignored=dict(intermediate_size="the width of dense layers, which only the refused keys above would make")),
    "Qwen3MoeForCausalLM": dict(
        moe="mlp", experts=("gate_proj", "up_proj", "down_proj"), width="moe_intermediate_size",
        n_experts="num_local_experts", aliases={"num_experts": "num_local_experts"}, qk_norm=True,
        qk_norm_per_head=True,
        read=dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=None, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts_per_tok=8, num_local_experts=128,
                  moe_intermediate_size=768, norm_topk_prob=False),
        refused=dict(attention_bias=False, use_sliding_window=False, sliding_window=4096, decoder_sparse_step=1,
                     mlp_only_layers=None),
        ignored=dict(intermediate_size="the width of dense layers, which only the refused keys above would make")),
    # DeepSeek-V3-style sigmoid routing (docs/routers.md), with partial rotary positions
    "Glm4MoeForCausalLM": dict(
        moe="mlp", experts=("gate_proj", "up_proj", "down_proj"), width="moe_intermediate_size",
        n_experts="n_routed_experts", aliases={"num_local_experts": "n_routed_experts",
                                               "num_mtp_layers": "num_nextn_predict_layers"},
        sigmoid="gate", shared="shared_experts", partial_rotary_factor=0.5,
        read=dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
                  num_attention_heads=96, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                  moe_intermediate_size=1408, num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128,
                  routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                  use_qk_norm=False),
        refused={}),
    "MiniMaxM2ForCausalLM": dict(
        moe="block_sparse_moe", experts=("w1", "w3", "w2"), width="intermediate_size", n_experts="num_local_experts",
        aliases={"num_experts": "num_local_experts"}, sigmoid="block", qk_norm=True, rope_theta=5e6,
        read=dict(vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62,
                  num_attention_heads=48, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                  max_position_embeddings=196608, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts_per_tok=8,
                  num_local_experts=256, rotary_dim=None),
        refused={},
        # the released config.json's own keys (its remote code's): what transformers' MiniMaxM2 always does
        released=dict(attn_type_list=1, qk_norm_type="per_layer", use_qk_norm=True, scoring_func="sigmoid",
                      use_routing_bias=True, shared_intermediate_size=0)),
}
MISSING = object()


# The families of the router atlas (docs/routers.md): their routing and experts map onto this model's
# settings (tests/test_families.py), but each one's attention or residual stream needs a part this
# model does not have. An import is refused in one line that names it.
NOT_YET = {
    "GptOssForCausalLM": "attention sinks, sliding-window attention and YaRN rotary positions",
    "DeepseekV4ForCausalLM": "hyper-connections (4 residual streams), a shared key-value head with low-rank queries "
                             "and compressed sparse attention",
    "Llama4ForCausalLM": "chunked attention and NoPE layers with attention-temperature tuning",
    "Llama4ForConditionalGeneration": "chunked attention, NoPE layers and the vision tower",
    "Ernie4_5_MoeForCausalLM": "interleaved (GPT-J style) rotary positions",
    "LongcatFlashForCausalLM": "multi-head latent attention and two attention sublayers per layer",
    "Qwen3NextForCausalLM": "Gated DeltaNet linear-attention layers, gated attention and zero-centred RMSNorm",
}


def field(hf, name, kind, default=MISSING, low=None, high=None):
    """config.json's `name`, checked: its type (int, float, bool, str), and low <= value (<= high)."""
    if hf.get(name) is None:
        if default is MISSING:
            raise UserError(f"config.json has no '{name}', which the conversion needs")
        return default
    value = hf[name]
    ok = {int: type(value) is int, bool: type(value) is bool, str: type(value) is str,
          float: type(value) in (int, float) and math.isfinite(value)}[kind]
    if ok and low is not None:
        ok = low <= value and (high is None or value <= high)
    if not ok:
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
        bounds = "" if low is None else f" >= {low}" if high is None else f" in [{low}, {high}]"
        raise UserError(f"config.json: {name} must be {what}{bounds}, got {value!r}")
    return value


class Config:
    """A family's config.json with transformers' defaults behind it: `get(name, kind, ...)` reads a key
    (field's checks) or its family default; aliases (attribute_map) are folded into their key first."""

    def __init__(self, hf, fam):
        self.fam = fam
        self.hf = {fam["aliases"].get(k, k): v for k, v in hf.items()}
        self.defaults = {**fam["read"], **fam["refused"]}

    def get(self, name, kind, low=None, high=None):
        """config.json's `name`, checked as `field` does, or transformers' default for the family."""
        return field(self.hf, name, kind, self.defaults[name], low, high)

    def raw(self, name):
        """The value as transformers holds it: config.json's, else the family default."""
        return self.hf[name] if self.hf.get(name) is not None else self.defaults.get(name)


def rope_of(cfg, head_dim):
    """(rope_theta, rotary dims) as transformers reads them: rope_parameters (or the older rope_scaling) wins,
    then config.json's top-level rope_theta and partial_rotary_factor, then MiniMax-M2's rotary_dim (as
    rotary_dim / head_dim), then the family's defaults; the rotating dims are int(head_dim * factor)."""
    hf, fam = cfg.hf, cfg.fam
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"config.json: rope_parameters must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise UserError(f"config.json: rope type '{kind}' (scaled rotary positions) has no counterpart here")
    top = {"rope_theta": fam.get("rope_theta", 10000.0), "partial_rotary_factor": fam.get("partial_rotary_factor")}
    if hf.get("rotary_dim") is not None:
        top["partial_rotary_factor"] = field(hf, "rotary_dim", int, low=0) / head_dim
    top.update({k: hf[k] for k in top if hf.get(k) is not None})
    values = {k: rope.get(k, top[k]) for k in top}
    theta = float(field(values, "rope_theta", float, low=1e-12))
    factor = 1.0 if values["partial_rotary_factor"] is None else \
        field(values, "partial_rotary_factor", float, low=0, high=1)
    dims = int(head_dim * factor)
    if dims % 2:
        raise UserError(f"config.json: partial rotary positions over {dims} dims of {head_dim} (an odd number) have "
                        f"no counterpart here")
    return theta, (0 if dims == head_dim else dims)


def fp8_blocks(hf):
    """The block size (rows, columns) of FP8 weights with block scales, from config.json's
    quantization_config, or None without one; any other quantization is refused."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise UserError(f"config.json: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise UserError(f"config.json: quantization_config with quant_method={method!r}: weights quantized that way "
                        f"have no counterpart here (import the unquantized checkpoint)")
    block, fmt, scheme = q.get("weight_block_size"), q.get("fmt", "e4m3"), q.get("activation_scheme", "dynamic")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b >= 1 for b in block)):
        raise UserError(f"config.json: quantization_config.weight_block_size={block!r}: FP8 weights are read with "
                        f"block scales (two integers >= 1), not per tensor")
    if fmt not in ("e4m3", "float8_e4m3fn") or scheme != "dynamic":
        raise UserError(f"config.json: quantization_config fmt={fmt!r}, activation_scheme={scheme!r}: FP8 is read as "
                        f"e4m3 weights with dynamic activations only")
    return tuple(block)


def model_args_from_hf(hf):
    """FamilyConfig fields from a Hugging Face config.json, each checked where it is read; refuse, naming
    the key, what does not map. -> (architecture, args, the keys not read, FP8 block size or None)."""
    if not isinstance(hf, dict):
        raise UserError("config.json is not a JSON object")
    arch = (hf.get("architectures") or ["?"])[0]
    if arch in NOT_YET:
        raise UserError(f"config.json: {arch}: its router and experts map (docs/routers.md), but this model has no "
                        f"{NOT_YET[arch]}")
    if arch not in FAMILIES:
        raise UserError(f"config.json: architecture '{arch}' is not one of {', '.join(FAMILIES)}")
    fam = FAMILIES[arch]
    cfg = Config(hf, fam)
    get = cfg.get
    d, heads = get("hidden_size", int, low=1), get("num_attention_heads", int, low=1)
    max_pos, n_layer = get("max_position_embeddings", int, low=1), get("num_hidden_layers", int, low=1)
    n_experts = get(fam["n_experts"], int, low=1)
    head_dim = field(cfg.hf, "head_dim", int, 0, low=1) or fam["read"]["head_dim"] or \
        (d // heads if d % heads == 0 else 0)
    if head_dim == 0:
        raise UserError(f"config.json: hidden_size={d} is not divisible by num_attention_heads={heads} and there is "
                        f"no head_dim")
    rope_theta, rotary_dim = rope_of(cfg, head_dim)
    refuse = [(get("hidden_act", str) == "silu", f"hidden_act={cfg.raw('hidden_act')} (the experts here are SwiGLU)")]
    for name, value in fam.get("released", {}).items():  # the released checkpoints' own keys
        have = cfg.raw(name)
        same = have is None or have == value or (isinstance(have, list) and all(v == value for v in have))
        refuse.append((same, f"{name}={have!r} (transformers' model assumes {value!r})"))
    window = refused_window(arch, cfg, max_pos, n_layer)
    refuse += [(window is None, window),
               (not cfg.raw("attention_bias") or arch == "Glm4MoeForCausalLM",
                "attention_bias=true (biases on all four attention projections; only q/k/v biases map)"),
               (cfg.raw("clip_qkv") is None, f"clip_qkv={cfg.raw('clip_qkv')} (clamped q, k and v)"),
               (not cfg.raw("mlp_only_layers"), f"mlp_only_layers={cfg.raw('mlp_only_layers')} (dense layers between "
                                                f"the MoE layers: every layer here is an MoE layer)"),
               (cfg.raw("decoder_sparse_step") in (None, 1), f"decoder_sparse_step={cfg.raw('decoder_sparse_step')} "
                                                             f"(dense layers between the MoE layers)")]
    for ok, what in refuse:
        if not ok:
            raise UserError(f"config.json ({arch}): {what} has no counterpart in this model")
    glm = arch == "Glm4MoeForCausalLM"
    args = dict(vocab_size=get("vocab_size", int, low=1), n_embd=d, n_layer=n_layer, n_head=heads,
                n_kv_head=get("num_key_value_heads", int, low=1) or heads, head_dim=head_dim, block_size=max_pos,
                norm_eps=float(get("rms_norm_eps", float, low=0, high=0.5)), rope_theta=rope_theta,
                rotary_dim=rotary_dim, tie_embeddings=get("tie_word_embeddings", bool), n_experts=n_experts,
                top_k=get("num_experts_per_tok", int, low=1, high=n_experts),
                expert_hidden=get(fam["width"], int, low=1),
                router="sigmoid" if fam.get("sigmoid") else "softmax", dropout=0.0,
                # Mixtral and MiniMax-M2 always renormalise the top-k gates, the others where norm_topk_prob says
                gate_renorm=get("norm_topk_prob", bool) if "norm_topk_prob" in fam["read"] else True,
                qk_norm=get("use_qk_norm", bool) if glm else fam.get("qk_norm", False),
                qk_norm_per_head=get("use_qk_norm", bool) if glm else fam.get("qk_norm_per_head", False),
                qkv_bias=get("qkv_bias", bool) if "qkv_bias" in fam["read"] else glm and get("attention_bias", bool))
    if glm:  # DeepSeek-V3's router: sigmoid scores, a select-only bias, groups, the routed scale; dense first layers
        args.update(routed_scale=float(get("routed_scaling_factor", float, low=1e-9)),
                    n_group=get("n_group", int, low=1), topk_group=get("topk_group", int, low=1),
                    first_dense_layers=get("first_k_dense_replace", int, low=0),
                    ffn_hidden=get("intermediate_size", int, low=1), n_shared=get("n_shared_experts", int, low=0))
    elif fam.get("shared") and get("shared_expert_intermediate_size", int, low=0):
        width = cfg.raw("shared_expert_intermediate_size")
        if width % args["expert_hidden"]:
            raise UserError(f"config.json: shared_expert_intermediate_size={width} is not a multiple of the expert "
                            f"width {args['expert_hidden']} (shared experts here are n_shared experts of that width)")
        args.update(n_shared=width // args["expert_hidden"], shared_gate=True)
    if args["top_k"] == 1 and args["gate_renorm"]:  # after every branch that decides the gates
        raise UserError(f"config.json ({arch}): one expert per token with renormalised gates (every gate 1) has no "
                        f"counterpart here: at top_k=1 the gate is the router's probability (Switch Transformer)")
    return arch, args, sorted(set(cfg.hf) - placed(fam)), fp8_blocks(hf)


def placed(fam):
    """The keys a family's import reads, refuses or ignores (everything else in a config.json is named in a note)."""
    return set(fam["read"]) | set(fam["refused"]) | set(fam.get("ignored", {})) | set(fam.get("released", {})) | \
        set(fam["aliases"]) | set(IGNORED) | set(ROPE_KEYS) | {"quantization_config"}


def refused_window(arch, cfg, max_pos, n_layer):
    """What a sliding attention window of this config would do, or None where none applies (each family
    decides it its own way in transformers)."""
    window = cfg.raw("sliding_window")
    # per layer, by layer_types (derived from use_sliding_window and max_window_layers)
    if arch == "Qwen2MoeForCausalLM":
        use = bool(cfg.raw("use_sliding_window"))
        types = cfg.raw("layer_types") or ["sliding_attention"
                                           if use and i % 2 == 0 and i < cfg.raw("max_window_layers")
                                           else "full_attention" for i in range(n_layer)]
        sliding = [i for i, t in enumerate(types) if t != "full_attention"]
        return None if not sliding else f"layer_types: layers {sliding} {types[sliding[0]]} (window {window})"
    if arch == "Qwen3MoeForCausalLM" and not cfg.raw("use_sliding_window"):
        return None
    if window is None or window >= max_pos:  # a window as long as the context changes nothing
        return None
    return f"sliding_window={window} (attention here sees the whole context)"
