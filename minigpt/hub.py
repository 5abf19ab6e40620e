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

import contextlib
import functools
import hashlib
import os
import re
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
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils import filter_repo_objects

        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        repo_id, (answer, asked) = self.repo_id, self._asked
        changed = f"{repo_id}: the repository changed on the Hub during the download; run the same command again"
        try:
            if asked is not None:
                return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
            snapshot = _snapshot_folder(repo_id, "model", answer.sha)
            names = filter_repo_objects([f.rfilename for f in answer.siblings or ()], allow_patterns=[*patterns, *optional])
            for name in names:
                path = _downloaded(repo_id, name, snapshot, f"{repo_id}/{name}", etag_timeout=constants.HF_HUB_ETAG_TIMEOUT)
                self._snapshots.add(_snapshot_of(path, name))
        except MinigptError:
            raise
        except Exception as e:
            if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                raise MinigptError(changed) from None  # (a file the answer listed is gone: the repo changed since)
            raise MinigptError(
                f"{repo_id}: no such local folder, and the Hugging Face Hub could not provide it "
                f"({_hub_reason(asked, e, constants.HF_HUB_ETAG_TIMEOUT)}). Pass {self.instead} instead."
            ) from None
        if len(self._snapshots) > 1:  # (each file is of the revision the Hub named when it was asked for it)
            raise MinigptError(changed)
        return next(iter(self._snapshots), snapshot)

    def missing(self, what: str, hint: str = "") -> MinigptError:
        """The one-line error for `what`, a file the caller needs, not in the folder `files` returned:
        the Hub's answer did not list it (`hint` says what that means), or, without an answer, the
        local cache lacks it (a download that stopped part-way), said with the Hub's reason."""
        from huggingface_hub import constants
        from huggingface_hub.utils import LocalEntryNotFoundError

        asked = self._asked[1]
        if asked is None:
            return MinigptError(f"{self.repo_id}: the Hub repository holds no {what} at its root{hint}")
        why = _hub_reason(asked, LocalEntryNotFoundError(what), constants.HF_HUB_ETAG_TIMEOUT)
        return MinigptError(f"{self.repo_id}: no such local folder; the local cache holds part of the repository but no "
                            f"{what} (a download that stopped part-way?), and the Hugging Face Hub could not provide "
                            f"it ({why}). Pass {self.instead} instead.")


def _downloaded(repo_id: str, name: str, snapshot: Path | None, what: str, **download: Any) -> str:
    """`hf_hub_download(repo_id, name, **download)`'s path, the file checked (`_check_download`) unless
    it was in `snapshot`, the revision the Hub's answer named, before the call (None: the cache alone,
    nothing downloaded). A file of another revision (the repo pushed to since the answer, or a
    mirror's stale answer) may be new: it is checked too."""
    from huggingface_hub import hf_hub_download

    cached = snapshot is None or (snapshot / name).is_file()
    path = hf_hub_download(repo_id, name, **download)
    if not cached or (snapshot is not None and _snapshot_of(path, name) != snapshot):
        _check_download(path, what)
    return path


