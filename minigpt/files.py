"""File helpers every part of minigpt shares: read a JSON file, write a folder atomically.

Data cache entries, checkpoint folders and exported HF folders are all written the same way: into a
temporary folder beside the destination, flushed to the disk, then renamed into place. A reader
therefore finds either the previous complete folder or the new complete one, never half of one,
even after a crash or a power cut. This module knows nothing of models, tokenizers or data.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MinigptError, reason


def read_json(path: Path) -> dict:
    """Parse a JSON object from `path`, or raise a one-line MinigptError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinigptError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinigptError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # `[[[[...` nested deeper than the parser's stack
        raise MinigptError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MinigptError(f"{path}: expected a JSON object")
    return data


def fsync(path: Path) -> None:
    """Flush a file's bytes (or a folder's list of entries) to the disk, so they survive power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder's entries, the deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


def clear_interrupted_saves(out: Path) -> None:
    """Tidy up after a save of `out` that was killed midway (SIGKILL, power loss).

    A kill while writing leaves a `.NAME.tmp-*` folder: deleted. A kill between the two renames in
    `atomic_folder` leaves the previous `out` only as `.NAME.old-*/NAME`: moved back first.
    """
    out = Path(out)
    for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*")):
        if not out.exists() and (stale / out.name).is_dir():
            os.replace(stale / out.name, out)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; when the block succeeds it becomes `out`.

    When the block returns, everything in the temporary folder is fsynced, then it is renamed to
    `out`, and the rename itself is fsynced. If the block raises, the temporary folder is deleted and
    `out` is untouched. An existing `out` is replaced only after the new folder is complete: it is
    moved aside, the new one renamed in, and the old one deleted, so at every moment one complete
    folder exists under a known name (after a kill between the two renames, the next save moves it
    back: `clear_interrupted_saves`). A write that fails with an OSError (a full disk, a read-only
    folder) becomes a one-line MinigptError that says whether the previous `out` survived; writers
    of other libraries' files turn those libraries' write errors into OSErrors.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MinigptError(f"{out}: exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_interrupted_saves(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise MinigptError(f"{out}: cannot create a folder here ({e.strerror or e})") from None
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous version is untouched" if out.is_dir() else "nothing was written"
        raise MinigptError(f"{out}: saving failed ({reason(e)}); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(out.parent)  # the renames themselves
