"""
Real models in and out (tools/convert.py) against transformers with random weights (transformers is a
test-only dependency: those tests skip without it), and the backbone options the imports need against
the attention written out with loops.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, cli, require, train  # first: it sets TRITON_INTERPRET before triton loads
from families import FamilyConfig, build, from_checkpoint
from model import GPT, GPTConfig


def hf_models():
    """Small Hugging Face MoE models with random weights, built offline from configs."""
    transformers = require("transformers", "the interop tests compare against it")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    models = {
        "mixtral": transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6)),
        "olmoe": transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **common, num_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16,
            norm_topk_prob=True)),
        # Qwen3-30B-A3B's shape in small: heads of 16 with d=32 and 4 heads (head_dim apart from d / n_head),
        # q/k norm per head, raw top-k gates
        "qwen3_moe": transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            norm_topk_prob=False)),
    }
    for m in models.values():  # larger than the default init, so that every path matters
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.1)
        m.eval()
    return transformers, models


def ours(out_dir):
    from support.rundir import load_checkpoint
    ckpt = load_checkpoint(str(out_dir))
    model = from_checkpoint(ckpt["model_args"])[1]
    model.load_state_dict(ckpt["model"])
    return model.eval()


def close(a, b, rel=1e-5):
    return ((a - b).abs().max() / b.abs().max()).item() < rel


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_hf_import_gives_the_same_logits_and_gradients(tmp_path, family):
    transformers, models = hf_models()
    hf = models[family]
    hf.save_pretrained(tmp_path / "hf")
    code, out, err = cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")
    assert code == 0, err
    model = ours(tmp_path / "ours")
    ids = torch.randint(0, 96, (2, 24))
    a, logits = hf(ids, labels=ids), model(ids, ids)[0]
    assert close(logits, a.logits), family
    a.loss.backward()                                     # the same loss on both sides (HF shifts the labels)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
    pairs = {"model.embed_tokens.weight": model.wte.weight, "lm_head.weight": model.lm_head.weight,
             "model.layers.0.mlp.gate.weight": model.blocks[0].mlp.router.weight,  # (in memory; on disk Mixtral's
                                                                                    # router is block_sparse_moe.gate)
             "model.layers.1.self_attn.o_proj.weight": model.blocks[1].attn.c_proj.weight}
    grads = dict(hf.named_parameters())
    pad = hf.config.pad_token_id  # HF's embedding gives its padding row no gradient; ours has no padding row
    for name, p in pairs.items():
        ours_g, hf_g = p.grad.clone(), grads[name].grad.clone()
        if name == "model.embed_tokens.weight" and pad is not None and pad < 96:
            assert hf_g[pad].abs().sum() == 0
            ours_g[pad] = hf_g[pad] = 0
        assert close(ours_g, hf_g, rel=1e-5), (family, name)


def test_hf_mixtral_round_trip_is_identical_and_our_export_loads_in_transformers(tmp_path):
    transformers, models = hf_models()
    from safetensors.torch import load_file
    models["mixtral"].save_pretrained(tmp_path / "hf")
    assert cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")[0] == 0
    code, out, err = cli("tools.convert", "to-hf", tmp_path / "ours", tmp_path / "back")
    assert code == 0, err
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # HF -> ours -> HF: the same tensors
    # ours (trained, tied embeddings, the default eps and rope) -> HF Mixtral -> transformers
    train(tmp_path / "run", "--max_iters=2", "--eval_interval=2", "--n_kv_head=1")
    code, out, err = cli("tools.convert", "to-hf", tmp_path / "run", tmp_path / "exported")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    model = ours(tmp_path / "run")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    assert close(model(ids, ids)[0], hf(ids).logits)


def test_convert_refuses_what_does_not_map(tmp_path):
    train(tmp_path / "ermoe", "--max_iters=1", "--eval_interval=1", "--router=ermoe")
    train(tmp_path / "shared", "--max_iters=1", "--eval_interval=1", "--n_shared=1")
    train(tmp_path / "biased", "--max_iters=1", "--eval_interval=1", "--router_bias=True")  # gpt-oss's (families.py)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                                                "num_attention_heads": 2}))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], "hidden_')
    for args, message in ((["to-hf", tmp_path / "ermoe", tmp_path / "x"], "router=ermoe: Mixtral routes with a linear"),
                          (["to-hf", tmp_path / "shared", tmp_path / "x"], "n_shared=1: Mixtral has no shared experts"),
                          (["to-hf", tmp_path / "biased", tmp_path / "x"],
                           "router_bias=True: Mixtral has no counterpart"),
                          (["from-hf", tmp_path / "llama", tmp_path / "x"],
                           "architecture 'LlamaForCausalLM' is not one of"),
                          (["from-hf", tmp_path / "nowhere", tmp_path / "x"], "is not a directory"),
                          (["from-hf", tmp_path / "torn", tmp_path / "x"], "config.json is not JSON"),
                          (["sideways", tmp_path, tmp_path], "usage: python tools/convert.py")):
        code, out, err = cli("tools.convert", *args)
        assert code == 1 and err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "x").exists()


def test_an_imported_model_samples_and_is_analyzed_with_its_own_tokenizer(tmp_path):
    transformers, models = hf_models()
    tokenizers = require("tokenizers", "an imported model's tokenizer needs it")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([open(os.path.join(REPO, "data", "shakespeare", "input.txt")).read()[:20000]],
                            tokenizers.trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "</s>"]))
    models["olmoe"].save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")[0] == 0
    assert (tmp_path / "ours" / "tokenizer.json").exists()
    code, out, err = cli("sample", f"--out_dir={tmp_path / 'ours'}", "--start=The king", "--num_samples=1",
                         "--max_new_tokens=5", "--temperature=0")
    prompt = tok.decode(tok.encode("The king").ids)       # the checkpoint's tokenizer, not GPT-2's
    assert code == 0 and out.startswith(prompt) and len(out.split("---")[0]) > len(prompt), err
    code, out, err = cli("tools.analyze", tmp_path / "ours", "--text=The king is dead, long live the king")
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith(("token ", "T "))]
    assert len(table) == 2 and "layer 1" in table[0] and "router.png" in out and "tokens.png" in out, out
    code, out, err = cli("tools.analyze", tmp_path / "ours")
    assert code == 1 and "give the text to route with --text" in err


def test_an_imported_mixtral_generates_greedily_what_transformers_generates(tmp_path):
    transformers, models = hf_models()
    hf = models["mixtral"]
    hf.save_pretrained(tmp_path / "hf")
    assert cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")[0] == 0
    model = ours(tmp_path / "ours")
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                       pad_token_id=0)
    for use_cache in (True, False):
        assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=use_cache), want), use_cache


@pytest.mark.parametrize("renorm", [True, False])
def test_sigmoid_router_equals_deepseek_v3_moe(renorm):
    """transformers' DeepseekV3MoE with group-limited routing (4 groups, 2 picked), a routed scaling
    factor, a non-zero score-correction bias and a shared expert, against our sigmoid-router MoE block:
    the same experts, the same block output, the same gradients of the input and every weight."""
    transformers = require("transformers", "the interop tests compare against it")
    from model import MoE
    E, G, k, d, f = 8, 4, 2, 32, 16
    hf_cfg = transformers.DeepseekV3Config(hidden_size=d, n_routed_experts=E, num_experts_per_tok=k, n_group=G,
                                           topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=renorm,
                                           moe_intermediate_size=f, n_shared_experts=1, num_hidden_layers=1)
    torch.manual_seed(0)
    hf = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        hf.gate.e_score_correction_bias.normal_(0, 0.1)
    ours_cfg = GPTConfig(n_layer=1, n_head=2, n_embd=d, n_experts=E, top_k=k, expert_hidden=f, n_shared=1,
                         router="sigmoid", n_group=G, topk_group=2, routed_scale=2.5, gate_renorm=renorm)
    moe = MoE(ours_cfg)
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
        moe.router.bias.copy_(hf.gate.e_score_correction_bias)
        gate, up = hf.experts.gate_up_proj.chunk(2, dim=1)                  # (E, f, d) each
        moe.w_gate.copy_(gate.transpose(1, 2))
        moe.w_up.copy_(up.transpose(1, 2))
        moe.w_down.copy_(hf.experts.down_proj.transpose(1, 2))              # (E, d, f) -> (E, f, d)
        moe.shared.c_gate.weight.copy_(hf.shared_experts.gate_proj.weight)
        moe.shared.c_up.weight.copy_(hf.shared_experts.up_proj.weight)
        moe.shared.c_proj.weight.copy_(hf.shared_experts.down_proj.weight)
    x = torch.randn(2, 12, d, generator=torch.Generator().manual_seed(1))
    _, hf_weights, hf_idx = hf.gate(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf = hf(xa)
    y, r = moe(xb)
    assert torch.equal(hf_idx.sort(-1).values, r.idx.sort(-1).values)       # the same experts
    order = r.idx.argsort(-1)
    assert torch.allclose(r.gates.gather(1, order), hf_weights.gather(1, hf_idx.argsort(-1)), atol=1e-6)
    assert torch.allclose(y, y_hf, atol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y_hf * g).sum().backward()
    (y * g).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(moe.router.weight.grad, hf.gate.weight.grad, atol=1e-5)
    assert torch.allclose(moe.shared.c_gate.weight.grad, hf.shared_experts.gate_proj.weight.grad, atol=1e-5)
    gate_g, up_g = hf.experts.gate_up_proj.grad.chunk(2, dim=1)
    assert torch.allclose(moe.w_gate.grad, gate_g.transpose(1, 2), atol=1e-5)
    assert torch.allclose(moe.w_up.grad, up_g.transpose(1, 2), atol=1e-5)
    assert torch.allclose(moe.w_down.grad, hf.experts.down_proj.grad.transpose(1, 2), atol=1e-5)
    # the group limit mattered: without it, some tokens would select other experts
    free = select_without_groups(moe, xb.detach().reshape(-1, d))
    assert not torch.equal(free.sort(-1).values, r.idx.sort(-1).values)


def select_without_groups(moe, x):
    from router import select_topk
    s = torch.sigmoid(torch.nn.functional.linear(x, moe.router.weight))
    return select_topk(s + moe.router.bias, moe.router.k)


def test_every_bad_checkpoint_folder_is_one_error_line_and_the_previous_import_is_unchanged(tmp_path):
    """Files from outside: a download cut short, a hand-edited config, tensors that do not fit, tensors
    the mapping would drop. Each ends in one error line naming the file, field or tensor."""
    transformers, models = hf_models()
    from safetensors.torch import load_file, save_file
    from tests.helpers import file_hashes
    models["mixtral"].save_pretrained(tmp_path / "hf")
    assert cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")[0] == 0   # a previous import
    before = file_hashes(tmp_path / "ours")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights = load_file(tmp_path / "hf" / "model.safetensors")

    def variant(name, config_changes=None, tensors=None, raw=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        if raw is not None:
            (folder / "model.safetensors").write_bytes(raw)
        else:
            save_file(tensors if tensors is not None else weights, folder / "model.safetensors")
        return folder
    whole = (tmp_path / "hf" / "model.safetensors").read_bytes()
    extra = {**weights, "model.layers.0.block_sparse_moe.extra_norm.weight": torch.ones(32)}
    bad_shape = {**weights, "model.layers.1.self_attn.o_proj.weight": torch.zeros(32, 16)}
    int_tensor = {**weights, "model.norm.weight": torch.ones(32, dtype=torch.int64)}
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.post_attention_layernorm.weight"}
    cases = [
        (variant("cut_header", raw=whole[:100]), "model.safetensors is not a readable safetensors file"),
        (variant("cut_data", raw=whole[:len(whole) // 2]), "model.safetensors"),
        (variant("string_width", {"hidden_size": "32"}), "config.json: hidden_size must be an integer >= 1, got '32'"),
        (variant("negative_experts", {"num_local_experts": -4}), "num_local_experts must be an integer >= 1, got -4"),
        (variant("too_many_per_token", {"num_experts_per_tok": 9}),
         "num_experts_per_tok must be an integer in [1, 4], got 9"),
        (variant("bool_eps", {"rms_norm_eps": True}), "rms_norm_eps must be a number"),
        (variant("unused", tensors=extra), "1 tensor(s) this conversion does not use: "
                                           "model.layers.0.block_sparse_moe.extra_norm.weight; pass --ignore_unused"),
        (variant("bad_shape", tensors=bad_shape), "tensor 'model.layers.1.self_attn.o_proj.weight' has shape (32, 16), "
                                                  "expected (32, 32)"),
        (variant("int_tensor", tensors=int_tensor), "tensor 'model.norm.weight' has dtype torch.int64"),
        (variant("missing", tensors=missing), "has no tensor 'model.layers.1.post_attention_layernorm.weight'"),
    ]
    for folder, message in cases:
        code, out, err = cli("tools.convert", "from-hf", folder, tmp_path / "ours", "--overwrite")
        assert code == 1 and err.count("\n") == 1 and message in err, (folder.name, err)
        assert file_hashes(tmp_path / "ours") == before, folder.name
    code, out, err = cli("tools.convert", "from-hf", tmp_path / "unused", tmp_path / "ours2", "--ignore_unused")
    assert code == 0 and "1 unused tensor(s) left out" in out, err


# ------------------------------------------------------------------------------------------------
# one name, two packages: this project's kernels.py and Hugging Face's `kernels`, which transformers
# imports while it loads and again inside from_pretrained (kernels.py, its last section)

USER_SCRIPT = """
import os, sys, tempfile
import torch
{imports}
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.models.mixtral import modeling_mixtral
import kernels
import router
cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
with tempfile.TemporaryDirectory() as where:
    modeling_mixtral.MixtralForCausalLM(cfg).save_pretrained(where)
    hf = AutoModelForCausalLM.from_pretrained(where)           # imports `kernels` again, lazily
