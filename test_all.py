"""
The fast invariants of the core: what the code computes, forward and backward, each checked against
an independent reference: a brute-force loop, a formula or a known value, the naive path (the dispatch
loop, route_reference, the functions of the full probabilities) against the fast one. In the order of
the reading path (README.md): train.py, model.py, router.py, losses.py, kernels.py. The other families'
and Hugging Face backbones' options (families.py) are in tests/test_family_parts.py, the support/
modules' in tests/test_support.py; the slow system tests (runs end to end, crashes, interop,
parallelism, the course kit) are in tests/. Run both: python -m pytest test_all.py tests -n 2

  train.py     the step's loss: regularisers at coefficient 0 change nothing; upcycled experts
  model.py     the KV cache, the dense MLP, naive == sorted dispatch (edge cases, a capacity), the
               parameter count, the dense model
  router.py    select_topk's tie rule and route_reference's gates, the invariants of every router
               (docs/design.md §1), expert choice (and its non-causality), DeepSeek-V3's raw gates,
               bias and group-limited top-k, ERMoE's geometry
  losses.py    brute force, known values and other papers' normalisations; R_sp and R_cp (Hu et al.
               2026); aux_losses from the Routing statistics == the losses of the full probabilities
  kernels.py   Triton and torch.compile == the PyTorch reference, forward and backward, edge rows,
               opcheck (Triton runs in its CPU interpreter without a GPU)
"""

import itertools
import math
import os
import types

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels in the interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one thread per worker, or the workers'
    torch.set_num_threads(1)                # thread pools spin-wait on each other

from losses import (SpecializationLoss, aux_losses, coupling_loss, load_balancing_loss,  # noqa: E402
                    specialization_loss, z_loss)
from model import GPT, MLP, GPTConfig, MoE  # noqa: E402
from router import EigenRouter, eigen_route, eigenbasis_scores, route_reference, select_topk, topk_route  # noqa: E402
from support.metrics import RoutingStats  # noqa: E402
import train  # noqa: E402
from families import ROUTERS as ROUTER_CLASSES  # noqa: E402  (the core's registry and the course's token table)

# The conformance list: every router here passes every test parametrised by ROUTERS.
# (token_table is families.py's: it joins router.ROUTERS when families.py is imported)
ROUTERS = ["softmax", "ermoe", "sigmoid", "hash", "cosine", "token_table"]
KERNEL_ROUTERS = [name for name in ROUTERS if ROUTER_CLASSES[name].topk_of_logits]  # the fused Triton pass applies


def moe_block(router="softmax", dispatch="sorted", seed=0, impl="auto", **kw):
    """A small MoE block whose router routes with `impl` (router.IMPLS); its bias update (select_bias) has run
    a few times on random loads, so e.g. the sigmoid router's bias is non-zero and its selection is not the
    top-k of its probabilities."""
    torch.manual_seed(seed)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                router=router, dispatch=dispatch, bias_update_rate=0.1)
    args.update(kw)
    moe = MoE(GPTConfig(**args))
    moe.router.impl = impl
    for _ in range(3):
        moe.router.update(torch.randint(0, 50, (args["n_experts"],)))
    return moe


