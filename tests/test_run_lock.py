"""One run per output folder: the lock, two runs started at once, and a resume after SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, call_cli, python_path
from minigpt.errors import MinigptError
from minigpt.run_folder import LOCK_FILE, RunLock, check_outside_runs

# A model small enough that the runs cost little next to starting Python and torch.
TINY = ("--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--max-steps", "6", "--save-every", "2", "--log-every", "1", "--no-progress")


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def ctrl_c_as_in_a_terminal() -> None:
    """A shell starts its background jobs with SIGINT ignored, and children inherit that, so under
    `bash .ci/run &` a run would ignore a Ctrl-C sent before its training loop takes the signal
    over. The runs here start with SIGINT's default, as a run started in a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": python_path()}, cwd=ROOT, preexec_fn=ctrl_c_as_in_a_terminal,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()} training\n"
        with pytest.raises(MinigptError) as e:
            RunLock(out).acquire()
        assert str(e.value) == (f"--out {out}: another training run (process {os.getpid()}) is using this "
                                "folder; wait for it to end, or choose another --out")
    assert not out.exists()  # made by the lock, left empty: removed with it
    with RunLock(out):  # free again
        # a live run's folder before its first save holds no .ckpt/: an export into it was written, and
        # every later --resume of the run refused it; a .lock the run did not write (pytest's) is no run's
        with pytest.raises(MinigptError, match=f"^--out {out / 'exp'}: is inside the training run in {out},"):
            check_outside_runs(out / "exp")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / LOCK_FILE).write_text("")
        check_outside_runs(tmp_path / "other" / "exp")
    check_outside_runs(out / "exp")  # (the run ended: its lock file emptied, and this run saved nothing)


def test_two_runs_started_at_once_on_one_out(tmp_path):
    # Both runs are far too long to finish on their own, so whatever the machine's load, the loser
    # meets the lock while the winner still trains (a short winner could end first, and the late run
    # would then meet a finished folder instead). The winner is stopped with Ctrl-C afterwards.
    out = tmp_path / "run"
    flags = (*TINY, "--max-steps", "100000", "--save-every", "5", "--log-every", "1", "--out", str(out))
    runs = [start(*flags) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in runs):
            assert time.monotonic() < deadline, "neither run was refused"
            time.sleep(0.05)
        (loser,) = [p for p in runs if p.poll() is not None]
        (winner,) = [p for p in runs if p is not loser]
        loser_out, loser_err = loser.communicate()
        assert winner.poll() is None, winner.communicate()  # the winner still trains
        while not (out / "training_state.json").exists():  # ... and gets to its first checkpoint
            assert winner.poll() is None and time.monotonic() < deadline + 120
            time.sleep(0.05)
        winner.send_signal(signal.SIGINT)  # Ctrl-C: save and stop
        _, winner_err = winner.communicate(timeout=120)
    finally:
        for p in runs:
            p.kill()
    assert loser.returncode == 2, loser_err
    assert loser_err.strip().splitlines() == [
        f"error: --out {out}: another training run (process {winner.pid}) is using this folder; wait for it "
        "to end, or choose another --out"
    ]
    assert loser_out == ""
    assert winner.returncode == 130, winner_err
    last = json.loads((out / "training_state.json").read_text())["step"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, last + 1))  # one run's rows, each once


def test_resume_while_the_run_lives_is_refused_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    assert call_cli("train.py", *TINY, "--out", str(out)).returncode == 0
    with RunLock(out):  # as if the run were still going
        before = snapshot(out)  # (the lock file now names this process)
        result = call_cli("train.py", *TINY, "--out", str(out), "--resume", "--max-steps", "8")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: --out {out}: another training run (process {os.getpid()}) is using this folder; wait for "
            "it to end, or choose another --out"
        ]
        assert snapshot(out) == before


def test_what_a_live_runs_save_renames_away_meanwhile_is_not_taken_for_foreign(tmp_path, monkeypatch):
    """Under torchrun rank 1 checks --out while rank 0 writes it: a temporary copy of metrics.jsonl
    listed, then renamed into place before it was looked at, was "holds '.metrics.jsonl.tmp-...',
    which is not from a minigpt training run" (a CI run failed so), and so was a step folder of
    .ckpt/ deleted after a save. An entry gone since the listing is no one's."""
    from minigpt.run_folder import check_out_folder

    out = tmp_path / "run"
    assert call_cli("train.py", *TINY, "--out", str(out)).returncode == 0
    gone = {out / ".metrics.jsonl.tmp-123-abcdef012345", out / ".ckpt" / "step-000000001-gone"}
    listed = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda folder: iter([*listed(folder), *(g for g in gone if g.parent == folder)]))
    assert check_out_folder(out, resume=True) is not None  # (the checkpoint in force, to resume from)
    (out / "notes.txt").write_text("mine")  # (one that is there is still refused)
    with pytest.raises(MinigptError, match="holds 'notes.txt', which is not from a minigpt training run"):
        check_out_folder(out, resume=True)


