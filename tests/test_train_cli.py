"""train.py end to end: the tiny preset, SIGKILL + --resume, Ctrl-C, and one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, call_cli, needs_cpu_compiler, python_path, run_cli
from minigpt.data import tiny_preset_path
from minigpt.errors import MinigptError

# Fast and reproducible settings on top of the tiny preset: short runs, no progress bars.
QUICK = ("--preset", "tiny", "--no-progress", "--log-every", "1")


@pytest.fixture(autouse=True)
def environment(tmp_path_factory, monkeypatch):
    """One token cache for the whole module, and one thread per process (the runs are tiny, and
    a second thread only waits when the machine is busy)."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path_factory.getbasetemp() / "train-cli-cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def start(out: Path, *args: str) -> subprocess.Popen:
    """train.py in the background, in its own process group (so a signal reaches only it)."""
    env = {**os.environ, "PYTHONPATH": python_path()}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *QUICK, "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True,
    )


def checkpoint_step(out: Path) -> int | None:
    try:
        return json.loads((out / "training_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_speed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]


def prepared_validation_losses(checkpoint: Path) -> dict[str, float]:
    """The validation loss of `checkpoint` on its run's validation split, with the model prepared for
    inference in fp32, in bf16 and quantized to int8 by each int8 kernel this build has."""
    from minigpt.data import DataConfig, load_blocks, tiny_preset_path
    from minigpt.inference import available_kernels, prepare_for_inference
    from minigpt.loading import load_model

    variants = [("fp32", torch.float32, None, None), ("bf16", torch.bfloat16, None, None)]
    variants += [(f"int8 {k}", torch.float32, "int8", k) for k in available_kernels("int8")]
    losses = {}
    for label, dtype, quantize, kernel in variants:
        model, tokenizer = load_model(checkpoint, "cpu", dtype)
        model = prepare_for_inference(model, quantize, kernel=kernel)
        _, val = load_blocks(DataConfig(source=str(tiny_preset_path()), block_size=model.config.block_size),
                             tokenizer, progress=False)
        blocks = torch.from_numpy(val.blocks[:].astype("int64"))
        with torch.inference_mode():
            losses[label] = sum(float(model(b, b)[1]) * len(b) for b in blocks.split(8)) / len(blocks)
    return losses


@pytest.mark.slow
def test_tiny_preset_trains_then_samples_and_exports(tmp_path):
    out = tmp_path / "tiny"
    result = run_cli("train.py", "--preset", "tiny", "--no-progress", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    for line in ("parameters", "tokens per step", "steps per epoch", "device: cpu, precision fp32"):
        assert line in result.stdout
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert len(val) >= 10 and val[-1] < val[0] - 0.5
    assert (out / "loss.png").is_file()

    sampled = run_cli("sample.py", "--model", str(out), "--max-new-tokens", "12", "--seed", "0", "Why is the sky blue?")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("Why is the sky blue?") and len(sampled.stdout) > len("Why is the sky blue?") + 5

    # int8 keeps the trained model's validation loss within 0.1% of fp32, whichever kernel computes it
    # (measured +0.00% for each: per-channel scales lose little); bf16 within 1%
    losses = prepared_validation_losses(out)
    assert losses["fp32"] < val[0] - 0.5, losses  # the weights trained, the loss is not ln(vocab)'s
    for label, loss in losses.items():
        assert abs(loss / losses["fp32"] - 1) < (0.01 if label == "bf16" else 0.001), (label, losses)
    assert len(losses) >= 3, losses  # fp32, bf16 and at least one int8 kernel

    exported = run_cli("convert_hf_weights.py", "--to-hf", str(out), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    from transformers import GPT2LMHeadModel

    from minigpt.loading import load_model

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, tokenizer = load_model(out)
    idx = torch.tensor([tokenizer.encode("Why do cats purr?")])
    with torch.no_grad():
        # measured 1.7e-6 (logits up to 7.3): fp32 rounding; a wrong tensor or GELU moves them far more
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-5


def test_the_tiny_preset_continues_from_a_loaded_model(tmp_path, monkeypatch, capsys):
    """--preset tiny --init RUN: the preset's shape (--n-layer ...) is a new model's, so a loaded one
    keeps its own, while the preset's data, block size and other settings still apply. (The preset's
    shape used to count as given, and the run was refused: "--n-layer needs --init scratch".)"""
    import train
    from minigpt.train_flags import parse_train_flags

    flags = parse_train_flags(["--preset", "tiny", "--init", "some/run"], "")
    assert (flags.init, flags.n_layer, flags.n_head, flags.n_embd) == ("some/run", None, None, None)
    assert (flags.block_size, flags.lr, flags.out) == (64, 2e-3, "checkpoints/tiny")
    assert parse_train_flags(["--preset", "tiny"], "").n_layer == 2
    with pytest.raises(SystemExit):  # a shape given by hand for a loaded model is still refused
        parse_train_flags(["--preset", "tiny", "--init", "some/run", "--n-layer", "3"], "")
    assert "--n-layer needs --init scratch" in capsys.readouterr().err

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    first, more = tmp_path / "first", tmp_path / "more"
    train.main([*QUICK, "--max-steps", "3", "--out", str(first)])
    train.main([*QUICK, "--init", str(first), "--max-steps", "2", "--out", str(more)])
    assert [r["step"] for r in metrics(more) if "loss" in r] == [1, 2]
    capsys.readouterr()
    train.main(["--preset", "tiny", "--no-progress", "--init", str(more), "--eval-only"])  # the preset's split
    evaluated = re.findall(r"validation loss ([0-9.]+)", capsys.readouterr().out)
    assert [float(v) for v in evaluated] == [pytest.approx(
        [r["val_loss"] for r in metrics(more) if "val_loss" in r][-1], abs=1e-4)]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    flags = ("--max-steps", "30", "--save-every", "5", "--dropout", "0.1")
    whole = run_cli("train.py", *QUICK, "--out", str(tmp_path / "whole"), *flags, timeout=240)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = start(out, *flags)
    try:
        deadline = time.monotonic() + 120
        while (checkpoint_step(out) or 0) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = checkpoint_step(out)
    assert proc.returncode == -signal.SIGKILL and killed_at is not None and killed_at < 30

    # the run's checkpoint is neither overwritten nor continued with other settings
    again = call_cli("train.py", *QUICK, "--out", str(out), *flags)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: --out {out}: already holds a training run (checkpoint at step {killed_at}); pass --resume "
        "to continue it, or choose another --out"
    ]
    other = call_cli("train.py", *QUICK, "--out", str(out), *flags, "--lr", "0.1", "--resume")
    assert other.returncode == 2
    assert other.stderr.startswith(f"error: --resume: the run in {out} was made with --lr 0.002, not 0.1")
    assert checkpoint_step(out) == killed_at

    resumed = run_cli("train.py", *QUICK, "--out", str(out), *flags, "--resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out} at step {killed_at}" in resumed.stdout

    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(tmp_path / "whole" / "training_state.safetensors"))
    b = load_file(str(out / "training_state.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # optimizer moments and RNG states too
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))  # one row per step
    assert without_speed(rows) == without_speed(metrics(tmp_path / "whole"))


def test_same_fine_tune_twice_is_bitwise_equal(tmp_path, tiny_hf_dir):
    """--seed decides every draw of a fine-tune too (dropout 0.1 from an HF folder): the same command
    twice gives the same weights, bit for bit, and the same metrics rows (but their timings)."""
    flags = ("--init", str(tiny_hf_dir), "--data", str(ROOT / "tests" / "data" / "eli5_small.jsonl"),
             "--block-size", "32", "--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--log-every", "1",
             "--dropout", "0.1", "--seed", "7", "--no-progress")
    for run in ("a", "b"):
        result = call_cli("train.py", *flags, "--out", str(tmp_path / run))
        assert result.returncode == 0, result.stderr
        assert "seed 7" in result.stdout
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    rows = without_speed(metrics(tmp_path / "a"))
    assert rows == without_speed(metrics(tmp_path / "b")) and len(rows) == 7  # 4 steps, 3 evaluations
    # and the seed matters: another one draws other dropout masks
    other = call_cli("train.py", *flags, "--seed", "8", "--out", str(tmp_path / "c"))
    assert other.returncode == 0, other.stderr
    assert metrics(tmp_path / "c")[0]["loss"] != rows[0]["loss"]


def test_the_seed_decides_the_batch_order(tmp_path, tiny_hf_dir):
    """--seed decides the order the training batches come in (README: "data split and order"): with the
    same weights (--init), no dropout and no split (--val-data), only the order can tell two seeds apart.
    A BatchIterator built without seed=args.seed drew every run's order from its default 42, and the
    test above still passed (its seeds differ in dropout)."""
    flags = ("--init", str(tiny_hf_dir), "--data", str(ROOT / "tests" / "data" / "eli5_small.jsonl"),
             "--val-data", str(ROOT / "tests" / "data" / "docs.txt"), "--block-size", "32", "--batch-size", "4",
             "--max-steps", "1", "--log-every", "1", "--dropout", "0", "--no-progress")
    runs = {}
    for seed in ("7", "42"):
        result = call_cli("train.py", *flags, "--seed", seed, "--out", str(tmp_path / seed))
        assert result.returncode == 0, result.stderr
        data_line = next(line for line in result.stdout.splitlines() if line.startswith("data: "))
        state = json.loads((tmp_path / seed / "training_state.json").read_text())
        runs[seed] = data_line, state["data"]["seed"], metrics(tmp_path / seed)[0]["loss"]
    assert runs["7"][0] == runs["42"][0]  # the same blocks, all of --data for training
    assert (runs["7"][1], runs["42"][1]) == (7, 42)  # the order's seed, saved for the resume
    assert runs["7"][2] != runs["42"][2]  # the first step's batch, so its loss, is another


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--max-steps", "100000")
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    step = checkpoint_step(out)
    assert step is not None and step == max(r["step"] for r in metrics(out))
    assert f"stopped at step {step}: checkpoint saved in {out}; to continue, run the same command with --resume" in stderr
    assert (out / "loss.png").is_file()  # (the curve so far, as a finished run draws it)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--device", "tpu"), "--device: unknown device 'tpu'"),
        (("--dtype", "fp16", "--device", "cpu"), "--dtype fp16: half precision is not supported on the CPU"),
        (("--dtype", "fp8"), "--dtype: unknown precision 'fp8'"),
        (("--resume",), "holds no checkpoint to resume from"),
        (("--data", "no/such/file.jsonl"), "no/such/file.jsonl: no such file or folder (--data)"),
        # a path flag's error names the flag, as --data's does (it read "error: no/such/model: no such file or folder")
        (("--init", "./no/such/model"), "--init no/such/model: no such file or folder"),
        (("--init", "scratch", "--tokenizer", "./no/such/tokenizer.json"),
         "--tokenizer no/such/tokenizer.json: no such file or folder"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, args, message):
    import train

    with pytest.raises(MinigptError) as e:
        train.main([*QUICK, "--out", str(tmp_path / "out"), *args])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_source_path_that_is_not_utf8_is_refused_before_any_work(tmp_path, tiny_hf_dir):
    """A POSIX path may be any bytes. --data with one trained (the file read well), then failed
    with a traceback at the first save, writing the model card that names it: the work up to it
    lost, --out left without a checkpoint. Each source the card and the run's settings name is now
    refused in one line before any work, as --out is; one in UTF-8 beside it is taken."""
    import shutil

    import train

    odd = lambda name: tmp_path / os.fsdecode(b"caf\xe9-" + name.encode())  # noqa: E731
    data = shutil.copy(ROOT / "tests" / "data" / "eli5_small.jsonl", odd("data.jsonl"))
    model = shutil.copytree(tiny_hf_dir, odd("model"))
    cases = [("--data", str(data)), ("--val-data", str(data)), ("--init", str(model)), ("--tokenizer", str(model))]
    for flag, path in cases:
        extra = ("--init", "scratch") if flag == "--tokenizer" else ()
        with pytest.raises(MinigptError) as e:
            train.main([*QUICK, *extra, "--out", str(tmp_path / "out"), flag, path])
        assert str(e.value) == (f"{path}: the path is not UTF-8 ({flag} is written into the model card and the run's "
                                "settings, which are UTF-8 text); choose a name in UTF-8")
        assert not (tmp_path / "out").exists()
    result = call_cli("train.py", *QUICK, "--out", str(tmp_path / "out"), "--data", str(data))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not UTF-8 (--data" in result.stderr
    assert not (tmp_path / "out").exists()


def test_auto_picks_cuda_then_mps_then_the_cpu_and_bf16_where_the_gpu_has_it(monkeypatch):
    """README's `--device auto` and `--dtype auto`: no test reached them (the CPU tests pin auto to
    the CPU, and the GPU tests name cuda), so "auto ignores the GPU" passed everywhere."""
    from conftest import unpinned_resolve_device as resolve_device
    from minigpt.runtime import resolve_dtype

    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert resolve_device("auto") == resolve_device() == torch.device(expected)
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        assert resolve_dtype("auto", torch.device("cuda")) == expected
        assert resolve_dtype("auto", torch.device("cpu")) == resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_a_device_this_machine_lacks_is_refused_in_one_line(monkeypatch):
    """`--device mps` (or cuda) where there is none is one line naming the flag, before anything is
    loaded. Without the MPS check, resolve_device returned torch.device("mps") on Linux, and the run
    failed later in torch, with a traceback; no test asked for MPS by name."""
    from minigpt import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MinigptError) as err:
        runtime.setup_device("mps", "fp32", runtime.CLI_NAMES)
    assert str(err.value) == "--device mps: Apple MPS is not available on this machine (try --device cpu)"
    with pytest.raises(MinigptError) as err:
        runtime.resolve_device("mps:0")
    assert str(err.value) == "device='mps': Apple MPS is not available on this machine (try device='cpu')"
    with pytest.raises(MinigptError) as err:
        runtime.setup_device("cuda", "fp32", runtime.CLI_NAMES)
    assert str(err.value) == "--device cuda: CUDA is not available on this machine (try --device cpu)"


def test_a_device_is_named_as_torch_names_it(monkeypatch):
    """`setup_device` takes a torch.device, and "cuda:N" (or torch's bare N) for a GPU of several,
    checked against the GPUs there are (and made the current one); under torchrun a numbered GPU is
    refused: each rank drives GPU LOCAL_RANK, and the number would be replaced in silence."""
    from minigpt import ddp, runtime

    assert runtime.setup_device(torch.device("cpu"), "fp32") == (torch.device("cpu"), torch.float32)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert runtime.resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert runtime.setup_device("cuda:1", "fp32") == (torch.device("cuda", 1), torch.float32)
    assert current == [torch.device("cuda", 1)]
    with pytest.raises(MinigptError, match=r"^device='cuda:2': this machine has 2 GPU\(s\), numbered from 0"):
        runtime.resolve_device("cuda:2")  # (errors name the argument as Python spells it; the CLIs, as their flag)
    with pytest.raises(MinigptError, match=r"^--device cuda:2: this machine has 2 GPU\(s\), numbered from 0"):
        runtime.setup_device("cuda:2", "fp32", runtime.CLI_NAMES)
    for bad in ("cuda:x", "cuda:", "cuda:-1", "cpu:1", "mps:1", "auto:1", "gpu", "meta", True):
        with pytest.raises(MinigptError, match=re.escape(f"device: unknown device {bad!r} (choose from ")):
            runtime.resolve_device(bad)
    # what torch also names these: a bare index is a GPU's; a CPU tensor's device may read "cpu:0"
    assert runtime.resolve_device(1) == torch.device("cuda", 1)
    assert runtime.resolve_device("cpu:0") == runtime.resolve_device(torch.device("cpu", 0)) == torch.device("cpu", 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda *args, **kw: pytest.fail("joined a group"))
    with pytest.raises(MinigptError, match="^--device cuda:1: under torchrun each process drives GPU LOCAL_RANK; "
                                          "use --device cuda$"):
        with ddp.torchrun_process_group(torch.device("cuda", 1)):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none_is_one_line_and_exit_2(tmp_path):
    result = run_cli("train.py", *QUICK, "--out", str(tmp_path / "out"), "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --device cuda: CUDA is not available on this machine (try --device cpu)"
    ]


@pytest.mark.parametrize(
    "args, complaint",
    [
        (("--lr", "0"), "argument --lr: '0' is not a positive number"),
        (("--batch-size", "-1"), "argument --batch-size: '-1' is not a positive integer"),
        (("--dropout", "1.5"), "argument --dropout: '1.5' is not a number in [0, 1)"),
        (("--init", "gpt2", "--n-layer", "2"), "--n-layer needs --init scratch"),
        # --tokenizer is a new model's too: a loaded model used to ignore it in silence
        (("--init", "gpt2", "--tokenizer", "gpt2"), "--tokenizer needs --init scratch (a loaded model keeps its tokenizer)"),
        (("--preset", "tiny", "--init", "some/run", "--tokenizer", "gpt2"), "--tokenizer needs --init scratch"),
        (("--init", "gpt2", "--eval-only", "--tokenizer", "gpt2"), "--tokenizer needs --init scratch"),
        # an empty path is "." to pathlib: the current folder would be read from or written into
        (("--data", ""), "argument --data: empty path"),
        (("--val-data", ""), "argument --val-data: empty path"),
        (("--out", ""), "argument --out: empty path"),
        (("--init", ""), "argument --init: empty path"),
        (("--tokenizer", ""), "argument --tokenizer: empty path"),
        # as sample.py words it (train.py's own check said "is too large (at most 9223372036854775807)")
        (("--seed", str(2**63)), "argument --seed: '9223372036854775808' is not a seed in [0, 2**63) (see --help)"),
    ],
)
def test_bad_flags_exit_2(tmp_path, args, complaint, capsys):
    import train

    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2 and complaint in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    "args, complaint",
    [
        (("--init", "gpt2", "--eval-only", "--out", "run"), "--out has no effect with --eval-only, which writes "
         "nothing; to evaluate a run's checkpoint, give its folder as --init"),
        (("--init", "gpt2", "--eval-only", "--lr", "1e-4"), "--lr has no effect with --eval-only, which trains nothing"),
        (("--init", "gpt2", "--eval-only", "--max-steps", "5"), "--max-steps has no effect with --eval-only"),
        (("--init", "gpt2", "--eval-only", "--compile"), "--compile has no effect with --eval-only"),
        (("--init", "gpt2", "--eval-only", "--dropout", "0"), "--dropout has no effect with --eval-only"),
        (("--preset", "tiny", "--init", "run", "--eval-only", "--log-every", "5"), "--log-every has no effect"),
        (("--init", "gpt2", "--eval-only", "--save-every", "0"), "--save-every has no effect"),  # at its default too
        (("--val-data", "v.json", "--val-fraction", "0.1"), "--val-fraction has no effect with --val-data: it "
         "splits --data's records, and with --val-data none are split; give one of them"),
    ],
)
def test_a_flag_that_would_change_nothing_is_refused(args, complaint, capsys):
    """A flag that has no effect in the mode asked for is a usage error naming it: `--eval-only --out
    RUN` evaluated distilgpt2 and `--lr` was dropped in silence."""
    from minigpt.train_flags import parse_train_flags

    with pytest.raises(SystemExit) as e:
        parse_train_flags(list(args), "")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and complaint in err, err


def test_eval_only_keeps_the_flags_that_decide_its_blocks():
    """--eval-only takes the flags that decide the validation blocks and how they are read; a
    preset's defaults (its --out, --lr, ...) are not flags given, so they are no reason to refuse."""
    from minigpt.train_flags import parse_train_flags

    flags = parse_train_flags(["--preset", "tiny", "--init", "run", "--eval-only", "--val-fraction", "0.3",
                               "--seed", "5", "--batch-size", "3", "--block-size", "32", "--max-records", "9",
                               "--format", "qa", "--device", "cpu", "--dtype", "fp32", "--no-progress"], "")
    assert (flags.val_fraction, flags.seed, flags.batch_size, flags.block_size, flags.lr) == (0.3, 5, 3, 32, 2e-3)
    assert parse_train_flags(["--val-data", "v.json"], "").val_fraction == 0.2
    # a run made with both before they were refused together still resumes with its settings
    assert parse_train_flags(["--val-data", "v.json", "--val-fraction", "0.1", "--resume"], "").val_fraction == 0.1


def test_init_from_an_hf_model_with_a_head_of_its_own_is_refused(tmp_path, tiny_hf_dir):
    """--init reads an HF folder through the same loader as sample.py and convert_hf_weights.py: an
    lm_head.weight other than wte (which minigpt's head is) is refused in one line, before any output;
    it used to be dropped in silence, and another model than the file's fine-tuned."""
    import shutil

    from safetensors.torch import save_file

    folder = shutil.copytree(tiny_hf_dir, tmp_path / "hf")
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "lm_head.weight": -state["transformer.wte.weight"]}, str(folder / "model.safetensors"))
    result = call_cli("train.py", *QUICK, "--init", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --init {folder}: lm_head.weight differs from transformer.wte.weight: an LM head of its own, which "
        "minigpt cannot load (its head is the token embedding, tied as in GPT-2)"
    ]
    assert not (tmp_path / "out").exists()


