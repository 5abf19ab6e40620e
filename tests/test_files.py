"""minigpt.files' atomic writes of one file, one link and one folder: all or nothing, nothing left
behind, with the permissions a plain write would give.

(`atomic_folder` under kills and full disks: tests/test_faults.py.)
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from minigpt.errors import MinigptError
from minigpt.files import atomic_file, atomic_folder, atomic_symlink, clear_interrupted_saves, is_temporary_copy


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_replaces_the_file_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and is_temporary_copy(tmp.name, "metrics.jsonl")
        tmp.write_text("new\n")
        assert path.read_text() == "old\n"  # nothing shows before the block ends
    assert path.read_text() == "new\n" and names(tmp_path) == ["metrics.jsonl"]


def test_atomic_file_gets_the_usual_permissions(tmp_path, umask_027):
    """A file saved atomically has the mode any new file gets under the umask (0o640 under 027):
    a fixed 0o644 would pass for it under the usual 022."""
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("a")
    plain = tmp_path / "plain.txt"
    plain.write_text("a")
    assert oct(plain.stat().st_mode & 0o777) == oct(0o640)
    assert (tmp_path / "a.txt").stat().st_mode == plain.stat().st_mode


@pytest.mark.parametrize("error", [KeyError("a bug"), KeyboardInterrupt()])
def test_a_raise_inside_atomic_file_keeps_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old picture")
    with pytest.raises(type(error)), atomic_file(path) as tmp:
        tmp.write_bytes(b"half a pic")
        raise error
    assert path.read_bytes() == b"old picture" and names(tmp_path) == ["loss.png"]


def test_atomic_file_turns_a_write_failure_into_one_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    with pytest.raises(MinigptError) as err, atomic_file(path) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert str(err.value) == f"{path}: saving failed ([Errno 28] No space left on device); nothing was written"
    path.write_text("old")
    with pytest.raises(MinigptError, match=r"saving failed \(.*No such file.*\); the previous version is untouched$"), \
            atomic_file(path) as tmp:
        (tmp.parent / "missing" / "x").write_text("a folder that is not there")
    assert path.read_text() == "old" and names(tmp_path) == ["trace.jsonl"]


def test_concurrent_atomic_files_never_collide(tmp_path):
    path = tmp_path / "out.txt"
    inside = threading.Barrier(2)
    temporaries = []

    def write(text: str) -> None:
        with atomic_file(path) as tmp:
            temporaries.append(tmp)
            tmp.write_text(text)
            inside.wait(timeout=10)  # both writers hold a temporary file at once

    threads = [threading.Thread(target=write, args=(text,)) for text in ("a" * 1000, "b" * 1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert temporaries[0] != temporaries[1]
    assert path.read_text() in ("a" * 1000, "b" * 1000) and names(tmp_path) == ["out.txt"]


def test_atomic_folder_replaces_a_symlink_out_also_one_that_names_nothing(tmp_path):
    """A symlink at `out` is replaced by the folder, the folder it names left alone; a link that names
    nothing is replaced the same way (a rename of a folder onto it failed: "Not a directory")."""
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("mine")
    for name, points_to in (("link", "target"), ("dangling", "nowhere")):
        (tmp_path / name).symlink_to(points_to)
        with atomic_folder(tmp_path / name) as tmp:
            (tmp / "new.txt").write_text(name)
        assert not (tmp_path / name).is_symlink() and (tmp_path / name / "new.txt").read_text() == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "target"]
    assert [p.name for p in (tmp_path / "target").iterdir()] == ["keep.txt"] and not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fd's file through /proc/self/fd")
def test_atomic_folder_syncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    """The promise of atomic_folder's docstring: when the block returns, every file and folder written in
    it is fsynced, then the folder is renamed into place, then the rename is. Without the fsync of the
    tree a power loss right after the rename could leave a checkpoint of empty files under the final
    name; deleting `fsync_tree(tmp)` left every test passing (only the parent's fsync ran)."""
    events = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a))) or replace(a, b))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(a))) or rename(a, b))
    for out, overwrite in ((tmp_path / "new", True), (tmp_path / "kept", False)):  # (os.replace; os.rename)
        events.clear()
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "state.json").write_text("{}")
        renamed = events.index(("rename", str(tmp)))
        synced = [path for kind, path in events[:renamed] if kind == "fsync"]
        written = [tmp / "model.safetensors", tmp / "sub" / "state.json", tmp / "sub", tmp]
        assert sorted(synced) == sorted(os.path.realpath(p) for p in written), events  # (/proc: real paths)
        assert events[renamed + 1:] == [("fsync", os.path.realpath(tmp_path))]  # then the rename itself
        assert (out / "sub" / "state.json").read_text() == "{}"


