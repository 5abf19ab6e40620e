"""Every download from the Hugging Face Hub, in one place.

Two things come from the Hub, each into its library's own cache, so that it is downloaded once:
    a repo's files     a model's or a tokenizer's (`HubRepo.files`: huggingface_hub's
                       `hf_hub_download`, file by file; its `snapshot_download` for the cache
                       alone); `minigpt.loading` names the files, from `minigpt.hf`
    ELI5's records     the training file of the published recipe (`load_eli5_records`: the file
                       by huggingface_hub's `hf_hub_download`, read by `datasets`' `load_dataset`);
                       `minigpt.sources` names it
Both libraries are imported inside the functions: only a download needs them, and nothing needs the
Hub offline. A failed download (offline, an unknown or gated repo, the Hub down) is a one-line
MinigptError that says what to pass instead. This module knows nothing else of minigpt.
"""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from .errors import MinigptError, reason


class HubRepo:
    """A Hub repository whose files are fetched into the huggingface_hub cache (`files`; once: later
    calls find them there). A failure says to pass `instead`.

    The Hub is first asked about the repo, once for all of `files`' calls, with a time limit:
    HF_HUB_ETAG_TIMEOUT seconds (10 by default; huggingface_hub's wait for a file's metadata). Its
    answer lists the repo's files, and those wanted are downloaded one by one in this thread
    (`hf_hub_download`, whose every request has a time limit). `snapshot_download` would do both
    with untimed requests of its own and download in worker threads: on a network that drops
    packets `sample.py --model distilgpt2` waited in silence for as long as it was let (5 minutes,
    measured), and Ctrl-C was not heard until every download had ended or failed (68 s, measured
    with a Hub that stopped sending). Without an answer (or offline, or refused) the files come
    from the cache alone, as `snapshot_download` finds them offline."""

    def __init__(self, repo_id: str, instead: str = "a local checkpoint folder") -> None:
        self.repo_id, self.instead = repo_id, instead
        self._snapshots: set[Path] = set()  # (the folders of the files downloaded: one, unless the repo changed)

    @functools.cached_property
    def _asked(self) -> tuple[Any, Exception | None]:
        """The Hub's answer about the repo (huggingface_hub's ModelInfo) and the request's failure,
        one of them None. Asked once, at the first `files`."""
        from huggingface_hub import model_info

        return _ask(model_info, self.repo_id)

    def files(self, patterns: list[str], optional: Sequence[str] = ()) -> Path:
        """Fetch the repo's files that match the glob `patterns`; return the folder that holds them,
        the repo's snapshot, where calls with other patterns add their files. Where no file matched,
        the folder is not made: the caller, which knows what it needs, says so. `optional` patterns
        are fetched with the rest where the Hub answers; from the cache alone they are not asked for
        (the cache's copies, if any, are in the folder), so that a cache without them is not taken
        for incomplete."""
        from huggingface_hub import constants, hf_hub_download, snapshot_download
        from huggingface_hub.file_download import repo_folder_name
        from huggingface_hub.utils import filter_repo_objects

        repo_id, (answer, asked) = self.repo_id, self._asked
        try:
            if asked is not None:
                return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
            names = filter_repo_objects([f.rfilename for f in answer.siblings or ()], allow_patterns=[*patterns, *optional])
            for name in names:
                path = hf_hub_download(repo_id, name, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT)
                self._snapshots.add(_snapshot_of(path, name))
        except Exception as e:
            raise MinigptError(
                f"{repo_id}: no such local folder, and the Hugging Face Hub could not provide it "
                f"({_hub_reason(asked, e, constants.HF_HUB_ETAG_TIMEOUT)}). Pass {self.instead} instead."
            ) from None
        if len(self._snapshots) > 1:  # (each file is of the revision the Hub named when it was asked for it)
            raise MinigptError(f"{repo_id}: the repository changed on the Hub during the download; run the same command again")
        return next(iter(self._snapshots), None) or Path(
            constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots", answer.sha)


def _snapshot_of(path: str, name: str) -> Path:
    """The snapshot folder that holds `path`, a downloaded file that is the repo's `name` (which may
    name a sub-folder: "onnx/model.onnx")."""
    return Path(path).parents[len(PurePosixPath(name).parts) - 1]


def _ask(info: Callable[..., Any], repo_id: str) -> tuple[Any, Exception | None]:
    """Ask the Hub about a repo (`info`: huggingface_hub's model_info or dataset_info) within
    HF_HUB_ETAG_TIMEOUT seconds: (the answer, None), or (None, the failure: no answer, offline, an
    unknown or gated repo, the Hub down; the cache may still hold the files)."""
    from huggingface_hub import constants

    try:
        return info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT), None
    except Exception as e:
        return None, e