def test_convert_force_never_replaces_the_folder_of_a_live_run(tmp_path, tiny_hf_dir):
    """`convert_hf_weights.py --force` would delete a live run's checkpoints under it: refused, in the
    line a second run gets. While a conversion replaces a folder, no run can start in it; once the
    run has ended, the folder is replaced by the conversion alone (no .ckpt, .lock or records of the
    run left in it)."""
    from minigpt.loading import convert_to_minigpt, export_to_hf
    from minigpt.run_folder import keep_runs_out

    out = tmp_path / "run"
    assert call_cli("train.py", *TINY, "--out", str(out)).returncode == 0
    with RunLock(out):  # as if the run were still going
        before = snapshot(out)  # (the lock file now names this process)
        result = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out), "--force")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: --out {out}: another training run (process {os.getpid()}) is using this folder; wait for "
            "it to end, or choose another --out"
        ]
        assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]
        # the library's converters too: overwrite=True replaced the live run's folder (the run then failed)
        for convert in (convert_to_minigpt, export_to_hf):
            with pytest.raises(MinigptError, match=re.escape(f"--out {out}: another training run (process "
                                                             f"{os.getpid()}) is using this folder")):
                convert(tiny_hf_dir, out, overwrite=True)
            assert snapshot(out) == before
    with keep_runs_out(out), pytest.raises(MinigptError) as refused:
        RunLock(out).acquire()
    assert str(refused.value) == (f"--out {out}: a weight conversion (process {os.getpid()}) is using this "
                                  "folder; wait for it to end, or choose another --out")
    result = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]


def test_a_lock_file_that_is_a_link_is_refused_and_what_it_names_is_kept(tmp_path, tiny_hf_dir):
    """The lock file was opened through a link and emptied: `out/.lock -> ~/notes.txt` lost the
    notes to a training run, or to a conversion with --force."""
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    result = call_cli("train.py", *TINY, "--out", str(out))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --out {out}: holds '.lock', which is not from a minigpt training run; choose another --out"]
    with pytest.raises(MinigptError, match=r"cannot lock it \(Too many levels of symbolic links\)"):
        RunLock(out).acquire()
    model = tmp_path / "model"
    assert call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(model)).returncode == 0
    (model / LOCK_FILE).symlink_to(victim)
    result = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(model), "--force")
    assert result.returncode == 2 and "holds '.lock', which is no model's or training run's file" in result.stderr
    assert victim.read_text() == "precious"


def test_a_conversion_keeps_runs_out_of_a_folder_it_replaces_and_out_of_one_it_makes(tmp_path, tiny_hf_dir,
                                                                                    monkeypatch):
    """A folder that never held a run had no lock file, so nothing kept a run from starting in it while
    `--force` replaced it; and a run started in a new --out while the conversion wrote was replaced
    by it (its checkpoint deleted, the run then told "the checkpoint of step 1 is untouched")."""
    import minigpt.checkpoint as checkpoint
    from minigpt.run_folder import keep_runs_out

    model = tmp_path / "model"
    assert call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(model)).returncode == 0
    with keep_runs_out(model), pytest.raises(MinigptError, match="a weight conversion .* is using this folder"):
        RunLock(model).acquire()
    assert not (model / LOCK_FILE).exists()  # (made for the block, removed after it)
    write = checkpoint.write_checkpoint_files

    def a_run_starts_meanwhile(*args, **kwargs):
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "metrics.jsonl").write_text("a run's\n")
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_checkpoint_files", a_run_starts_meanwhile)
    result = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(tmp_path / "new"))
    assert result.returncode == 2 and "another process wrote into it meanwhile" in result.stderr
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["metrics.jsonl"]


