"""A training run's output folder: what may be written into it, its checkpoints, and its lock.

The output folder (`out/`) is a checkpoint that `minigpt.loading.load_model` reads, records beside it:

    out/.ckpt/step-000000120-1a2b3c4d/   one complete checkpoint (its step, 8 random hex digits): the model's
                                         files, the card README.md, training_state.json (step, data position,
                                         optimizer hyper-parameters, ...) and training_state.safetensors
                                         (optimizer moments, RNG states). Nothing is pickled.
    out/.ckpt/current                    a symlink to the checkpoint in force
    out/config.json, ...                 fixed symlinks `.ckpt/current/<file>`, one per file
    out/metrics.jsonl                    one JSON object per logged step and per evaluation
    out/loss.png                         train and validation loss against step (with matplotlib)
    out/.lock                            the run's lock: one run per folder at a time

A save is a pointer swap, built from `minigpt.files`' helpers: the new step folder is written
whole with `atomic_folder` (a temporary folder, fsynced, renamed to `step-...`), then `current` is
swapped to it with `atomic_symlink` (one atomic rename), and only then are the older folders
deleted. Whenever the process is killed, `current` names one complete checkpoint and every file read
through it is from the same step; readers need no recovery step, and the next save deletes whatever a
killed one left in `.ckpt` (a run killed in its first save, before `current` existed, leaves a step
folder that `--resume` links and goes on from, and a new run refuses as a run's: `check_out_folder`).
loss.png, and metrics.jsonl's start (cut back to the checkpoint's rows on a resume), are written with
`atomic_file`; rows are appended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch
from safetensors.torch import load_file

from .errors import MinigptError, reason
from .files import (atomic_folder, atomic_symlink, check_utf8, home_expanded, is_temporary_copy, read_json,
                    reading_safetensors, renamed_path, save_tensors)

CKPT_DIR = ".ckpt"
CURRENT = "current"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CARD_FILE = "README.md"
LOCK_FILE = ".lock"
STATE_FORMAT = "minigpt-training-state"
STATE_VERSION = 2  # 2: the losses since the last metrics row (`losses_since_row`)


def current_checkpoint(out: str | os.PathLike) -> Path | None:
    """The step folder `out/.ckpt/current` points to (resolved once, so that the model files and the
    training state read from it are of one step), or None when `out` holds no checkpoint."""
    link = Path(out) / CKPT_DIR / CURRENT
    step = link.resolve() if link.is_symlink() and link.resolve().is_dir() else None
    if step is not None and step.parent != link.parent.resolve():  # (a run's link names a step folder beside it)
        raise MinigptError(f"{link}: points to {step}, outside {link.parent}: not a checkpoint of this run")
    return step


def check_out_folder(out: str | os.PathLike, resume: bool, *, locked: bool = True) -> Path | None:
    """Refuse an output folder we must not write into; return the checkpoint to resume from.

    An `--out` may be new or empty, or hold a training run of ours: with `--resume` it must have a
    checkpoint, without `--resume` it must not (a run's checkpoint is never overwritten). Called
    with `locked=False` before the run lock is taken, it checks only what no other run can change
    (a file, an unwritable parent, foreign files), so that a folder a live run is writing is refused
    by the lock, which names that run, not by the checkpoint the run has just saved.
    """
    if not str(out):  # Path("") is ".": the run would write into the current folder
        raise MinigptError("--out: empty path")
    out = Path(out)
    check_utf8(out)
    if out.exists() and not out.is_dir():
        raise MinigptError(f"--out {out}: exists and is not a folder")
    if out.is_symlink() and not out.exists():  # (the run would write through it, into nothing)
        raise MinigptError(f"--out {out}: a symlink to {os.readlink(out)}, which does not exist; create that "
                           "folder, or choose another --out")
    if not out.exists():  # it will be made: its nearest existing ancestor must be a writable folder
        ancestor = next(p for p in out.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise MinigptError(f"--out {out}: cannot create it, {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise MinigptError(f"--out {out}: cannot create it, {ancestor} is not a writable folder")
    check_outside_runs(out)
    ckpt = current_checkpoint(out)
    if out.is_dir():
        for entry in sorted(out.iterdir()):
            if (name := foreign_entry(entry)) is not None:
                raise MinigptError(
                    f"--out {out}: holds {name!r}, which is not from a minigpt training run; "
                    "choose another --out"
                )
    if not locked:
        return None
    if ckpt is None and (out / CKPT_DIR).is_dir() and any((out / CKPT_DIR).glob("step-*")):
        ckpt = _unlinked_first_save(out)
        if ckpt is None:  # (a `current` damaged by hand, several folders: the next save would delete them)
            raise MinigptError(f"--out {out}: its {CKPT_DIR}/ holds checkpoint folders but no valid {CKPT_DIR}/"
                               f"{CURRENT} link to one; choose another --out (or point the link at the folder to resume)")
        if resume:
            atomic_symlink(ckpt.name, out / CKPT_DIR / CURRENT)
            warnings.warn(f"--resume: {out / CKPT_DIR / CURRENT} was missing (a run stopped in its first save, between "
                          f"writing its checkpoint and linking it): it now names that checkpoint, {ckpt.name}")
    if resume and ckpt is None:
        raise MinigptError(f"--resume: {out} holds no checkpoint to resume from")
    if not resume and ckpt is not None:
        step = read_json(ckpt / STATE_JSON).get("step")
        raise MinigptError(
            f"--out {out}: already holds a training run (checkpoint at step {step}); pass --resume "
            "to continue it, or choose another --out"
        )
    return ckpt


def _unlinked_first_save(out: Path) -> Path | None:
    """The step folder of a run killed in its first save after the folder was renamed into place
    (so complete) and before `current` was made; None where `.ckpt` holds anything else: a
    `current` link (a dangling one was damaged by hand), or other step folders."""
    if os.path.lexists(out / CKPT_DIR / CURRENT):
        return None
    steps = [p for p in (out / CKPT_DIR).glob("step-*") if p.is_dir() and not p.is_symlink()]
    return steps[0] if len(steps) == 1 and (steps[0] / STATE_JSON).is_file() else None


def check_outside_runs(out: str | os.PathLike) -> None:
    """Refuse (one-line MinigptError) an output folder inside a training run's: a run's folder holds only
    the run's files, and one more (an export in `run/exp`) makes its every later `--resume` refuse it. A
    run's folder holds a `.ckpt/` folder, or the lock file of a live run (none before its first save)."""
    parent = renamed_path(Path(out).absolute()).parent
    for folder in (parent, *parent.parents):
        if (folder / CKPT_DIR).is_dir() or _held_by_a_run(folder / LOCK_FILE):  # (a live run before its first save)
            raise MinigptError(f"--out {out}: is inside the training run in {folder}, whose folder holds only the "
                               "run's own files; choose a folder outside it")


def foreign_entry(entry: Path) -> str | None:
    """None for an entry of a run's folder that a run writes, each of its kind (or one gone since the
    listing): .ckpt/ a folder holding only `current` (a link), step folders and temporary copies of
    both; metrics.jsonl, loss.png (and their temporary copies) and .lock plain files; the links into
    .ckpt/current/. Otherwise the entry's name (`.ckpt/NAME` inside .ckpt/): a save deletes what
    .ckpt/ holds besides the checkpoint in force, and the lock file is emptied, so a link there or a
    folder of someone else's files must not pass for ours."""
    if not os.path.lexists(entry):  # (a live run's save renamed it: under torchrun rank 1 checks as rank 0 writes)
        return None
    real = not entry.is_symlink()
    if entry.name == CKPT_DIR:
        if not (real and entry.is_dir()):
            return entry.name
        inside = (e for e in sorted(entry.iterdir()) if not (
            not os.path.lexists(e) or (e.name == CURRENT and e.is_symlink()) or is_temporary_copy(e.name, CURRENT)
            or (e.name.startswith(("step-", ".step-")) and e.is_dir() and not e.is_symlink())))
        return next((f"{CKPT_DIR}/{e.name}" for e in inside), None)
    if entry.name in (METRICS_FILE, PLOT_FILE, LOCK_FILE) or any(
            is_temporary_copy(entry.name, f) for f in (METRICS_FILE, PLOT_FILE)):
        return None if real and entry.is_file() else entry.name
    return None if not real and os.readlink(entry) == f"{CKPT_DIR}/{CURRENT}/{entry.name}" else entry.name


def write_run_checkpoint(out: Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder with `write_files(folder)`, then make it current in one rename.

    The new folder is complete (and on disk) before `.ckpt/current` is swapped to it; older step
    folders, and anything a killed save left in `.ckpt`, are deleted only afterwards. The folder's
    name is unique, not just its step: a resumed run may save a step again while `current` still
    names the folder of that step it resumed from. A failed write (a full disk) is a one-line
    MinigptError, and the checkpoint in force stays as it was.
    """
    ckpt_dir = out / CKPT_DIR
    folder = ckpt_dir / f"step-{step:09d}-{uuid.uuid4().hex[:8]}"
    with atomic_folder(folder) as tmp:
        write_files(tmp)
        for f in tmp.iterdir():  # out/<file> -> .ckpt/current/<file>, made once per file name
            link = out / f.name
            if not link.is_symlink():
                os.symlink(f"{CKPT_DIR}/{CURRENT}/{f.name}", link)
    try:
        atomic_symlink(folder.name, ckpt_dir / CURRENT)  # the one atomic step: the new checkpoint is in force
    except BaseException:  # (after the rename itself, its fsync failing or a second Ctrl-C: then it is current)
        if current_checkpoint(out) != folder.resolve():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for old in ckpt_dir.iterdir():
        if old.name not in (CURRENT, folder.name):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return folder


# --- the training state of a checkpoint -----------------------------------------------------------


def write_training_state(folder: Path, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint's training state, pickle-free: the tensors (optimizer moments, RNG states) in
    training_state.safetensors, everything else (step, data position, settings, ...) as JSON."""
    save_tensors({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, folder / STATE_TENSORS)
    info = {"format": STATE_FORMAT, "version": STATE_VERSION, **info}
    (folder / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def read_training_state(folder: Path) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """(info, tensors) of checkpoint `folder`, as `write_training_state` wrote them, for the body of
    a `with` that restores them.

    A damaged file (truncated, not safetensors, missing) is a one-line MinigptError naming it, and
    so is a field or tensor the resume asks for that the file lacks (`StateRecord`), or a field of
    the wrong type that the body trips on (a string where it reads a number, a number where it
    reads a list or a record: the error it raises): which fields a state must hold, and of
    what type, is the trainer's business, so they are checked as they are read.
    """
    info = _fields(folder / STATE_JSON, read_json(folder / STATE_JSON))
    if info.get("format") != STATE_FORMAT:
        raise MinigptError(f"{folder / STATE_JSON}: not a minigpt training state (version {STATE_VERSION})")
    if info.get("version") != STATE_VERSION:
        raise MinigptError(f"{folder / STATE_JSON}: a training state of version {info.get('version')!r}; this minigpt "
                           f"resumes version {STATE_VERSION} (start a new run from its model with --init {folder})")
    path = folder / STATE_TENSORS
    with reading_safetensors(path):
        tensors = load_file(str(path))
    try:
        yield info, StateRecord(path, "tensor", tensors)
    except (TypeError, ValueError, AttributeError) as e:  # (AttributeError: a number where a record belongs)
        raise MinigptError(f"{folder / STATE_JSON}: a field of the wrong type ({reason(e)})") from None


def _fields(path: Path, value: Any) -> Any:
    """`value`, read from JSON file `path`, with each object in it (nested ones too) a StateRecord."""
    if isinstance(value, dict):
        return StateRecord(path, "field", {k: _fields(path, v) for k, v in value.items()})
    return [_fields(path, v) for v in value] if isinstance(value, list) else value


class StateRecord(dict):
    """The fields of training_state.json or the tensors of training_state.safetensors, by name: one
    the file lacks is a one-line MinigptError naming the file and the entry, not a KeyError (a
    damaged checkpoint is the user's to fix, not a bug); `in` and `.get` work as for any dict."""

    def __init__(self, path: Path, kind: str, entries: dict[str, Any]) -> None:
        super().__init__(entries)
        self.path, self.kind = path, kind

    def __missing__(self, name: str) -> NoReturn:
        raise MinigptError(f"{self.path}: missing {self.kind} {name!r}")


def saved_run_settings(folder: Path) -> dict[str, Any]:
    """The settings (by flag name) that the run whose checkpoint is `folder` was made with."""
    settings = read_json(folder / STATE_JSON).get("run", {})
    return settings if isinstance(settings, dict) else {}


def recorded_path(source: str | None) -> str | None:
    """A path setting as a run records it: resolved (the same file however it was spelled), and a
    file inside the package (--preset tiny's sample) by its place there, the same after the clone moves."""
    if not source or not Path(source).exists():
        return source
    path, package = Path(source).resolve(), Path(__file__).resolve().parent
    return f"<minigpt>/{path.relative_to(package).as_posix()}" if path.is_relative_to(package) else str(path)


def check_same_run(out: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume the run in `out` with settings (by flag name) other than it was made with. A
    path moved or deleted since keeps its text, the same setting where it names the same place (a resume
    reads the checkpoint, not --init: "made with --init /abs/base, not base" refused one)."""
    for key in sorted(set(saved) | set(current)):
        was, now = saved.get(key), current.get(key)
        was = recorded_path(was) if isinstance(was, str) and os.path.isabs(was) else was  # (as recorded now)
        texts = isinstance(was, str) and isinstance(now, str)  # (None: a flag not given, or not recorded)
        if was != now and not (texts and home_expanded(was).resolve() == home_expanded(now).resolve()):
            if was is None:
                change = f"without {key}, not with {key} {now}"
            else:
                change = f"with {key} {was}, not " + ("without it" if now is None else f"{now}")
            raise MinigptError(
                f"--resume: the run in {out} was made {change}; resume with the same settings, or "
                "choose another --out"
            )


# --- one run per folder ----------------------------------------------------------------------------


class RunLock:
    """One run per output folder: an exclusive `flock` on `out/.lock`, held for the run's life.

    The operating system drops the lock when the process ends, however it ends (a SIGKILL, a power
    loss), so there is never a stale lock to clean up: the next `--resume` starts at once. The file
    holds the holder's process id and what it is doing ("training"), which a refused run names.
    Under torchrun only rank 0 locks.

        with RunLock(out):      # refuses (MinigptError) while another process holds `out`
            ...train...

    A run that fails before writing anything (bad data, say) leaves no trace: when this lock made
    `out`, and `out` holds nothing but the lock file on the way out, both are removed again, and so
    are the parent folders the lock made for it (`checkpoints/` of `checkpoints/eli5`) if still empty.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders acquire made, `out` first, then its new parents

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise a one-line MinigptError naming the process that holds it."""
        try:
            self._made = [p for p in (self.out, *self.out.absolute().parents) if not p.exists()]
            self.out.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # (a link: ELOOP)
                _lock_or_refuse(fd, self.out)
                # A run that gave up may have removed the file between our open and our lock: then
                # we hold a lock on a file nobody else can find, and must lock the new one instead.
                try:
                    if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            _write_holder(fd, TRAINING)
        except OSError as e:
            raise MinigptError(f"--out {self.out}: cannot lock it ({e.strerror or e})") from None
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; remove the lock file and `out` too when this run made `out` and left it
        otherwise empty (the file is removed before the lock is dropped, see `acquire`), then the
        parents it made, deepest first, while they are empty."""
        if self._fd is None:
            return
        try:
            if self._made and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                for folder in self._made:  # only folders this run made; rmdir refuses a non-empty one
                    folder.rmdir()
        except OSError:
            pass  # something else appeared in `out` or a parent meanwhile: leave it and those above
        _let_go(self._fd)
        self._fd = None


@contextlib.contextmanager
def keep_runs_out(out: str | os.PathLike) -> Iterator[None]:
    """Keep training runs out of folder `out` while the block replaces it whole
    (`convert_hf_weights.py --force`).

    While a live run holds `out`'s lock this refuses, in the one line a second `train.py` gets:
    replacing the folder would delete the run's checkpoints under it, and the run would save its
    next one into a folder that is no longer its own. Otherwise it takes the lock (writing its
    process id and "conversion", which a refused run names) and holds it to the end of the block,
    so that no run starts in a folder about to be replaced. In a folder without a lock file it makes
    one for the block and removes it after, so a failed replacement adds nothing to `out` (a
    replaced folder takes it along). An `out` that is no folder yet, an empty one or a symlink
    (replaced itself, not what it names) holds no run to keep out: a run that writes into `out`
    meanwhile is not replaced (`atomic_folder` with overwrite=False). An `out` inside a run's folder
    is refused (`check_outside_runs`).
    """
    check_outside_runs(out)
    path, made = Path(out) / LOCK_FILE, False
    try:
        if Path(out).is_symlink() or not Path(out).is_dir() or not any(Path(out).iterdir()):
            fd = None
        elif made := not os.path.lexists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        else:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)  # (a link there: ELOOP, refused, nothing emptied)
    except OSError as e:
        raise MinigptError(f"--out {out}: cannot lock it ({e.strerror or e})") from None
    if fd is None:
        yield
        return
    _lock_or_refuse(fd, out)
    try:
        _write_holder(fd, CONVERSION)
        yield
    finally:
        with contextlib.suppress(OSError):  # (ours, not a lock file a run made in the folder put in its place)
            if made and os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        _let_go(fd)


def _lock_or_refuse(fd: int, out: str | os.PathLike) -> None:
    """flock `fd`, an open lock file of folder `out`, exclusively; if a live run holds it, close `fd`
    and raise a one-line MinigptError naming that run's process."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise MinigptError(
            f"--out {out}: {holder} is using this folder; wait for it to end, or choose another --out"
        ) from None


TRAINING, CONVERSION = "training", "conversion"  # what a lock's holder is doing, as its file says
_HOLDERS = {TRAINING: "another training run", CONVERSION: "a weight conversion"}


def _held_by_a_run(lock: Path) -> bool:
    """Whether `lock` is a live training run's lock file, as its holder wrote it (`_write_holder`; a run
    that ended emptied it). Not any `.lock`: pytest's temporary folders hold one, too."""
    with contextlib.suppress(OSError):
        return not lock.is_symlink() and lock.read_bytes()[:64].decode("ascii", "replace").split()[1:] == [TRAINING]
    return False


def _write_holder(fd: int, role: str) -> None:
    """Write "<process id> <role>" into the lock file `fd` this process holds, for `_holder` to name."""
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {role}\n".encode())


def _let_go(fd: int) -> None:
    """Empty the lock file `fd` this process holds, then close it (dropping the lock): the next
    holder's line is then the only one a refused process can read, never this one's."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # (a file removed with its folder, or on a read-only disk: closing still drops the lock)
    os.close(fd)


def _holder(fd: int) -> str:
    """Who holds a lock file, from what its holder writes right after locking: "another training
    run (process N)" or "a weight conversion (process N)"."""
    for _ in range(50):  # the holder may have locked but not yet written: wait up to ~1 s
        pid, _, role = os.pread(fd, 64, 0).decode("ascii", "replace").strip().partition(" ")
        if pid.isdigit() and (role in _HOLDERS or not role):  # (no role: written by a minigpt before roles)
            return f"{_HOLDERS.get(role, 'another training run')} (process {pid})"
        time.sleep(0.02)
    return "another process"
