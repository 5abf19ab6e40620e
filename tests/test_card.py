"""The model card: its table and metadata from metrics rows, a real run's README.md, and --to-hf."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, call_cli
from minigpt.card import RunFacts, export_card, render_card, results_table

FACTS = RunFacts(
    name="eli5", out="checkpoints/eli5", base_model="distilbert/distilgpt2", base_on_hub=True,
    datasets=["rexarski/eli5_category"], model="A GPT-2.", data=["training: 4 blocks"],
    hyperparameters=[("learning_rate", "2e-05"), ("seed", 42)], max_steps=8,
)
ROWS = [
    {"step": 2, "epoch": 0.25, "loss": 4.0},
    {"step": 3, "epoch": 0.375, "val_loss": 3.91234},
    {"step": 3, "epoch": 0.375, "val_loss": 3.5},  # (two evaluations in a row: the second has no log)
    {"step": 4, "epoch": 0.5, "loss": 3.0},
    {"step": 8, "epoch": 1.0, "loss": 2.0},
    {"step": 8, "epoch": 1.0, "val_loss": 2.12345},
]


def load(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text)


def test_results_table_weights_rows_by_the_steps_they_cover():
    # step 4's row covers steps 3-4 and step 8's covers 5-8: (3.0 x 2 + 2.0 x 4) / 6
    assert results_table(ROWS) == [(4.0, 0.375, 3, 3.91234), (None, 0.375, 3, 3.5), (14 / 6, 1.0, 8, 2.12345)]


def test_card_of_an_evaluated_checkpoint():
    card = load(render_card(FACTS, ROWS, step=8))
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "distilbert/distilgpt2" and meta["library_name"] == "minigpt"
    assert meta["metrics"] == ["perplexity"] and meta["datasets"] == ["rexarski/eli5_category"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"loss": 2.1235, "perplexity": pytest.approx(math.exp(2.12345), abs=1e-4)}
    assert "| 4.0000 | 0.375 | 3 | 3.9123 |" in card.text
    assert "| No log | 0.375 | 3 | 3.5000 |" in card.text
    assert "| 2.3333 | 1 | 8 | 2.1235 |" in card.text
    assert f"PyTorch {torch.__version__}" in card.text and "- learning_rate: 2e-05" in card.text
    assert 'pipeline("text-generation"' in card.text and "python sample.py --model checkpoints/eli5" in card.text


def test_a_diverged_runs_card_holds_yamls_infinity():
    """A validation loss of 800 nats: perplexity overflows to inf, which the card must write as YAML's
    `.inf` (a number when read back), not `inf` (a string)."""
    card = load(render_card(FACTS, [*ROWS[:-1], {"step": 8, "epoch": 1.0, "val_loss": 800.0}], step=8))
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"loss": 800.0, "perplexity": math.inf}
    assert "- Perplexity: inf" in card.text


def test_a_card_claims_no_loss_it_did_not_measure():
    # a checkpoint at step 6: its weights were not evaluated (the last evaluation was at step 3)
    card = load(render_card(FACTS, ROWS[:4], step=6))
    assert card.data.eval_results in (None, []) and "Loss:" not in card.text
    assert "not evaluated; the last evaluation was at step 3" in card.text
    assert "(the run is not finished)" in card.text
    # no evaluation at all, and a model trained from scratch: no base model, no results
    scratch = RunFacts(**{**FACTS.__dict__, "base_model": None, "base_on_hub": False})
    card = load(render_card(scratch, ROWS[:1], step=2))
    assert "base_model" not in card.data.to_dict() and card.data.eval_results in (None, [])
    assert "No evaluation has run." in card.text and "trained from scratch" in card.text


def test_export_card_says_transformers():
    text = render_card(FACTS, ROWS, step=8)
    exported = load(export_card(text))
    assert exported.data.library_name == "transformers"
    assert exported.text == load(text).text
    assert load(export_card("# bare\n")).data.library_name == "transformers"


def test_export_card_keeps_a_windows_or_an_empty_metadata_block():
    """A card saved with CRLF line ends, or with an empty metadata block, got a second block put in
    front of it, and the Hub, which reads the first, lost its license and results."""
    text = render_card(FACTS, ROWS, step=8)
    exported = load(export_card(text.replace("\n", "\r\n")))
    assert exported.data.library_name == "transformers" and exported.data.to_dict() == {
        **load(text).data.to_dict(), "library_name": "transformers"}
    assert export_card("---\n---\n# hi\n") == "---\nlibrary_name: transformers\n---\n# hi\n"


@pytest.mark.slow
def test_a_run_folder_card_matches_its_metrics_and_travels_with_the_export(tmp_path, tiny_hf_dir, monkeypatch):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = call_cli(
        "train.py", "--init", str(tiny_hf_dir), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"),
        "--val-fraction", "0.1", "--block-size", "32", "--batch-size", "4", "--max-steps", "5", "--eval-every", "2",
        "--log-every", "1", "--lr", "3e-4", "--seed", "11", "--no-progress", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] and meta["base_model"] == str(tiny_hf_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    table = [line.split("|")[4].strip() for line in card.text.splitlines() if line.startswith("| ") and "Validation" not in line]
    assert table == [f"{v:.4f}" for v in val] and len(val) == 3  # steps 2, 4 and the last, 5
    losses = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert losses["loss"] == round(val[-1], 4)
    assert "- learning_rate: 0.0003" in card.text and "- seed: 11" in card.text
    assert f"PyTorch {torch.__version__}" in card.text

    exported = call_cli("convert_hf_weights.py", "--to-hf", str(out), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    copy = ModelCard.load(tmp_path / "hf" / "README.md")
    assert copy.data.library_name == "transformers" and copy.text == card.text
    assert copy.data.to_dict()["model-index"] == meta["model-index"]


def test_export_of_a_folder_without_a_card_writes_none(tmp_path, tiny_minigpt_dir):
    exported = call_cli("convert_hf_weights.py", "--to-hf", str(tiny_minigpt_dir), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    assert not (tmp_path / "hf" / "README.md").exists()
    assert Path(tmp_path / "hf" / "model.safetensors").is_file()