def block_inputs(B=2, S=16, seed=0, d=32):
    """x (B, S, d) and token ids (B, S) for a block."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, d, generator=g), torch.randint(0, 64, (B, S), generator=g)


# ------------------------------------------------------------------------------------------------
# train.py: the step's loss, upcycling (the run itself: tests/test_runs.py)

def test_zero_regulariser_coefficients_train_bit_identically():
    """train_step's loss, aux_losses with every coefficient, trains as the loss without the regularisers:
    a term whose coefficient is 0 is only logged."""
    results = []
    for use_aux_losses in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(5):
            idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
            _, ce, routes = model(idx, idx)
            if use_aux_losses:
                aux, _ = aux_losses(routes, dict(c_lb=0.01, c_z=1e-3, c_sp=0.0, c_cp=0.0))
            else:  # the foundation's loss, written out: L_lb = E sum_e (count_e / (T k)) (psum_e / T), L_z
                aux = 0.01 * sum(4 * ((r.counts.float() / (32 * 2)) * (r.psum.float() / 32)).sum() for r in routes) + \
                    1e-3 * sum(r.lse.pow(2).mean() for r in routes)
            (ce + aux).backward()
            opt.step()
            opt.zero_grad()
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_upcycled_experts_start_as_near_copies():
    """train.make_model: expert_init=upcycle starts every expert as a near copy of one; 'auto' is decided once."""
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2)
    models = []
    for expert_init in ("upcycle", "random"):
        torch.manual_seed(0)
        run = types.SimpleNamespace(expert_init=expert_init, router_impl="auto")
        models.append(train.make_model(run, GPTConfig(**cfg)))
    up, rand = models
    assert all(r.impl == "torch" for m in models for r in m.routers())  # 'auto' on a CPU: PyTorch
    for a, b in ((up, 0.01), (rand, 0.9)):
        w = a.blocks[0].mlp.w_up
        rel = (w - w[:1]).norm(dim=(1, 2))[1:] / w[0].norm()
        assert (rel < 2 * b).all() and (rel > b / 2).all(), rel  # ~1% apart upcycled, ~100% apart at random
    _, r = up.blocks[0].mlp(torch.randn(1, 16, 32))
    from support.metrics import coactivation_cos2
    assert coactivation_cos2(r.acts) > 0.99      # co-activated experts compute nearly the same thing


# ------------------------------------------------------------------------------------------------
# model.py: the KV cache of the attention, the dense MLP, the MoE block and its two dispatch paths
# (naive == sorted), GPTConfig's parameter count, the GPT

@pytest.mark.parametrize("router", ROUTERS)
def test_cached_generation_gives_the_same_tokens(router):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                          router=router)).eval()
    check_cached_generation(model, kv_heads=2)


def check_cached_generation(model, kv_heads):
    """Greedy generation with the KV cache == without it (also past block_size), and one cached step's logits
    == the whole sequence recomputed; the cache holds kv_heads heads (tests/test_family_parts.py: GQA)."""
    prompt = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    fast = model.generate(prompt, 20, temperature=0, use_cache=True)   # past block_size: the cache gives way
    slow = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert fast.shape == (3, 25) and torch.equal(fast, slow)
    cache = [{} for _ in model.blocks]                                   # the cache holds what it computed
    with torch.no_grad():
        model(prompt, cache=cache)
        last, _, _ = model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        full, _, _ = model(torch.cat([prompt, torch.zeros(3, 1, dtype=torch.long)], 1))
    assert cache[0]["k"].shape == (3, kv_heads, 6, 16) and torch.allclose(last, full, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["naive", "sorted"])
def test_single_expert_equals_dense_mlp(dispatch):
    moe = moe_block(dispatch=dispatch, n_experts=1, top_k=1)
    f = moe.w_up.shape[2]
    dense = MLP(32, f)
    with torch.no_grad():
        dense.c_gate.weight.copy_(moe.w_gate[0].T)
        dense.c_up.weight.copy_(moe.w_up[0].T)
        dense.c_proj.weight.copy_(moe.w_down[0].T)
    x = torch.randn(2, 16, 32)
    assert torch.allclose(moe(x)[0], dense(x)[0], atol=1e-6)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_experts=1, top_k=1)
    assert cfg.expert_hidden == GPTConfig(n_layer=2, n_head=2, n_embd=32, n_experts=0).ffn_hidden


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("shared,f", [(0, 0), (1, 0), (0, 16)])
def test_sorted_dispatch_equals_naive_loop(router, shared, f):
    """f=16 < d=32: narrow experts, where the fast path fuses gate and up and gates before W_down."""
    naive = moe_block(router, "naive", n_experts=5, top_k=2, n_shared=shared, expert_hidden=f)
    fast = moe_block(router, "sorted", n_experts=5, top_k=2, n_shared=shared, expert_hidden=f)
    fast.load_state_dict(naive.state_dict())
    x, ids = block_inputs(3)
    g = torch.randn(3, 16, 32)
    results = []
    for moe in (naive, fast):
        xi = x.clone().requires_grad_(True)
        y, r = moe(xi, ids)
        loss = (y * g).sum() + specialization_loss(r.acts) + load_balancing_loss(r.probs, r.idx)
        loss.backward()
        results.append((y, r, xi.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y1, r1, gx1, gp1), (y2, r2, gx2, gp2) = results
    assert torch.equal(r1.idx, r2.idx) and torch.equal(r1.counts, r2.counts)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(r1.acts, r2.acts, atol=1e-6)
    assert torch.allclose(gx1, gx2, atol=1e-6)
    assert any("router" in n for n in gp1) == any(True for _ in naive.router.parameters())
    for name in gp1:
        assert gp1[name] is not None and gp1[name].abs().sum() > 0, name
        assert torch.allclose(gp1[name], gp2[name], atol=1e-6), name


def run_and_grads(moe, x, ids):
    xi = x.clone().requires_grad_(True)
    y, r = moe(xi, ids)
    g = torch.Generator().manual_seed(7)
    ((y.float() * torch.randn(y.shape, generator=g)).sum() + specialization_loss(r.acts)).backward()
    return y, r, xi.grad, [p.grad for p in moe.parameters()]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("case", ["empty_experts", "one_expert_takes_all", "bf16", "capacity"])
def test_sorted_dispatch_edge_cases(router, case):
    kw = dict(n_experts=8, top_k=1) if case in ("empty_experts", "one_expert_takes_all") else dict(n_experts=4, top_k=2)
    if case == "capacity":
        kw["capacity_factor"] = 0.75  # ceil(0.75 * 16 * 2 / 4) = 6 pairs per expert
    naive, fast = moe_block(router, "naive", **kw), moe_block(router, "sorted", **kw)
    fast.load_state_dict(naive.state_dict())
    x, ids = block_inputs(1)
    if case == "empty_experts":
        x, ids = x[:, :3], ids[:, :3]      # 3 tokens, 8 experts: at least 5 experts get nothing
    if case == "one_expert_takes_all":     # one token repeated: every copy picks the same expert
        x, ids = x[:, :1].expand(1, 16, 32), ids[:, :1].expand(1, 16)
    if case == "bf16":
        naive, fast, x = naive.to(torch.bfloat16), fast.to(torch.bfloat16), x.to(torch.bfloat16)
    (y1, r1, gx1, gp1), (y2, r2, gx2, gp2) = run_and_grads(naive, x, ids), run_and_grads(fast, x, ids)
    counts = r1.counts.tolist()
    if case == "empty_experts":
        assert counts.count(0) >= 5
    if case == "one_expert_takes_all":
        assert sorted(counts) == [0] * 7 + [16]
    if case == "capacity":  # the same pairs dropped on both paths: the first 6 of each expert, token order
        cap = math.ceil(0.75 * 16 * 2 / 4)
        assert max(counts) > cap and torch.equal(r1.kept, r2.kept) and r1.kept.sum() == sum(min(c, cap) for c in counts)
        for e in range(4):
            order = r1.kept[r1.idx == e]                   # row-major = token order
            assert order.tolist() == [True] * min(counts[e], cap) + [False] * max(counts[e] - cap, 0)
    assert torch.equal(r1.idx, r2.idx)
    tol = dict(rtol=1e-5, atol=1e-6) if case != "bf16" else dict(rtol=3e-2, atol=3e-2)
    assert torch.allclose(y1.float(), y2.float(), **tol) and torch.allclose(gx1.float(), gx2.float(), **tol)
    for a, b in zip(gp1, gp2):
        assert (a is None and b is None) or torch.allclose(a.float(), b.float(), **tol)


def test_dropped_pairs_pass_through_the_residual_only():
    moe = moe_block(n_experts=4, top_k=1, capacity_factor=0.5, n_layer=1)  # capacity 4 of 32 tokens
    full = moe_block(n_experts=4, top_k=1)
    full.load_state_dict(moe.state_dict())
    x, ids = block_inputs(2)
    (y, r), (y_full, _) = moe(x, ids), full(x, ids)
    kept = r.kept[:, 0].view(2, 16)
    assert int(r.kept.sum()) <= 4 * 4 and not kept.all()
    assert (y[~kept] == 0).all() and torch.allclose(y[kept], y_full[kept])  # dropped: zero MoE output
    stats = RoutingStats()
    stats.update([r])
    assert math.isclose(stats.summary()[0]["dropped"], 1 - int(r.kept.sum()) / 32, rel_tol=1e-6)
    with torch.no_grad():  # collapse: a zero router sends every token to expert 0 -> 1 - c/E dropped
        moe.router.weight.zero_()
    stats = RoutingStats()
    stats.update([moe(x, ids)[1]])
    assert math.isclose(stats.summary()[0]["dropped"], 1 - 0.5 / 4, rel_tol=1e-9)


def expert_choice_block(dispatch="sorted", seed=0, **kw):
    return moe_block("expert_choice", dispatch, seed, **{"n_experts": 4, "top_k": 2, **kw})


@pytest.mark.parametrize("shared", [0, 1])
def test_expert_choice_sorted_dispatch_equals_naive_loop(shared):
    naive, fast = expert_choice_block("naive", n_shared=shared), expert_choice_block("sorted", n_shared=shared)
    fast.load_state_dict(naive.state_dict())
    x, ids = block_inputs(3)
    (y1, r1, gx1, gp1), (y2, r2, gx2, gp2) = run_and_grads(naive, x, ids), run_and_grads(fast, x, ids)
    assert torch.equal(r1.idx, r2.idx) and torch.equal(r1.kept, r2.kept)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(gx1, gx2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gp1, gp2))
    assert naive.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ROUTERS)
def test_param_count_from_the_config_equals_the_model(router):
    """GPTConfig.param_count (the model built on the meta device) against the count written out by hand: the
    embedding, per layer attention (4 d^2), two norms and the dense MLP or the experts, shared experts and the
    router (which is small: built to count it), the final norm; and against the real model's num_params."""
    for kw in (dict(n_experts=0), dict(n_experts=4, top_k=2), dict(n_experts=6, top_k=1, n_shared=2),
               dict(n_experts=4, ermoe_basis="partitioned"), dict(n_experts=4, ermoe_basis="penalty", ermoe_rank=3),
               dict(n_experts=0, pos_emb="learned", mlp="gelu", norm="layernorm")):
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, router=router, **kw)
        d, E, f = cfg.n_embd, cfg.n_experts, cfg.expert_hidden
        if E:
            r = ROUTER_CLASSES[router](cfg)
            ffn = E * (2 * r.read_width + d) * f + 3 * d * cfg.n_shared * f + sum(p.numel() for p in r.parameters())
        else:
            ffn = (2 if cfg.mlp == "gelu" else 3) * d * cfg.ffn_hidden
        pos = cfg.block_size * d if cfg.pos_emb == "learned" else 0
        by_hand = cfg.vocab_size * d + pos + cfg.n_layer * (4 * d * d + 2 * d + ffn) + d
        assert cfg.param_count() == by_hand == GPT(cfg).num_params()[0], kw


