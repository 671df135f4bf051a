"""
The support modules a run uses, off the core's reading path, each against a reference: the metrics
against the values docs/design.md §5 derives by hand (uniform routing, collapse) and hand-made routes;
the tokenizer against tiktoken's GPT-2 encoding; the whole-split evaluation, the synthetic tasks and the
batches of several processes against their definitions, counted target by target.
"""

import math

import pytest
import torch

from support.data import gpt2_encoding
from support.metrics import RoutingStats, load_stats, max_violation, nmi


# ------------------------------------------------------------------------------------------------
# support/metrics.py (off the reading path): the reference values of docs/design.md §5

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
                              uniform.sum(0), uniform.log(), acts=z))
    stats = RoutingStats()
    stats.update(routes)
    m = stats.summary()
    assert math.isclose(m[0]["entropy_norm"], 1.0, rel_tol=1e-6) and math.isclose(m[0]["topk_mass"], k / E)
    assert m[0]["cv"] == 0.0 and m[0]["coact_cos2"] == 0.0
    want = torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.equal(stats.transitions()[0], want)
    assert math.isclose(m[0]["next_cond_entropy"], 0.0, abs_tol=1e-12)  # next layer is determined
    assert math.isclose(m[0]["next_nmi"], 2 * math.log(2) / (math.log(4) + math.log(2)), rel_tol=1e-5)


def test_max_violation_by_hand_batch_and_global():
    """Wang et al.'s MaxVio = (max load - mean load) / mean load, worked by hand: batch 1 loads (6, 2, 2, 2)
    -> mean 3, (6 - 3) / 3 = 1; batch 2 loads (2, 2, 2, 6) -> 1 as well; both batches together (8, 4, 4, 8)
    -> mean 6, (8 - 6) / 6 = 1/3: balanced over the split while every batch is not."""
    from router import Routing
    assert max_violation(torch.tensor([6, 2, 2, 2])) == 1.0
    assert max_violation(torch.full((8,), 5)) == 0.0 and max_violation(torch.tensor([12, 0, 0, 0])) == 3.0  # E - 1
    stats = RoutingStats()
    for idx in (torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3]]),
                torch.tensor([[3, 1], [3, 2], [3, 0], [3, 1], [3, 2], [3, 0]])):
        counts = torch.bincount(idx.reshape(-1), minlength=4).to(torch.int32)
        p = torch.full((6, 4), 0.25)
        stats.update([Routing(torch.full((6, 2), 0.5), idx, counts, torch.zeros(6), torch.full((6,), 0.5), p.sum(0),
                              p.log(), acts=torch.eye(2, 3).expand(6, 2, 3))])
    m = stats.summary()[0]
    assert m["maxvio_batch"] == 1.0 and math.isclose(m["maxvio_global"], 1 / 3, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------
# support/data.py, support/tasks.py (off the reading path): the tokenizers, the whole-split evaluation,
# the synthetic tasks, the batches of several processes

def test_tokenizer_matches_gpt2():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("hello world") == [31373, 995]
    assert enc.n_vocab == 50257


def test_synthetic_mixture_follows_its_definition():
    from support.tasks import SyntheticMixture
    mix = SyntheticMixture(vocab=64, n_sources=3, seg_len=16, branching=3, seed=0)
    x, y, labels = mix.sample(256, 64, torch.Generator().manual_seed(0), "cpu")
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


def test_the_whole_split_scores_every_target_exactly_once():
    from support.data import TextData
    data = TextData("shakespeare_char", verbose=False)
    val = data.splits["val"].astype("int64")
    for S in (64, 100):
        count, total = 0, 0
        for x, y, _ in data.whole_split("val", 256, S, "cpu"):
            scored = y != -100
            assert torch.equal(x[:, 1:][scored[:, :-1]], y[:, :-1][scored[:, :-1]])  # y is x shifted by one
            count += int(scored.sum())
            total += int(y[scored].sum())
        assert count == len(val) - 1 and total == int(val[1:].sum()), S


def test_facts_task_holds_its_table_and_scores_every_fact_once():
    from support.tasks import Facts
    task = Facts(n_people=50, n_attrs=3, n_values=8, names=(10, 10))
    assert task.bits == 50 * 3 * 3 and task.vocab_size == 10 + 10 + 3 + 3 * 8
    seen = set()
    for x, y, labels in task.whole_split("val", 16, 7, "cpu"):
        assert x.shape[1] == task.length - 1 == 7
        assert torch.equal(labels, (y != -100).long()) and int(labels.sum()) == 3 * len(x)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            person = next(i for i in range(50) if task.names[i].tolist() == row_x[:2])
            for pos in range(2, 7, 2):                                  # attribute token -> its value
                a = row_x[pos] - task.attr0
                assert row_y[pos] == task.value0 + a * 8 + int(task.values[person, a])
                seen.add((person, a))
    assert len(seen) == 150                                              # every fact once
    assert task.bits_stored(math.log(8)) == 0.0 and task.bits_stored(0.0) == task.bits


@pytest.mark.parametrize("name", ["shakespeare_char", "synthetic", "facts", "facts_binary"])
def test_processes_together_draw_the_single_process_batch(name):
    """With W processes each rank takes its slice of one global batch: together they see exactly the
    batch one process with batch W*B draws (what makes DDP and expert parallelism equal to it)."""
    from support.data import open_dataset
    data = open_dataset(name, 256, verbose=False)
    S = 13 if name.startswith("facts") else 16
    whole = data.batch("train", 8, S, torch.Generator().manual_seed(3), "cpu")
    parts = [data.batch("train", 4, S, torch.Generator().manual_seed(3), "cpu", rank, 2) for rank in (0, 1)]
    for i, t in enumerate(whole):
        if t is not None:
            assert torch.equal(torch.cat([p[i] for p in parts]), t), (name, i)
