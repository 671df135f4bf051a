"""
Tests: routing invariants (SPEC section 1), dispatch paths against each other, losses and metrics
against brute force and known values, the ERMoE router's geometry, and train.py end to end
(falling loss, exact resume, clear errors, DDP). Run: python -m pytest test_all.py
"""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from data import gpt2_encoding
from losses import aux_losses, coupling_loss, load_balancing_loss, specialization_loss, z_loss
from metrics import RoutingStats, load_stats, nmi
from model import GPT, MLP, GPTConfig, MoE
from router import EigenRouter, eigenbasis_scores, select_topk

REPO = os.path.dirname(os.path.abspath(__file__))
ROUTERS = ["softmax", "ermoe"]


def moe_block(router="softmax", dispatch="sorted", seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, n_experts=4, top_k=2,
                router=router, dispatch=dispatch)
    args.update(kw)
    return MoE(GPTConfig(**args))


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
    x = torch.randn(2, 16, 32)
    y, r = moe(x)
    T, k, E = 32, 3, 6
    assert r.idx.shape == (T, k) and r.idx.min() >= 0 and r.idx.max() < E
    assert all(len(set(row)) == k for row in r.idx.tolist())
    assert (r.gates >= 0).all() and torch.allclose(r.gates.sum(-1), torch.ones(T))
    assert int(r.counts.sum()) == T * k
    assert r.counts.tolist() == [int((r.idx == e).sum()) for e in range(E)]
    # permuting the tokens permutes the outputs and the routing
    perm = torch.randperm(T)
    y2, r2 = moe(x.view(T, 1, 32)[perm].view(2, 16, 32))
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
    x = torch.randn(3, 16, 32)
    g = torch.randn(3, 16, 32)
    results = []
    for moe in (naive, fast):
        xi = x.clone().requires_grad_(True)
        y, r = moe(xi)
        loss = (y * g).sum() + specialization_loss(r.z) + load_balancing_loss(r.probs, r.idx)
        loss.backward()
        results.append((y, r, xi.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y1, r1, gx1, gp1), (y2, r2, gx2, gp2) = results
    assert torch.equal(r1.idx, r2.idx) and torch.equal(r1.counts, r2.counts)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(r1.z, r2.z, atol=1e-6)
    assert torch.allclose(gx1, gx2, atol=1e-6)
    assert any("router" in n for n in gp1)
    for name in gp1:
        assert gp1[name] is not None and gp1[name].abs().sum() > 0, name
        assert torch.allclose(gp1[name], gp2[name], atol=1e-6), name


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


def train(out_dir, *args, launcher=(sys.executable,), timeout=300):
    cmd = [*launcher, os.path.join(REPO, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return {r["iter"]: r["train_loss"] for r in recs if "train_loss" in r and "val_loss" not in r}


@pytest.mark.parametrize("router", ROUTERS)
def test_resume_continues_exactly(tmp_path, router):
    common = [f"--router={router}", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8", "--warmup_iters=2"]
    full = train(tmp_path / "full", "--max_iters=8", *common)
    assert full.returncode == 0, full.stderr
    half = train(tmp_path / "half", "--max_iters=4", *common)
    assert half.returncode == 0, half.stderr
    resumed = train(tmp_path / "half", "--max_iters=8", "--init_from=resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "half")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[i] == b[i] for i in range(1, 9)), (a, b)
    for name in ("ckpt.pt", "log.jsonl", "loss.png", "expert_load.png"):
        assert (tmp_path / "half" / name).stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown setting 'bogus'"),
    (["--batch_size=abc"], "setting 'batch_size' expects int"),
    (["--top_k=5"], "top_k must be in [1, n_experts=4]"),
    (["--n_embd=30", "--n_head=4"], "must be divisible by n_head"),
    (["--init_from=resume"], "no checkpoint to resume from"),
    (["--dataset=no_such_corpus"], "dataset 'no_such_corpus': no text file"),
    (["config/no_such_file.py"], "config file not found"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    res = train(tmp_path, "--max_iters=2", *args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error:") and message in res.stderr, res.stderr


def test_corrupt_checkpoint_and_nan_loss(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    res = train(tmp_path, "--max_iters=2", "--init_from=resume")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "unreadable" in res.stderr
    ok = train(tmp_path / "nan", "--max_iters=2", "--eval_interval=2")
    assert ok.returncode == 0, ok.stderr
    good = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    bad = train(tmp_path / "nan", "--max_iters=6", "--init_from=resume", "--learning_rate=1e38",
                "--warmup_iters=0", "--eval_interval=100")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr + bad.stdout
    assert "error: loss is" in bad.stdout
    kept = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert kept["iter_num"] == good["iter_num"] == 2
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_ddp_two_cpu_processes_stay_identical(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    res = train(tmp_path, "--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=2",
                launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "log.jsonl") as fh:
        hashes = [json.loads(line) for line in fh if "param_hashes" in line][-1]["param_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
