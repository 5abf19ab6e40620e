"""minigpt.hub, the one place that downloads from the Hugging Face Hub, with the Hub faked.

The fakes stand in for the library calls hub.py makes (huggingface_hub's `model_info`,
`hf_hub_download` and, for the cache alone, `snapshot_download`; `datasets`' `load_dataset`) and
record their arguments: the tests prove that a Hub id given to `load_model` / `load_tokenizer` /
`--data`-less training reaches the real download calls with the right arguments, that only the
files needed are downloaded, and that a failed download is one line that says what to pass instead.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import as_bin_shards, gpt2_vocab_files
from minigpt import sources
from minigpt.errors import MinigptError
from minigpt.hf import INDEX_FILE, LEGACY_INDEX_FILE, LEGACY_WEIGHTS_FILE
from minigpt.loading import load_model, load_tokenizer, resolve_model
from minigpt.tokenizer import VOCAB_MERGES, Tokenizer


def made(cls, message):  # (huggingface_hub's HTTP errors want a response object, which differs by version)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


class FakeHub:
    """huggingface_hub's `model_info`, `hf_hub_download` and `snapshot_download` over local folders.
    `model_info` answers for a repo it holds (its commit and its files, as the Hub lists them), else
    raises the Hub's "404 Repository Not Found"; with `answer` set (an exception: offline, a
    timeout, an HTTP error) it raises that for every repo. `hf_hub_download` copies one file into
    the repo's snapshot folder (made at the first file, as the real one fills its cache) and returns
    its path; `snapshot_download` serves the cache alone (`local_files_only`, as minigpt calls it)
    and, as the real one, refuses a call that asks for a file the repo holds and the snapshot lacks.
    They record what was asked (`asked`), downloaded (`fetched`: repo, file) and asked of the cache
    (`calls`: repo, patterns)."""

    COMMIT = "c0ffee" * 6 + "c0ff"

    def __init__(self, tmp_path: Path, repos: dict[str, Path]) -> None:
        self.tmp_path, self.repos, self.answer = tmp_path, repos, None
        self.asked, self.fetched, self.calls = [], [], []

    def model_info(self, repo_id: str, timeout: float) -> SimpleNamespace:
        from huggingface_hub.utils import RepositoryNotFoundError

        self.asked.append((repo_id, timeout))
        if self.answer is not None:
            raise self.answer
        if repo_id not in self.repos:
            raise made(RepositoryNotFoundError, f"404 Client Error.\n\nRepository Not Found for url: {repo_id}")
        names = sorted(f.relative_to(self.repos[repo_id]).as_posix() for f in self.repos[repo_id].rglob("*") if f.is_file())
        return SimpleNamespace(sha=self.COMMIT, siblings=[SimpleNamespace(rfilename=name) for name in names])

    def snapshot(self, repo_id: str) -> Path:
        """The repo's folder in the cache, laid out as huggingface_hub's: models--{owner}--{name}/snapshots/{commit}."""
        return self.tmp_path / f"models--{repo_id.replace('/', '--')}" / "snapshots" / self.COMMIT

    def hf_hub_download(self, repo_id: str, filename: str, etag_timeout: float) -> str:
        self.fetched.append((repo_id, filename))
        path = self.snapshot(repo_id) / filename  # (as huggingface_hub's cache: a link to the file's blob)
        blob = self.snapshot(repo_id).parents[1] / "blobs" / hashlib.sha256((self.repos[repo_id] / filename).read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.repos[repo_id] / filename, blob)
        path.unlink(missing_ok=True)
        path.symlink_to(os.path.relpath(blob, path.parent))
        return str(path)

    def __call__(self, repo_id: str, allow_patterns: list[str], local_files_only: bool) -> str:
        from huggingface_hub.utils import LocalEntryNotFoundError

        assert local_files_only, "snapshot_download online: minigpt downloads file by file"
        self.calls.append((repo_id, list(allow_patterns)))
        folder = self.snapshot(repo_id)
        if not folder.is_dir():
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\nmore lines")
        for f in self.repos.get(repo_id, folder).iterdir():
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in allow_patterns) and not (folder / f.name).is_file():
                raise LocalEntryNotFoundError(f"The cached snapshot for '{repo_id}' is incomplete: {f.name}")
        return str(folder)

    def downloaded(self, repo_id: str) -> list[str]:
        """The files of `repo_id` downloaded, in order."""
        return [name for repo, name in self.fetched if repo == repo_id]


@pytest.fixture
def fake_hub(tmp_path, tiny_hf_dir, monkeypatch):
    import huggingface_hub

    tiny = shutil.copytree(tiny_hf_dir, tmp_path / "tiny-repo")  # as distilgpt2's: both forms of the tokenizer
    Tokenizer.from_dir(tiny).save(tiny / "tokenizer.json")
    legacy = tmp_path / "legacy-repo"  # an old upload: its weights only as pytorch_model.bin, no tokenizer.json
    shutil.copytree(tiny_hf_dir, legacy, ignore=shutil.ignore_patterns("model*.safetensors*"))
    torch.save(load_file(tiny_hf_dir / "model.safetensors"), legacy / LEGACY_WEIGHTS_FILE)
    hub = FakeHub(tmp_path / "cache", {"org/tiny": tiny, "org/legacy": legacy})
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(huggingface_hub, "model_info", hub.model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub


NOT_FOUND = "no such repository, or a private one: log in (`hf auth login`, or HF_TOKEN) if it is yours"


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_hub_id_downloads_the_model_and_tokenizer_files(fake_hub, tiny_hf_dir):
    folder, kind = resolve_model("org/tiny")
    assert kind == "hf" and fake_hub.downloaded("org/tiny") == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    model, tokenizer = load_model("org/tiny")
    assert same_weights(model, load_model(tiny_hf_dir)[0])
    assert tokenizer.eos_id == tokenizer.encode("<|endoftext|>")[0]


def test_an_old_repo_with_only_a_bin_is_downloaded_again_with_it(fake_hub, tiny_hf_dir):
    folder, kind = resolve_model("org/legacy")
    assert fake_hub.downloaded("org/legacy") == ["config.json", "merges.txt", "vocab.json", LEGACY_WEIGHTS_FILE]
    assert (folder / LEGACY_WEIGHTS_FILE).is_file()
    assert same_weights(load_model("org/legacy")[0], load_model(tiny_hf_dir)[0])


def test_only_one_form_of_the_weights_and_of_the_tokenizer_is_downloaded(fake_hub, tmp_path, tiny_hf_dir):
    """The weights came whole and sharded where a repo held both (twice the download), and
    vocab.json + merges.txt came beside tokenizer.json. Shards are fetched by the names their index
    gives, as an old repo's tokenizer files are, only where the first form is missing."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir)
    both, sharded = tmp_path / "both", tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    hf.save_pretrained(both)
    shards = sorted(f.name for f in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    (sharded / shards[0]).rename(sharded / "model-[odd]-1.safetensors")  # (a name that is a glob pattern)
    index = sharded / INDEX_FILE
    index.write_text(index.read_text().replace(shards[0], "model-[odd]-1.safetensors"))
    shards[0] = "model-[odd]-1.safetensors"
    for f in (*sharded.glob("model-*"), index):
        shutil.copy(f, both / f.name)
    for folder in (both, sharded):
        shutil.copy(fake_hub.repos["org/tiny"] / "tokenizer.json", folder / "tokenizer.json")
    fake_hub.repos |= {"org/both": both, "org/sharded": sharded}

    folder, _ = resolve_model("org/both")
    assert fake_hub.downloaded("org/both") == ["config.json", "model.safetensors", INDEX_FILE, "tokenizer.json"]
    assert not any(folder.glob("model-*.safetensors"))
    folder, _ = resolve_model("org/sharded")
    assert fake_hub.downloaded("org/sharded") == ["config.json", INDEX_FILE, "tokenizer.json", *sorted(shards)]
    assert sorted(f.name for f in folder.glob("model-*.safetensors")) == sorted(shards)
    for repo in ("org/both", "org/sharded"):
        assert same_weights(load_model(repo)[0], load_model(tiny_hf_dir)[0])

    old = as_bin_shards(sharded, tmp_path / "old-sharded")  # an older upload: .bin shards and their index
    fake_hub.repos["org/old-sharded"] = old
    folder, _ = resolve_model("org/old-sharded")
    bins = sorted(f.name for f in old.glob("pytorch_model-*.bin"))
    assert fake_hub.downloaded("org/old-sharded") == ["config.json", "tokenizer.json", LEGACY_INDEX_FILE, *bins]
    assert same_weights(load_model("org/old-sharded")[0], load_model(tiny_hf_dir)[0])


def test_a_tokenizer_hub_id_downloads_only_the_tokenizer_files(fake_hub, gpt2_tokenizer, tmp_path):
    tokenizer = load_tokenizer("org/tiny")
    assert fake_hub.downloaded("org/tiny") == ["tokenizer.json"]
    assert tokenizer.encode("Why is the sky blue?") == gpt2_tokenizer.encode("Why is the sky blue?")
    old = tmp_path / "old-tokenizer"  # a repo with vocab.json + merges.txt and no tokenizer.json
    old.mkdir()
    for name, path in zip(VOCAB_MERGES, gpt2_vocab_files()):
        shutil.copy(path, old / name)
    fake_hub.repos["org/old"] = old
    tokenizer = load_tokenizer("org/old")
    assert fake_hub.downloaded("org/old") == ["merges.txt", "vocab.json"]
    assert tokenizer.encode("Why is the sky blue?") == gpt2_tokenizer.encode("Why is the sky blue?")
    fake_hub.repos["org/empty"] = tmp_path / "empty"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinigptError) as err:
        load_tokenizer("org/empty")
    assert str(err.value) == "org/empty: the Hub repository holds no tokenizer.json (nor vocab.json + merges.txt) at its root"


