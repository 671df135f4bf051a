"""
The router atlas (docs/routers.md): each MoE family is a setting of this project's switches
(config/families/<family>.py), and its MoE block equals transformers' own for that family, with
random weights (a non-zero correction bias where the family has one, non-unit scales): the selected
experts, the block output, the input gradient and every parameter's gradient, on both dispatch
paths, fp32, relative error <= 1e-5. transformers is a test-only dependency: without it these skip.
"""

import os

import pytest
import torch

from tests.helpers import REPO, require  # first: it sets TRITON_INTERPRET before router.py imports triton
import families  # noqa: E402
from families import FamilyConfig  # noqa: E402
from model import MoE  # noqa: E402
from support.settings import read_config_file  # noqa: E402

D, F_, E, K, V = 32, 16, 8, 2, 50     # width, expert width, experts, top-k, vocabulary of the hash table
FAMILIES = ["gpt_oss", "deepseek_v4", "llama4", "glm4_moe", "minimax_m2", "ernie4_5_moe", "longcat_flash", "qwen3_next"]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def same(t):
    return t


def swiglu_weights(experts):
    """transformers' experts (gate_up_proj (E, 2f, d) [gate; up], down_proj (E, d, f)) -> ours, each as
    (their parameter, the map from a tensor of its shape to ours): weights and gradients map alike."""
    return {"w_gate": (experts.gate_up_proj, lambda t: t.chunk(2, dim=1)[0].transpose(1, 2)),
            "w_up": (experts.gate_up_proj, lambda t: t.chunk(2, dim=1)[1].transpose(1, 2)),
            "w_down": (experts.down_proj, lambda t: t.transpose(1, 2))}


def mlp_weights(mlp, prefix="shared"):
    """A transformers SwiGLU MLP (gate_proj, up_proj, down_proj) -> our shared experts' MLP."""
    return {f"{prefix}.c_gate.weight": (mlp.gate_proj.weight, same),
            f"{prefix}.c_up.weight": (mlp.up_proj.weight, same),
            f"{prefix}.c_proj.weight": (mlp.down_proj.weight, same)}


