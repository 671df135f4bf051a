"""
Real checkpoints as they are released, against transformers (tools/convert.py from-hf): every key of every
family's config placed (read, refused or ignored), the keys transformers' modeling code reads placed too,
the defaults equal to transformers', rotary positions read as transformers reads them, the released
config.json forms (MiniMax-M2's rotary_dim, GLM-4.5 without partial_rotary_factor) and FP8 weights with
block scales. The references: transformers' own config classes and `from_pretrained` of the same folder,
and for FP8 a block-by-block dequantisation written here (transformers' CPU FP8 path needs packages CI
does not install). transformers is a test-only dependency: these tests skip without it.
"""

import inspect
import itertools
import json
import math
import re

import pytest
import torch

from tests.helpers import cli, require
from tests.test_interop import close, ours
from tools.hf_config import FAMILIES, model_args_from_hf, placed

MODULES = {"MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe", "Qwen2MoeForCausalLM": "qwen2_moe",
           "Qwen3MoeForCausalLM": "qwen3_moe", "Glm4MoeForCausalLM": "glm4_moe", "MiniMaxM2ForCausalLM": "minimax_m2"}


def transformers_or_skip():
    return require("transformers", "the import tests compare against it")


def unplaced(arch, keys):
    """The keys of `keys` that tools/hf_config.py neither reads, refuses nor ignores for `arch`."""
    return sorted(set(keys) - placed(FAMILIES[arch]))


def modeling_reads(transformers, arch):
    """The config attributes transformers' modeling code of the family reads: config.X and getattr(config, "X")."""
    source = inspect.getsource(inspect.getmodule(getattr(transformers, arch)))
    names = set(re.findall(r"\bconfig\.([a-z]\w*)", source)) | \
        set(re.findall(r"getattr\((?:self\.)?config, \"(\w+)\"", source))
    return {n for n in names if not callable(getattr(getattr(transformers, arch).config_class, n, None))}


def test_every_config_key_of_every_family_is_read_refused_or_ignored():
    transformers = transformers_or_skip()
    assert set(MODULES) == set(FAMILIES)
    for arch in FAMILIES:
        config_class = getattr(transformers, arch).config_class
        keys = config_class().to_dict()
        assert not unplaced(arch, keys), (arch, unplaced(arch, keys))
        assert not unplaced(arch, modeling_reads(transformers, arch)), (
            arch, unplaced(arch, modeling_reads(transformers, arch)))
        fields = getattr(config_class, "__dataclass_fields__", {})
        fields.update({key: fields[alias] for alias, key in config_class.attribute_map.items() if alias in fields})
        for key, ours_default in {**FAMILIES[arch]["read"], **FAMILIES[arch]["refused"]}.items():
            if key in fields:  # a key the class declares: transformers' own default (before its __post_init__)
                assert fields[key].default == ours_default, (arch, key, fields[key].default, ours_default)
            else:              # read by the modeling code through getattr (head_dim, rotary_dim): absent = None
                assert ours_default is None, (arch, key)
        assert unplaced(arch, [*keys, "a_key_of_a_later_release"]) == ["a_key_of_a_later_release"]
        if hasattr(config_class, "default_theta"):
            assert FAMILIES[arch].get("rope_theta", 10000.0) == config_class.default_theta, arch


@pytest.mark.parametrize("arch", ["MiniMaxM2ForCausalLM", "Glm4MoeForCausalLM"])
def test_rotary_dims_and_theta_are_read_as_transformers_reads_them(tmp_path, arch):
    """Every combination of rope_parameters' factor, a top-level partial_rotary_factor, MiniMax-M2's rotary_dim
    and a top-level rope_theta: the dims that rotate and the base, as transformers' AutoConfig gives them."""
    transformers = transformers_or_skip()
    base = {"architectures": [arch], "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "vocab_size": 32,
            "num_hidden_layers": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2,
            "num_local_experts" if arch.startswith("MiniMax") else "n_routed_experts": 4,
            "model_type": MODULES[arch]}
    options = [[None, 0.25], [None, 0.75], [None, 4] if arch.startswith("MiniMax") else [None], [None, 1234.0],
               [None, "theta", "both"]]
    for inner, top, rotary_dim, theta, where in itertools.product(*options):
        hf = dict(base)
        rope = {"rope_type": "default"} if where else None
        if where in ("theta", "both"):
            rope["rope_theta"] = 777.0
        if inner is not None and rope is not None:
            rope["partial_rotary_factor"] = inner
        for key, value in (("rope_parameters", rope), ("partial_rotary_factor", top), ("rotary_dim", rotary_dim),
                           ("rope_theta", theta)):
            if value is not None:
                hf[key] = value
        folder = tmp_path / "case"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(hf))
        theirs = transformers.AutoConfig.from_pretrained(folder).rope_parameters
        want_dims = int(16 * theirs.get("partial_rotary_factor", 1.0))
        _, args, _, _ = model_args_from_hf(hf)
        assert (args["rotary_dim"] or 16) == want_dims, (hf, theirs)
        assert args["rope_theta"] == theirs["rope_theta"], (hf, theirs)


