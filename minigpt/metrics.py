"""A run's numbers: the validation loss, `metrics.jsonl` rows as they are written, and the loss plot.

Two kinds of rows, one JSON object per line:
    {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec"[, "skipped_steps"]}
        a training row every `log_every` steps; `loss` is the mean over the steps since the last row
    {"step", "epoch", "val_loss", "val_ppl"}
        an evaluation: the mean loss over all validation examples, and its exponential
Every row is strict JSON: a number that is not finite (an fp16 step skipped for an infinite gradient
norm, a perplexity that overflows) is written as null, never as `NaN` / `Infinity`.

`StepNumbers` keeps each step's loss and gradient norm on the device and reads them back in one go,
so that the training loop waits for the GPU only when it logs, not in every step; under DDP that
read also sums the ranks' tokens, which differ on a last batch that does not split evenly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn as nn

from .ddp import Ranks, all_reduce_sum
from .errors import MinigptError, count, reason
from .files import atomic_file, clear_interrupted_saves


def perplexity(loss: float) -> float:
    """exp(loss), the perplexity of a mean next-token cross-entropy (inf where exp overflows; NaN for NaN)."""
    if math.isnan(loss):  # (no examples: no perplexity either, not an infinite one)
        return math.nan
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    ranks: Ranks = Ranks(),
) -> float:
    """The mean of `loss_fn` per example over all `batches` (all ranks' shards together), in eval mode.

    Each batch's mean is weighted by its number of examples and summed in float64, so the result is
    the mean over every example, however the examples fall into batches and ranks. For blocks of one
    length with every token scored, that is the mean over all scored tokens: the `eval_loss` of
    transformers' Trainer when the published recipe ran (README, "Checking a model", says how later
    releases differ). NaN when there are no examples. The model is left in the mode it came in (a loop of one's
    own that evaluates mid-training goes on training with its dropout).
    """
    training = model.training
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # (loss x examples, examples)
    try:
        for batch in batches:
            if len(batch):
                with autocast or contextlib.nullcontext():
                    loss = loss_fn(model, batch.to(device, non_blocking=True))
                sums[0] += loss.double() * len(batch)
                sums[1] += len(batch)
    finally:
        model.train(training)
    all_reduce_sum(sums, ranks)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


class StepReadout(NamedTuple):
    """What `StepNumbers.read()` brings back: Python numbers, the ranks' summed where they differ."""

    losses: list[float]  # each step's loss, summed over the ranks (each rank's is its weighted share)
    grad_norms: list[float]  # each step's gradient norm (the same on every rank)
    tokens: int  # the steps' tokens, all ranks together
    seconds: float  # the time the steps took (this rank's)


