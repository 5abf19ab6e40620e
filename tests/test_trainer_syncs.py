"""The training loop waits for the device only when it logs (issue 13): which steps read numbers
back, that the rows are the same numbers as when every step is read, the non-finite stop at the next
read, fp16's skipped steps as strict JSON, --compile-mode and the collectives' timeout."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs_cpu_compiler
import minigpt.metrics as metrics_module
from minigpt.errors import MinigptError
from minigpt.metrics import MetricsLog, StepNumbers, strict_json
from minigpt.run_folder import STATE_JSON
from minigpt.trainer import CUDA_GRAPH_MODES
from test_trainer import lm_loss, make_trainer, micro_model, random_blocks, rows

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")  # each waits for a GPU's queue


def copies_to_the_host_and_waits(args: tuple, kwargs: dict) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` is a blocking copy to the CPU: from a GPU that waits for its
    queue, as `.cpu()` does. A batch moved to the device, or GradScaler's copies (non_blocking), is not
    one; everything is on the CPU in these tests, so the target and non_blocking tell them apart."""
    target = kwargs.get("device", kwargs.get("other"))
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            target = arg
        elif torch.is_tensor(arg):
            target = arg.device
    flags = [arg for arg in args if isinstance(arg, bool)]  # (non_blocking, then copy)
    non_blocking = kwargs.get("non_blocking", flags[0] if flags else False)
    return target is not None and torch.device(target).type == "cpu" and not non_blocking


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: GradScaler's steps too
def test_numbers_are_read_back_only_at_logging_steps(tmp_path, monkeypatch, dtype):
    """No step but a logging one reads a number back: not by item()/float()/tolist(), nor by
    `.cpu()`, `.numpy()` or a blocking `.to("cpu")` (a `float(loss.cpu().numpy())` in train_step
    waited for the GPU every step, unseen by the first five)."""
    trainer = make_trainer(tmp_path, micro_model(), random_blocks(40, 16, 300, seed=1), max_steps=10, log_every=5,
                           dtype=dtype)
    read_at = []
    for name in (*HOST_READS, "to"):
        real = getattr(torch.Tensor, name)

        def reading(self, *args, _real=real, _name=name, **kwargs):
            if _name != "to" or copies_to_the_host_and_waits(args, kwargs):
                read_at.append(trainer.step)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)
    trainer.fit()
    monkeypatch.undo()
    assert set(read_at) == {5, 10}  # steps 1-4 and 6-9 never wait for the device
    assert [r["step"] for r in rows(tmp_path)] == [5, 10]


def test_rows_are_the_means_of_the_steps_read_one_by_one(tmp_path):
    """Reading five steps at once gives the same numbers as reading each: the loss of a row is the
    mean of its steps' losses, summed in the same order, so equal to the last bit."""
    train = random_blocks(30, 16, 300, seed=2)
    make_trainer(tmp_path / "each", micro_model(), train, max_steps=10, log_every=1).fit()
    make_trainer(tmp_path / "five", micro_model(), train, max_steps=10, log_every=5).fit()
    each, five = rows(tmp_path / "each"), rows(tmp_path / "five")
    for row, steps in zip(five, (each[0:5], each[5:10])):
        assert row["loss"] == sum(r["loss"] for r in steps) / 5
        assert (row["step"], row["lr"], row["grad_norm"], row["epoch"]) == tuple(
            steps[-1][k] for k in ("step", "lr", "grad_norm", "epoch"))
        assert row["tokens_per_sec"] > 0


def test_tokens_per_sec_counts_each_steps_tokens_over_its_time(tmp_path, monkeypatch):
    """30 blocks of 16 tokens in batches of 4: steps of 64 tokens, and 32 for the epoch's last;
    the clock is faked to 0.25 s a step, so each row's rate is exact."""
    clock = iter(0.25 * i for i in range(1000))  # start() and stop() each read it once a step
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    make_trainer(tmp_path, micro_model(), random_blocks(30, 16, 300, seed=2), max_steps=9, log_every=4).fit()
    assert [(r["step"], r["tokens_per_sec"]) for r in rows(tmp_path)] == [(4, 256.0), (8, 224.0), (9, 256.0)]


