"""
Checkpoints in and out: Hugging Face MoE folders <-> this project's out_dir/ckpt.pt.

    python tools/convert.py from-hf HF_DIR OUT_DIR   # Mixtral, OLMoE, Qwen2/3-MoE, GLM-4.5, MiniMax-M2 -> ckpt.pt
    python tools/convert.py to-hf OUT_DIR HF_DIR     # our ckpt.pt -> a Mixtral folder transformers loads
    add --overwrite to replace an existing OUT_DIR/ckpt.pt or a non-empty HF_DIR, and --ignore_unused
    to convert a checkpoint that holds tensors the mapping does not use (refused otherwise, naming them)

After from-hf, OUT_DIR works like a run's directory: `python sample.py --out_dir=OUT_DIR`,
`python tools/analyze.py OUT_DIR --text="..."`, or fine-tuning with `train.py --init_from=resume`.

The two networks line up tensor by tensor (the same function then; the tests check it against
transformers with random weights):

    Hugging Face                              ours (model.py; families.py for the backbone options)
    embed_tokens, lm_head, norm               wte, lm_head (tied or not), ln_f
    input_layernorm, post_attention_layernorm ln_1, ln_2  (eps = rms_norm_eps)
    q_proj, k_proj, v_proj (+ biases)         attn.c_attn: the three stacked by rows
    q_norm, k_norm (OLMoE; Qwen3: per head)  attn.q_norm, attn.k_norm
    o_proj                                    attn.c_proj
    gate (the router)                         mlp.router.weight
    experts.e.{w1|gate_proj} (f, d)           mlp.w_gate[e] (d, f): transposed, we compute x @ w
    experts.e.{w3|up_proj}, {w2|down_proj}    mlp.w_up[e], mlp.w_down[e]: transposed
    shared_expert                             mlp.shared (Qwen2-MoE, gated: mlp.shared.expert)
    shared_expert_gate                        mlp.shared.gate (families.GatedShared)

Routing: Mixtral renormalises the top-k gates (gate_renorm=True); OLMoE and Qwen2-MoE do so only
with norm_topk_prob. Files are read and written with the safetensors package alone; transformers
is not needed (the tests use it as the reference). Every key of config.json is read (with transformers'
default for the family), refused by name where it changes the computation and nothing here matches
it, or ignored for a stated reason (the tables below; docs/real-models.md). FP8 weights with block
scales (DeepSeek-V3's format) are dequantised to fp32.
"""

import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from families import FamilyConfig, build  # noqa: E402
from support.rundir import UserError, cli, load_checkpoint, save_checkpoint  # noqa: E402
from tools.hf_config import FAMILIES, model_args_from_hf  # noqa: E402


def read_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not JSON ({err})") from None