ours = model.GPT(model.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_experts=4))
logits = torch.randn(6, 4, requires_grad=True)
fused, ref = router.topk_route(logits, 2, "triton"), router.topk_route(logits, 2, "torch")  # Triton, interpreted
assert torch.equal(fused.idx, ref.idx) and torch.allclose(fused.gates, ref.gates)
fused.gates.sum().backward()
print("ours:", kernels.fused_route.__module__, os.path.relpath(kernels.__file__))
print("theirs:", kernels.Mode.__module__, \
kernels.__version__ == __import__("importlib.metadata").metadata.version("kernels"))
print("logits:", tuple(ours(torch.zeros(1, 8, dtype=torch.long))[0].shape), type(hf).__name__)
"""


def require_hub_kernels():
    """Hugging Face's `kernels` package (loaded through kernels.py), or a skip where it is not installed."""
    import kernels
    hub = kernels.__getattr__.hub_package()
    if hub is None:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5 does not need it): no collision")
    return hub


def user_script(code, cwd):
    """`code` run as a user's script started in `cwd` (sys.path[0] = cwd): (exit status, stdout, stderr)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("order", ["model first", "transformers first"])
def test_a_script_at_the_repository_root_uses_transformers_and_the_model_together(order):
    """Both packages named `kernels` in one process, whichever is imported first: transformers builds, saves
    and loads a Mixtral (from_pretrained), our model runs, the Triton routing pass runs (interpreted) and equals
    the reference, and each side's `kernels` names resolve to its own package."""
    require("transformers", "the interop tests compare against it")
    require_hub_kernels()
    imports = "import model" if order == "model first" else "import transformers\nimport model"
    code, out, err = user_script(USER_SCRIPT.format(imports=imports), REPO)
    assert code == 0, err
    assert "ours: kernels kernels.py" in out and "theirs: kernels._internals" in out and " True" in out, out
    assert "logits: (1, 1, 64) MixtralForCausalLM" in out, out