def test_an_offline_cache_with_tokenizer_json_alone_loads(fake_hub, tiny_hf_dir):
    """A cache filled with config.json, model.safetensors and tokenizer.json (all a model needs, all
    transformers reads) was refused offline as incomplete: minigpt asked for vocab.json and
    merges.txt too, which the repo holds."""
    from huggingface_hub.utils import OfflineModeIsEnabled

    repo = fake_hub.repos["org/tiny"]
    assert all((repo / name).is_file() for name in VOCAB_MERGES)
    cached = fake_hub.snapshot("org/tiny")
    cached.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(repo / name, cached / name)
    fake_hub.answer = made(OfflineModeIsEnabled, "Cannot reach https://huggingface.co: offline mode is enabled")
    model, tokenizer = load_model("org/tiny")
    assert same_weights(model, load_model(tiny_hf_dir)[0])
    assert load_tokenizer("org/tiny").encode("Hello there") == tokenizer.encode("Hello there")
    (cached / "tokenizer.json").unlink()  # (now the cache lacks a tokenizer the repo holds: refused, in one line)
    with pytest.raises(MinigptError, match=r"^org/tiny: no such local folder, .*\(not in the local cache"):
        load_model("org/tiny")


def test_a_mistyped_path_in_a_local_folder_is_not_sent_to_the_hub(fake_hub, tmp_path, monkeypatch):
    """`sample.py --model checkpoints/tinyy` (a typo) was asked of the Hub as the repository
    "checkpoints/tinyy": offline "no such local folder, and the Hugging Face Hub could not provide
    it", online a request. Its first part is a folder here, so it is a local path that does not exist;
    an id whose first part is no folder here still goes to the Hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    for call in (lambda: load_model("checkpoints/tinyy"), lambda: load_tokenizer("checkpoints/tinyy")):
        with pytest.raises(MinigptError) as err:
            call()
        assert str(err.value) == ("checkpoints/tinyy: no such file or folder (read as a local path: checkpoints/ is "
                                  "a folder here)")
    missing = str(tmp_path / "nope")
    for path, shown in (("./nope/x", "nope/x"), ("../nope/x", "../nope/x"), (missing, missing)):
        with pytest.raises(MinigptError) as err:  # (no Hub id could be these: no hint; "./" is no owner)
            load_model(path)
        assert str(err.value) == f"{shown}: no such file or folder"
    assert fake_hub.asked == []
    assert same_weights(load_model("org/tiny")[0], load_model(fake_hub.repos["org/tiny"])[0])
    assert [repo for repo, _ in fake_hub.asked] == ["org/tiny"]


def test_a_folder_named_with_a_space_is_the_one_loaded(fake_hub, tmp_path, tiny_minigpt_dir, monkeypatch):
    """The path was stripped before it was looked for: `--model "run "` loaded the folder "run",
    another model, in silence (a folder whose name ends in a space could never load). The path as
    given comes first; one that exists only without its spaces is refused, naming both; a Hub id
    may still come with spaces around it."""
    monkeypatch.chdir(tmp_path)
    for name in ("run ", "run"):
        shutil.copytree(tiny_minigpt_dir, tmp_path / name)
    for given in ("run ", str(tmp_path / "run ")):
        assert resolve_model(given) == (tmp_path / "run " if given.startswith("/") else Path("run "), "minigpt")
    shutil.rmtree(tmp_path / "run ")
    for given in ("run ", " run"):
        with pytest.raises(MinigptError) as err:
            resolve_model(given)
        assert str(err.value) == f"{given!r}: no such file or folder ('run', without the spaces around it, is one)"
    assert fake_hub.asked == []
    assert resolve_model(" org/tiny ")[1] == "hf" and [repo for repo, _ in fake_hub.asked] == ["org/tiny"]
    # a folder whose name is a space (train.py --out ' ' makes one): loaded, not "empty model path"
    shutil.copytree(tiny_minigpt_dir, tmp_path / " ")
    assert resolve_model(" ") == (Path(" "), "minigpt")
    with pytest.raises(MinigptError) as err:
        resolve_model("  ")
    assert str(err.value) == "'  ': no such file or folder"


def test_a_failed_download_is_one_line(fake_hub):
    for call, instead in ((lambda: load_model("org/missing"), "a local checkpoint folder"),
                          (lambda: load_tokenizer("org/missing"), "a local tokenizer.json (or a folder holding one)")):
        with pytest.raises(MinigptError) as err:
            call()
        assert str(err.value) == (
            f"org/missing: no such local folder, and the Hugging Face Hub could not provide it ({NOT_FOUND}). "
            f"Pass {instead} instead."
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
        f"not provide it ({NOT_FOUND}). Pass a local tokenizer.json (or a folder holding one) instead."]
    result = call_cli("train.py", "--init", "scratch", "--tokenizer", "org/missing", "--data", data,
                      "--out", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 2 and result.stderr.startswith("error: --tokenizer org/missing: no such local folder")


def test_train_names_the_flag_whose_default_model_failed(fake_hub, tmp_path, monkeypatch):
    """Offline, `train.py --data FILE` (README's offline recipe without --init) failed naming
    distilbert/distilgpt2, an id the user never typed; so did --eval-only."""
    from conftest import ROOT, call_cli

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache-data"))
    data = str(ROOT / "tests" / "data" / "eli5_small.json")
    for extra in ([], ["--eval-only"]):
        out = [] if extra else ["--out", str(tmp_path / "run")]
        result = call_cli("train.py", "--data", data, *out, *extra, "--no-progress")
        assert result.returncode == 2 and result.stderr.splitlines() == [
            "error: --init, by default distilbert/distilgpt2: no such local folder, and the Hugging Face Hub could "
            f"not provide it ({NOT_FOUND}). Pass a local checkpoint folder instead. Offline, `python train.py "
            "--preset tiny` trains a small model on a bundled sample."], result.stderr
    typed = call_cli("train.py", "--init", "org/missing", "--data", data, "--out", str(tmp_path / "run"), "--no-progress")
    assert typed.returncode == 2 and typed.stderr.startswith("error: --init org/missing: no such local folder")
    for extra in ([], ["--eval-only"]):  # the recipe's model typed: not "by default" (still the offline hint)
        out = [] if extra else ["--out", str(tmp_path / "run")]
        typed = call_cli("train.py", "--init", "distilbert/distilgpt2", "--data", data, *out, *extra, "--no-progress")
        assert typed.returncode == 2 and typed.stderr.startswith("error: --init distilbert/distilgpt2: no such local")
        assert typed.stderr.rstrip().endswith("Offline, `python train.py --preset tiny` trains a small model on a "
                                              "bundled sample."), typed.stderr
    # TrainFlags made in Python know no command line: only the recipe's model is called a default there
    from minigpt.train_flags import TrainFlags
    from minigpt.training_run import load_init

    with pytest.raises(MinigptError, match=f"^--init {re.escape(str(tmp_path / 'none'))}: "):
        load_init(TrainFlags(init=str(tmp_path / "none")))
    assert not (tmp_path / "run").exists()


def test_the_hubs_errors_say_what_went_wrong(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub's HTTP errors put the cause on the lines after "404 Client Error.", which the
    one line kept cut off; a repo whose files all sit in a subfolder gave "config.json: file not
    found" in a folder that does not exist. Where the Hub fails, the cache still serves what it holds."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 7)
    nested = tmp_path / "nested-repo"
    shutil.copytree(fake_hub.repos["org/tiny"], nested / "model")
    fake_hub.repos["org/nested"] = nested
    with pytest.raises(MinigptError) as err:
        load_model("org/nested")
    assert str(err.value) == "org/nested: the Hub repository holds no config.json at its root (not a model's repository)"

    class ReadTimeout(Exception):  # (named as requests' and httpx's are: their module differs by version)
        pass

    because = {
        made(GatedRepoError, "403 Client Error. (Request ID: x)\n\nCannot access gated repo"):
            "a gated repository: accept its conditions on its Hub page, then log in (`hf auth login`, or HF_TOKEN)",
        made(RepositoryNotFoundError, "404 Client Error. (Request ID: x)\n\nRepository Not Found for url"): NOT_FOUND,
        made(HfHubHTTPError, "504 Server Error: Gateway Time-out for url\n\nmore"):
            "504 Server Error: Gateway Time-out for url more",
        made(OfflineModeIsEnabled, "Cannot reach https://huggingface.co: offline mode is enabled"):
            "not in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set",
        ReadTimeout("timed out"): "no answer within 7 s, and not in the local cache; HF_HUB_ETAG_TIMEOUT=60 waits longer",
    }
    tiny = load_model("org/tiny")[0]  # (now in the cache)
    for error, text in because.items():
        fake_hub.answer = error
        with pytest.raises(MinigptError) as err:
            load_model("org/gone")
        assert str(err.value) == (f"org/gone: no such local folder, and the Hugging Face Hub could not provide it "
                                  f"({text}). Pass a local checkpoint folder instead.")
        assert same_weights(load_model("org/tiny")[0], tiny)  # from the cache, whatever the Hub's failure


def test_an_error_answer_and_a_missing_file_are_named():
    """An HTTP 500 that the cache could not make up for was "the Hub is unreachable or HF_HUB_OFFLINE
    is set"; a file the repo lacks was only "(404 Client Error.)", the file named on the lines after."""
    from types import SimpleNamespace

    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    from minigpt.hub import _hub_reason

    answered = made(HfHubHTTPError, "500 Server Error: Internal Server Error for url: x")
    answered.response = SimpleNamespace(status_code=500)
    try:  # (as huggingface_hub raises it: the cache's miss, from the Hub's answer)
        try:
            raise answered
        except HfHubHTTPError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e
    except LocalEntryNotFoundError as e:
        missed = e
    assert _hub_reason(None, missed, 10) == ("the Hub answered HTTP 500, and the files are not in the local cache; "
                                             "try again later")
    entry = made(HfHubHTTPError, "404 Client Error.\n\nEntry Not Found for url: https://hub/org/x/resolve/main/a.json.")
    assert _hub_reason(None, entry, 10) == "404 Client Error. Entry Not Found for url: https://hub/org/x/resolve/main/a.json."
    # the first request's own 5xx, with a cold cache, in the same words (it was httpx's two lines in one)
    unavailable = made(HfHubHTTPError, "Server error '503 Service Unavailable' for url 'x'\nFor more information ...")
    unavailable.response = SimpleNamespace(status_code=503)
    assert _hub_reason(unavailable, LocalEntryNotFoundError("miss"), 10) == (
        "the Hub answered HTTP 503, and the files are not in the local cache; try again later")
    # an id no repo can have ("distilgpt2." copied with a sentence's full stop) is not blamed on a proxy
    from huggingface_hub.utils import HFValidationError

    invalid = HFValidationError("Repo id must use alphanumeric chars or '-', '_', '.'")
    assert _hub_reason(invalid, invalid, 10) == "Repo id must use alphanumeric chars or '-', '_', '.'"
    # an answer that was no answer (not JSON, too many redirects): not "the Hub is unreachable"
    garbled = json.JSONDecodeError("Expecting value", "<html>", 0)
    assert _hub_reason(garbled, LocalEntryNotFoundError("miss"), 10) == (
        "the Hub's answer about the repo was not usable (Expecting value: line 1 column 1 (char 0)): a proxy or "
        "mirror in the way?, and the files are not in the local cache")


def test_an_answer_naming_no_commit_or_a_file_it_then_lacks_is_one_line(fake_hub, tmp_path, tiny_hf_dir):
    """The answer's `sha` named the snapshot folder read where no file was downloaded: an answer of
    "/some/folder" (a hostile mirror) loaded that folder's model, and none at all was a TypeError
    traceback. Such an answer is no answer: the cache serves, as when the Hub fails. A file the
    answer listed and then not served (the repo changed since) was the Hub's 404 text."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    planted = shutil.copytree(tiny_hf_dir, tmp_path / "planted")
    for sha in (str(planted), None, "../" * 8 + "x"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(huggingface_hub, "model_info", lambda repo_id, timeout, sha=sha: SimpleNamespace(
                sha=sha, siblings=fake_hub.model_info(repo_id, timeout).siblings))
            with pytest.raises(MinigptError) as err:
                load_model("org/tiny")
            assert str(err.value) == (
                f"org/tiny: no such local folder, and the Hugging Face Hub could not provide it (the Hub's answer about "
                f"the repo was not usable (no commit in it: sha {sha!r}): a proxy or mirror in the way?, and the files "
                "are not in the local cache). Pass a local checkpoint folder instead.")
            assert not fake_hub.fetched
            if sha is None:  # with the files in the cache, they load
                for name in ("config.json", "model.safetensors", "tokenizer.json"):
                    fake_hub.hf_hub_download("org/tiny", name, 10)
                assert same_weights(load_model("org/tiny")[0], load_model(tiny_hf_dir)[0])
                shutil.rmtree(fake_hub.snapshot("org/tiny"))
                fake_hub.fetched.clear()

    def gone(repo_id, filename, etag_timeout):
        if filename == "model.safetensors":
            raise made(EntryNotFoundError, "404 Client Error.\n\nEntry Not Found for url: ...")
        return fake_hub.hf_hub_download(repo_id, filename, etag_timeout)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(huggingface_hub, "hf_hub_download", gone)
        with pytest.raises(MinigptError) as err:
            load_model("org/tiny")
    assert str(err.value) == "org/tiny: the repository changed on the Hub during the download; run the same command again"


def test_a_cache_that_a_download_left_part_filled_says_so_offline(fake_hub):
    """A first download that stopped after config.json (a timeout, a 404, Ctrl-C) left a snapshot
    folder that every later run offline, or with the Hub failing, blamed: "snapshots/...: no
    model.safetensors (or pytorch_model.bin) in this folder", the Hub's state unsaid."""
    from huggingface_hub.utils import OfflineModeIsEnabled

    cached = fake_hub.snapshot("org/tiny")
    cached.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(fake_hub.repos["org/tiny"] / name, cached / name)
    fake_hub.repos = {}  # (the cache alone: files the repo holds are not asked of it)
    fake_hub.answer = made(OfflineModeIsEnabled, "offline mode is enabled")
    with pytest.raises(MinigptError) as err:
        load_model("org/tiny")
    assert str(err.value) == (
        "org/tiny: no such local folder; the local cache holds part of the repository but no model.safetensors (nor "
        "pytorch_model.bin) (a download that stopped part-way?), and the Hugging Face Hub could not provide it (not "
        "in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set). Pass a local checkpoint folder "
        "instead.")


def test_the_hub_is_given_a_time_to_answer(fake_hub, monkeypatch):
    """The first request goes with HF_HUB_ETAG_TIMEOUT's seconds (huggingface_hub's wait for
    metadata) and the download comes after an answer only: `snapshot_download`'s own first request
    waited forever where the network drops packets."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 7)
    load_model("org/tiny")
    assert fake_hub.asked == [("org/tiny", 7)] and fake_hub.downloaded("org/tiny")[0] == "config.json"


def test_a_repo_is_asked_about_once_for_all_its_downloads(fake_hub, tiny_hf_dir):
    """An old upload needs three downloads (its first ask; vocab.json + merges.txt; the .bin). The
    Hub was asked about the repo before each: on a network that drops packets, three waits of
    HF_HUB_ETAG_TIMEOUT seconds for a model in the cache. One ask now serves all of a repo's
    downloads, online and from the cache; a new load asks again."""
    class ReadTimeout(Exception):  # (as requests' and httpx's are named)
        pass

    resolve_model("org/legacy")
    assert len(fake_hub.downloaded("org/legacy")) == 4 and [repo for repo, _ in fake_hub.asked] == ["org/legacy"]
    fake_hub.answer = ReadTimeout("timed out")  # (the Hub silent: the cache's copies)
    del fake_hub.asked[:]
    model, _ = load_model("org/legacy")
    assert len(fake_hub.calls) == 3 and [repo for repo, _ in fake_hub.asked] == ["org/legacy"]
    assert same_weights(model, load_model(tiny_hf_dir)[0])
    load_model("org/legacy")
    assert [repo for repo, _ in fake_hub.asked] == ["org/legacy"] * 2


def test_a_hub_that_never_answers_is_one_line_in_seconds(tmp_path):
    """sample.py against a Hub that takes the connection and never answers (a network that drops
    packets) waited in silence until killed; now the real huggingface_hub, the real CLI in a process
    of its own, and an error in one line after HF_HUB_ETAG_TIMEOUT's seconds."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from conftest import ROOT, python_path

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # (the kernel takes the connections; nobody ever answers them)
        env = {**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "1",
               "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf")}
        start = time.monotonic()
        result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "org/tiny", "Hello"], env=env,
                                capture_output=True, text=True, timeout=30)
    assert time.monotonic() - start < 30
    assert result.returncode == 2 and result.stdout == "" and result.stderr.splitlines() == [
        "error: org/tiny: no such local folder, and the Hugging Face Hub could not provide it (no answer within 1 s, "
        "and not in the local cache; HF_HUB_ETAG_TIMEOUT=60 waits longer). Pass a local checkpoint folder instead."]


