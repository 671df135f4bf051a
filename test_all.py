"""
The test suite, one section per concern, in this order:

  routing semantics           the invariants of every router (docs/design.md §1), naive == sorted dispatch
  losses                      brute force, known values and other papers' normalisations
  data and training           tokenizer, CLI end to end: derived widths, falling loss, exact resume,
                              crashes and bad input (one `error:` line, files untouched), DDP
  ERMoE, R_sp and R_cp        the eigenbasis router's geometry; the two regularisers of Hu et al. 2026
  metrics                     the reference values of docs/design.md §5
  fused routing kernels       Triton and torch.compile == the PyTorch reference, forward and backward,
                              edge rows, opcheck, registers (Triton runs in its CPU interpreter without a GPU)
  making routing visible      synthetic task, plots, ablation harness
  course kit, interop, EP     walkthrough and grader; Hugging Face round trips; expert parallelism (gloo)

Run: python -m pytest test_all.py -n 2
"""

import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels in the interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one thread per worker (and the processes it starts),
    os.environ["OMP_NUM_THREADS"] = "1"     # or the workers' thread pools spin-wait on each other
    torch.set_num_threads(1)

from data import gpt2_encoding
from kernels import eigen_route, topk_route
from losses import aux_losses, coupling_loss, load_balancing_loss, specialization_loss, z_loss
from metrics import RoutingStats, load_stats, nmi
from model import GPT, MLP, GPTConfig, MoE
from router import ROUTERS as ROUTER_CLASSES
from router import EigenRouter, eigenbasis_scores, select_topk

REPO = os.path.dirname(os.path.abspath(__file__))
# The conformance list: every router here passes every test parametrised by ROUTERS.
ROUTERS = ["softmax", "ermoe", "sigmoid", "hash", "cosine"]
KERNEL_ROUTERS = [name for name in ROUTERS if ROUTER_CLASSES[name].kernel is not None]  # fused Triton pass


def moe_block(router="softmax", dispatch="sorted", seed=0, **kw):
    """A small MoE block; the router's per-step hook has run a few times on random loads, so e.g.
    the sigmoid router's bias is non-zero and its selection is not the top-k of its probabilities."""
    torch.manual_seed(seed)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                router=router, dispatch=dispatch, bias_update_rate=0.1)
    args.update(kw)
    moe = MoE(GPTConfig(**args))
    for _ in range(3):
        moe.router.update(torch.randint(0, 50, (args["n_experts"],)))
    return moe


def block_inputs(B=2, S=16, seed=0, d=32):
    """x (B, S, d) and token ids (B, S) for a block."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, d, generator=g), torch.randint(0, 64, (B, S), generator=g)


# ------------------------------------------------------------------------------------------------
# routing semantics

def brute_topk(row, k):
    """k largest, ties to the lower index: sort by (-value, index)."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def test_select_topk_ties_and_gates():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 5.0, 5.0, 2.0]])
    for k in range(1, 6):
        gates, idx = select_topk(logits, k)
        for t in range(logits.shape[0]):
            assert idx[t].tolist() == brute_topk(logits[t].tolist(), k)
        want = torch.softmax(logits.gather(1, idx), dim=-1)
        assert torch.allclose(gates, want)
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (200, 7)).float()  # many exact ties
    gates, idx = select_topk(logits, 3, renormalize=False)
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


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("shared", [0, 1])
def test_sorted_dispatch_equals_naive_loop(router, shared):
    naive = moe_block(router, "naive", n_experts=5, top_k=2, n_shared=shared)
    fast = moe_block(router, "sorted", n_experts=5, top_k=2, n_shared=shared)
    fast.load_state_dict(naive.state_dict())
    x, ids = block_inputs(3)
    g = torch.randn(3, 16, 32)
    results = []
    for moe in (naive, fast):
        xi = x.clone().requires_grad_(True)
        y, r = moe(xi, ids)
        loss = (y * g).sum() + specialization_loss(r.z) + load_balancing_loss(r.probs, r.idx)
        loss.backward()
        results.append((y, r, xi.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y1, r1, gx1, gp1), (y2, r2, gx2, gp2) = results
    assert torch.equal(r1.idx, r2.idx) and torch.equal(r1.counts, r2.counts)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(r1.z, r2.z, atol=1e-6)
    assert torch.allclose(gx1, gx2, atol=1e-6)
    assert any("router" in n for n in gp1) == any(True for _ in naive.router.parameters())
    for name in gp1:
        assert gp1[name] is not None and gp1[name].abs().sum() > 0, name
        assert torch.allclose(gp1[name], gp2[name], atol=1e-6), name


def run_and_grads(moe, x, ids):
    xi = x.clone().requires_grad_(True)
    y, r = moe(xi, ids)
    g = torch.Generator().manual_seed(7)
    ((y.float() * torch.randn(y.shape, generator=g)).sum() + specialization_loss(r.z)).backward()
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
    from metrics import RoutingStats
    stats = RoutingStats()
    stats.update([r])
    assert math.isclose(stats.summary()[0]["dropped"], 1 - int(r.kept.sum()) / 32, rel_tol=1e-6)
    with torch.no_grad():  # collapse: a zero router sends every token to expert 0 -> 1 - c/E dropped
        moe.router.weight.zero_()
    stats = RoutingStats()
    stats.update([moe(x, ids)[1]])
    assert math.isclose(stats.summary()[0]["dropped"], 1 - 0.5 / 4, rel_tol=1e-9)


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
def test_param_count_from_the_config_equals_the_model(router):
    for kw in (dict(n_experts=0), dict(n_experts=4, top_k=2), dict(n_experts=6, top_k=1, n_shared=2),
               dict(n_experts=4, ermoe_basis="partitioned"), dict(n_experts=4, ermoe_basis="penalty", ermoe_rank=3),
               dict(n_experts=4, n_kv_head=1, tie_embeddings=False, qk_norm=True, qkv_bias=True, n_shared=1,
                    shared_gate=True)):
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, router=router, **kw)
        assert cfg.param_count() == GPT(cfg).num_params()[0], kw


@pytest.mark.parametrize("router", ROUTERS)
def test_bad_input_for_every_router_is_one_error_line(router, tmp_path):
    for args, message in ((["--top_k=5"], "top_k must be in [1, n_experts=4]"),
                          (["--n_embd=30", "--n_head=4"], "must be divisible by n_head"),
                          (["--capacity_factor=-1.0"], "capacity_factor must be >= 0")):
        code, out, err = cli("train", f"--out_dir={tmp_path}", *TINY, f"--router={router}", *args)
        assert code == 1 and err.strip().splitlines() == [err.strip()] and message in err, (args, err)
    assert not os.listdir(tmp_path)


def test_upcycled_experts_start_as_near_copies():
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2)
    torch.manual_seed(0)
    up = GPT(GPTConfig(**cfg, expert_init="upcycle"))
    torch.manual_seed(0)
    rand = GPT(GPTConfig(**cfg))
    for a, b in ((up, 0.01), (rand, 0.9)):
        w = a.blocks[0].mlp.w_up
        rel = (w - w[:1]).norm(dim=(1, 2))[1:] / w[0].norm()
        assert (rel < 2 * b).all() and (rel > b / 2).all(), rel  # ~1% apart upcycled, ~100% apart at random
    _, r = up.blocks[0].mlp(torch.randn(1, 16, 32))
    from metrics import coactivation_cos2
    assert coactivation_cos2(r.z) > 0.99      # co-activated experts compute nearly the same thing


