"""
The grader: every exercise against the project's own implementation on random inputs, forward and
backward (run from the repository root).

    python -m pytest course/exercises                      # grade your answers (the ex*.py files)
    python -m pytest course/exercises -k ex4               # one exercise
    EXERCISES=solutions python -m pytest course/exercises  # grade the instructor's key (course/solutions)
    EXERCISES=mywork python -m pytest course/exercises     # grade the package mywork (mywork/ex1_topk.py, ...)

A failure lists every check of the exercise that differs (which function, on what input, how far from
the expected answer), so one run shows all that is left to fix.
"""

import functools
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import families
import losses
import router as project_router
from model import GPT, GPTConfig, MoE
from router import SigmoidRouter, eigenbasis_scores, select_topk

PACKAGE = {"solutions": "course.solutions", None: "course.exercises"}.get(os.environ.get("EXERCISES"),
                                                                         os.environ.get("EXERCISES"))


def load(name):
    return importlib.import_module(f"{PACKAGE}.{name}")


FOUND = []  # the checks of the running exercise that differ


def grades(test):
    """Run every check of an exercise, then fail once with all that differ."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        FOUND.clear()
        try:
            test(*args, **kwargs)
        except pytest.fail.Exception as stop:  # a check that cannot go on (a stub not written yet)
            FOUND.append(str(stop))
        if FOUND:
            pytest.fail("\n".join(FOUND), pytrace=False)
    return run


def attempt(fn, *args, **kwargs):
    """Call the student's function; a stub that is not written yet stops the exercise with a readable line."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        pass  # fail outside the except block: one readable line, no chained traceback
    pytest.fail(f"{fn.__module__.split('.')[-1]}.{fn.__qualname__} is not written yet (its docstring says what "
                f"to do)", pytrace=False)


def differs(message):
    FOUND.append(message)
    return False


