"""
What a run reports besides log.jsonl, in this order: run tracking (Tracker): with --wandb_log=True every
record train.py logs (each loss term unscaled and scaled, the learning rate, every evaluation with each
layer's routing metrics) also goes to Weights & Biases, as nanoGPT's `wandb_log` does; wandb is imported
only then, and is not a dependency otherwise (pip install wandb); offline (no network, or
WANDB_MODE=offline) it writes its files under ./wandb, or $WANDB_DIR, for `wandb sync` later. Then the
lines train.py prints at each evaluation (print_eval), and the samples and plots at the end
(samples_and_plots).
"""

import torch

from support.data import load_tokenizer
from support.rundir import UserError


def flatten(record):
    """A log record as flat {name: number}: layer l's metric m becomes 'layer{l}/m' (lists left out)."""
    out = {}
    for key, value in record.items():
        if key == "layers":
            for i, m in enumerate(value):
                out.update({f"layer{i}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        elif key == "whole":
            out.update({f"whole/{k}": v for k, v in flatten(value).items()})
        elif key == "params":
            out.update({f"params/{k}": v for k, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


class Tracker:
    """Sends log records to wandb (only on the first process, only if asked)."""

    def __init__(self, cfg, config, active):
        self.run = None
        if not (active and cfg.wandb_log):
            return
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True needs the wandb package (pip install wandb)") from None
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=config,
                              dir=None, resume="allow")

    def log(self, record):
        if self.run is not None:
            self.run.log(flatten(record), step=record["iter"])

    def finish(self):
        if self.run is not None:
            self.run.finish()


def print_eval(record):
    """An evaluation record as train.py prints it: the losses, each layer's routing, the whole val split."""
    print(f"eval {record['iter']}: train {record['train_loss']:.4f}, val {record['val_loss']:.4f}")
    for i, m in enumerate(record["layers"]):
        extra = f" source NMI {m['source_nmi']:.3f}" if "source_nmi" in m else ""
        print(f"  moe layer {i}: load cv {m['cv']:.3f} max/mean {m['max_mean']:.2f} dead {m['dead']} "
              f"entropy {m['entropy_norm']:.3f} top-k mass {m['topk_mass']:.3f}{extra}")
    if "whole" in record:
        w = record["whole"]
        bits = f"; {w['bits']:,.0f} bits of the table stored" if "bits" in w else ""
        print(f"whole val split: {w['val_loss']:.4f} ± {w['se']:.4f} (standard error, {w['targets']:,} targets){bits}")


def samples_and_plots(model, cfg, device, tokenizer):
    """Samples and plots at the end (the checkpoint is already safe on disk)."""
    from support.plots import plot_run  # matplotlib: loaded only at the end
    if tokenizer is not None and cfg.num_samples > 0:  # a synthetic task's tokens are not text
        enc = load_tokenizer(tokenizer)
        start = torch.tensor([enc.encode_ordinary("\n")], device=device)
        for _ in range(cfg.num_samples):
            out = model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=200, n_vocab=enc.n_vocab)
            print("---------------\n" + enc.decode(out[0].tolist()))
    for path in plot_run(cfg.out_dir):
        print(f"wrote {path}")
