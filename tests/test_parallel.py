"""
Data and expert parallelism (gloo on CPU): torchrun as the README writes it, and expert parallelism
equal to the single-process model in the loss, the outputs and every gradient. The references: the
single-process model on the whole batch, a one-process run's losses, and every rank's weight hash.
"""

import gc
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

# first: tests.helpers sets TRITON_INTERPRET before triton loads
from tests.helpers import REPO, TINY, cli, train, train_losses, train_subprocess
from losses import aux_losses
from support import launch  # before any process group, as train.py: see launch's imports
from model import GPT, GPTConfig

def test_ddp_command_as_written_then_resume_with_another_world_size(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    res = train_subprocess(tmp_path, "--max_iters=2", "--eval_interval=2", launcher=launcher)  # no accumulation flag
    assert res.returncode == 0, res.stderr[-3000:]
    from support.rundir import read_log
    hashes = [r for r in read_log(tmp_path / "log.jsonl") if "param_hashes" in r][-1]["param_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    code, out, err = cli("train", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=3")  # one process now
    assert code == 0 and "resumed from" in out and sorted(train_losses(tmp_path)) == [1, 2, 3], err


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EP_CASES = [("softmax", "random"), ("ermoe", "random"), ("softmax", "empty_rank"), ("softmax", "one_expert_takes_all")]


def ep_worker(rank, world, layouts, port):
    """One process of the group: the cases, then no gloo thread left behind."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ep_cases(rank, world, layouts)
    finally:
        dist.destroy_process_group()
    gc.collect()  # the groups' last references go here: gloo's threads joined now, not at interpreter exit
    assert gloo_threads() == [], gloo_threads()  # one left running aborts the process as it exits


def ep_cases(rank, world, layouts):
    """This process's slice of a global batch through an expert-parallel model (for each N in
    layouts), against the whole model on the whole batch."""
    import torch.distributed as dist
    from support.parallel import ExpertParallel, pooled_balance
    layouts = {n: ExpertParallel(n) for n in layouts}  # every process creates the same groups, in order
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
            aux, _ = aux_losses(routes, coefs, pool=group and pooled_balance(group))
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


@pytest.mark.parametrize("world, layouts", [(2, (2,)), (4, (2, 4))])  # 4 processes: N=2 (2 EP x 2 DP) and N=4
def test_expert_parallel_equals_the_single_process_model(world, layouts):
    torch.multiprocessing.spawn(ep_worker, args=(world, layouts, free_port()), nprocs=world)


def gloo_threads():
    return [name for name in (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
            if "gloo" in name]


def end_worker(rank, port):
    """DDP as train.py builds it (the launch module imported first), then launch.end: no gloo thread
    may outlive it; one left running can abort the process during interpreter shutdown."""
    from types import SimpleNamespace
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = DDP(torch.nn.Linear(4, 4))
    model(torch.ones(2, 4)).sum().backward()
    del model
    assert gloo_threads(), "the check would see gloo's threads"
    launch.end(SimpleNamespace(ddp=True))
    assert gloo_threads() == [], gloo_threads()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads are listed from /proc (Linux)")
def test_the_process_group_and_its_threads_are_gone_after_the_run():
    torch.multiprocessing.spawn(end_worker, args=(free_port(),), nprocs=2)


def test_expert_parallel_training_reproduces_one_process_and_resumes_across_layouts(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    common = ["--dataset=synthetic", "--vocab_size=64", "--n_experts=4", "--eval_interval=2", "--log_interval=1"]
    train(tmp_path / "one", *common, "--max_iters=6", "--batch_size=8")   # one process, the global batch
    want = train_losses(tmp_path / "one")
    for step, layout in ((2, "--expert_parallel=2"), (4, "--expert_parallel=1"), (6, "--expert_parallel=2")):
        resume = ["--init_from=resume"] if step > 2 else [*TINY, *common, "--batch_size=4"]
        cmd = [*torchrun, "train.py", f"--out_dir={tmp_path / 'ep'}", *resume, f"--max_iters={step}", layout]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "ranks hold identical weights: True" in res.stdout
    got = train_losses(tmp_path / "ep")
    assert sorted(got) == list(range(1, 7))
    assert all(math.isclose(got[i], want[i], rel_tol=1e-5) for i in want), (got, want)