def build(family, tf, layer=0):
    """-> (transformers block, its call on x (B, S, d) and ids (B, S) giving y (B, S, d), its router module,
    our settings beyond the family's file, {our name: (their parameter or buffer, map)})."""
    m = tf.models
    if family == "gpt_oss":
        cfg = m.gpt_oss.GptOssConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K,
                                     swiglu_limit=0.3)  # a small limit, so that the clamps act
        hf = m.gpt_oss.modeling_gpt_oss.GptOssMLP(cfg)
        ex = hf.experts
        weights = {"router.weight": (hf.router.weight, same), "router.logit_bias": (hf.router.bias, same),
                   "w_gate": (ex.gate_up_proj, lambda t: t[..., 0::2]),
                   "w_up": (ex.gate_up_proj, lambda t: t[..., 1::2]),
                   "w_down": (ex.down_proj, same), "biases.0": (ex.gate_up_proj_bias, lambda t: t[:, 0::2]),
                   "biases.1": (ex.gate_up_proj_bias, lambda t: t[:, 1::2]), "biases.2": (ex.down_proj_bias, same)}
        return hf, (lambda x, ids: hf(x)[0]), hf.router, dict(swiglu_limit=0.3), weights
    if family == "deepseek_v4":  # layer 0 a hash layer, layer 1 a top-k layer
        cfg = m.deepseek_v4.DeepseekV4Config(hidden_size=D, moe_intermediate_size=F_, n_routed_experts=E,
                                             num_experts_per_tok=K, vocab_size=V, num_hidden_layers=2,
                                             mlp_layer_types=["hash_moe", "moe"], swiglu_limit=0.5,
                                             routed_scaling_factor=1.7)
        hf = m.deepseek_v4.modeling_deepseek_v4.DeepseekV4SparseMoeBlock(cfg, layer)
        weights = {"router.weight": (hf.gate.weight, same), **swiglu_weights(hf.experts),
                   **mlp_weights(hf.shared_experts)}
        weights.update({"router.table": (hf.gate.tid2eid, same), "router.bias": (torch.zeros(E), same)} if layer == 0
                       else {"router.bias": (hf.gate.e_score_correction_bias, same)})  # a hash layer has no bias
        return hf, (lambda x, ids: hf(x, input_ids=ids)), hf.gate, dict(swiglu_limit=0.5, routed_scale=1.7), weights
    if family == "llama4":
        cfg = m.llama4.Llama4TextConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K)
        hf = m.llama4.modeling_llama4.Llama4TextMoe(cfg)
        gu = hf.experts.gate_up_proj
        weights = {"router.weight": (hf.router.weight, same), "router.bias": (torch.zeros(E), same),  # (no bias)
                   "w_gate": (gu, lambda t: t[..., :F_]),
                   "w_up": (gu, lambda t: t[..., F_:]), "w_down": (hf.experts.down_proj, same),
                   **mlp_weights(hf.shared_expert)}
        return hf, (lambda x, ids: hf(x)[0].view(x.shape)), hf.router, {}, weights
    if family == "glm4_moe":
        cfg = m.glm4_moe.Glm4MoeConfig(hidden_size=D, moe_intermediate_size=F_, n_routed_experts=E,
                                       num_experts_per_tok=K,
                                       n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                                       norm_topk_prob=True)
        hf = m.glm4_moe.modeling_glm4_moe.Glm4MoeMoE(cfg)
        weights = {"router.weight": (hf.gate.weight, same), "router.bias": (hf.gate.e_score_correction_bias, same),
                   **swiglu_weights(hf.experts), **mlp_weights(hf.shared_experts)}
        return hf, (lambda x, ids: hf(x)), hf.gate, {}, weights
    if family == "minimax_m2":
        cfg = m.minimax_m2.MiniMaxM2Config(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                                           num_experts_per_tok=K)
        hf = m.minimax_m2.modeling_minimax_m2.MiniMaxM2SparseMoeBlock(cfg)
        weights = {"router.weight": (hf.gate.weight, same), "router.bias": (hf.e_score_correction_bias, same),
                   **swiglu_weights(hf.experts)}
        return hf, (lambda x, ids: hf(x)), hf.gate, {}, weights
    if family == "ernie4_5_moe":
        cfg = m.ernie4_5_moe.Ernie4_5_MoeConfig(hidden_size=D, moe_intermediate_size=F_, moe_num_experts=E, moe_k=K,
                                                moe_num_shared_experts=2)
        hf = m.ernie4_5_moe.modeling_ernie4_5_moe.Ernie4_5_MoeSparseMoeBlock(cfg)
        weights = {"router.weight": (hf.gate.weight, same),
                   "router.bias": (hf.gate.moe_statics.e_score_correction_bias, lambda t: t[0]),
                   **swiglu_weights(hf.experts), **mlp_weights(hf.shared_experts)}
        return hf, (lambda x, ids: hf(x)), hf.gate, {}, weights
    if family == "longcat_flash":
        cfg = m.longcat_flash.LongcatFlashConfig(hidden_size=D, expert_ffn_hidden_size=F_, n_routed_experts=E,
                                                 zero_expert_num=4, moe_topk=K, routed_scaling_factor=6.0)
        hf = m.longcat_flash.modeling_longcat_flash.LongcatFlashMoE(cfg)
        weights = {"router.weight": (hf.router.classifier.weight, same),
                   "router.bias": (hf.router.e_score_correction_bias, same), **swiglu_weights(hf.experts)}
        return hf, (lambda x, ids: hf(x)), hf.router, {}, weights
    cfg = m.qwen3_next.Qwen3NextConfig(hidden_size=D, moe_intermediate_size=F_, shared_expert_intermediate_size=F_,
                                       num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)
    hf = m.qwen3_next.modeling_qwen3_next.Qwen3NextSparseMoeBlock(cfg)
    weights = {"router.weight": (hf.gate.weight, same), **swiglu_weights(hf.experts),
               **mlp_weights(hf.shared_expert, "shared.expert"),                 # families.GatedShared's keys
               "shared.gate.weight": (hf.shared_expert_gate.weight, same)}
    return hf, (lambda x, ids: hf(x)), hf.gate, {}, weights


def ours(family, dispatch, extra, layer=0):
    """Our MoE block from the family's config file (its routing settings), at the test's size: layer `layer`'s
    feed-forward block as families.build builds the model."""
    settings = read_config_file(os.path.join(REPO, "config", "families", f"{family}.py"))
    settings = {k: v for k, v in settings.items() if k not in ("n_experts", "top_k", "first_dense_layers")}
    cfg = FamilyConfig(n_layer=2, n_head=2, n_embd=D, block_size=16, vocab_size=V, n_experts=E, top_k=K,
                       expert_hidden=F_, dispatch=dispatch, **{**settings, **extra})
    return families.build(cfg).blocks[layer].mlp