class SafeTensors:
    """The tensors of a folder's *.safetensors files (one file or an index), read one at a time, each
    checked for its shape and a floating-point dtype; `unused()` names the ones never read. FP8 weights
    (float8_e4m3fn) are dequantised with their block scales (blocks: (rows, columns) of config.json's
    quantization_config): each block of the weight times its entry of `weight_scale_inv` (DeepSeek-V3's
    and MiniMax-M2's format), in fp32; an FP8 weight without its scales is refused."""

    def __init__(self, folder, blocks=None):
        self.blocks = blocks
        from safetensors import safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise UserError(f"{folder} has no .safetensors weights (model.safetensors or an index)")
        self.handles, self.read = {}, set()
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.isfile(path):
                raise UserError(f"{path} is missing (named in model.safetensors.index.json)")
            try:
                self.handles[path] = safe_open(path, framework="pt")
            except Exception as err:  # the package's own errors: a cut or damaged header
                raise UserError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); was the "
                                f"download cut short?") from None
        self.where = {k: p for p, h in self.handles.items() for k in h.keys()}

    def __contains__(self, name):
        return name in self.where

    def get(self, name, shape):
        """The tensor `name`, which must have `shape` and a floating-point dtype, in fp32."""
        tensor = self.load(name)
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"tensor '{name}' has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(shape)} from config.json")
        if tensor.dtype == torch.float8_e4m3fn:
            return self.dequantise(name, tensor)
        if not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            raise UserError(f"tensor '{name}' has dtype {tensor.dtype}, expected a floating-point tensor (FP8: "
                            f"float8_e4m3fn with block scales)")
        return tensor.float()

    def load(self, name):
        if name not in self.where:
            raise UserError(f"the checkpoint has no tensor '{name}'")
        try:
            tensor = self.handles[self.where[name]].get_tensor(name)
        except Exception as err:  # the data behind the header is missing
            raise UserError(f"{self.where[name]}: tensor '{name}' cannot be read ({str(err).splitlines()[0]}); was "
                            f"the download cut short?") from None
        self.read.add(name)
        return tensor

    def dequantise(self, name, tensor):
        """An FP8 weight (rows, cols) times its scales (ceil(rows / bm), ceil(cols / bn)), block by block."""
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if scale_name not in self.where or self.blocks is None:
            why = f"no '{scale_name}'" if scale_name not in self.where else "no quantization_config in config.json"
            raise UserError(f"tensor '{name}' is FP8 ({tensor.dtype}) with {why}: its values without their block "
                            f"scales would be a wrong model")
        bm, bn = self.blocks
        rows, cols = tensor.shape
        scale = self.load(scale_name).float()
        if tuple(scale.shape) != (math.ceil(rows / bm), math.ceil(cols / bn)):
            raise UserError(f"tensor '{scale_name}' has shape {tuple(scale.shape)}, expected "
                            f"{(math.ceil(rows / bm), math.ceil(cols / bn))} for blocks of {bm}x{bn}")
        full = scale.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]  # (rows, cols)
        return tensor.float() * full

    def unused(self):
        return sorted(set(self.where) - self.read)