def same(what, got, want, atol=1e-5, rtol=1e-4):
    """Compare with the project's answer; record what differs and by how much (True if it agrees)."""
    if not torch.is_tensor(got):
        return differs(f"{what}: returned {type(got).__name__}, expected a tensor")
    if tuple(got.shape) != tuple(want.shape):
        return differs(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.dtype.is_floating_point != want.dtype.is_floating_point:
        return differs(f"{what}: dtype {got.dtype}, expected {want.dtype}")
    got, want = got.detach().double(), want.detach().double()
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        err = (got - want).abs().max().item()
        where = tuple(int(i) for i in torch.nonzero((got - want).abs() == (got - want).abs().max())[0])
        return differs(f"{what}: differs from the expected answer by up to {err:.3g} (first at index {where}: "
                       f"got {got[where].item():.6g}, expected {want[where].item():.6g})")
    return True


def grads(fn, *tensors):
    """Gradients of sum(fn(...) * fixed random weights) w.r.t. every tensor (a random backward pass)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    return out, [leaf.grad for leaf in leaves]


# ------------------------------------------------------------------------------------------------

@grades
def test_ex1_topk_with_ties_and_gates():
    ex = load("ex1_topk")
    torch.manual_seed(0)
    logits = torch.randn(12, 6)
    logits[0] = 1.0                                  # all equal
    logits[1, [1, 2, 4]] = 5.0                       # a tie at the top
    logits[2] = torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 1.0])
    for k in (1, 2, 3, 6):
        want = select_topk(logits, k)
        got = attempt(ex.topk, logits, k)
        if torch.is_tensor(got) and got.shape == want.shape and not torch.equal(got.long(), want):
            t = int(torch.nonzero((got.long() != want).any(1))[0])
            differs(f"topk(k={k}): row {t} = {logits[t].tolist()} gives {got[t].tolist()}, expected "
                    f"{want[t].tolist()} (best first; ties go to the lower expert index)")
            continue
        same(f"topk(k={k})", got, want)
    idx = select_topk(logits, 3)
    for renorm in (True, False):
        got, g1 = grads(lambda a: attempt(ex.gates, a, idx, renorm), logits)
        want, g2 = grads(lambda a: project_router.route_reference(a, 3, renorm, idx=idx).gates, logits)
        same(f"gates(renormalize={renorm})", got, want)
        same(f"d gates / d logits (renormalize={renorm})", g1[0], g2[0])


@grades
def test_ex2_load_balancing_and_z_loss():
    ex = load("ex2_balance")
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(40, 5), dim=-1)
    idx = select_topk(probs.log(), 2)
    got, g1 = grads(lambda p: attempt(ex.load_balancing, p, idx), probs)
    want, g2 = grads(lambda p: losses.load_balancing_loss(p, idx), probs)
    same("load_balancing", got, want)
    same("d load_balancing / d probs", g1[0], g2[0])
    onehot = F.one_hot(torch.zeros(40, dtype=torch.long), 5).float()
    same("load_balancing at collapse (E/k)", attempt(ex.load_balancing, onehot, torch.stack([torch.arange(2)] * 40)),
         torch.tensor(5 / 2))
    logits = torch.randn(40, 5) * 3
    got, g1 = grads(lambda a: attempt(ex.z_loss, a), logits)
    want, g2 = grads(losses.z_loss, logits)
    same("z_loss", got, want)
    same("d z_loss / d logits", g1[0], g2[0])


def dispatch_case(seed=2):
    """A MoE block of the project and random routing: its dispatch is the expected answer."""
    torch.manual_seed(seed)
    moe = MoE(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_experts=5, top_k=2, expert_hidden=8))
    x = torch.randn(20, 16)
    idx = select_topk(torch.randn(20, 5), 2)
    idx[:6] = torch.tensor([0, 1])                   # expert 0 and 1 crowded, some experts maybe empty
    gates = torch.softmax(torch.randn(20, 2), dim=-1)
    return moe, x, idx, gates


@pytest.mark.parametrize("exercise, fn, path", [("ex3_naive_dispatch", "naive_dispatch", "forward_naive"),
                                                 ("ex4_sorted_dispatch", "sorted_dispatch", "forward_sorted")])
@grades
def test_ex3_ex4_dispatch(exercise, fn, path):
    student = getattr(load(exercise), fn)
    moe, x, idx, gates = dispatch_case()
    weights = (moe.w_gate, moe.w_up, moe.w_down)
    got, g1 = grads(lambda x_, g, a, b, c: attempt(student, x_, idx, g, a, b, c), x, gates, *weights)
    # the expected answer: the project's MoE block, its gradients read from its own parameters
    xi, gi = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    r = project_router.Routing(gi, idx, project_router.expert_counts(idx, 5), None, None, None)  # what a router gives
    want = getattr(moe, path)(xi, r)[0]
    (want * torch.randn(want.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    same(fn, got, want)
    for name, a, b in zip(("x", "gates", "w_gate", "w_up", "w_down"), g1,
                          (xi.grad, gi.grad, *(w.grad for w in weights))):
        same(f"d {fn} / d {name}", a, b)


@grades
def test_ex5_specialization_and_coupling():
    ex = load("ex5_regularisers")
    torch.manual_seed(3)
    z = torch.randn(10, 3, 7)
    z[0, 1] = z[0, 0]                                # a parallel pair
    got, g1 = grads(lambda t: attempt(ex.specialization, t).reshape(()), z)
    want, g2 = grads(losses.specialization_loss, z)
    same("specialization", got, want)
    same("d specialization / d z", g1[0], g2[0])
    same("specialization for k = 1", attempt(ex.specialization, torch.randn(4, 1, 7)).reshape(()), torch.tensor(0.0))
    probs = [torch.softmax(torch.randn(10, 6), -1) for _ in range(3)]
    idx = [torch.randperm(6)[:2].expand(10, 2).clone() for _ in range(3)]   # not always the top-2 of p
    got, g1 = grads(lambda a, b, c: attempt(ex.coupling, [a, b, c], idx), *probs)
    want, g2 = grads(lambda a, b, c: losses.coupling_loss([a, b, c], idx_list=idx), *probs)
    same("coupling", got, want)
    for layer, (a, b) in enumerate(zip(g1, g2)):
        same(f"d coupling / d probs of layer {layer}", a, b)


@grades
def test_ex6_eigenbasis_score():
    ex = load("ex6_eigenbasis")
    torch.manual_seed(4)
    x = torch.randn(9, 12)
    x[0] = 0.0                                       # a zero token: the 1e-6 guard
    P = project_router.orthonormal(torch.randn(3, 12, 4))
    got, g1 = grads(lambda a, b: attempt(ex.eigenbasis_score, a, b), x, P)
    want, g2 = grads(eigenbasis_scores, x, P)
    same("eigenbasis_score", got, want)
    same("d score / d x", g1[0], g2[0])
    same("d score / d P", g1[1], g2[1])


@grades
def test_ex7_bias_update():
    ex = load("ex7_bias_update")
    r = SigmoidRouter(GPTConfig(n_layer=1, n_head=2, n_embd=8, n_experts=6, router="sigmoid", bias_update_rate=0.05))
    bias = torch.randn(6)
    counts = torch.tensor([10, 3, 7, 7, 0, 15])     # mean 7: two experts exactly at the mean
    r.bias.copy_(bias)
    r.update(counts)
    same("bias_update", attempt(ex.bias_update, bias.clone(), counts, 0.05), r.bias)


@grades
def test_ex8_a_new_router_through_the_interface(monkeypatch):
    cls = load("ex8_new_router").CentroidRouter
    monkeypatch.setitem(project_router.ROUTERS, "centroid", cls)
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_experts=4, top_k=2, router="centroid")
    torch.manual_seed(0)
    attempt(cls, GPTConfig(**cfg))                   # the student's constructor, named in a failure
    model = GPT(GPTConfig(**cfg))
    router = model.blocks[0].mlp.router
    x = torch.randn(5, 16)
    centroids = [p for p in router.parameters()]
    if len(centroids) != 1 or tuple(centroids[0].shape) != (4, 16):
        pytest.fail(f"CentroidRouter should have one parameter of shape (E, d) = (4, 16), has "
                    f"{[tuple(p.shape) for p in centroids]}", pytrace=False)  # nothing more can be checked
    want = -((x[:, None, :] - centroids[0][None]) ** 2).sum(-1)
    same("CentroidRouter.logits", attempt(router.logits, x, None), want, atol=1e-4)
    idx = torch.randint(0, 32, (2, 8))
    _, ce, routes = model(idx, idx)
    aux, _ = losses.aux_losses(routes, dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3))
    (ce + aux).backward()
    r = routes[0]
    if not (r.idx.shape == (16, 2) and int(r.counts.sum()) == 32 and torch.allclose(r.gates.sum(-1), torch.ones(16))):
        differs("routing through CentroidRouter breaks an invariant (k experts per token, gates sum to 1)")
    if centroids[0].grad is None or centroids[0].grad.abs().sum() == 0:
        differs("no gradient reaches the centroids: are the logits computed from them?")


@grades
def test_ex9_a_family_as_settings():
    import importlib.util
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: this exercise compares with its ERNIE-4.5 block")
    import transformers
    wanted = attempt(load("ex9_family").settings)
    if not isinstance(wanted, dict):
        pytest.fail(f"settings() should return a dict of families.FamilyConfig settings, returned "
                    f"{type(wanted).__name__}", pytrace=False)
    try:
        cfg = families.FamilyConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                    **{**wanted, "n_experts": 8, "top_k": 2, "expert_hidden": 8})
    except (TypeError, ValueError) as err:
        pytest.fail(f"FamilyConfig refuses these settings: {err}", pytrace=False)
    hf = transformers.models.ernie4_5_moe.modeling_ernie4_5_moe.Ernie4_5_MoeSparseMoeBlock(
        transformers.Ernie4_5_MoeConfig(hidden_size=16, moe_intermediate_size=8, moe_num_experts=8, moe_k=2,
                                        moe_num_shared_experts=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(hf.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    torch.manual_seed(0)
    moe = families.build(cfg).blocks[0].mlp          # the model of these settings (families.py), its one block's
    gate, up = hf.experts.gate_up_proj.chunk(2, dim=1)
    theirs = {"router.weight": hf.gate.weight, "w_gate": gate.transpose(1, 2), "w_up": up.transpose(1, 2),
              "w_down": hf.experts.down_proj.transpose(1, 2),
              "router.bias": hf.gate.moe_statics.e_score_correction_bias[0],
              "shared.c_gate.weight": hf.shared_experts.gate_proj.weight,
              "shared.c_up.weight": hf.shared_experts.up_proj.weight,
              "shared.c_proj.weight": hf.shared_experts.down_proj.weight}
    state = moe.state_dict()
    for name, t in theirs.items():
        if name not in state:
            differs({"router.bias": "your router has no bias that selects (the correction bias b)",
                     "router.weight": "your router is not a linear router with weights W"}.get(
                name, f"your block has no {name} (the shared experts?)"))
        elif tuple(state[name].shape) != tuple(t.shape):
            differs(f"{name} has shape {tuple(state[name].shape)}, ERNIE's {tuple(t.shape)} (how many shared experts?)")
        else:
            state[name].copy_(t.detach())
    extra = set(state) - set(theirs)
    if extra:
        differs(f"your block has parameters ERNIE's has not: {sorted(extra)}")
    if FOUND:
        return
    x = torch.randn(1, 24, 16, generator=g)
    picked = []
    hook = hf.gate.register_forward_hook(lambda mod, inp, out: picked.append(out[2]))
    want = hf(x)
    hook.remove()
    got, r = moe(x)
    if not torch.equal(picked[0].sort(-1).values, r.idx.sort(-1).values):
        differs("the selected experts differ: is the bias added to the scores that select (p + b), "
                "and to p, not to the logits?")
    same("the block output", got, want, atol=1e-5, rtol=1e-4)