def test_dense_model_has_no_routing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=0))
    idx = torch.randint(0, 64, (2, 16))
    _, loss, routes = model(idx, idx)
    assert routes == [] and all(isinstance(b.mlp, MLP) for b in model.blocks)
    total, active = model.num_params()
    assert total == active
    assert aux_losses(routes, dict(c_lb=0.01))[1] == {}


# ------------------------------------------------------------------------------------------------
# router.py: the routing pass and its tie rule, the invariants of every router, expert choice,
# DeepSeek-V3's sigmoid router (raw gates, the balancing bias, group-limited top-k), ERMoE

def brute_topk(row, k):
    """k largest, ties to the lower index: sort by (-value, index)."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def test_select_topk_ties_and_gates():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 5.0, 5.0, 2.0]])
    for k in range(1, 6):
        idx = select_topk(logits, k)
        gates = route_reference(logits, k, idx=idx).gates
        for t in range(logits.shape[0]):
            assert idx[t].tolist() == brute_topk(logits[t].tolist(), k)
        want = torch.softmax(logits.gather(1, idx), dim=-1)
        assert torch.allclose(gates, want)
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (200, 7)).float()  # many exact ties
    idx = select_topk(logits, 3)
    gates = route_reference(logits, 3, renormalize=False, idx=idx).gates
    assert all(idx[t].tolist() == brute_topk(logits[t].tolist(), 3) for t in range(200))
    assert torch.allclose(gates, torch.softmax(logits, -1).gather(1, idx))


@pytest.mark.parametrize("router", ROUTERS)
def test_routing_invariants(router):
    moe = moe_block(router, n_experts=6, top_k=3, n_shared=1)
    x, ids = block_inputs()
    y, r = moe(x, ids)
    T, k, E = 32, 3, 6
    assert r.idx.shape == (T, k) and r.idx.min() >= 0 and r.idx.max() < E
    assert all(len(set(row)) == k for row in r.idx.tolist())
    assert (r.gates >= 0).all() and torch.allclose(r.gates.sum(-1), torch.ones(T))
    assert int(r.counts.sum()) == T * k
    assert r.counts.tolist() == [int((r.idx == e).sum()) for e in range(E)]
    p = r.probs
    assert torch.allclose(p.sum(-1), torch.ones(T)) and torch.allclose(r.gates, p.gather(1, r.idx) /
                                                                       p.gather(1, r.idx).sum(-1, keepdim=True))
    # permuting the tokens permutes the outputs and the routing
    perm = torch.randperm(T)
    y2, r2 = moe(x.view(T, 1, 32)[perm].view(2, 16, 32), ids.view(T)[perm].view(2, 16))
    assert torch.allclose(y2.view(T, 32), y.view(T, 32)[perm], atol=1e-6)
    assert torch.equal(r2.idx, r.idx[perm])


def test_zero_router_ties_go_to_lower_experts():
    moe = moe_block(n_experts=5, top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, r = moe(torch.randn(1, 16, 32))
    assert r.counts.tolist() == [16, 16, 0, 0, 0]
    assert torch.allclose(r.gates, torch.full((16, 2), 0.5))


def test_route_reference_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for renorm in (True, False):
        def fn(a):
            r = route_reference(a, 2, renorm)
            return r.gates, r.lse, r.mass, r.psum
        assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("router", [r for r in ROUTERS + ["expert_choice"] if r != "hash"])
def test_every_router_gets_a_gradient_from_the_loss_at_top_k_1(router):
    """At k=1 a renormalised gate is exactly 1, and a router whose only way into the loss is its gate
    would learn nothing: the gate is the router's score instead (Switch Transformer), by default."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=1, router=router)
    assert cfg.gate_renorm  # the default
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    _, loss, routes = model(idx, idx)  # the language-model loss alone, no auxiliary loss
    loss.backward()
    assert all(float(r.gates.max()) < 1 for r in routes), router  # not the constant 1
    for name, p in model.named_parameters():
        if ".router." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, (router, name)
    if router == "softmax":  # Switch's gate: p of the chosen expert
        assert torch.allclose(routes[0].gates, routes[0].probs.gather(1, routes[0].idx))


@pytest.mark.parametrize("router,capacity_factor", [(r, 0.0) for r in ROUTERS + ["expert_choice"]] +
                         [("softmax", 1.0), ("sigmoid", 1.0)])