def test_atomic_symlink_swaps_the_pointer(tmp_path):
    link = tmp_path / "current"
    atomic_symlink("step-1", link)
    assert os.readlink(link) == "step-1"
    atomic_symlink("step-2", link)  # over an existing link: replaced, never removed first
    assert os.readlink(link) == "step-2" and names(tmp_path) == ["current"]


def test_atomic_symlink_failure_is_one_line_and_keeps_the_link(tmp_path):
    link = tmp_path / "current"
    atomic_symlink("step-1", link)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "x").write_text("a folder cannot be replaced by a link")
    with pytest.raises(MinigptError) as err:
        atomic_symlink("step-2", tmp_path / "blocked")
    assert str(err.value).startswith(f"{tmp_path / 'blocked'}: cannot point it to step-2 (")
    assert "\n" not in str(err.value)
    assert os.readlink(link) == "step-1" and names(tmp_path) == ["blocked", "current"]


def test_leftover_temporary_files_are_cleared(tmp_path):
    path = tmp_path / "metrics.jsonl"
    (tmp_path / ".metrics.jsonl.tmp-dead").write_text("half")
    os.symlink("nowhere", tmp_path / ".metrics.jsonl.tmp-link")
    (tmp_path / ".other.tmp-keep").write_text("not ours")
    clear_interrupted_saves(path)
    assert names(tmp_path) == [".other.tmp-keep"]


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    """Two runs building one data cache entry at once: the second's clearing must not delete the
    first's folder in progress (its PID is in the name and that process lives), and a save of the
    same entry meanwhile completes beside it; a dead process's leftovers, ours included (a PID
    reused after a restart), are cleared, and so is an older minigpt's (no PID in the name)."""
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        out = tmp_path / "train-abc"
        busy = tmp_path / f".train-abc.tmp-{live.pid}-0123456789ab"
        busy.mkdir()
        (busy / "blocks.npy").write_bytes(b"being written")
        aside = tmp_path / f".train-abc.old-{live.pid}-x1"  # between its two renames
        (aside / "train-abc").mkdir(parents=True)
        for leftover in (f".train-abc.tmp-{dead.pid}-0123456789ab", f".train-abc.tmp-{os.getpid()}-0123456789ab",
                         ".train-abc.tmp-0123456789ab"):
            (tmp_path / leftover).mkdir()
        with atomic_folder(out) as tmp:
            (tmp / "blocks.npy").write_bytes(b"ours")
        assert names(tmp_path) == sorted([aside.name, busy.name, "train-abc"])
        assert (busy / "blocks.npy").read_bytes() == b"being written" and (out / "blocks.npy").read_bytes() == b"ours"
    finally:
        live.kill()
        live.wait()
    clear_interrupted_saves(out)  # (its writer gone: now a leftover)
    assert names(tmp_path) == ["train-abc"]


def test_another_machines_or_containers_temporary_is_kept_until_a_day_old(tmp_path):
    """A cache shared by two containers (or hosts): both ran as PID 1, and each run's clearing took
    the other's entry in progress for its own dead leftover and deleted it (the run then failed
    saving). A PID is only compared on the machine and in the PID namespace that made it."""
    import time

    from minigpt.files import _process_space

    out = tmp_path / "train-abc"
    ours = _process_space()
    other = "0" * 8 if ours != "0" * 8 else "1" * 8
    busy, stale = tmp_path / f".train-abc.tmp-1-{other}-0123456789ab", tmp_path / f".train-abc.tmp-1-{other}-ba98"
    aside = tmp_path / f".train-abc.old-1-{other}-x1y2"
    for folder in (busy, stale, aside):
        folder.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(stale, (day_ago, day_ago))
    dead_here = tmp_path / f".train-abc.tmp-{os.getpid()}-{ours}-0123456789ab"  # (our PID: an earlier process's)
    dead_here.mkdir()
    with atomic_folder(out) as tmp:
        assert tmp.name.startswith(f".train-abc.tmp-{os.getpid()}-{ours}-")
        (tmp / "blocks.npy").write_bytes(b"ours")
    assert names(tmp_path) == sorted([aside.name, busy.name, "train-abc"])


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a fixed chmod cannot pass for "what mkdir gives"."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_folders_get_the_permissions_of_a_plain_mkdir(tmp_path, umask_027):
    from minigpt.run_folder import write_run_checkpoint

    with atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
    step = write_run_checkpoint(tmp_path / "run", 1, lambda folder: (folder / "x.txt").write_text("x"))
    (tmp_path / "plain").mkdir()
    mode = (tmp_path / "plain").stat().st_mode
    assert oct(mode & 0o777) == oct(0o750)
    assert (tmp_path / "ckpt").stat().st_mode == mode and step.stat().st_mode == mode