def test_dense_model_has_no_routing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=0))
    idx = torch.randint(0, 64, (2, 16))
    _, loss, routes = model(idx, idx)
    assert routes == [] and all(isinstance(b.mlp, MLP) for b in model.blocks)
    total, active = model.num_params()
    assert total == active
    assert aux_losses(routes, c_lb=0.01)[1] == {}


# ------------------------------------------------------------------------------------------------
# losses: brute force and known values

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


def test_z_loss():
    E = 7
    assert torch.isclose(z_loss(torch.zeros(5, E)), torch.tensor(math.log(E) ** 2))
    torch.manual_seed(0)
    a = torch.randn(9, E)
    brute = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in a.tolist()) / 9
    assert math.isclose(z_loss(a).item(), brute, rel_tol=1e-5)


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


# ------------------------------------------------------------------------------------------------
# data and training end to end

def test_tokenizer_matches_gpt2():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("hello world") == [31373, 995]
    assert enc.n_vocab == 50257


@pytest.mark.parametrize("router", ROUTERS)
def test_tiny_model_loss_falls(router):
    from data import get_batch, load_split, prepare
    data = load_split(prepare("shakespeare"), "train")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, n_experts=4, top_k=2, router=router))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    X, Y = get_batch(data, 8, 32, gen, "cpu")  # one fixed batch: the loss must fall on it
    losses = []
    for _ in range(30):
        _, ce, routes = model(X, Y)
        aux, _ = aux_losses(routes, c_lb=0.01)
        (ce + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(ce.item())
    assert losses[-1] < losses[0] - 2.0, losses


TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--n_experts=4", "--top_k=2", "--eval_iters=2", "--log_interval=1", "--num_samples=0", "--compile=False"]


def cli(entry, *argv):
    """An entry point run in this process exactly as its __main__ runs it: (exit status, stdout, stderr).
    Any exception other than the handled ones propagates, i.e. fails the test (a traceback)."""
    import contextlib
    import importlib
    import io
    from rundir import cli as run_cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(importlib.import_module(entry).main, [str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def train(out_dir, *args):
    """train.py in this process with the tiny settings; asserts that it succeeded."""
    code, out, err = cli("train", f"--out_dir={out_dir}", *TINY, *args)
    assert code == 0, out[-2000:] + err
    return out


def train_subprocess(out_dir, *args, launcher=(sys.executable,), timeout=300, **kw):
    cmd = [*launcher, os.path.join(REPO, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def train_losses(out_dir):
    from rundir import read_log
    return {r["iter"]: r["train_loss"] for r in read_log(os.path.join(out_dir, "log.jsonl"))
            if "train_loss" in r and "val_loss" not in r}


def file_hashes(*dirs):
    import hashlib
    return {os.path.join(root, name): hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for d in dirs for root, _, names in os.walk(d) for name in names}


def assert_loadable_and_finite(out_dir):
    from rundir import all_finite, load_checkpoint, read_log
    ckpt = load_checkpoint(str(out_dir))
    assert all_finite(ckpt["model"].values())
    read_log(os.path.join(out_dir, "log.jsonl"))
    return ckpt


@pytest.mark.parametrize("router", ROUTERS)
def test_resume_restores_settings_and_continues_exactly(tmp_path, router):
    common = [f"--router={router}", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8", "--warmup_iters=2",
              "--dataset=synthetic", "--vocab_size=64"]
    train(tmp_path / "full", "--max_iters=8", *common)
    train(tmp_path / "half", "--max_iters=4", *common)
    # only what may change: every other setting (router, dataset, sizes...) comes from the checkpoint
    code, out, err = cli("train", f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=8")
    assert code == 0, err
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "half")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[i] == b[i] for i in range(1, 9)), (a, b)
    for name in ("ckpt.pt", "log.jsonl", "loss.png", "expert_load.png"):
        assert (tmp_path / "half" / name).stat().st_size > 0


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A finished tiny Shakespeare run, a finished synthetic run, and spare files for bad inputs."""
    root = tmp_path_factory.mktemp("runs")
    train(root / "run", "--max_iters=2", "--eval_interval=2")
    train(root / "synth", "--max_iters=1", "--dataset=synthetic", "--vocab_size=64")
    (root / "a_file").write_text("not a directory")
    (root / "syntax.py").write_text("n_layer = 4\nbatch_size = = 3\n")
    (root / "raises.py").write_text("n_layer = 4\nbatch_size = 1 / 0\n")
    (root / "adir.py").mkdir()
    for name, extra in (("nokeys", None), ("mismatch", None), ("badlog", None), ("keyless", None), ("nondict", None)):
        import shutil
        shutil.copytree(root / "run", root / name)
    ckpt = torch.load(root / "run" / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, root / "nokeys" / "ckpt.pt")
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "n_embd": 64, "n_head": 4}}, root / "mismatch" / "ckpt.pt")
    with open(root / "badlog" / "log.jsonl", "r+") as fh:
        lines = fh.readlines()
        fh.seek(0)
        fh.writelines(lines[:1] + ["{not json\n"] + lines[1:])
    with open(root / "keyless" / "log.jsonl", "a") as fh:
        fh.write('{"val_loss": 1.0}\n')
    with open(root / "nondict" / "log.jsonl", "a") as fh:
        fh.write("[1, 2, 3]\n")
    os.makedirs(root / "ablation" / "dense-s0")
    (root / "ablation" / "dense-s0" / "log.jsonl").write_text('{"iter": 0}\n{"iter": 1, oops\n{"iter": 2}\n')
    return root


BAD_INPUTS = [  # (entry point, arguments; RUN = a finished run, R = the fixture's folder), what the error names
    ("train", ["--log_interval=0"], "log_interval must be >= 1"),
    ("train", ["--eval_interval=0"], "eval_interval must be >= 1"),
    ("train", ["--eval_iters=0"], "eval_iters must be >= 1"),
    ("train", ["--batch_size=0"], "batch_size must be >= 1"),
    ("train", ["--gradient_accumulation_steps=-1"], "gradient_accumulation_steps must be >= 0"),
    ("train", ["--n_head=0"], "n_head must be >= 1"),
    ("train", ["--n_embd=-8"], "n_embd must be >= 1"),
    ("train", ["--block_size=0"], "block_size must be >= 1"),
    ("train", ["--vocab_size=0"], "vocab_size must be >= 1"),
    ("train", ["--expert_hidden=-1"], "expert_hidden must be >= 0"),
    ("train", ["--router=ermoe", "--ermoe_rank=-1"], "ermoe_rank must be >= 0"),
    ("train", ["--router=ermoe", "--ermoe_rank=33"], "ermoe_rank must be <= n_embd"),
    ("train", ["--router=ermoe", "--ermoe_basis=spherical"], "unknown ermoe_basis 'spherical'"),
    ("train", ["--router=ermoe", "--ermoe_basis=partitioned", "--ermoe_rank=16"], "partitioned needs"),
    ("train", ["--router=topk"], "unknown router 'topk'"),
    ("train", ["--top_k=5"], "top_k must be in [1, n_experts=4]"),
    ("train", ["--n_embd=30", "--n_head=4"], "must be divisible by n_head"),
    ("train", ["--learning_rate=-1"], "learning_rate must be a finite number >= 0"),
    ("train", ["--learning_rate=1e309"], "learning_rate must be a finite number >= 0, got inf"),
    ("train", ["--min_lr=0.1", "--learning_rate=0.01"], "min_lr (0.1) must be <= learning_rate"),
    ("train", ["--learning_rate=1e38"], "overflows float32 in AdamW's first step"),
    ("train", ["--beta1=1.0"], "beta1 and beta2 must be < 1"),
    ("train", ["--beta2=1.5"], "beta1 and beta2 must be < 1"),
    ("train", ["--dropout=1.5"], "dropout must be in [0, 1)"),
    ("train", ["--weight_decay=-1"], "weight_decay must be a finite number >= 0"),
    ("train", ["--c_lb=-0.01"], "c_lb must be a finite number >= 0"),
    ("train", ["--max_iters=-1"], "max_iters must be >= 0"),
    ("train", ["--seed=-1"], "seed must be >= 0"),
    ("train", ["--init_from=pretrained"], "init_from must be scratch or resume"),
    ("train", ["--device=tpu"], "device must be auto, cpu, cuda or cuda:N"),
    ("train", ["--device=cuda"], "no CUDA device is available"),
    ("train", ["--dtype=float16"], "dtype must be auto, bfloat16 or float32"),
    ("train", ["--n_kv_head=3"], "n_kv_head (3) must divide n_head (2)"),
    ("train", ["--norm_eps=-1e-5"], "norm_eps must be in [0, 1)"),
    ("train", ["--rope_theta=0.0"], "rope_theta must be > 0"),
    ("train", ["--shared_gate=True"], "shared_gate needs shared experts"),
    ("train", ["--expert_init=pretrained"], "unknown expert_init 'pretrained'"),
    ("train", ["--router=hash", "--router_impl=triton"], "router=hash has no fused routing pass"),
    ("train", ["--router_impl=triton", "TRITON_INTERPRET=0"], "router_impl=triton needs a CUDA device"),
    ("train", ["--n_experts=1000000"], "more than the"),
    ("train", ["--block_size=100000"], "fewer than block_size+1"),
    ("train", ["--vocab_size=100"], "outside vocab_size=100"),
    ("train", ["--dataset=synthetic", "--vocab_size=8"], "synthetic needs vocab_size >= 16"),
    ("train", ["--dataset=no_such_corpus"], "dataset 'no_such_corpus': no text file"),
    ("train", ["--dataset=EMPTY"], "too little text"),
    ("train", ["--dataset="], "dataset is empty"),
    ("train", ["--out_dir="], "out_dir is empty"),
    ("train", ["--out_dir=R/a_file"], "is a file, not a directory"),
    ("train", ["--out_dir=/proc/nanomoe-test"], "cannot write to out_dir"),
    ("train", ["--bogus=1"], "unknown setting 'bogus'"),
    ("train", ["--n_layers=1"], "did you mean 'n_layer'?"),
    ("train", ["--batch_size=abc"], "setting 'batch_size' expects int"),
    ("train", ["--n_layer", "4"], "expected --key=value"),
    ("train", ["config/no_such_file.py"], "config file not found"),
    ("train", ["R/syntax.py"], "syntax.py line 2: invalid syntax"),
    ("train", ["R/raises.py"], "raises.py line 2 raised ZeroDivisionError"),
    ("train", ["R/adir.py"], "is a directory"),
    ("train", [], "already holds a run (ckpt.pt and log.jsonl)"),
    ("train", ["--init_from=resume", "--out_dir=R/synth"], "nothing to train"),
    ("train", ["--init_from=resume", "--max_iters=4", "--n_embd=64"], "--n_embd=64 differ from it (n_embd=32)"),
    ("train", ["--init_from=resume", "--max_iters=4", "--out_dir=R/nokeys"], "incomplete: missing optimizer"),
    ("train", ["--init_from=resume", "--max_iters=4", "--out_dir=R/mismatch"], "weights do not match"),
    ("train", ["--init_from=resume", "--max_iters=4", "--out_dir=R/badlog"], "log.jsonl line 2 is not JSON"),
    ("train", ["--init_from=resume", "--out_dir=R/a_dir_without_a_run"], "no checkpoint at"),
    ("sample", ["--device=cuda"], "no CUDA device is available"),
    ("sample", ["--top_k=-1"], "--top_k must be >= 0"),
    ("sample", ["--temperature=-1"], "--temperature must be a finite number >= 0"),
    ("sample", ["--start="], "--start is empty"),
    ("sample", ["--num_samples=0"], "--num_samples must be >= 1"),
    ("sample", ["--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    ("sample", ["--out_dir=R/synth", "--start=Hello"], "outside this model's vocabulary of 64"),
    ("sample", ["--out_dir=R/nowhere"], "(train one with python train.py --out_dir="),
    ("analyze", ["R/nondict"], "log.jsonl line 5 is not a log record"),
    ("analyze", ["R/keyless"], "log.jsonl line 5 is not a log record"),
    ("analyze", ["R/nowhere"], "no run directory"),
    ("analyze", ["R/a_file"], "no run directory"),
    ("analyze", ["RUN", "extra"], "unrecognized arguments: extra"),
    ("ablate", ["--out_dir=R/ablation", "--variants", "dense", "--seeds", "0"], "dense-s0/log.jsonl line 2 is not JSON"),
    ("ablate", ["--variants", "nonsense"], "unknown variant(s) ['nonsense']"),
    ("ablate", ["--seeds", "-1", "--dry"], "seeds must be >= 0"),
    ("ablate", ["--dataset=no_such_corpus"], "no data/no_such_corpus/input.txt"),
    ("data", ["prepare", "R/nowhere.txt", "x"], "nowhere.txt does not exist"),
    ("data", ["prepare", "R/syntax.py", "a/b"], "NAME must be a plain folder name"),
    ("data", ["prepare", "R/syntax.py", "x", "--val_fraction=1.5"], "--val_fraction must be in (0, 1)"),
    ("data", ["prepare", "R/syntax.py", "x", "--tokenizer=R/none.json"], "tokenizer R/none.json not found"),
    ("convert", ["to-hf", "RUN", "R/a_file"], "is a file, not a directory"),
    ("bench", ["--steps=0"], "--reps and --steps must be >= 1"),
    ("bench", ["--reps=0"], "--reps and --steps must be >= 1"),
    ("bench", ["--bw=-1"], "--bw must be a positive bandwidth"),
    ("bench", ["--resources"], "run it with TRITON_INTERPRET=0"),
]


def test_every_bad_input_gives_one_error_line_and_changes_nothing(finished_runs, monkeypatch):
    root = finished_runs
    empty = os.path.join(REPO, "data", f"empty-{os.getpid()}")
    os.makedirs(empty)
    open(os.path.join(empty, "input.txt"), "w").close()
    try:
        for entry, args, message in BAD_INPUTS:
            argv = [a.replace("R/", f"{root}/").replace("EMPTY", os.path.basename(empty)) for a in args
                    if not a.startswith("TRITON_INTERPRET")]
            argv = [str(root / "run") if a == "RUN" else a for a in argv]
            message = message.replace("R/", f"{root}/")
            if entry in ("train", "sample") and not any(a.startswith("--out_dir") for a in argv):
                argv.append(f"--out_dir={root / 'run'}")
            if entry == "train" and "--init_from=resume" not in argv:  # a resumed run takes the saved settings
                argv = [*TINY, *argv]
            with monkeypatch.context() as m:
                m.setenv("TRITON_INTERPRET", "0" if "TRITON_INTERPRET=0" in args else "1")
                before = file_hashes(root, empty)
                code, out, err = cli(entry, *argv)
                after = file_hashes(root, empty)
            lines = err.strip().splitlines()
            assert code != 0 and lines and lines[-1].startswith("error:"), (entry, args, out[-500:], err)
            assert message in lines[-1], (entry, args, lines[-1])
            assert len(lines) == 1, (entry, args, err)
            assert before == after, (entry, args, set(before.items()) ^ set(after.items()))
    finally:
        import shutil
        shutil.rmtree(empty)
    assert len(BAD_INPUTS) >= 40


def test_a_damaged_meta_json_is_one_error_line_and_deleting_it_prepares_again(tmp_path):
    name = f"damaged-{os.getpid()}"
    folder = os.path.join(REPO, "data", name)
    os.makedirs(folder)
    try:
        with open(os.path.join(folder, "input.txt"), "w") as fh:
            fh.write(open(os.path.join(REPO, "data", "shakespeare", "input.txt")).read()[:20000])
        train(tmp_path / "first", f"--dataset={name}", "--max_iters=0")
        with open(os.path.join(folder, "meta.json"), "r+") as fh:
            fh.truncate(10)                              # half a file, newer than input.txt
        before = file_hashes(folder)
        code, out, err = cli("train", *TINY, f"--out_dir={tmp_path / 'second'}", f"--dataset={name}", "--max_iters=0")
        assert code == 1 and err.count("\n") == 1 and "meta.json is not JSON" in err, err
        assert file_hashes(folder) == before and not (tmp_path / "second").exists()
        os.remove(os.path.join(folder, "meta.json"))
        train(tmp_path / "second", f"--dataset={name}", "--max_iters=0")
    finally:
        import shutil
        shutil.rmtree(folder)


@pytest.mark.parametrize("entry, args, message", [
    ("train.py", ["--batch_size=0"], "batch_size must be >= 1"),
    ("sample.py", ["--out_dir=/nonexistent"], "no checkpoint at /nonexistent/ckpt.pt"),
    ("analyze.py", ["/nonexistent"], "no run directory /nonexistent"),
])
def test_command_line_errors_have_no_traceback(entry, args, message):
    res = subprocess.run([sys.executable, entry, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [f"error: {res.stderr.strip()[7:]}"]
    assert message in res.stderr and "Traceback" not in res.stderr


def test_a_new_run_never_replaces_another_and_overwrite_does(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    before = file_hashes(tmp_path)
    code, _, err = cli("train", f"--out_dir={tmp_path}", *TINY, "--max_iters=2")
    assert code == 1 and "already holds a run" in err and file_hashes(tmp_path) == before
    out = train(tmp_path, "--max_iters=1", "--eval_interval=1", "--overwrite=True", "--seed=7")
    assert "iter 1:" in out and max(train_losses(tmp_path)) == 1


def test_nan_guard_never_writes_a_non_finite_checkpoint(tmp_path):
    # the repro: the update itself diverges (finite loss, NaN weights); the evaluation that
    # follows sees it and stops before saving
    code, out, err = cli("train", f"--out_dir={tmp_path / 'a'}", *TINY, "--max_iters=30", "--eval_interval=1",
                         "--learning_rate=1e3", "--min_lr=0.0", "--grad_clip=0.0", "--warmup_iters=0")
    assert code == 1 and err.count("\n") == 1 and "last good checkpoint" in err, err
    saved = assert_loadable_and_finite(tmp_path / "a")
    assert f"(iter {saved['iter_num']})" in err
    # a NaN loss: stopped before the update, the checkpoint of the last evaluation kept
    train(tmp_path / "b", "--max_iters=2", "--eval_interval=2")
    good = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    code, _, err = cli("train", f"--out_dir={tmp_path / 'c'}", *TINY, "--max_iters=6", "--eval_interval=2",
                       "--learning_rate=1e30", "--min_lr=0.0", "--warmup_iters=0")
    assert code == 1 and "loss is nan" in err or "loss is inf" in err or "not finite" in err, err
    assert_loadable_and_finite(tmp_path / "c")
    assert good["iter_num"] == 2


def test_a_second_run_in_the_same_out_dir_is_refused(tmp_path):
    import signal
    first = subprocess.Popen([sys.executable, "train.py", f"--out_dir={tmp_path}", *TINY, "--max_iters=100000",
                              "--eval_interval=1000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (pytest -n ignores it)
    try:
        for line in first.stdout:  # training has started (the lock names its holder before that)
            if line.startswith("iter 2:"):
                break
        code, _, err = cli("train", f"--out_dir={tmp_path}", *TINY, "--max_iters=2", "--overwrite=True")
        assert code == 1 and f"in use by another train.py (pid {first.pid})" in err, err
        first.send_signal(2)  # Ctrl-C: one line, exit 130, nothing left behind
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 130 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted at iter")
        assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
        assert_loadable_and_finite(tmp_path)
    finally:
        first.kill()


KILL_IN_SAVE = """
import os, signal, sys, runpy, torch
real, calls = torch.save, [0]
def save(obj, f, *a, **k):  # the second checkpoint: half a file, then kill -9
    calls[0] += 1
    if calls[0] == 2:
        open(f, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_9_in_training_and_in_the_checkpoint_write_then_exact_resume(tmp_path):
    common = ["--max_iters=8", "--eval_interval=2", "--dropout=0.1"]
    train(tmp_path / "full", *common)
    # 1. kill -9 inside the checkpoint write (at iter 2): the iter-0 checkpoint and the log survive
    res = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, f"--out_dir={tmp_path / 'a'}", *TINY, *common],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == -9
    assert [p for p in os.listdir(tmp_path / "a") if ".tmp." in p]         # the torn temp file
    assert assert_loadable_and_finite(tmp_path / "a")["iter_num"] == 0
    # 2. kill -9 at a moment during training
    proc = subprocess.Popen([sys.executable, "train.py", f"--out_dir={tmp_path / 'b'}", *TINY, *common],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 5:"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert assert_loadable_and_finite(tmp_path / "b")["iter_num"] == 4
    for run in ("a", "b"):  # resume: removes the temp file, continues bit for bit
        cli_code, _, err = cli("train", f"--out_dir={tmp_path / run}", "--init_from=resume", "--max_iters=8")
        assert cli_code == 0, err
        assert not [p for p in os.listdir(tmp_path / run) if ".tmp." in p]
        a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / run)
        assert sorted(b) == list(range(1, 9)) and all(a[i] == b[i] for i in a), (run, a, b)


def test_torn_last_log_line_is_dropped_on_resume(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"iter": 3, "train_lo')                    # a write cut by a crash
    code, _, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=3")
    assert code == 0, err
    assert max(train_losses(tmp_path)) == 3


def test_ddp_command_as_written_then_resume_with_another_world_size(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    res = train_subprocess(tmp_path, "--max_iters=2", "--eval_interval=2", launcher=launcher)  # no accumulation flag
    assert res.returncode == 0, res.stderr[-3000:]
    from rundir import read_log
    hashes = [r for r in read_log(tmp_path / "log.jsonl") if "param_hashes" in r][-1]["param_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    code, out, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=3")  # one process now
    assert code == 0 and "resumed from" in out and sorted(train_losses(tmp_path)) == [1, 2, 3], err


def settings_of(*argv):
    """train.py's resolved settings for a command line, without training."""
    import settings
    cfg, model_cfg, _ = settings.setup(["--device=cpu", *argv])
    return cfg, model_cfg


def test_derived_widths_follow_the_final_settings(tmp_path):
    def widths(*argv):
        _, m = settings_of(*argv)
        return m.ffn_hidden, m.expert_hidden
    assert widths("--n_embd=128", "--n_head=4", "--top_k=2") == (384, 192)   # 8/3*128 -> 384, / k
    assert widths("--n_embd=128", "--n_head=4", "--top_k=1") == (384, 384)
    assert widths("--n_embd=128", "--n_head=4", "--top_k=2", "--n_shared=1") == (384, 128)  # / (k + shared)
    assert widths("--n_embd=64", "--n_head=4") == (192, 96)
    assert widths("--n_embd=128", "--n_head=4", "--expert_hidden=64")[1] == 64    # explicit wins
    assert widths("--n_embd=128", "--n_head=4", "--ffn_hidden=300")[1] == 150     # derived from ffn_hidden
    _, m = settings_of("--n_embd=128", "--n_head=4", "--n_experts=4", "--router=ermoe")
    assert m.ermoe_rank == 32
    config = tmp_path / "wide.py"
    config.write_text("n_embd = 128\nn_head = 4\ntop_k = 1\n")
    assert widths(str(config)) == widths("--n_embd=128", "--n_head=4", "--top_k=1")
    helptext = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    for key in ("ffn_hidden", "expert_hidden", "ermoe_rank"):
        line = next(l for l in helptext.splitlines() if f"--{key}=" in l)
        assert f"--{key}=0" in line and "derived" in line.lower(), line


# ------------------------------------------------------------------------------------------------
# ERMoE eigenbasis router

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


def ermoe_router(basis, d=32, E=4, r=8):
    return EigenRouter(GPTConfig(n_layer=1, n_head=2, n_embd=d, n_experts=E, router="ermoe", ermoe_rank=r,
                                 ermoe_basis=basis, router_impl="torch"))


def test_ermoe_router_logits_and_partitioned_identity():
    torch.manual_seed(0)
    x = torch.randn(20, 32)
    for basis in ("independent", "partitioned", "penalty"):
        router = ermoe_router(basis)
        r = router(x)
        P = router.bases()
        assert torch.allclose(r.inputs, torch.einsum("td,edr->ter", x, P) * router.lam, atol=1e-6)
        assert torch.allclose(r.logits, router.beta() * eigenbasis_scores(x, P), atol=1e-5)
        assert router.penalty().item() < 1e-10 and math.isclose(router.beta().item(), 10.0, rel_tol=1e-6)
        assert (r.penalty is not None) == (basis == "penalty")
    router = ermoe_router("partitioned")
    s = eigenbasis_scores(x, router.bases())
    assert torch.allclose((s ** 2).sum(-1), torch.ones(20), atol=1e-5)  # disjoint subspaces tile R^d
    assert router.metrics()["overlap"] < 1e-10


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
# specialization and coupling losses (Hu et al. 2026)

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
        assert xa.grad.abs().sum() > 0 and xb.grad.abs().sum() > 0
    else:                                            # a fixed router: R_cp is a constant
        assert not cp.requires_grad
    for p in [*a.parameters(), xa]:
        p.grad = None
    specialization_loss(ra.z).backward()
    assert a.w_gate.grad.abs().sum() > 0 and a.w_up.grad.abs().sum() > 0 and xa.grad.abs().sum() > 0
    assert a.w_down.grad is None


def test_zero_regulariser_coefficients_train_bit_identically():
    from losses import balance_from_stats
    results = []
    for use_aux_losses in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(5):
            idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
            _, ce, routes = model(idx, idx)
            if use_aux_losses:
                aux, _ = aux_losses(routes, c_lb=0.01, c_z=1e-3, c_sp=0.0, c_cp=0.0)
            else:  # the foundation's loss, written out
                aux = 0.01 * sum(balance_from_stats(r.counts, r.psum, 32, 2) for r in routes) + \
                    1e-3 * sum(r.lse.pow(2).mean() for r in routes)
            (ce + aux).backward()
            opt.step()
            opt.zero_grad()
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("router", ROUTERS)
def test_aux_losses_from_fused_stats_equal_the_reference_losses(router):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                          router=router, ermoe_basis="penalty", bias_update_rate=0.1))
    for r in model.routers():  # a router's per-step hook moves its state (the sigmoid router's bias)
        r.update(torch.randint(0, 50, (4,)))
    idx = torch.randint(0, 64, (2, 16))
    _, _, routes = model(idx, idx)
    _, terms = aux_losses(routes)
    ref = {"lb": sum(load_balancing_loss(r.probs, r.idx) for r in routes),
           "z": sum(z_loss(r.logits) for r in routes),
           "sp": sum(specialization_loss(r.z) for r in routes),
           "cp": coupling_loss([r.probs for r in routes], idx_list=[r.idx for r in routes])}
    for name, value in ref.items():
        assert torch.isclose(terms[name], value, rtol=1e-5, atol=1e-6), name
    assert ("ortho" in terms) == (router == "ermoe")


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


def test_specialization_gradient_reaches_ermoe_bases_and_lambda():
    moe = moe_block("ermoe")
    _, r = moe(torch.randn(1, 16, 32))
    specialization_loss(r.z).backward()
    assert moe.router.raw.grad.abs().sum() > 0 and moe.router.lam.grad.abs().sum() > 0
    assert moe.router.log_beta.grad is None or moe.router.log_beta.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# metrics: the reference values of docs/design.md §5

def test_metrics_reference_values():
    E = 8
    uniform = load_stats(torch.full((E,), 10.0))
    assert uniform == {"cv": 0.0, "max_mean": 1.0, "dead": 0}
    collapse = load_stats(torch.tensor([80.0] + [0.0] * (E - 1)))
    assert math.isclose(collapse["cv"], math.sqrt(E - 1)) and collapse["max_mean"] == E and collapse["dead"] == E - 1
    assert math.isclose(nmi(torch.eye(4) * 5), 1.0)                    # identical labelings
    assert abs(nmi(torch.ones(4, 3))) < 1e-12                           # independent labelings
    perm = torch.zeros(4, 4)
    perm[[0, 1, 2, 3], [2, 0, 3, 1]] = 1.0
    assert math.isclose(nmi(perm), 1.0)                                 # a relabelling


def test_routing_stats_on_handmade_routes():
    from router import Routing
    T, E, k = 8, 4, 2
    idx0 = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]] * 2)
    idx1 = torch.tensor([[1, 0], [1, 2], [3, 2], [3, 0]] * 2)  # top-1: 0->1, 1->1, 2->3, 3->3
    uniform = torch.full((T, E), 1.0 / E)
    z = torch.eye(k, 6).expand(T, k, 6)  # orthogonal intermediates: cos^2 = 0
    routes = []
    for i in (idx0, idx1):
        counts = torch.zeros(E, dtype=torch.int32).scatter_add_(0, i.reshape(-1), torch.ones(T * k, dtype=torch.int32))
        routes.append(Routing(torch.full((T, k), 0.5), i, counts, torch.zeros(T), torch.full((T,), k / E),
                              uniform.sum(0), uniform.log(), z=z))
    stats = RoutingStats()
    stats.update(routes)
    m = stats.summary()
    assert math.isclose(m[0]["entropy_norm"], 1.0, rel_tol=1e-6) and math.isclose(m[0]["topk_mass"], k / E)
    assert m[0]["cv"] == 0.0 and m[0]["coact_cos2"] == 0.0
    want = torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.equal(stats.transitions()[0], want)
    assert math.isclose(m[0]["next_cond_entropy"], 0.0, abs_tol=1e-12)  # next layer is determined
    assert math.isclose(m[0]["next_nmi"], 2 * math.log(2) / (math.log(4) + math.log(2)), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# fused routing kernels (kernels.py): Triton == PyTorch reference, forward and backward

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


def on(device_type):
    """A stand-in for a tensor on a device: Router.impl_for only looks at its .device."""
    import types
    return types.SimpleNamespace(device=torch.device(device_type))


@pytest.mark.parametrize("router", ROUTERS)
def test_auto_impl_uses_triton_only_where_the_router_has_a_kernel_that_fits(router):
    cfg = dict(n_layer=1, n_head=2, n_embd=64, vocab_size=64, router=router)
    fused = ROUTER_CLASSES[router].kernel is not None
    r = ROUTER_CLASSES[router](GPTConfig(**cfg, n_experts=64, top_k=8))
    assert r.impl_for(on("cuda")) == ("triton" if fused else "torch") and r.impl_for(on("cpu")) == "torch"
    assert ROUTER_CLASSES[router](GPTConfig(**cfg, n_experts=512, top_k=2)).impl_for(on("cuda")) == "torch"
    assert ROUTER_CLASSES[router](GPTConfig(**cfg, n_experts=16, top_k=10)).impl_for(on("cuda")) == "torch"
    if fused:
        with pytest.raises(ValueError, match="n_experts <= 256 and top_k <= 8"):
            GPTConfig(**cfg, n_experts=512, top_k=2, router_impl="triton")
    else:  # say so instead of ignoring the setting
        for impl in ("triton", "compile"):
            with pytest.raises(ValueError, match=f"router={router} has no fused routing pass"):
                GPTConfig(**cfg, n_experts=8, top_k=2, router_impl=impl)
    with pytest.raises(ValueError, match="top_k <= 8"):
        topk_route(torch.randn(4, 16), 10, "triton")


def test_route_reference_gradcheck():
    from router import route_reference
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for renorm in (True, False):
        def fn(a):
            r = route_reference(a, 2, renorm)
            return r.gates, r.lse, r.mass, r.psum
        assert torch.autograd.gradcheck(fn, (logits,))


def test_compile_impl_equals_reference():
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    a, b = topk_route(logits, 2, "torch"), topk_route(logits, 2, "compile")
    assert torch.equal(a.idx, b.idx) and torch.allclose(a.gates, b.gates, atol=1e-6)


@pytest.mark.parametrize("router", KERNEL_ROUTERS)
def test_model_with_triton_routing_equals_torch_routing(router):
    blocks = [moe_block(router, router_impl=impl, n_experts=6, top_k=3) for impl in ("torch", "triton")]
    blocks[1].load_state_dict(blocks[0].state_dict())
    x, ids = block_inputs()
    outs = []
    for moe in blocks:
        xi = x.clone().requires_grad_(True)
        y, r = moe(xi, ids)
        _, terms = aux_losses([r, r], c_lb=0.01, c_z=1e-3, c_sp=1e-2, c_cp=1e-2)
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
                          router=router, router_impl=impl, capacity_factor=1.0)).to(torch.bfloat16)

    def step(idx):
        _, ce, routes = model(idx, idx)
        aux, _ = aux_losses(routes, c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)
        return ce + aux

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # traces forward and backward
    idx = torch.randint(0, 64, (2, 16))
    compiled(idx).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("args", [[], ["--losses", "--steps=1"], ["--model", "--steps=1"]])