def test_only_expert_choice_and_a_capacity_let_later_tokens_change_earlier_outputs(router, capacity_factor):
    """A decoder must not see the future. Token choice routes every token by itself; an expert that
    chooses compares all the tokens of the batch, so a later token can take an earlier one's place;
    with a capacity, a later token of one sequence can take the place of an earlier position of the next."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                          router=router, capacity_factor=capacity_factor)).eval()
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 12:] = (idx[:, 12:] + 7) % 64                   # the last 4 positions of every sequence
    with torch.no_grad():
        a, b = model(idx, idx)[0], model(changed, changed)[0]
    same_past = torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert same_past == (router != "expert_choice" and capacity_factor == 0), (router, (a - b)[:, :12].abs().max())


def test_sigmoid_gates_raw_or_renormalised_and_the_routed_scale():
    x, ids = block_inputs()
    outs = {}
    for renorm, scale in ((True, 1.0), (False, 1.0), (False, 2.5)):
        moe = moe_block("sigmoid", n_experts=6, top_k=2, gate_renorm=renorm, routed_scale=scale)
        y, r = moe(x, ids)
        s = torch.sigmoid(torch.nn.functional.linear(x.view(-1, 32), moe.router.weight)).gather(1, r.idx)
        assert torch.allclose(r.gates, scale * (s / s.sum(-1, keepdim=True) if renorm else s), atol=1e-6)
        outs[renorm, scale] = y
    assert torch.allclose(outs[False, 2.5], 2.5 * outs[False, 1.0], atol=1e-6)  # no shared expert: y scales


def test_sigmoid_bias_selects_without_touching_gates_and_the_losses_follow_the_selection():
    moe = moe_block("sigmoid", n_experts=6, top_k=2)
    x, ids = block_inputs()
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.6]))  # expert 5 favoured
    _, r = moe(x, ids)
    p = r.probs
    topk_of_p = p.topk(2).indices
    assert (r.idx == 5).any(dim=1).all()                          # the bias decided the selection ...
    assert not torch.equal(r.idx.sort(1).values, topk_of_p.sort(1).values)
    s = torch.sigmoid(torch.nn.functional.linear(x.view(-1, 32), moe.router.weight))  # ... not the gates:
    assert torch.allclose(r.gates, s.gather(1, r.idx) / s.gather(1, r.idx).sum(1, keepdim=True), atol=1e-6)
    _, terms = aux_losses([r, r])
    assert torch.isclose(terms["cp"], coupling_loss([p, p], idx_list=[r.idx, r.idx]), atol=1e-6)
    assert not torch.isclose(terms["cp"], coupling_loss([p, p], 2), atol=1e-4)  # top-k of p is not the selection
    before = moe.router.bias.clone()
    moe.router.update(torch.tensor([10, 10, 10, 10, 10, 70]))  # expert 5 overloaded: its bias goes down
    step = moe.router.bias - before
    assert torch.allclose(step, torch.tensor([0.1] * 5 + [-0.1]))


def test_group_limited_selection_brute_force():
    cfg = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_experts=8, top_k=2, router="sigmoid",
               n_group=4, topk_group=2)
    router = ROUTER_CLASSES["sigmoid"](GPTConfig(**cfg))
    torch.manual_seed(0)
    s = torch.rand(50, 8)
    router.bias.copy_(torch.randn(8) * 0.1)
    idx = router.select(s.log(), None)  # the router's logits are log s
    for t in range(50):
        choice = (s[t] + router.bias).tolist()
        groups = [sorted(choice[2 * g:2 * g + 2], reverse=True) for g in range(4)]
        best = sorted(range(4), key=lambda g: (-sum(groups[g][:2]), g))[:2]
        allowed = [e for e in range(8) if e // 2 in best]
        assert idx[t].tolist() == sorted(allowed, key=lambda e: (-choice[e], e))[:2]
    for bad, message in ((dict(n_group=3), "must divide n_experts"), (dict(topk_group=5), "topk_group <= n_group"),
                         (dict(n_group=4, topk_group=1, top_k=3), "hold fewer than top_k=3"),
                         (dict(router="softmax"), "n_group applies to router=sigmoid")):
        with pytest.raises(ValueError, match=message):
            GPTConfig(**{**cfg, **bad})


def test_expert_choice_takes_c_tokens_per_expert_with_gates_p():
    moe = expert_choice_block()
    x, ids = block_inputs()
    _, r = moe(x, ids)
    T, E, c = 32, 4, math.ceil(32 * 2 / 4)
    p = r.probs
    assert r.idx.shape == (T, E) and all(sorted(row) == list(range(E)) for row in r.idx.tolist())
    assert r.counts.tolist() == [c] * E and int(r.kept.sum()) == E * c
    for e in range(E):  # brute force: expert e keeps its c tokens of largest p, ties to the lower token
        want = sorted(range(T), key=lambda t: (-p[t, e].item(), t))[:c]
        assert sorted(t for t in range(T) for j in range(E) if r.idx[t, j] == e and r.kept[t, j]) == sorted(want)
    assert torch.allclose(r.gates, p.gather(1, r.idx) * r.kept)       # gates: p at the chosen experts
    assert torch.allclose(r.mass, (p.gather(1, r.idx) * r.kept).sum(-1))
    per_token = r.kept.sum(1)
    assert per_token.min() >= 0 and per_token.max() <= E and per_token.float().mean() == 2.0  # k on average


def test_every_router_of_the_registry_is_tested():
    assert set(ROUTER_CLASSES) == set(ROUTERS) | {"expert_choice"}


def test_eigenbasis_scores_brute_force_and_gradcheck():
    from router import orthonormal
    torch.manual_seed(0)
    x, P = torch.randn(6, 12, dtype=torch.float64), orthonormal(torch.randn(3, 12, 4, dtype=torch.float64))
    s = eigenbasis_scores(x, P)
    for t, e in itertools.product(range(6), range(3)):
        coords = [sum(P[e, i, j].item() * x[t, i].item() for i in range(12)) for j in range(4)]
        brute = math.sqrt(sum(c * c for c in coords)) / math.sqrt(sum(v * v for v in x[t].tolist()))
        assert math.isclose(s[t, e].item(), brute, rel_tol=1e-9)
    assert (s >= 0).all() and (s <= 1 + 1e-12).all()
    assert torch.allclose(eigenbasis_scores(3.7 * x, P), s) and torch.allclose(eigenbasis_scores(-x, P), s)
    assert torch.autograd.gradcheck(eigenbasis_scores, (x.requires_grad_(), P.requires_grad_()))


def ermoe_router(basis, d=32, E=4, r=8, read="coords"):
    router = EigenRouter(GPTConfig(n_layer=1, n_head=2, n_embd=d, n_experts=E, router="ermoe", ermoe_rank=r,
                                   ermoe_basis=basis, ermoe_input=read))
    router.impl = "torch"
    return router


def test_ermoe_router_logits_and_partitioned_identity():
    torch.manual_seed(0)
    x = torch.randn(20, 32)
    for basis in ("independent", "partitioned", "penalty"):
        router = ermoe_router(basis)
        r = router(x)
        P = router.bases()
        assert torch.allclose(r.expert_inputs, torch.einsum("td,edr->ter", x, P) * router.lam, atol=1e-6)
        assert torch.allclose(r.logits, router.beta() * eigenbasis_scores(x, P), atol=1e-5)
        assert router.penalty().item() < 1e-10 and math.isclose(router.beta().item(), 10.0, rel_tol=1e-6)
        assert (r.penalty is not None) == (basis == "penalty")
    router = ermoe_router("partitioned")
    s = eigenbasis_scores(x, router.bases())
    assert torch.allclose((s ** 2).sum(-1), torch.ones(20), atol=1e-5)  # disjoint subspaces tile R^d
    assert router.metrics()["overlap"] < 1e-10
    reads_token = ermoe_router("independent", read="token")             # the default: the experts read x itself
    assert reads_token(x).expert_inputs is None and reads_token.lam is None and reads_token.read_width == 32


@pytest.mark.parametrize("basis", ["independent", "partitioned"])
def test_ermoe_bases_stay_orthonormal_under_training(basis):
    moe = moe_block("ermoe", ermoe_basis=basis)
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    P0 = moe.router.bases().detach().clone()
    x, target = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    for _ in range(50):
        y, r = moe(x)
        loss = (y - target).pow(2).mean() + 0.1 * r.logits.std()  # pushes the bases around
        loss.backward()
        opt.step()
        opt.zero_grad()
    P = moe.router.bases().detach()
    assert (P - P0).abs().max() > 1e-2  # the bases did move
    assert moe.router.metrics()["ortho_err"] < 1e-5


# ------------------------------------------------------------------------------------------------
# losses.py: brute force, known values, other papers' normalisations; aux_losses' form from the
# Routing statistics against the functions of the full probabilities

def test_load_balancing_loss():
    T, E, k = 40, 4, 2
    uniform = torch.full((T, E), 1.0 / E)
    idx = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # every expert exactly T*k/E times
    assert torch.isclose(load_balancing_loss(uniform, idx), torch.tensor(1.0))
    onehot = torch.zeros(T, E)
    onehot[:, 2] = 1.0
    assert torch.isclose(load_balancing_loss(onehot, torch.full((T, 1), 2)), torch.tensor(float(E)))
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(T, E), -1)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    brute = E * sum((sum(int(e in idx[t].tolist()) for t in range(T)) / (T * k)) *
                    (sum(probs[t, e].item() for t in range(T)) / T) for e in range(E))
    assert math.isclose(load_balancing_loss(probs, idx).item(), brute, rel_tol=1e-5)


def hf_mixtral_balancing_loss(probs_per_layer, idx_per_layer, E):
    """Hugging Face Mixtral's formula, written out: all layers' tokens pooled, the fraction of tokens
    whose j-th choice is e (per slot j), times the mean probability, summed, times E."""
    probs, idx = torch.cat(probs_per_layer), torch.cat(idx_per_layer)
    slot_fraction = torch.nn.functional.one_hot(idx, E).float().mean(dim=0)     # (k, E)
    return E * (slot_fraction * probs.mean(dim=0)[None, :]).sum()


def test_load_balancing_reference_values_and_other_normalisations():
    T, E = 24, 6
    for k in (1, 2, 3):
        onehot = torch.zeros(T, E)
        onehot[:, 0] = 1.0
        idx = torch.stack([torch.arange(k)] * T)          # expert 0 first, then k-1 others
        assert torch.isclose(load_balancing_loss(onehot, idx), torch.tensor(E / k))  # collapse: E/k
    torch.manual_seed(0)
    k = 2
    layers = [(torch.softmax(3 * torch.randn(T, E), -1), torch.stack([torch.randperm(E)[:k] for _ in range(T)]))
              for _ in range(2)]
    ours = [load_balancing_loss(p, i) for p, i in layers]
    for (p, i), mine in zip(layers, ours):  # per layer, HF's value is k times ours
        assert torch.isclose(hf_mixtral_balancing_loss([p], [i], E), k * mine)
    pooled = load_balancing_loss(torch.cat([p for p, _ in layers]), torch.cat([i for _, i in layers]))
    assert torch.isclose(hf_mixtral_balancing_loss(*zip(*layers), E), k * pooled)   # pooled over layers
    assert not torch.isclose(pooled, sum(ours))           # ... which is not our sum over layers
    switch = E * sum((i[:, 0] == e).float().mean() * p[:, e].mean() for e in range(E) for p, i in layers[:1])
    assert torch.isclose(load_balancing_loss(layers[0][0], layers[0][1][:, :1]), switch)  # = Switch at k=1


def test_sequence_balance_loss_brute_force():
    """DeepSeek-V3 Eq. 17-20 by loops: per sequence, f_i = E/(k S) * #{t: i among the k largest s'_t},
    P_i = mean_t s'_ti; the mean over sequences of sum_i f_i P_i. 1 when every sequence is balanced."""
    from losses import sequence_balance_loss
    torch.manual_seed(0)
    B, S, E, k = 3, 5, 6, 2
    p = torch.softmax(torch.randn(B * S, E, dtype=torch.float64), -1).requires_grad_(True)
    total = 0.0
    for b in range(B):
        rows = p[b * S:(b + 1) * S]
        for i in range(E):
            hits = sum(1 for t in range(S) if i in brute_topk(rows[t].tolist(), k))
            total = total + E / (k * S) * hits * rows[:, i].mean()
    want = total / B
    got = sequence_balance_loss(p, k, S)
    assert torch.isclose(got.double(), want)
    g1, = torch.autograd.grad(got, p)
    g2, = torch.autograd.grad(want, p)
    assert torch.allclose(g1.double(), g2, atol=1e-6)
    uniform = torch.full((B * S, E), 1.0 / E)              # P_i = 1/E and sum_i f_i = E, whatever the top-k
    assert torch.isclose(sequence_balance_loss(uniform, k, S), torch.tensor(1.0))