def test_force_replaces_only_a_models_files_by_name_and_kind(tmp_path, tiny_hf_dir):
    """--force judged entries by name alone, and not inside .ckpt/: a folder named
    model-archive.safetensors, or .ckpt/ holding someone's files, was deleted with the folder."""
    for name, make in {"model-archive.safetensors": lambda out: (out / "model-archive.safetensors").mkdir(),
                       ".ckpt/mine": lambda out: (out / ".ckpt" / "mine").mkdir(parents=True)}.items():
        out = tmp_path / name.replace("/", "_")
        out.mkdir()
        (out / "config.json").write_text("{}")
        make(out)
        result = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out), "--force")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [f"error: --out {out}: holds {name!r}, which is no model's or "
                                                      "training run's file, and --force replaces only such a folder; "
                                                      "choose another --out"]
        assert (out / name).is_dir()


def test_nothing_is_written_inside_a_runs_folder(tmp_path, tiny_hf_dir):
    """A run's folder holds only the run's files, and one more would make every later --resume of it
    refuse: a conversion, an export or another run with --out inside it (or inside its .ckpt/,
    or reached through a link) is refused in one line, and the run still resumes."""
    out = tmp_path / "run"
    assert call_cli("train.py", *TINY, "--out", str(out)).returncode == 0
    (tmp_path / "link").symlink_to("run")
    before = snapshot(out)
    for script, *args, inside in (
        ("convert_hf_weights.py", str(tiny_hf_dir), out / "hf"),
        ("convert_hf_weights.py", "--to-hf", str(out), out / "exported" / "deeper"),
        ("convert_hf_weights.py", "--to-hf", str(out), tmp_path / "link" / "exported"),
        ("train.py", *TINY, out / ".ckpt" / "another"),
    ):
        result = call_cli(script, *args, "--out", str(inside))
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: --out {inside}: is inside the training run in {out}, whose folder holds only the run's own "
            "files; choose a folder outside it"], result.stderr
    # --force onto a checkpoint's own step folder: refused as inside the run (it said the step's
    # training_state.json was "no model's or training run's file")
    from minigpt.run_folder import current_checkpoint

    step = current_checkpoint(out)
    result = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(step), "--force")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --out {step}: is inside the training run in {out}, whose folder holds only the run's own files; "
        "choose a folder outside it"], result.stderr
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "link", "run"]
    assert call_cli("train.py", *TINY, "--out", str(out), "--resume").returncode == 0  # (finished: nothing to do)


def read_until(proc: subprocess.Popen, needle: str) -> str:
    """The child's stdout up to the first line holding `needle` (it must appear within 120 s)."""
    seen, deadline = "", time.monotonic() + 120
    while needle not in seen:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, (seen, proc.stderr.read() if proc.poll() is not None else "")
        seen += line
    return seen


def test_after_a_sigkill_resume_starts_at_once(tmp_path):
    out = tmp_path / "run"
    flags = (*TINY, "--max-steps", "100000", "--save-every", "3", "--log-every", "100", "--out", str(out))
    proc = start(*flags)
    try:
        deadline = time.monotonic() + 120
        while not (out / "training_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).read_text() == f"{proc.pid} training\n"  # the file stays; the lock died with the process
    step = json.loads((out / "training_state.json").read_text())["step"]
    resumed = start(*flags, "--resume")  # not refused: the lock went with the killed process
    try:
        assert f"resumed from {out} at step {step}" in read_until(resumed, "out: ")
        assert (out / LOCK_FILE).read_text() == f"{resumed.pid} training\n"
        resumed.send_signal(signal.SIGINT)  # Ctrl-C: save and stop
        _, stderr = resumed.communicate(timeout=120)
    finally:
        resumed.kill()
    assert resumed.returncode == 130, stderr
    assert json.loads((out / "training_state.json").read_text())["step"] >= step


def test_a_killed_holders_longer_line_is_overwritten_whole(tmp_path):
    """A holder killed with SIGKILL never empties its lock file. The next holder's line must replace
    that one whole: written over it without truncating first, "12345678 conversion" under a shorter
    "<pid> training" left a tail ("training\\nversion"), so a refused run waited ~1 s and named
    "another process", and the folder was not recognised as a live run's."""
    from minigpt.run_folder import _held_by_a_run

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("123456789012 conversion\n")  # as a killed conversion left it
    with RunLock(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()} training\n"
        assert _held_by_a_run(out / LOCK_FILE)
        with open(out / LOCK_FILE) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MinigptError, match=rf"^--out {re.escape(str(out))}: another training run \(process "
                           rf"{os.getpid()}\) is using this folder"):
            RunLock(out).acquire()


