"""The training loop: batches in, a trained model and its checkpoints out.

Nothing here knows about GPT-2. A `Trainer` is given
    a model (an nn.Module) and `loss_fn(model, batch) -> mean loss over the batch's examples`,
    batch iterators (`Batches`, as `minigpt.data.BatchIterator` is),
    an optimizer (`minigpt.optim.AdamW`) and a schedule (step -> learning-rate multiplier),
    a `TrainConfig`, an output folder and `save_model(folder)` that writes the model's files there.

One optimizer step:

    for each of grad_accum micro-batches:          # (all but the last without a DDP all-reduce)
        loss = loss_fn(model, batch) * weight     # weight: this micro-batch's share of the step
        loss.backward()                           # gradients add up across micro-batches
    clip the gradients' global norm to max_grad_norm
    lr = base_lr * schedule(step); optimizer.step(); zero the gradients

A micro-batch's weight is its number of examples over the step's total (all ranks together), so a
step's gradient is that of the mean loss over all its examples, however they are split into
micro-batches and ranks; a short last batch of an epoch counts each example once, as in one batch.

A step reads nothing back from the device (`minigpt.metrics.StepNumbers`): the next logging step, evaluation
or save reads the steps' numbers at once, so the host queues steps while the GPU computes. A non-finite loss
or gradient norm thus stops the run at that read, naming the first bad step; the steps since ran on broken
weights, but every save reads first, so the last checkpoint is untouched.

The output folder is described in `minigpt/run_folder.py`: a checkpoint (with the run's model card and
training state) that `minigpt.loading.load_model` reads, metrics.jsonl and loss.png beside it. A checkpoint
holds everything an exact continuation needs, RNG states included, so a run killed and resumed ends bitwise
where the uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .ddp import Ranks, StopRequest, all_reduce_sum, gather_rng_states, restore_rng_states
from .errors import MinigptError, integer_at_least
from .files import home_expanded
from .metrics import MetricsLog, StepNumbers, evaluate, perplexity, plot_metrics
from .optim import AdamW, clip_grad_norm
from .run_folder import CARD_FILE, METRICS_FILE, PLOT_FILE, check_out_folder, check_same_run
from .run_folder import read_training_state, write_run_checkpoint, write_training_state
from .runtime import check_dtype, prepare_cpu_compile, resolve_device, warn_other_cpu_threads


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs on a GPU


@dataclass
class TrainConfig:
    """How the loop runs (train.py's flags in brackets)."""

    max_steps: int  # optimizer steps in the whole run [--max-steps, or --epochs x steps per epoch]
    grad_accum: int = 1  # micro-batches per optimizer step [--grad-accum]
    max_grad_norm: float = 1.0  # clip the gradients' global L2 norm to this; 0: no clipping [--max-grad-norm]
    dtype: torch.dtype = torch.float32  # compute precision: bf16 / fp16 run under autocast [--dtype]
    compile: bool = False  # torch.compile the model [--compile]
    compile_mode: str = "default"  # torch.compile's (train_flags.COMPILE_MODES) [--compile-mode]
    log_every: int = 10  # write a metrics row every this many steps [--log-every]
    eval_every: int = 0  # evaluate every this many steps (0: at epoch ends and the run's end only) [--eval-every]
    save_every: int = 0  # checkpoint every this many steps (0: only at the end) [--save-every]
    progress: bool = True  # show a tqdm bar (on stderr) [not --no-progress]

    def __post_init__(self) -> None:
        """Refuse, in one line, what the loop would misread (a grad_accum of 1.5, a dtype given by name)."""
        for name in ("max_steps", "grad_accum", "log_every", "eval_every", "save_every"):
            least = 0 if name in ("eval_every", "save_every") else 1  # (0: off)
            setattr(self, name, integer_at_least(getattr(self, name), least, f"TrainConfig: {name}"))
        norm = self.max_grad_norm  # (NaN would turn the clipping off, silently)
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm >= 0:
            raise MinigptError(f"TrainConfig: max_grad_norm must be a number >= 0 (0: no clipping), got {norm!r}")
        check_dtype(self.dtype, "TrainConfig: dtype")


# --- the loop --------------------------------------------------------------------------------------


class Batches(Protocol):
    """What the loop reads of a batch iterator (`minigpt.data.BatchIterator` is one): iterating yields
    epoch `epoch`'s batches (B, T) from batch `position` on, then moves on; len(): an epoch's batches."""

    epoch: int
    position: int
    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Trainer:
    """Runs `config.max_steps` optimizer steps over `train_batches`, evaluating, logging and saving.

    model, loss_fn: `loss_fn(model, batch)` is the mean loss over the batch's examples.
    optimizer, schedule: `schedule(step)` multiplies each parameter group's learning rate.
    train_batches, val_batches: the training and validation batches (`Batches`; val: or None).
    config: how the loop runs. out, save_model: the run folder (a new run's holds no other run or
        files: `fit` refuses it); `save_model(folder)` writes the model's files into a checkpoint folder.
    device, ranks: where this process computes (as `resolve_device` takes it), and its place in a torchrun job.
    run_config: the settings that define the run's mathematics (by flag name); stored in every
        checkpoint, and a resume with different ones is refused.
    card: `card(metrics rows, step) -> text`, the model card saved as README.md in every checkpoint
        (the checkpoint of `step`, given every metrics row written so far); None: no card.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        optimizer: AdamW,
        schedule: Callable[[int], float],
        train_batches: Batches,
        val_batches: Batches | None,
        config: TrainConfig,
        out: str | os.PathLike,
        save_model: Callable[[Path], None],
        device: torch.device | str = "cpu",
        ranks: Ranks = Ranks(),
        card: Callable[[list[dict[str, Any]], int], str] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.schedule = model, loss_fn, optimizer, schedule
        self.train_batches, self.val_batches = train_batches, val_batches
        if not os.fspath(out):  # (Path("") is ".": the run would write into the current folder)
            raise MinigptError("Trainer: out is an empty path")
        self.config, self.out, self.save_model = config, home_expanded(out), save_model
        self.device, self.ranks, self.run_config, self.card = resolve_device(device), ranks, run_config or {}, card
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.autocast = torch.autocast(self.device.type, dtype=config.dtype, enabled=config.dtype != torch.float32)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.dtype == torch.float16 else None

        # Training runs through `forward_model` (DDP and/or compiled); evaluation through the plain
        # model, which no rank has to wait for.
        self.forward_model: nn.Module = model
        if ranks.in_process_group:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if config.compile:
            if self.device.type == "cpu":  # (inductor's C++ is for this process's instruction sets)
                prepare_cpu_compile()
            self.forward_model = torch.compile(self.forward_model, mode=config.compile_mode)
        # CUDA graphs: the batch dimension is marked dynamic so that an epoch's short last batch
        # reuses the compiled code (a graph is still recorded per batch size).
        self.cuda_graphs = config.compile and config.compile_mode in CUDA_GRAPH_MODES
        self.step = 0  # optimizer steps done (fp16 steps skipped by the scaler included)
        self.skipped_steps = 0  # (a property, counted on the device)
        self.last_eval_step = self.last_save_step = -1
        self.metrics: MetricsLog | None = None
        self.rows_at_save = -1  # metrics rows written when the last checkpoint was saved (or resumed from)
        self.stop = StopRequest()  # Ctrl-C / SIGTERM: stop after the step in progress
        self.bar = None  # the tqdm progress bar, while fit() runs on rank 0
        self.pending = StepNumbers(self.device)  # the steps' numbers, still on the device
        self.interval = {"losses": [], "tokens": 0, "seconds": 0.0}  # read back since the last metrics row
        self.last: dict[str, float] = {}  # the last step's numbers and validation loss

    # --- one step ------------------------------------------------------------------------

    def _micro_loss(self, batch: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns its weighted loss (detached)."""
        if len(batch) == 0:
            # A rank whose share of a short last batch is empty must still join DDP's gradient
            # all-reduce: it runs a dummy example with weight 0, which adds zero gradients.
            batch, weight = torch.zeros((1, *batch.shape[1:]), dtype=batch.dtype), 0.0
        if self.device.type == "cuda" and batch.device.type == "cpu":  # from page-locked memory the
            batch = batch.pin_memory()  # copy is queued, not waited for (a batch on the GPU needs none)
        batch = batch.to(self.device, non_blocking=True)
        if self.cuda_graphs:
            torch._dynamo.maybe_mark_dynamic(batch, 0)
            torch.compiler.cudagraph_mark_step_begin()  # each micro-batch's forward and backward is new work
        with self.autocast:
            loss = self.loss_fn(self.forward_model, batch) * weight
        # DDP averages gradients over ranks; a rank's weight is its share of the step: x world size, a sum.
        scaled = loss * self.ranks.world_size if self.ranks.world_size > 1 else loss
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, Any]:
        """One optimizer step over `micro_batches`; returns the step's lr (a float), and its loss
        (this rank's share; summed over ranks it is the step's) and gradient norm as 0-dim device
        tensors, which this does not wait for (`float()` of one waits for the device)."""
        self.model.train()
        total = sum(len(b) for b in micro_batches)  # examples in the step, all ranks together
        if self.ranks.in_process_group:  # summed on the device, never read back by the host
            total = all_reduce_sum(self._full(total), self.ranks)
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.ranks.in_process_group else self._no_sync()
            # (a device weight: fp64 division, then rounded to fp32 as a Python float would be)
            weight = (self._full(len(batch)) / total).float() if torch.is_tensor(total) else len(batch) / total
            with sync:
                step_loss += self._micro_loss(batch, weight)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = clip_grad_norm(params, self.config.max_grad_norm)
        lr_scale = self.schedule(self.step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * lr_scale
        if self.scaler:
            # Skipped when a gradient holds inf/NaN, which makes their norm not finite: counted from
            # the norm on the device, without asking the scaler (get_scale() waits).
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._skipped += ~torch.isfinite(grad_norm)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": step_loss, "lr": self.base_lrs[0] * lr_scale, "grad_norm": grad_norm}

    @property
    def skipped_steps(self) -> int:
        """fp16 steps the loss scaler skipped (reading it waits for the device)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, n: int) -> None:
        self._skipped = torch.full((), n, dtype=torch.int64, device=self.device)

    def _full(self, n: int) -> torch.Tensor:  # n as a 0-dim fp64 device tensor: a fill, not a host copy
        return torch.full((), float(n), dtype=torch.float64, device=self.device)

    def _read_numbers(self) -> None:
        """Bring the steps' numbers since the last read to the host (all ranks at the same step):
        stop on the first non-finite one, count fp16's skipped steps, update the progress bar."""
        losses, grad_norms, tokens, seconds = self.pending.read(self.ranks)
        first = self.step - len(losses) + 1
        for step, loss, grad_norm in zip(range(first, self.step + 1), losses, grad_norms):
            if not math.isfinite(loss):
                self._stop_non_finite("the training loss", loss, step)
            if not math.isfinite(grad_norm) and not self.scaler:  # (fp16: the scaler skipped the step)
                self._stop_non_finite("the gradient norm", grad_norm, step)
        if not losses:
            return
        self.interval["losses"] += losses
        self.interval["tokens"] += tokens
        self.interval["seconds"] += seconds
        self.last.update(loss=losses[-1], grad_norm=grad_norms[-1])
        if self.bar is not None:
            tok_s = self.interval["tokens"] / max(self.interval["seconds"], 1e-9)
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{self.last['lr']:.2e}", tok_s=f"{tok_s:.0f}",
                                 refresh=False)

    def _stop_non_finite(self, what: str, value: float, step: int) -> None:
        """Stop: nothing after the last checkpoint is saved, so it stays as it was."""
        saved = f"step {self.last_save_step}" if self.last_save_step >= 0 else "none yet"
        raise MinigptError(f"step {step}: {what} is {value}; stopping. The last checkpoint in {self.out} ({saved}) is "
                           "untouched; try a lower --lr or another --dtype in a new run (--resume keeps the settings)")

    def _no_sync(self):
        """DDP's no_sync(): keep gradients local until the step's last micro-batch."""
        module = getattr(self.forward_model, "_orig_mod", self.forward_model)  # under torch.compile
        return module.no_sync()

    def evaluate(self) -> float:
        """Mean loss per example over all of `val_batches` (all ranks' shards together); the model is
        left in the mode it came in."""
        return evaluate(self.model, self.loss_fn, self.val_batches, self.device, self.autocast, self.ranks)

    # --- checkpoints ---------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The training state after `self.step` steps, as (JSON-able dict, tensors): this rank's
        optimizer and data position, and every rank's RNG states."""
        optim = self.optimizer.state_dict()
        tensors = {f"optimizer.{key}.{i}": t for key in ("exp_avg", "exp_avg_sq") for i, t in enumerate(optim.pop(key))}
        tensors |= gather_rng_states(self.device, self.ranks)
        info = {
            "step": self.step, "max_steps": self.config.max_steps, "skipped_steps": self.skipped_steps,
            "last_eval_step": self.last_eval_step, "metrics_rows": len(self.metrics.rows) if self.metrics else 0,
            "losses_since_row": self.interval["losses"], "world_size": self.ranks.world_size,
            "run": self.run_config,
            "optimizer": optim,
            "data": self.train_batches.state_dict(), "cpu_threads": torch.get_num_threads(),
            "validation_data": self.val_batches.state_dict() if self.val_batches is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
        }
        return info, tensors

    def save(self) -> None:
        """Checkpoint the model, its card and the training state after `self.step` steps (rank 0 writes)."""
        self._read_numbers()  # (stops, saving nothing, if a step since the last read was not finite)
        info, tensors = self.state()
        if self.ranks.is_main:
            def write_files(folder: Path) -> None:
                self.save_model(folder)
                if self.card is not None:
                    rows = self.metrics.rows if self.metrics else []
                    (folder / CARD_FILE).write_text(self.card(rows, self.step), encoding="utf-8")
                write_training_state(folder, info, tensors)

            try:
                write_run_checkpoint(self.out, self.step, write_files)
            except MinigptError as e:  # a full disk, a folder made read-only under us, ...
                if self.last_save_step < 0:
                    raise
                raise MinigptError(f"{e}; the checkpoint of step {self.last_save_step} is untouched") from None
        if self.ranks.in_process_group:
            dist.barrier()
        self.last_save_step, self.rows_at_save = self.step, len(self.metrics.rows) if self.metrics else 0

    def resume(self, folder: Path) -> None:
        """Continue from checkpoint `folder` (the model's weights must already be loaded from it)."""
        with read_training_state(folder) as (info, tensors):  # (a field missing or of the wrong type: one line)
            self.train_batches.load_state_dict(info["data"])  # (first: changed data is named, not the steps it makes)
            if self.val_batches is not None and info.get("validation_data"):
                self.val_batches.load_state_dict(info["validation_data"])
            check_same_run(self.out, info.get("run", {}), self.run_config)
            n = len([k for k in tensors if k.startswith("optimizer.exp_avg.")])
            optim = info["optimizer"]  # (a StateRecord, as `info`: a field missing in it is named, not a KeyError)
            optim.update({key: [tensors[f"optimizer.{key}.{i}"] for i in range(n)] for key in ("exp_avg", "exp_avg_sq")})
            try:
                self.optimizer.load_state_dict(optim)
            except MinigptError as e:  # another model's groups or moments: name the checkpoint they came from
                raise MinigptError(f"{folder}: {e}") from None
            warn_other_cpu_threads(info.get("cpu_threads") if self.ranks.is_main else None, self.device)  # (one line)
            if self.scaler and info.get("grad_scaler"):
                self.scaler.load_state_dict(info["grad_scaler"])
            self.step, self.skipped_steps = int(info["step"]), int(info["skipped_steps"])
            self.last_save_step, self.last_eval_step = self.step, int(info["last_eval_step"])
            self.rows_at_save = int(info["metrics_rows"])
            self.interval["losses"] = [float(x) for x in info["losses_since_row"]]  # (the next row averages them)
            restore_rng_states(tensors, info["world_size"], self.step, self.device, self.ranks)

    # --- the run -------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train until `config.max_steps` (empty batches: an error); returns the last numbers and validation loss."""
        cfg = self.config
        saved = self.last_save_step >= 0  # resumed, or fit before: the run goes on from its checkpoint
        if not saved:  # a new run, not over another one (nor into a folder of other files): every rank
            check_out_folder(self.out, resume=False)  # refuses, none is left waiting in a collective
        if self.ranks.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out / METRICS_FILE, self.rows_at_save if saved else None)
            if saved and (evaluated := [r["val_loss"] for r in self.metrics.rows if "val_loss" in r]):
                self.last["val_loss"] = evaluated[-1]  # (resumed: a run already done still reports its loss)
        if cfg.progress and self.ranks.is_main:
            self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
        try:
            with self.stop.catch_signals(self.ranks.is_main):  # (to the last save: a signal in it must not lose the run)
                while self.step < cfg.max_steps and not self._should_stop():
                    self._run_epoch()
                # (every rank agrees; one in the run's last step or evaluation waits: the run ends complete)
                if stopped := self.step < cfg.max_steps and self._should_stop(agree_now=True):
                    self.save()
                if not stopped and self.val_batches is not None and self.last_eval_step != self.step:
                    self._evaluate_and_log()
                if not stopped and (self.last_save_step != self.step or self._rows_since_save()):
                    self.save()  # the last checkpoint, its card with every row
                if self.metrics is not None:  # (rank 0: a stopped run's curve too; a Ctrl-C while drawn waits)
                    self.metrics.close()
                    plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if stopped:
            raise KeyboardInterrupt  # (the CLI exits 130)
        return {"step": self.step, **self.last}

    def _run_epoch(self) -> None:
        """The rest of the current epoch (or up to max_steps / a stop), then its evaluation."""
        micro: list[torch.Tensor] = []
        whole, step = self.train_batches.position == 0, self.step  # (a resumed epoch may have no batch left)
        for batch in self.train_batches:
            micro.append(batch)
            if len(micro) == self.config.grad_accum:  # (the epoch's last batch: evaluated before it is saved)
                self._run_step(micro, epoch_end=self.train_batches.position == len(self.train_batches))
                micro = []
                if self.step >= self.config.max_steps or self._should_stop():
                    return
        if micro:  # the epoch's last, shorter accumulation (an epoch with any batch makes a step), run when the
            self._run_step(micro, epoch_end=True)  # batches have moved on: evaluated before it may be saved
        if whole and self.step == step:  # (fit() would start one empty epoch after another, forever)
            raise MinigptError("train_batches: the batches are empty, a whole epoch yielded none (fewer blocks than "
                               "one batch, with drop_last?); give the loop at least one batch")
        if self.val_batches is not None and self.last_eval_step != self.step:
            self._evaluate_and_log()

    def _run_step(self, micro: list[torch.Tensor], epoch_end: bool = False) -> None:
        """One step plus what follows it: progress, logging, evaluation, saving."""
        cfg, interval = self.config, self.interval
        self.pending.start()
        numbers = self.train_step(micro)
        self.pending.stop(numbers["loss"], numbers["grad_norm"], tokens=sum(b.numel() for b in micro))
        self.last["lr"] = numbers["lr"]
        if self.bar is not None:
            self.bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self._read_numbers()
            losses = interval["losses"]
            row = {
                "step": self.step,
                "epoch": self._epoch(),
                "loss": sum(losses) / len(losses),  # the mean since the last row
                "lr": numbers["lr"],
                "grad_norm": self.last["grad_norm"],  # null for an fp16 step skipped for inf/NaN
                "tokens_per_sec": interval["tokens"] / max(interval["seconds"], 1e-9),
            }
            if self.scaler:
                row["skipped_steps"] = self.skipped_steps
            self._log(row)
            interval.update(losses=[], tokens=0, seconds=0.0)
        # The last step is evaluated before it is saved, so that its checkpoint's card holds its loss.
        due = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps or epoch_end
        if due and self.val_batches is not None and self.last_eval_step != self.step:
            self._evaluate_and_log()
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save()

    def _rows_since_save(self) -> bool:
        """Whether metrics rows were written after the last checkpoint (rank 0 knows; all ranks agree)."""
        written = self.metrics is not None and len(self.metrics.rows) != self.rows_at_save
        return all_reduce_sum(torch.tensor([float(written)], device=self.device), self.ranks).item() > 0

    def _should_stop(self, agree_now: bool = False) -> bool:
        """Whether to stop after this step (Ctrl-C, SIGTERM; all ranks agree, see `StopRequest`)."""
        return self.stop.agreed(self.step, self.device, self.ranks, now=agree_now)

    def _evaluate_and_log(self) -> None:
        self._read_numbers()  # (stops, before evaluating broken weights, if a step was not finite)
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):  # (a step broke the weights after computing a finite loss)
            self._stop_non_finite("the validation loss", val_loss, self.step)
        self.last_eval_step, self.last["val_loss"] = self.step, val_loss
        self._log({"step": self.step, "epoch": self._epoch(), "val_loss": val_loss, "val_ppl": perplexity(val_loss)})

    def _epoch(self) -> float:
        """Epochs done so far (for the metrics rows), as transformers' Trainer counts them: the share of
        the epoch's micro-batches consumed (with grad_accum 2, 5 micro-batches: 0.4, 0.8, 1.0)."""
        return round(self.train_batches.epoch + self.train_batches.position / max(1, len(self.train_batches)), 4)

    def _log(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(row)