def test_kernels_py_and_hugging_faces_package_share_no_public_name():
    import kernels
    hub = require_hub_kernels()
    assert kernels.fused_route and kernels.CUDAProperties is hub.CUDAProperties  # one module answers for both
    ours = {n for n in vars(kernels) if not n.startswith("_")} - {"torch", "triton", "tl"}
    theirs = {n for n in vars(hub) if not n.startswith("_")}
    assert ours and theirs and not ours & theirs, ours & theirs


def test_hugging_faces_kernels_imported_first_is_refused_in_one_line(tmp_path):
    """The other order, where the collision cannot be undone: transformers loaded Hugging Face's `kernels`
    before the repository root was on sys.path. Importing the model then says what to do in one line."""
    require("transformers", "the interop tests compare against it")
    require_hub_kernels()
    code, out, err = user_script(f"import sys, transformers, kernels\nsys.path.insert(0, {REPO!r})\nimport model",
                                 tmp_path)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: `import kernels` found Hugging Face's package") and \
        "put the repository root first on sys.path" in last, err


def test_nanogpt_parts_equal_gpt2_in_transformers():
    """pos_emb=learned, mlp=gelu, norm=layernorm, n_experts=0: nanoGPT's network (GPT-2 without biases),
    against transformers' GPT2LMHeadModel with every bias at 0 and exact GELU: logits and gradients."""
    transformers = require("transformers", "the interop tests compare against it")
    d, L, V, S = 32, 2, 96, 24
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=S, n_embd=d, n_layer=L, n_head=4, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith(".bias") else torch.randn_like(p) * 0.1 + ("ln" in name))
    model = GPT(GPTConfig(block_size=S, vocab_size=V, n_layer=L, n_head=4, n_embd=d, n_experts=0, pos_emb="learned",
                          mlp="gelu", norm="layernorm")).eval()
    sd = {"wte.weight": hf.transformer.wte.weight, "wpe.weight": hf.transformer.wpe.weight,
          "ln_f.weight": hf.transformer.ln_f.weight}
    for i, h in enumerate(hf.transformer.h):  # Conv1D keeps (in, out): transposed for nn.Linear
        sd.update({f"blocks.{i}.ln_1.weight": h.ln_1.weight, f"blocks.{i}.ln_2.weight": h.ln_2.weight,
                   f"blocks.{i}.attn.c_attn.weight": h.attn.c_attn.weight.T,
                   f"blocks.{i}.attn.c_proj.weight": h.attn.c_proj.weight.T,
                   f"blocks.{i}.mlp.c_up.weight": h.mlp.c_fc.weight.T,
                   f"blocks.{i}.mlp.c_proj.weight": h.mlp.c_proj.weight.T})
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to wte on both sides
    ids = torch.randint(0, V, (2, S))
    a, logits = hf(ids, labels=ids), model(ids, ids)[0]
    assert close(logits, a.logits)
    a.loss.backward()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    h = hf.transformer.h
    for ours_p, theirs in ((model.wpe.weight, hf.transformer.wpe.weight.grad),
                           (model.wte.weight, hf.transformer.wte.weight.grad),
                           (model.blocks[1].mlp.c_up.weight, h[1].mlp.c_fc.weight.grad.T),
                           (model.blocks[0].attn.c_attn.weight, h[0].attn.c_attn.weight.grad.T),
                           (model.blocks[0].ln_1.weight, h[0].ln_1.weight.grad)):
        assert close(ours_p.grad, theirs)