def nan_at_call(n: int, make_nan):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        return make_nan(loss) if calls["n"] == n else loss

    return loss_fn


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; backward makes every gradient infinite (what an fp16 overflow does)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("what, make_nan", [
    ("the training loss is nan", lambda loss: loss * float("nan")),
    ("the gradient norm is (inf|nan)", InfiniteGradient.apply),
])
def test_a_non_finite_step_stops_at_the_next_read_and_saves_nothing(tmp_path, what, make_nan):
    """log_every 5, save_every 2: step 3 goes bad; the save of step 4 reads first and stops the run,
    naming step 3, with the checkpoint of step 2 untouched."""
    loss_fn = nan_at_call(3, make_nan)
    trainer = make_trainer(tmp_path, micro_model(), random_blocks(40, 16, 300, seed=3), max_steps=10,
                           log_every=5, save_every=2, loss_fn=loss_fn)
    with pytest.raises(MinigptError, match=rf"^step 3: {what}; stopping.*\(step 2\) is untouched"):
        trainer.fit()
    assert trainer.step == 4
    assert json.loads((tmp_path / STATE_JSON).read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "model.safetensors")).values())


def test_fp16_skipped_step_is_null_in_strict_json(tmp_path):
    """fp16 with loss scaling (on the CPU here): the step whose gradients overflow is skipped, its
    grad_norm written as null (not `Infinity`), skipped_steps counts it, and the weights stay as
    they were through that step."""
    model = micro_model()
    trainer = make_trainer(tmp_path, model, random_blocks(40, 16, 300, seed=4), max_steps=4, log_every=1,
                           dtype=torch.float16, loss_fn=nan_at_call(2, InfiniteGradient.apply))
    trainer.fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()

    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}")

    written = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["grad_norm"] is None for r in written] == [False, True, False, False]
    assert [r["skipped_steps"] for r in written] == [0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in written)  # (the skipped step's loss too: the overflow is in backward)
    assert all(r["grad_norm"] is None or r["grad_norm"] > 0 for r in written)
    assert trainer.skipped_steps == 1 and json.loads((tmp_path / STATE_JSON).read_text())["skipped_steps"] == 1


def test_strict_json_writes_null_for_non_finite_numbers_and_refuses_nested_ones(tmp_path):
    assert strict_json({"a": float("inf"), "b": float("nan"), "c": -float("inf"), "d": 1.5, "e": None}) == \
        '{"a": null, "b": null, "c": null, "d": 1.5, "e": null}'
    with pytest.raises(ValueError):
        strict_json({"a": [float("nan")]})
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "val_loss": 800.0, "val_ppl": float("inf")})
    log.close()
    assert log.rows == [{"step": 1, "val_loss": 800.0, "val_ppl": None}]  # the rows are what the file says
    assert json.loads((tmp_path / "m.jsonl").read_text()) == log.rows[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (a disk that is always full)")
def test_a_full_disk_under_the_metrics_names_the_file(tmp_path):
    """A row that could not be written stopped the run with "writing the output: No space left on
    device", naming no file; closing the log then raised again (the row still in its buffer)."""
    log = MetricsLog(tmp_path / "m.jsonl")
    log._file.close()
    log._file = open("/dev/full", "w", encoding="utf-8")  # (the disk fills under the open log)
    with pytest.raises(MinigptError, match=f"^{re.escape(str(tmp_path / 'm.jsonl'))}: cannot append the metrics row "
                       r"\(No space left on device\)$"):
        log.write({"step": 1, "loss": 2.5})
    log.close()  # (no second error)
    assert log.rows == []


def test_step_numbers_read_all_steps_at_once():
    numbers = StepNumbers(torch.device("cpu"))
    assert numbers.read() == ([], [], 0, 0.0)
    for loss, norm, tokens in ((2.5, 0.5, 1024), (float("nan"), float("inf"), 384)):
        numbers.start()
        numbers.stop(torch.tensor(loss), torch.tensor([norm]), tokens=tokens)
    losses, norms, tokens, seconds = numbers.read()
    assert losses[0] == 2.5 and math.isnan(losses[1]) and norms == [0.5, float("inf")] and seconds > 0
    assert tokens == 1408 and len(numbers) == 0
    assert numbers.read() == ([], [], 0, 0.0)  # (read afresh: nothing is counted twice)


def test_step_times_are_recorded_on_the_training_gpus_stream(monkeypatch):
    """CUDA events record on the current device's stream unless given one: a Trainer on "cuda:1",
    made from Python while GPU 0 is current, timed an idle GPU. Faked here: the streams asked for."""
    recorded = []

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self, stream=None) -> None:
            recorded.append(stream)

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end) -> float:
            return 250.0  # (ms)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    numbers = StepNumbers(torch.device("cuda", 1))
    numbers.start()
    numbers.stop(torch.tensor(2.0), torch.tensor(0.5), tokens=64)
    assert recorded == [("stream of", torch.device("cuda", 1))] * 2
    assert numbers.read() == ([2.0], [0.5], 64, 0.25)