def test_one_paragraph_of_data_names_the_split_that_took_it(tmp_path):
    """--data of a single paragraph is one record, and --val-fraction's split (rounded up) takes it:
    the one-line error says so and what works, and the first remedy it names trains. (It used to be
    "the train data (0 records) has 0 tokens, fewer than one block of 64 (--block-size)".)"""
    data = tmp_path / "ok.txt"
    data.write_text(" ".join(f"word{i}" for i in range(200)) + "\n")
    result = call_cli("train.py", *QUICK, "--data", str(data), "--max-steps", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: only 1 record, and the validation split (--val-fraction 0.2, rounded up) takes it, leaving "
        "none to train on; pass --val-fraction 0, a separate --val-data, or more paragraphs (a .txt file's records "
        "are its paragraphs, separated by blank lines)"
    ]
    assert not (tmp_path / "out").exists()
    result = call_cli("train.py", *QUICK, "--data", str(data), "--val-fraction", "0", "--max-steps", "2",
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert [row["step"] for row in metrics(tmp_path / "out") if "loss" in row] == [1, 2]


def test_an_out_under_no_users_home_is_refused_not_made(tmp_path, monkeypatch):
    """`--out ~nosuchuser/run` trained into a folder named "~nosuchuser" in the current folder (the
    converter refused the same path): one line now, as every other path flag, and nothing made."""
    monkeypatch.chdir(tmp_path)
    result = call_cli("train.py", *QUICK, "--max-steps", "1", "--out", "~nosuchuser49/run")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: ~nosuchuser49/run: ~nosuchuser49 is no user's home folder here"], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_out_folder_of_something_else_is_refused(tmp_path):
    import train

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MinigptError, match="holds 'notes.txt', which is not from a minigpt training run"):
        train.main([*QUICK, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_help_explains_every_flag():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    for flag in ("--init", "--data", "--val-data", "--format", "--max-records", "--block-size", "--batch-size",
                 "--grad-accum", "--lr", "--weight-decay", "--warmup-steps", "--epochs", "--max-steps",
                 "--max-grad-norm", "--dropout", "--seed", "--device", "--dtype", "--compile", "--out",
                 "--log-every", "--eval-every", "--save-every", "--resume", "--preset"):
        assert flag in result.stdout
    # every default is shown, 0 too (`0 in (None, False)` is true: the zeros were hidden)
    help_text = " ".join(result.stdout.split())
    for shown in ("--warmup-steps N linear warm-up steps before the linear decay (default: 0)",
                  "--save-every N checkpoint every N steps; 0: at the end only (default: 0)",
                  "--lr X peak learning rate (default: 2e-05)"):
        assert shown in help_text, help_text


def test_the_presets_help_states_what_it_sets():
    """--help's --preset text states the tiny preset's settings; each stated one is the value the preset
    applies. `epochs=10` in TINY_PRESET while the help said "12 epochs" went unnoticed (a test ran the
    preset, none read its epoch count)."""
    import train
    from minigpt.train_flags import TINY_PRESET, TINY_VOCAB

    result = call_cli("train.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    text = text[text.index("--preset {tiny} tiny: "):text.index("keeps its shape and dropout")]
    patterns = dict(
        n_layer=r"a (\d+)-layer,", n_embd=r", (\d+)-wide model", init=r"model trained from (scratch) ",
        block_size=r"\(block (\d+),", batch_size=r" batch (\d+),", lr=r" lr ([\d.e-]+),",
        warmup_steps=r" (\d+) warm-up steps,", epochs=r" (\d+) epochs,", dropout=r" dropout ([\d.]+),",
        log_every=r" --log-every (\d+),", save_every=r" --save-every (\d+),", out=r" out ([\w/]+)\)",
    )
    stated = {}
    for name, pattern in patterns.items():
        found = re.findall(pattern, text)
        assert len(found) == 1, (name, pattern, text)
        stated[name] = found[0]
    assert set(TINY_PRESET) - set(stated) == {"n_head"}  # (the help names no head count)
    for name, value in stated.items():
        assert type(TINY_PRESET[name])(value) == TINY_PRESET[name], (name, value, TINY_PRESET[name])
    assert f"with a {TINY_VOCAB:,}-token vocabulary" in text
    flags = train.parse_args(["--preset", "tiny"])
    assert (flags.epochs, flags.warmup_steps, flags.lr, flags.block_size) == (12, 20, 2e-3, 64)


def test_tokenizer_applies_to_a_new_model_even_with_the_preset(tiny_minigpt_dir):
    """--tokenizer given is used (the preset's own vocabulary only stands in when it is not), and its
    default is the recipe's for a new model without the preset."""
    import train
    from minigpt.train_flags import RECIPE_MODEL
    from minigpt.training_run import build_model

    model, tokenizer, _ = build_model(train.parse_args([*QUICK, "--tokenizer", str(tiny_minigpt_dir)]), None)
    assert tokenizer.vocab_size == model.config.vocab_size == 50257  # GPT-2's, not the preset's 2,048
    assert build_model(train.parse_args(list(QUICK)), None)[1].vocab_size == 2048
    assert train.parse_args(["--init", "scratch"]).tokenizer_source() == RECIPE_MODEL


def test_eval_only_with_val_data_reads_only_that_file(tmp_path, tiny_minigpt_dir, monkeypatch):
    """--eval-only --val-data scores --init on that file's blocks alone: the training data (by default
    the Hub's, unreachable offline) is never read. The loss is that of those blocks, all of them."""
    from minigpt import sources
    from minigpt.data import DataConfig, load_blocks
    from minigpt.loading import load_model

    data = str(ROOT / "tests" / "data" / "eli5_small.jsonl")
    monkeypatch.setattr(sources, "load_eli5_records", lambda *a: pytest.fail("the training data was read"))
    monkeypatch.chdir(tmp_path)
    result = call_cli("train.py", "--eval-only", "--init", str(tiny_minigpt_dir), "--val-data", data,
                      "--block-size", "8", "--batch-size", "64", "--no-progress")
    assert result.returncode == 0, result.stderr
    loss = float(re.search(r"^validation loss (\d+\.\d+) ", result.stdout, re.MULTILINE).group(1))
    model, tokenizer = load_model(tiny_minigpt_dir)
    cfg = DataConfig(source=data, val_source=data, block_size=8, cache_dir=str(tmp_path / "oracle"))
    blocks = torch.from_numpy(load_blocks(cfg, tokenizer, progress=False)[1].blocks[:].astype("int64"))
    with torch.no_grad():  # one batch: the mean over every scored token
        expected = float(model.eval()(blocks, blocks)[1])
    assert f"{len(blocks):,} validation blocks of 8 tokens" in result.stdout
    assert loss == pytest.approx(expected, rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle"]  # eval-only wrote nothing


def test_a_resume_with_other_settings_names_them_readably(tmp_path, monkeypatch):
    """A flag the run was made without is "without --max-records", not Python's "None"; strings are
    not quoted as Python writes them."""
    from minigpt.run_folder import check_same_run

    def refusal(saved, current):
        with pytest.raises(MinigptError) as e:
            check_same_run(tmp_path, saved, current)
        return str(e.value).removeprefix(f"--resume: the run in {tmp_path} was made ").split(";")[0]

    assert refusal({"--max-records": None}, {"--max-records": 30}) == "without --max-records, not with --max-records 30"
    assert refusal({"--max-records": 30}, {"--max-records": None}) == "with --max-records 30, not without it"
    assert refusal({"--format": "answers"}, {"--format": "qa"}) == "with --format answers, not qa"
    assert refusal({"--lr": 0.002}, {"--lr": 0.1}) == "with --lr 0.002, not 0.1"
    assert refusal({}, {"--val-data": "/v.jsonl"}) == "without --val-data, not with --val-data /v.jsonl"
    # a path moved or deleted since keeps its text (it cannot be resolved): the same place still
    # passes, whichever side was recorded so ("made with --init /abs/base, not base" refused a resume
    # that reads the checkpoint, not --init); another place is refused
    monkeypatch.chdir(tmp_path)
    gone = str(tmp_path / "base")
    check_same_run(tmp_path, {"--init": gone}, {"--init": "base"})
    check_same_run(tmp_path, {"--init": "base"}, {"--init": gone})
    assert refusal({"--init": gone}, {"--init": "other"}) == f"with --init {gone}, not other"

    out = tmp_path / "run"
    assert call_cli("train.py", *QUICK, "--max-steps", "1", "--out", str(out)).returncode == 0
    again = call_cli("train.py", *QUICK, "--max-steps", "1", "--out", str(out), "--resume", "--max-records", "30")
    assert again.returncode == 2 and again.stderr.splitlines() == [
        f"error: --resume: the run in {out} was made without --max-records, not with --max-records 30; "
        "resume with the same settings, or choose another --out"]
    # a resume loads the checkpoint's tokenizer: another --tokenizer would be ignored, so it is refused
    again = call_cli("train.py", *QUICK, "--max-steps", "1", "--out", str(out), "--resume", "--tokenizer", "gpt2")
    assert again.returncode == 2 and again.stderr.splitlines() == [
        f"error: --resume: the run in {out} was made without --tokenizer, not with --tokenizer gpt2; "
        "resume with the same settings, or choose another --out"]
    # a loop setting that changes the numbers too (it was taken silently once its `run=True` was lost)
    again = call_cli("train.py", *QUICK, "--max-steps", "1", "--out", str(out), "--resume", "--max-grad-norm", "0.25")
    assert again.returncode == 2 and again.stderr.splitlines() == [
        f"error: --resume: the run in {out} was made with --max-grad-norm 1.0, not 0.25; "
        "resume with the same settings, or choose another --out"]
    # settings the data does not decide are compared before any data is read: a --resume without the
    # run's data flags is told so, not sent to the (here unreachable) Hub for the recipe's data
    bare = call_cli("train.py", "--out", str(out), "--resume", "--no-progress")
    assert bare.returncode == 2 and bare.stderr.splitlines() == [
        f"error: --resume: the run in {out} was made with --batch-size x processes 16, not 8; "
        "resume with the same settings, or choose another --out"], bare.stderr
    # another --max-steps too (it does not wait for the data to count the steps): no token cache is made
    fresh = tmp_path / "fresh-cache"
    shared = os.environ["MINIGPT_CACHE"]
    monkeypatch.setenv("MINIGPT_CACHE", str(fresh))
    steps = call_cli("train.py", *QUICK, "--max-steps", "2", "--out", str(out), "--resume")
    monkeypatch.setenv("MINIGPT_CACHE", shared)
    assert steps.returncode == 2 and steps.stderr.splitlines() == [
        f"error: --resume: the run in {out} was made with steps (--epochs / --max-steps) 1, not 2; "
        "resume with the same settings, or choose another --out"], steps.stderr
    assert not fresh.exists()
    other_data = call_cli("train.py", *QUICK, "--max-steps", "1", "--out", str(out), "--resume", "--data", "eli5_category")
    assert other_data.returncode == 2 and len(other_data.stderr.splitlines()) == 1, other_data.stderr
    assert re.match(rf"error: --resume: the run in {re.escape(str(out))} was made (with --data .+|without --data), "
                    r"not (with --data )?eli5_category; ", other_data.stderr), other_data.stderr


def test_a_resume_compares_exactly_the_settings_readme_lists():
    """README's list of the settings a --resume must repeat is the list the code compares (both ways):
    a flag that lost its `run=True` (--max-grad-norm, --warmup-steps) was taken silently by a resume
    with another value while README promised a refusal, and no test noticed."""
    from minigpt.train_flags import TrainFlags

    readme = (ROOT / "README.md").read_text()
    start = readme.index("`--resume` takes the same settings as the run it continues")
    promise = " ".join(readme[start:readme.index(". It refuses others", start)].split())
    must, may = promise.split(": ", 1)[1].split(" (", 1)
    assert must.startswith("the model's shape and ") and must.endswith(" and the step count"), must
    listed = set(re.findall(r"`(--[a-z-]+)`", must)) | {"--n-layer", "--n-head", "--n-embd"}
    compared = TrainFlags().run_config(world_size=1, dtype_name="fp32", max_steps=3)
    assert "steps (--epochs / --max-steps)" in compared
    assert {k.split()[0] for k in compared if k.startswith("--")} == listed
    assert "--batch-size x processes" in compared and "`--batch-size` x processes" in must
    may_change = set(re.findall(r"`(--[a-z-]+)`", may))
    assert may_change == {"--device", "--compile", "--log-every", "--eval-every", "--save-every", "--no-progress"}
    assert not may_change & listed
    assert {"--max-grad-norm", "--warmup-steps", "--seed", "--lr"} <= listed  # (the ones the code once dropped)


def test_a_data_file_edited_since_the_checkpoint_is_refused_on_resume(tmp_path):
    """A data file edited in place under the same path (as many blocks, other tokens) was resumed
    silently, the run going on with the new blocks (README said so). Now the checkpoint keeps each
    split's blocks' sha256 and a resume over other blocks is refused in one line, the training file's
    and the validation file's alike; put back, the same resume runs."""
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text(tiny_preset_path().read_text(encoding="utf-8"), encoding="utf-8")
    val.write_text((ROOT / "tests" / "data" / "eli5_small.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    flags = (*QUICK, "--data", str(data), "--val-data", str(val), "--max-steps", "2", "--out", str(out))
    assert call_cli("train.py", *flags).returncode == 0
    for path in (data, val):
        kept = path.read_text(encoding="utf-8")
        first, second, *rest = kept.splitlines(keepends=True)
        path.write_text("".join([second, first, *rest]), encoding="utf-8")  # two records swapped: same tokens
        again = call_cli("train.py", *flags, "--resume")
        role = "training" if path == data else "validation"  # (its path, not the one that first built the cache entry)
        assert again.returncode == 2 and again.stderr.splitlines() == [
            f"error: --resume: the {role} data ({path}) is not what the run was saved with (as many blocks, other "
            "tokens: a file edited since?); resume with the same data, or start a new run"], again.stderr
        path.write_text(kept, encoding="utf-8")
    again = call_cli("train.py", *flags, "--resume")
    assert again.returncode == 0 and "warning: --resume" not in again.stderr, again.stderr
    assert f"resumed from {out} at step 2" in again.stdout
    # Grown, under --epochs: the step count the data makes changed too, but the data is named, not the steps
    flags = (*QUICK, "--data", str(data), "--val-data", str(val), "--epochs", "1", "--out", str(tmp_path / "epochs"))
    assert call_cli("train.py", *flags).returncode == 0
    kept = data.read_text(encoding="utf-8")
    data.write_text(kept + kept, encoding="utf-8")
    again = call_cli("train.py", *flags, "--resume")
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1, again.stderr
    assert re.fullmatch(rf"error: --resume: the training data \({re.escape(str(data))}\) is not what the run was saved "
                        r"with \((\d+) blocks, now (\d+): a file edited since\?\); resume with the same data, or start a "
                        r"new run\n", again.stderr), again.stderr


def test_a_resume_under_another_cpu_thread_count_warns_in_one_line(tmp_path):
    """A run is bitwise equal to an uninterrupted one only under the same CPU thread count (README);
    a resume under another count went on without a word. It warns in one line now, and still runs."""
    out = tmp_path / "run"
    flags = (*QUICK, "--max-steps", "1", "--out", str(out))
    threads = torch.get_num_threads()
    assert call_cli("train.py", *flags).returncode == 0
    torch.set_num_threads(threads + 1)
    try:
        with warnings.catch_warnings(record=True) as caught:  # (pytest records warnings: the CLI's stderr has none)
            warnings.simplefilter("always")
            other = call_cli("train.py", *flags, "--resume")
    finally:
        torch.set_num_threads(threads)
    assert other.returncode == 0, other.stderr
    assert [str(w.message) for w in caught if "--resume" in str(w.message)] == [
        f"--resume: the run was saved with {threads} CPU thread{'s' * (threads != 1)}, this process has "
        f"{threads + 1}: it goes on equal to an uninterrupted run to float rounding, not bitwise "
        f"(OMP_NUM_THREADS={threads} for that)"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = call_cli("train.py", *flags, "--resume")
    assert same.returncode == 0 and not [w for w in caught if "--resume" in str(w.message)], same.stderr


def test_a_preset_run_resumes_after_the_clone_moves(tmp_path):
    """--preset tiny's data was recorded by its absolute path inside the package, so a run could not be
    resumed once the clone moved (or the package was installed elsewhere): "made with --data
    /old/clone/minigpt/assets/eli5_tiny.jsonl, not /new/clone/...". It is recorded by its place in the
    package; the same run resumed from a copy of the code elsewhere goes on."""
    import shutil

    out = tmp_path / "run"
    assert call_cli("train.py", *QUICK, "--max-steps", "2", "--save-every", "1", "--out", str(out)).returncode == 0
    state_files = sorted((out / ".ckpt").glob("step-*/training_state.json"))
    state = json.loads(state_files[-1].read_text())
    assert state["run"]["--data"] == "<minigpt>/assets/eli5_tiny.jsonl"
    moved = tmp_path / "moved"
    shutil.copytree(ROOT / "minigpt", moved / "minigpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "train.py", moved)
    env = {**os.environ, "PYTHONPATH": str(moved)}
    again = subprocess.run([sys.executable, str(moved / "train.py"), *QUICK, "--max-steps", "3", "--out", str(out),
                            "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "with steps (--epochs / --max-steps) 2, not 3" in again.stderr  # (the code moved)
    again = subprocess.run([sys.executable, str(moved / "train.py"), *QUICK, "--max-steps", "2", "--out", str(out),
                            "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "done: step 2" in again.stdout, again.stderr
    # a run recorded by older versions (by the absolute path) resumes where the package still is
    for file in state_files:
        old = json.loads(file.read_text())
        old["run"]["--data"] = str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl")
        file.write_text(json.dumps(old))
    assert call_cli("train.py", *QUICK, "--max-steps", "2", "--out", str(out), "--resume").returncode == 0


def test_compile_without_a_working_compiler_is_one_line(tmp_path, monkeypatch):
    """Training with --compile on the CPU checked for no C++ compiler: without one it was an
    inductor traceback at the first step, after the run's folder was made."""
    monkeypatch.setenv("CXX", "no-such-compiler")
    result = call_cli("train.py", *QUICK, "--max-steps", "1", "--compile", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: torch.compile on the CPU needs a C++ compiler (no-such-compiler not found, or it fails to run): it "
        "writes and builds C++ there"], result.stderr
    assert not (tmp_path / "run").exists()


@needs_cpu_compiler
def test_cuda_graphs_asked_for_on_the_cpu_are_noted(tmp_path, monkeypatch):
    """--compile-mode reduce-overhead on the CPU ran without a word, though CUDA graphs are a GPU's
    (torch.compile itself is replaced: what is asked and said is checked, not the compiling)."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda module, mode: asked.append(mode) or module)
    result = call_cli("train.py", *QUICK, "--max-steps", "1", "--compile", "--compile-mode", "reduce-overhead",
                      "--device", "cpu", "--out", str(tmp_path / "run"))
    assert result.returncode == 0 and asked == ["reduce-overhead"], result.stderr
    assert ("note: --compile-mode reduce-overhead replays CUDA graphs, which only a GPU has: on cpu it brings nothing "
            "over the default mode") in result.stderr.splitlines()


def test_a_new_model_beyond_the_memory_is_one_line(tmp_path, monkeypatch):
    """A shape under the parameter cap but beyond the memory (--block-size 100000000: 12.8 billion
    parameters) was the allocator's 22-line traceback."""
    monkeypatch.setattr("minigpt.runtime.available_memory", lambda device: 2**30)
    out = tmp_path / "out"
    result = call_cli("train.py", *QUICK, "--block-size", str(2**20), "--out", str(out))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --n-layer 2 --n-embd 128 --block-size {2**20}: the new model with its gradients and AdamW's moments "
        "(134,876,672 parameters, 2.2 GB) does not fit in memory"]
    assert not out.exists()


def test_the_summary_says_what_a_step_takes_and_warns_of_a_warm_up_longer_than_the_run(tmp_path):
    """A batch beyond the training set was announced as "1000 examples, 64,000 tokens per step" (a step
    takes the 110 blocks there are); a warm-up longer than the run, where the learning rate never
    reaches --lr, was announced as "20 warm-up steps, then linear decay to 0"."""
    result = call_cli("train.py", *QUICK, "--batch-size", "1000", "--max-steps", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "= 110 examples (the whole training set), 7,040 tokens per step" in result.stdout
    assert ("warning: --warmup-steps 20 is not fewer than the run's 2 steps: the learning rate only rises, to 0.0001 "
            "at the last step, never to --lr 0.002") in result.stderr.splitlines()


def test_an_epoch_whose_batches_do_not_divide_by_grad_accum_ends_with_a_shorter_step(tmp_path):
    """--epochs counts whole passes: 7 batches of the preset's 110 blocks at --grad-accum 3 are 3 steps
    (3 + 3 + 1 micro-batches), and the run ends at epoch 1.0. Counted with a floor division, an epoch was
    2 steps and `--epochs 1` stopped at epoch 0.8571, leaving the last batch untrained."""
    result = call_cli("train.py", *QUICK, "--epochs", "1", "--grad-accum", "3", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "schedule: 3 steps per epoch, 3 steps (1 epoch); lr 0.002" in result.stdout
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, pytest.approx(3 / 7, abs=1e-4)),
                                                       (2, pytest.approx(6 / 7, abs=1e-4)), (3, 1.0)]


def test_weight_decay_and_max_grad_norm_reach_the_optimizer_and_the_clipping(tmp_path, monkeypatch):
    """--weight-decay and --max-grad-norm are what each step uses: by default the recipe's (weight decay 0.01
    on the matrices and embeddings, 0 on biases and LayerNorm weights; gradients clipped at 1.0), and the
    values given otherwise. Spied on where the step uses them: the optimizer's groups, as each step finds
    them, and the max_norm handed to the clipping."""
    import minigpt.optim
    import minigpt.trainer

    seen = {"groups": [], "max_norm": []}
    step, clip = minigpt.optim.AdamW.step, minigpt.trainer.clip_grad_norm

    def spy_step(self, *args, **kwargs):
        seen["groups"].append([(g["weight_decay"], {p.dim() >= 2 for p in g["params"]}) for g in self.param_groups])
        return step(self, *args, **kwargs)

    def spy_clip(params, max_norm, *args, **kwargs):
        seen["max_norm"].append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(minigpt.optim.AdamW, "step", spy_step)
    monkeypatch.setattr(minigpt.trainer, "clip_grad_norm", spy_clip)
    for run, flags, decay, max_norm in (("defaults", (), 0.01, 1.0),
                                        ("given", ("--weight-decay", "0.1", "--max-grad-norm", "0.5"), 0.1, 0.5)):
        seen.update(groups=[], max_norm=[])
        result = call_cli("train.py", *QUICK, "--max-steps", "2", *flags, "--out", str(tmp_path / run))
        assert result.returncode == 0, result.stderr
        # (matrices and embeddings decayed; biases and LayerNorm weights not)
        assert seen["groups"] == [[(decay, {True}), (0.0, {False})]] * 2, run
        assert seen["max_norm"] == [max_norm] * 2, run


def test_flags_that_would_change_nothing_in_training_are_refused(tiny_hf_dir):
    """--eval-every without validation data evaluated nothing; --preset tiny set a loaded model's dropout
    to 0 (its card and config said so), where --dropout's default is the model's own."""
    import train

    for resume in ((), ("--resume",)):  # (a resume too: the run it continues had no validation data either)
        with pytest.raises(SystemExit):
            train.parse_args([*QUICK, "--val-fraction", "0", "--eval-every", "2", *resume])
    assert train.parse_args([*QUICK, "--init", str(tiny_hf_dir)]).dropout is None
    assert train.parse_args(list(QUICK)).dropout == 0.0


def test_an_out_after_an_equals_sign_has_its_tilde_expanded(tmp_path, monkeypatch):
    """`--out=~/run` (no shell expands a ~ after "=") trained the whole run, then failed at its first
    save ("cannot point it to step-..."), leaving a folder "~" here and half a run in the home folder.
    `~` is the home folder's, as everywhere else; so is a Trainer's out."""
    from minigpt.loading import load_model

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = call_cli("train.py", *QUICK, "--max-steps", "2", "--out=~/run")
    run = tmp_path / "home" / "run"
    assert result.returncode == 0, result.stderr
    assert f"out: {run}" in result.stdout.splitlines() and not (tmp_path / "~").exists()
    assert json.loads((run / "training_state.json").read_text())["step"] == 2 and load_model(run)[0] is not None
    result = call_cli("train.py", *QUICK, "--max-steps", "1", "--block-size", "1", "--out", str(tmp_path / "one"))
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "train.py: error: argument --block-size: '1' is not an integer >= 2 (a block predicts its tokens after the "
        "first) (see --help)")


def test_without_matplotlib_the_missing_curve_is_noted(tmp_path, monkeypatch):
    """Without matplotlib (no `plot` extra) loss.png was skipped without a word."""
    import sys

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
            patch.setitem(sys.modules, name, None)  # (an import of it fails, as when it is not installed)
        result = call_cli("train.py", *QUICK, "--max-steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert 'note: loss.png is not drawn: matplotlib is not installed (pip install -e ".[plot]")' in \
        result.stderr.splitlines()
    assert (out / "metrics.jsonl").is_file() and not (out / "loss.png").exists()
    with_it = call_cli("train.py", *QUICK, "--max-steps", "2", "--out", str(tmp_path / "with"))
    assert "loss.png" not in with_it.stderr and (tmp_path / "with" / "loss.png").is_file()


def test_the_clis_defaults_are_the_librarys():
    """The CLIs write some of the library's defaults again (they must not import torch before --help):
    train.py's data and loop flags are DataConfig's and TrainConfig's, sample.py's --top-alternatives
    is the trace's. Checked here so that changing one place alone fails."""
    import sample
    from minigpt.data import DataConfig
    from minigpt.trace import TOP_ALTERNATIVES
    from minigpt.train_flags import parse_train_flags
    from minigpt.trainer import TrainConfig

    flags = parse_train_flags([], "")
    assert flags.data_config() == DataConfig()
    assert flags.train_config(7, torch.float32) == TrainConfig(max_steps=7)
    assert sample.parse_args(["a prompt", "--trace", "t.jsonl"]).top_alternatives == TOP_ALTERNATIVES


def test_a_run_killed_between_its_first_checkpoint_and_its_link_resumes(tmp_path, monkeypatch):
    """A kill after a run's first step folder was renamed into place and before `.ckpt/current` was
    made left a complete checkpoint that every command refused ("holds checkpoint folders but no
    valid .ckpt/current link"): the link had to be made by hand. --resume makes it, says so in one
    line, and the run ends as the uninterrupted one; a new run there is refused as over a run."""
    from minigpt.run_folder import CKPT_DIR, CURRENT
    from minigpt.trainer import Trainer

    flags = (*QUICK, "--max-steps", "4")
    assert call_cli("train.py", *flags, "--out", str(tmp_path / "whole")).returncode == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # stopped after step 2, saving it: the first save
        m.setattr(Trainer, "_should_stop", lambda self, agree_now=False: self.step >= 2)
        with pytest.raises(KeyboardInterrupt):
            call_cli("train.py", *flags, "--out", str(out))
    (out / CKPT_DIR / CURRENT).unlink()  # as the kill left it: the step folder, complete, not linked
    [folder] = (out / CKPT_DIR).iterdir()
    read = call_cli("sample.py", "--model", str(out), "hi")  # (it said "no config.json", a link leading nowhere)
    assert read.returncode == 2 and read.stderr.splitlines() == [
        f"error: {out}: a training run with no checkpoint in force (stopped in its first save?); `train.py --resume` "
        "with the run's flags links the one it wrote"], read.stderr
    fresh = call_cli("train.py", *flags, "--out", str(out))
    assert fresh.returncode == 2 and fresh.stderr.splitlines() == [
        f"error: --out {out}: already holds a training run (checkpoint at step 2); pass --resume to continue it, "
        "or choose another --out"], fresh.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = call_cli("train.py", *flags, "--out", str(out), "--resume")
    assert resumed.returncode == 0 and f"resumed from {out} at step 2" in resumed.stdout, resumed.stderr
    assert [str(w.message) for w in caught if "--resume" in str(w.message)] == [
        f"--resume: {out / CKPT_DIR / CURRENT} was missing (a run stopped in its first save, between writing its "
        f"checkpoint and linking it): it now names that checkpoint, {folder.name}"]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_speed(metrics(out)) == without_speed(metrics(tmp_path / "whole"))


def test_dropout_given_with_init_is_the_models_and_keeps_its_weights(tiny_hf_dir):
    """--dropout with --init sets the loaded model's dropout (the card and saved config say it), and
    only that: the weights are --init's, bit for bit; without the flag the model keeps its own."""
    import train
    from minigpt.loading import load_model
    from minigpt.training_run import build_model

    reference, _ = load_model(tiny_hf_dir)
    flags = ["--init", str(tiny_hf_dir), "--data", str(ROOT / "tests" / "data" / "eli5_small.jsonl")]
    model, _, _ = build_model(train.parse_args([*flags, "--dropout", "0.25"]), None)
    assert model.config.dropout == 0.25 != reference.config.dropout
    assert model.config == dataclasses.replace(reference.config, dropout=0.25)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert build_model(train.parse_args(flags), None)[0].config == reference.config