def minimax(transformers, **changes):
    cfg = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=2,
               intermediate_size=16, num_local_experts=8, head_dim=8, rotary_dim=4)
    torch.manual_seed(0)
    model = transformers.MiniMaxM2ForCausalLM(transformers.MiniMaxM2Config(**{**cfg, **changes}))
    with torch.no_grad():
        for _, t in [*model.named_parameters(), *model.named_buffers()]:
            t.normal_(0, 0.1) if t.is_floating_point() else None
    return model.eval()


def rewrite(folder, drop=(), **keys):
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop}
    config.update(keys)
    (folder / "config.json").write_text(json.dumps(config))
    return config


def assert_same_model(folder, out, hf):
    """tools/convert.py from-hf `folder` into `out`: the logits within 1e-5 of `hf` (relative) and \
ten greedy tokens equal."""
    code, stdout, err = cli("tools.convert", "from-hf", folder, out)
    assert code == 0, err
    model = ours(out)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert close(model(ids, ids)[0], hf(ids).logits)
    prompt = ids[:, :5]
    want = hf.generate(prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt),
                       pad_token_id=0)
    assert torch.equal(model.generate(prompt, 10, temperature=0), want)
    return stdout


def test_minimax_m2_released_config_reads_rotary_dim(tmp_path):
    """MiniMax-M2's config.json as released: a top-level rotary_dim (half the head), rope_theta, no
    partial_rotary_factor, and its remote code's own keys at the values transformers' model assumes."""
    transformers = transformers_or_skip()
    minimax(transformers).save_pretrained(tmp_path / "hf")
    rewrite(tmp_path / "hf", drop=("rope_parameters", "partial_rotary_factor"), rotary_dim=4, rope_theta=5000000,
            attn_type_list=[1, 1], qk_norm_type="per_layer", scoring_func="sigmoid", use_qk_norm=True,
            use_routing_bias=True, shared_intermediate_size=0, use_mtp=True, num_mtp_modules=3,
            mtp_transformer_layers=1, torch_dtype="float32")
    hf = transformers.MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert_same_model(tmp_path / "hf", tmp_path / "ours", hf)
    assert ours(tmp_path / "ours").config.rotary_dim == 4
    for key, value in (("scoring_func", "softmax"), ("attn_type_list", [1, 0]), ("shared_intermediate_size", 64)):
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps(
            {**json.loads((tmp_path / "hf" / "config.json").read_text()), key: value}))
        code, out, err = cli("tools.convert", "from-hf", tmp_path / key, tmp_path / "x")
        assert code == 1 and err.count("\n") == 1 and f"{key}=" in err and "has no counterpart" in err, err


