"""
What the hash comparison (course/demos.py hash, hash-why) measures and varies, each against a hand-made
case with a known answer or a brute-force count: the routing fluctuation, the token-id binding, the
frequency-balanced hash table, the learned token-id table, a router frozen from a given step.
"""

import itertools

import torch

from tests.helpers import train  # first: it sets TRITON_INTERPRET before triton loads
from families import balanced_table
from router import Routing
from support.metrics import RoutingStats, fluctuation, id_binding


def sets(rows):
    return torch.tensor([sorted(r) for r in rows], dtype=torch.int16)


def test_fluctuation_counts_tokens_whose_set_changed_not_reorderings():
    before = sets([(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (0, 7), (3, 5)])
    after = sets([(1, 0), (2, 3), (4, 6), (6, 7), (2, 0), (1, 4), (7, 0), (5, 3)])  # 2 of 8 changed their set
    assert fluctuation(after, before) == 2 / 8
    assert fluctuation(before, before) == 0.0
    assert fluctuation(sets([(0, 1)] * 4), sets([(2, 3)] * 4)) == 1.0


def test_id_binding_is_the_share_of_each_ids_commonest_set_weighted_by_count():
    ids = torch.tensor([7, 7, 7, 7])
    assert id_binding(ids, sets([(0, 1), (0, 1), (1, 0), (2, 5)])) == 0.75          # an id split 3:1 over two sets
    ids = torch.tensor([7, 7, 7, 7, 9, 9])                                           # + an id split 1:1
    assert abs(id_binding(ids, sets([(0, 1), (0, 1), (0, 1), (2, 5), (0, 1), (3, 4)])) - (3 + 1) / 6) < 1e-12
    # brute force on random cases: sum over ids of the largest count of one set, over T
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 5, (60,), generator=g)
        rows = [tuple(sorted(torch.randperm(6, generator=g)[:2].tolist())) for _ in range(60)]
        best = sum(max(sum(1 for i, r in zip(ids.tolist(), rows) if i == v and r == s) for s in set(rows))
                   for v in set(ids.tolist()))
        assert abs(id_binding(ids, sets(rows)) - best / 60) < 1e-12


def routing(idx):
    T, k = idx.shape
    return Routing(torch.full((T, k), 1 / k), idx, torch.zeros(8, dtype=torch.int32), torch.zeros(T), torch.ones(T),
                   torch.zeros(8), torch.zeros(T, 8), acts=torch.randn(T, k, 4))


def test_routing_stats_report_both_over_batches_and_evaluations():
    ids = [torch.tensor([[1, 2, 1, 3]]), torch.tensor([[1, 1, 2, 2]])]
    first = [torch.tensor([[0, 1], [2, 3], [1, 0], [4, 5]]), torch.tensor([[0, 1], [0, 2], [2, 3], [3, 2]])]
    second = [torch.tensor([[1, 0], [2, 3], [1, 0], [4, 6]]), torch.tensor([[0, 1], [0, 1], [2, 3], [3, 2]])]
    stats = RoutingStats()
    for i, idx in zip(ids, first):
        stats.update([routing(idx)], ids=i)
    m = stats.summary()[0]
    assert "fluctuation" not in m                       # no earlier evaluation to compare with
    # id 1: sets {01, 01, 01, 02} -> 3; id 2: {23, 23, 23} -> 3; id 3: {45} -> 1; T = 8
    assert abs(m["id_binding"] - 7 / 8) < 1e-12
    again = RoutingStats()
    for i, idx in zip(ids, second):
        again.update([routing(idx)], ids=i)
    assert abs(again.summary(stats.sets())[0]["fluctuation"] - 2 / 8) < 1e-12


def test_balanced_table_greedy_gives_each_id_k_experts_and_evens_the_load():
    counts = torch.tensor([50, 30, 30, 20, 10, 10, 5, 5, 0, 1])
    table = balanced_table(counts, n_experts=4, k=2)
    assert table.shape == (10, 2) and all(len(set(r)) == 2 for r in table.tolist())
    load = torch.zeros(4, dtype=torch.long).index_add_(0, table.reshape(-1), counts.repeat_interleave(2))
    # the most frequent id first, to the experts with the least load so far: by hand, 50 -> (0, 1); 30 -> (2, 3);
    # 30 -> (2, 3); 20 -> (0, 1); 10 -> (0, 1); 10 -> (2, 3); ...
    assert table[:3].tolist() == [[0, 1], [2, 3], [2, 3]]
    assert load.max() - load.min() <= counts.max()    # the greedy bound
    best = min(max(torch.zeros(4, dtype=torch.long).index_add_(0, torch.tensor(list(pairs)).reshape(-1),
                                                              counts[:4].repeat_interleave(2)).tolist())
               for pairs in itertools.product(itertools.combinations(range(4), 2), repeat=4))
    small = balanced_table(counts[:4], 4, 2)
    assert max(torch.zeros(4, dtype=torch.long).index_add_(0, small.reshape(-1),
                                                           counts[:4].repeat_interleave(2))) == best


def test_a_frozen_router_keeps_its_weights_and_the_rest_learns(tmp_path):
    import os
    from support.rundir import load_checkpoint
    train(tmp_path / "a", "--max_iters=4", "--eval_interval=4", "--router_frozen_from=2")
    train(tmp_path / "b", "--max_iters=2", "--eval_interval=2")
    train(tmp_path / "c", "--max_iters=4", "--eval_interval=4")
    a, b, c = (load_checkpoint(str(tmp_path / n))["model"] for n in "abc")
    router = [k for k in a if "router" in k]
    assert router and all(torch.equal(a[k], b[k]) for k in router)          # still the weights of step 2
    assert all(not torch.equal(a[k], c[k]) for k in router)                 # which learning would have moved
    assert not torch.equal(a["blocks.0.attn.c_attn.weight"], b["blocks.0.attn.c_attn.weight"])
    assert os.path.exists(tmp_path / "a" / "ckpt.pt")


def test_hash_balanced_runs_with_the_balanced_table_of_the_train_splits_counts(tmp_path):
    """train.py's hash_balanced: every hash layer's table is balanced_table of the train split's token counts,
    in the checkpoint; a resumed run keeps it."""
    from support.data import open_dataset
    from support.rundir import load_checkpoint
    train(tmp_path / "h", "--max_iters=2", "--eval_interval=2", "--router=hash", "--hash_balanced=True")
    counts = open_dataset("shakespeare_char", 65, False).token_counts()
    want = balanced_table(counts, 4, 2)                                  # TINY: 4 experts, top-2
    tables = [v for k, v in load_checkpoint(str(tmp_path / "h"))["model"].items() if k.endswith("router.table")]
    assert len(tables) == 2 and all(torch.equal(t, want) for t in tables)
    train(tmp_path / "h", "--init_from=resume", "--max_iters=3")
    tables = [v for k, v in load_checkpoint(str(tmp_path / "h"))["model"].items() if k.endswith("router.table")]
    assert all(torch.equal(t, want) for t in tables)


def test_the_token_table_router_routes_by_the_id_alone_and_learns(tmp_path):
    train(tmp_path / "t", "--max_iters=3", "--eval_interval=3", "--router=token_table")
    from support.rundir import read_log
    final = [r for r in read_log(str(tmp_path / "t" / "log.jsonl")) if r.get("final")][-1]
    assert all(m["id_binding"] == 1.0 and m["fluctuation"] >= 0 for m in final["layers"])