def test_global_batch_balance_by_hand_over_micro_batches_and_processes():
    """Qiu et al. 2025: micro-batch m of a step uses f_e = (counts of micro-batches 1..m, of every process,
    averaged over m) / (T_global k) and its own P_e. The other process is simulated by a reduce that adds
    known counts; the loop below is the formula written out. aux_losses' L_lb from the Routing's counts and
    psum, pooled by StepBalance."""
    from losses import StepBalance
    torch.manual_seed(0)
    T, E, k, M = 8, 4, 2, 3
    other = [torch.tensor([4, 4, 4, 4], dtype=torch.float64), torch.tensor([16, 0, 0, 0], dtype=torch.float64),
             torch.tensor([0, 8, 8, 0], dtype=torch.float64)]           # the other process's counts per micro-batch
    step = {"m": 0}

    def reduce(t):
        t += other[step["m"]]
    pool = StepBalance(reduce, world=2)
    seen = torch.zeros(E, dtype=torch.float64)
    for m in range(M):
        step["m"] = m
        idx = torch.randint(0, E, (T, k))
        route = route_reference(torch.randn(T, E), k, idx=idx)          # counts (E,) and psum (E,) = sum_t p
        counts, psum = route.counts, route.psum
        got = aux_losses([route], dict(c_lb=1.0), all_terms=False, pool=pool)[1]["lb"]
        seen += counts.double() + other[m]
        f = seen / (m + 1) / (2 * T * k)                                 # the global tokens: 2 processes x T
        want = E * sum(f[e] * psum[e] / T for e in range(E))
        assert torch.isclose(got.double(), want.double()), m
    pool.reset()
    assert pool.seen == {}


def test_z_loss():
    E = 7
    assert torch.isclose(z_loss(torch.zeros(5, E)), torch.tensor(math.log(E) ** 2))
    torch.manual_seed(0)
    a = torch.randn(9, E)
    brute = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in a.tolist()) / 9
    assert math.isclose(z_loss(a).item(), brute, rel_tol=1e-5)


