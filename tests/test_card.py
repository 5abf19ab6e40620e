"""The model card: its table and metadata from metrics rows, a real run's README.md, and --to-hf."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, call_cli
from minigpt.card import RunFacts, export_card, render_card, results_table

FACTS = RunFacts(
    name="eli5", out="checkpoints/eli5", base_model="distilbert/distilgpt2", base_on_hub=True,
    datasets=["rexarski/eli5_category"], evaluated_on=("rexarski/eli5_category", "train"), model="A GPT-2.",
    data=["training: 4 blocks"],
    hyperparameters=[("learning_rate", "2e-05"), ("seed", 42)], max_steps=8, window=1024,
    license={"license": "apache-2.0"},
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
    """The card of a finished run's last checkpoint (step 8 of 8, evaluated). Its "after step 8 of 8."
    line went unread: `step > max_steps` for `>=` made every finished run's card say "(the run is not
    finished)", and no test noticed."""
    card = load(render_card(FACTS, ROWS, step=8))
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "distilbert/distilgpt2" and meta["library_name"] == "minigpt"
    assert meta["metrics"] == ["perplexity"] and meta["datasets"] == ["rexarski/eli5_category"]
    assert {(r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {("rexarski/eli5_category", "train")}
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"loss": 2.1235, "perplexity": pytest.approx(math.exp(2.12345), abs=1e-4)}
    assert "| 4.0000 | 0.375 | 3 | 3.9123 |" in card.text
    assert "| No log | 0.375 | 3 | 3.5000 |" in card.text
    assert "| 2.3333 | 1 | 8 | 2.1235 |" in card.text
    # the body's figures: perplexity is exp of the loss in nats, exp(2.12345) = 8.3599
    lines = card.text.splitlines()
    assert "- Loss: 2.1235" in lines and "- Perplexity: 8.3599" in lines
    assert "Validation loss at step 8: 2.1235 (perplexity 8.3599)." in lines
    assert "These are its weights after step 8 of 8." in lines and "not finished" not in card.text
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
    assert "These are its weights after step 6 of 8 (the run is not finished)." in card.text.splitlines()
    # no evaluation at all, and a model trained from scratch: no base model, no results
    scratch = RunFacts(**{**FACTS.__dict__, "base_model": None, "base_on_hub": False})
    card = load(render_card(scratch, ROWS[:1], step=2))
    assert "base_model" not in card.data.to_dict() and card.data.eval_results in (None, [])
    assert "No evaluation has run." in card.text and "trained from scratch" in card.text


def test_what_the_hub_would_refuse_or_misread_stays_out_of_the_card(tmp_path, monkeypatch):
    """base_model was --init whatever it was: a local folder's path, which the Hub refuses as no repo
    id (`--init=~/model` even linked as huggingface.co/~/model); `--data .` named the dataset "";
    with --val-data the results were credited to the training file; and the usage commands split
    a folder with a space or a '#' in its name."""
    from huggingface_hub import ModelCard

    from minigpt.config import GPTConfig
    from minigpt.data import TokenBlocks
    from minigpt.model import GPT
    from minigpt.train_flags import parse_train_flags

    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)
    (tmp_path / "texts").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "texts")
    blocks = TokenBlocks(np.zeros((4, 8), dtype=np.uint16), {"source": "x", "records": 2, "tokens": 32})
    model = GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8))

    def card(*argv: str) -> ModelCard:
        flags = parse_train_flags(["--max-steps", "2", *argv], "train")
        return ModelCard(render_card(flags.card_facts(model, blocks, blocks, 1, "fp32", 2, {"license": "mit"}), ROWS[:2], step=3))

    local = card("--init=~/model", "--data", ".", "--out", str(tmp_path / "my run #1"))
    meta = local.data.to_dict()
    assert "base_model" not in meta and meta["datasets"] == ["texts"]
    assert "is a fine-tuned version of `~/model` on texts, with minigpt." in local.text
    assert f"python sample.py --model '{tmp_path}/my run #1' " in local.text
    assert {(r.dataset_name, r.dataset_split) for r in local.data.eval_results} == {("texts", "train")}
    hub = card("--init", "org/base", "--data", "train.json", "--val-data", "held-out.csv")
    meta = hub.data.to_dict()
    assert meta["base_model"] == "org/base" and meta["datasets"] == ["train.json", "held-out.csv"]
    assert {(r.dataset_name, r.dataset_split) for r in hub.data.eval_results} == {("held-out.csv", "validation")}
    assert "[org/base](https://huggingface.co/org/base) on train.json (evaluated on held-out.csv)" in hub.text