def fill(module, seed, std=0.2):
    """Every parameter and float buffer (a correction bias) ~ N(0, std^2): blocks built alone are not
    initialised; an integer buffer (DeepSeek-V4's hash table) gets k distinct random experts per token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted([*module.named_parameters(), *module.named_buffers()], key=lambda kv: kv[0]):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * std)
            else:
                t.copy_(torch.stack([torch.randperm(E, generator=g)[:t.shape[1]] for _ in range(t.shape[0])]))


@pytest.mark.parametrize("dispatch", ["naive", "sorted"])
@pytest.mark.parametrize("family", FAMILIES + ["deepseek_v4 hash layer"])
def test_family_block_equals_transformers(family, dispatch):
    tf = require("transformers", "the atlas compares every family with its transformers block")
    family, layer = (family.split()[0], 0) if family.endswith("hash layer") else (
        family, 1 if family == "deepseek_v4" else 0)
    torch.manual_seed(0)
    hf, call, router, extra, weights = build(family, tf, layer)
    fill(hf, seed=layer)
    moe = ours(family, dispatch, extra, layer)
    state = moe.state_dict()
    assert set(state) == set(weights), set(state) ^ set(weights)   # every tensor of ours comes from theirs
    with torch.no_grad():
        for name, (t, to_ours) in weights.items():
            state[name].copy_(to_ours(t))
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    picked = []
    hook = router.register_forward_hook(lambda mod, inp, out: picked.append(out))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = call(xa, ids)
    hook.remove()
    yb, r = moe(xb, ids)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(9))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    out = picked[0]  # llama4's router gives (scores, logits); the others (logits, weights, indices)
    idx = out[1].topk(r.idx.shape[1], dim=-1).indices if len(out) == 2 else out[2]
    assert torch.equal(idx.sort(-1).values, r.idx.sort(-1).values), family       # the same experts
    assert rel(yb, ya) <= 1e-5, (family, rel(yb, ya))                              # the same output
    assert rel(xb.grad, xa.grad) <= 1e-5, (family, rel(xb.grad, xa.grad))          # the same input gradient
    for name, p in moe.named_parameters():                                         # every parameter's gradient
        t, to_ours = weights[name]
        assert rel(p.grad, to_ours(t.grad)) <= 1e-5, (family, name, rel(p.grad, to_ours(t.grad)))
    if family == "longcat_flash":
        assert (r.idx >= E).any() and (r.idx < E).any()   # zero-compute experts chosen, and real ones
    if family in ("glm4_moe", "minimax_m2", "ernie4_5_moe", "longcat_flash") or (family, layer) == ("deepseek_v4", 1):
        plain = r.logits.topk(r.idx.shape[1], dim=-1).indices.sort(-1).values     # without the correction bias
        assert not torch.equal(plain, r.idx.sort(-1).values), family               # ... some choices differ


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_setting_trains(tmp_path, family):
    """python train.py config/families/<family>.py, a few steps at the tiny size: every setting of the atlas runs."""
    from support.rundir import read_log
    from tests.helpers import TINY, train
    train(tmp_path, os.path.join("config", "families", f"{family}.py"), *TINY, "--n_layer=3", "--max_iters=3",
          "--eval_interval=3", "--vocab_size=65")
    final = [r for r in read_log(tmp_path / "log.jsonl") if r.get("final")][0]
    assert final["val_loss"] < 10 and len(final["layers"]) >= 2


def test_a_model_mixing_dense_hash_and_topk_layers_trains(tmp_path):
    """Per-layer routing: layer 0 dense (GLM-4.5's first_k_dense_replace), layer 1 a hash layer
    (DeepSeek-V4's), layer 2 top-k; the hash layer's experts are its table's, whatever the weights."""
    from model import MLP
    from tests.helpers import TINY, cli, train
    args = ["--router=sigmoid", "--first_dense_layers=1", "--hash_layers=2", "--n_layer=3", "--vocab_size=65"]
    train(tmp_path, *TINY, *args, "--max_iters=4", "--eval_interval=2")
    from support.rundir import load_checkpoint
    ckpt = load_checkpoint(str(tmp_path))
    model = families.from_checkpoint(ckpt["model_args"])[1]
    model.load_state_dict(ckpt["model"])
    assert isinstance(model.blocks[0].mlp, MLP) and isinstance(model.blocks[1].mlp, MoE)
    hashed, learned = model.blocks[1].mlp.router, model.blocks[2].mlp.router
    assert hashed.table is not None and getattr(learned, "table", None) is None  # (families.HashLayer's)
    ids = torch.randint(0, 65, (2, 16))
    _, _, routes = model(ids, ids)
    assert len(routes) == 2 and torch.equal(routes[0].idx, hashed.table[ids.reshape(-1)])
    assert torch.allclose(routes[0].gates.sum(-1), torch.ones(32))        # the learned scores, renormalised
    code, out, err = cli("train", *TINY, "--router=softmax", "--hash_layers=1", f"--out_dir={tmp_path / 'x'}")
    assert code == 1 and "hash_layers applies to router=sigmoid" in err


def test_zero_compute_experts_keep_the_shared_experts():
    """LongCat's zero-compute experts beside shared experts: the shared output still adds (it once did not)."""
    torch.manual_seed(0)
    cfg = FamilyConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8, n_experts=4, top_k=2,
                       zero_experts=2, n_shared=1)
    moe, x = families.build(cfg).blocks[0].mlp, torch.randn(1, 8, 16)
    y, r = moe(x)
    assert (r.idx >= 4).any() and (r.idx < 4).any()                 # both kinds of pair are exercised
    shared = moe.shared(x.view(8, 16))[0].view(1, 8, 16)
    moe.shared = None
    assert torch.allclose(y - moe(x)[0], shared, atol=1e-6)
