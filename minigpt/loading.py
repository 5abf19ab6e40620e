"""Where a model or tokenizer comes from: the one answer for every CLI.

A model source is one of
    a minigpt checkpoint folder    config.json is a GPTConfig        (`minigpt/checkpoint.py` reads it)
    an HF GPT-2 folder             config.json has a `model_type`    (`minigpt/hf.py` reads it)
    a Hub id                       e.g. `distilbert/distilgpt2`: its files are downloaded once into
                                   the huggingface_hub cache, then read as an HF folder
A tokenizer source is a `tokenizer.json`, a folder holding tokenizer files, or a Hub id.
Which files to fetch is HF's layout (`minigpt/hf.py`); the download itself is `minigpt/hub.py`'s,
as is every download from the Hub.
"""

from __future__ import annotations

import glob
import os
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .card import card_license, conversion_card, copied_card, export_card
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, is_minigpt_checkpoint, load_checkpoint, save_checkpoint_folder
from .errors import MinigptError
from .files import check_source_outside, folder_destination, home_expanded
from .hf import (GENERATION_FILE, INDEX_FILE, LEGACY_FILES, LEGACY_INDEX_FILE, LEGACY_WEIGHTS_FILE, MODEL_FILES,
                 export_hf, hf_weight_files, load_hf_checkpoint)
from .hub import HubRepo
from .model import GPT
from .run_folder import CARD_FILE, CKPT_DIR, check_outside_runs, current_checkpoint, foreign_entry, keep_runs_out
from .runtime import check_dtype, resolve_device
from .tokenizer import HF_SETTINGS, TOKENIZER_FILE, TOKENIZER_FILES, VOCAB_MERGES, Tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
READ_TRIES = 3  # reads of a checkpoint that a writer changed meanwhile (`read_whole`) before giving up
_T = TypeVar("_T")


def _download_model(repo_id: str) -> Path:
    """Fetch what loading a Hub repo's model needs (`minigpt.hub`), and nothing else: config.json,
    the weights in the first form the repo holds them (`hf_weight_files`: model.safetensors; else
    the shards its index names; else an old pytorch_model.bin, whole or sharded), the tokenizer
    (`_download_with_tokenizer`), and the model card (README.md), whose licence a fine-tune's card
    states. A later form costs one more request, and only where the first is missing; fetching
    every form at once would download a repo's weights twice where it holds them both whole and
    sharded. Return the folder."""
    repo = HubRepo(repo_id)
    folder = _download_with_tokenizer(repo, [CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, CARD_FILE])
    if not (folder / CONFIG_FILE).is_file():
        raise repo.missing(CONFIG_FILE, " (not a model's repository)")
    _require_tokenizer(repo, folder)
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        folder = repo.files([LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE])
    names = [path.name for path in hf_weight_files(folder)]  # (an index is read once)
    if not names:
        raise repo.missing(f"{WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE})")
    if missing := [name for name in names if not (folder / name).is_file()]:  # the shards an index names
        folder = repo.files([glob.escape(name) for name in missing])  # (names, not patterns)
        if shards := [name for name in missing if not (folder / name).is_file()]:
            raise repo.missing(f"{shards[0]} (a shard its index names)")
    return folder


def _download_with_tokenizer(repo: HubRepo, patterns: list[str]) -> Path:
    """Fetch the files of Hub repo `repo` matching `patterns`, with its tokenizer: tokenizer.json (and
    the settings transformers reads beside it, `HF_SETTINGS`), or where the repo has none, vocab.json
    + merges.txt. Asking for all three at once would make an offline cache holding only
    tokenizer.json (all a model needs) count as incomplete. Return the folder (one that may not
    exist, where nothing matched)."""
    folder = repo.files(patterns + [TOKENIZER_FILE], optional=HF_SETTINGS)
    if not (folder / TOKENIZER_FILE).is_file():
        folder = repo.files(VOCAB_MERGES, optional=HF_SETTINGS)
    return folder


def _require_tokenizer(repo: HubRepo, folder: Path) -> None:
    """Refuse a Hub repo's folder without a tokenizer (tokenizer.json, or vocab.json + merges.txt)."""
    if not (folder / TOKENIZER_FILE).is_file() and not all((folder / name).is_file() for name in VOCAB_MERGES):
        raise repo.missing(f"{TOKENIZER_FILE} (nor {' + '.join(VOCAB_MERGES)})")