def test_card_facts_state_the_runs_own_numbers():
    """The card's data lines, parameter count and batch sizes are the run's: training and validation
    blocks each under their own name, every parameter counted (the tied LM head once), and the total
    batch over all processes (2 here, each 4 examples x 3 micro-batches)."""
    from minigpt.config import GPTConfig
    from minigpt.data import TokenBlocks
    from minigpt.model import GPT
    from minigpt.train_flags import parse_train_flags

    train = TokenBlocks(np.zeros((5, 8), dtype=np.uint16), {"source": "eli5.json", "records": 12, "tokens": 45})
    val = TokenBlocks(np.zeros((2, 8), dtype=np.uint16), {"source": "eli5.json", "records": 3, "tokens": 17})
    model = GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8))
    # GPT-2's count: token and position embeddings, per block 12 E^2 + 13 E, the final LayerNorm
    assert model.num_parameters() == 300 * 8 + 8 * 8 + (12 * 8 * 8 + 13 * 8) + 2 * 8 == 3352
    flags = parse_train_flags(["--max-steps", "2", "--block-size", "8", "--batch-size", "4", "--grad-accum", "3"], "")
    facts = flags.card_facts(model, train, val, 2, "fp32", 2, {})
    assert facts.data == [
        "source: eli5.json, format `answers`",
        "training: 12 records, 45 tokens, 5 blocks of 8 tokens",
        "validation: 3 records, 17 tokens, 2 blocks of 8 tokens (the --val-fraction 0.2 split of the records, seed 42)",
    ]
    assert facts.model.startswith("A GPT-2 language model of 3,352 parameters: 1 layers, 1 heads, 8 wide, ")
    hyper = dict(facts.hyperparameters)
    assert (hyper["train_batch_size"], hyper["gradient_accumulation_steps"], hyper["num_processes"]) == (4, 3, 2)
    assert hyper["total_train_batch_size"] == 24
    lines = render_card(facts, ROWS, step=2).splitlines()
    assert "- training: 12 records, 45 tokens, 5 blocks of 8 tokens" in lines
    assert "- total_train_batch_size: 24" in lines
    # the cache entry names the path that built it (its key is the file's bytes): a copy of the file
    # under another name, or a private one, is this run's --data in the card, not the first path
    renamed = parse_train_flags(["--data", "public/eli5.json", "--block-size", "8"], "")
    assert renamed.card_facts(model, train, val, 1, "fp32", 2, {}).data[0] == "source: public/eli5.json, format `answers`"


def test_export_card_says_transformers_and_how_to_use_the_export():
    """The exported card's usage section named the run's folder and told the reader to export it
    first (to an "exported/" that was not where the card lay): it names the export itself now."""
    text = render_card(FACTS, ROWS, step=8)
    exported = load(export_card(text, "my export", 1024))
    assert exported.data.library_name == "transformers"
    before, usage = exported.text.split("## How to use")
    assert before == load(text).text.split("## How to use")[0]
    assert "python sample.py --model 'my export' " in usage and 'pipeline("text-generation", model="my export")' in usage
    assert "after exporting it" not in usage and "exported/" not in usage and FACTS.out not in usage
    assert "max_new_tokens=50)" in usage  # (a small model's example asks for no more than half its window)
    assert "max_new_tokens=16)" in export_card(text, "x", 32) and "max_new_tokens=16)" in render_card(
        RunFacts(**{**FACTS.__dict__, "window": 32}), ROWS, step=8)
    assert load(export_card("# bare\n", "x", 1024)).data.library_name == "transformers"


