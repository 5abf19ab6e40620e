"""Data-parallel training with torchrun on the CPU (gloo): the same run as one process, and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import ROOT, python_path, run_cli

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
    pytest.mark.slow,
]

# dropout 0: one process and two see the same examples, so they must compute the same numbers.
# 110 training blocks = 13 batches of 8 and one of 6 (3 per rank): 20 steps cross an epoch end.
FLAGS = ("--preset", "tiny", "--no-progress", "--log-every", "1", "--max-steps", "20", "--eval-every", "5")


@pytest.fixture(autouse=True)
def environment(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path_factory.getbasetemp() / "ddp-cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # torchrun leaves a torchelastic_* folder in the temporary folder at every run: keep them in pytest's,
    # which pytest cleans, rather than in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("torchrun-tmp")))


def torchrun(out: Path, *args: str, nproc: int = 2, background: bool = False):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "train.py"), *FLAGS, "--out", str(out), *args,
    ]
    env = {**os.environ, "PYTHONPATH": python_path()}
    if background:  # its own process group, so that killing it kills every rank
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT, start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def checkpoint_step(out: Path) -> int | None:
    try:
        return json.loads((out / "training_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun starts each rank in a session of its own, so
    killing torchrun's process group would not reach them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int) -> int:
    """SIGKILL every rank and torchrun as soon as a checkpoint of at least `step` exists."""
    try:
        deadline = time.monotonic() + 240
        while (checkpoint_step(out) or 0) < step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    time.sleep(0.5)  # let the killed ranks be reaped
    killed_at = checkpoint_step(out)
    assert killed_at is not None and step <= killed_at < 20
    return killed_at


def initial_weights() -> dict[str, torch.Tensor]:
    """The weights FLAGS' runs start from: train.py's scratch model, made as train.py makes it."""
    import train
    from minigpt.checkpoint import model_state_for_saving
    from minigpt.training_run import build_model, seed_everything

    args = train.parse_args([*FLAGS, "--dropout", "0"])
    seed_everything(args.seed)
    model, _, _ = build_model(args, None)
    return model_state_for_saving(model)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a - b over all tensors together."""
    return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt().item()


# Two runs that add the same gradients in another order (2 ranks x 4 examples and an all-reduce vs 8
# examples in one process, or another torch's kernels) differ by float32 rounding, ~1e-7 of each
# gradient. Adam divides each gradient by its running RMS, so almost every entry's update differs by
# that relative amount. Only entries whose gradient is itself at rounding level (a fraction f ~ 1e-6
# of them: |g| < 1e-6 of its typical size) can step the other way, off by up to 2 lr per step, a
# random walk: ~2 lr sqrt(f N T) over T steps and N weights. Meanwhile the weights move ~lr per entry
# per step, ~lr T sqrt(N) in all. So ||w_a - w_b|| / ||w_after - w_before|| ~ 2 sqrt(f / T), ~5e-4
# for these 20 steps (measured: 4e-6 on torch 2.13). A real error (an example missed or counted
# twice, a micro-batch weighted wrongly) changes a step's gradient by ~1/8, the ratio by ~1e-1.
MOVED_REL = 1e-3