@pytest.mark.parametrize("family, arch", [
    ("gpt_oss", "GptOssForCausalLM"), ("deepseek_v4", "DeepseekV4ForCausalLM"), ("llama4_text", "Llama4ForCausalLM"),
    ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
    ("longcat_flash", "LongcatFlashForCausalLM"), ("qwen3_next", "Qwen3NextForCausalLM")])
def test_the_atlas_families_are_refused_in_one_line_naming_the_missing_piece(tmp_path, family, arch):
    """A real transformers config of each family (written by transformers itself): refused before anything is
    written, one line, naming what the model lacks."""
    from tools.hf_config import NOT_YET
    transformers = require("transformers", "the interop tests compare against it")
    config = transformers.AutoConfig.for_model(family)
    config.architectures = [arch]
    config.save_pretrained(tmp_path / "hf")
    code, out, err = cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")
    assert code == 1 and err.count("\n") == 1, err
    assert NOT_YET[config.architectures[0]] in err and not (tmp_path / "ours").exists()


def sigmoid_family_models(transformers):
    """GLM-4.5 (a dense first layer, groups, a shared expert, q/k/v biases, q/k norm per head, half the head
    rotating) and MiniMax-M2 (q/k norm over the whole projection, a quarter rotating), random weights and
    random select-only biases."""
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=2)
    torch.manual_seed(0)
    models = {
        "glm4_moe": transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2,
            n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, attention_bias=True,
            use_qk_norm=True)),
        "minimax_m2": transformers.MiniMaxM2ForCausalLM(transformers.MiniMaxM2Config(
            **common, intermediate_size=16, num_local_experts=8, head_dim=8, rotary_dim=2)),
    }
    for m in models.values():
        with torch.no_grad():
            for name, t in [*m.named_parameters(), *m.named_buffers()]:
                if "e_score_correction_bias" in name or name in dict(m.named_parameters()):
                    t.normal_(0, 0.1)
        m.eval()
    return models


