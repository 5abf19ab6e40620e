"""convert_hf_weights.py end to end: both directions, and every bad input is one line + exit 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import call_cli, run_cli
from minigpt.loading import load_model


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_hf_to_minigpt_and_back(tiny_hf_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "mine"
    r = run_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    exported = tmp_path / "exported"
    r = run_cli("convert_hf_weights.py", "--to-hf", str(out), "--out", str(exported))
    assert r.returncode == 0, r.stderr
    (tmp_path / "plain").mkdir()  # both folders get the permissions a plain mkdir gives, not 0700
    assert out.stat().st_mode == exported.stat().st_mode == (tmp_path / "plain").stat().st_mode
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()(idx).logits
        b = GPT2LMHeadModel.from_pretrained(exported).eval()(idx).logits
        c = load_model(out)[0](idx)[0]
    # HF -> minigpt -> HF moves no bit (measured 0); minigpt vs transformers: measured 1.2e-6 (fp32 rounding)
    assert (a - b).abs().max() == 0 and (a - c).abs().max() < 5e-6
    from transformers import AutoTokenizer  # the tokenizer knows the model's window (256), not GPT-2's 1024

    assert AutoTokenizer.from_pretrained(exported).model_max_length == 256
    # a POSIX path may be any bytes; safetensors and tokenizers take only UTF-8 ones: refused before any
    # work (it was "saving failed ... surrogates not allowed" at the end; train.py left a folder behind)
    for script, args in (("convert_hf_weights.py", [str(tiny_hf_dir)]), ("train.py", ["--preset", "tiny"])):
        odd = tmp_path / os.fsdecode(b"o\xff")
        r = run_cli(script, *args, "--out", str(odd), errors="surrogateescape")
        assert r.returncode == 2 and r.stderr.splitlines() == [
            f"error: {tmp_path}/o\\udcff: the path is not UTF-8 (safetensors and tokenizers write and read only "
            "UTF-8 paths); choose a name in UTF-8"], r.stderr
        assert not odd.exists()
    # a second conversion onto a non-empty folder needs --force
    r = run_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out))
    assert_one_line_error(r, str(out), "--force")


def broken_copy(src, dst, edit_state=None, edit_config=None, raw_weights=None):
    """Copy an HF folder, then damage its weights or config."""
    shutil.copytree(src, dst)
    if edit_state:
        state = load_file(dst / "model.safetensors")
        edit_state(state)
        save_file(state, str(dst / "model.safetensors"))
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if raw_weights:
        (dst / "model.safetensors").write_bytes(raw_weights((dst / "model.safetensors").read_bytes()))
    return dst


CASES = {
    "truncated": (dict(raw_weights=lambda b: b[: len(b) // 2]), ["model.safetensors"]),
    "corrupt": (dict(raw_weights=lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b[24:]),
                ["model.safetensors"]),
    "missing_tensor": (dict(edit_state=lambda s: s.pop("transformer.h.1.mlp.c_fc.bias")),
                       ["transformer.h.1.mlp.c_fc.bias", "missing"]),
    "wrong_shape": (dict(edit_state=lambda s: s.update({"transformer.h.0.attn.c_proj.weight": torch.zeros(64, 65)})),
                    ["transformer.h.0.attn.c_proj.weight", "shape"]),
    "unknown_tensor": (dict(edit_state=lambda s: s.update({"transformer.h.0.attn.rotary": torch.zeros(3)})),
                       ["transformer.h.0.attn.rotary"]),
    "unsupported_config": (dict(edit_config=lambda c: c.update(reorder_and_upcast_attn=True)),
                           ["config.json", "reorder_and_upcast_attn"]),
    # an LM head of its own (transformers uses it; minigpt's head is wte): it used to be dropped in silence
    "head_not_wte": (dict(edit_state=lambda s: s.update({"lm_head.weight": -s["transformer.wte.weight"]})),
                     ["src: lm_head.weight differs from transformer.wte.weight"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_weights_are_refused_and_nothing_is_written(case, tiny_hf_dir, tmp_path):
    kwargs, needles = CASES[case]
    src = broken_copy(tiny_hf_dir, tmp_path / "src", **kwargs)
    out = tmp_path / "out"
    r = call_cli("convert_hf_weights.py", str(src), "--out", str(out))
    assert_one_line_error(r, *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_missing_path_and_not_a_checkpoint(tmp_path):
    r = call_cli("convert_hf_weights.py", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "nope")
    (tmp_path / "empty").mkdir()
    r = call_cli("convert_hf_weights.py", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "empty", "config.json")
    r = call_cli("convert_hf_weights.py", "--to-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "config.json")
    assert not (tmp_path / "out").exists()


def test_a_read_only_out_folder_is_refused_and_kept(tiny_hf_dir, tmp_path, monkeypatch):
    """An empty `--out` folder the user cannot write into (chmod 555) was renamed over: a new,
    writable folder in its place. Refused, as train.py refuses it, and kept. (Faked: as root every
    folder is writable.)"""
    import minigpt.files

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(minigpt.files.os, "access", lambda path, mode: Path(path) != locked and real(path, mode))
    inode = locked.stat().st_ino
    r = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(locked))
    assert r.returncode == 2 and r.stderr == f"error: {locked}: cannot write into it (permission denied)\n"
    assert locked.stat().st_ino == inode and not any(locked.iterdir()) and sorted(os.listdir(tmp_path)) == ["locked"]


def test_failed_conversion_leaves_previous_output_intact(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = broken_copy(tiny_hf_dir, tmp_path / "src", raw_weights=lambda b: b[:100])
    r = call_cli("convert_hf_weights.py", str(src), "--out", str(out), "--force")
    assert_one_line_error(r, "model.safetensors")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_interrupted_cli_stops_the_test_run(tiny_hf_dir, tmp_path, monkeypatch):
    """In `call_cli` a Ctrl-C (or gpu_check.sh's SIGINT at its time limit) became the CLI's exit 130,
    one failed test, and pytest went on to the next until the time limit's SIGKILL: no summary. It
    is raised again, and the CLI has still said "interrupted" and kept its output folder out."""
    import minigpt.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minigpt.loading, "load_model", interrupted)
    with pytest.raises(KeyboardInterrupt, match="convert_hf_weights.py was interrupted: interrupted$"):
        call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", [".", ".."])
def test_the_current_folder_is_refused_and_left_as_it_was(where, tiny_hf_dir, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here)
    r = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", where, "--force")
    assert_one_line_error(r, f"{where}: is the current folder (or one above it)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary folder anywhere
    assert [p.name for p in here.iterdir()] == ["keep.txt"] and (here / "keep.txt").read_text() == "mine"


def test_force_never_replaces_the_folder_it_reads(tiny_hf_dir, tmp_path):
    """`--out` that is the source or holds it is refused, in both directions, and the source stays;
    a symlink --out whose target holds the source is replaced itself (the link), so it converts."""
    src = tmp_path / "runs" / "src"
    shutil.copytree(tiny_hf_dir, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    mine = tmp_path / "mine"
    assert call_cli("convert_hf_weights.py", str(src), "--out", str(mine)).returncode == 0
    for args in ([str(src), "--out", str(src)], [str(src), "--out", str(tmp_path / "runs")],
                 [str(src) + "/", "--out", str(src / ".." / "src")], ["--to-hf", str(mine), "--out", str(mine)],
                 ["--to-hf", str(mine), "--out", str(tmp_path)]):
        r = call_cli("convert_hf_weights.py", *args, "--force")
        assert_one_line_error(r, "--out ", "replacing it would delete what is converted")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "runs"]
    link = tmp_path / "link"
    link.symlink_to("runs")
    assert call_cli("convert_hf_weights.py", str(link / "src"), "--out", str(link), "--force").returncode == 0
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_force_replaces_only_a_models_folder(tiny_hf_dir, tmp_path):
    """--force redoes a conversion: it replaces a model's folder (an HF one, with its model card and
    transformers' settings files; minigpt's), never one that holds anything else, which stays as it was."""
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.tex").write_text("mine")
    (precious / "sub" / "data.csv").write_text("1,2\n")
    r = call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(precious), "--force")
    assert_one_line_error(r, f"--out {precious}: holds 'sub', which is no model's or training run's file")
    assert sorted(str(p.relative_to(precious)) for p in precious.rglob("*")) == ["sub", "sub/data.csv", "thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # (no temporary folder left either)
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    for name in ("README.md", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / name).write_text("{}")
    for args in ([str(tiny_hf_dir), "--out", str(hf)], [str(tiny_hf_dir), "--out", str(hf)],
                 ["--to-hf", str(hf), "--out", str(tmp_path / "minigpt")]):
        assert call_cli("convert_hf_weights.py", *args, "--force").returncode == 0
    assert call_cli("convert_hf_weights.py", "--to-hf", str(hf), "--out", str(hf / ".." / "minigpt"), "--force").returncode == 0
    legacy = tmp_path / "legacy"  # an older save_pretrained's folder: .bin shards, their index, added_tokens.json
    legacy.mkdir()
    for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "added_tokens.json", "config.json"):
        (legacy / name).write_text("{}")
    assert call_cli("convert_hf_weights.py", str(tiny_hf_dir), "--out", str(legacy), "--force").returncode == 0
    assert (legacy / "model.safetensors").is_file() and not (legacy / "added_tokens.json").exists()


def test_usage_errors_exit_2(tmp_path):
    r = call_cli("convert_hf_weights.py", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "either SOURCE" in r.stderr
    for args, needle in ((["", "--out", str(tmp_path / "o")], "error: model: empty model path"),
                         (["--to-hf", "", "--out", str(tmp_path / "o")], "error: model: empty model path"),
                         (["x", "--out", ""], "error: argument --out: empty path")):
        r = call_cli("convert_hf_weights.py", *args)
        assert r.returncode == 2 and needle in r.stderr and not (tmp_path / "o").exists(), r.stderr
    r = call_cli("convert_hf_weights.py", "--help")
    assert r.returncode == 0 and "--to-hf" in r.stdout