def test_bench_smoke_runs(args):
    code, out, err = cli("bench", *args)
    assert code == 0, err[-2000:]
    assert {"": "vs compile", "--losses": "overhead", "--model": "MFU"}[args[0] if args else ""] in out


def test_compile_impl_survives_many_shapes_and_generate():
    torch.manual_seed(0)
    for T in range(1, 13):  # static shapes used to recompile per T and die at the 9th
        logits = torch.randn(T, 8)
        a, b = topk_route(logits, 2, "torch"), topk_route(logits, 2, "compile")
        assert torch.equal(a.idx, b.idx) and torch.allclose(a.gates, b.gates, atol=1e-6)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                          router_impl="compile"))
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 12)  # contexts of 1..12 tokens
    assert out.shape == (1, 13)


def custom_op_samples(contiguous):
    """Sample arguments for every custom op of kernels.py; non-contiguous when asked."""
    def t(*shape, dtype=torch.float32):  # a tensor of `shape`, stored transposed when not contiguous
        x = torch.randn(*reversed(shape)).to(dtype).t() if len(shape) == 2 and not contiguous else torch.randn(*shape).to(dtype)
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
    moe = moe_block(router_impl=impl, n_experts=4, top_k=2)
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
        ui, xi, bi = u.clone().requires_grad_(True), xn.clone().requires_grad_(True), torch.tensor(5.0, requires_grad=True)
        route = eigen_route(ui, xi, bi, 2, r, impl)
        route_loss(route, T, E, 2, extra=route.logits).backward()
        grads.append((xi.grad, ui.grad, bi.grad))
    assert grads[0][0][:2].abs().max() == 0 and torch.allclose(grads[1][0], grads[0][0], atol=1e-5)
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for impl in ("torch", "compile", "triton"):
        with pytest.raises(ValueError, match="not a multiple of the rank"):
            eigen_route(torch.randn(4, 10), torch.ones(4), torch.tensor(1.0), 1, 3, impl)