def test_a_lock_file_removed_between_its_open_and_its_lock_is_not_the_one_held(tmp_path, monkeypatch):
    """A run that gives up removes its lock file before letting go: a run that opened the file just
    before that, then locked it, holds a lock on a file nobody else can find. Taken as locked, a
    third run made a new lock file and trained in the same folder; the lock is taken again on the
    file in place."""
    from minigpt import run_folder

    out = tmp_path / "run"
    out.mkdir()
    real_lock, calls = run_folder._lock_or_refuse, []

    def lock_then_lose_the_file(fd, where):
        real_lock(fd, where)
        calls.append(fd)
        if len(calls) == 1:  # (the giving-up run's removal, right after our lock)
            (out / LOCK_FILE).unlink()

    monkeypatch.setattr(run_folder, "_lock_or_refuse", lock_then_lose_the_file)
    with RunLock(out):
        assert len(calls) == 2  # locked again, on the file now in place
        monkeypatch.setattr(run_folder, "_lock_or_refuse", real_lock)
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()} training\n"
        with pytest.raises(MinigptError, match=r"another training run \(process \d+\) is using this folder"):
            RunLock(out).acquire()


def test_a_conversion_removes_only_its_own_lock_file(tmp_path):
    """A conversion that made `out`'s lock file removes it when done, but not a lock file that took its
    place meanwhile (the folder replaced, a run started in it): removed, that run's lock could be
    made again by a second run, and both trained in one folder."""
    from minigpt.run_folder import keep_runs_out

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with keep_runs_out(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()} conversion\n"
        (out / LOCK_FILE).unlink()  # the folder replaced, a run's own lock file in it
        run = open(out / LOCK_FILE, "w")
        fcntl.flock(run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run.write("4242 training\n")
        run.flush()
    try:
        assert (out / LOCK_FILE).read_text() == "4242 training\n"
        with pytest.raises(MinigptError, match=r"another training run \(process 4242\) is using this folder"):
            RunLock(out).acquire()
    finally:
        run.close()
    with keep_runs_out(out):
        pass
    assert (out / LOCK_FILE).read_text() == ""  # (not made by this conversion: kept, emptied)


def test_step_folders_without_a_current_link_resume_only_a_lone_complete_one(tmp_path):
    """Without `.ckpt/current`, only a run killed in its first save (one step folder, complete) is
    resumed, the link made for it. Two step folders (a link removed by hand) are refused: resumed,
    the run took whichever the folder listing gave first, maybe the older, and its next save deleted
    the other. So is one without its training state (a save cut short)."""
    from minigpt.run_folder import CKPT_DIR, CURRENT, STATE_JSON, check_out_folder

    out = tmp_path / "run"
    steps = [out / CKPT_DIR / f"step-{n:09d}-{tag}" for n, tag in ((2, "aaaaaaaa"), (4, "bbbbbbbb"))]
    for step in steps:
        step.mkdir(parents=True)
        (step / STATE_JSON).write_text('{"step": %d}\n' % int(step.name[5:14]))
    refused = (rf"^--out {re.escape(str(out))}: its {re.escape(CKPT_DIR)}/ holds checkpoint folders but no valid "
               rf"{re.escape(CKPT_DIR)}/{CURRENT} link to one")
    for resume in (True, False):
        with pytest.raises(MinigptError, match=refused):
            check_out_folder(out, resume=resume)
    assert not os.path.lexists(out / CKPT_DIR / CURRENT)
    (steps[0] / STATE_JSON).unlink()
    shutil.rmtree(steps[1])
    with pytest.raises(MinigptError, match=refused):  # one folder, its training state never written
        check_out_folder(out, resume=True)
    (steps[0] / STATE_JSON).write_text('{"step": 2}\n')
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert check_out_folder(out, resume=True) == steps[0]
    assert os.readlink(out / CKPT_DIR / CURRENT) == steps[0].name


def test_the_holder_is_named_from_what_its_lock_file_says(tmp_path):
    """A lock file written before holders said what they do ("PID" alone) still names the process;
    a holder that let go leaves its file empty, so a leftover line never names a later holder."""
    out = tmp_path / "run"
    with RunLock(out):
        pass
    out.mkdir()
    (out / LOCK_FILE).write_text("4242\n")  # as an older minigpt wrote it
    with open(out / LOCK_FILE) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MinigptError, match=r"another training run \(process 4242\) is using this folder"):
            RunLock(out).acquire()
    from minigpt.run_folder import keep_runs_out

    with keep_runs_out(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()} conversion\n"
    assert (out / LOCK_FILE).read_text() == ""  # let go: nothing left for the next holder's refusals to read
