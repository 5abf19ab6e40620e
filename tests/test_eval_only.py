"""train.py --eval-only: transformers' loss on the same validation blocks, and nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, call_cli

DATA = str(ROOT / "tests" / "data" / "eli5_small.jsonl")
# batch 3 does not divide the validation blocks: the last batch is short, and must weigh less
FLAGS = ("--eval-only", "--data", DATA, "--block-size", "32", "--batch-size", "3", "--seed", "5", "--no-progress")


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where train.py's default --out would be made


def reported(stdout: str) -> tuple[float, float]:
    match = re.search(r"^validation loss (\d+\.\d{4,}) \(perplexity (\d+\.\d+)\)$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1)), float(match.group(2))


def transformers_loss(hf_folder: Path, tokenizer_source: Path, cache: Path) -> tuple[float, int]:
    """transformers' mean loss over every scored token of the validation blocks training would use."""
    from transformers import GPT2LMHeadModel

    from minigpt.data import DataConfig, load_blocks
    from minigpt.tokenizer import Tokenizer

    cfg = DataConfig(source=DATA, block_size=32, seed=5, cache_dir=str(cache))
    _, val = load_blocks(cfg, Tokenizer.from_dir(tokenizer_source), progress=False)
    blocks = torch.from_numpy(val.blocks[:].astype("int64"))
    model = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    with torch.no_grad():  # all blocks in one batch: the loss is the mean over all their scored tokens
        return model(input_ids=blocks, labels=blocks).loss.item(), len(blocks)


def test_eval_only_equals_transformers_and_writes_nothing(tmp_path, tiny_hf_dir, tiny_minigpt_dir, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))  # (where the token cache would go)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = call_cli("train.py", *FLAGS, "--init", str(tiny_hf_dir))  # (an --out is refused: test_train_cli)
    assert result.returncode == 0, result.stderr
    loss, ppl = reported(result.stdout)
    expected, n_blocks = transformers_loss(tiny_hf_dir, tiny_hf_dir, tmp_path.with_name(tmp_path.name + "-oracle"))
    assert n_blocks % 3 != 0
    assert loss == pytest.approx(expected, rel=1e-4)
    assert ppl == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-3)
    assert f"{n_blocks:,} validation blocks of 32 tokens" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no default out, no cache, nothing
    # the same weights as a minigpt folder give the same number
    same = call_cli("train.py", *FLAGS, "--init", str(tiny_minigpt_dir))
    assert same.returncode == 0, same.stderr
    assert reported(same.stdout)[0] == pytest.approx(loss, abs=1e-4)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_eval_only_of_a_run_folder(tmp_path, tiny_hf_dir):
    from minigpt.hf import export_hf
    from minigpt.loading import load_model

    run = tmp_path / "run"
    trained = call_cli("train.py", "--init", str(tiny_hf_dir), "--data", DATA, "--block-size", "32", "--batch-size",
                       "4", "--max-steps", "2", "--lr", "1e-3", "--val-fraction", "0", "--no-progress", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    rows = (run / "metrics.jsonl").read_text()
    result = call_cli("train.py", *FLAGS, "--init", str(run))
    assert result.returncode == 0, result.stderr
    assert (run / "metrics.jsonl").read_text() == rows  # the run folder is only read
    model, tokenizer = load_model(run)
    export_hf(model, tokenizer, tmp_path / "exported")
    expected, _ = transformers_loss(tmp_path / "exported", tmp_path / "exported", tmp_path / "oracle")
    untrained, _ = transformers_loss(tiny_hf_dir, tiny_hf_dir, tmp_path / "oracle")
    assert reported(result.stdout)[0] == pytest.approx(expected, rel=1e-4)
    assert abs(expected - untrained) > 1e-3  # the run's own weights were evaluated, not --init's


@pytest.mark.parametrize(
    "args, complaint",
    [
        (("--init", "scratch"), "--eval-only evaluates a trained model"),
        (("--resume",), "--eval-only evaluates a trained model"),
    ],
)
def test_eval_only_usage_errors(args, complaint, tiny_hf_dir):
    result = call_cli("train.py", *FLAGS, "--init", str(tiny_hf_dir), *args)
    assert result.returncode == 2 and complaint in result.stderr.strip().splitlines()[-1]


def test_eval_only_without_validation_data_is_one_line(tmp_path, tiny_hf_dir):
    result = call_cli("train.py", *FLAGS, "--init", str(tiny_hf_dir), "--val-fraction", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --eval-only: no validation data (give --val-data, or a --val-fraction above 0)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_eval_only_with_val_data_refuses_what_it_does_not_read(tiny_hf_dir):
    """With --val-data only that file is read, whole and in order: --data (even one that does not
    exist), --max-records and --seed were accepted and changed nothing."""
    for flag, value in (("--data", "/nowhere.jsonl"), ("--max-records", "3"), ("--seed", "9")):
        result = call_cli("train.py", "--eval-only", "--init", str(tiny_hf_dir), "--val-data", DATA, "--block-size",
                          "32", flag, value)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
            f"error: {flag} has no effect with --eval-only --val-data, which reads only --val-data "
            "(whole, in order) (see --help)")


def test_eval_only_in_emulated_bf16_warns_as_training_does(tmp_path, tiny_hf_dir, monkeypatch):
    """Training warns in one line that bf16 is emulated (much slower) on this CPU; --eval-only said nothing.
    And the loss is computed in bf16, as --dtype says: `evaluate` given no autocast computed --eval-only's
    loss in fp32 whatever --dtype was (7.622907 for bf16's 7.622866), and no test compared the two."""
    import minigpt.runtime
    from minigpt.data import BatchIterator, DataConfig, load_blocks
    from minigpt.loading import load_model
    from minigpt.metrics import evaluate
    from minigpt.training_run import lm_loss

    monkeypatch.setattr(minigpt.runtime, "cpu_bf16_speedup", lambda: 0.01)  # as an AVX2 CPU measures it
    result = call_cli("train.py", *FLAGS, "--init", str(tiny_hf_dir), "--dtype", "bf16")
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: --dtype bf16: ")]
    assert result.returncode == 0 and len(warned) == 1 and "100x slower than fp32" in warned[0], result.stderr
    fp32 = call_cli("train.py", *FLAGS, "--init", str(tiny_hf_dir), "--dtype", "fp32")
    assert fp32.returncode == 0, fp32.stderr
    model, tokenizer = load_model(tiny_hf_dir)
    _, val = load_blocks(DataConfig(source=DATA, block_size=32, seed=5, cache_dir=str(tmp_path / "oracle")),
                         tokenizer, progress=False)
    losses = {dtype: evaluate(model, lm_loss, BatchIterator(val, 3, shuffle=False), torch.device("cpu"),
                              torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32))
              for dtype in (torch.bfloat16, torch.float32)}
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) > 1e-5  # (bf16 rounds: another number)
    assert reported(result.stdout)[0] == pytest.approx(losses[torch.bfloat16], abs=2e-6)
    assert reported(fp32.stdout)[0] == pytest.approx(losses[torch.float32], abs=2e-6)