@pytest.mark.parametrize("family", ["glm4_moe", "minimax_m2"])
def test_sigmoid_routed_families_import_with_equal_logits(tmp_path, family):
    """GLM-4.5 and MiniMax-M2 whole models: tools/convert.py from-hf, then the same logits and the same
    gradients of the router, the experts and the attention as transformers'."""
    transformers = require("transformers", "the interop tests compare against it")
    hf = sigmoid_family_models(transformers)[family]
    hf.save_pretrained(tmp_path / "hf")
    code, out, err = cli("tools.convert", "from-hf", tmp_path / "hf", tmp_path / "ours")
    assert code == 0, err
    model = ours(tmp_path / "ours")
    cfg = model.config
    assert cfg.router == "sigmoid" and cfg.rotary_dim == (4 if family == "glm4_moe" else 2)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    a, logits = hf(ids, labels=ids), model(ids, ids)[0]
    assert close(logits, a.logits), family
    a.loss.backward()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
    theirs = dict(hf.named_parameters())
    layer = 1  # an MoE layer in both (GLM-4.5's layer 0 is dense)
    assert close(model.blocks[layer].mlp.router.weight.grad, theirs[f"model.layers.{layer}.mlp.gate.weight"].grad)
    down = theirs[f"model.layers.{layer}.mlp.experts.down_proj"].grad.transpose(1, 2)
    assert close(model.blocks[layer].mlp.w_down.grad, down)
    assert close(model.blocks[0].attn.c_proj.weight.grad, theirs["model.layers.0.self_attn.o_proj.weight"].grad)


