"""
ERMoE on text, the guard against its collapse (docs/design.md §2): a short run of character-level
Shakespeare at a small shape (2 layers, d = 64, 8 experts, 150 steps, seconds) with ERMoE's default
settings keeps every expert of every layer alive; its earlier form (experts reading r = d/E coordinates,
no select bias) loses experts in the same run, so the guard is one that can fail: that earlier form is the
reference. Alive = at least 0.1/E of the (token, expert) pairs of 4 fixed validation batches (support/metrics.py's
`dead`).
"""

import os

import torch

SHAPE = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--batch_size=8",
         "--max_iters=150", "--num_samples=0"]


def dead_experts_after_training(*args, seed=0):
    """train.py's own step and settings (config/ermoe.py, then args), in this process -> dead experts per layer."""
    import train
    from support import launch
    from support.data import open_dataset
    from support.metrics import RoutingStats
    from tests.helpers import REPO
    settings, _ = train.setup([os.path.join(REPO, "config", "ermoe.py"), *SHAPE, *args])
    cfg, model_cfg = settings.build(train.TrainConfig, train.FamilyConfig)
    data = open_dataset(cfg.dataset, model_cfg.vocab_size, False)
    torch.manual_seed(seed)
    model = train.make_model(cfg, model_cfg)
    optimizer, env = train.make_optimizer(model, cfg), launch.Processes("cpu", "float32")
    gen = torch.Generator().manual_seed(seed)
    for it in range(cfg.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = train.get_lr(it, cfg)
        train.train_step(model, optimizer, lambda: data.batch("train", cfg.batch_size, model_cfg.block_size,
                                                             gen, "cpu"), cfg, env)
    stats, val = RoutingStats(), torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(4):
            X, Y, _ = data.batch("val", 16, model_cfg.block_size, val, "cpu")
            stats.update(model(X, Y)[2])
    return [m["dead"] for m in stats.summary()]


def test_ermoe_keeps_every_expert_alive_on_text_and_its_earlier_form_did_not():
    for seed in (0, 1):
        assert dead_experts_after_training(seed=seed) == [0, 0], seed
    assert sum(dead_experts_after_training("--ermoe_input=coords", "--ermoe_rank=8", "--select_bias=False")) > 0