def brute_specialization(z):
    T, k, _ = z.shape
    total = 0.0
    for t in range(T):
        for i in range(k):
            for j in range(k):
                if i != j:
                    a, b = z[t, i], z[t, j]
                    total = total + (a * b).sum() ** 2 / ((a * a).sum() * (b * b).sum())
    return total / T


def brute_coupling(probs_list, k):
    T = probs_list[0].shape[0]
    total = 0.0
    for t in range(T):
        masses = [sum(sorted(p[t], reverse=True)[:k]) for p in probs_list]
        total = total + sum(masses[l] * masses[l + 1] for l in range(len(masses) - 1))
    return -total / T


def test_specialization_loss_brute_force_and_known_values():
    torch.manual_seed(0)
    z = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    fast, slow = specialization_loss(z), brute_specialization(z)
    g1, = torch.autograd.grad(fast, z)
    g2, = torch.autograd.grad(slow, z)
    assert torch.isclose(fast.double(), slow) and torch.allclose(g1.double(), g2, atol=1e-6)
    row = torch.randn(8)
    assert torch.isclose(specialization_loss(row.expand(4, 3, 8)), torch.tensor(6.0))  # k(k-1) pairs of 1
    assert specialization_loss(torch.eye(3).expand(4, 3, 3)).item() == 0.0           # orthogonal rows
    assert specialization_loss(torch.randn(4, 1, 8)).item() == 0.0                    # k = 1


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_specialization_gram_form_equals_the_reference_forward_and_backward(k):
    """The Gram-matrix form with its own backward (SpecializationLoss, what aux_losses trains with) against
    specialization_loss: random rows, a parallel pair, a zero row (the eps clamp) and a row below eps;
    fp64 and fp32."""
    torch.manual_seed(k)
    z = torch.randn(7, k, 5, dtype=torch.float64)
    if k > 1:
        z[0, 1] = 3 * z[0, 0]                             # parallel: cos^2 = 1
        z[1, 0] = 0.0                                     # zero row: norm clamped, cos^2 = 0
        z[2, 1] = 1e-10                                   # below eps
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        a = z.to(dtype).clone().requires_grad_(True)
        b = z.to(dtype).clone().requires_grad_(True)
        fast, ref = SpecializationLoss.apply(a, 1e-8), specialization_loss(b)
        assert torch.allclose(fast.double(), ref.double(), rtol=tol, atol=tol), (k, dtype)
        if k > 1:  # (at k = 1 both are the constant 0)
            (fast * 1.7).backward()
            (ref * 1.7).backward()
            assert torch.allclose(a.grad.double(), b.grad.double(), rtol=tol, atol=tol), (k, dtype)
    if k > 1:
        w = torch.randn(4, k, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: SpecializationLoss.apply(t, 1e-8), (w,))


def test_coupling_loss_brute_force_and_known_values():
    torch.manual_seed(0)
    probs = [torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1).requires_grad_() for _ in range(3)]
    fast, slow = coupling_loss(probs, 2), brute_coupling(probs, 2)
    g1, g2 = torch.autograd.grad(fast, probs), torch.autograd.grad(slow, probs)
    assert torch.isclose(fast.double(), slow) and all(torch.allclose(a.double(), b) for a, b in zip(g1, g2))
    L, T, E, k = 4, 10, 8, 2
    uniform = [torch.full((T, E), 1.0 / E)] * L
    assert torch.isclose(coupling_loss(uniform, k), torch.tensor(-(L - 1) * (k / E) ** 2))
    onehot = [torch.nn.functional.one_hot(torch.randint(0, E, (T,)), E).float() for _ in range(L)]
    assert torch.isclose(coupling_loss(onehot, k), torch.tensor(-(L - 1.0)))


@pytest.mark.parametrize("router", ROUTERS)
def test_regulariser_gradients_reach_the_right_parameters(router):
    a, b = moe_block(router, seed=0), moe_block(router, seed=1)
    (x0, ids), (x1, _) = block_inputs(1, seed=0), block_inputs(1, seed=1)
    xa, xb = x0.requires_grad_(True), x1.requires_grad_(True)
    (_, ra), (_, rb) = a(xa, ids), b(xb, ids)
    cp = coupling_loss([ra.probs, rb.probs], idx_list=[ra.idx, rb.idx])
    if any(True for _ in a.router.parameters()):    # R_cp reaches only the routers (and the inputs)
        cp.backward(retain_graph=True)
        for moe in (a, b):
            assert all(p.grad is None for n, p in moe.named_parameters() if not n.startswith("router"))
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.router.parameters())
        if router != "token_table":                  # (its logits are the token id's row: x is not read)
            assert xa.grad.abs().sum() > 0 and xb.grad.abs().sum() > 0
    else:                                            # a fixed router: R_cp is a constant
        assert not cp.requires_grad
    for p in [*a.parameters(), xa]:
        p.grad = None
    specialization_loss(ra.acts).backward()
    assert a.w_gate.grad.abs().sum() > 0 and a.w_up.grad.abs().sum() > 0 and xa.grad.abs().sum() > 0
    assert a.w_down.grad is None


def test_specialization_gradient_reaches_ermoe_bases_and_lambda():
    moe = moe_block("ermoe", ermoe_input="coords")  # experts that read their coordinates: R_sp reaches the bases
    _, r = moe(torch.randn(1, 16, 32))
    specialization_loss(r.acts).backward()
    assert moe.router.raw.grad.abs().sum() > 0 and moe.router.lam.grad.abs().sum() > 0
    assert moe.router.log_beta.grad is None or moe.router.log_beta.grad.abs().sum() == 0


@pytest.mark.parametrize("router", ROUTERS)
def test_aux_losses_from_fused_stats_equal_the_reference_losses(router):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                          router=router, ermoe_basis="penalty", bias_update_rate=0.1))
    for r in model.routers():  # the bias update moves a select_bias router's state (the sigmoid router's bias)
        r.update(torch.randint(0, 50, (4,)))
    idx = torch.randint(0, 64, (2, 16))
    _, _, routes = model(idx, idx)
    _, terms = aux_losses(routes)
    ref = {"lb": sum(load_balancing_loss(r.probs, r.idx) for r in routes),
           "z": sum(z_loss(r.logits) for r in routes),
           "sp": sum(specialization_loss(r.acts) for r in routes),
           "cp": coupling_loss([r.probs for r in routes], idx_list=[r.idx for r in routes])}
    for name, value in ref.items():
        assert torch.isclose(terms[name], value, rtol=1e-5, atol=1e-6), name
    assert ("ortho" in terms) == (router == "ermoe")


# ------------------------------------------------------------------------------------------------
# kernels.py: the fused routing pass (Triton, and torch.compile of route_reference) == the PyTorch
# reference, forward and backward, edge rows, opcheck (Triton runs in its CPU interpreter without a GPU)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def route_loss(route, T, E, k, extra=None):
    """A loss that sends a random gradient into every differentiable output of the routing."""
    g = torch.Generator().manual_seed(123)
    w = [torch.randn(*shape, generator=g).to(DEVICE) for shape in ((T, k), (T,), (T,), (E,))]
    loss = sum((out * wi).sum() for out, wi in zip((route.gates, route.lse, route.mass, route.psum), w))
    return loss if extra is None else loss + (extra * torch.randn(extra.shape, generator=g).to(DEVICE)).sum()