def test_export_card_replaces_the_library_name_not_adds_a_second():
    """A run's card says `library_name: minigpt`; its export's says `transformers` instead, on the same
    line. Added after it, the metadata held the key twice: PyYAML (huggingface_hub) quietly takes the
    last, so nothing noticed here, while a stricter parser (js-yaml's default) refuses the block."""
    text = render_card(FACTS, ROWS, step=8)
    meta = text.split("---\n")[1].splitlines()
    exported = export_card(text, "out", 1024).split("---\n")[1].splitlines()
    assert [line for line in exported if line.startswith("library_name:")] == ["library_name: transformers"]
    assert exported == ["library_name: transformers" if line == "library_name: minigpt" else line for line in meta]


def test_export_card_keeps_a_windows_or_an_empty_metadata_block():
    """A card saved with CRLF line ends, or with an empty metadata block, got a second block put in
    front of it, and the Hub, which reads the first, lost its license and results."""
    text = render_card(FACTS, ROWS, step=8)
    exported = load(export_card(text.replace("\n", "\r\n"), "out", 1024))
    assert exported.data.library_name == "transformers" and exported.data.to_dict() == {
        **load(text).data.to_dict(), "library_name": "transformers"}
    assert export_card("---\n---\n# hi\n", "out", 1024) == "---\nlibrary_name: transformers\n---\n# hi\n"


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
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # (a local folder)
    assert "license" not in meta  # (the --init folder's own card states none: unknown, so not stated)
    assert f"is a fine-tuned version of `{tiny_hf_dir}` on eli5_tiny.jsonl, with minigpt." in card.text
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
    assert copy.data.library_name == "transformers"
    assert copy.text.split("## How to use")[0] == card.text.split("## How to use")[0]  # (then the export's usage)
    assert f'model="{tmp_path / "hf"}"' in copy.text and f'model="{tmp_path / "hf"}"' not in card.text
    assert copy.data.to_dict()["model-index"] == meta["model-index"]
    # from Python, `~` in the folder: the card names the folder transformers can open, not "~/exported"
    from minigpt.loading import export_to_hf

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    export_to_hf(out, "~/exported")
    usage = (tmp_path / "home" / "exported" / "README.md").read_text().split("## How to use")[1]
    assert f'model="{tmp_path / "home" / "exported"}"' in usage and "~" not in usage


def test_export_of_a_folder_without_a_card_writes_none(tmp_path, tiny_minigpt_dir):
    import shutil

    mine = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "mine"))
    (mine / "README.md").unlink()
    exported = call_cli("convert_hf_weights.py", "--to-hf", str(mine), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    assert not (tmp_path / "hf" / "README.md").exists()
    assert Path(tmp_path / "hf" / "model.safetensors").is_file()


def test_only_a_minigpt_checkpoints_card_travels_and_whole(tmp_path, tiny_hf_dir, tiny_minigpt_dir):
    """An HF folder's own card (another model's license and claims) was copied into the export; a
    minigpt card that is not UTF-8 (saved in cp1252 by an editor) was a UnicodeDecodeError traceback."""
    import shutil

    hf = Path(shutil.copytree(tiny_hf_dir, tmp_path / "hf-src"))
    (hf / "README.md").write_text("---\nlicense: mit\n---\n# someone else's model\n")
    assert call_cli("convert_hf_weights.py", "--to-hf", str(hf), "--out", str(tmp_path / "a")).returncode == 0
    assert "someone else's model" not in (tmp_path / "a" / "README.md").read_text()  # (a conversion card)
    mine = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "mine"))
    (mine / "README.md").write_bytes(b"# caf\xe9\n")
    result = call_cli("convert_hf_weights.py", "--to-hf", str(mine), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {mine / 'README.md'}: the model card is not UTF-8 text (invalid continuation byte at byte 5); "
        "make it UTF-8, or move it away, to export"]
    assert not (tmp_path / "b").exists()