def test_head_dim_apart_and_qk_norm_per_head():
    """A head size that is not n_embd / n_head (Qwen3), and RMSNorm on each head of q and k: the
    attention written out with explicit loops over heads."""
    torch.manual_seed(0)
    cfg = FamilyConfig(n_layer=1, n_head=4, n_kv_head=2, head_dim=12, n_embd=32, block_size=8, vocab_size=64,
                       n_experts=0, qk_norm=True, qk_norm_per_head=True)
    model = build(cfg)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.normal_()
        attn.k_norm.weight.normal_()
    assert attn.c_attn.weight.shape == (4 * 12 + 2 * 2 * 12, 32) and attn.c_proj.weight.shape == (32, 48)
    x = torch.randn(2, 8, 32)
    q, k, v = attn.c_attn(x).split([48, 24, 24], dim=-1)
    cos, sin = model.cos[:8], model.sin[:8]

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps) * w

    def rotate(t):
        a, b = t[..., :6], t[..., 6:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    heads = []
    for h in range(4):
        qh = rotate(rms(q[..., 12 * h:12 * h + 12], attn.q_norm.weight))
        kh = rotate(rms(k[..., 12 * (h // 2):12 * (h // 2) + 12], attn.k_norm.weight))
        vh = v[..., 12 * (h // 2):12 * (h // 2) + 12]
        scores = (qh @ kh.transpose(1, 2)) / math.sqrt(12) + torch.full((8, 8), -math.inf).triu(1)
        heads.append(scores.softmax(-1) @ vh)
    want = attn.c_proj(torch.cat(heads, -1))
    assert torch.allclose(attn(x, cos, sin), want, atol=1e-5)
    assert cfg.param_count() == model.num_params()[0]