@pytest.mark.parametrize("T, E, k, renorm, dtype", [
    (37, 8, 2, True, torch.float32), (50, 6, 3, False, torch.float32), (20, 5, 5, True, torch.float32),
    (33, 64, 8, True, torch.float32), (10, 3, 1, True, torch.float32), (9, 256, 8, False, torch.float32),
    (40, 8, 2, True, torch.bfloat16), (24, 12, 4, False, torch.bfloat16),
    (1100, 8, 2, True, torch.float32), (100, 256, 8, True, torch.bfloat16),  # several row blocks, ragged end
])
def test_triton_route_equals_reference(T, E, k, renorm, dtype):
    torch.manual_seed(0)
    logits = torch.randn(T, E).to(dtype)
    logits[0] = 1.0                                     # a row of exact ties
    logits[1, : min(E, 3)] = 2.0                        # ties among the top
    logits[2] = torch.randint(0, 2, (E,)).to(dtype)     # many ties
    logits = logits.to(DEVICE)
    results = []
    for impl in ("torch", "triton"):
        a = logits.clone().requires_grad_(True)
        route = topk_route(a, k, impl, renorm)
        route_loss(route, T, E, k).backward()
        results.append((route, a.grad))
    (r1, g1), (r2, g2) = results
    assert torch.equal(r1.idx, r2.idx) and torch.equal(r1.counts, r2.counts)
    assert r2.gates.dtype == torch.float32 and r2.idx.dtype == torch.int64
    for name in ("gates", "lse", "mass", "psum"):
        assert torch.allclose(getattr(r1, name), getattr(r2, name), rtol=1e-5, atol=1e-5), name
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert g2.dtype == dtype and torch.allclose(g1.float(), g2.float(), **tol)


def test_triton_eigen_route_equals_reference():
    from router import orthonormal
    torch.manual_seed(0)
    T, E, r, d = 150, 6, 5, 32  # 3 row blocks of 64, the last one ragged
    x = torch.randn(T, d)
    P = orthonormal(torch.randn(E, d, r))
    inputs = (torch.einsum("td,edr->ter", x, P).flatten(1), x.norm(dim=-1), torch.tensor(10.0))
    results = []
    for impl in ("torch", "triton"):
        u, xn, beta = (t.clone().to(DEVICE).requires_grad_(True) for t in inputs)
        route = eigen_route(u, xn, beta, 2, r, impl)
        route_loss(route, T, E, 2, extra=route.logits).backward()
        results.append((route.logits, route, u.grad, xn.grad, beta.grad))
    (l1, r1, *g1), (l2, r2, *g2) = results
    assert torch.allclose(l1, l2, atol=1e-5) and torch.equal(r1.idx, r2.idx)
    assert torch.allclose(l1, 10.0 * eigenbasis_scores(x, P).to(DEVICE), atol=1e-4)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


INF, NAN = float("inf"), float("nan")
EDGE_ROWS = {  # rows a router can produce in a diverging run
    "fewer finite than k": ([[-INF, -INF, 1.0, -INF], [0.5, -INF, -INF, 2.0]], 3),
    "all -inf": ([[-INF] * 4, [1.0, 2.0, 3.0, 4.0]], 2),
    "all NaN": ([[NAN] * 4, [1.0, 2.0, 3.0, 4.0]], 2),
    "one NaN": ([[1.0, NAN, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]], 2),
    "+inf": ([[1.0, INF, 3.0, 2.0], [INF, 2.0, INF, 4.0]], 2),
    "+inf and -inf": ([[-INF, INF, -INF, 2.0], [1.0, 2.0, 3.0, 4.0]], 1),
}


@pytest.mark.parametrize("case", list(EDGE_ROWS))
@pytest.mark.parametrize("renorm", [True, False])
def test_triton_edge_rows_equal_the_reference(case, renorm):
    rows, k = EDGE_ROWS[case]
    logits = torch.tensor(rows).repeat(3, 1).to(DEVICE)   # several copies: counts must add up
    results = []
    for impl in ("torch", "triton"):
        a = logits.clone().requires_grad_(True)
        route = topk_route(a, k, impl, renorm)
        route_loss(route, *logits.shape, k).backward()
        results.append((route, a.grad))
    (r1, g1), (r2, g2) = results
    assert torch.equal(r1.idx, r2.idx), (r1.idx, r2.idx)
    assert all(len(set(row)) == k for row in r2.idx.tolist()) and 0 <= int(r2.idx.min()) <= int(r2.idx.max()) < 4
    assert torch.equal(r1.counts, r2.counts) and int(r2.counts.sum()) == logits.shape[0] * k
    for name in ("gates", "lse", "mass", "psum"):
        torch.testing.assert_close(getattr(r2, name), getattr(r1, name), equal_nan=True, msg=name)
    torch.testing.assert_close(g2, g1, equal_nan=True)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nan_in_the_logits_surfaces_as_nan(impl):
    moe = moe_block(impl=impl, n_experts=4, top_k=2)
    x = torch.randn(1, 16, 32)
    x[0, 3, 5] = NAN                                     # one token's logits become NaN
    y, r = moe(x)
    assert int(r.counts.sum()) == 32 and 0 <= int(r.idx.min()) and int(r.idx.max()) < 4
    assert torch.isnan(y[0, 3]).all() and torch.isfinite(y[0, :3]).all() and torch.isfinite(y[0, 4:]).all()


def test_triton_refuses_float64():  # the model's routers always hand it fp32; a direct call is refused
    from kernels import triton_unsupported
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        topk_route(torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64), 1, "triton")
    assert triton_unsupported(8, 2, torch.float64) and not triton_unsupported(8, 2, torch.bfloat16)
    assert topk_route(torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64), 1, "torch").idx.item() == 1


def test_ermoe_triton_clamp_gradient_and_rank_check():
    torch.manual_seed(0)
    T, E, r = 6, 3, 4
    u = torch.randn(T, E * r) * 1e-8                     # a near-zero token: ||x|| below the 1e-6 clamp
    u[2:] = torch.randn(T - 2, E * r)
    xn = u.view(T, E, r).norm(dim=-1).norm(dim=-1)
    grads = []
    for impl in ("torch", "triton"):
        ui, xi = u.clone().requires_grad_(True), xn.clone().requires_grad_(True)
        bi = torch.tensor(5.0, requires_grad=True)
        route = eigen_route(ui, xi, bi, 2, r, impl)
        route_loss(route, T, E, 2, extra=route.logits).backward()
        grads.append((xi.grad, ui.grad, bi.grad))
    assert grads[0][0][:2].abs().max() == 0 and torch.allclose(grads[1][0], grads[0][0], atol=1e-5)
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for impl in ("torch", "compile", "triton"):
        with pytest.raises(ValueError, match="not a multiple of the rank"):
            eigen_route(torch.randn(4, 10), torch.ones(4), torch.tensor(1.0), 1, 3, impl)


