"""
Run tracking beside log.jsonl: with --wandb_log=True every record train.py logs (each loss term
unscaled and scaled, the learning rate, every evaluation with each layer's routing metrics) also
goes to Weights & Biases, as nanoGPT's `wandb_log` does. wandb is imported only then, and is not a
dependency otherwise (pip install wandb). Offline (no network, or WANDB_MODE=offline) it writes its
files under ./wandb, or $WANDB_DIR, for `wandb sync` later.
"""

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
