"""File helpers every part of minigpt shares: read a JSON file; write a file, a folder or a link atomically.

This module is the only place that writes by "temporary copy, fsync, rename": data cache entries,
checkpoint folders, exported HF folders and a run's step folders (`atomic_folder`), a run's loss
plot, the start of its metrics.jsonl and sample.py's trace file (`atomic_file`), and a run's `current`
checkpoint pointer (`atomic_symlink`). Each is written in full beside its destination under a
temporary name `.NAME.tmp-XXXX`, flushed to the disk, then renamed into place, and the rename itself
is flushed. A reader therefore finds either the previous complete version or the new complete one,
never half of one, even after a crash or a power cut; a kill leaves at most a temporary copy, which
`clear_interrupted_saves` deletes. It also writes .safetensors files (`save_tensors`), so that they
fail and get permissions as other files do. It knows nothing of models, tokenizers or data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import MinigptError, reason

FOREIGN_WRITER_SECONDS = 24 * 3600  # (`_writer_lives`: another machine's temporary, unchanged this long, is a leftover)

if TYPE_CHECKING:
    import torch


LINE_BREAKS = re.compile(r"\r\n|\r|\n")  # where a line of text ends: as csv, Notepad and old Macs end it


def read_json(path: Path) -> dict:
    """Parse a JSON object from `path`, or raise a one-line MinigptError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinigptError(f"{path}: file not found") from None
    except ValueError as e:  # (bad JSON, bytes that are not UTF-8, an integer of more digits than int() takes)
        raise MinigptError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # `[[[[...` nested deeper than the parser's stack
        raise MinigptError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MinigptError(f"{path}: expected a JSON object")
    return data


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write a .safetensors file with the permissions any new file gets (0o666 less the umask:
    safetensors itself makes its files its owner's only), and a failed write (a full disk) as an
    OSError, as for any other file, so that `atomic_folder` reports it in one line."""
    from safetensors import SafetensorError  # (here: the CLIs import this module before parsing)
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(reason(e)) from None
    umask = os.umask(0)  # (reading the umask means setting it: put it straight back)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def reading_safetensors(path: Path) -> Iterator[None]:
    """Turn the errors of reading a .safetensors file into one line naming it (and refuse a FIFO or
    a device, whose reading would wait for a writer forever)."""
    from safetensors import SafetensorError

    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise MinigptError(f"{path}: cannot read it (not a regular file)")
    try:
        yield
    except SafetensorError as e:
        raise MinigptError(f"{path}: not a valid safetensors file ({e})") from None
    except FileNotFoundError:
        raise MinigptError(f"{path}: file not found") from None
    except OSError as e:  # a folder, a device, an unreadable file
        detail = "a folder, not a file" if Path(path).is_dir() else e  # (safetensors says "No such device" of a folder)
        raise MinigptError(f"{path}: cannot read it ({detail})") from None


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

    A kill while writing leaves a `.NAME.tmp-*` folder or file: deleted. A kill between the two
    renames in `atomic_folder` leaves the previous `out` only as `.NAME.old-*/NAME`: moved back first.
    """
    out = Path(out)
    for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*")):
        if _writer_lives(stale):
            continue
        if not out.exists() and (stale / out.name).is_dir():
            os.replace(stale / out.name, out)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        if _writer_lives(stale):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def clear_leftovers_in(folder: Path) -> None:
    """`clear_interrupted_saves` for every entry of `folder` (a cache) that a killed save left a
    temporary of: an entry is otherwise tidied only when it is saved again, and one that no run asks
    for again (its data or block size changed) kept its leftover, as large as the entry, for good."""
    with contextlib.suppress(OSError):  # (nothing to tidy where nothing can be listed)
        leftovers = {m.group(1) for p in folder.iterdir() if (m := re.match(r"\.(.+)\.(?:tmp|old)-", p.name))}
        for name in sorted(leftovers):
            clear_interrupted_saves(folder / name)


def _writer_lives(temporary: Path) -> bool:
    """Whether the process that made `temporary` (`.NAME.tmp-PID-SPACE-...` or `.NAME.old-PID-SPACE-...`)
    still runs: then it is a concurrent writer's work in progress (two runs building one data cache
    entry), not a killed save's leftover. Our own PID is an earlier process's that had it (after a
    restart). A PID of another machine or container (SPACE, `_process_space`) means nothing here: two
    containers sharing a cache may both run as PID 1, and each deleted the other's entry mid-write.
    Such a temporary is taken as its writer's until it has not changed for a day."""
    parts = temporary.name.rpartition(".")[2].split("-")  # older minigpts: "tmp-PID-xxxx", "tmp-xxxx"
    if len(parts) == 4 and parts[2] != _process_space():
        with contextlib.suppress(FileNotFoundError):  # (gone meanwhile: its writer finished)
            return time.time() - temporary.lstat().st_mtime < FOREIGN_WRITER_SECONDS
        return False
    if len(parts) not in (3, 4) or not parts[1].isdigit() or int(parts[1]) == os.getpid():
        return False
    try:
        os.kill(int(parts[1]), 0)  # (signal 0: sends nothing, only asks whether the process exists)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process: it lives)
        pass
    return True


def _writer_tag() -> str:
    """"PID-SPACE": who writes a temporary, in its name (`_temporary_path`, `atomic_folder`'s .old-),
    as `_writer_lives` reads it back."""
    return f"{os.getpid()}-{_process_space()}"


@functools.cache
def _process_space() -> str:
    """Where this process's PID means something, as 8 hex digits: the machine (its host name) and, on
    Linux, the PID namespace (a container's own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def is_temporary_copy(name: str, of: str) -> bool:
    """Whether the file name `name` is a temporary copy of `of` that these helpers write (and that a
    killed save may leave behind)."""
    return name.startswith(f".{of}.tmp-")


def _temporary_path(path: Path) -> Path:
    """A fresh name beside `path` for a temporary file, folder or link: the writer's PID (see
    `_writer_lives`), then random, so that concurrent writers never collide. The writer creates it
    itself (so it gets the usual permissions, where `tempfile.mkstemp` and `mkdtemp` would make it
    its owner's only)."""
    return path.with_name(f".{path.name}.tmp-{_writer_tag()}-{uuid.uuid4().hex[:12]}")


def renamed_path(out: Path) -> Path:
    """Where a rename onto `out` lands, as a real path: its folder's links resolved, but not `out`
    itself (a symlink there is replaced, not what it names)."""
    return Path(os.path.realpath(out.parent)) / out.name


def check_utf8(path: str | os.PathLike,
               why: str = "safetensors and tokenizers write and read only UTF-8 paths") -> None:
    """Refuse (one-line MinigptError, saying `why`) a path that is not UTF-8: by default an output
    path, which the `safetensors` and `tokenizers` libraries take in no other form. (Python decodes
    a file name's undecodable bytes to lone surrogates, which no UTF-8 text holds.)"""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise MinigptError(f"{path}: the path is not UTF-8 ({why}); choose a name in UTF-8") from None


def folder_destination(out: str | os.PathLike) -> Path:
    """`out` as `atomic_folder` writes it, after refusing (one-line MinigptError) a path it cannot use.

    Refused: a path that is not UTF-8 (the `safetensors` and `tokenizers` libraries take no other),
    a file (`is a file, not a folder`), a path under a file, and the folder the process runs in or
    one above it (`.`, `..`): replacing it would move the working folder away from under the
    process and the shell that started it (and `.` itself cannot be renamed at all). A path
    such as `a/..` has no name of its own that a rename could replace, so it becomes the real path
    of the folder it names. CLIs call this before any slow work, so that a bad `--out` is refused
    at once; `atomic_folder` calls it again.
    """
    given = home_expanded(out)  # ("~/run" is the home folder's, as load_model reads it, not a folder "~")
    check_utf8(given)
    out = Path(os.path.realpath(given)) if given.name in ("", "..") else given
    if out.exists() and not out.is_dir():
        raise MinigptError(f"{given}: is a file, not a folder")
    if not out.exists():
        ancestor = next(p for p in out.parents if p.exists())  # "." or "/" at the latest
        if not ancestor.is_dir():
            raise MinigptError(f"{given}: {ancestor} is not a folder")
    if out.is_dir():  # it would be moved aside: not where we stand
        moved = renamed_path(out)
        here = Path.cwd()
        if moved == here or moved in here.parents:
            raise MinigptError(
                f"{given}: is the current folder (or one above it); run from outside it, or choose another folder"
            )
    return out


def home_expanded(path: str | os.PathLike) -> Path:
    """`path` with a leading `~` or `~user` as that home folder, as a shell expands it. A `~nouser` that is
    no user's (pathlib's `expanduser` raised RuntimeError: a traceback) is taken as it is where a file or
    folder has that name, as a shell does; else it is a one-line MinigptError, not a folder "~nouser" made."""
    expanded = os.path.expanduser(path)
    first = expanded.split(os.sep)[0]
    if first.startswith("~") and not os.path.lexists(first):
        raise MinigptError(f"{expanded}: {first} is no user's home folder here")
    return Path(expanded)


def check_source_outside(out: Path, source: str | os.PathLike, what: str, name: str = "out") -> None:
    """Refuse (one-line MinigptError naming `out` as `name`, e.g. the flag "--out") an output folder
    `out` that is the local folder `source` (`what`: "the source", "--to-hf") read from, or one that
    holds it: replacing `out` would delete the source (`convert_hf_weights.py DIR --out DIR --force`).
    `out` is where `atomic_folder` renames to: a symlink there is replaced, not what it names, so a
    source reached through it is safe. A `source` that is no local path (a Hub id) is not checked."""
    source = os.path.expanduser(source)
    if not os.path.exists(source):
        return
    read, replaced = Path(os.path.realpath(source)), renamed_path(out)
    if replaced == read or replaced in read.parents:
        raise MinigptError(f"{name} {out}: is the folder of {what} ({source}) or holds it, and replacing it would "
                           "delete what is converted; choose another folder")


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[str]:
    """A new empty folder in the system's temporary folder, removed with all it holds on the way out,
    however it is left (what a command must not leave behind: `--eval-only`'s token cache)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield folder


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; when the block succeeds it becomes `out`.

    When the block returns, everything in the temporary folder is fsynced, then it is renamed to
    `out`, and the rename itself is fsynced. If the block raises, the temporary folder is deleted and
    `out` is untouched. An existing `out` is replaced only after the new folder is complete: it is
    moved aside, the new one renamed in, and the old one deleted, so at every moment one complete
    folder exists under a known name (after a kill between the two renames, the next save moves it
    back: `clear_interrupted_saves`). A write that fails with an OSError (a full disk, a read-only
    folder) becomes a one-line MinigptError that says whether the previous `out` survived, and
    leaves nothing of the attempt behind; writers of other libraries' files turn those libraries'
    write errors into OSErrors. The folder gets the permissions a plain `mkdir` gives (`0o777` less
    the umask): `tempfile.mkdtemp`'s owner-only ones would lock other users out of a checkpoint.
    `overwrite=False` refuses, before anything is written, an `out` that is a folder with anything in
    it: replacing a folder deletes all it holds (the public savers, such as `save_checkpoint_folder`,
    ask for it to be said); and if another process fills such a folder meanwhile (a training run
    started there), the finished folder is not renamed over it either.
    """
    out = folder_destination(out)
    if not overwrite and out.is_dir() and not out.is_symlink() and any(out.iterdir()):
        raise MinigptError(f"{out}: already exists and is not empty; pass overwrite=True to replace it whole "
                           "(everything in it is deleted), or choose another folder")
    if out.is_dir() and not out.is_symlink() and not os.access(out, os.W_OK):  # (renamed over, it would go anyway)
        raise MinigptError(f"{out}: cannot write into it (permission denied)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_interrupted_saves(out)
        tmp = _temporary_path(out)
        tmp.mkdir()
    except OSError as e:
        raise MinigptError(f"{out}: cannot create a folder here ({e.strerror or e})") from None
    try:
        yield tmp
        fsync_tree(tmp)
        if overwrite or out.is_symlink():
            _rename_into_place(tmp, out)
        else:  # onto nothing or an empty folder; one filled meanwhile refuses it (ENOTEMPTY / EEXIST)
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not overwrite and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise MinigptError(f"{out}: another process wrote into it meanwhile; it was left as it is and "
                               "nothing was written (choose another folder)") from None
        kept = "the previous version is untouched" if out.is_dir() else "nothing was written"
        raise MinigptError(f"{out}: saving failed ({reason(e)}); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(out.parent)  # the renames themselves


def _rename_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete folder `tmp` to `out`. An existing `out` is first moved into a folder
    `.NAME.old-XXXX` beside it and deleted once the new one is in place; if a rename fails (or a
    Ctrl-C comes between them), the previous `out` is put back and the `.old` folder removed, so a
    failure leaves `out` as it was.
    A symlink `out` is replaced as `out` is, also one that names nothing (a folder cannot be renamed
    onto a link)."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_writer_tag()}-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:  # (an OSError, or a Ctrl-C between the two renames: `out` is never left missing)
        if os.path.lexists(old / out.name):  # back, unless something took its place meanwhile (a run's
            with contextlib.suppress(OSError):  # folder, or the new one: a rename over a folder with files fails)
                os.replace(old / out.name, out)
        with contextlib.suppress(OSError):  # (left while it holds the previous `out`: clear_interrupted_saves
            old.rmdir()  # puts it back or removes it at the next save)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file to; when the block succeeds it becomes `path`.

        with atomic_file(out / "loss.png") as tmp:
            fig.savefig(tmp)

    When the block returns, the file is fsynced, renamed over `path` in one step, and the rename is
    fsynced: a reader sees the old file or the new one, never a part. If the block raises, the
    temporary file is deleted and `path` is untouched. As in `atomic_folder`, an OSError (a full
    disk, a read-only folder) becomes a one-line MinigptError that says whether the previous `path`
    survived; other exceptions pass through unchanged. A temporary file left by a killed write is not
    cleared here, as a concurrent writer's looks the same: a destination with one writer at a time
    clears it with `clear_interrupted_saves`.
    """
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)  # the rename itself
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous version is untouched" if path.exists() else "nothing was written"
        raise MinigptError(f"{path}: saving failed ({reason(e)}); {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_symlink(target: str, link: str | os.PathLike) -> None:
    """Make `link` a symlink to `target` in one step: the pointer swap.

    A new link is made beside `link` under a temporary name and renamed over it, so `link` names
    the old target or the new one at every moment, never nothing; then the rename is fsynced.
    An OSError becomes a one-line MinigptError; `link` is then as it was.
    """
    link = Path(link)
    tmp = _temporary_path(link)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync(link.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MinigptError(f"{link}: cannot point it to {target} ({reason(e)})") from None