def test_eval_only_of_weights_holding_nan_fails_in_one_line(tmp_path, tiny_hf_dir):
    """Weights holding NaN load with a warning; --eval-only then printed "validation loss nan" and exit 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.bias"][3] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="transformer.h.0.mlp.c_fc.bias' holds NaN or inf values"):  # (the load's)
        result = call_cli("train.py", *FLAGS, "--init", str(broken))
    assert result.returncode == 2 and "validation loss" not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --eval-only: the validation loss of {broken} is nan: its weights hold NaN or inf")


@pytest.mark.slow
def test_eval_only_stopped_by_sigterm_leaves_no_temporary_blocks(tmp_path, tiny_hf_dir):
    """--eval-only builds its blocks in a temporary folder; `timeout` or `kill` (SIGTERM) left one
    behind per run, as training's own handler is not installed there."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import python_path

    temp, data = tmp_path / "tmp", tmp_path / "many.jsonl"
    temp.mkdir()
    answer = "Because the air scatters blue light more than red, as Rayleigh found. " * 8
    with data.open("w") as f:  # (~20 MB: seconds of tokenizing, in which the signal comes)
        for i in range(40000):
            f.write(json.dumps({"title": f"Why {i}?", "answers": {"text": [answer], "score": [1]}}) + "\n")
    env = {**os.environ, "PYTHONPATH": python_path(), "TMPDIR": str(temp)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--eval-only", "--init", str(tiny_hf_dir),
                             "--data", str(data), "--block-size", "32", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("minigpt-eval-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # (inside the folder's life: reading and tokenizing take seconds)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert list(temp.iterdir()) == [], sorted(str(p) for p in temp.rglob("*"))