def test_safetensors_files_get_the_permissions_of_any_new_file(tmp_path, umask_027):
    """safetensors makes its files its owner's only (0o600, whatever the umask), so a shared
    checkpoint's weights were unreadable to the group that could list its folder."""
    import torch

    from minigpt.files import save_tensors

    save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    (tmp_path / "plain.txt").write_text("x")
    assert oct((tmp_path / "w.safetensors").stat().st_mode & 0o777) == oct(0o640)
    assert (tmp_path / "w.safetensors").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


@pytest.mark.parametrize("failing", [1, 2], ids=["moving-the-old-aside", "moving-the-new-in"])
def test_a_failed_rename_keeps_the_previous_folder_and_leaves_nothing(tmp_path, monkeypatch, failing):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(MinigptError) as err, atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert str(err.value) == (
        f"{out}: saving failed ([Errno 16] Device or resource busy); the previous version is untouched"
    )
    assert names(tmp_path) == ["out"] and (out / "old.txt").read_text() == "old" and names(out) == ["old.txt"]


def test_atomic_folder_refuses_the_current_folder_and_what_is_not_a_folder(tmp_path, monkeypatch):
    here, a_file = tmp_path / "here", tmp_path / "a_file"
    (here / "sub").mkdir(parents=True)
    a_file.write_text("mine")
    monkeypatch.chdir(here)
    current = "is the current folder (or one above it); run from outside it, or choose another folder"
    for out, message in [
        (".", f".: {current}"),
        ("..", f"..: {current}"),
        ("sub/..", f"sub/..: {current}"),
        (here, f"{here}: {current}"),
        (a_file, f"{a_file}: is a file, not a folder"),
        (a_file / "sub", f"{a_file / 'sub'}: {a_file} is not a folder"),
    ]:
        with pytest.raises(MinigptError) as err, atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
        assert str(err.value) == message
    assert names(tmp_path) == ["a_file", "here"] and names(here) == ["sub"] and names(here / "sub") == []
    assert a_file.read_text() == "mine"


def test_a_path_ending_in_dot_dot_replaces_the_folder_it_names(tmp_path):
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    with atomic_folder(base / "sub" / "..") as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(tmp_path) == ["base"] and names(base) == ["new.txt"]


def test_a_folder_filled_while_a_new_one_is_written_is_not_replaced(tmp_path):
    """overwrite=False checked the folder only before writing: a training run started in it meanwhile
    (`convert_hf_weights.py --out RUN` with RUN new) had its checkpoint replaced by the conversion."""
    out = tmp_path / "out"
    with pytest.raises(MinigptError, match=r"another process wrote into it meanwhile; it was left as it is and "
                                           r"nothing was written"):
        with atomic_folder(out, overwrite=False) as tmp:
            (tmp / "a.txt").write_text("new")
            out.mkdir()
            (out / ".lock").write_text("a run's")
    assert [p.name for p in out.iterdir()] == [".lock"] and list(tmp_path.iterdir()) == [out]
    empty = tmp_path / "empty"
    with atomic_folder(empty, overwrite=False) as tmp:  # (made empty meanwhile: nothing to lose, replaced)
        (tmp / "a.txt").write_text("new")
        empty.mkdir()
    assert (empty / "a.txt").read_text() == "new"


@pytest.mark.parametrize("between", ["ctrl-c", "a-run-takes-the-place"])
def test_what_comes_between_a_saves_two_renames_keeps_the_previous_folder(tmp_path, monkeypatch, between):
    """Between moving the previous `out` aside and renaming the new one in: a KeyboardInterrupt left
    `out` missing (the model gone for `sample.py --model out`) until the next save to that path; a
    folder made at `out` meanwhile (a run's lock) made the new one's rename fail, and the previous
    one, which could not go back, was deleted with the `.old` folder that held it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def moved_aside_then(src, dst):
        real_replace(src, dst)
        if Path(src) == out and between == "ctrl-c":
            raise KeyboardInterrupt
        if Path(src) == out:
            out.mkdir()
            (out / ".lock").write_text("a run's")

    monkeypatch.setattr(os, "replace", moved_aside_then)
    expected = pytest.raises(KeyboardInterrupt) if between == "ctrl-c" else pytest.raises(MinigptError, match="saving")
    with expected, atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    if between == "ctrl-c":
        assert names(tmp_path) == ["out"] and names(out) == ["old.txt"]
    else:  # (clear_interrupted_saves puts it back once `out` is free)
        assert names(out) == [".lock"] and [p.read_text() for p in tmp_path.glob(".out.old-*/out/old.txt")] == ["old"]
