"""Where training numbers go: a JSON-lines file (one record per log step), TensorBoard, and a loss-curve PNG.

Only the main process writes. The full history also lives in the checkpoint's trainer state, so a resumed run
rewrites the JSONL file from it (dropping records the interrupted run logged after its last checkpoint) and the
plot covers the whole run.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


class MetricsLogger:
    """Append metric records to ``metrics.jsonl`` and TensorBoard; keep them in `history` for checkpoints/plots."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, tensorboard: bool = True, jsonl: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.history: list[dict] = []
        self.jsonl_path = self.log_dir / "metrics.jsonl" if jsonl else None
        self.tensorboard_dir = self.log_dir / "tensorboard" if tensorboard else None
        self._writer = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.jsonl_path is not None:
            self.jsonl_path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time; say so once and carry on
                warnings.warn("logging.tensorboard=true but the tensorboard package is not installed; skipping it")
                self.tensorboard_dir = None
            else:
                self._writer = SummaryWriter(str(self.tensorboard_dir))

    def restore(self, history: list[dict]) -> None:
        """Continue after a resume: the history up to the checkpoint, rewritten to the JSONL file."""
        self.history = [dict(record) for record in history]
        if self.enabled and self.jsonl_path is not None:
            with open(self.jsonl_path, "w") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in self.history)

    def log(self, record: dict) -> None:
        """`record` holds "step" plus numbers (keys like "train/loss", "eval/perplexity")."""
        self.history.append(dict(record))
        if not self.enabled:
            return
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_losses(history: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """Training loss (and held-out loss where evaluated) against the optimizer step, saved as a PNG."""
    train = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r]
    heldout = [(r["step"], r["eval/loss"]) for r in history if "eval/loss" in r]
    if not train and not heldout:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    if train:
        axes.plot(*zip(*train), label="train loss")
    if heldout:
        axes.plot(*zip(*heldout), marker="o", label="held-out loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
