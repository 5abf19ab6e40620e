"""A run's numbers: the validation loss, `metrics.jsonl` rows as they are written, and the loss plot.

Two kinds of rows, one JSON object per line:
    {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec"[, "skipped_steps"]}
        a training row every `log_every` steps; `loss` is the mean over the steps since the last row
    {"step", "epoch", "val_loss", "val_ppl"}
        an evaluation: the mean loss over all validation examples, and its exponential
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .ddp import Ranks, all_reduce_sum


def perplexity(loss: float) -> float:
    """exp(loss), the perplexity of a mean next-token cross-entropy (inf where exp overflows)."""
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batches,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    ranks: Ranks = Ranks(),
) -> float:
    """The mean of `loss_fn` per example over all `batches` (all ranks' shards together), in eval mode.

    Each batch's mean is weighted by its number of examples and summed in float64, so the result is
    the mean over every example, however the examples fall into batches and ranks. For blocks of one
    length with every token scored, that is the mean over all scored tokens: transformers' Trainer
    `eval_loss` on the same blocks. NaN when there are no examples.
    """
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # (loss x examples, examples)
    for batch in batches:
        if len(batch):
            with autocast or contextlib.nullcontext():
                loss = loss_fn(model, batch.to(device, non_blocking=True))
            sums[0] += loss.double() * len(batch)
            sums[1] += len(batch)
    all_reduce_sum(sums, ranks)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as written, so a killed run keeps its rows.

    `rows` holds every row of the file, as dicts, for the model card.
    """

    def __init__(self, path: Path, keep_rows: int | None = None) -> None:
        """Open for appending; `keep_rows` (a resume) first cuts the file back to that many rows, the
        rows written before the checkpoint; None starts an empty file."""
        self.path = path
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if keep_rows and path.exists() else []
        lines = lines[: keep_rows or 0]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, path)
        self.rows: list[dict[str, Any]] = [json.loads(line) for line in lines]
        self._file = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.rows.append(row)

    def close(self) -> None:
        self._file.close()


def plot_metrics(metrics: Path, png: Path) -> bool:
    """Draw train and validation loss against step into `png`; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png)  # a reader never sees half a picture
    return True
