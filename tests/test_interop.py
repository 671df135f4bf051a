"""
Real models in and out (tools/convert.py) against transformers with random weights. transformers is a
test-only dependency: these tests skip without it.
"""

import json
import os

import pytest
import torch

from model import GPT, GPTConfig
from tests.helpers import REPO, cli, train

def hf_models():
    """Small Hugging Face MoE models with random weights, built offline from configs."""
    transformers = pytest.importorskip("transformers", reason="the interop tests compare against transformers")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    models = {
        "mixtral": transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6)),
        "olmoe": transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16,
            norm_topk_prob=True)),
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
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def close(a, b, rel=1e-5):
    return ((a - b).abs().max() / b.abs().max()).item() < rel


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
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
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                                                "num_attention_heads": 2}))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], "hidden_')
    for args, message in ((["to-hf", tmp_path / "ermoe", tmp_path / "x"], "router=ermoe: Mixtral routes with a linear"),
                          (["to-hf", tmp_path / "shared", tmp_path / "x"], "n_shared=1: Mixtral has no shared experts"),
                          (["from-hf", tmp_path / "llama", tmp_path / "x"], "architecture 'LlamaForCausalLM' is not one of"),
                          (["from-hf", tmp_path / "nowhere", tmp_path / "x"], "is not a directory"),
                          (["from-hf", tmp_path / "torn", tmp_path / "x"], "config.json is not JSON"),
                          (["sideways", tmp_path, tmp_path], "usage: python tools/convert.py")):
        code, out, err = cli("tools.convert", *args)
        assert code == 1 and err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "x").exists()


def test_an_imported_model_samples_and_is_analyzed_with_its_own_tokenizer(tmp_path):
    transformers, models = hf_models()
    tokenizers = pytest.importorskip("tokenizers")
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
