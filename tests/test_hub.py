"""minigpt.hub, the one place that downloads from the Hugging Face Hub, with the Hub faked.

The fakes stand in for the two library calls hub.py makes (huggingface_hub's `snapshot_download`,
`datasets`' `load_dataset`) and record their arguments: the tests prove that a Hub id given to
`load_model` / `load_tokenizer` / `--data`-less training reaches the real download call with the
right arguments, and that a failed download is one line that says what to pass instead.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt import sources
from minigpt.errors import MinigptError
from minigpt.hf import LEGACY_WEIGHTS_FILE, MODEL_FILES, TOKENIZER_FILES
from minigpt.loading import load_model, load_tokenizer, resolve_model


class FakeHub:
    """`snapshot_download` over local folders: copies the repo's files matching `allow_patterns`
    into a fresh folder (as the real one fills its cache) and returns it."""

    def __init__(self, tmp_path: Path, repos: dict[str, Path]) -> None:
        self.tmp_path, self.repos, self.calls = tmp_path, repos, []

    def __call__(self, repo_id: str, allow_patterns: list[str]) -> str:
        self.calls.append((repo_id, list(allow_patterns)))
        if repo_id not in self.repos:
            raise RuntimeError(f"Repository Not Found for url: https://huggingface.co/{repo_id}\nmore lines")
        folder = self.tmp_path / f"snapshot-{len(self.calls)}"  # (made only when a file matches, as the real one)
        for f in self.repos[repo_id].iterdir():
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                folder.mkdir(exist_ok=True)
                shutil.copy(f, folder / f.name)
        return str(folder)


@pytest.fixture
def fake_hub(tmp_path, tiny_hf_dir, monkeypatch):
    import huggingface_hub

    legacy = tmp_path / "legacy-repo"  # an old upload: its weights only as pytorch_model.bin
    shutil.copytree(tiny_hf_dir, legacy, ignore=shutil.ignore_patterns("model*.safetensors*"))
    torch.save(load_file(tiny_hf_dir / "model.safetensors"), legacy / LEGACY_WEIGHTS_FILE)
    hub = FakeHub(tmp_path / "cache", {"org/tiny": tiny_hf_dir, "org/legacy": legacy})
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    return hub


def test_a_hub_id_downloads_the_model_and_tokenizer_files(fake_hub, tiny_hf_dir):
    folder, kind = resolve_model("org/tiny")
    assert kind == "hf" and fake_hub.calls == [("org/tiny", TOKENIZER_FILES + MODEL_FILES)]
    model, tokenizer = load_model("org/tiny")
    expected = load_model(tiny_hf_dir)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert tokenizer.eos_id == tokenizer.encode("<|endoftext|>")[0]


def test_an_old_repo_with_only_a_bin_is_downloaded_again_with_it(fake_hub, tiny_hf_dir):
    folder, kind = resolve_model("org/legacy")
    assert fake_hub.calls == [("org/legacy", TOKENIZER_FILES + MODEL_FILES),
                              ("org/legacy", TOKENIZER_FILES + MODEL_FILES + [LEGACY_WEIGHTS_FILE])]
    assert (folder / LEGACY_WEIGHTS_FILE).is_file()
    model = load_model("org/legacy")[0]
    expected = load_model(tiny_hf_dir)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_a_tokenizer_hub_id_downloads_only_the_tokenizer_files(fake_hub, gpt2_tokenizer):
    tokenizer = load_tokenizer("org/tiny")
    assert fake_hub.calls == [("org/tiny", TOKENIZER_FILES)]
    assert tokenizer.encode("Why is the sky blue?") == gpt2_tokenizer.encode("Why is the sky blue?")


def test_a_failed_download_is_one_line(fake_hub):
    for call, instead in ((lambda: load_model("org/missing"), "a local checkpoint folder"),
                          (lambda: load_tokenizer("org/missing"), "a local tokenizer.json (or a folder holding one)")):
        with pytest.raises(MinigptError) as err:
            call()
        assert str(err.value) == (
            "org/missing: no such local folder, and the Hugging Face Hub could not provide it (Repository "
            f"Not Found for url: https://huggingface.co/org/missing). Pass {instead} instead."
        )


def test_train_names_the_flag_whose_default_tokenizer_failed(fake_hub, tmp_path, monkeypatch):
    """Offline, `--init scratch` without --tokenizer failed naming distilbert/distilgpt2, an id the
    user never typed, and told them to pass a checkpoint folder."""
    from conftest import ROOT, call_cli

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache-data"))
    data = str(ROOT / "tests" / "data" / "eli5_small.json")
    result = call_cli("train.py", "--init", "scratch", "--data", data, "--out", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: --tokenizer, by default distilbert/distilgpt2: no such local folder, and the Hugging Face Hub could "
        "not provide it (Repository Not Found for url: https://huggingface.co/distilbert/distilgpt2). Pass a "
        "local tokenizer.json (or a folder holding one) instead."]
    result = call_cli("train.py", "--init", "scratch", "--tokenizer", "org/missing", "--data", data,
                      "--out", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 2 and result.stderr.startswith("error: org/missing: no such local folder")


def test_the_hubs_errors_say_what_went_wrong(fake_hub, monkeypatch, tmp_path):
    """huggingface_hub's HTTP errors put the cause on the lines after "404 Client Error.", which the
    one line kept cut off; a repo whose files all sit in a subfolder gave "config.json: file not
    found" in a folder that does not exist."""
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    nested = tmp_path / "nested-repo"
    shutil.copytree(fake_hub.repos["org/tiny"], nested / "model")
    fake_hub.repos["org/nested"] = nested
    with pytest.raises(MinigptError) as err:
        load_model("org/nested")
    assert str(err.value) == ("org/nested: the Hub repository holds none of " + ", ".join(TOKENIZER_FILES + MODEL_FILES)
                              + " at its root")
    def made(cls, message):  # (the HTTP errors' constructors want a response object, which differs by version)
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        return error

    because = {
        made(GatedRepoError, "403 Client Error. (Request ID: x)\n\nCannot access gated repo"):
            "a gated repository: accept its conditions on its Hub page, then log in (`hf auth login`, or HF_TOKEN)",
        made(RepositoryNotFoundError, "404 Client Error. (Request ID: x)\n\nRepository Not Found for url"):
            "no such repository, or a private one: log in (`hf auth login`, or HF_TOKEN) if it is yours",
        made(LocalEntryNotFoundError, "Cannot find an appropriate cached snapshot folder\nmore"):
            "not in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set",
    }
    for error, text in because.items():
        def failing(repo_id, allow_patterns, _error=error):
            raise _error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
        with pytest.raises(MinigptError) as err:
            load_model("org/gone")
        assert str(err.value) == (f"org/gone: no such local folder, and the Hugging Face Hub could not provide it "
                                  f"({text}). Pass a local checkpoint folder instead.")


def test_the_default_data_is_the_hubs_eli5_file(monkeypatch):
    import datasets

    calls = []
    rows = [{"q_id": f"q{i}", "title": f"t{i}", "answers": {"text": [f"a{i}"], "score": [1]}} for i in range(10)]

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = sources.Source.resolve(None, "--data", 3)
    assert source.records() == rows[:3]
    assert calls == [(("json",), {"data_files": sources.HUB_TRAIN_FILE, "split": "train"})]


def test_a_failed_eli5_download_is_one_line(monkeypatch):
    import datasets

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(MinigptError) as err:
        sources.Source.resolve(None, "--data", None).records()
    assert str(err.value) == (
        f"{sources.HUB_TRAIN_FILE}: cannot load ELI5 from the Hugging Face Hub (Couldn't reach the Hub); if "
        "offline, pass local files instead: --data eli5-category-train.json.gz (or .jsonl/.parquet/.csv/.txt)"
    )