def custom_op_samples(contiguous):
    """Sample arguments for every custom op of kernels.py; non-contiguous when asked."""
    def t(*shape, dtype=torch.float32):  # a tensor of `shape`, stored transposed when not contiguous
        transposed = len(shape) == 2 and not contiguous
        x = torch.randn(*reversed(shape)).to(dtype).t() if transposed else torch.randn(*shape).to(dtype)
        return x.to(DEVICE)
    T, E, k, r = 20, 6, 2, 3
    logits = t(T, E)
    route = topk_route(logits, k, "torch")
    u = t(T, E * r)
    xn = u.float().norm(dim=-1) + 0.5
    beta = torch.tensor(10.0, device=DEVICE)
    return {
        "route": (logits, k, True),
        "route_backward": (logits, route.lse, route.idx, route.gates, t(T, k), torch.randn(T, device=DEVICE),
                           torch.randn(T, device=DEVICE), torch.randn(E, device=DEVICE), True),
        "eigen_route": (u, xn, beta, k, r, False),
        "eigen_route_backward": (u, xn, beta, route.lse, route.idx, route.gates, t(T, E), t(T, k),
                                 torch.randn(T, device=DEVICE), torch.randn(T, device=DEVICE),
                                 torch.randn(E, device=DEVICE), True),
    }


@pytest.mark.parametrize("contiguous", [True, False])
def test_custom_ops_pass_opcheck(contiguous):
    for name, args in custom_op_samples(contiguous).items():
        if not contiguous:
            assert not args[0].is_contiguous(), name
        grad_args = tuple(a.clone().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point()
                          and name in ("route", "eigen_route") else a for a in args)
        torch.library.opcheck(getattr(torch.ops.nanomoe, name).default, grad_args)


def test_compiled_triton_route_of_a_transposed_input():
    import torch._dynamo
    torch._dynamo.reset()

    def f(x):  # the op gets a non-contiguous (T, E) view; its backward must report true strides
        r = topk_route(x.t(), 2, "triton")
        return 2 * r.gates.sum() + (r.gates[:, 0] * r.lse).sum() + r.mass.sum()

    x = torch.randn(8, 24)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True)(xa).backward()
    f(xb).backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)


def on(device_type, dtype=torch.float32):
    """A stand-in for a tensor on a device: choose_impl only looks at .is_cuda and .dtype."""
    return types.SimpleNamespace(is_cuda=device_type == "cuda", dtype=dtype)


@pytest.mark.parametrize("router", ROUTERS)
def test_auto_impl_uses_triton_only_where_the_router_has_a_kernel_that_fits(router):
    """choose_impl decides 'auto'; impl_problem is train.py's early check of its router_impl (a refused
    setting is a UserError naming the reason)."""
    from router import choose_impl
    fused = ROUTER_CLASSES[router].topk_of_logits

    def cfg(E, k, select_bias=False):
        return types.SimpleNamespace(router=router, select_bias=select_bias, n_experts=E, top_k=k)
    assert choose_impl("auto", 64, 8, on("cuda")) == "triton" and choose_impl("auto", 64, 8, on("cpu")) == "torch"
    assert choose_impl("auto", 512, 2, on("cuda")) == "torch" and choose_impl("auto", 16, 10, on("cuda")) == "torch"
    assert choose_impl("auto", 8, 2, on("cuda", torch.float64)) == "torch"
    assert choose_impl("torch", 8, 2, on("cuda")) == "torch"
    if fused:
        assert "n_experts <= 256 and top_k <= 8" in train.impl_problem(cfg(512, 2), "triton")
        assert train.impl_problem(cfg(8, 2), "compile") is None
        for impl in ("triton", "compile"):  # a select bias: not the top-k of the logits either (refused)
            why = train.impl_problem(cfg(8, 2, select_bias=True), impl)
            assert f"router={router} with select_bias has no fused routing pass" in why and "select_bias=False" in why
    else:  # say so instead of ignoring the setting; the router routes in PyTorch, never through topk_route
        for impl in ("triton", "compile"):
            assert f"router={router} has no fused routing pass" in train.impl_problem(cfg(8, 2), impl)
    with pytest.raises(ValueError, match="top_k <= 8"):
        topk_route(torch.randn(4, 16), 10, "triton")


def test_compile_impl_equals_reference():
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    a, b = topk_route(logits, 2, "torch"), topk_route(logits, 2, "compile")
    assert torch.equal(a.idx, b.idx) and torch.allclose(a.gates, b.gates, atol=1e-6)


def test_compile_impl_survives_many_shapes_and_generate():
    torch.manual_seed(0)
    for T in range(1, 13):  # static shapes used to recompile per T and die at the 9th
        logits = torch.randn(T, 8)
        a, b = topk_route(logits, 2, "torch"), topk_route(logits, 2, "compile")
        assert torch.equal(a.idx, b.idx) and torch.allclose(a.gates, b.gates, atol=1e-6)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2))
    for r in model.routers():
        r.impl = "compile"
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 12)  # contexts of 1..12 tokens
    assert out.shape == (1, 13)


@pytest.mark.parametrize("router", KERNEL_ROUTERS)
def test_model_with_triton_routing_equals_torch_routing(router):
    blocks = [moe_block(router, impl=impl, n_experts=6, top_k=3) for impl in ("torch", "triton")]
    blocks[1].load_state_dict(blocks[0].state_dict())
    x, ids = block_inputs()
    outs = []
    for moe in blocks:
        xi = x.clone().requires_grad_(True)
        y, r = moe(xi, ids)
        _, terms = aux_losses([r, r], dict(c_lb=0.01, c_z=1e-3, c_sp=1e-2, c_cp=1e-2))
        ((y ** 2).sum() + sum(terms.values())).backward()
        outs.append((y, xi.grad, [p.grad for p in moe.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = outs
    assert torch.allclose(y1, y2, atol=1e-5) and torch.allclose(gx1, gx2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gp1, gp2))


@pytest.mark.parametrize("router", ROUTERS)
def test_whole_model_compiles_fullgraph_forward_and_backward(router):
    """fullgraph=True fails on any graph break: through the custom op where the router has a kernel,
    through its PyTorch path otherwise; with a capacity factor, which must compile too."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    impl = "triton" if router in KERNEL_ROUTERS else "torch"
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                          router=router, capacity_factor=1.0)).to(torch.bfloat16)
    for r in model.routers():                    # train.py's router_impl
        r.impl = impl

    def step(idx):
        _, ce, routes = model(idx, idx)
        aux, _ = aux_losses(routes, dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3))
        return ce + aux

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # traces forward and backward
    idx = torch.randint(0, 64, (2, 16))
    compiled(idx).backward()
    assert all(p.grad is not None for p in model.parameters())
