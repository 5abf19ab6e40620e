"""Promises README makes about failures that no other test exercised: a non-finite gradient norm
stops the run, fp16 steps with inf/NaN gradients are skipped and counted, and under torchrun
Ctrl-C stops every rank after the same step while a failing rank brings the whole job down; the
prepared GPU check stops in one line where there is no GPU, and runs every cell where one is
faked; the llama.cpp comparison is like for like."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import ROOT, call_cli, gpt2_vocab_files, python_path, table_rows
from minigpt.checkpoint import model_state_for_saving
from minigpt.config import GPTConfig
from minigpt.data import BatchIterator, TokenBlocks
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.optim import AdamW, param_groups
from minigpt.run_folder import check_out_folder
from minigpt.trainer import Trainer, TrainConfig


def micro_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))


def poisoned_loss(bad_step: int):
    """The LM loss, whose gradient is made infinite (a finite loss, inf/NaN gradients) in call
    `bad_step`: what an fp16 overflow in the backward pass, or a bad batch, does."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(batch, targets=batch)[1]
        if calls["n"] == bad_step:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    return loss_fn


def make_trainer(out: Path, model: GPT, loss_fn, **cfg) -> Trainer:
    blocks = np.random.default_rng(0).integers(0, 300, (40, 16), dtype=np.uint16)
    optimizer = AdamW(param_groups(model, 0.01), lr=3e-3)

    def save(folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
        save_file(model_state_for_saving(model), str(folder / "model.safetensors"))

    return Trainer(
        model=model, loss_fn=loss_fn, optimizer=optimizer, schedule=lambda step: 1.0,
        train_batches=BatchIterator(TokenBlocks(blocks, {}), 4, seed=1), val_batches=None,
        config=TrainConfig(log_every=1, progress=False, **cfg), out=out, save_model=save,
    )


def test_a_non_finite_gradient_norm_stops_the_run_and_spares_the_checkpoint(tmp_path):
    """The loss is finite, its gradients are not: the run stops with one message naming that step,
    and the last checkpoint does not take it. (The loop reads its numbers back only when it logs, here
    every step, so the step itself has run in memory: it stops before the next one, issue 13.)"""
    model = micro_model()
    trainer = make_trainer(tmp_path / "run", model, poisoned_loss(bad_step=5), max_steps=10, save_every=2)
    before = {name: t.clone() for name, t in model_state_for_saving(model).items()}
    with pytest.raises(MinigptError, match=r"step 5: the gradient norm is (inf|nan); stopping.*\(step 4\) is untouched"):
        trainer.fit()
    assert trainer.step == 5
    assert json.loads((tmp_path / "run" / "training_state.json").read_text())["step"] == 4
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not all(torch.isfinite(t).all() for t in model_state_for_saving(model).values())  # step 5 ran
    trainer_at_4 = make_trainer(tmp_path / "again", micro_model(), poisoned_loss(bad_step=99), max_steps=4)
    trainer_at_4.fit()  # the same 4 steps, unpoisoned: the checkpoint holds exactly their weights
    assert all(torch.equal(saved[name], t) for name, t in model_state_for_saving(trainer_at_4.model).items())
    assert any(not torch.equal(before[name], saved[name]) for name in before)


def test_fp16_steps_with_inf_gradients_are_skipped_and_counted(tmp_path):
    """fp16 with GradScaler (autocast and the scaler both run on the CPU): the bad step leaves the
    weights alone, halves the scale, counts in skipped_steps, and training goes on."""
    model = micro_model()
    trainer = make_trainer(tmp_path, model, poisoned_loss(bad_step=3), max_steps=5, dtype=torch.float16)
    trainer.train_step([next(iter(trainer.train_batches))])  # step 1, set up the row below
    batches = iter(trainer.train_batches)
    trainer.train_step([next(batches)])  # step 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = trainer.scaler.get_scale()
    numbers = trainer.train_step([next(batches)])  # step 3: inf gradients
    assert not torch.isfinite(numbers["grad_norm"])  # (a device tensor: train_step waits for nothing)
    assert trainer.step == 3 and trainer.skipped_steps == 1 and trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.train_step([next(batches)])  # step 4 is an ordinary one again
    assert trainer.skipped_steps == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp16_skipped_steps_reach_metrics(tmp_path):
    """... and the gradient norms logged (and clipped) are the true ones, the fp32 run's: without the
    scaler's unscale_ before the clipping, fp16 rows logged the scaled norm (86702 for 1.32) and clipped
    the scaled gradients, unnoticed."""
    model = micro_model()
    make_trainer(tmp_path / "fp16", model, poisoned_loss(bad_step=3), max_steps=5, dtype=torch.float16).fit()
    rows = metrics_rows(tmp_path / "fp16")
    assert [(r["step"], r["skipped_steps"]) for r in rows if "loss" in r] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    make_trainer(tmp_path / "fp32", micro_model(), poisoned_loss(bad_step=99), max_steps=2).fit()
    fp32 = metrics_rows(tmp_path / "fp32")
    norms = [r["grad_norm"] for r in rows if "loss" in r]
    # steps 1 and 2 start from the same weights in both runs (step 3, skipped in fp16, is where they part)
    assert norms[:2] == pytest.approx([r["grad_norm"] for r in fp32 if "loss" in r], rel=1e-2)
    assert all(0.1 < n < 10 for n in norms[:2] + norms[3:])  # (of an fp32 norm's size, not the scale's)


def test_fp16_skipped_steps_are_kept_over_a_resume(tmp_path):
    """The count of skipped fp16 steps is saved in the training state and restored by a resume: a
    resume that restored the step but not the count started the resumed rows at skipped_steps 0 again."""
    make_trainer(tmp_path, micro_model(), poisoned_loss(bad_step=3), max_steps=4, dtype=torch.float16).fit()
    folder = check_out_folder(tmp_path, resume=True)
    assert json.loads((folder / "training_state.json").read_text())["skipped_steps"] == 1
    model = micro_model()
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    resumed = make_trainer(tmp_path, model, poisoned_loss(bad_step=99), max_steps=6, dtype=torch.float16)
    resumed.resume(folder)
    assert resumed.step == 4 and resumed.skipped_steps == 1
    resumed.fit()
    rows = metrics_rows(tmp_path)
    assert [(r["step"], r["skipped_steps"]) for r in rows if "loss" in r] == [
        (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]


@pytest.mark.parametrize("fused", [False, True], ids=["written_out", "fused"])
def test_adamw_equals_torch_where_eps_matters(fused):
    """README: the hand-written AdamW is torch.optim.AdamW's mathematics. With gradients as small as
    eps, where the bias-corrected denominator sqrt(v^) + eps is decided by where eps goes (eps is
    added after the bias correction, in torch and transformers alike)."""
    from minigpt.optim import AdamW as Ours

    if fused and not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", "CPU"):
        pytest.skip("this PyTorch build has no fused AdamW on the CPU")

    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 64, generator=g) * 1e-3
    ours_p, torch_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = Ours([{"params": [ours_p], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999), eps=1e-6, fused=fused)
    theirs = torch.optim.AdamW([{"params": [torch_p], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    for _ in range(5):
        grad = torch.randn(4, 64, generator=g) * 1e-6  # the size of eps
        ours_p.grad, torch_p.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    moved = (torch_p - start).abs().max().item()  # measured 2.8e-2: five steps of about lr / 2
    assert (ours_p - torch_p).abs().max().item() <= 1e-5 * moved  # measured 3.7e-9 (fp32 rounding)


# --- under torchrun (CPU processes over gloo) ----------------------------------------------------

ddp = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
FLAGS = ("--preset", "tiny", "--no-progress", "--log-every", "1", "--batch-size", "4", "--dropout", "0")

# train.py with one rank made to fail: rank 1 raises inside its 3rd optimizer step.
FAILING_RANK = """
import os, runpy, sys

import minigpt.optim

real_step, calls = minigpt.optim.AdamW.step, []


def step(self):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("rank 1 broke down in step 3")
    real_step(self)


minigpt.optim.AdamW.step = step
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["MINIGPT_ROOT"], "train.py"), run_name="__main__")
"""


def torchrun(tmp_path: Path, script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": python_path(), "MINIGPT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1",
           "MINIGPT_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}  # torchrun leaves a folder there
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         *FLAGS, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True,
    )


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics_steps(out: Path) -> list[int]:
    try:
        return [row["step"] for row in metrics_rows(out)]
    except (OSError, ValueError):
        return []


@ddp
def test_a_data_error_under_torchrun_is_lines_not_tracebacks(tmp_path):
    """Rank 0 tokenizes while the others wait in a barrier; when it stops on bad data, the barrier
    fails in the others, which used to print torch's traceback. Now: rank 0's line, then theirs."""
    (tmp_path / "bad.jsonl").write_text('{"title": "t"}\n' * 3)
    job = torchrun(tmp_path, ROOT / "train.py", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "run"))
    try:
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "error: " + str(tmp_path / "bad.jsonl") + ": record 1 (line 1) has no 'answers.text' list of strings" in stderr
    assert "error: rank 1: rank 0 stopped while preparing the data" in stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.lstrip().startswith(f'File "{ROOT}')]
    assert ours == [] and "[rank1]: Traceback" not in stderr, stderr[-3000:]


def test_ctrl_c_is_one_line_for_a_torchrun_job():
    """torchrun passes Ctrl-C to every rank; only rank 0 says "interrupted" (they used to print it
    all at once: "interruptedinterrupted")."""
    from minigpt.cli import run

    def interrupted(argv):
        raise KeyboardInterrupt

    for rank, said in (("0", "interrupted\n"), ("1", "")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", rank)
            mp.setenv("WORLD_SIZE", "2")
            err = io.StringIO()
            mp.setattr(sys, "stderr", err)
            with pytest.raises(SystemExit) as stop:
                run(interrupted, [])
        assert stop.value.code == 130 and err.getvalue() == said


@ddp
@pytest.mark.slow
def test_a_failing_rank_brings_the_whole_job_down_with_its_message(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    job = torchrun(tmp_path, script, "--max-steps", "20", "--out", str(tmp_path / "run"))
    try:
        stdout, stderr = job.communicate(timeout=300)  # a rank left waiting would hang here
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "rank 1 broke down in step 3" in stderr, stderr[-3000:]
    # rank 0 finished step 3 (its gradients were already averaged) and went no further: it did not
    # wait forever in step 4's all-reduce for a rank that is gone
    assert metrics_steps(tmp_path / "run")[-1] in (2, 3)


# Two processes of a job set up by hand (no torchrun, whose SIGTERM could end the survivor first):
# rank 1 is SIGKILLed after 5 all-reduces; rank 0 goes on asking for more through the CLI boundary.
KILLED_RANK = """
import os, signal, sys
import torch
from minigpt.cli import run
from minigpt.ddp import all_reduce_sum, torchrun_process_group

def main(argv):
    with torchrun_process_group(torch.device("cpu")) as (ranks, device):
        for step in range(10_000):
            if ranks.rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            all_reduce_sum(torch.ones(4), ranks)

run(main)
"""


@ddp
def test_a_rank_killed_mid_run_leaves_the_others_one_line_not_a_traceback(tmp_path):
    """gloo's failed all-reduce in the surviving rank was a 30-line traceback ending "Connection
    reset by peer"; now it is one line that says another rank stopped."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "killed_rank.py"
    script.write_text(KILLED_RANK)
    env = {**os.environ, "PYTHONPATH": python_path(), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MINIGPT_DDP_TIMEOUT_MINUTES": "1"}
    jobs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": r, "LOCAL_RANK": r},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ("0", "1")]
    try:
        _, stderr = jobs[0].communicate(timeout=120)
        jobs[1].wait(timeout=60)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    assert jobs[1].returncode == -signal.SIGKILL
    assert jobs[0].returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: a collective with the other ranks failed ("), stderr
    assert lines[0].endswith("another rank stopped: see its lines above"), stderr


def test_an_error_every_rank_meets_is_printed_once_a_machine():
    """Under torchrun every rank checks the same flags, environment and files: an error they all
    meet (a missing device, an --out that is a file, a bad MINIGPT_DDP_TIMEOUT_MINUTES) is printed
    by local rank 0 alone (it was once a rank); an error of one rank's own, by that rank."""
    from minigpt.cli import run
    from minigpt.errors import MinigptError, alike_on_every_rank

    def alike(argv):
        with alike_on_every_rank():
            raise MinigptError("--device cuda: CUDA is not available")

    def its_own(argv):
        raise MinigptError("rank 1: its own")

    for local_rank, main, said in (("0", alike, "error: --device cuda: CUDA is not available\n"), ("1", alike, ""),
                                   ("1", its_own, "error: rank 1: its own\n")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", local_rank)
            mp.setenv("LOCAL_RANK", local_rank)
            mp.setenv("WORLD_SIZE", "2")
            err = io.StringIO()
            mp.setattr(sys, "stderr", err)
            with pytest.raises(SystemExit) as stop:
                run(main, [])
        assert (stop.value.code, err.getvalue()) == (2, said)


@ddp
def test_torchrun_says_a_wrong_out_or_a_live_run_once(tmp_path):
    """Two ranks on an --out that is a file: one error line for the job (it was one a rank). On the
    folder of a live run: rank 0's line naming the run; rank 1 used to add a wrong one of its own
    ("already holds a training run; pass --resume"), having looked at --out without the lock."""
    from minigpt.run_folder import RunLock

    (tmp_path / "a_file").write_text("x")
    job = torchrun(tmp_path, ROOT / "train.py", "--out", str(tmp_path / "a_file"))
    _, stderr = job.communicate(timeout=300)
    assert [line for line in stderr.splitlines() if "error:" in line] == \
        [f"error: --out {tmp_path / 'a_file'}: exists and is not a folder"], stderr[-3000:]

    live = tmp_path / "live"  # a run's folder with a checkpoint, as a live run has after its first save
    (live / ".ckpt" / "step-000000002").mkdir(parents=True)
    (live / ".ckpt" / "step-000000002" / "training_state.json").write_text('{"step": 2}')
    (live / ".ckpt" / "current").symlink_to("step-000000002")
    with RunLock(live):  # (this process holds it, as a live run would)
        job = torchrun(tmp_path, ROOT / "train.py", "--out", str(live))
        _, stderr = job.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "another training run" in errors[0], stderr[-3000:]


@ddp
@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step(tmp_path):
    """Ctrl-C reaches torchrun, which passes it on to the ranks: they agree on a step, rank 0
    saves it (a collective every rank must join), and --resume finishes the run."""
    out = tmp_path / "run"
    job = torchrun(tmp_path, ROOT / "train.py", "--max-steps", "60", "--out", str(out))
    try:
        while len(metrics_steps(out)) < 3 and job.poll() is None:
            try:
                job.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        assert job.poll() is None, job.communicate()[1][-3000:]
        os.kill(job.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends torchrun
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    # torchrun itself ends with a traceback of its SignalException; no rank may print one
    # (a frame is ours when its file lies in this repository: torch's own frames may sit in a
    # virtualenv whose path happens to contain "minigpt" too)
    ours = [line for line in stderr.splitlines() if line.lstrip().startswith(f'File "{ROOT}')]
    assert ours == [] and "stopping after this step" in stderr, stderr[-3000:]
    state = json.loads((out / "training_state.json").read_text())
    assert 3 <= state["step"] < 60 and state["world_size"] == 2
    assert metrics_steps(out)[-1] == state["step"]  # the checkpoint is the last step taken
    # torchrun can return while its ranks still wind down; rank 0 holds the run folder's lock until it
    # exits, so a resume started before then would be refused. Wait for the whole process group.
    deadline = time.monotonic() + 120
    while True:
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the first job's ranks did not exit"
        time.sleep(0.05)
    resumed = torchrun(tmp_path, ROOT / "train.py", "--max-steps", "60", "--out", str(out), "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert json.loads((out / "training_state.json").read_text())["step"] == 60


@pytest.mark.parametrize("command", [["bash", "benchmarks/gpu_check.sh"], [sys.executable, "benchmarks/gpu_check.py"]])
def test_the_gpu_check_stops_in_one_line_without_cuda(command):
    """(conftest hides any GPU from the tests that are not marked cuda: this runs as on a CPU machine)"""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and "no CUDA device here" in result.stderr


def test_the_gpu_check_says_when_no_python_has_torch(tmp_path):
    """It said "no CUDA device here (torch.cuda.is_available() is False)" where torch was missing."""
    for name in ("python3", "python"):  # (Pythons without torch)
        (tmp_path / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "gpu_check: no Python with torch here (tried python3 and python; set PYTHON=...); nothing was run"]


@pytest.mark.parametrize("gpu", [True, False], ids=["faked-gpu", "cpu"])
def test_the_gpu_check_refuses_a_wrong_option_before_it_runs_anything(tmp_path, gpu):
    """On a GPU machine (faked here: torch says CUDA is there) a mistyped option stops the script
    in one line before the CUDA tests, not minutes of lent device time later; on any machine a
    wrong option is a usage error (exit 2) and --help answers."""
    if gpu:
        (tmp_path / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--shapes", "8by128"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check.py: error: argument --shapes: '8by128' is not BATCHxBLOCK, e.g. 8x128 (see --help)"]
    assert result.stdout == ""  # (no step began: "== [0 s] python: ..." is the first)
    helped = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--budget", "60", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: gpu_check.py") and "--shapes" in helped.stdout


def test_the_gpu_check_takes_a_python_path_relative_to_where_it_is_started(tmp_path):
    """The script changes to the repository first: PYTHON=venv/bin/python, relative to where it was
    started, then named nothing and it fell through to "no Python with torch here"."""
    for name in ("python3", "python"):  # (Pythons without torch)
        (tmp_path / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / name).chmod(0o755)
    started = tmp_path / "elsewhere"
    (started / "venv").mkdir(parents=True)
    (started / "venv" / "python").write_text(f'#!/bin/sh\nexec "{os.path.abspath(sys.executable)}" "$@"\n')
    (started / "venv" / "python").chmod(0o755)
    env = {**os.environ, "PYTHON": "venv/python", "PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--shapes", "8by128"], cwd=started,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "'8by128' is not BATCHxBLOCK" in result.stderr  # (its gpu_check.py answered)


def test_the_llama_cpp_table_compares_our_greedy_decoding_round_by_round(monkeypatch, benchmarks_on_path):
    """llama-bench times decoding without sampling, so bench_sample.py's llama.cpp table sets our
    greedy rate against it (the top-k / top-p rate beside it), with each round's ratio and their median."""
    import argparse

    import bench_sample

    args = argparse.Namespace(tokens=100, prompt_tokens=10, reps=2, batches=[1], threads=2, llama_tokens=128, compile=False,
                              hardware=None)
    speed = {"kernels": {}, ("transformers fp32", 1): (0.05, 30.0), ("ours fp32", 1): (0.04, 70.0),
             ("ours bf16", 1): (0.01, 110.0), ("ours int8", 1): (0.01, 120.0),
             "greedy": {"fp32": 76.0, "bf16": 144.0, "int8": 150.0},
             "rounds": {"fp32": [0.9, 1.0], "bf16": [0.8, 0.7], "int8": [0.5, 0.56]}}
    llama = {"fp32": 80.0, "bf16": 180.0, "int8": 300.0}
    monkeypatch.setattr(bench_sample.hardware, "hardware_line", lambda hardware: "machine: test")
    table = bench_sample.report(args, speed, {}, {}, {}, llama)
    assert "| int8 | 150.0 | 120.0 | Q8_0 | 300.0 | 0.50x | 0.6x | 0.50x, 0.56x (median 0.53x) |" in table
    assert "| fp32 | 76.0 | 70.0 | F32 | 80.0 | 0.95x | 0.8x | 0.90x, 1.00x (median 0.95x) |" in table
    assert "Ours decoded eager here" in table  # (README's targets are for the compiled step)
    speed[bench_sample.HF_COMPILED, 1] = (0.05, 35.0)  # (timed only beside ours compiled)
    compiled = bench_sample.report(argparse.Namespace(**{**vars(args), "compile": True}), speed, {}, {}, {}, llama)
    assert "Ours decoded eager here" not in compiled
    # the decode table then sets ours compiled against transformers eager and transformers compiled, and says so
    assert "| batch | variant | tokens/s | vs transformers fp32 (eager) | vs transformers compiled |" in compiled
    assert "| 1 | ours fp32, compiled | 70.0 | 2.33x | 2.00x |" in compiled
    assert "| 1 | transformers fp32, eager | 30.0 | 1.00x | 0.86x |" in compiled
    assert "| 1 | transformers fp32 compiled | 35.0 | 1.17x | 1.00x |" in compiled
    assert bench_sample.HF_COMPILED not in table
    assert "| 1 | ours fp32 | 70.0 | 2.33x |" in table and "compiled" not in table.split("llama.cpp:")[0]
    assert bench_sample.parse_args([]).compile is False
    assert bench_sample.parse_args(["--compile"]).compile is True


def test_bench_sample_checks_the_llama_cpp_paths_before_it_starts(tmp_path, capsys, benchmarks_on_path):
    """A wrong llama-bench or converter path is a one-line error (exit 2) at once, not a traceback
    after minutes of preparing weights; llama-bench in a tree's build/bin finds the tree's converter."""
    import bench_sample

    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    bench = tree / "build" / "bin" / "llama-bench"
    bench.write_text("#!/bin/sh\n")
    def refused(path: Path) -> str:
        with pytest.raises(SystemExit) as stop:
            bench_sample.parse_args(["--llama-bench", str(path)])
        assert stop.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--llama-bench: " in refused(tmp_path / "nothing")
    assert "--llama-bench: " in refused(tmp_path)  # a folder
    assert "is not an executable file" in refused(bench)
    bench.chmod(0o755)
    assert "--llama-convert: " in refused(bench)  # no convert_hf_to_gguf.py in the tree
    (tree / "convert_hf_to_gguf.py").write_text("")
    args = bench_sample.parse_args(["--llama-bench", str(bench)])
    assert args.llama_convert == str((tree / "convert_hf_to_gguf.py").resolve())
    # against llama.cpp, a compiled engine, ours decode compiled unless told not to
    assert args.compile is True
    assert bench_sample.parse_args(["--llama-bench", str(bench), "--no-compile"]).compile is False
    # llama.cpp decodes as many tokens as ours (it decoded 128 whatever --tokens said)
    assert (args.tokens, args.llama_tokens) == (100, 100)
    assert bench_sample.parse_args(["--llama-bench", str(bench), "--quick"]).llama_tokens == 30
    assert bench_sample.parse_args(["--llama-bench", str(bench), "--llama-tokens", "64"]).llama_tokens == 64


def test_bench_sample_finds_a_failing_converter_or_llama_bench_before_any_timing(tmp_path, benchmarks_on_path):
    """A converter that exits 0 without writing a file, or a llama-bench that fails, was found only after
    every timed run (minutes of compiling and decoding); now as soon as the files are made."""
    import argparse

    import bench_sample

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"n_positions": 64}')
    converter, bench = tmp_path / "convert.py", tmp_path / "llama-bench"
    bench.write_text("#!/bin/sh\necho 'llama-bench: something broke' >&2\nexit 3\n")
    bench.chmod(0o755)
    args = argparse.Namespace(llama_convert=str(converter), llama_bench=str(bench), threads=1, llama_tokens=100)
    for work in "abc":
        (tmp_path / work).mkdir()
    converter.write_text("")  # exits 0, writes nothing
    with pytest.raises(MinigptError, match=r"llama\.cpp's converter wrote no model-f32\.gguf \(exit code 0\)"):
        bench_sample.llama_cpp_files(args, hf_dir, tmp_path / "a")
    converter.write_text("import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'w').write('GGUF')\n")
    with pytest.raises(MinigptError, match="llama-bench failed: llama-bench: something broke"):
        bench_sample.llama_cpp_files(args, hf_dir, tmp_path / "b")
    seen = tmp_path / "seen"
    bench.write_text(f"#!/bin/sh\necho \"$@\" > {seen}\nexit 3\n")  # (the first run: 2 tokens, 1 repetition)
    with pytest.raises(MinigptError):
        bench_sample.llama_cpp_files(args, hf_dir, tmp_path / "c")
    assert " -n 2 -p 0 -r 1 " in seen.read_text()


def test_the_benchmarks_measure_a_batch_size_or_shape_given_twice_once(benchmarks_on_path):
    """`--batches 1 1` measured batch 1 twice, printed both, and kept the second."""
    import bench_sample
    import gpu_check

    assert bench_sample.parse_args(["--batches", "1", "8", "1"]).batches == [1, 8]
    args = gpu_check.parse_args(["--shapes", "8x128", "8x128", "--dtypes", "bf16", "bf16", "fp32"])
    assert ([str(s) for s in args.shapes], args.dtypes) == (["8x128"], ["bf16", "fp32"])


def test_bench_train_draws_token_ids_of_the_models_own_vocabulary(tmp_path, monkeypatch, benchmarks_on_path):
    """Random tokens (the batch in a clone without the shared data folder beside it, and every memory measurement's)
    were drawn below 50,257 whatever the model's vocabulary: an IndexError traceback, or memory n/a."""
    import argparse

    from conftest import TINY_HF, save_hf_model
    from minigpt.tokenizer import Tokenizer

    folder = save_hf_model(tmp_path / "hf", **{**TINY_HF, "vocab_size": 300})
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / name).unlink(missing_ok=True)
    Tokenizer.train_bpe(["a model of few merges"] * 5, 300).save(folder / "tokenizer.json")
    import bench_train

    monkeypatch.setattr(bench_train, "SHARED", tmp_path / "no-shared")  # (a user's clone)
    args = argparse.Namespace(batch_size=4, block_size=64, loss_steps=0)
    [batch], what = bench_train.benchmark_batch(folder, args, torch.device("cpu"), 300)
    assert what == "random tokens" and batch.shape == (4, 64) and 250 < int(batch.max()) < 300
    spec = "|".join(["ours", "fp32", str(folder), "cpu", "2", "16", "300"])
    result = subprocess.run([sys.executable, bench_train.__file__, "--memory-child", spec], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": python_path()})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["peak_bytes"] > 0


def test_a_failed_tools_message_is_its_error_line_not_the_end_of_a_backtrace(benchmarks_on_path):
    """llama-bench crashing on an assert prints a backtrace after it: the one line shown was
    "360\t../csu/libc-start.c: No such file or directory."."""
    import bench_sample

    crash = ("llama.cpp/src/llama-context.cpp:951: GGML_ASSERT(n_tokens <= n_batch) failed\n"
             "#0  0x00007f in __GI___wait4\n360\t../csu/libc-start.c: No such file or directory.\n")
    failed = lambda stderr, code=1: subprocess.CompletedProcess([], code, "", stderr)  # noqa: E731
    assert bench_sample._last_line(failed(crash)).endswith("GGML_ASSERT(n_tokens <= n_batch) failed")
    assert bench_sample._last_line(failed("loading\nno such model\n")) == "no such model"
    assert bench_sample._last_line(failed("", 3)) == "exit code 3, no message"


def test_bench_sample_reads_llama_bench_or_says_what_it_got(tmp_path, benchmarks_on_path):
    """A binary that is not llama-bench (its output no JSON, or no row of a model) was a JSONDecodeError
    or KeyError traceback; a failure without a message printed "[]"."""
    import argparse

    import bench_sample

    files = {"fp32": tmp_path / "model-f32.gguf", "int8": tmp_path / "model-q8_0.gguf"}
    rows = [{"model_filename": str(f), "n_gen": 16, "avg_ts": 50.0 + i, "n_gpu_layers": 0}
            for i, f in enumerate(files.values())]
    on_gpu = [rows[0], {**rows[1], "n_gpu_layers": 99}]  # (what its default, -ngl 99, gives on a GPU build)
    outputs = {"good": json.dumps(rows), "not-json": "usage: echo", "one-model": json.dumps(rows[:1]),
               "on-gpu": json.dumps(on_gpu)}
    for name, out in outputs.items():
        fake = tmp_path / name
        fake.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/{name}.args"\ncat <<\'EOF\'\n{out}\nEOF\n')
        fake.chmod(0o755)
    fail = tmp_path / "fails"
    fail.write_text("#!/bin/sh\nexit 3\n")
    fail.chmod(0o755)
    args = lambda bench: argparse.Namespace(llama_bench=str(bench), threads=2, llama_tokens=16)  # noqa: E731
    assert bench_sample.llama_cpp_rates(args(tmp_path / "good"), files, 1) == {"fp32": 50.0, "int8": 51.0}
    # on the CPU, as ours: llama-bench's default (-ngl 99) puts every layer on a GPU (Metal, CUDA, Vulkan)
    assert " -ngl 0 " in f" {(tmp_path / 'good.args').read_text().strip()} "
    with pytest.raises(MinigptError, match=r"^llama-bench ran model-q8_0.gguf with 99 layers on a GPU \(n_gpu_layers "
                                           r"99\) though asked for -ngl 0; ours runs on the CPU"):
        bench_sample.llama_cpp_rates(args(tmp_path / "on-gpu"), files, 1)
    for name in ("not-json", "one-model"):
        with pytest.raises(MinigptError, match=rf"{name}: its output is not llama-bench's JSON .*; is --llama-bench "
                                               "llama.cpp's llama-bench\\?$"):
            bench_sample.llama_cpp_rates(args(tmp_path / name), files, 1)
    with pytest.raises(MinigptError, match=r"^llama-bench failed: exit code 3, no message$"):
        bench_sample.llama_cpp_rates(args(fail), files, 1)


def benchmark_argv(tmp_path, command) -> list[str]:
    """benchmarks/<command[0]>'s command line, its arguments' {tmp} and {data} being `tmp_path` and
    tests/data; a {tmp}/tokenizer.json named is GPT-2's (bench_data.py's default lies in the folder
    of shared material beside the repository, which a user's clone has not)."""
    if "{tmp}/tokenizer.json" in command:
        from minigpt.tokenizer import Tokenizer

        Tokenizer.from_vocab_merges(*gpt2_vocab_files()).save(tmp_path / "tokenizer.json")
    return [a.format(tmp=tmp_path, data=ROOT / "tests" / "data") for a in command]


def run_benchmark(tmp_path, command, env=None):
    """Run benchmarks/<command[0]> in a subprocess, in `tmp_path` (see `benchmark_argv`)."""
    argv = benchmark_argv(tmp_path, command)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env or os.environ)


# A sitecustomize.py that makes a package look uninstalled: importing it (or a submodule) raises
# ModuleNotFoundError, as in an environment without it.
HIDE_PACKAGE = """
import sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {name!r}:
            raise ModuleNotFoundError("No module named " + repr(name), name=name)

sys.meta_path.insert(0, Hide())
"""


@pytest.mark.parametrize("command, missing", [
    (["bench_sample.py", "--quick", "--skip", "memory", "e2e"], "transformers"),
    (["bench_train.py", "--quick"], "transformers"),
    (["bench_data.py", "--data", "{data}/eli5_small.json", "--tokenizer", "{tmp}/tokenizer.json"], "datasets"),
    (["bench_data.py", "--data", "{data}/eli5_small.json", "--tokenizer", "{tmp}/tokenizer.json"], "transformers"),
], ids=["bench_sample", "bench_train", "bench_data-datasets", "bench_data-transformers"])
def test_the_benchmarks_say_in_one_line_which_package_to_install(tmp_path, command, missing):
    """Without transformers (or datasets) a benchmark was a ModuleNotFoundError traceback, after the
    machine's peaks had been timed; now one line saying what to install, before anything is timed."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_PACKAGE.format(name=missing))
    result = run_benchmark(tmp_path, command, env={**os.environ, "PYTHONPATH": python_path(tmp_path)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f'error: {missing} is not installed (pip install -e ".[test]"); nothing '
                                          "was timed"]
    assert result.stdout == ""  # (no machine line: nothing was timed)


def test_bench_sample_runs_end_to_end_on_the_cpu_in_fp32_and_counts_the_new_tokens(tmp_path, monkeypatch, benchmarks_on_path):
    """sample.py's default device and dtype are a GPU in bf16 where there is one, and the card's
    pipeline() a GPU in fp32: both are told the CPU and fp32, where the machine line's figures are,
    and each says how many tokens it made (both stop at <|endoftext|>, with different seeds)."""
    import argparse

    import transformers
    from conftest import TINY_HF, save_hf_model

    import bench_sample

    script = tmp_path / "pipeline.py"
    script.write_text(bench_sample.PIPELINE_SCRIPT)
    hf_dir = save_hf_model(tmp_path / "hf", **TINY_HF)
    commands = bench_sample.e2e_commands(hf_dir, tmp_path / "minigpt", script)
    sample_runs = [c for c in commands.values() if c[1].endswith("sample.py")]
    assert len(sample_runs) == 2
    for command in sample_runs:
        assert "--device cpu --dtype fp32" in " ".join(command) and "--stats" in command
    [pipeline] = [c for c in commands.values() if c[1] == str(script)]
    new_keyword = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    assert pipeline[-1] == ("dtype" if new_keyword else "torch_dtype")  # (the benchmark takes an older transformers)
    env = {**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(pipeline, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(bench_sample.PROMPT)
    assert "(cpu, torch.float32)" in result.stderr, result.stderr[-2000:]
    assert 1 <= bench_sample.new_tokens(result.stderr) <= 100
    stats = "prompt tokens 10 | time to first token 0.052 s | new tokens 57 | decode 80.1 tokens/s"  # sample.py --stats
    assert bench_sample.new_tokens(f"kernels: ...\n{stats}\n") == 57 and bench_sample.new_tokens("") is None
    monkeypatch.setattr(bench_sample.hardware, "hardware_line", lambda hardware: "machine: test")
    e2e = {"python sample.py ...": (2.5, [57, 57]), "model card": (4.0, [100, 61])}
    table = bench_sample.report(argparse.Namespace(hardware=None), {}, {}, e2e, {}, {})
    assert "| python sample.py ... | 2.50 s | 57 |" in table and "| model card | 4.00 s | 100, 61 |" in table


def test_gpu_check_measures_each_precisions_mfu_against_its_own_peak(benchmarks_on_path):
    """fp32 runs TF32 matmuls on a GPU and its measured peak is TF32's; every row was divided by the
    bf16 peak. Now each precision by its own, fp16 by bf16's where fp16's was not measured."""
    import gpu_check

    peaks = {"fp32": 400e12, "bf16": 800e12}
    assert gpu_check.matmul_peak_for("fp32", peaks) == (400e12, "TF32")
    assert gpu_check.mfu(100e12, 0.5, "fp32", peaks) == pytest.approx(0.5)
    assert gpu_check.mfu(100e12, 0.5, "bf16", peaks) == pytest.approx(0.25)
    assert gpu_check.matmul_peak_for("fp16", peaks) == (800e12, "bf16")
    assert gpu_check.matmul_peak_for("fp16", {**peaks, "fp16": 700e12}) == (700e12, "fp16")
    assert gpu_check.mfu(70e12, 1.0, "fp16", {**peaks, "fp16": 700e12}) == pytest.approx(0.1)


def test_gpu_check_times_transformers_decode_as_the_fastest_runs_and_refuses_a_negative_rate(monkeypatch, benchmarks_on_path):
    """transformers' decode rate is a difference of two timings (a whole run less its first token):
    timed once each, noise made it -41.6 tokens/s in CI. Each is now its fastest of 3 runs, and a
    difference that is not positive is an error (a row saying so), never a rate."""
    import gpu_check

    class Generate:  # transformers' generate(): prompt + `max_new_tokens` ids, each run taking its given seconds
        device = torch.device("cpu")

        def __init__(self, *seconds):
            self.seconds, self.clock = iter(seconds), 0.0

        def generate(self, ids, max_new_tokens, **kwargs):
            self.clock += next(self.seconds)
            return torch.zeros(ids.size(0), ids.size(1) + max_new_tokens, dtype=torch.long)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: model.clock)
    # an untimed whole run, then 3 of the first token alone, then 3 whole ones: the fastest of each count
    model = Generate(0.0, 9.0, 1.0, 5.0, 30.0, 11.0, 12.0)
    assert gpu_check.decode_rate(model, True, 2, 16) == pytest.approx(15 * 2 / (11.0 - 1.0))
    model = Generate(*[1.0] * 7)  # as slow with 1 token as with 16: no rate to give
    with pytest.raises(RuntimeError, match=r"^16 tokens timed no slower than 1 \(1000\.0 vs 1000\.0 ms\): too few "
                                           r"--tokens to time$"):
        gpu_check.decode_rate(model, True, 1, 16)


@pytest.mark.parametrize("command, error", [
    (["bench_train.py", "--dtype", "fp32,fp16"],
     "error: --dtype fp16: half precision is not supported on the CPU (use fp32, or bf16: "
     "bf16 is fast only on CPUs with AVX-512 BF16 or AMX)"),
    (["bench_train.py", "--dtype", "fp8"],
     "bench_train.py: error: --dtype: unknown precision 'fp8' (choose from fp32, bf16, fp16) (see --help)"),
    (["bench_train.py", "--block-size", "5000", "--quick"],
     "error: --block-size 5000: distilgpt2 sees at most 1024 tokens"),
    (["bench_train.py", "--model", "{tmp}/small", "--block-size", "65"],
     "error: --block-size 65: {tmp}/small sees at most 64 tokens"),
    (["bench_train.py", "--model", "{tmp}/minigpt"],
     "error: --model {tmp}/minigpt: a minigpt checkpoint; give an HF GPT-2 folder "
     "(convert_hf_weights.py --to-hf makes one) or a Hub id"),
    (["bench_train.py", "--loss-steps", "-1"],
     "bench_train.py: error: argument --loss-steps: '-1' is not an integer >= 0 (see --help)"),
    (["bench_data.py", "--data", "{tmp}/bad.jsonl", "--tokenizer", "{tmp}/tokenizer.json"],
     "error: {tmp}/bad.jsonl: record 1 (line 1) has no 'answers.text' list of strings"),
    (["bench_data.py", "--data", "{data}/docs.txt"],
     "bench_data.py: error: {data}/docs.txt: --data takes .json/.json.gz/.jsonl files "
     "(the recipe reads them with load_dataset(\"json\")) (see --help)"),
    (["bench_data.py", "--data", "{data}/eli5_small.csv"],
     "bench_data.py: error: {data}/eli5_small.csv: --data takes .json/.json.gz/.jsonl files "
     "(the recipe reads them with load_dataset(\"json\")) (see --help)"),
    (["bench_sample.py", "--model", "{tmp}/missing", "--skip", "memory", "e2e"],
     "error: {tmp}/missing: no such file or folder"),
    (["bench_sample.py", "--eval-checkpoint", "{tmp}/small", "--eval-data", "{tmp}/missing.jsonl", "--skip", "speed",
      "memory", "e2e"],
     "error: {tmp}/missing.jsonl: no such file or folder (--eval-data)"),
    (["bench_sample.py", "--model", "{tmp}/small", "--skip", "memory", "e2e"],
     "error: --tokens: 100 new tokens after the 10-token prompt exceed the model's context window of 64 positions, "
     "which transformers' generate() does not slide"),
    (["bench_sample.py", "--model", "{tmp}/small", "--tokens", "54", "--skip", "speed", "memory"],
     "error: the end-to-end run (--skip e2e leaves it out): 100 new tokens after the 10-token prompt exceed the model's "
     "context window of 64 positions, which transformers' generate() does not slide"),
    # (the model's own tokenizer counts the prompt: GPT-2's counted 10 tokens, and 10 + 40 fit)
    (["bench_sample.py", "--model", "{tmp}/small-bpe", "--tokens", "40", "--skip", "memory", "e2e"],
     "error: --tokens: 40 new tokens after the {bpe}-token prompt exceed the model's context window of 64 positions, "
     "which transformers' generate() does not slide"),
    (["bench_sample.py", "--model", "{tmp}/small", "--skip", "speed", "memory", "e2e", "--llama-bench",
      "{tmp}/llama-bench", "--llama-convert", "{tmp}/convert.py", "--llama-tokens", "65"],
     "error: --llama-tokens 65 (by default --tokens) exceed the model's context window of 64 positions, which "
     "llama-bench does not slide"),
    (["gpu_check.py", "--shapes", "8x128", "8x2048", "--check-options"],
     "gpu_check.py: error: --shapes 8x2048: distilgpt2 sees at most 1024 tokens (see --help)"),
    (["bench_sample.py", "--tokens", "1", "--skip", "memory", "e2e"],
     "bench_sample.py: error: --tokens: at least 2 new tokens are timed, got 1 (see --help)"),
    (["gpu_check.py", "--tokens", "1", "--check-options"],
     "gpu_check.py: error: --tokens: at least 2 new tokens are timed, got 1 (see --help)"),
    (["gpu_check.py", "--tokens", "1015", "--check-options"],
     "gpu_check.py: error: --tokens 1015: after the 10-token prompt, beyond distilgpt2's 1024 positions (see --help)"),
], ids=["fp16-on-cpu", "unknown-dtype", "block-size-above-distilgpt2", "block-size-above-the-model",
        "minigpt-checkpoint", "negative-loss-steps", "data-outside-the-schema", "plain-text-data", "csv-data", "missing-model",
        "missing-eval-data", "decode-beyond-the-window", "e2e-beyond-the-window", "the-models-own-tokenizer",
        "llama-beyond-the-window", "gpu-shape-beyond-the-window",
        "one-token", "gpu-one-token", "gpu-decode-beyond-the-window"])
def test_the_benchmarks_refuse_bad_input_in_one_line(tmp_path, command, error, monkeypatch, benchmarks_on_path):
    """Exit 2 and a one-line error, before any model is built or anything timed (conftest hides
    any GPU: fp16 meets a CPU; a 64-position config stands for any --model)."""
    from minigpt.tokenizer import Tokenizer

    (tmp_path / "bad.jsonl").write_text('{"title": "t"}\n')
    tokenizers = {"small": Tokenizer.from_vocab_merges(*gpt2_vocab_files()),
                  "small-bpe": Tokenizer.train_bpe(["a model of few merges"] * 5, 300)}
    for name, tokenizer in tokenizers.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "gpt2", "n_positions": 64, "vocab_size": 300}')
        tokenizer.save(tmp_path / name / "tokenizer.json")
    (tmp_path / "minigpt").mkdir()
    (tmp_path / "minigpt" / "config.json").write_text('{"n_layer": 2}')  # (a GPTConfig: no model_type)
    (tmp_path / "llama-bench").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "llama-bench").chmod(0o755)
    (tmp_path / "convert.py").write_text("")
    monkeypatch.chdir(tmp_path)  # (in this process, as the CLI tests run: a subprocess a case took 2-4 s, 40 s in all)
    script, *argv = benchmark_argv(tmp_path, command)
    result = call_cli(f"benchmarks/{script}", *argv)
    assert result.returncode == 2, result.stderr[-2000:]
    import bench_sample

    bpe = len(tokenizers["small-bpe"].encode(bench_sample.PROMPT))
    assert bpe + 40 > 64
    assert result.stderr.splitlines() == [error.format(tmp=tmp_path, data=ROOT / "tests" / "data", bpe=bpe)]


@pytest.mark.parametrize("command, error", [
    (["train.py", "--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
    (["sample.py", "--top-p", "2", "hi"], "argument --top-p: '2' is not a number in (0, 1]"),
    (["convert_hf_weights.py", "gpt2"], "the following arguments are required: --out"),
    (["benchmarks/bench_train.py", "--steps", "x"], "argument --steps: 'x' is not a positive integer"),
    (["benchmarks/bench_sample.py", "--batches"], "argument --batches: expected at least one argument"),
    (["benchmarks/bench_data.py", "--rounds", "0"], "argument --rounds: '0' is not a positive integer"),
    (["benchmarks/gpu_check.py", "--bogus"], "unrecognized arguments: --bogus"),
    (["benchmarks/hardware.py", "--bogus"], "unrecognized arguments: --bogus"),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_every_command_states_a_usage_error_in_one_line(command, error):
    """argparse would print the whole usage text above the error; ours is the one line that says
    what was wrong (and where to look), exit 2, as every other error of theirs."""
    result = call_cli(*command)  # (in this process the program's name is pytest's)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.split(": error: ", 1)[1] == f"{error} (see --help)"


def test_the_machine_line_names_the_instruction_set_torch_runs_and_any_cap(monkeypatch, benchmarks_on_path):
    """An older CPU emulated on a newer one (torch's and its libraries' instruction sets capped, as
    README's AVX2 runs on the AVX-512 machine) says so in every benchmark's machine line."""
    import hardware

    from minigpt.runtime import ISA_CAPS

    for name in ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    running = torch.backends.cpu.get_cpu_capability()
    assert hardware.cpu_kernels() == f"torch kernels {running}"
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = "capped: ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2"
    assert hardware.cpu_kernels() == f"torch kernels {running}, {capped}"


def test_the_machine_line_says_when_fp32_ran_as_tf32(monkeypatch, benchmarks_on_path):
    """bench_train and gpu_check time the peak after train.py's TF32 setting, hardware.py alone
    before it: both printed "matmul peak fp32" (a GPU's TF32 peak is several times its fp32's)."""
    import hardware

    monkeypatch.setattr(hardware, "matmul_peak", lambda device, dtype: (1e12, 1024))
    monkeypatch.setattr(hardware, "memory_read_bandwidth", lambda device: 1e11)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a GPU")
    before = torch.backends.cuda.matmul.allow_tf32
    try:  # (not monkeypatch: torch's flag object cannot have the attribute deleted back)
        for tf32, label in ((False, "matmul peak fp32 1,000.0"), (True, "matmul peak fp32 (TF32) 1,000.0")):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            assert label in hardware.hardware_line(hardware.describe(torch.device("cuda")))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert "matmul peak fp32 1,000.0" in hardware.hardware_line(hardware.describe(torch.device("cpu")))


def test_the_gpu_check_runs_every_cell_where_a_gpu_is_faked(benchmark_scripts, tiny_hf_dir, monkeypatch, capsys):
    """gpu_check.py runs only where a GPU is lent, which is seldom: here every cell of it runs on the
    CPU, torch telling the script that CUDA is there, a tiny model standing in for distilgpt2 and
    torch.compile for the identity (what compiling does is tested elsewhere), so that a change to
    what the script calls (bench_train's two sides, CompiledDecoding, generate,
    prepare_for_inference, the Trainer's fp16 scaler) fails here, not as an error row in a lent
    machine's minutes."""
    import bench_train
    import gpu_check

    import minigpt.runtime

    real = torch.cuda.is_available  # (the script is told CUDA is there; torch itself, e.g. its fused AdamW,
    monkeypatch.setattr(torch.cuda, "is_available",  # which would start CUDA then, is told the truth)
                        lambda: sys._getframe(1).f_globals.get("__name__") == "gpu_check" or real())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)
    monkeypatch.setattr(minigpt.runtime, "setup_device", lambda device, dtype: (torch.device("cpu"), torch.float32))
    # (the prompt's ids and the random batches are GPT-2's: the tiny model has its whole vocabulary)
    monkeypatch.setattr(bench_train, "model_folder", lambda args, tmp: tiny_hf_dir)

    rc = gpu_check.main(["--shapes", "2x16", "--compile-shapes", "2x16", "1x8", "--steps", "2", "--warmup", "1",
                         "--tokens", "16", "--budget", "600"])
    out = capsys.readouterr().out
    rows = table_rows(out, "what")
    assert rc == 0, out
    cells = {tuple(row[:4]) for row in rows}
    for precision in ("fp32", "bf16"):
        for batch in (1, 8):
            for side in ("transformers generate()", "ours", "ours, compiled"):
                assert ("decode", f"batch {batch}", precision, side) in cells
    assert ("decode", "batch 8", "int8", "ours") in cells
    for precision in ("fp32", "bf16", "fp16"):
        assert {("train", "2x16", precision, side) for side in ("transformers", "ours")} <= cells
        assert {("train", shape, precision, "ours, compiled (reduce-overhead)") for shape in ("2x16", "1x8")} <= cells
    assert len(rows) == len(cells) == 4 * 3 + 2 + 6 + 2 * 3
    for row in rows:  # tokens/s a number, a ratio to transformers where the shape has its row (not 1x8)
        assert float(row[5].replace(",", "")) > 0, row
        assert row[6].endswith("x") == (row[1] != "1x8"), row
    assert "decode batch 1 fp32, ours compiled: decoding compiled" in out