def resolve_model(source: str | os.PathLike) -> tuple[Path, str]:
    """Find where `source` lives: returns (folder, "minigpt" | "hf").

    `source` may be a minigpt checkpoint folder, an HF GPT-2 folder (e.g. from `save_pretrained`) or
    a Hub id such as `distilbert/distilgpt2`, downloaded once into the huggingface_hub cache.
    """
    path = _local_path(source, "model")
    if path is not None:
        if not path.is_dir():
            raise MinigptError(f"{path}: not a checkpoint folder (expected a folder with config.json)")
        if not (path / CONFIG_FILE).is_file() and (path / CKPT_DIR).is_dir():  # (its links lead nowhere yet)
            raise MinigptError(f"{path}: a training run with no checkpoint in force (stopped in its first save?); "
                               "`train.py --resume` with the run's flags links the one it wrote")
        if not (path / CONFIG_FILE).is_file():
            raise MinigptError(f"{path}: not a checkpoint (no config.json in this folder)")
    else:
        path = _download_model(str(source).strip())
    return path, ("minigpt" if is_minigpt_checkpoint(path) else "hf")


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` names a Hub repo, which `resolve_model` downloads, rather than a local path."""
    return _local_path(source, "model") is None


def _local_path(source: str | os.PathLike, what: str) -> Path | None:
    """`source` as a local path, or None where it names a Hub repo (`owner/name`, nothing on disk by
    that name). A path that exists nowhere (one that starts with ".", "/" or "~", that no Hub id
    could be, or whose first part is a folder here, as in a mistyped `checkpoints/eli55`) is refused
    here, rather than sent to the Hub."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what}: a folder path or a Hub id, got {type(source).__name__}")
    text = str(source).strip()  # (a Hub id, as copied with spaces around it)
    if not str(source):
        raise MinigptError(f"{what}: empty {what} path")
    given = home_expanded(str(source))  # (a path as given: a folder's name may end in a space, or be one)
    if given.exists():
        return given
    if not text:
        raise MinigptError(f"{str(source)!r}: no such file or folder")
    path, owner = home_expanded(text), text.partition("/")[0]
    if path.exists():  # (not the folder asked for: loading it instead would be silent)
        raise MinigptError(f"{str(source)!r}: no such file or folder ({text!r}, without the spaces around it, is one)")
    in_a_local_folder = bool(HUB_ID.match(text)) and "/" in text and Path(owner).is_dir()  # (a Hub id's form)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")) or in_a_local_folder:
        hint = f" (read as a local path: {owner}/ is a folder here)" if in_a_local_folder else ""
        raise MinigptError(f"{given}: no such file or folder{hint}")
    return None


def load_model(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, Tokenizer]:
    """Load a model and its tokenizer from any source `resolve_model` accepts (eval mode), its
    weights in `dtype` (torch.float32, bfloat16 or float16) on `device` (as `resolve_device` takes it:
    "auto", "cpu", "cuda", "cuda:N", "mps"; checked before any file is read)."""
    check_dtype(dtype, "dtype")
    device = resolve_device(device)
    folder, kind = resolve_model(source)
    load = load_checkpoint if kind == "minigpt" else load_hf_checkpoint
    return read_whole(folder, kind, lambda checkpoint: load(checkpoint, device, dtype))


def read_whole(folder: Path, kind: str, read: Callable[[Path], _T]) -> _T:
    """`read(checkpoint)` of the checkpoint in `folder` (a training run's: the one in force, resolved
    once a try), tried again where a writer changed it meanwhile. Its files are read by path, one after
    another: a run's save removes the step before last (a reader that had resolved it found files
    gone), and `convert_hf_weights.py --force` replaces a folder whole (a reader could take the config
    of one model and the weights of the next, shapes alike, without an error). A checkpoint folder is
    never changed in place, only replaced or removed, so the same folder (inode) before and after the
    read means one checkpoint was read."""
    for _ in range(READ_TRIES):
        checkpoint = (current_checkpoint(folder) if kind == "minigpt" else None) or folder
        before = _inode(checkpoint)
        try:
            result = read(checkpoint)
        except Exception:
            if before is not None and _inode(checkpoint) == before:
                raise
            continue
        if before is not None and _inode(checkpoint) == before:
            return result
    raise MinigptError(f"{folder}: changed while it was read, {READ_TRIES} times in a row; try again when the "
                       "program writing it is done")


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a `tokenizer.json` file, a folder holding tokenizer files, or a Hub id."""
    path = _local_path(source, "tokenizer")
    if path is None:
        repo_id = str(source).strip()
        repo = HubRepo(repo_id, "a local tokenizer.json (or a folder holding one)")
        folder = _download_with_tokenizer(repo, [])
        _require_tokenizer(repo, folder)
        return Tokenizer.from_hf_dir(folder)
    if path.is_file():
        return Tokenizer.from_file(path)
    # An HF model's folder is read as load_model reads it, as transformers would (a minigpt checkpoint
    # holds no settings file, and its config.json no model_type); a folder of tokenizer files alone, as it is
    hf = any((path / name).is_file() for name in HF_SETTINGS) or (
        (path / CONFIG_FILE).is_file() and not is_minigpt_checkpoint(path))
    return Tokenizer.from_hf_dir(path) if hf else Tokenizer.from_dir(path)


def convert_to_minigpt(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write any model source as a minigpt checkpoint folder at `out` (atomically), with a model card
    (`_card_for`); `overwrite=True` replaces a folder that holds anything, whole, but never one that is
    or holds `source` itself, nor the folder of a live training run (`keep_runs_out`: no run starts
    there meanwhile either)."""
    check_source_outside(folder_destination(out), source, "the source")
    with keep_runs_out(folder_destination(out)):
        model, tokenizer, card = _read_with_card(source, out, exported=False)
        return save_checkpoint_folder(out, model, tokenizer, overwrite, card=card)


def export_to_hf(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write any model source as a transformers `GPT2LMHeadModel` folder at `out` (atomically, with a
    model card: `_card_for`; `overwrite` as in `convert_to_minigpt`)."""
    check_source_outside(folder_destination(out), source, "the source")
    with keep_runs_out(folder_destination(out)):  # (as in `convert_to_minigpt`)
        model, tokenizer, card = _read_with_card(source, out, exported=True)
        return export_hf(model, tokenizer, out, card, overwrite=overwrite)


def _read_with_card(source: str | os.PathLike, out: str | os.PathLike, exported: bool) -> tuple[GPT, Tokenizer, str | None]:
    """The model, tokenizer and model card (`_card_for`) of `source` converted into `out`, read together
    from one checkpoint (a training run's: the one in force, resolved once; a save meanwhile mixes no
    steps)."""
    folder, kind = resolve_model(source)

    def read(checkpoint: Path) -> tuple[GPT, Tokenizer, str | None]:
        model, tokenizer = load_model(checkpoint)
        return model, tokenizer, _card_for(source, checkpoint, kind, out, model.config.block_size, exported)

    return read_whole(folder, kind, read)


def _card_for(source: str | os.PathLike, checkpoint: Path, kind: str, out: str | os.PathLike, window: int,
              exported: bool) -> str | None:
    """The model card of the folder `out` (as given, `~` expanded) converted from `checkpoint` (of
    `source`, a model with a `window`-token context), a transformers folder where `exported`. A
    minigpt checkpoint's card (README.md) travels, its usage naming `out` (None where it has none);
    an HF folder's or a Hub repo's own card is another model's, so `conversion_card` writes one that
    states the licence it states: a fine-tune of the converted folder states that licence too."""
    folder = str(home_expanded(out))
    if kind == "hf":
        on_hub = is_hub_id(source)
        name = str(source).strip() if on_hub else str(source)
        return conversion_card(name, on_hub, card_license(checkpoint / CARD_FILE), folder, window, exported)
    card, action = checkpoint / CARD_FILE, "export" if exported else "convert"
    if card.is_symlink() and not is_hub_id(source):  # (a folder from elsewhere: its README.md could name any
        # file; in huggingface_hub's cache, a Hub repo's, every file is a link to the cache's blobs)
        raise MinigptError(f"{card}: the model card is a symlink (to {os.readlink(card)}), not a file of the "
                           f"checkpoint's own; copy the card in, or move it away, to {action}")
    if not card.is_file():
        return None
    try:
        text = card.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MinigptError(f"{card}: the model card is not UTF-8 text ({e.reason} at byte {e.start}); make it "
                           f"UTF-8, or move it away, to {action}") from None
    return export_card(text, folder, window) if exported else copied_card(text, folder, window)


# A model folder's other files: tokenizer and generation settings as transformers saves them, and the card.
MODEL_FOLDER_EXTRAS = [*HF_SETTINGS, "special_tokens_map.json", GENERATION_FILE, CARD_FILE]


def check_replaceable(out: Path) -> None:
    """Refuse (one-line MinigptError) to replace a folder that holds anything but a model's files
    (minigpt's, or an HF folder's) or a training run's: `--force` is there to redo a conversion, and a
    mistyped `--out` must not delete a folder of someone's own work along with it. One inside a
    run's folder (a checkpoint's step folder) is refused as such first (`check_outside_runs`)."""
    check_outside_runs(out)
    patterns = [*MODEL_FILES, *LEGACY_FILES, *TOKENIZER_FILES, *MODEL_FOLDER_EXTRAS]
    for entry in sorted(out.iterdir()):
        model_file = any(fnmatch(entry.name, pattern) for pattern in patterns) and (
            entry.is_symlink() or entry.is_file())  # (a folder named model-x.safetensors is not one)
        if not model_file and (name := foreign_entry(entry)) is not None:
            raise MinigptError(f"--out {out}: holds {name!r}, which is no model's or training run's file, and "
                               "--force replaces only such a folder; choose another --out")