# --- --compile-mode --------------------------------------------------------------------------------


@needs_cpu_compiler  # (runtime.prepare_cpu_compile checks for one before torch.compile is called)
def test_compile_mode_reaches_torch_compile_and_reduce_overhead_marks_the_batch_dynamic(tmp_path, monkeypatch):
    """(torch.compile itself is replaced: compiling is the CUDA test's job; here, what is asked of it.)"""
    asked, marked, steps_begun = [], [], []
    monkeypatch.setattr(torch, "compile", lambda module, mode: asked.append(mode) or module)
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda t, dim: marked.append((tuple(t.shape), dim)))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps_begun.append(1))
    train = random_blocks(10, 16, 300, seed=5)  # batches of 4: 4, 4, then the short last one of 2
    make_trainer(tmp_path / "a", micro_model(), train, max_steps=3, compile=True, compile_mode="reduce-overhead").fit()
    assert asked == ["reduce-overhead"]
    assert marked == [((4, 16), 0), ((4, 16), 0), ((2, 16), 0)] and len(steps_begun) == 3
    marked.clear()  # max-autotune replays CUDA graphs too (inductor's triton.cudagraphs); the no-cudagraphs mode not
    make_trainer(tmp_path / "b", micro_model(), train, max_steps=3, compile=True, compile_mode="max-autotune").fit()
    assert asked[-1] == "max-autotune" and marked == [((4, 16), 0), ((4, 16), 0), ((2, 16), 0)]
    marked.clear()
    make_trainer(tmp_path / "c", micro_model(), train, max_steps=3, compile=True,
                 compile_mode="max-autotune-no-cudagraphs").fit()
    assert asked[-1] == "max-autotune-no-cudagraphs" and marked == []
    from torch._inductor import list_mode_options

    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):  # (torch's own table)
        assert list_mode_options(mode).get("triton.cudagraphs", False) == (mode in CUDA_GRAPH_MODES)


@needs_cpu_compiler
def test_compiled_training_on_the_cpu_keeps_to_its_instruction_sets_cache(tmp_path, monkeypatch):
    """Inductor's disk cache does not tell instruction sets apart (`runtime.prepare_cpu_compile`):
    a training step compiled on the CPU, as compiled decoding, uses the cache's folder for the
    instruction sets torch's kernels use in this process, the caps included; without --compile the
    cache is left where it was."""
    from minigpt.runtime import ISA_CAPS

    monkeypatch.setattr(torch, "compile", lambda module, mode: module)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    for variable in ISA_CAPS:
        monkeypatch.delenv(variable, raising=False)
    train = random_blocks(10, 16, 300, seed=5)
    make_trainer(tmp_path / "plain", micro_model(), train, max_steps=1)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    make_trainer(tmp_path / "a", micro_model(), train, max_steps=1, compile=True)
    native = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert native.parent == tmp_path / "cache" and native.name.startswith(f"isa-{capability}-")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    make_trainer(tmp_path / "b", micro_model(), train, max_steps=1, compile=True)
    capped = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert capped.parent == tmp_path / "cache" and capped != native
    # a cache folder of the user's own whose name starts with "isa-" is theirs, not taken for an earlier call's
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "isa-mine"))
    make_trainer(tmp_path / "c", micro_model(), train, max_steps=1, compile=True)
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent == tmp_path / "isa-mine"


