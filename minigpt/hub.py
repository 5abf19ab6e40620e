"""Every download from the Hugging Face Hub, in one place.

Two things come from the Hub, each into its library's own cache, so that it is downloaded once:
    a repo's files     a model's or a tokenizer's (`download_repo_files`, huggingface_hub's
                       `snapshot_download`); `minigpt.loading` names the files, from `minigpt.hf`
    ELI5's records     the training file of the published recipe (`load_eli5_records`, `datasets`'
                       `load_dataset`); `minigpt.sources` names the file
Both libraries are imported inside the functions: only a download needs them, and nothing needs the
Hub offline. A failed download (offline, an unknown or gated repo, the Hub down) is a one-line
MinigptError that says what to pass instead. This module knows nothing else of minigpt.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MinigptError, reason


def download_repo_files(repo_id: str, patterns: list[str], instead: str = "a local checkpoint folder") -> Path:
    """Fetch the files of Hub repo `repo_id` that match the glob `patterns` into the huggingface_hub
    cache (once; later calls find them there); return the folder that holds them, the repo's
    snapshot, where calls with other patterns add their files. Where no file matched, the folder is
    not made: the caller, which knows what it needs, says so. A failure says to pass `instead`."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise MinigptError(
            f"{repo_id}: no such local folder, and the Hugging Face Hub could not provide it "
            f"({_hub_reason(e)}). Pass {instead} instead."
        ) from None


def _hub_reason(e: Exception) -> str:
    """Why huggingface_hub failed, in a few words: its HTTP errors put the useful part (repository
    not found, gated) on the lines after "404 Client Error.", which one line would cut off."""
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):  # (a RepositoryNotFoundError too)
        return "a gated repository: accept its conditions on its Hub page, then log in (`hf auth login`, or HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository, or a private one: log in (`hf auth login`, or HF_TOKEN) if it is yours"
    if isinstance(e, LocalEntryNotFoundError):
        return "not in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set"
    return reason(e)


def load_eli5_records(data_file: str, limit: int) -> list[dict]:
    """The first `limit` records of the ELI5 JSON file `data_file` (an `hf://datasets/...` path),
    downloaded once into the `datasets` cache."""
    from datasets import load_dataset

    try:
        ds = load_dataset("json", data_files=data_file, split="train")
    except Exception as e:  # offline, Hub down, file moved: the user can always pass local files
        raise MinigptError(
            f"{data_file}: cannot load ELI5 from the Hugging Face Hub ({reason(e)}); if offline, "
            "pass local files instead: --data eli5-category-train.json.gz (or .jsonl/.parquet/.csv/.txt)"
        ) from None
    return ds.select(range(min(limit, len(ds)))).to_list()