def test_glm45_without_partial_rotary_factor_rotates_half_as_transformers_does(tmp_path):
    transformers = transformers_or_skip()
    from tests.test_interop import sigmoid_family_models
    sigmoid_family_models(transformers)["glm4_moe"].save_pretrained(tmp_path / "hf")
    config = rewrite(tmp_path / "hf")
    config["rope_parameters"].pop("partial_rotary_factor")
    config.pop("partial_rotary_factor", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert_same_model(tmp_path / "hf", tmp_path / "ours", hf)
    assert ours(tmp_path / "ours").config.rotary_dim == 4


def test_unknown_keys_are_named_and_top1_with_renormalised_sigmoid_gates_is_refused(tmp_path):
    transformers = transformers_or_skip()
    minimax(transformers).save_pretrained(tmp_path / "hf")
    rewrite(tmp_path / "hf", some_key_of_a_fine_tuner=3)
    hf = transformers.MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    out = assert_same_model(tmp_path / "hf", tmp_path / "ours", hf)
    assert ("note: config.json keys not read (nor by transformers' MiniMaxM2ForCausalLM): "
            "some_key_of_a_fine_tuner") in out
    minimax(transformers, num_experts_per_tok=1).save_pretrained(tmp_path / "top1")
    code, out, err = cli("tools.convert", "from-hf", tmp_path / "top1", tmp_path / "x")
    assert code == 1 and err.count("\n") == 1 and "one expert per token with renormalised gates" in err, err
    assert not (tmp_path / "x").exists()


def quantise(weight, bm, bn):
    """FP8 (e4m3) of a weight and its block scales (scale = the block's max |w| / 448), block by block."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            scales[i, j] = block.abs().max().clamp_min(1e-12) / 448.0
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (block / scales[i, j]).to(torch.float8_e4m3fn)
    return q, scales


def dequantise(q, scales, bm, bn):
    """The fp32 reference: every element times the scale of its block, one element at a time."""
    out = torch.empty(q.shape)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c] = q[r, c].float() * scales[r // bm, c // bn]
    return out


def test_fp8_block_scaled_weights_are_dequantised_and_never_loaded_unscaled(tmp_path):
    """MiniMax-M2's FP8 form: the linear weights (not the router, the norms, the embeddings, the output) as
    float8_e4m3fn with a weight_scale_inv per 8 x 8 block (blocks that do not divide a weight included).
    The import equals transformers' model holding the dequantised weights; without the scales, or without
    quantization_config, it is refused, --ignore_unused or not."""
    transformers = transformers_or_skip()
    from safetensors.torch import load_file, save_file
    hf = minimax(transformers, hidden_size=40, intermediate_size=20, head_dim=10, rotary_dim=4)
    hf.save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    fp8, reference = {}, {}
    for name, w in weights.items():
        if name.endswith("proj.weight") or ".experts." in name:
            q, s = quantise(w, 8, 8)
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            reference[name] = dequantise(q, s, 8, 8)
        else:
            fp8[name] = reference[name] = w
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) == 2 * (4 + 3 * 8)
    quantization = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                    "weight_block_size": [8, 8],
                    "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    for name, tensors, extra in (("fp8", fp8, {"quantization_config": quantization}),
                                 ("no_scales", {k: v for k, v in fp8.items() if not k.endswith("_scale_inv")},
                                  {"quantization_config": quantization}),
                                 ("no_quantization_config", fp8, {})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(
            {**json.loads((tmp_path / "hf" / "config.json").read_text()), **extra}))
    (tmp_path / "reference").mkdir()  # the dequantised weights in the same layout, read by transformers itself
    save_file(reference, tmp_path / "reference" / "model.safetensors")
    (tmp_path / "reference" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    hf = transformers.MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "reference").eval()
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight,
                           weights["model.layers.0.self_attn.q_proj.weight"])
    assert_same_model(tmp_path / "fp8", tmp_path / "ours", hf)
    for name, message in (("no_scales", "is FP8 (torch.float8_e4m3fn) with no '"),
                          ("no_quantization_config", "with no quantization_config in config.json")):
        for flags in ([], ["--ignore_unused"]):
            code, out, err = cli("tools.convert", "from-hf", tmp_path / name, tmp_path / "x", *flags)
            assert code == 1 and err.count("\n") == 1 and message in err and "without their block scales" in err, err
            assert "--ignore_unused" not in err and not (tmp_path / "x").exists()
    (tmp_path / "gptq").mkdir()
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "hf" / "config.json").read_text()),
         "quantization_config": {"quant_method": "gptq"}}))
    code, out, err = cli("tools.convert", "from-hf", tmp_path / "gptq", tmp_path / "x")
    assert code == 1 and "quant_method='gptq'" in err, err


def test_docs_name_every_key_the_import_places():
    """docs/real-models.md lists, per family, what is read, refused and ignored: every key of the tables."""
    import os
    from tests.helpers import REPO
    text = open(os.path.join(REPO, "docs", "real-models.md")).read()
    keys = set().union(*(placed(fam) - set(fam["aliases"]) for fam in FAMILIES.values()))
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, missing