class HttpHub:
    """The Hub's HTTP API for one repo, `org/tiny` (its files: `folder`; a model and a dataset), on a local port, served by
    a thread, for the real huggingface_hub in a process of its own: the repo's info with its file
    list, and each file's metadata (HEAD) and bytes (GET). `commits` gives the revision named in
    each file's metadata (one, unless the repo is being changed); with `hang` set, a file's request is taken
    and never answered (a Hub that stops sending); the files named in `corrupt` are sent with one bit changed. `requests` counts the file requests, `sent` the
    files sent."""

    def __init__(self, folder: Path) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.folder, self.commits, self.hang, self.requests, self.sent = folder, iter(lambda: "a" * 40, None), False, 0, 0
        self.corrupt: set[str] = set()  # files whose bytes are changed on the way (their ETag is the true file's)
        self.stop = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith(("/api/models/org/tiny", "/api/datasets/org/tiny")):
                    names = sorted(f.name for f in hub.folder.iterdir())
                    return self.answer(json.dumps({  # (the fields every huggingface_hub >= 0.20 reads)
                        "id": "org/tiny", "sha": "a" * 40, "private": False, "downloads": 0, "likes": 0, "tags": [],
                        "siblings": [{"rfilename": n} for n in names]}).encode())
                if not self.path.startswith(("/org/tiny/resolve/", "/datasets/org/tiny/resolve/")):
                    return self.answer(b"{}", 404)
                hub.requests += 1
                if hub.hang:
                    hub.stop.wait(60)
                    return
                name = self.path.rsplit("/", 1)[1]
                data = (hub.folder / name).read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                if name in hub.corrupt and self.command == "GET":  # (one bit changed on the way: same size, same ETag)
                    data = data[:-1] + bytes([data[-1] ^ 1])
                self.answer(data, headers={"ETag": f'"{etag}"',
                                           "X-Repo-Commit": next(hub.commits) if self.command == "HEAD" else "a" * 40})

            do_HEAD = do_GET

            def answer(self, body: bytes, status: int = 200, headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)
                    hub.sent += status == 200 and "ETag" in (headers or {})

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, home: Path, **more: str) -> dict[str, str]:
        """A child process's environment: this Hub, online, with its cache under `home`."""
        import os

        from conftest import python_path

        return {**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
                "HF_ENDPOINT": f"http://127.0.0.1:{self.server.server_address[1]}", **more}

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_hub(tiny_hf_dir, tmp_path):
    folder = shutil.copytree(tiny_hf_dir, tmp_path / "repo")
    hub = HttpHub(folder)
    yield hub
    hub.close()