def test_the_exported_card_is_the_step_whose_weights_were_read(tmp_path, tiny_hf_dir, monkeypatch):
    """The card was looked up again after the weights were loaded: a live run's save in between
    gave the weights of one step and the card (its losses) of the next."""
    import shutil

    import minigpt.loading
    from minigpt.files import atomic_symlink
    from minigpt.run_folder import current_checkpoint

    out = tmp_path / "run"
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    result = call_cli("train.py", "--init", str(tiny_hf_dir), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"),
                      "--block-size", "32", "--batch-size", "4", "--max-steps", "2", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    step = current_checkpoint(out)
    card = (step / "README.md").read_text()
    real = minigpt.loading.load_model

    def a_save_meanwhile(*args, **kwargs):
        loaded = real(*args, **kwargs)
        later = shutil.copytree(step, step.with_name(step.name + "-later"), symlinks=True)
        (later / "README.md").write_text("# a later step's card\n")
        atomic_symlink(later.name, step.parent / "current")
        return loaded

    monkeypatch.setattr(minigpt.loading, "load_model", a_save_meanwhile)
    assert call_cli("convert_hf_weights.py", "--to-hf", str(out), "--out", str(tmp_path / "hf")).returncode == 0
    assert current_checkpoint(out).name.endswith("-later")
    assert (tmp_path / "hf" / "README.md").read_text() == export_card(card, str(tmp_path / "hf"), 256)


def test_a_card_or_a_checkpoint_link_pointing_elsewhere_is_refused(tmp_path, tiny_hf_dir, tiny_minigpt_dir, monkeypatch):
    """A folder from elsewhere (a tarball, say) whose README.md is a symlink to one of the user's files
    had that file exported as the model card, the folder people upload; a run folder's .ckpt/current
    naming a folder outside the run was read as the run's checkpoint."""
    import shutil

    from minigpt.files import atomic_symlink

    secret = tmp_path / "secret.txt"
    secret.write_text("not a model card\n")
    mine = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "mine"))
    (mine / "README.md").unlink(missing_ok=True)
    (mine / "README.md").symlink_to(secret)
    result = call_cli("convert_hf_weights.py", "--to-hf", str(mine), "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {mine / 'README.md'}: the model card is a symlink (to {secret}), not a file of the checkpoint's "
        "own; copy the card in, or move it away, to export"]
    assert not (tmp_path / "a").exists()

    out = tmp_path / "run"
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    assert call_cli("train.py", "--init", str(tiny_hf_dir), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"),
                    "--block-size", "32", "--batch-size", "4", "--max-steps", "1", "--no-progress",
                    "--out", str(out)).returncode == 0
    elsewhere = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "elsewhere"))
    atomic_symlink(str(elsewhere), out / ".ckpt" / "current")
    message = f"error: {out / '.ckpt' / 'current'}: points to {elsewhere}, outside {out / '.ckpt'}: not a checkpoint of this run"
    for command in (("convert_hf_weights.py", "--to-hf", str(out), "--out", str(tmp_path / "b")),
                    ("sample.py", "--model", str(out), "--max-new-tokens", "2", "hi"),
                    ("train.py", "--init", str(tiny_hf_dir), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"),
                     "--block-size", "32", "--batch-size", "4", "--max-steps", "2", "--no-progress", "--out", str(out),
                     "--resume")):
        result = call_cli(*command)
        assert result.returncode == 2 and result.stderr.splitlines()[-1] == message, (command, result.stderr)