def from_hf(hf_dir, out_dir, overwrite=False, ignore_unused=False):
    """HF folder -> out_dir/ckpt.pt (and tokenizer.json, if the folder has one). Everything is read
    and checked before anything is written."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"no config.json in {hf_dir} (a Hugging Face model folder)")
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
        raise UserError(f"{out_dir}/ckpt.pt exists; pass --overwrite to replace it")
    arch, args, unknown, blocks = model_args_from_hf(read_json(path))
    fam = FAMILIES[arch]
    try:
        cfg = FamilyConfig(**args)
    except ValueError as err:
        raise UserError(f"config.json ({arch}) gives a model this project cannot build: {err}") from None
    w = SafeTensors(hf_dir, blocks)
    d, V, E, f = cfg.n_embd, cfg.vocab_size, cfg.n_experts, cfg.expert_hidden
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    sd = {"wte.weight": w.get("model.embed_tokens.weight", (V, d)), "ln_f.weight": w.get("model.norm.weight", (d,))}
    sd["lm_head.weight"] = sd["wte.weight"] if cfg.tie_embeddings else w.get("lm_head.weight", (V, d))
    for i in range(cfg.n_layer):
        hf, ours = f"model.layers.{i}", f"blocks.{i}"
        a = f"{hf}.self_attn"
        sd[f"{ours}.ln_1.weight"] = w.get(f"{hf}.input_layernorm.weight", (d,))
        sd[f"{ours}.ln_2.weight"] = w.get(f"{hf}.post_attention_layernorm.weight", (d,))
        widths = {"q": q, "k": kv, "v": kv}
        sd[f"{ours}.attn.c_attn.weight"] = torch.cat([w.get(f"{a}.{p}_proj.weight", (widths[p], d)) for p in "qkv"])
        if cfg.qkv_bias:
            sd[f"{ours}.attn.c_attn.bias"] = torch.cat([w.get(f"{a}.{p}_proj.bias", (widths[p],)) for p in "qkv"])
        sd[f"{ours}.attn.c_proj.weight"] = w.get(f"{a}.o_proj.weight", (d, q))
        if cfg.qk_norm:
            per_head = cfg.qk_norm_per_head
            sd[f"{ours}.attn.q_norm.weight"] = w.get(f"{a}.q_norm.weight", (cfg.head_dim if per_head else q,))
            sd[f"{ours}.attn.k_norm.weight"] = w.get(f"{a}.k_norm.weight", (cfg.head_dim if per_head else kv,))
        m = f"{hf}.{fam['moe']}"
        if i < cfg.first_dense_layers:  # a dense layer (GLM-4.5's first_k_dense_replace)
            for ours_name, hf_name, shape in (("c_gate", "gate_proj", (cfg.ffn_hidden, d)),
                                              ("c_up", "up_proj", (cfg.ffn_hidden, d)),
                                              ("c_proj", "down_proj", (d, cfg.ffn_hidden))):
                sd[f"{ours}.mlp.{ours_name}.weight"] = w.get(f"{m}.{hf_name}.weight", shape)
            continue
        sd[f"{ours}.mlp.router.weight"] = w.get(f"{m}.gate.weight", (E, d))
        if fam.get("sigmoid"):  # the bias that only selects: on the gate (GLM-4.5) or on the block (MiniMax-M2)
            where = f"{m}.gate" if fam["sigmoid"] == "gate" else m
            sd[f"{ours}.mlp.router.bias"] = w.get(f"{where}.e_score_correction_bias", (E,))
        if f"{m}.experts.gate_up_proj" in w:  # the fused layout of newer transformers: (E, 2f, d), (E, d, f)
            gate, up = w.get(f"{m}.experts.gate_up_proj", (E, 2 * f, d)).chunk(2, dim=1)
            down = w.get(f"{m}.experts.down_proj", (E, d, f))
        else:                                  # one tensor per expert: (f, d), (f, d), (d, f)
            gate, up, down = (torch.stack([w.get(f"{m}.experts.{e}.{name}.weight", shape) for e in range(E)])
                              for name, shape in zip(fam["experts"], ((f, d), (f, d), (d, f))))
        sd[f"{ours}.mlp.w_gate"], sd[f"{ours}.mlp.w_up"] = gate.transpose(1, 2), up.transpose(1, 2)   # (E, d, f)
        sd[f"{ours}.mlp.w_down"] = down.transpose(1, 2)                                              # (E, f, d)
        if cfg.n_shared:
            s, width = f"{m}.{fam['shared']}", cfg.n_shared * f
            shared = f"{ours}.mlp.shared.expert" if cfg.shared_gate else f"{ours}.mlp.shared"  # (families.GatedShared)
            for ours_name, hf_name, shape in (("c_gate", "gate_proj", (width, d)), ("c_up", "up_proj", (width, d)),
                                              ("c_proj", "down_proj", (d, width))):
                sd[f"{shared}.{ours_name}.weight"] = w.get(f"{s}.{hf_name}.weight", shape)
            if cfg.shared_gate:
                sd[f"{ours}.mlp.shared.gate.weight"] = w.get(f"{m}.{fam['shared']}_gate.weight", (1, d))
    unused = w.unused()
    scales = [n for n in unused if n.endswith(("_scale", "_scale_inv"))]
    if scales:  # never dropped: the scales of quantised weights (an FP8 weight is refused without its own)
        raise UserError(f"the checkpoint has {len(scales)} quantisation scale(s) this conversion does not use: "
                        f"{', '.join(scales[:3])}{', ...' if len(scales) > 3 else ''} (quantised weights of a kind "
                        f"read nowhere here)")
    if unused and not ignore_unused:  # weights dropped on import: a wrong model that looks right
        raise UserError(f"the checkpoint has {len(unused)} tensor(s) this conversion does not use: "
                        f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}; pass --ignore_unused to "
                        f"convert without them")
    sd = {k: v.contiguous() for k, v in sd.items()}
    with torch.device("meta"):  # the names and shapes must be exactly the model's
        expected = {k: v.shape for k, v in build(cfg).state_dict().items()}
    wrong = sorted(k for k in expected if k not in sd or sd[k].shape != expected[k])
    if wrong or set(sd) - set(expected):
        raise UserError(f"converted weights do not fit the model: {(wrong or sorted(set(sd) - set(expected)))[:3]}")
    from dataclasses import asdict
    from train import TrainConfig
    settings = {**asdict(TrainConfig()), **asdict(cfg), "out_dir": out_dir}  # train.py resume fine-tunes from here
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint({"model": sd, "optimizer": None, "model_args": asdict(cfg), "config": settings,
                     "iter_num": 0, "best_val": float("inf"), "batch_rng": [], "torch_rng": torch.get_rng_state(),
                     "source": {"from": os.path.abspath(hf_dir), "architecture": arch}}, out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    if unknown:  # transformers' model reads none of them either (tests/test_interop.py checks its code)
        print(f"note: config.json keys not read (nor by transformers' {arch}): {', '.join(unknown)}")
    n = sum(v.numel() for k, v in sd.items() if k != "lm_head.weight" or not cfg.tie_embeddings)
    print(f"{arch} -> {out_dir}/ckpt.pt: {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_experts} experts top-{cfg.top_k} "
          f"(f={cfg.expert_hidden}{f', {cfg.n_shared} shared' if cfg.n_shared else ''}), {n / 1e6:.2f}M parameters"
          + (f"; {len(unused)} unused tensor(s) left out" if unused else ""))


def to_hf(out_dir, hf_dir, overwrite=False):
    """out_dir/ckpt.pt -> hf_dir/{config.json, model.safetensors} in Mixtral's format."""
    from safetensors.torch import save_file
    ckpt = load_checkpoint(out_dir)
    cfg = FamilyConfig(**ckpt["model_args"])
    refusals = [(cfg.n_experts > 0, "n_experts=0: a dense model is not a Mixtral"),
                (cfg.router == "softmax", f"router={cfg.router}: Mixtral routes with a linear softmax router"),
                (cfg.gate_renorm, "gate_renorm=False: Mixtral renormalises the top-k gates (OLMoE-style gates)"),
                (cfg.top_k > 1, "top_k=1: Mixtral renormalises its one gate to 1, here it is the router's probability"),
                (cfg.n_shared == 0, f"n_shared={cfg.n_shared}: Mixtral has no shared experts"),
                (not cfg.qk_norm, "qk_norm=True: Mixtral has no QK-norm"),
                (cfg.routed_scale == 1.0, f"routed_scale={cfg.routed_scale}: Mixtral does not scale its gates"),
                (not cfg.qkv_bias, "qkv_bias=True: Mixtral has no attention biases"),
                (not cfg.select_bias, "select_bias=True: Mixtral selects the top-k of the router's logits"),
                (cfg.pos_emb == "rope", f"pos_emb={cfg.pos_emb}: Mixtral has rotary positions only"),
                (cfg.norm == "rmsnorm", f"norm={cfg.norm}: Mixtral's norms are RMSNorm")]
    # the family settings a Mixtral config.json holds; any other one away from its default has no Mixtral weight
    # or switch (a bias, a clamp, a zero-compute expert, a dense layer, partial rotary positions: families.py)
    mixtral = ("n_kv_head", "head_dim", "rope_theta", "norm_eps", "tie_embeddings")
    refusals += [(False, f"{name}={getattr(cfg, name)!r}: Mixtral has no counterpart")
                 for name in cfg.changed if name not in mixtral]
    for ok, what in refusals:
        if not ok:
            raise UserError(f"{out_dir}/ckpt.pt cannot be exported to Mixtral: {what}")
    if os.path.isdir(hf_dir) and os.listdir(hf_dir) and not overwrite:
        raise UserError(f"{hf_dir} is not empty; pass --overwrite to write into it")
    if cfg.capacity_factor > 0:
        print(f"note: capacity_factor={cfg.capacity_factor} is a dispatch setting, not a weight: transformers runs "
              f"the model dropless")
    sd, q_width, kv = ckpt["model"], cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_embeddings:  # tied: transformers ties lm_head to embed_tokens on load
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        hf, ours = f"model.layers.{i}", f"blocks.{i}"
        q, k, v = sd[f"{ours}.attn.c_attn.weight"].split([q_width, kv, kv])
        out.update({f"{hf}.input_layernorm.weight": sd[f"{ours}.ln_1.weight"],
                    f"{hf}.post_attention_layernorm.weight": sd[f"{ours}.ln_2.weight"],
                    f"{hf}.self_attn.q_proj.weight": q, f"{hf}.self_attn.k_proj.weight": k,
                    f"{hf}.self_attn.v_proj.weight": v,
                    f"{hf}.self_attn.o_proj.weight": sd[f"{ours}.attn.c_proj.weight"],
                    f"{hf}.block_sparse_moe.gate.weight": sd[f"{ours}.mlp.router.weight"]})
        for e in range(cfg.n_experts):
            x = f"{hf}.block_sparse_moe.experts.{e}"
            out[f"{x}.w1.weight"] = sd[f"{ours}.mlp.w_gate"][e].T
            out[f"{x}.w3.weight"] = sd[f"{ours}.mlp.w_up"][e].T
            out[f"{x}.w2.weight"] = sd[f"{ours}.mlp.w_down"][e].T
    eps = cfg.norm_eps or torch.finfo(torch.float32).eps  # 0 = the dtype's epsilon: say which, for fp32
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.n_embd, "intermediate_size": cfg.expert_hidden, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
              "max_position_embeddings": cfg.block_size, "rms_norm_eps": eps, "rope_theta": cfg.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "tie_word_embeddings": cfg.tie_embeddings, "num_local_experts": cfg.n_experts,
              "num_experts_per_tok": cfg.top_k, "hidden_act": "silu", "sliding_window": None,
              "attention_dropout": 0.0, "router_jitter_noise": 0.0, "torch_dtype": "float32"}
    os.makedirs(hf_dir, exist_ok=True)
    save_file({k: t.contiguous().float() for k, t in out.items()}, os.path.join(hf_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    shipped = [n for n in ("tokenizer.json", "tokenizer_config.json") if os.path.exists(os.path.join(out_dir, n))]
    for name in shipped:  # an imported model's own tokenizer goes back with it
        shutil.copy(os.path.join(out_dir, name), os.path.join(hf_dir, name))
    tok = "its tokenizer.json" if shipped else ("GPT-2's tokenizer, not written: transformers' AutoTokenizer 'gpt2' or "
                                                 "tiktoken's 'gpt2' read its ids")
    print(f"{out_dir}/ckpt.pt -> {hf_dir}: MixtralForCausalLM, {len(out)} tensors ({tok})")


def main(argv):
    usage = ("usage: python tools/convert.py from-hf HF_DIR OUT_DIR | to-hf OUT_DIR HF_DIR [--overwrite] "
             "[--ignore_unused]")
    flags = {a for a in argv if a in ("--overwrite", "--ignore_unused")}
    args = [a for a in argv if a not in flags]
    if len(args) != 3 or args[0] not in ("from-hf", "to-hf") or any(a.startswith("-") for a in args):
        raise UserError(usage)
    cmd, src, dst = args
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"{dst} is a file, not a directory")
    if cmd == "from-hf":
        from_hf(src, dst, "--overwrite" in flags, "--ignore_unused" in flags)
    else:
        to_hf(src, dst, "--overwrite" in flags)


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
