"""Data-parallel set-up: where this process stands in a torchrun job, and the one collective it sums.

torchrun starts one process per device and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK). `torchrun_process_group(device)` joins that job's process group and yields
a `Ranks`; a plain run is rank 0 of 1 and joins nothing. `StopRequest` turns a signal to any rank
into a stop all ranks make at the same step.

Collectives time out after MINIGPT_DDP_TIMEOUT_MINUTES (default 60; torch's own default is 10): the
other ranks wait in a barrier while rank 0 tokenizes the data into the cache, which on a large data
set takes longer than 10 minutes. A rank that really hangs is then reported after that long.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import MinigptError, reason

# After its last collective, a rank gives gloo's worker threads this long to let go of the tensors
# they held, before the interpreter shuts down (see `torchrun_process_group`).
GLOO_DRAIN_SECONDS = 0.05


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (a plain run is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def in_process_group(self) -> bool:
        """Whether collectives (all-reduce, barriers) have other processes to talk to."""
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, progress bars and logs, and holds the run's lock."""
        return self.rank == 0


DEFAULT_TIMEOUT_MINUTES = 60.0


def collective_timeout() -> timedelta:
    """How long a collective (a barrier, an all-reduce) waits for the other ranks before failing:
    MINIGPT_DDP_TIMEOUT_MINUTES from the environment, else DEFAULT_TIMEOUT_MINUTES."""
    text = os.environ.get("MINIGPT_DDP_TIMEOUT_MINUTES", "").strip()
    if not text:
        return timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < 10**6:  # (NaN fails too)
        raise MinigptError(f"MINIGPT_DDP_TIMEOUT_MINUTES={text!r}: give a number of minutes above 0")
    return timedelta(minutes=minutes)


def launched_rank() -> int:
    """This process's rank as torchrun announced it (0 outside torchrun), before any group is joined."""
    return int(os.environ.get("RANK", 0))


@contextlib.contextmanager
def torchrun_process_group(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """Join the torchrun job this process was started in, if any; yields (ranks, this rank's device).

    Each process then drives one device (CUDA: GPU LOCAL_RANK, over NCCL) or the CPU (over gloo).
    Without torchrun's variables this does nothing. The process group is destroyed on the way out,
    on errors and Ctrl-C too, so no rank is left waiting.

    Then, over gloo, the rank sleeps GLOO_DRAIN_SECONDS. Why: torch (2.13, 2.14) keeps gloo's group
    and its two worker threads alive after `destroy_process_group` (they still run at exit). A
    worker that finishes a collective drops its tensors afterwards, and a tensor that Python has
    already let go of needs the GIL for that. If the main thread has meanwhile run to the end of
    the program, the worker waits for a GIL that is never handed over again: Python ends the thread
    mid-C++, and the process aborts ("terminate called without an active exception", the worker's
    stack in `ProcessGroupGloo::runLoop` -> `decref_pyobject` -> `PyEval_AcquireThread`). Seen in 3
    of 140 two-rank tiny runs here; with the sleep, which hands the GIL over, in none of 200.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield Ranks(), device
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MinigptError(
                f"torchrun: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise MinigptError(f"--device {device.type}: distributed training runs on cuda or cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=collective_timeout())
    try:
        yield Ranks(rank, local_rank, world_size), device
    finally:
        dist.destroy_process_group()
        if backend == "gloo":
            time.sleep(GLOO_DRAIN_SECONDS)


def all_reduce_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum `t` in place over all ranks (nothing to do in a plain run); returns `t`."""
    if ranks.in_process_group:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class StopRequest:
    """A stop asked for by Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, torchrun shutting
    down): the loop stops after the step in progress and saves it; a second Ctrl-C interrupts at once.

    Under DDP a signal may reach one rank only, and all must stop at the same step. Agreeing costs an
    all-reduce and a wait for the device, so the ranks agree every `every` steps (and when the loop
    asks them all to agree now), not every step; in between `agreed` answers False on every rank. A
    plain run stops after the very step the signal came in.
    """

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.requested = False  # this process got a signal (or, after agreeing, some rank did)

    def agreed(self, step: int, device: torch.device, ranks: Ranks, now: bool = False) -> bool:
        """Whether to stop after `step`; under DDP every rank must call it at the same steps."""
        if ranks.in_process_group:
            if not now and step % self.every:
                return False
            flag = torch.tensor([float(self.requested)], device=device)
            self.requested = all_reduce_sum(flag, ranks).item() > 0
        return self.requested

    @contextlib.contextmanager
    def catch_signals(self, announce: bool) -> Iterator[None]:
        """While inside, SIGINT and SIGTERM set `requested` (`announce`: say so on stderr). Only the
        main thread receives signals; elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum, frame) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            if announce:
                print("\nstopping after this step (Ctrl-C again to quit at once)", file=sys.stderr)

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def gather_rng_states(device: torch.device, ranks: Ranks) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states (dropout draws from them), gathered to all ranks, as
    {"rng.cpu.<rank>": ..., "rng.cuda.<rank>": ...}."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, state in states.items():
        if ranks.in_process_group:
            comm = device if device.type == "cuda" else torch.device("cpu")
            gathered = [torch.empty_like(state, device=comm) for _ in range(ranks.world_size)]
            dist.all_gather(gathered, state.to(comm))
        else:
            gathered = [state]
        out |= {f"rng.{kind}.{r}": s.cpu() for r, s in enumerate(gathered)}
    return out


def restore_rng_states(tensors: dict[str, torch.Tensor], saved_world_size: int, step: int, device: torch.device,
                       ranks: Ranks) -> None:
    """Continue this rank's dropout draws from `gather_rng_states`' saved states. With another number
    of ranks the examples fall on other ranks anyway, so there is no exact continuation to restore:
    each rank is then seeded from the step and its rank."""
    if saved_world_size == ranks.world_size:
        try:  # (torch refuses a tensor that is no generator's state: a damaged file, one line)
            torch.set_rng_state(tensors[f"rng.cpu.{ranks.rank}"])
            if device.type == "cuda" and f"rng.cuda.{ranks.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{ranks.rank}"], device)
        except (TypeError, RuntimeError) as e:
            raise MinigptError(f"training state: rank {ranks.rank}'s RNG state is not one ({reason(e)})") from None
    else:
        torch.manual_seed(step * 1000 + ranks.rank)