def sample_cli(env: dict[str, str], **run):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "org/tiny", "--greedy",
                           "--max-new-tokens", "4", "Hello"], env=env, capture_output=True, text=True, **run)


def test_a_hub_repo_is_downloaded_by_the_real_huggingface_hub_and_then_read_offline(http_hub, tmp_path, tiny_hf_dir):
    """The whole path of a download, the real huggingface_hub against the Hub's HTTP API: the files
    a model needs come into huggingface_hub's cache, once (a second run downloads none), and are
    read from there offline; the text is that of the same weights from a local folder."""
    from conftest import run_cli

    expected = run_cli("sample.py", "--model", str(tiny_hf_dir), "--greedy", "--max-new-tokens", "4", "Hello").stdout
    online = sample_cli(http_hub.env(tmp_path / "hf"), timeout=120)
    assert online.returncode == 0 and online.stdout == expected, online.stderr
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    assert sorted(f.name for f in snapshot.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert http_hub.sent == 4
    assert sample_cli(http_hub.env(tmp_path / "hf"), timeout=120).stdout == expected and http_hub.sent == 4
    offline = sample_cli(http_hub.env(tmp_path / "hf", HF_HUB_OFFLINE="1"), timeout=120)
    assert offline.returncode == 0 and offline.stdout == expected, offline.stderr


def test_a_repo_changed_during_its_download_is_one_line(http_hub, tmp_path):
    """Each file is of the revision the Hub names when it is asked for it: a repo pushed to
    mid-download gives files of two commits, which no folder holds together."""
    http_hub.commits = itertools.cycle(["a" * 40, "b" * 40])
    result = sample_cli(http_hub.env(tmp_path / "hf"), timeout=120)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.splitlines()[-1] == (
        "error: org/tiny: the repository changed on the Hub during the download; run the same command again")


def test_a_file_changed_on_the_way_is_refused_and_not_kept(http_hub, tmp_path, tiny_hf_dir):
    """huggingface_hub checks a download's size, not its bytes: a file changed on the way (one bit
    here; a proxy's error page, a broken mirror) was kept in the cache under the true file's
    checksum and served to every later run, offline too. A file just downloaded is compared with
    the checksum it is stored under: refused in one line and removed, so the next run fetches it."""
    from conftest import run_cli

    http_hub.corrupt = {"model.safetensors"}
    result = sample_cli(http_hub.env(tmp_path / "hf"), timeout=120)
    etag = hashlib.sha256((http_hub.folder / "model.safetensors").read_bytes()).hexdigest()
    assert result.returncode == 2 and result.stdout == "" and result.stderr.splitlines() == [
        f"error: org/tiny/model.safetensors: the file downloaded is not the one the Hub named (checksum {etag[:12]}...): "
        "changed on the way (a proxy, a broken mirror?); it was removed from the cache, run the same command again"]
    assert not (tmp_path / "hf" / "hub" / "models--org--tiny" / "blobs" / etag).exists()
    http_hub.corrupt = set()
    expected = run_cli("sample.py", "--model", str(tiny_hf_dir), "--greedy", "--max-new-tokens", "4", "Hello").stdout
    again = sample_cli(http_hub.env(tmp_path / "hf"), timeout=120)
    assert again.returncode == 0 and again.stdout == expected, again.stderr


def test_a_small_files_download_is_checked_by_its_git_blob_id(tmp_path):
    """The Hub names a small file (config.json, tokenizer_config.json: not in git LFS) by its git blob
    id, the SHA-1 of "blob <size>\\0" and the bytes, not of the bytes alone: the header left out, every
    such download was refused as changed on the way and removed, so no Hub model loaded (the fake
    Hub's ETags are all sha256s, so nothing noticed); the 40-digit branch left out, a small file
    changed on the way was kept."""
    from minigpt.hub import _check_download

    data = b'{"n_embd": 768}\n'
    blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    blobs, snapshot = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for etag in (blob_id, hashlib.sha1(data).hexdigest()):  # the true blob id, then the bytes' bare SHA-1
        (blobs / etag).write_bytes(data)
        (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", etag))
        if etag == blob_id:
            _check_download(str(snapshot / "config.json"), "org/x/config.json")
            assert (snapshot / "config.json").read_bytes() == data  # kept
            (snapshot / "config.json").unlink()
            continue
        with pytest.raises(MinigptError, match=r"^org/x/config\.json: the file downloaded is not the one the Hub "
                           rf"named \(checksum {etag[:12]}\.\.\.\)"):
            _check_download(str(snapshot / "config.json"), "org/x/config.json")
        assert not os.path.lexists(blobs / etag) and not os.path.lexists(snapshot / "config.json")


def test_a_download_is_checked_by_the_name_its_snapshot_link_gives(tmp_path):
    """A Xet-stored file's blob (`blobs/<sha256>`) is itself a link into huggingface_hub's shared
    store, named by the Xet hash: following the links to the end compared the file with that name,
    refused every such download and deleted the shared store's file. The snapshot link's own target
    names the checksum; a mismatch removes the repo's links, never the shared file."""
    from minigpt.hub import _check_download

    data = b"the weights"
    store = tmp_path / "xet" / "f783a840eee8" / ("e" * 64)
    store.parent.mkdir(parents=True)
    store.write_bytes(data)
    blobs, snapshot = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for etag in (hashlib.sha256(data).hexdigest(), "0" * 64):  # the true checksum, then another
        (blobs / etag).symlink_to(store)
        (snapshot / "model.safetensors").symlink_to(Path("..", "..", "blobs", etag))
        if etag != "0" * 64:
            _check_download(str(snapshot / "model.safetensors"), "org/x/model.safetensors")
            (snapshot / "model.safetensors").unlink()
            continue
        with pytest.raises(MinigptError, match=r"^org/x/model\.safetensors: the file downloaded is not the one"):
            _check_download(str(snapshot / "model.safetensors"), "org/x/model.safetensors")
        assert not os.path.lexists(blobs / etag) and not os.path.lexists(snapshot / "model.safetensors")
    assert store.read_bytes() == data  # (the shared store's file: another repo's blob may lead to it)


def test_ctrl_c_stops_a_download_at_once(http_hub, tmp_path):
    """Ctrl-C while a file was downloading (`snapshot_download`'s worker threads) was heard only when
    every download had ended: 68 s against a Hub that stopped sending, and a large download ran to
    its end. The files come one by one in the main thread now: Ctrl-C ends sample.py at once."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    http_hub.hang = True
    env = http_hub.env(tmp_path / "hf", HF_HUB_ETAG_TIMEOUT="60", HF_HUB_DOWNLOAD_TIMEOUT="60")
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--model", "org/tiny", "Hello"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while http_hub.requests == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # (the request in flight)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and stdout == "" and stderr.splitlines()[-1] == "interrupted", stderr


def test_the_default_data_is_the_hubs_eli5_file(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    rows = [{"q_id": f"q{i}", "title": f"t{i}", "answers": {"text": [f"a{i}"], "score": [1]}} for i in range(10)]
    (tmp_path / "downloaded.json").write_text(json.dumps(rows))
    calls = []

    def hf_hub_download(*args, **kwargs):
        calls.append((args, kwargs))
        return str(tmp_path / "downloaded.json")

    def dataset_info(repo_id, timeout):
        calls.append(("asked", repo_id, timeout))
        if offline:  # (a network that fails: hf_hub_download retried it for ~25 s, printing 11 lines)
            raise ConnectionError("Name or service not known")
        return SimpleNamespace(sha="a" * 40)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    seconds = huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT
    for offline in (False, True):  # asked first, within the time limit; without an answer, the cache alone
        calls.clear()
        source = sources.Source.resolve(None, "--data", 3)
        assert source.records() == rows[:3] and source.name == "hf://datasets/rexarski/eli5_category/eli5-category-train.json.gz"
        assert calls == [("asked", "rexarski/eli5_category", seconds),
                         (("rexarski/eli5_category", "eli5-category-train.json.gz"),
                          {"repo_type": "dataset", "etag_timeout": seconds, "local_files_only": offline})]


def test_the_eli5_file_downloaded_once_is_read_offline(monkeypatch, tmp_path):
    """The file came through `datasets`' hf:// path, which asks the Hub's API on every run: offline
    (or with the Hub down) a second `train.py` failed, the file in the cache. It is huggingface_hub's
    cached file now, found offline as after a download (conftest sets HF_HUB_OFFLINE)."""
    import gzip

    import datasets
    from huggingface_hub import constants

    rows = [{"q_id": f"q{i}", "title": f"t{i}", "answers": {"text": [f"a{i}"], "score": [1]}} for i in range(4)]
    repo = tmp_path / "hub" / "datasets--rexarski--eli5_category"  # (huggingface_hub's cache layout)
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "eli5-category-train.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    assert sources.Source.resolve(None, "--data", None).records() == rows
    (repo / "refs" / "main").unlink()  # (never downloaded: one line, as before)
    with pytest.raises(MinigptError, match=r"^hf://datasets/rexarski/eli5_category/eli5-category-train\.json\.gz: cannot "
                       r"load ELI5 from the Hugging Face Hub \(not in the local cache, and the Hub is unreachable or "
                       r"HF_HUB_OFFLINE is set\); if offline, pass local files instead: --data"):
        sources.Source.resolve(None, "--data", None).records()


def test_an_eli5_file_changed_on_the_way_is_refused_and_not_kept(http_hub, tmp_path):
    """The training file, too, is compared with the checksum the Hub named: one bit changed on the
    way was read as ELI5 (or failed as a JSON error) in every later run, offline too. Refused in
    one line and removed from the cache, so the next run downloads it again."""
    import gzip
    import subprocess
    import sys

    rows = [{"q_id": f"q{i}", "title": f"t{i}", "answers": {"text": [f"a{i}"], "score": [1]}} for i in range(5)]
    for f in http_hub.folder.iterdir():
        f.unlink()
    (http_hub.folder / "train.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode(), mtime=0))
    read = ("import json; from minigpt.hub import load_eli5_records; from minigpt.cli import run; "
            "run(lambda argv: print(json.dumps(load_eli5_records('org/tiny', 'train.json.gz', 3))) or 0)")
    env = http_hub.env(tmp_path / "hf", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    http_hub.corrupt = {"train.json.gz"}
    result = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    etag = hashlib.sha256((http_hub.folder / "train.json.gz").read_bytes()).hexdigest()
    assert result.returncode == 2 and result.stdout == "" and result.stderr.splitlines() == [
        f"error: hf://datasets/org/tiny/train.json.gz: the file downloaded is not the one the Hub named (checksum "
        f"{etag[:12]}...): changed on the way (a proxy, a broken mirror?); it was removed from the cache, run the same "
        "command again"]
    assert not (tmp_path / "hf" / "hub" / "datasets--org--tiny" / "blobs" / etag).exists()
    http_hub.corrupt = set()
    for online in ("0", "1"):  # downloaded again, checked; then read from the cache, offline
        again = subprocess.run([sys.executable, "-c", read], env={**env, "HF_HUB_OFFLINE": online}, capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 0 and json.loads(again.stdout) == rows[:3], again.stderr
    assert http_hub.sent == 2
    # Pushed to since: the answer still names the cached commit ("a" * 40, a mirror's stale answer),
    # the file resolves to the new one, and comes changed on the way: checked all the same
    (http_hub.folder / "train.json.gz").write_bytes(gzip.compress(json.dumps(rows[::-1]).encode(), mtime=0))
    http_hub.commits, http_hub.corrupt = iter(lambda: "c" * 40, None), {"train.json.gz"}
    result = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    etag = hashlib.sha256((http_hub.folder / "train.json.gz").read_bytes()).hexdigest()
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: hf://datasets/org/tiny/train.json.gz: the file downloaded is not the one the Hub named (checksum "
        f"{etag[:12]}...): changed on the way (a proxy, a broken mirror?); it was removed from the cache, run the same "
        "command again"] and http_hub.sent == 3


def test_a_failed_eli5_download_is_one_line(monkeypatch):
    import huggingface_hub

    def hf_hub_download(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(MinigptError) as err:
        sources.Source.resolve(None, "--data", None).records()
    assert str(err.value) == (
        f"{sources.HUB_TRAIN_FILE}: cannot load ELI5 from the Hugging Face Hub (Couldn't reach the Hub); if "
        "offline, pass local files instead: --data eli5-category-train.json.gz (or .jsonl/.parquet/.csv/.txt)"
    )


def test_a_repos_tokenizer_settings_are_fetched_online_and_not_required_offline(fake_hub):
    """transformers reads a repo's tokenizer_config.json (add_prefix_space) and added_tokens.json: fetched with the
    tokenizer where the Hub answers; a cache without them (an earlier minigpt's, or a repo that never had them) still
    loads offline."""
    from huggingface_hub.utils import OfflineModeIsEnabled

    repo = fake_hub.repos["org/tiny"]
    (repo / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True}))
    assert load_tokenizer("org/tiny").encode("Hello world") == [18435, 995]  # (without the prefix space: 15496)
    assert load_model("org/tiny")[1].encode("Hello world") == [18435, 995]
    (fake_hub.snapshot("org/tiny") / "tokenizer_config.json").unlink()
    fake_hub.answer = made(OfflineModeIsEnabled, "Cannot reach https://huggingface.co: offline mode is enabled")
    assert load_model("org/tiny")[1].encode("Hello world") == [15496, 995]
    assert fake_hub.calls[-1] == ("org/tiny", ["config.json", "model.safetensors", INDEX_FILE, "README.md", "tokenizer.json"])


def test_a_hub_models_card_comes_with_it_for_its_licence(fake_hub, tmp_path):
    """A fine-tune's card states the base model's licence, from the base's own card: fetched with the
    model (a Hub repo's README.md), and read from the cache offline."""
    from huggingface_hub.utils import OfflineModeIsEnabled

    from minigpt.card import card_license
    from minigpt.train_flags import parse_train_flags
    from minigpt.training_run import build_model, stated_license

    (fake_hub.repos["org/tiny"] / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    folder, _ = resolve_model("org/tiny")
    assert card_license(folder / "README.md") == {"license": "mit"}
    flags = parse_train_flags(["--init", "org/tiny", "--data", "x.jsonl", "--block-size", "32"], "")
    asked = len(fake_hub.asked)
    assert stated_license(build_model(flags, None)[2]) == {"license": "mit"}
    assert len(fake_hub.asked) == asked + 1  # (the Hub asked once a run: the licence is read from that download)
    fake_hub.answer = made(OfflineModeIsEnabled, "Cannot reach https://huggingface.co: offline mode is enabled")
    assert stated_license(build_model(flags, None)[2]) == {"license": "mit"}
    # converted first (offline, from the cache), the folder's card states it, and names the repo
    from minigpt.loading import convert_to_minigpt

    card = convert_to_minigpt("org/tiny", tmp_path / "converted") / "README.md"
    assert card_license(card) == {"license": "mit"} and "[org/tiny](https://huggingface.co/org/tiny)" in card.read_text()

    # a licence file the card links to, relative (as the Hub recommends), is linked on the Hub; a minigpt
    # checkpoint on the Hub converts and exports with its card (in the cache its README.md is a link to a
    # blob, which was refused as a file from elsewhere)
    from minigpt.loading import export_to_hf

    (fake_hub.repos["org/tiny"] / "README.md").write_text("---\nlicense: other\nlicense_link: LICENSE\n---\n")
    fake_hub.answer = None
    shutil.rmtree(fake_hub.snapshot("org/tiny"))
    link = f"https://huggingface.co/org/tiny/blob/{fake_hub.COMMIT}/LICENSE"
    card = convert_to_minigpt("org/tiny", tmp_path / "linked") / "README.md"
    assert card_license(card) == {"license": "other", "license_link": link}
    fake_hub.repos["org/mg"] = convert_to_minigpt(tmp_path / "linked", tmp_path / "mg-repo")
    for convert, out in ((convert_to_minigpt, tmp_path / "mg-copy"), (export_to_hf, tmp_path / "mg-hf")):
        convert("org/mg", out)
        assert (fake_hub.snapshot("org/mg") / "README.md").is_symlink()
        assert card_license(out / "README.md") == {"license": "other", "license_link": link}


def test_a_hub_id_with_spaces_around_it_is_named_without_them_in_the_card(fake_hub, tmp_path):
    """`convert_hf_weights.py " org/tiny "` (an id copied with spaces) downloads org/tiny, and the
    card names that repo and links its page. The card named the id as typed unnoticed, a link to
    "https://huggingface.co/ org/tiny ": no test converted an id with spaces."""
    from minigpt.loading import convert_to_minigpt

    card = (convert_to_minigpt(" org/tiny ", tmp_path / "converted") / "README.md").read_text()
    assert "The weights of [org/tiny](https://huggingface.co/org/tiny), unchanged" in card
    assert " org/tiny " not in card and "/ org" not in card