def test_triton_kernels_do_not_spill_on_h100():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--resources"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[0].endswith(("_fwd", "_bwd"))]
    assert len(rows) >= 20
    for row in rows:
        regs, stack, wide = int(row[-3]), int(row[-2]), row[-1]
        assert stack == 0 and regs <= 255 and wide == "yes", row
    assert "no spills" in res.stdout and "64-bit row offsets everywhere" in res.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_train_step_with_inductor(dtype):
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2))

    def step(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, ce, routes = model(idx, idx)
            aux, _ = aux_losses(routes, c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)
        return ce + aux

    idx = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(step, fullgraph=True)          # inductor, the default backend
    loss = compiled(idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(idx)
    eager.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    assert torch.allclose(loss, eager, **tol)
    assert all(torch.allclose(a, p.grad, **tol) for a, p in zip(grads, model.parameters()))


# ------------------------------------------------------------------------------------------------
# making routing visible: synthetic task, analysis plots, ablation harness

def test_synthetic_mixture_follows_its_definition():
    from data import SyntheticMixture
    mix = SyntheticMixture(vocab=64, n_sources=3, seg_len=16, branching=3, seed=0)
    x, y, labels = mix.batch(256, 64, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(labels, labels[:, ::16].repeat_interleave(16, dim=1))  # one source per segment
    counts = torch.zeros(3, 64, 64)
    for s, (lo, hi) in enumerate(mix.ranges):
        tokens = x[labels == s]
        assert tokens.min() >= lo and tokens.max() < hi                        # tokens stay in the range
        same = (labels[:, 1:] == s) & (torch.arange(1, 64) % 16 != 0)          # pairs inside a segment
        counts[s].index_put_((x[:, :-1][same], x[:, 1:][same]), torch.ones(int(same.sum())), accumulate=True)
    rows = counts.sum(-1) > 200                                                # well-sampled states
    emp = counts[rows] / counts[rows].sum(-1, keepdim=True)
    assert rows.sum() > 20 and (emp - mix.trans[rows]).abs().max() < 0.12
    assert ((counts > 0) <= (mix.trans > 0)).all()                             # never an undefined move
    assert all(len(set(range(*a)) & set(range(*b))) > 0 for a, b in zip(mix.ranges, mix.ranges[1:]))


@pytest.mark.parametrize("router", ROUTERS)
def test_analyze_writes_every_plot_for_every_router(tmp_path, router):
    import matplotlib.image
    from rundir import read_log
    out = tmp_path / router
    train(out, "config/synthetic.py", "--vocab_size=256", "--max_iters=2", "--eval_interval=2", f"--router={router}")
    code, stdout, err = cli("analyze", out)
    assert code == 0, err
    for name in ("loss", "expert_load", "load_history", "routing_curves", "expert_cosine", "transitions", "tokens",
                 "router"):
        assert f"{name}.png" in stdout
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name
    assert "tokens.png" in (out / "index.html").read_text()
    layers = read_log(out / "log.jsonl")[-1]["layers"]
    assert all("source_nmi" in m for m in layers)
    own = set(ROUTER_CLASSES[router](GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_experts=4,
                                               router=router)).metrics())
    assert own <= set(layers[0])  # the router's own metrics reach the log (and the curves)


@pytest.mark.parametrize("demo", ["collapse", "coupling", "specialization"])
def test_demo_tables_and_figures_from_finished_runs(tmp_path, demo):
    """demos.py on runs that are already finished (copies of one real tiny run's log, with known val
    losses): it trains nothing, and its table holds each variant's mean ± half-spread over the seeds."""
    import demos
    from rundir import read_log
    train(tmp_path / "real", "config/synthetic.py", "--vocab_size=256", "--max_iters=2", "--eval_interval=2")
    records = read_log(tmp_path / "real" / "log.jsonl")
    variants = list(demos.DEMOS[demo]["variants"])
    for i, name in enumerate(variants):
        for seed in (0, 1):
            where = demos.run_dir(tmp_path / "runs" / demo, name, seed)
            os.makedirs(where)
            with open(os.path.join(where, "log.jsonl"), "w") as fh:
                for r in records:
                    fh.write(json.dumps({**r, "val_loss": 1 + 0.1 * i + 0.01 * seed} if "val_loss" in r else r) + "\n")
    (tmp_path / "docs").mkdir()
    code, out, err = cli("demos", demo, "--seeds", "0", "1", "--out_dir", tmp_path / "runs", "--docs", tmp_path / "docs")
    assert code == 0, err
    assert out.count("already done") == 2 * len(variants)
    table = (tmp_path / "docs" / f"demo_{demo}.md").read_text()
    for i, name in enumerate(variants):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[1] == f"{1 + 0.1 * i + 0.005:.3f} ± 0.005", row
    assert "nan" not in table
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "docs" / f"demo_{demo}.png")
    assert image.shape[0] > 100 and image.std() > 0


def test_ablation_harness_dry_run_has_every_router():
    code, out, err = cli("ablate", "--quick", "--dry")
    assert code == 0, err
    cmds = out.strip().splitlines()
    from ablate import VARIANTS
    assert len(cmds) == len(VARIANTS) * 2 and all("train.py config/synthetic.py" in c for c in cmds)
    for name in ROUTERS[1:]:  # every router of the registry is a row (hash: the no-learning baseline)
        assert sum(f"--router={name}" in c for c in cmds) >= 2, name
    assert sum("--n_experts=0" in c for c in cmds) == 2


# ------------------------------------------------------------------------------------------------
# the course kit: the lecture runs, the grader grades

def test_walkthrough_runs_as_a_plain_script():
    res = subprocess.run([sys.executable, "walkthrough.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DIFFER" not in res.stdout and "checks agree" in res.stdout
    cells = open(os.path.join(REPO, "walkthrough.py")).read().count("# %%")
    assert cells >= 15  # opens as a notebook of cells


def grade(package=None, env_extra=None):
    env = {**os.environ, **({"EXERCISES": package} if package else {}), **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "pytest", "exercises", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_exercise_grader_accepts_the_key_rejects_the_stubs_and_explains_a_wrong_answer(tmp_path):
    key = grade("solutions")
    assert key.returncode == 0 and "8 passed" in key.stdout, key.stdout[-3000:]
    stubs = grade()
    assert stubs.returncode == 1 and "8 failed" in stubs.stdout
    # each stub named once at least (the short summary may repeat it, depending on terminal width)
    unwritten = set(re.findall(r"(ex\d_\w+)\.\w+ is not written yet", stubs.stdout))
    assert len(unwritten) == 8, stubs.stdout[-3000:]
    wrong = tmp_path / "wrong"  # the key with one bug: ties to the higher index
    import shutil
    shutil.copytree(os.path.join(REPO, "exercises", "solutions"), wrong)
    src = (wrong / "ex1_topk.py").read_text()
    (wrong / "ex1_topk.py").write_text(src.replace("(-row[e], e)", "(-row[e], -e)"))
    res = grade("wrong", {"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 1 and "1 failed, 7 passed" in res.stdout, res.stdout[-3000:]
    assert "ties go to the lower expert index" in res.stdout


# ------------------------------------------------------------------------------------------------
# real models in and out (transformers is a test-only dependency: these skip without it)

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
    from rundir import load_checkpoint
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
    code, out, err = cli("convert", "from-hf", tmp_path / "hf", tmp_path / "ours")
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
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "ours")[0] == 0
    code, out, err = cli("convert", "to-hf", tmp_path / "ours", tmp_path / "back")
    assert code == 0, err
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # HF -> ours -> HF: the same tensors
    # ours (trained, tied embeddings, the default eps and rope) -> HF Mixtral -> transformers
    train(tmp_path / "run", "--max_iters=2", "--eval_interval=2", "--n_kv_head=1")
    code, out, err = cli("convert", "to-hf", tmp_path / "run", tmp_path / "exported")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    model = ours(tmp_path / "run")
    ids = torch.randint(0, 50304, (2, 16))
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
                          (["sideways", tmp_path, tmp_path], "usage: python convert.py")):
        code, out, err = cli("convert", *args)
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
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "ours")[0] == 0
    assert (tmp_path / "ours" / "tokenizer.json").exists()
    code, out, err = cli("sample", f"--out_dir={tmp_path / 'ours'}", "--start=The king", "--num_samples=1",
                         "--max_new_tokens=5", "--temperature=0")
    prompt = tok.decode(tok.encode("The king").ids)       # the checkpoint's tokenizer, not GPT-2's
    assert code == 0 and out.startswith(prompt) and len(out.split("---")[0]) > len(prompt), err
    code, out, err = cli("analyze", tmp_path / "ours", "--text=The king is dead, long live the king")
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith(("token ", "T "))]
    assert len(table) == 2 and "layer 1" in table[0] and "router.png" in out and "tokens.png" in out, out
    code, out, err = cli("analyze", tmp_path / "ours")
    assert code == 1 and "give the text to route with --text" in err


def stream_corpus(path, megabytes):
    """A generated corpus: Shakespeare's text repeated with a counter, `megabytes` MB."""
    base = open(os.path.join(REPO, "data", "shakespeare", "input.txt")).read()
    with open(path, "w") as fh:
        for i in range(int(megabytes * 1e6 / len(base)) + 1):
            fh.write(f"Part {i}.\n" + base)


PEAK_RSS = """
import resource, sys
sys.argv = ["data.py", *sys.argv[1:]]
import runpy
try:
    runpy.run_path("data.py", run_name="__main__")
except SystemExit:
    pass
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_prepare_streams_equals_a_one_shot_encoding_with_flat_memory_and_is_atomic(tmp_path):
    from data import gpt2_encoding, load_split, prepare
    names = [f"stream-test-{os.getpid()}-{i}" for i in range(3)]
    try:
        stream_corpus(tmp_path / "small.txt", 2)
        stream_corpus(tmp_path / "large.txt", 10)
        peaks = []
        for name, src in zip(names, ("small.txt", "large.txt")):
            res = subprocess.run([sys.executable, "-c", PEAK_RSS, "prepare", str(tmp_path / src), name, "--workers=2"],
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0 and "peak" in res.stdout, res.stderr[-2000:]
            peaks.append([int(v) for v in res.stdout.split("peak")[1].split()])
        text = open(tmp_path / "small.txt").read()
        folder = prepare(names[0])
        stream = np.concatenate([load_split(folder, "train"), load_split(folder, "val")])
        assert stream[-1] == 50256 and np.array_equal(stream[:-1], np.array(gpt2_encoding().encode_ordinary(text)))
        (main_small, worker_small), (main_large, worker_large) = peaks   # KiB: 5x the corpus, the same memory
        assert main_large - main_small < 30_000 and worker_large - worker_small < 30_000, peaks
        # kill -9 in the middle: nothing that loads is left behind
        proc = subprocess.Popen([sys.executable, "data.py", "prepare", str(tmp_path / "large.txt"), names[2],
                                 "--workers=2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
        proc.stderr.read(20)                                # it has started writing progress
        proc.kill()
        proc.wait()
        code, _, err = cli("train", *TINY, f"--dataset={names[2]}", f"--out_dir={tmp_path / 'run'}")
        assert code == 1 and "no prepared bins" in err and not (tmp_path / "run").exists()
    finally:
        import shutil
        for name in names:
            shutil.rmtree(os.path.join(REPO, "data", name), ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# expert parallelism (gloo on CPU): the same function as the single-process model

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EP_CASES = [("softmax", "random"), ("ermoe", "random"), ("softmax", "empty_rank"), ("softmax", "one_expert_takes_all")]


def ep_worker(rank, world, layouts, port):
    """One process: its slice of a global batch through an expert-parallel model (for each N in
    layouts), against the whole model on the whole batch."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from parallel import ExpertParallel
    layouts = {n: ExpertParallel(n) for n in layouts}  # every process creates the same groups, in order
    try:
        for (n, ep), (router, case) in itertools.product(layouts.items(), EP_CASES):
            torch.manual_seed(0)
            cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=8,
                            top_k=1 if case == "one_expert_takes_all" else 2, router=router, n_shared=1)
            full = GPT(cfg)
            if case != "random":  # zero router: all logits tie, so every token takes experts 0 (and 1), which
                for b in full.blocks:  # live on the group's first rank: the others get no pair at all
                    with torch.no_grad():
                        b.mlp.router.weight.zero_()
            ids = torch.randint(0, 64, (2 * world, 16), generator=torch.Generator().manual_seed(1))
            coefs = dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)

            def loss_of(model, x, group):
                logits, ce, routes = model(x, x)
                aux, _ = aux_losses(routes, **coefs, balance_group=group)
                return logits, ce + aux, routes
            ref_logits, ref_loss, _ = loss_of(full, ids, None)     # the single-process model, whole batch
            ref_loss.backward()
            part = GPT(cfg)
            part.load_state_dict(full.state_dict())
            ep.shard(part)
            mine = ids[2 * rank:2 * rank + 2]                       # this process's share of the batch
            logits, loss, routes = loss_of(part, mine, dist.group.WORLD)
            loss.backward()
            ep.sync_grads(part)
            if case != "random":
                counts = routes[0].counts.clone()
                dist.all_reduce(counts)
                assert counts[2:].sum() == 0 and (case == "empty_rank" or counts[1:].sum() == 0), counts
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            assert torch.allclose(mean / world, ref_loss, rtol=1e-5, atol=1e-6), (router, case, mean / world, ref_loss)
            assert torch.allclose(logits, ref_logits[2 * rank:2 * rank + 2], atol=1e-5), (router, case)
            grads = dict(full.named_parameters())
            lo, hi = ep.local(8)
            for name, p in part.named_parameters():
                want = grads[name].grad
                if name.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down"):
                    want = want[lo:hi]
                assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6), (router, case, name)
            state, _ = ep.full_state(part, torch.optim.AdamW(part.parameters()))
            assert all(torch.equal(state[k], v) for k, v in full.state_dict().items())  # checkpoints: whole model
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, layouts", [(2, (2,)), (4, (2, 4))])  # 4 processes: N=2 (2 EP x 2 DP) and N=4
def test_expert_parallel_equals_the_single_process_model(world, layouts):
    torch.multiprocessing.spawn(ep_worker, args=(world, layouts, free_port()), nprocs=world)


def test_expert_parallel_training_reproduces_one_process_and_resumes_across_layouts(tmp_path):
    launch = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    common = ["--dataset=synthetic", "--vocab_size=64", "--n_experts=4", "--eval_interval=2", "--log_interval=1"]
    train(tmp_path / "one", *common, "--max_iters=6", "--batch_size=8")   # one process, the global batch
    want = train_losses(tmp_path / "one")
    for step, layout in ((2, "--expert_parallel=2"), (4, "--expert_parallel=1"), (6, "--expert_parallel=2")):
        resume = ["--init_from=resume"] if step > 2 else [*TINY, *common, "--batch_size=4"]
        cmd = [*launch, "train.py", f"--out_dir={tmp_path / 'ep'}", *resume, f"--max_iters={step}", layout]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "ranks hold identical weights: True" in res.stdout
    got = train_losses(tmp_path / "ep")
    assert sorted(got) == list(range(1, 7))
    assert all(math.isclose(got[i], want[i], rel_tol=1e-5) for i in want), (got, want)