def _hub_reason(asked: Exception | None, fetching: Exception, seconds: float) -> str:
    """Why the files could not be had, in a few words: the first request's failure (`asked`) where
    the Hub timed out or answered with an error, else the download's (`fetching`). huggingface_hub's
    HTTP errors put the useful part (repository not found, gated) on the lines after "404 Client
    Error.", which one line would cut off."""
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)

    if asked is not None and any("Timeout" in cls.__name__ for cls in type(asked).__mro__):  # (requests', httpx's)
        return f"no answer within {seconds} s, and not in the local cache; HF_HUB_ETAG_TIMEOUT=60 waits longer"
    e = asked if isinstance(asked, HfHubHTTPError) else fetching
    if isinstance(e, GatedRepoError):  # (a RepositoryNotFoundError too)
        return "a gated repository: accept its conditions on its Hub page, then log in (`hf auth login`, or HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository, or a private one: log in (`hf auth login`, or HF_TOKEN) if it is yours"
    if isinstance(e, LocalEntryNotFoundError):  # (the cache's miss, after the Hub's own failure, if any)
        if status := _http_status(e):  # (an answer that is an error: 500, 503, ...)
            return f"the Hub answered HTTP {status}, and the files are not in the local cache; try again later"
        return "not in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set"
    if isinstance(e, HfHubHTTPError):  # ("404 Client Error." first, what was not found on the lines after)
        return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return reason(e)


def _http_status(e: BaseException | None) -> int | None:
    """The HTTP status of the Hub's answer that `e` follows from (its causes looked through), if any."""
    while e is not None:
        if status := getattr(getattr(e, "response", None), "status_code", None):
            return status
        e = e.__cause__ or e.__context__
    return None


def load_eli5_records(repo_id: str, filename: str, limit: int) -> list[dict]:
    """The first `limit` records of the ELI5 JSON file `filename` of the Hub dataset `repo_id`,
    downloaded once into the huggingface_hub cache and taken from there offline or where the Hub
    fails. (`datasets`' own `hf://` path asks the Hub's API on every run: offline, a second
    `train.py` failed with the file on disk.)"""
    from datasets import load_dataset
    from huggingface_hub import constants, dataset_info, hf_hub_download

    seconds, (_, asked) = constants.HF_HUB_ETAG_TIMEOUT, _ask(dataset_info, repo_id)  # (without an answer: the cache
    try:  # alone; hf_hub_download itself retried a failing network for ~25 s, printing 11 lines)
        path = hf_hub_download(repo_id, filename, repo_type="dataset", etag_timeout=seconds,
                               local_files_only=asked is not None)
        ds = load_dataset("json", data_files=path, split="train")
    except Exception as e:  # offline, Hub down, file moved: the user can always pass local files
        raise MinigptError(
            f"hf://datasets/{repo_id}/{filename}: cannot load ELI5 from the Hugging Face Hub "
            f"({_hub_reason(asked, e, seconds)}); if offline, pass local files instead: --data "
            "eli5-category-train.json.gz (or .jsonl/.parquet/.csv/.txt)"
        ) from None
    return ds.select(range(min(limit, len(ds)))).to_list()