def test_compile_mode_flag_errors_are_one_line(tmp_path, monkeypatch):
    from conftest import call_cli

    # on a machine without CUDA, --device cuda is told that, not that its CUDA graphs take --grad-accum 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = call_cli("train.py", "--compile", "--compile-mode", "reduce-overhead", "--grad-accum", "2", "--device",
                      "cuda", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: --device cuda: CUDA is not available on this machine (try --device cpu)"], result.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (the flags are refused before any GPU work)
    for args, needle in ((["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead needs --compile"),
                         (["--compile", "--compile-mode", "fast"], "argument --compile-mode: invalid choice: 'fast'"),
                         (["--compile", "--compile-mode", "reduce-overhead", "--grad-accum", "2", "--device", "cuda"],
                          "--compile-mode reduce-overhead takes --grad-accum 1"),
                         (["--compile", "--compile-mode", "max-autotune", "--grad-accum", "2", "--device", "cuda:0"],
                          "--compile-mode max-autotune takes --grad-accum 1: its CUDA graphs would overwrite the "
                          "gradients being accumulated (max-autotune-no-cudagraphs takes any)")):
        result = call_cli("train.py", *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and needle in result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_train_flags_carry_the_compile_mode():
    from minigpt.train_flags import parse_train_flags

    # CUDA graphs are a GPU's: on the CPU, the modes that replay them on a GPU accumulate gradients as any other
    assert parse_train_flags(["--compile", "--compile-mode", "reduce-overhead", "--grad-accum", "2", "--device", "cpu"],
                             "").train_config(5, torch.float32).compile_mode == "reduce-overhead"

    assert parse_train_flags(["--compile"], "").train_config(5, torch.float32).compile_mode == "default"
    config = parse_train_flags(["--compile", "--compile-mode", "reduce-overhead"], "").train_config(5, torch.float32)
    assert config.compile and config.compile_mode == "reduce-overhead"
    config = parse_train_flags(["--compile", "--compile-mode", "max-autotune-no-cudagraphs", "--grad-accum", "2"],
                               "").train_config(5, torch.float32)
    assert config.compile_mode == "max-autotune-no-cudagraphs" and config.grad_accum == 2


# --- DDP ------------------------------------------------------------------------------------------


def test_collectives_wait_an_hour_or_what_the_environment_says(monkeypatch):
    from minigpt import ddp

    monkeypatch.delenv("MINIGPT_DDP_TIMEOUT_MINUTES", raising=False)
    assert ddp.collective_timeout() == timedelta(minutes=60)
    monkeypatch.setenv("MINIGPT_DDP_TIMEOUT_MINUTES", "90.5")
    assert ddp.collective_timeout() == timedelta(minutes=90.5)
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("MINIGPT_DDP_TIMEOUT_MINUTES", bad)
        with pytest.raises(MinigptError, match=f"MINIGPT_DDP_TIMEOUT_MINUTES='{bad}': give a number of minutes"):
            ddp.collective_timeout()

    joined = {}
    monkeypatch.setenv("MINIGPT_DDP_TIMEOUT_MINUTES", "120")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda: None)
    with ddp.torchrun_process_group(torch.device("cpu")) as (ranks, device):
        assert (ranks.rank, ranks.world_size, device.type) == (1, 2, "cpu")
    assert joined == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": timedelta(minutes=120)}


def test_a_gloo_rank_hands_its_workers_the_gil_after_leaving_the_group(monkeypatch):
    """torch keeps gloo's worker threads alive after destroy_process_group; one still dropping the
    last collective's tensors needs the GIL, and aborts the process if the interpreter has shut down
    first (3 in 140 two-rank runs). So a gloo rank sleeps (giving up the GIL) after leaving the group,
    on every way out, errors included."""
    from minigpt import ddp

    events = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda backend, **kw: events.append(("join", backend)))
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda: events.append(("leave",)))
    monkeypatch.setattr(ddp.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    with ddp.torchrun_process_group(torch.device("cpu")):
        events.append(("train",))
    assert events == [("join", "gloo"), ("train",), ("leave",), ("sleep", ddp.GLOO_DRAIN_SECONDS)]
    assert ddp.GLOO_DRAIN_SECONDS >= 0.01
    events.clear()
    with pytest.raises(MinigptError), ddp.torchrun_process_group(torch.device("cpu")):
        raise MinigptError("a rank fails")
    assert events[-2:] == [("leave",), ("sleep", ddp.GLOO_DRAIN_SECONDS)]


def test_ranks_agree_on_a_stop_only_every_few_steps(monkeypatch):
    """Under DDP a stop is agreed (an all-reduce, a wait for the device) only every `every` steps or
    when asked to agree now; in between the rank that got the signal answers False too, so that no
    rank stops alone. A plain run stops at once."""
    from minigpt import ddp

    stop = ddp.StopRequest(every=4)
    stop.requested = True
    assert stop.agreed(3, torch.device("cpu"), ddp.Ranks())  # no process group: this very step
    reduced = []
    monkeypatch.setattr(ddp.Ranks, "in_process_group", property(lambda self: True))
    monkeypatch.setattr(ddp, "all_reduce_sum", lambda t, ranks: reduced.append(t.clone()) or t.add_(1))
    stop.requested = False  # this rank got no signal; another rank did (the fake all-reduce adds 1)
    answers = [stop.agreed(step, torch.device("cpu"), ddp.Ranks(0, 0, 2)) for step in range(1, 9)]
    assert answers == [False, False, False, True, False, False, False, True]  # agreed at steps 4 and 8 only
    assert [t.tolist() for t in reduced] == [[0.0], [1.0]]
    assert ddp.StopRequest(every=4).agreed(3, torch.device("cpu"), ddp.Ranks(0, 0, 2), now=True)