def _check_download(path: str, what: str) -> None:
    """Compare a file just downloaded with the checksum its cached copy is named by (the Hub's ETag:
    a git-LFS file's sha256, a small file's git blob id). A file changed on the way (a proxy's error
    page, a broken mirror) is removed: the cache would serve it to every later run, offline too.
    The name compared is the one the snapshot's link names (`blobs/<etag>`), not where that leads:
    a Xet-stored file's blob is itself a link into huggingface_hub's shared store, named otherwise."""
    link = Path(path)
    if not link.is_symlink():  # (a cache without symlinks holds copies: nothing names their checksum)
        return
    blob = link.parent / os.readlink(link)
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", blob.name):
        digest = hashlib.sha1(b"blob %d\0" % link.stat().st_size)  # (git's object id: header, then the bytes)
    else:  # (an ETag of another kind: nothing to compare with)
        return
    with open(link, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        for entry in (blob, link):  # (the links only: a shared store's file may serve other repos)
            with contextlib.suppress(OSError):
                os.unlink(entry)
        raise MinigptError(f"{what}: the file downloaded is not the one the Hub named (checksum {blob.name[:12]}...): "
                           "changed on the way (a proxy, a broken mirror?); it was removed from the cache, run the same "
                           "command again")


def _snapshot_folder(repo_id: str, repo_type: str, sha: str) -> Path:
    """The folder of the huggingface_hub cache that holds revision `sha` of a repo's files."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=repo_type), "snapshots", sha)


def _snapshot_of(path: str, name: str) -> Path:
    """The snapshot folder that holds `path`, a downloaded file that is the repo's `name` (which may
    name a sub-folder: "onnx/model.onnx")."""
    return Path(path).parents[len(PurePosixPath(name).parts) - 1]


def _ask(info: Callable[..., Any], repo_id: str) -> tuple[Any, Exception | None]:
    """Ask the Hub about a repo (`info`: huggingface_hub's model_info or dataset_info) within
    HF_HUB_ETAG_TIMEOUT seconds: (the answer, None), or (None, the failure: no answer, offline, an
    unknown or gated repo, the Hub down; the cache may still hold the files). An answer without a
    commit id (40 hex digits: the name of the cache folder the files go to) counts as none."""
    from huggingface_hub import constants

    try:
        answer = info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:
        return None, e
    sha = getattr(answer, "sha", None)  # (it names a cache folder: a path from a hostile mirror must not pass)
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha)):
        return None, ValueError(f"no commit in it: sha {sha!r}")  # (so, as without an answer, the cache serves)
    return answer, None


def _hub_reason(asked: Exception | None, fetching: Exception, seconds: float) -> str:
    """Why the files could not be had, in a few words: the first request's failure (`asked`) where
    the Hub timed out or answered with an error, else the download's (`fetching`). huggingface_hub's
    HTTP errors put the useful part (repository not found, gated) on the lines after "404 Client
    Error.", which one line would cut off."""
    from huggingface_hub.utils import (GatedRepoError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)

    if asked is not None and any("Timeout" in cls.__name__ for cls in type(asked).__mro__):  # (requests', httpx's)
        return f"no answer within {seconds} s, and not in the local cache; HF_HUB_ETAG_TIMEOUT=60 waits longer"
    e = asked if isinstance(asked, HfHubHTTPError) else fetching
    if isinstance(e, GatedRepoError):  # (a RepositoryNotFoundError too)
        return "a gated repository: accept its conditions on its Hub page, then log in (`hf auth login`, or HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository, or a private one: log in (`hf auth login`, or HF_TOKEN) if it is yours"
    status = _http_status(e)  # (an answer that is an error: 500, 503, ...; or a cache's miss after one)
    if status and (status >= 500 or isinstance(e, LocalEntryNotFoundError)):
        return f"the Hub answered HTTP {status}, and the files are not in the local cache; try again later"
    garbled = isinstance(asked, (ValueError, TypeError, KeyError, AttributeError)) or "Redirect" in type(asked).__name__
    if garbled and not isinstance(asked, HFValidationError):  # (an id no repo can have is not the Hub's doing)
        return (f"the Hub's answer about the repo was not usable ({reason(asked)}): a proxy or mirror in the way?, "
                "and the files are not in the local cache")
    if isinstance(e, LocalEntryNotFoundError):  # (the cache's miss, after the Hub's own failure, if any)
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
    `train.py` failed with the file on disk.) A fresh download is checked as a model's files are."""
    from datasets import load_dataset
    from huggingface_hub import constants, dataset_info

    seconds, (answer, asked) = constants.HF_HUB_ETAG_TIMEOUT, _ask(dataset_info, repo_id)  # (without an answer: the
    try:  # cache alone; hf_hub_download itself retried a failing network for ~25 s, printing 11 lines)
        snapshot = None if asked is not None else _snapshot_folder(repo_id, "dataset", answer.sha)
        path = _downloaded(repo_id, filename, snapshot, f"hf://datasets/{repo_id}/{filename}", repo_type="dataset",
                           etag_timeout=seconds, local_files_only=asked is not None)
        ds = load_dataset("json", data_files=path, split="train")
    except MinigptError:
        raise
    except Exception as e:  # offline, Hub down, file moved: the user can always pass local files
        raise MinigptError(
            f"hf://datasets/{repo_id}/{filename}: cannot load ELI5 from the Hugging Face Hub "
            f"({_hub_reason(asked, e, seconds)}); if offline, pass local files instead: --data "
            "eli5-category-train.json.gz (or .jsonl/.parquet/.csv/.txt)"
        ) from None
    return ds.select(range(min(limit, len(ds)))).to_list()
