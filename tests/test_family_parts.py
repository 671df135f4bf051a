"""
The parts of the other MoE families and of the Hugging Face backbones (families.py: grouped-query
attention, q/k norms, q/k/v biases, untied embeddings, the gated shared expert), on models that
families.build makes from a FamilyConfig, checked as test_all.py checks the core: against an
independent reference, here the model itself and the slow path. FamilyConfig.param_count() against the
parameters of the built model; generation with the KV cache against generation that recomputes the
whole context every step. Each family's MoE block against transformers' own: tests/test_families.py.
"""

import pytest
import torch

from tests.helpers import ROUTERS  # first: it sets TRITON_INTERPRET before router.py imports triton
from families import ROUTERS as ROUTER_CLASSES, FamilyConfig, FamilyGPT, build  # noqa: E402
from model import GPT  # noqa: E402
from test_all import check_cached_generation  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


@pytest.mark.parametrize("router", ROUTERS)
def test_family_param_count_from_the_config_equals_the_model(router):
    """GQA, an untied output layer, q/k norms, q/k/v biases and Qwen's gated shared expert at once: the count
    of FamilyConfig.param_count against one written out by hand, and against the built model's."""
    kw = dict(n_experts=4, n_kv_head=1, tie_embeddings=False, qk_norm=True, qkv_bias=True, n_shared=1, shared_gate=True)
    cfg = FamilyConfig(**TINY, router=router, **kw)
    model = build(cfg)
    assert isinstance(model, FamilyGPT), kw              # the families' parts, not the core GPT
    d, E, f, V = cfg.n_embd, cfg.n_experts, cfg.expert_hidden, cfg.vocab_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim           # widths of q and of k (and v)
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv) + (q + kv)                 # projections, biases, q/k norms
    r = ROUTER_CLASSES[router](cfg)
    moe = E * (2 * r.read_width + d) * f + 3 * d * f + d + sum(p.numel() for p in r.parameters())  # + shared, gate
    by_hand = 2 * V * d + cfg.n_layer * (attn + 2 * d + moe) + d              # embedding and untied output layer
    assert cfg.param_count() == by_hand == model.num_params()[0], kw


def test_a_head_width_set_apart_builds_the_families_attention_only_where_it_differs():
    """head_dim equal to the core's n_embd / n_head is the core's attention; one that only rounds to it (n_embd not
    divisible by n_head) is not, and runs in the families' attention."""
    plain = build(FamilyConfig(**TINY, head_dim=16))                 # 32 / 2: the core's own width
    assert type(plain) is GPT
    odd = FamilyConfig(**{**TINY, "n_embd": 34, "n_head": 4}, head_dim=8, n_experts=0)  # 34 // 4 = 8, 34 / 4 = 8.5
    model = build(odd)
    assert isinstance(model, FamilyGPT) and odd.changed == ["head_dim"]
    logits, _, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 1, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_cached_generation_with_grouped_query_attention_gives_the_same_tokens(router):
    """One key/value head for the two query heads: the cache holds that one head."""
    torch.manual_seed(0)
    model = build(FamilyConfig(**TINY, n_experts=4, top_k=2, router=router, n_kv_head=1)).eval()
    assert isinstance(model, FamilyGPT)
    check_cached_generation(model, kv_heads=1)