def assert_same_run(a: Path, b: Path, before: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == pytest.approx(y[key], rel=rel, abs=0), (x, y)
    wa, wb = weights(a), weights(b)
    moved = distance(wa, before)
    assert 0 < moved < 0.5 * sum((t.double() ** 2).sum() for t in before.values()).sqrt().item()  # the right start
    assert distance(wa, wb) <= MOVED_REL * moved, (distance(wa, wb), moved)


@pytest.fixture(scope="module")
def before() -> dict[str, torch.Tensor]:
    return initial_weights()


@pytest.fixture(scope="module")
def one_process_of_8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    # (a module fixture is set up before conftest's per-test CPU pinning: pin this run itself)
    env = {"MINIGPT_CACHE": str(tmp_path_factory.getbasetemp() / "ddp-cache"), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = run_cli("train.py", *FLAGS, "--out", str(out), "--batch-size", "8", "--dropout", "0")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert result.returncode == 0, result.stderr
    return out


def test_two_ranks_of_4_equal_one_process_of_8(tmp_path, one_process_of_8, before):
    ddp = torchrun(tmp_path / "ddp", "--batch-size", "4", "--dropout", "0")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "4 x 64 tokens x 1 accumulation x 2 process(es) = 8 examples" in ddp.stdout
    assert ddp.stdout.count("model: ") == 1  # only rank 0 talks
    assert_same_run(tmp_path / "ddp", one_process_of_8, before)
    # validation: the mean over all examples, whichever rank held them
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]  # noqa: E731
    assert val(tmp_path / "ddp") == pytest.approx(val(one_process_of_8), rel=1e-6, abs=0)


def test_killed_ddp_run_resumes_to_the_uninterrupted_run(tmp_path):
    flags = ("--batch-size", "4", "--dropout", "0.1", "--save-every", "4")
    whole = torchrun(tmp_path / "whole", *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    killed_at = kill_after_checkpoint(torchrun(out, *flags, background=True), out, 4)
    resumed = torchrun(out, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout
    wa, wb = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # dropout too: each rank's RNG state restored
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(tmp_path / "whole"))


def test_a_resume_over_edited_data_is_one_line_for_the_job(tmp_path):
    """A refusal that every rank meets alike is printed once: the edited-data one was printed by each
    rank (the trainer's resume ran outside the CLI's every-rank mark)."""
    from minigpt.data import tiny_preset_path

    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text(tiny_preset_path().read_text(encoding="utf-8"), encoding="utf-8")
    assert torchrun(out, "--data", str(data), "--max-steps", "2").returncode == 0
    first, second, *rest = data.read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join([second, first, *rest]), encoding="utf-8")  # (two records swapped: as many blocks)
    again = torchrun(out, "--data", str(data), "--max-steps", "2", "--resume")
    assert again.returncode != 0
    assert [line for line in again.stderr.splitlines() if "--resume:" in line] == [
        f"error: --resume: the training data ({data}) is not what the run was saved with (as many blocks, other "
        "tokens: a file edited since?); resume with the same data, or start a new run"], again.stderr[-3000:]


def test_an_eval_only_refusal_under_torchrun_is_one_line_for_the_job(tmp_path):
    """--eval-only's refusals after loading (no validation data, a loss that is NaN) ran outside the
    every-rank mark: each rank printed its own line, and two ranks' lines ran into one."""
    from minigpt.data import tiny_preset_path

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
               "--eval-only", "--init", "scratch-free", "--no-progress", "--data", str(tiny_preset_path()),
               "--val-fraction", "0", "--block-size", "64"]
    model = tmp_path / "model"
    assert run_cli("train.py", "--preset", "tiny", "--max-steps", "1", "--no-progress", "--out", str(model)).returncode == 0
    command[command.index("scratch-free")] = str(model)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": python_path()})
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if "--eval-only" in line] == [
        "error: --eval-only: no validation data (give --val-data, or a --val-fraction above 0)"], result.stderr[-3000:]


def test_resume_on_one_process_with_the_same_global_batch(tmp_path, one_process_of_8, before):
    out = tmp_path / "moved"
    ddp = torchrun(out, "--batch-size", "4", "--dropout", "0", "--save-every", "4", background=True)
    kill_after_checkpoint(ddp, out, 4)
    other = run_cli("train.py", *FLAGS, "--out", str(out), "--batch-size", "4", "--dropout", "0", "--resume")
    assert other.returncode == 2
    assert "was made with --batch-size x processes 8, not 4" in other.stderr
    resumed = run_cli("train.py", *FLAGS, "--out", str(out), "--batch-size", "8", "--dropout", "0", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, one_process_of_8, before)


STEP_TOKENS = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from minigpt.ddp import launched_ranks
from minigpt.metrics import StepNumbers
ranks = launched_ranks()
dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
numbers = StepNumbers(torch.device("cpu"))
for tokens in ((3 * 128, 2 * 128), (0, 1 * 128))[ranks.rank]:  # a global batch of 5, then one of 1
    numbers.start()
    numbers.stop(torch.tensor(1.0 + ranks.rank), torch.tensor(0.5), tokens=tokens)
readout = numbers.read(ranks)
Path(sys.argv[1], f"rank{ranks.rank}").write_text(f"{readout.tokens} {readout.losses}")
dist.destroy_process_group()
"""


def test_a_read_counts_every_ranks_tokens_when_the_batch_splits_unevenly(tmp_path):
    """tokens_per_sec's tokens: a global batch of 5 splits 3 + 2, one of 1 splits 1 + 0 (rank 0's
    share times the world size counted 8 and 2)."""
    script = tmp_path / "step_tokens.py"
    script.write_text(STEP_TOKENS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": python_path()})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["768 [3.0, 3.0]"] * 2
