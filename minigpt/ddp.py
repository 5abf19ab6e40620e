"""Data-parallel set-up: where this process stands in a torchrun job, and its collectives (a sum, RNG states).

torchrun starts one process per device and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK), and where to meet the others (MASTER_ADDR, MASTER_PORT). `launched_ranks()`
reads and checks the first three; `torchrun_process_group(device)` joins that job's process group and
yields a `Ranks`; a plain run is rank 0 of 1 and joins nothing. `StopRequest` turns a signal to any rank
into a stop all ranks make at the same step.

Collectives time out after MINIGPT_DDP_TIMEOUT_MINUTES (default 60; torch's own default is 10
minutes over NCCL, 30 over gloo): the other ranks wait in a barrier while rank 0 tokenizes the data
into the cache, which on a large data set takes longer than that. A rank that really hangs is then
reported after that long.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import MinigptError, alike_on_every_rank, reason

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
# How gloo's collectives fail when another rank's process is gone (NCCL's raise a dist.DistError).
LOST_RANK = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")


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


# What the one line for a bad launch variable goes on to say: they are torchrun's to set.
SET_BY_TORCHRUN = ("start data-parallel runs with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                   "and MASTER_PORT; a plain run sets none of them")


def launched_ranks() -> Ranks | None:
    """This process's place in the torchrun job that started it, from the variables torchrun sets:
    RANK (this process among all), WORLD_SIZE (how many there are) and LOCAL_RANK (among those on
    this machine: the GPU it drives; 0 if unset). None without RANK and WORLD_SIZE: a plain run.

    Set by hand they can be anything, so they are read and checked here, in one place: a bad one is
    one line naming it, not int()'s traceback or a rank 2 of 2 waiting an hour for a group it is not in;
    and the rank that decides, before any group is joined, who holds the run's lock is the rank that
    joins it. (MASTER_ADDR and MASTER_PORT torch reads itself: see `torchrun_process_group`.)"""
    text = {name: os.environ.get(name, "").strip() for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if not text["RANK"] and not text["WORLD_SIZE"]:
        return None
    for name in ("RANK", "WORLD_SIZE"):  # (half a torchrun environment is no plain run either)
        if not text[name]:
            raise MinigptError(f"{name} is not set: {SET_BY_TORCHRUN}")
    value = {}
    for name, given in text.items():
        try:
            value[name] = int(given or 0)  # (LOCAL_RANK alone may be left out: 0)
        except ValueError:
            raise MinigptError(f"{name}={given!r} is not an integer: {SET_BY_TORCHRUN}") from None
    rank, world_size, local_rank = value["RANK"], value["WORLD_SIZE"], value["LOCAL_RANK"]
    if world_size < 1:
        raise MinigptError(f"WORLD_SIZE={world_size}: a job has at least 1 process; {SET_BY_TORCHRUN}")
    for name, number in (("RANK", rank), ("LOCAL_RANK", local_rank)):
        if not 0 <= number < world_size:
            raise MinigptError(f"{name}={number} with WORLD_SIZE={world_size}: ranks run from 0 to "
                               f"{world_size - 1}; {SET_BY_TORCHRUN}")
    return Ranks(rank, local_rank, world_size)


def launched_rank() -> int:
    """This process's rank as torchrun announced it (0 outside torchrun), before any group is joined."""
    ranks = launched_ranks()
    return ranks.rank if ranks else 0


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
    ranks = launched_ranks()
    if ranks is None:
        yield Ranks(), device
        return
    with alike_on_every_rank():
        if device.type == "cuda" and device.index is not None:  # (replaced by GPU LOCAL_RANK, in silence)
            raise MinigptError(f"--device {device}: under torchrun each process drives GPU LOCAL_RANK; use --device cuda")
        if device.type not in ("cuda", "cpu"):
            raise MinigptError(f"--device {device.type}: distributed training runs on cuda or cpu")
        timeout = collective_timeout()
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise MinigptError(
                f"torchrun: local rank {ranks.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)
    except ValueError as e:  # (torch's env:// rendezvous found MASTER_ADDR or MASTER_PORT missing or malformed)
        with alike_on_every_rank():
            raise MinigptError(_rendezvous_fault(e)) from None
    try:
        yield ranks, device
    except RuntimeError as e:  # a collective that failed as another rank died: one line, not a traceback
        if not (isinstance(e, dist.DistError) or any(cause in str(e) for cause in LOST_RANK)):
            raise
        raise MinigptError(f"rank {ranks.rank}: a collective with the other ranks failed ({_first_sentence(e)}); "
                           "another rank stopped: see its lines above") from None
    finally:
        dist.destroy_process_group()
        if backend == "gloo":
            time.sleep(GLOO_DRAIN_SECONDS)


def _first_sentence(e: BaseException) -> str:
    """The first sentence of a collective's error, less gloo's source file and line."""
    return re.sub(r"^\[[^\]]*\] ", "", reason(e)).split(". ")[0].rstrip(".")


def _rendezvous_fault(e: ValueError) -> str:
    """One line for torch's refusal of MASTER_ADDR / MASTER_PORT, naming the variable at fault. torch
    reads them itself (they say where rank 0 listens for the others), so they are checked where it
    does; its own message ("... using env:// rendezvous: environment variable MASTER_ADDR expected,
    but not set") says nothing of torchrun."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address:
        return f"MASTER_ADDR is not set: {SET_BY_TORCHRUN}"
    if not port:
        return f"MASTER_PORT is not set: {SET_BY_TORCHRUN}"
    return f"MASTER_ADDR={address!r}, MASTER_PORT={port!r}: {reason(e)}"


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