def test_a_licence_name_and_link_are_carried_only_with_license_other(tmp_path):
    """`license_name` and `license_link` name a licence the Hub has no id for, and mean something only
    with `license: other`. Carried with any id, a base card's stray `license_name: my-terms` under
    `license: mit` went into every fine-tune's and conversion's metadata, and a conversion's card
    said "Its licence is the source's, as its model card states it: mit (my-terms, LICENSE)."."""
    from minigpt.card import card_license, conversion_card

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\nlicense_name: my-terms\nlicense_link: LICENSE\n---\n# a base\n")
    assert card_license(card) == {"license": "mit"}
    text = conversion_card("base", False, card_license(card), "out", 1024, exported=False)
    assert "Its licence is the source's, as its model card states it: mit." in text
    assert "license_name" not in text and "license_link" not in text
    card.write_text("---\nlicense: other\nlicense_name: my-terms\nlicense_link: LICENSE\n---\n# a base\n")
    assert card_license(card) == {"license": "other", "license_name": "my-terms", "license_link": "LICENSE"}


def test_the_card_states_the_base_models_licence_not_minigpts(tmp_path, tiny_hf_dir, monkeypatch):
    """Every card said `license: apache-2.0`, a fine-tune of gpt2 (MIT) too. It states the --init
    model's own card's licence (a resumed run keeps what its card stated), and minigpt's for a model
    trained from scratch."""
    import shutil

    from huggingface_hub import ModelCard

    from minigpt.card import card_license
    from minigpt.run_folder import current_checkpoint
    from minigpt.train_flags import parse_train_flags
    from minigpt.training_run import build_model, stated_license

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    base = shutil.copytree(tiny_hf_dir, tmp_path / "base")
    (base / "README.md").write_text("---\nlanguage: en\nlicense: mit\ntags:\n- gpt2\n---\n# a base\n")
    flags = ("--init", str(base), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"), "--block-size", "32",
             "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "run"))
    assert call_cli("train.py", *flags, "--max-steps", "1").returncode == 0
    assert ModelCard.load(tmp_path / "run" / "README.md").data.license == "mit"
    (base / "README.md").write_text("---\nlicense: other\n---\n")  # (changed since: the run's card decides)
    resumed = parse_train_flags([*flags, "--max-steps", "1", "--resume"], "")
    checkpoint = current_checkpoint(tmp_path / "run")
    assert build_model(resumed, checkpoint)[2] == checkpoint and stated_license(checkpoint) == {"license": "mit"}
    assert stated_license(build_model(parse_train_flags([*flags, "--max-steps", "1"], ""), None)[2]) == {
        "license": "other"}
    scratch = call_cli("train.py", "--preset", "tiny", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "new"))
    assert scratch.returncode == 0 and ModelCard.load(tmp_path / "new" / "README.md").data.license == "apache-2.0"
    # the metadata read as the Hub reads it (YAML): a licence id, and with "other" its name and link
    other = {"license": "other", "license_name": "my-licence", "license_link": "LICENSE.md"}
    for text, expected in (("---\r\nlicense: 'bsd-3-clause'\r\n---\r\n", {"license": "bsd-3-clause"}),
                           ("\ufeff---\nlicense: mit # the base's\n---\n", {"license": "mit"}),
                           ("---\nlicense : mit\nlicense: gpl-3.0\n---\n", {"license": "gpl-3.0"}),
                           ("---\nlicense: other\nlicense_name: my-licence\nlicense_link: LICENSE.md\n---\n", other),
                           ("# no metadata\n", {}), ("---\nlicense: mit; rm -rf\n---\n", {}),
                           ("---\nlicense: yes\n---\n", {}), ("---\nlicense: 123\n---\n", {}),
                           ("---\nlicense: [mit]\n---\n", {}), ("---\nlicense: mit\n  bad: [\n---\n", {})):
        (base / "README.md").write_text(text, newline="")
        assert card_license(base / "README.md") == expected, text
    (base / "README.md").write_bytes(b"---\nlicense: \xe9\n---\n")  # (not UTF-8)
    assert card_license(base / "README.md") == {} and card_license(tmp_path / "none.md") == {}
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: my-licence\nlicense_link: LICENSE.md\n---\n")
    assert call_cli("train.py", *flags[:-1], str(tmp_path / "other"), "--max-steps", "1").returncode == 0
    assert {k: v for k, v in ModelCard.load(tmp_path / "other" / "README.md").data.to_dict().items() if "lic" in k} == other