class StepNumbers:
    """The loss and gradient norm of each step since the last `read()`, its tokens, and the time the steps took.

    Reading a number from a GPU (`.item()`) waits until every kernel queued before it has run, so
    a loop that reads its loss every step never lets the GPU run ahead. Here each step's numbers
    stay device tensors until `read()`, which fetches them all with one transfer (and, under DDP,
    sums the ranks' losses with one all-reduce). The steps are timed with CUDA events on a GPU (the
    GPU's own clock, read back with the numbers) and with the host's clock on a CPU, where every
    kernel has finished when the call that runs it returns.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.tokens = 0
        self.seconds = 0.0
        self._started: Any = None

    def start(self) -> None:
        """Call when a step begins."""
        if self.device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record(torch.cuda.current_stream(self.device))  # (the device's: it may not be the current one)
        else:
            self._started = time.perf_counter()

    def stop(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int) -> None:
        """Call when the step has been issued: its (this rank's) loss and its gradient norm, 0-dim
        tensors, and the tokens this rank trained on in it."""
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self.events.append((self._started, end))
        else:
            self.seconds += time.perf_counter() - self._started
        self.losses.append(loss.detach().float().reshape(()))
        self.grad_norms.append(grad_norm.detach().float().reshape(()))
        self.tokens += tokens

    def __len__(self) -> int:
        return len(self.losses)

    def read(self, ranks: Ranks = Ranks()) -> StepReadout:
        """The numbers since the last read (see `StepReadout`); then starts afresh. Every rank must
        call it at the same step."""
        if not self.losses:
            return StepReadout([], [], 0, 0.0)
        n = len(self.losses)
        # (the tokens ride in the losses' one all-reduce, as fp32: exact up to 2**24 tokens a read)
        own = self.losses[0].new_full((1,), float(self.tokens))  # (a fill beside the losses, not a host copy)
        summed = all_reduce_sum(torch.cat([torch.stack(self.losses), own]), ranks)
        numbers = torch.cat([summed, torch.stack(self.grad_norms)]).tolist()  # the one wait for the device
        if self.device.type == "cuda":
            self.events[-1][1].synchronize()
            self.seconds = sum(start.elapsed_time(end) for start, end in self.events) / 1000
        readout = StepReadout(numbers[:n], numbers[n + 1 :], round(numbers[n]), self.seconds)
        self.losses, self.grad_norms, self.events, self.tokens, self.seconds = [], [], [], 0, 0.0
        return readout


def strict_json(row: dict[str, Any]) -> str:
    """`row` as one line of strict JSON: floats that are not finite become null (JSON has no NaN or
    Infinity); anything else json cannot write is an error, not a silently broken file."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def _row(path: Path, number: int, line: bytes) -> dict[str, Any]:
    """Line `number` of a metrics file, a JSON object with an integer "step"; a damaged one is a
    one-line MinigptError (the card and the curve read every row's step)."""
    try:
        row = json.loads(line.decode("utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError as e:
        raise MinigptError(f"{path}: line {number} is not UTF-8 text ({e.reason}); the file is left as it is") from None
    except ValueError as e:  # (json.JSONDecodeError, or _not_json's)
        raise MinigptError(f"{path}: line {number} is not JSON ({getattr(e, 'msg', e)}); the file is left as it is") from None
    if not isinstance(row, dict) or type(row.get("step")) is not int:
        raise MinigptError(f'{path}: line {number} is not a JSON object with an integer "step"; the file is left as it is')
    return row


def _not_json(constant: str) -> float:
    """json.loads takes NaN, Infinity and -Infinity, which JSON has not (strict_json writes null)."""
    raise ValueError(f"{constant}, which JSON has not")


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as written, so a killed run keeps its rows.

    `rows` holds every row of the file, as dicts, for the model card.
    """

    def __init__(self, path: Path, keep_rows: int | None = None) -> None:
        """Open for appending; `keep_rows` (a resume) first cuts the file back to that many rows, the
        rows written before the checkpoint; None starts an empty file."""
        self.path = path
        lines = path.read_bytes().splitlines(keepends=True)[:keep_rows] if keep_rows and path.exists() else []
        if keep_rows and len(lines) < keep_rows:  # (rows flushed, not yet on disk, when the machine went down)
            warnings.warn(f"{path}: holds {count(len(lines), 'row')} where the checkpoint counts {keep_rows} (lost in a "
                          "crash, or cut by hand?); the run goes on, and the rows missing stay missing", stacklevel=2)
        self.rows: list[dict[str, Any]] = [_row(path, number, line) for number, line in enumerate(lines, 1)]
        clear_interrupted_saves(path)  # (the run's lock makes this the one writer)
        with atomic_file(path) as tmp:  # (a last row whose newline was lost in a crash gets it back)
            tmp.write_bytes(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        """Append `row` (non-finite numbers become null, in the file and in `rows` alike)."""
        line = strict_json(row)
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:  # (a full disk: "writing the output: No space left" named no file)
            raise MinigptError(f"{self.path}: cannot append the metrics row ({e.strerror or reason(e)})") from None
        self.rows.append(json.loads(line))

    def close(self) -> None:
        with contextlib.suppress(OSError):  # (only a row `write` failed to flush is left: it raised already)
            self._file.close()


def plot_metrics(metrics: str | os.PathLike, png: str | os.PathLike) -> bool:
    """Draw train and validation loss against step into `png`; False when matplotlib is missing.

    A bare `Figure` (no pyplot): it draws off-screen without touching the process's matplotlib
    backend (a notebook that trains keeps its own) and skips importing pyplot."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    metrics, png = Path(metrics), Path(png)
    lines = metrics.read_bytes().splitlines()
    rows = [_row(metrics, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.lines:  # (a run stopped before its first row draws an empty frame, without matplotlib's warning)
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    clear_interrupted_saves(png)
    with atomic_file(png) as tmp:  # a reader never sees half a picture
        fig.savefig(tmp, dpi=100, format="png")
    return True