def test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune(tmp_path, tiny_hf_dir, monkeypatch):
    """A minigpt folder converted from an HF folder or a Hub repo carried no card, so a fine-tune of it
    stated no licence (a fine-tune of gpt2, MIT, or of distilgpt2, Apache-2.0, alike). Conversion now
    writes a card stating the licence the source's card states, and nothing else of that card."""
    import shutil

    from minigpt.card import card_license, conversion_card

    hf = Path(shutil.copytree(tiny_hf_dir, tmp_path / "hf-src"))
    (hf / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-terms\nlicense_link: LICENSE.txt\n"
                                  "base_model: someone/else\n---\n# someone else's model\n")
    mg = tmp_path / "my model"
    assert call_cli("convert_hf_weights.py", str(hf), "--out", str(mg)).returncode == 0
    with (mg / "README.md").open("a") as card:  # (a section of the user's own, after minigpt's usage: kept)
        card.write("\n## Limitations\n\nNot for medical advice.\n")
    text = (mg / "README.md").read_text()
    meta = load(text).data.to_dict()
    assert card_license(mg / "README.md") == {"license": "other", "license_name": "tiny-terms", "license_link": "LICENSE.txt"}
    assert meta["library_name"] == "minigpt" and "base_model" not in meta and "someone else's model" not in text
    assert text.startswith("---\n") and "# my model\n" in text and f"`{hf}`" in text and "other (tiny-terms, LICENSE.txt)." in text
    assert f"python sample.py --model '{mg}'" in text and "max_new_tokens=50)" in text  # (window 256)

    # its export, and a minigpt copy of it: the same licence; each card's usage names its own folder
    assert call_cli("convert_hf_weights.py", "--to-hf", str(mg), "--out", str(tmp_path / "hf2")).returncode == 0
    assert call_cli("convert_hf_weights.py", str(mg), "--out", str(tmp_path / "copy")).returncode == 0
    exported, copied = (tmp_path / "hf2" / "README.md").read_text(), (tmp_path / "copy" / "README.md").read_text()
    assert load(exported).data.library_name == "transformers" and f'model="{tmp_path / "hf2"}"' in exported
    assert load(copied).data.library_name == "minigpt" and f"--model {tmp_path / 'copy'} " in copied
    assert card_license(tmp_path / "hf2" / "README.md")["license"] == card_license(tmp_path / "copy" / "README.md")["license"] == "other"
    assert copied.split("## How to use")[0] == text.split("## How to use")[0]  # (the rest travels as written)
    assert exported.endswith("\n## Limitations\n\nNot for medical advice.\n") and copied.endswith("Not for medical advice.\n")
    assert "minigpt checkpoint" not in exported.split("## How to use")[0]  # (what the folder is: the export's own)

    # a fine-tune of the converted folder states the licence
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    result = call_cli("train.py", "--init", str(mg), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"),
                      "--block-size", "32", "--batch-size", "4", "--max-steps", "1", "--no-progress", "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert card_license(run / "README.md") == {"license": "other", "license_name": "tiny-terms", "license_link": "LICENSE.txt"}

    # a source whose card states none (or that has none): the card says so, and states none itself
    (hf / "README.md").unlink()
    assert call_cli("convert_hf_weights.py", str(hf), "--out", str(tmp_path / "bare")).returncode == 0
    assert card_license(tmp_path / "bare" / "README.md") == {}
    assert "No licence could be read from the source's model card" in (tmp_path / "bare" / "README.md").read_text()

    hub = conversion_card("distilbert/distilgpt2", True, {"license": "apache-2.0"}, "ckpt/distil", 1024, exported=False)
    assert "[distilbert/distilgpt2](https://huggingface.co/distilbert/distilgpt2)" in hub and "# distil\n" in hub
    assert load(hub).data.to_dict()["license"] == "apache-2.0" and "max_new_tokens=50)" in hub
