"""Fault injection and hostile input: minigpt keeps working, loses no data, and runs no code from a
weights file.

Users point minigpt at files downloaded from anywhere, kill jobs midway and fill disks. Every case
here feeds one such fault to a CLI (or the library function behind it) and checks the promise:
a correct result, or one clear `error: ...` line and exit status 2 — never a traceback, never a
half-written output folder, never a damaged previous one.

Run this suite alone with `python -m pytest -m faults`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, call_cli, python_path, run_cli, save_hf_model
from minigpt.checkpoint import load_checkpoint
from minigpt.config import GPTConfig
from minigpt.errors import MinigptError
from minigpt.files import atomic_folder, clear_interrupted_saves
from minigpt.loading import load_model

pytestmark = pytest.mark.faults

WEIGHTS = "model.safetensors"
WPE = "transformer.wpe.weight"  # same name and shape in HF and minigpt folders: a handy victim


# --- helpers ----------------------------------------------------------------------------------


def assert_one_line_error(result, *needles: str) -> None:
    """Exit status 2 and exactly one `error: ...` line on stderr, naming each of `needles`."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` (recursively) with its bytes, to prove a folder was left untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders an interrupted or failed save could leave beside its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """A .safetensors file's raw parts: the JSON header (8-byte little-endian length first) and data."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def write_safetensors(path: Path, header: bytes, data: bytes, declared: int | None = None) -> None:
    """Write raw safetensors bytes; `declared` overrides the header length written in front."""
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)


def convert(*args: str):
    return call_cli("convert_hf_weights.py", *args)


# --- hostile .safetensors files, both directions -----------------------------------------------


def huge_header(path: Path) -> None:
    header, data = read_safetensors(path)
    write_safetensors(path, json.dumps(header).encode(), data, declared=2**62)


def header_not_json(path: Path) -> None:
    _, data = read_safetensors(path)
    write_safetensors(path, b"<html>Rate limit exceeded</html>" + b" " * 64, data)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def offsets_past_end(path: Path) -> None:
    header, data = read_safetensors(path)
    header[WPE]["data_offsets"] = [len(data) + 4096, len(data) + 4096 + 256 * 64 * 4]
    write_safetensors(path, json.dumps(header).encode(), data)


def int64_tensor(path: Path) -> None:
    state = load_file(path)
    state[WPE] = torch.zeros(state[WPE].shape, dtype=torch.int64)
    save_file(state, str(path))


def transposed_shape(path: Path) -> None:
    header, data = read_safetensors(path)
    header[WPE]["shape"] = header[WPE]["shape"][::-1]  # same byte count, wrong layout
    write_safetensors(path, json.dumps(header).encode(), data)


def duplicate_name(path: Path) -> None:
    """Name one tensor twice (JSON allows it; the safetensors parser silently keeps the last)."""
    header, data = read_safetensors(path)
    text = json.dumps(header)
    twin = json.dumps({WPE: header[WPE]})[1:-1]
    write_safetensors(path, (text[:-1] + ", " + twin + "}").encode(), data)


HOSTILE_WEIGHTS = {
    "huge_header": (huge_header, ["header too large"]),
    "header_not_json": (header_not_json, ["not a valid safetensors file"]),
    "truncated": (truncated, ["not a valid safetensors file"]),
    "empty_file": (empty_file, ["not a valid safetensors file"]),
    "offsets_past_end": (offsets_past_end, ["not a valid safetensors file"]),
    "int64_tensor": (int64_tensor, [WPE, "int64"]),
    "transposed_shape": (transposed_shape, [WPE, "shape [64, 256]"]),
    "duplicate_name": (duplicate_name, [WPE, "twice"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_WEIGHTS))
def test_hostile_safetensors_hf_to_minigpt(case, tiny_hf_dir, tmp_path):
    """HF -> minigpt: the file is refused in one line naming it, and --out is never created."""
    damage, needles = HOSTILE_WEIGHTS[case]
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    damage(src / WEIGHTS)
    out = tmp_path / "out"
    assert_one_line_error(convert(str(src), "--out", str(out)), str(src / WEIGHTS), *needles)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(HOSTILE_WEIGHTS))
def test_hostile_safetensors_minigpt_to_hf(case, tiny_minigpt_dir, tmp_path):
    """minigpt -> HF over an existing export (--force): refused, and the old export is untouched."""
    damage, needles = HOSTILE_WEIGHTS[case]
    src = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "src"))
    damage(src / WEIGHTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("an earlier export")
    result = convert("--to-hf", str(src), "--out", str(out), "--force")
    assert_one_line_error(result, str(src / WEIGHTS), *needles)
    assert snapshot(out) == {"README.md": b"an earlier export"} and leftovers(tmp_path) == []


def test_weights_that_are_a_fifo_are_refused_not_waited_on(tiny_minigpt_dir, tmp_path):
    """A minigpt folder whose model.safetensors is a FIFO (a named pipe): reading it waited for a
    writer forever (in a child process here, so that a wait fails the test instead of hanging it)."""
    src = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "src"))
    (src / WEIGHTS).unlink()
    os.mkfifo(src / WEIGHTS)
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(src), "hi"], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "PYTHONPATH": python_path()}, cwd=ROOT)
    assert_one_line_error(result, str(src / WEIGHTS), "cannot read it (not a regular file)")


def test_weights_that_are_a_folder_are_refused(tiny_minigpt_dir, tmp_path):
    src = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "src"))
    (src / WEIGHTS).unlink()
    (src / WEIGHTS).mkdir()
    result = convert("--to-hf", str(src), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(src / WEIGHTS), "cannot read it (a folder, not a file)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "weight_map,needle",
    [
        ({"transformer.wpe.weight": "../outside.safetensors"}, "'../outside.safetensors'"),
        ({"transformer.wpe.weight": "/etc/passwd"}, "'/etc/passwd'"),
        ({"transformer.wpe.weight": 7}, "7 is not a file name"),
        ({"transformer.wpe.weight": ["model.safetensors"]}, "['model.safetensors'] is not a file name"),
        ({"transformer.wpe.weight": 1, "transformer.wte.weight": "model.safetensors"}, "1 is not a file name"),
        (["model-00001.safetensors"], "no weight_map"),
        # names no file of a Hub repo's root can have: a backslash (a sub-folder's file was downloaded for it),
        # a line break (an "illegal header line" from the download), a name past the file system's 255 bytes
        ({"transformer.wpe.weight": "a\\b.safetensors"}, "'a\\\\b.safetensors' is not a file name"),
        ({"transformer.wpe.weight": "a\nb.safetensors"}, "'a\\nb.safetensors' is not a file name"),
        ({"transformer.wpe.weight": "x" * 300 + ".safetensors"}, "is not a file name"),
    ],
)
def test_shard_index_cannot_point_outside_its_folder(weight_map, needle, tiny_hf_dir, tmp_path):
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    shutil.copy(src / WEIGHTS, tmp_path / "outside.safetensors")  # real weights, in the wrong place
    (src / WEIGHTS).unlink()
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_one_line_error(convert(str(src), "--out", str(tmp_path / "out")), str(index), needle)
    assert not (tmp_path / "out").exists()


def test_nan_and_inf_weights_load_with_a_warning(tiny_hf_dir, tmp_path):
    """Broken values are not a broken file: they load (a user may want to inspect them), loudly. A
    tied head written as a copy of a wte holding NaN was refused as "an LM head of its own" (NaN
    differs from itself)."""
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    state = load_file(src / WEIGHTS)
    state["transformer.h.1.ln_2.weight"][3] = float("nan")
    state["transformer.h.0.mlp.c_fc.bias"][0] = float("-inf")
    state["transformer.wte.weight"][5, 2] = float("nan")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # (save_pretrained may write the copy)
    save_file(state, str(src / WEIGHTS), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"model\.safetensors: tensor .* holds NaN or inf"):
        model, _ = load_model(src)
    weight = model.transformer.h[1].ln_2.weight
    assert torch.isnan(weight[3]) and torch.isfinite(weight[:3]).all()
    assert model.transformer.h[0].mlp.c_fc.bias[0] == float("-inf")
    assert torch.isnan(model.transformer.wte.weight[5, 2]) and model.lm_head.weight is model.transformer.wte.weight
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="NaN or inf"):
        assert convert(str(src), "--out", str(out)).returncode == 0
    assert torch.isnan(load_file(out / WEIGHTS)["transformer.h.1.ln_2.weight"][3])


def test_python_warnings_reach_the_user_as_one_line_each(tiny_hf_dir, tmp_path):
    """minigpt's own warnings (NaN weights; an HF config whose three dropouts differ) come from
    `warnings.warn`, which Python prints as `/path/minigpt/hf.py:LINE: UserWarning: ...` followed by the
    line of code that warned. Through a CLI each is one `warning: ...` line, as the CLIs' own are."""
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    state = load_file(src / WEIGHTS)
    state["transformer.h.1.ln_2.weight"][3] = float("nan")
    save_file(state, str(src / WEIGHTS), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"resid_pdrop": 0.3, "embd_pdrop": 0.0, "attn_pdrop": 0.0}))
    result = run_cli("convert_hf_weights.py", str(src), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.splitlines()) == [
        f"warning: {src / WEIGHTS}: tensor 'transformer.h.1.ln_2.weight' holds NaN or inf values",
        ("warning: config: resid_pdrop 0.3, embd_pdrop 0.0, attn_pdrop 0.0 differ; minigpt has one dropout and "
         "trains with resid_pdrop's for all three (train.py --dropout sets it)"),
    ], result.stderr


def test_other_libraries_warnings_are_one_line_too_and_name_their_category():
    """Warnings from outside minigpt (torch's, say) pass through the same boundary: one line each
    (the first of a long message), with the category unless it is the plain UserWarning; Python's
    format is back once the run is over."""
    script = (
        "import sys, warnings\n"
        "from minigpt.cli import run\n"
        "def main(argv):\n"
        "    warnings.warn('an API goes away\\nuse another one, as shown here', FutureWarning)\n"
        "    warnings.warn('a plain warning')\n"
        "try:\n"
        "    run(main, [])\n"
        "finally:\n"
        "    print(warnings.formatwarning is warnings._formatwarning_orig, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": python_path()})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["warning: an API goes away (FutureWarning)", "warning: a plain warning",
                                          "True"]


# --- a pickle that would run code --------------------------------------------------------------


class WritesMarker:
    """Unpickling this calls exec(...): the classic payload of a malicious pytorch_model.bin."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def test_pickle_that_runs_code_is_refused_and_never_run(tiny_hf_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_hf_dir / name, src / name)
    marker = tmp_path / "PWNED"
    state = dict(load_file(tiny_hf_dir / WEIGHTS))
    state["transformer.wte.weight"] = WritesMarker(marker)  # hidden among real tensors
    torch.save(state, src / "pytorch_model.bin")

    out = tmp_path / "out"
    result = run_cli("convert_hf_weights.py", str(src), "--out", str(out))
    assert_one_line_error(result, str(src / "pytorch_model.bin"), "refused", "asks for", "exec")
    assert not marker.exists() and not out.exists()
    # The payload is real: an unsafe load (which minigpt never does) runs it.
    torch.load(src / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "code ran"


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


BROKEN_BINS = {
    "floats_not_tensors": (torch_saved({WPE: 1.5}), "not a state dict of tensors"),
    "a_list": (torch_saved([torch.zeros(2)]), "not a state dict of tensors"),
    "a_key_not_a_name": (torch_saved({WPE: torch.zeros(2), 7: torch.zeros(2)}), "not a state dict of tensors"),  # (a TypeError)
    "sparse": (torch_saved({WPE: torch.eye(4).to_sparse()}), "not a state dict of tensors (names to plain ones: not sparse"),
    "meta": (torch_saved({WPE: torch.empty(4, device="meta")}), "not a state dict of tensors (names to plain ones: not sparse"),
    "plain_pickle": (pickle.dumps({WPE: [0.0] * 4}, protocol=4), "not a PyTorch weights file (no pickle of plain tensors)"),
    "garbage": (b"hello, no pickle at all", "not a PyTorch weights file (no pickle of plain tensors)"),  # (was "(101)")
    "text": (b"some text\n", "not a PyTorch weights file (no pickle of plain tensors)"),  # (was "(pop from empty list)")
    "no_pickle_opcode": (b"xyz", "not a PyTorch weights file (no pickle of plain tensors)"),
    "not_a_zip": (b"PK\x03\x04 not really a zip", "not a PyTorch weights file (a damaged or truncated zip archive: "),
    "empty": (b"", "not a PyTorch weights file (an empty file)"),
    "truncated": (torch_saved({WPE: torch.zeros(256, 64)})[:5000],
                  "not a PyTorch weights file (a damaged or truncated zip archive: "),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BINS))
def test_broken_pytorch_model_bin(case, tiny_hf_dir, tmp_path):
    content, needle = BROKEN_BINS[case]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_hf_dir / name, src / name)
    (src / "pytorch_model.bin").write_bytes(content)
    result = convert(str(src), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(src / "pytorch_model.bin"), needle)
    assert not (tmp_path / "out").exists()


# --- hostile config.json -----------------------------------------------------------------------


# Runs a CLI with its address space capped a little above what it has mapped once torch and minigpt
# are imported, however large that torch build is (a CUDA build maps GBs of libraries): the cap
# leaves HEADROOM for the work, so a real allocation of an absurd model would fail. It first proves
# the cap bites (an allocation of twice the headroom must fail), then runs the CLI in this process.
LIMITED_CLI = """
import re, resource, runpy, sys

import torch
import minigpt.hf  # everything the conversion imports, mapped before the cap

headroom = int(sys.argv[1])
status = open("/proc/self/status").read()
mapped = int(re.search(r"VmSize:\\s+(\\d+) kB", status).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, mapped + headroom))
try:
    torch.empty(2 * headroom, dtype=torch.uint8)
except (MemoryError, RuntimeError):
    pass
else:
    sys.exit("the memory cap does not bite")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_absurd_config_is_refused_before_allocating(tiny_hf_dir, tmp_path):
    """n_layer = 10**6 (~200 GB of weights) is refused from the numbers alone, in a process that could
    not allocate even 1 GiB more than it holds once its imports are done."""
    import subprocess

    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "n_layer": 10**6}))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_CLI, str(2**30), str(ROOT / "convert_hf_weights.py"), str(src),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": python_path()}, cwd=ROOT,
    )
    assert_one_line_error(result, str(src / "config.json"), "n_layer=1000000")
    assert not out.exists()


BAD_CONFIGS = {
    # name: (the config.json bytes, or a function of the good config dict; words the error names)
    "empty": (b"", ["not valid JSON"]),
    "binary": (b"\xff\xfe\x00\x89PNG\r\n", ["not valid JSON"]),
    "a_list": (b"[1, 2, 3]", ["expected a JSON object"]),
    "nested_deep": (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    "deep_but_small": (lambda c: {**c, "n_layer": 5000, "n_embd": 8, "n_head": 1}, ["n_layer=5000"]),
    "wide": (lambda c: {**c, "n_embd": 10**6, "n_head": 1}, ["parameters", "refusing"]),
    "vocab_10e12": (lambda c: {**c, "vocab_size": 10**12}, ["parameters", "refusing"]),
    "zero_heads": (lambda c: {**c, "n_head": 0}, ["n_head must be a positive integer"]),
    "negative_layers": (lambda c: {**c, "n_layer": -2}, ["n_layer must be a positive integer"]),
    "float_width": (lambda c: {**c, "n_embd": 64.0}, ["n_embd must be a positive integer"]),
    "string_width": (lambda c: {**c, "n_embd": "64"}, ["n_embd must be a positive integer"]),
    "null_width": (lambda c: {**c, "n_embd": None}, ["n_embd must be a positive integer"]),
    "bool_layers": (lambda c: {**c, "n_layer": True}, ["n_layer must be a positive integer"]),
    "heads_not_dividing": (lambda c: {**c, "n_head": 5}, ["divisible by n_head (5)"]),
    "nan_dropout": (lambda c: {**c, "resid_pdrop": float("nan"), "dropout": float("nan")},
                    ["dropout must be in [0, 1)"]),
    "string_dropout": (lambda c: {**c, "resid_pdrop": "0.1", "dropout": "0.1"},
                       ["dropout must be a number"]),
    "string_eps": (lambda c: {**c, "layer_norm_epsilon": "1e-5", "layer_norm_eps": "1e-5"},
                   ["layer_norm_eps must be a number"]),
}


def write_bad_config(folder: Path, case: str, hf: bool) -> None:
    """Damage `folder`'s config.json as BAD_CONFIGS[case] says, in HF's or minigpt's format.

    The cases set a field under both formats' names (HF: resid_pdrop, minigpt: dropout); only the
    names of `folder`'s own format are kept.
    """
    content, _ = BAD_CONFIGS[case]
    if callable(content):
        edited = content(json.loads((folder / "config.json").read_text()))
        if hf:
            edited = {k: v for k, v in edited.items() if k not in ("dropout", "layer_norm_eps")}
        else:
            edited = {k: v for k, v in edited.items() if k in {f.name for f in dataclasses.fields(GPTConfig)}}
        content = json.dumps(edited).encode()
    (folder / "config.json").write_bytes(content)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_hf_to_minigpt(case, tiny_hf_dir, tmp_path):
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    write_bad_config(src, case, hf=True)
    result = convert(str(src), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(src / "config.json"), *BAD_CONFIGS[case][1])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(set(BAD_CONFIGS) - {"empty", "binary", "a_list", "nested_deep"}))
def test_bad_config_minigpt_to_hf(case, tiny_minigpt_dir, tmp_path):
    src = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "src"))
    write_bad_config(src, case, hf=False)
    result = convert("--to-hf", str(src), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(src / "config.json"), *BAD_CONFIGS[case][1])
    assert not (tmp_path / "out").exists()


def test_hf_config_of_another_architecture(tiny_hf_dir, tmp_path):
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    assert_one_line_error(convert(str(src), "--out", str(tmp_path / "out")), "model_type 'bert'")


def test_a_minigpt_config_missing_a_shape_names_it_and_an_hf_one_without_model_type_says_so(
        tiny_minigpt_dir, tiny_hf_dir, tmp_path):
    """A shape left out of minigpt's config.json is not filled with distilgpt2's default (which would
    fail later, blaming the weights or another field); an HF config.json that lost its model_type
    reads as minigpt's and is told apart by its HF fields."""
    for name in ("n_head", "vocab_size", "n_layer", "block_size", "n_embd"):
        src = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / name))
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != name}))
        result = convert("--to-hf", str(src), "--out", str(tmp_path / "out"))
        assert_one_line_error(result, f"{src / 'config.json'}: config: missing field {name!r}")
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    assert_one_line_error(convert(str(src), "--out", str(tmp_path / "out")), "unknown field",
                          'an HF GPT-2 config.json? it names its model_type, "gpt2"')
    assert not (tmp_path / "out").exists()


# --- hostile tokenizer files -------------------------------------------------------------------


def word_level_tokenizer_json() -> str:
    """A genuine tokenizer.json, but not GPT-2's: no <|endoftext|>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    return HFTokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "not a valid tokenizer.json"),
        (b'{"hello": "world"}', "not a valid tokenizer.json"),
        (b"\x00\x01garbage\xff", "not a valid tokenizer.json"),
        ("WORD_LEVEL", "no <|endoftext|> token"),
    ],
)
def test_tokenizer_file_that_is_not_a_tokenizer(content, needle, tiny_minigpt_dir, tmp_path):
    src = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "src"))
    if content == "WORD_LEVEL":
        content = word_level_tokenizer_json().encode()
    (src / "tokenizer.json").write_bytes(content)
    out = tmp_path / "out"
    assert_one_line_error(convert("--to-hf", str(src), "--out", str(out)), str(src / "tokenizer.json"), needle)
    assert not out.exists()


def test_vocab_json_that_is_not_a_vocabulary(tiny_hf_dir, tmp_path):
    src = Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))
    (src / "vocab.json").write_text('["not", "a", "vocabulary"]')
    assert_one_line_error(convert(str(src), "--out", str(tmp_path / "out")), str(src / "vocab.json"))


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    """Token ids past the embedding table would crash sampling later; refuse at load time."""
    src = save_hf_model(tmp_path / "src", n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=1000)
    assert_one_line_error(
        convert(str(src), "--out", str(tmp_path / "out")), str(src), "50257 tokens", "only 1000"
    )


def test_a_model_whose_head_was_untied_is_not_saved_without_it(tiny_minigpt_dir, tmp_path):
    """`load_state_dict(..., assign=True)` gives wte and lm_head a Parameter each; the files hold wte
    alone, so the save succeeded and the folder read back another model (logits off by 1.27)."""
    from minigpt.checkpoint import save_checkpoint_folder
    from minigpt.hf import export_hf

    model, tokenizer = load_model(tiny_minigpt_dir)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    message = ("this model's LM head is no longer tied to its token embeddings (wte), and only wte is saved (e.g. "
               "after load_state_dict(..., assign=True)): call model.tie_weights() first")
    with pytest.raises(MinigptError, match=re.escape(message)):
        save_checkpoint_folder(tmp_path / "minigpt", model, tokenizer)
    with pytest.raises(MinigptError, match=re.escape(message)):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "minigpt").exists() and not (tmp_path / "hf").exists()
    model.tie_weights()
    save_checkpoint_folder(tmp_path / "tied", model, tokenizer)
    assert torch.equal(load_model(tmp_path / "tied")[0].lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize("device, needle", [("gpu", "device: unknown device 'gpu'"),
                                            ("meta", "device: unknown device 'meta'")])
def test_a_device_no_model_can_load_onto_is_refused_before_reading(device, needle, tiny_minigpt_dir, tiny_hf_dir,
                                                                   monkeypatch):
    """`device="gpu"` read every weight, then failed in torch ("Expected one of cpu, cuda, ... at
    start of device string"); "meta" returned a model without values, whose logits are meta tensors."""
    from minigpt import checkpoint
    from minigpt.hf import load_hf_checkpoint

    monkeypatch.setattr(checkpoint, "load_safetensors", lambda *a: pytest.fail("weights read"))
    monkeypatch.setattr("minigpt.hf._hf_tensors", lambda *a: pytest.fail("weights read"))
    for source in (tiny_minigpt_dir, tiny_hf_dir):
        with pytest.raises(MinigptError, match=re.escape(needle)):
            load_model(source, device=device)
    with pytest.raises(MinigptError, match=re.escape(needle)):
        load_checkpoint(tiny_minigpt_dir, device=device)
    with pytest.raises(MinigptError, match=re.escape(needle)):
        load_hf_checkpoint(tiny_hf_dir, device=device)


# --- convert_hf_weights.py flags and output folders --------------------------------------------


def test_convert_usage_errors(tiny_hf_dir, tiny_minigpt_dir, tmp_path):
    """Wrong or missing flags: argparse's usage + one error line, exit 2, nothing written."""
    out = str(tmp_path / "out")
    for args in [
        [],
        ["--out", out],
        [str(tiny_hf_dir)],
        [str(tiny_hf_dir), "--to-hf", str(tiny_minigpt_dir), "--out", out],
        [str(tiny_hf_dir), "--out", out, "--dtype", "fp8"],
    ]:
        result = convert(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert ": error: " in result.stderr.strip().splitlines()[-1], (args, result.stderr)
    assert not (tmp_path / "out").exists()


def test_convert_bad_sources_and_outputs(tiny_hf_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    old = tmp_path / "old"  # (an earlier conversion's folder: --force would replace it)
    old.mkdir()
    (old / "config.json").write_text("{}")
    out = str(tmp_path / "out")
    for args, needles in [
        (["", "--out", out], ["empty model path"]),
        ([str(a_file), "--out", out], [str(a_file), "not a checkpoint folder"]),
        (["./no/such/folder", "--out", out], ["no such file or folder"]),
        (["nobody-xyz/no-such-model", "--out", out], ["nobody-xyz/no-such-model", "Hub could not provide"]),
        ([str(tiny_hf_dir), "--out", str(a_file)], [f"{a_file}: is a file, not a folder"]),
        ([str(tiny_hf_dir), "--out", str(a_file), "--force"], [f"{a_file}: is a file, not a folder"]),
        ([str(tiny_hf_dir), "--out", str(busy)], [str(busy), "holds 'keep.txt'", "choose another --out"]),
        ([str(tiny_hf_dir), "--out", str(old)], [str(old), "pass --force"]),
        ([str(tiny_hf_dir), "--out", str(a_file / "sub")], [f"{a_file / 'sub'}: {a_file} is not a folder"]),
    ]:
        result = convert(*args)
        assert_one_line_error(result, *needles)
        if "pass --force" not in needles:  # where --force would not help, it is not suggested (it was, for busy/)
            assert "pass --force" not in result.stderr, (args, result.stderr)
    assert a_file.read_text() == "not a folder" and snapshot(busy) == {"keep.txt": b"mine"}
    assert not (tmp_path / "out").exists()


# --- a disk that fills up during a save --------------------------------------------------------


def small_file_size_limit() -> None:
    """In the child: files may not grow past 1 MB (like a full disk); writes fail with EFBIG
    instead of the default SIGXFSZ kill, exactly as a write to a full disk fails with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


def test_disk_full_during_conversion_keeps_the_previous_output(tiny_hf_dir, tiny_minigpt_dir, tmp_path):
    out = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "out"))
    before = snapshot(out)
    result = run_cli(
        "convert_hf_weights.py", str(tiny_hf_dir), "--out", str(out), "--force",
        preexec_fn=small_file_size_limit,
    )
    assert_one_line_error(result, str(out), "saving failed", "File too large", "previous version is untouched")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    load_checkpoint(out)


def test_disk_full_during_export(tiny_minigpt_dir, tmp_path, monkeypatch):
    """--to-hf when the disk fills while the weights are half written: nothing is left behind."""
    import minigpt.hf

    def save_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(minigpt.hf, "save_tensors", save_half_then_fail)
    out = tmp_path / "exported"
    result = convert("--to-hf", str(tiny_minigpt_dir), "--out", str(out))
    assert_one_line_error(result, str(out), "No space left on device", "nothing was written")
    assert not out.exists() and leftovers(tmp_path) == []


# A CLI (through minigpt.cli.run) that gets SIGTERM while it saves `out`.
TERMINATED_WHILE_SAVING = """
import os, signal, sys, time
from pathlib import Path

from minigpt.cli import run
from minigpt.files import atomic_folder


def main(argv):
    with atomic_folder(Path(sys.argv[1])) as tmp:
        (tmp / "model.safetensors").write_bytes(bytes(10_000))
        os.kill(os.getpid(), signal.SIGTERM)  # (as `kill PID` or `timeout` sends it)
        time.sleep(30)


run(main, [], sigterm_interrupts=sys.argv[2] == "convert")
"""


def test_sigterm_while_a_cli_saves_leaves_no_temporary_folder(tmp_path):
    """`kill` or `timeout` (SIGTERM) ended convert_hf_weights.py outright: a model-sized `.out.tmp-*`
    folder stayed beside --out until the next save to it. There it is a KeyboardInterrupt now, as
    Ctrl-C: "interrupted", exit 130, the temporary folder removed."""
    def terminated(cli: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", TERMINATED_WHILE_SAVING, str(tmp_path / "out"), cli],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": python_path()})

    result = terminated("convert")
    assert (result.returncode, result.stderr) == (130, "interrupted\n")
    assert list(tmp_path.iterdir()) == []
    # (not a torchrun rank: one waiting in a rendezvous, in C, would not see a KeyboardInterrupt
    # before torchrun's SIGKILL, 30 s later)
    assert terminated("train").returncode == -signal.SIGTERM


def test_sigterm_before_training_starts_is_ctrl_c_and_leaves_no_folder(tmp_path):
    """SIGTERM while train.py read its data (a scheduler's, `timeout`'s) ended it outright: exit 143, no
    word, and --out left holding only its lock. As Ctrl-C there: "interrupted", exit 130, no folder."""
    out = tmp_path / "run"
    result = train(tmp_path, *TINY_RUN, "--out", str(out), fault="sigterm_in_data:1")
    assert (result.returncode, result.stderr.splitlines()[-1:]) == (130, ["interrupted"]), result.stderr
    assert not out.exists()


# A child process that saves `out` with atomic_folder and is killed (SIGKILL, from itself) right
# after the first of the save's two renames: no `finally`, no `except`, no atexit of ours runs.
KILLED_BETWEEN_RENAMES = """
import importlib, os, signal, sys
from pathlib import Path

atomic_folder = getattr(importlib.import_module(sys.argv[1]), "atomic_folder")
real_replace, renames = os.replace, []


def replace(src, dst):
    real_replace(src, dst)
    renames.append((str(src), str(dst)))
    if len(renames) == 1:
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
with atomic_folder(Path(sys.argv[2])) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_save_killed_between_renames_is_recovered(tiny_minigpt_dir, tmp_path):
    """A kill in the instant after the old folder moved aside and before the new one moved in
    leaves the old one under a temporary name; the recovery step (run by the next save) restores it."""
    import subprocess

    out = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "ckpt"))
    before = snapshot(out)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, atomic_folder.__module__, str(out)],
        env={**os.environ, "PYTHONPATH": python_path()}, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr  # it really died there
    # The dangerous moment, as the kill left it: no `ckpt`, the old one moved aside whole, the new
    # one complete in its temporary folder.
    assert not out.exists()
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.old-")]
    (new,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert snapshot(old / "ckpt") == before and snapshot(new) == {"new.txt": b"new"}
    clear_interrupted_saves(out)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    load_checkpoint(out)


def test_next_save_after_a_kill_between_renames_is_complete(tiny_minigpt_dir, tmp_path):
    """The same leftover state, then an ordinary save: the new folder is in place, nothing else."""
    import subprocess

    out = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "ckpt"))
    child = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, atomic_folder.__module__, str(out)],
        env={**os.environ, "PYTHONPATH": python_path()}, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == -signal.SIGKILL and not out.exists(), child.stderr
    with atomic_folder(out) as tmp:
        (tmp / "x.txt").write_text("x")
    assert snapshot(out) == {"x.txt": b"x"} and leftovers(tmp_path) == []


def test_leftovers_of_killed_saves_are_cleared(tiny_minigpt_dir, tmp_path):
    out = Path(shutil.copytree(tiny_minigpt_dir, tmp_path / "ckpt"))
    (tmp_path / ".ckpt.tmp-dead1").mkdir()
    (tmp_path / ".ckpt.tmp-dead1" / WEIGHTS).write_bytes(b"half a file")
    (tmp_path / ".other.tmp-keep").mkdir()  # belongs to another folder: not ours to delete
    with atomic_folder(out) as tmp:
        (tmp / "x.txt").write_text("x")
    assert snapshot(out) == {"x.txt": b"x"}
    assert leftovers(tmp_path) == [".other.tmp-keep"]


def test_atomic_folder_converts_only_write_failures(tmp_path):
    """A bug inside the block keeps its own exception (and traceback); only I/O becomes one line."""
    with pytest.raises(KeyError), atomic_folder(tmp_path / "out"):
        {}["a bug"]
    with pytest.raises(MinigptError, match="saving failed"), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "sub" / "x").write_text("parent folder missing")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --- hostile data files (minigpt.data, behind train.py --data) ---------------------------------


def load_data(tmp_path: Path, tokenizer, source: Path, **kw):
    from minigpt.data import DataConfig, load_blocks

    kw.setdefault("block_size", 8)
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)
    return load_blocks(cfg, tokenizer, progress=False)


ELI5_RECORDS = [{"title": f"Why {i}?", "answers": {"text": [f"Because of reason {i}."], "score": [1]}}
                for i in range(40)]

BAD_DATA = {
    # file name: (its bytes, words the error names)
    "empty.json": (b"", ["no records"]),
    "empty.jsonl": (b"", ["no records"]),
    "empty.csv": (b"", ["no records"]),
    "empty.txt": (b"", ["no records"]),
    "blank.json": (b" \n\n\t ", ["no records"]),
    "empty.json.gz": (b"", ["no records"]),
    "empty.parquet": (b"", ["not a readable parquet file"]),
    "truncated.json.gz": (gzip.compress(json.dumps(ELI5_RECORDS).encode())[:150], ["cannot read"]),
    "not_gzip.json.gz": (b"[plain text, not gzip]", ["cannot read", "gzip"]),
    "bad_utf8.json": (b'[{"answers": {"text": ["caf\xe9 \xff"]}}]', ["cannot read", "utf-8"]),
    "bad_utf8.txt": (b"first paragraph\n\nsecond \xc3\x28 broken", ["cannot read", "utf-8"]),
    "answers_a_string.json": (json.dumps([{"answers": "forty-two"}]).encode(), ["record 1", "answers.text"]),
    "answers_numbers.jsonl": (b'{"answers": {"text": [4, 2]}}\n', ["record 1", "answers.text"]),
    "records_not_objects.json": (b'[null, 1, "x"]', ["record 1 is not a JSON object"]),
    "csv_other_columns.csv": (b"question,reply\nWhy?,Because.\n", ["record 1", "answers.text"]),
    "nested_deep.json": (b"[" * 100_000 + b"]" * 100_000, ["not valid JSON"]),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_file_is_one_clear_error(name, tmp_path, gpt2_tokenizer):
    content, needles = BAD_DATA[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MinigptError) as error:
        load_data(tmp_path, gpt2_tokenizer, path)
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_100k_tiny_records_give_exactly_their_tokens(tmp_path, gpt2_tokenizer):
    """100,000 two-token records: every token lands in a block, none lost or reordered within a record."""
    digits = [gpt2_tokenizer.encode(str(d))[0] for d in range(10)]
    (a,) = gpt2_tokenizer.encode("a")
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"answers": {"text": [f"a{i % 10}"]}}) + "\n" for i in range(100_000)))
    train, val = load_data(tmp_path, gpt2_tokenizer, path)
    assert (len(train), len(val)) == (20_000, 5_000)  # 80,000 and 20,000 records of 2 tokens, blocks of 8
    for blocks in (train, val):
        pairs = np.asarray(blocks.blocks).reshape(-1, 2)
        assert (pairs[:, 0] == a).all() and np.isin(pairs[:, 1], digits).all()
    counts = np.bincount(np.concatenate([np.asarray(b.blocks).reshape(-1, 2)[:, 1] for b in (train, val)]))
    assert sorted(counts[digits]) == [10_000] * 10


def test_control_characters_in_text_survive_tokenization(tmp_path, gpt2_tokenizer):
    text = "bell\a tab\t esc\x1b[31m nul\x00 del\x7f \u202e rtl \ufeff bom"
    path = tmp_path / "ctrl.txt"
    path.write_text("\n\n".join([text] * 20), encoding="utf-8")
    train, _ = load_data(tmp_path, gpt2_tokenizer, path, val_fraction=0.0)
    ids = np.asarray(train.blocks).reshape(-1).tolist()
    doc = gpt2_tokenizer.encode(text) + [gpt2_tokenizer.eos_id]
    assert ids == (doc * 20)[: len(ids)] and len(ids) == len(doc) * 20 // 8 * 8


# --- sample.py: prompts and flags --------------------------------------------------------------


def sample(*args: str, stdin: bytes | None = None, monkeypatch=None, errors: str = "strict"):
    """sample.py in this process; `stdin` bytes stand in for a pipe, decoded as sys.stdin would
    (`errors="surrogateescape"`: as Python sets up stdin under the C locale)."""
    if stdin is not None:
        wrapper = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors=errors)
        monkeypatch.setattr(sys, "stdin", wrapper)
    return call_cli("sample.py", *args)


def hf_continuation(hf_dir: Path, prompt: str | list[int], n: int, seed: int | None = None, **settings) -> str:
    """What sample.py must print after `prompt`, computed by transformers' generate() on the HF
    model the minigpt checkpoint was converted from: greedy, or (with `seed`) sampled from the
    global generator seeded as sample.py seeds its own."""
    from transformers import GPT2LMHeadModel

    from minigpt.tokenizer import Tokenizer

    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tokenizer = Tokenizer.from_vocab_merges(hf_dir / "vocab.json", hf_dir / "merges.txt")
    ids = (tokenizer.encode(prompt) if isinstance(prompt, str) else prompt) or [tokenizer.eos_id]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            do_sample=seed is not None, pad_token_id=tokenizer.eos_id, **settings,
        )
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


@pytest.mark.parametrize(
    "prompt",
    ["", "bell\a tab\t esc\x1b[2J nul\x00 del\x7f cr\r bidi\u202e bom\ufeff", "<|endoftext|>"],
    ids=["empty", "control_characters", "eos_text"],
)
def test_odd_prompts_are_continued_exactly(prompt, tiny_minigpt_dir, tiny_hf_dir):
    result = sample("--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "6", prompt)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == prompt + hf_continuation(tiny_hf_dir, prompt, 6) + "\n"


def test_one_megabyte_prompt_keeps_its_last_window(tiny_minigpt_dir, tiny_hf_dir, tmp_path):
    """A prompt far beyond the context window: a warning, then the continuation of its last 256
    tokens (the first new token: transformers cannot read past its 256 positions to check more)."""
    prompt = " ".join(f"w{i % 997}" for i in range(200_000))[: 2**20]
    (tmp_path / "big.txt").write_text(prompt + "\n", encoding="utf-8")
    result = sample("--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "1",
                    "--file", str(tmp_path / "big.txt"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "only its last 256 tokens are used" in result.stderr
    _, tokenizer = load_model(tiny_minigpt_dir)
    tail = tokenizer.encode(prompt)[-256:]
    assert result.stdout == prompt + hf_continuation(tiny_hf_dir, tail, 1) + "\n"


def test_empty_prompt_file_and_stdin_give_no_output(tiny_minigpt_dir, tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_bytes(b"")
    for args, stdin in [(["--file", str(tmp_path / "empty.txt")], None), (["-"], b""), (["-"], b"\n \n\t\n")]:
        result = sample("--model", str(tiny_minigpt_dir), *args, stdin=stdin, monkeypatch=monkeypatch)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_invalid_utf8_prompts_are_one_clear_error(tiny_minigpt_dir, tmp_path, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    result = sample("--model", str(tiny_minigpt_dir), "--file", str(tmp_path / "latin1.txt"))
    assert_one_line_error(result, str(tmp_path / "latin1.txt"), "not UTF-8", "byte 3")
    result = sample("--model", str(tiny_minigpt_dir), "-", stdin=b"ok line\n\xff\xfe\n", monkeypatch=monkeypatch)
    assert_one_line_error(result, "stdin", "not UTF-8", "byte 8")


def test_invalid_utf8_prompt_on_the_command_line_and_interactive(tiny_minigpt_dir, monkeypatch):
    """A non-UTF-8 byte in argv (or in stdin under the C locale) reaches Python as a lone surrogate
    (PEP 383): one line, no traceback."""
    prompt = os.fsdecode(b"caf\xe9")  # what `python sample.py $'caf\xe9'` puts in sys.argv
    result = sample("--model", str(tiny_minigpt_dir), "--max-new-tokens", "2", prompt)
    assert_one_line_error(result, "PROMPT 1: not UTF-8 text", "byte 3")
    result = sample("--model", str(tiny_minigpt_dir), "--max-new-tokens", "2", "--interactive",
                    stdin=b"why?\ncaf\xc3\xa9 \xff\xfe?\n", monkeypatch=monkeypatch, errors="surrogateescape")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # the bytes as typed: "café " is 6 of them (é is two); not a position in the prompt template
    assert result.stderr.strip().splitlines()[-1].endswith("error: stdin: line 2 is not UTF-8 text (byte 6)")
    assert result.stdout.count("\n") == 1  # the first question was answered


def test_a_line_typed_at_a_terminal_that_is_not_utf8_is_asked_again(monkeypatch, capsys):
    """At a terminal one mistyped line does not end the session (piped in, it does: see above)."""
    from minigpt.streaming import questions

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("why?\ncaf\u00e9 \udcff?\nhow?\n"))
    assert list(questions()) == ["why?", "how?"]
    assert "error: stdin: line 2 is not UTF-8 text (byte 6); ask again\n" in capsys.readouterr().err


def test_interactive_reads_bytes_whatever_the_locale(tiny_minigpt_dir, tmp_path):
    """Under a UTF-8 locale (not C, where this suite runs) Python decodes stdin strictly: a line that
    is not UTF-8 was a UnicodeDecodeError traceback. And a lone \\r ends a question, as it ends a line
    of `sample.py -`: "why\\rhow" was one question."""
    env = {**os.environ, "PYTHONPATH": python_path(), "PYTHONIOENCODING": "utf-8:strict"}  # (as a UTF-8 locale decodes)
    run = lambda stdin: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_minigpt_dir), "--max-new-tokens", "2",
         "--greedy", "--interactive"], input=stdin, capture_output=True, env=env, timeout=120)
    bad = run(b"why?\ncaf\xc3\xa9 \xff\xfe?\n")
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith(b"error: stdin: line 2 is not UTF-8 text (byte 6)")
    split, whole = run(b"why?\rhow?\n"), run(b"why?\nhow?\n")
    assert split.returncode == whole.returncode == 0 and split.stdout == whole.stdout and split.stdout.count(b"\n") == 2


def test_text_the_terminal_cannot_encode_prints_as_question_marks(tiny_minigpt_dir, tmp_path):
    """Under PYTHONIOENCODING=latin-1 (or any terminal encoding short of the text) a prompt or
    sample outside it was a UnicodeEncodeError traceback, at the first such character."""
    env = {**os.environ, "PYTHONPATH": python_path(), "PYTHONIOENCODING": "latin-1"}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_minigpt_dir), "--greedy",
                             "--max-new-tokens", "3", "café 日本"], capture_output=True, env=env, timeout=120)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("café ??".encode("latin-1")), result.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tmp_path / "日本"), "hi"],
                         capture_output=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.decode().splitlines() == [
        f"error: {tmp_path}/\\u65e5\\u672c: no such file or folder"]  # (stderr: Python's backslashreplace)


def test_sample_flags_out_of_range(tiny_minigpt_dir):
    model = ["--model", str(tiny_minigpt_dir)]
    for flag, value in [
        ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--max-new-tokens", "1.5"),
        ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
        ("--top-k", "-1"), ("--top-k", "ten"), ("--top-p", "0"), ("--top-p", "1.01"), ("--top-p", "nan"),
        ("--repetition-penalty", "0"), ("--repetition-penalty", "-1"), ("--repetition-penalty", "inf"),
        ("--num-samples", "0"), ("--seed", "x"), ("--seed", "-1"), ("--seed", str(2**63)),
        ("--seed", "99999999999999999999999"), ("--dtype", "int4"), ("--quantize", "int4"),
    ]:
        result = sample(*model, flag, value, "hi")
        assert result.returncode == 2 and "Traceback" not in result.stderr, (flag, value, result.stderr)
        assert f"error: argument {flag}: " in result.stderr.strip().splitlines()[-1], (flag, value, result.stderr)
    for args, needles in [
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--dtype", "fp16", "--device", "cpu"], ["--dtype fp16", "CPU"]),
        (["--model", "/no/such/model"], ["/no/such/model"]),
    ]:
        assert_one_line_error(sample(*model, *args, "hi"), *needles)
    if not torch.cuda.is_available():
        assert_one_line_error(sample(*model, "--device", "cuda", "hi"), "--device cuda", "not available")


SEED = 2**63 - 1  # the largest seed torch's generators take (--seed 2**63 is refused above)

# Extreme values the flags accept, each with the transformers settings that must give the same text
# (seed None: greedy). A vanishing temperature or top-p leaves only the most likely token: greedy.
# Sampling cases turn top-k off (--top-k 0): then minigpt samples over the whole vocabulary with
# the same generator state as transformers, so the draws are the same.
LEGAL_EXTREMES = {
    "temperature_1e-45": (["--temperature", "1e-45"], None, {}),
    "top_p_1e-12": (["--top-p", "1e-12"], None, {}),
    "penalty_1e-30": (["--greedy", "--repetition-penalty", "1e-30"], None, {"repetition_penalty": 1e-30}),
    "penalty_1e30": (["--greedy", "--repetition-penalty", "1e30"], None, {"repetition_penalty": 1e30}),
    "temperature_1e30": (["--top-k", "0", "--temperature", "1e30", "--seed", "1"], 1,
                         {"temperature": 1e30, "top_k": 0, "top_p": 0.95}),
    "largest_seed": (["--top-k", "0", "--seed", str(SEED)], SEED, {"top_k": 0, "top_p": 0.95}),
}


@pytest.mark.parametrize("case", sorted(LEGAL_EXTREMES))
def test_extreme_but_legal_sampling_values_work(case, tiny_minigpt_dir, tiny_hf_dir):
    """Values the flags accept must sample what transformers samples with them, never crash or refuse."""
    args, seed, settings = LEGAL_EXTREMES[case]
    result = sample("--model", str(tiny_minigpt_dir), "--max-new-tokens", "6", *args, "Why")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == "Why" + hf_continuation(tiny_hf_dir, "Why", 6, seed, **settings) + "\n"


def test_top_k_beyond_the_vocabulary_is_the_whole_vocabulary(tiny_minigpt_dir):
    """--top-k 100000000 is legal and means what --top-k 50257 (every token) means: same draws."""
    common = ["--model", str(tiny_minigpt_dir), "--max-new-tokens", "8", "--seed", "3", "Why"]
    huge, whole = sample(*common[:-1], "--top-k", "100000000", "Why"), sample(*common[:-1], "--top-k", "50257", "Why")
    assert huge.returncode == 0 and huge.stderr == "", huge.stderr
    assert huge.stdout == whole.stdout and len(huge.stdout) > len("Why\n")


# --- train.py: flags, data, kills, a full disk, Ctrl-C -------------------------------------------

# A model small enough that a run of 12 steps takes a second: the faults, not the training, cost time.
TINY_RUN = ["--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
            "--batch-size", "8", "--max-steps", "12", "--warmup-steps", "2", "--save-every", "3", "--log-every", "1",
            "--no-progress"]  # (a warm-up shorter than the run: one the run never leaves is warned of)

# Runs train.py with one fault injected at a chosen moment (MINIGPT_FAULT="kind:n"):
#   kill_in_step:n       SIGKILL inside the n-th optimizer step (gradients made, weights not yet updated)
#   kill_in_save:n       SIGKILL inside the n-th checkpoint save, its files half written
#   disk_full_in_save:n  the n-th save's write fails with ENOSPC after writing half a file
#   sigint_after_step:n  Ctrl-C (SIGINT) right after the n-th optimizer step
#   sigterm_in_data:1    SIGTERM (`kill`, `timeout`, a scheduler) as the data is read, before any step
FAULTY_TRAIN = '''
import errno, os, runpy, signal, sys

import minigpt.data
import minigpt.optim
import minigpt.run_folder

kind, n = os.environ["MINIGPT_FAULT"].split(":")
calls = []


def now():
    calls.append(1)
    return len(calls) == int(n)


real_step, real_save = minigpt.optim.AdamW.step, minigpt.run_folder.save_tensors


def step(self):
    if kind == "kill_in_step" and now():
        os.kill(os.getpid(), signal.SIGKILL)
    real_step(self)
    if kind == "sigint_after_step" and now():
        os.kill(os.getpid(), signal.SIGINT)


def save_tensors(tensors, filename, *args, **kwargs):
    if kind in ("kill_in_save", "disk_full_in_save") and now():
        with open(filename, "wb") as f:
            f.write(b"half a file")
        if kind == "kill_in_save":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    real_save(tensors, filename, *args, **kwargs)


real_load_blocks = minigpt.data.load_blocks


def load_blocks(*args, **kwargs):
    if kind == "sigterm_in_data" and now():
        os.kill(os.getpid(), signal.SIGTERM)
    return real_load_blocks(*args, **kwargs)


minigpt.optim.AdamW.step, minigpt.run_folder.save_tensors = step, save_tensors
minigpt.data.load_blocks = load_blocks
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["MINIGPT_ROOT"], "train.py"), run_name="__main__")
'''


def start_training(tmp_path: Path, *args: str, fault: str = "none:0"):
    """train.py in a child process (with `fault` injected), its data cache under tmp_path."""
    import subprocess

    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    env = {**os.environ, "PYTHONPATH": python_path(), "MINIGPT_ROOT": str(ROOT), "MINIGPT_FAULT": fault,
           "MINIGPT_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train(tmp_path: Path, *args: str, fault: str = "none:0"):
    import subprocess

    child = start_training(tmp_path, *args, fault=fault)
    stdout, stderr = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint `out` holds now; it must load as a model (sample.py's view of it)."""
    load_model(out)
    return json.loads((out / "training_state.json").read_text())["step"]


def learning_curve(out: Path) -> list[dict]:
    """metrics.jsonl without its timings: the numbers an exact resume must reproduce."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_sec"} for row in rows]


def test_killed_and_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL inside a step, inside a save, at a random instant, and Ctrl-C, one after another on one
    run: each time the last complete checkpoint survives, and --resume ends bit-for-bit where a run
    that was never interrupted ends. The moments are drawn from a seeded RNG, so a failure reproduces."""
    import random
    import time

    rng = random.Random(7)
    reference = tmp_path / "reference"
    result = train(tmp_path, *TINY_RUN, "--out", str(reference))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    run = [*TINY_RUN, "--out", str(out)]

    n = rng.randint(4, 8)  # SIGKILL inside step n: steps 1..n-1 are done, saves every 3 steps
    assert train(tmp_path, *run, fault=f"kill_in_step:{n}").returncode == -signal.SIGKILL
    saved = (n - 1) // 3 * 3
    assert checkpoint_step(out) == saved

    # SIGKILL inside this process's first save: the half-written folder is not the checkpoint.
    assert train(tmp_path, *run, "--resume", fault="kill_in_save:1").returncode == -signal.SIGKILL
    assert checkpoint_step(out) == saved

    # Ctrl-C after a few steps: a checkpoint of exactly that step, exit status 130, no traceback.
    n = rng.randint(1, 2)
    result = train(tmp_path, *run, "--resume", fault=f"sigint_after_step:{n}")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    saved += n
    assert checkpoint_step(out) == saved

    # SIGKILL at a random instant once training is under way (wherever it lands).
    child = start_training(tmp_path, *run, "--resume")
    rows = len((out / "metrics.jsonl").read_text().splitlines())
    deadline = time.monotonic() + 60
    while child.poll() is None and len((out / "metrics.jsonl").read_text().splitlines()) <= rows:
        assert time.monotonic() < deadline, "the resumed run never took a step"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    child.kill()
    child.communicate()
    assert checkpoint_step(out) >= saved

    result = train(tmp_path, *run, "--resume")
    assert result.returncode == 0, result.stderr
    final, expected = load_file(out / WEIGHTS), load_file(reference / WEIGHTS)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert learning_curve(out) == learning_curve(reference)


def test_killed_fine_tune_with_dropout_resumes_bitwise(tmp_path, tiny_hf_dir):
    """A fine-tune from an HF folder with dropout 0.1, SIGKILLed inside a step after a checkpoint and
    --resumed, ends bitwise equal to the uninterrupted run: the dropout masks continue from the saved
    RNG states, and the HF Conv1D weights (loaded as transposed views) are made contiguous, so the
    resumed run multiplies exactly as the uninterrupted one did."""
    run = ["--init", str(tiny_hf_dir), "--data", str(ROOT / "minigpt" / "assets" / "eli5_tiny.jsonl"),
           "--val-fraction", "0.1", "--block-size", "32", "--batch-size", "4", "--max-steps", "6",
           "--save-every", "2", "--eval-every", "3", "--log-every", "1", "--dropout", "0.1", "--seed", "7",
           "--no-progress"]
    reference = tmp_path / "reference"
    result = train(tmp_path, *run, "--out", str(reference))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    killed = train(tmp_path, *run, "--out", str(out), fault="kill_in_step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it really died by SIGKILL, in step 5
    assert checkpoint_step(out) == 4
    result = train(tmp_path, *run, "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    final, expected = load_file(out / WEIGHTS), load_file(reference / WEIGHTS)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert learning_curve(out) == learning_curve(reference)
    assert [r["step"] for r in learning_curve(out) if "val_loss" in r] == [3, 6]


def test_disk_full_during_a_training_save_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(tmp_path, *TINY_RUN, "--out", str(out), fault="disk_full_in_save:2")
    assert_one_line_error(result, "No space left on device")
    assert re.search(r"step 3 .*(untouched|intact|kept)|(untouched|intact|kept).* step 3", result.stderr), result.stderr
    assert checkpoint_step(out) == 3  # the first save (step 3) is intact and loadable
    assert [p.name for p in (out / ".ckpt").iterdir() if p.name.startswith("step-")] == [
        (out / ".ckpt" / "current").resolve().name]  # the failed save left nothing behind
    result = train(tmp_path, *TINY_RUN, "--out", str(out), "--resume")
    assert result.returncode == 0 and checkpoint_step(out) == 12, result.stderr


def drop_tensor(name: str):
    """A damage that rewrites a safetensors file without tensor `name`."""

    def damage(path: Path) -> None:
        state = load_file(path)
        del state[name]
        save_file(state, str(path))
    return damage


def float_rng_state(path: Path) -> None:
    """A damage that turns the CPU generator's saved state (bytes) into floats."""
    state = load_file(path)
    state["rng.cpu.0"] = state["rng.cpu.0"].float()
    save_file(state, str(path))


def reshape_moment(path: Path) -> None:
    """A damage that gives the first moment another model's shape."""
    state = load_file(path)
    state["optimizer.exp_avg.0"] = torch.zeros(3)
    save_file(state, str(path))


def drop_last_moments(path: Path) -> None:
    """A damage that drops the last parameter's two moments, so that fewer moments than parameters remain."""
    state = load_file(path)
    last = max(int(k.rsplit(".", 1)[1]) for k in state if k.startswith("optimizer.exp_avg."))
    del state[f"optimizer.exp_avg.{last}"], state[f"optimizer.exp_avg_sq.{last}"]
    save_file(state, str(path))


GONE = object()


def edit_json_field(*keys: str | int, value=GONE):
    """A damage to training_state.json beside the state's tensors: the field at `keys` is gone, or
    holds `value` instead."""

    def damage(path: Path) -> None:
        info_path = path.with_suffix(".json")
        info = json.loads(info_path.read_text())
        parent = info
        for key in keys[:-1]:
            parent = parent[key]
        if value is GONE:
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value
        info_path.write_text(json.dumps(info))
    return damage


WRONG_TYPE = "training_state.json: a field of the wrong type"
DAMAGED_STATES = {  # what is done to training_state.safetensors, and what the error must then say
    "truncated": (lambda path: os.truncate(path, 100), "not a valid safetensors file"),
    "missing": (lambda path: path.unlink(), "file not found"),
    "no_first_moment": (drop_tensor("optimizer.exp_avg.0"), "missing tensor 'optimizer.exp_avg.0'"),
    "no_rng_state": (drop_tensor("rng.cpu.0"), "missing tensor 'rng.cpu.0'"),
    "float_rng_state": (float_rng_state, "training state: rank 0's RNG state is not one"),
    "reshaped_moment": (reshape_moment, "optimizer state: moment 0 has shape [3], expected"),
    "fewer_moments": (drop_last_moments, "optimizer state: moments for"),
    "no_data_field": (edit_json_field("data"), "training_state.json: missing field 'data'"),
    "no_optimizer_step": (edit_json_field("optimizer", "step"), "training_state.json: missing field 'step'"),
    "no_group_lr": (edit_json_field("optimizer", "param_groups", 0, "lr"), "training_state.json: missing field 'lr'"),
    "word_for_step": (edit_json_field("step", value="three"), f"{WRONG_TYPE} (invalid literal for int()"),
    "null_position": (edit_json_field("data", "position", value=None), f"{WRONG_TYPE} (batch iterator state: "
                      "epoch 0 and position None are no place in this data"),
    "number_for_groups": (edit_json_field("optimizer", "param_groups", value=5), f"{WRONG_TYPE} (object of type 'int'"),
    "number_for_optimizer": (edit_json_field("optimizer", value=5), f"{WRONG_TYPE} ('int' object has no attribute"),
    "word_for_eps": (edit_json_field("optimizer", "param_groups", 0, "eps", value="tiny"), f"{WRONG_TYPE} ("),
    "negative_eps": (edit_json_field("optimizer", "param_groups", 0, "eps", value=-1.0), "optimizer: eps must be > 0"),
    "list_for_state": (lambda path: path.with_suffix(".json").write_text("[1, 2]"), "training_state.json: expected a JSON object"),
}


def test_a_damaged_training_state_is_one_line_on_resume(tmp_path, monkeypatch):
    """A resume from a checkpoint whose training_state.safetensors is damaged names that file and
    the damage (as a damaged model.safetensors or training_state.json does) and changes nothing."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    run = [*TINY_RUN, "--max-steps", "3"]
    trained = tmp_path / "trained"
    assert call_cli("train.py", *run, "--out", str(trained)).returncode == 0
    for case, (damage, needle) in DAMAGED_STATES.items():
        out = Path(shutil.copytree(trained, tmp_path / case, symlinks=True))
        state = (out / ".ckpt" / "current").resolve() / "training_state.safetensors"
        damage(state)
        before = snapshot(out)
        result = call_cli("train.py", *run, "--out", str(out), "--resume")
        if needle.startswith("optimizer"):  # (of the JSON file's groups or the tensors' moments)
            needle = f"{state.parent}: {needle}"
        assert_one_line_error(result, needle if needle.startswith(("training", str(state.parent))) else f"{state}: {needle}")
        assert snapshot(out) == before, case


def test_train_flags_out_of_range(tmp_path, tiny_minigpt_dir, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    out = ["--out", str(tmp_path / "out")]
    for flag, value in [
        ("--batch-size", "0"), ("--grad-accum", "0"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "-1e-3"),
        ("--weight-decay", "-1"), ("--warmup-steps", "-1"), ("--epochs", "0"), ("--max-steps", "0"),
        ("--max-grad-norm", "inf"), ("--seed", "-1"), ("--dropout", "1"), ("--val-fraction", "1"),
        ("--block-size", "0"), ("--max-records", "0"), ("--log-every", "0"), ("--save-every", "-1"),
        ("--eval-every", "x"), ("--n-layer", "0"), ("--format", "poem"), ("--preset", "huge"),
    ]:
        result = call_cli("train.py", *TINY_RUN, *out, flag, value)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (flag, value, result.stderr)
        assert f"error: argument {flag}: " in result.stderr.strip().splitlines()[-1], (flag, value, result.stderr)
    a_file, dangling = tmp_path / "a_file", tmp_path / "dangling"
    a_file.write_text("x")
    dangling.symlink_to(tmp_path / "nowhere")
    for args, needles in [
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--n-embd", "33"], ["n_embd (33)", "n_head (2)"]),
        (["--n-layer", "1000000"], ["n_layer=1000000"]),
        (["--block-size", "100000"], ["fewer than one block", "--block-size"]),
        (["--resume"], ["--resume", "no checkpoint"]),
        (["--out", str(a_file)], [str(a_file), "not a folder"]),
        (["--out", str(a_file / "sub")], [str(a_file / "sub"), f"{a_file} is a file, not a folder"]),
        (["--out", str(dangling)], [f"--out {dangling}: a symlink to {tmp_path / 'nowhere'}, which does not exist"]),
        (["--init", str(tiny_minigpt_dir), "--n-layer", "3"], ["--n-layer needs --init scratch"]),
        (["--seed", str(10**25)], ["--seed"]),
    ]:
        argv = [a for a in TINY_RUN if a != "--n-layer" or "--init" not in args]
        if "--init" in args:  # a loaded model keeps its shape: drop the preset's shape flags
            argv = ["--max-steps", "1", "--no-progress"]
        result = call_cli("train.py", *argv, *out, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert "error: " in last and all(n in last for n in needles), (args, result.stderr)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("env,needle", [
    ({"RANK": "0", "WORLD_SIZE": "1"}, "MASTER_ADDR is not set: start data-parallel runs with torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost"}, "MASTER_PORT is not set: start data-parallel"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"RANK": "x", "WORLD_SIZE": "1"}, "RANK='x' is not an integer: start data-parallel runs with torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "gpu0"}, "LOCAL_RANK='gpu0' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: a job has at least 1 process"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 with WORLD_SIZE=2: ranks run from 0 to 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 with WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 with WORLD_SIZE=2"),
    ({"RANK": "1"}, "WORLD_SIZE is not set: start data-parallel runs with torchrun"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
])
def test_torchrun_variables_set_by_hand_are_one_line(env, needle, tmp_path, tiny_minigpt_dir, monkeypatch):
    """torchrun tells each process its place (RANK, WORLD_SIZE, LOCAL_RANK) and where to meet the
    others (MASTER_ADDR, MASTER_PORT). Set by hand without it, wrong or only some of them, a run and
    an --eval-only stop in one line naming the variable (they were tracebacks, from int() or from
    torch's rendezvous); the run leaves no folder."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert_one_line_error(call_cli("train.py", *TINY_RUN, "--out", str(out)), needle)
    assert not out.exists()
    assert_one_line_error(call_cli("train.py", "--eval-only", "--init", str(tiny_minigpt_dir), "--no-progress"),
                          needle)


def test_a_rank_that_is_no_integer_does_not_silence_the_cli(monkeypatch):
    """Only rank 0 prints a usage error or "interrupted" (every rank would print the same); a RANK
    that is no integer is no other rank: its usage error and Ctrl-C are said, not swallowed."""
    from minigpt.cli import run

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "x")
    result = call_cli("train.py", "--bogus")
    assert result.returncode == 2 and "error: unrecognized arguments: --bogus" in result.stderr, result
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit) as stop:
        run(interrupted, [])
    assert stop.value.code == 130 and err.getvalue() == "interrupted\n"


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.jsonl", b"", "no records"),
        ("truncated.json.gz", gzip.compress(json.dumps(ELI5_RECORDS).encode())[:150], "cannot read"),
        ("wrong_schema.jsonl", b'{"question": "Why?", "reply": "Because."}\n', "answers.text"),
    ],
)
@pytest.mark.parametrize("tokenizer", ["gpt2", "preset"])
def test_train_on_bad_data_is_one_clear_error(name, content, needle, tokenizer, tmp_path, tiny_minigpt_dir, monkeypatch):
    """Through train.py: with a GPT-2 tokenizer, and with --preset tiny, which learns its own vocabulary
    from --data first."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / name).write_bytes(content)
    if tokenizer == "gpt2":
        setup = ["--init", "scratch", "--tokenizer", str(tiny_minigpt_dir), "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "8", "--block-size", "8", "--max-steps", "1", "--no-progress"]
    else:
        setup = TINY_RUN
    result = call_cli("train.py", *setup, "--data", str(tmp_path / name), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / name}") and needle in last, result.stderr
    assert not (tmp_path / "out" / ".ckpt").exists()


def test_train_on_100k_tiny_records(tmp_path, tiny_minigpt_dir, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"answers": {"text": [f"a{i % 10}"]}}) + "\n" for i in range(100_000)))
    result = call_cli(
        "train.py", "--init", "scratch", "--tokenizer", str(tiny_minigpt_dir), "--n-layer", "1", "--n-head", "2",
        "--n-embd", "8", "--block-size", "8", "--batch-size", "64", "--max-steps", "2", "--no-progress",
        "--val-fraction", "0", "--data", str(path), "--out", str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert "data: 25,000 training and 0 validation blocks of 8 tokens" in result.stdout
    assert checkpoint_step(tmp_path / "out") == 2


def test_a_failed_run_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """A run that fails before its first checkpoint removes the folders it made for --out, parents
    too (`checkpoints/` of the preset's `checkpoints/tiny`), while they are empty; a folder that was
    there before stays, even an empty one."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path.with_name(tmp_path.name + "-cache")))
    monkeypatch.chdir(tmp_path)
    no_data = ["--data", str(tmp_path / "no_such.jsonl")]
    for out in ([], ["--out", "x1/x2/x3"]):  # the preset's default --out, and a deep new one
        assert_one_line_error(call_cli("train.py", *TINY_RUN, *no_data, *out), "no_such.jsonl: no such file")
        assert sorted(tmp_path.iterdir()) == [], out
    (tmp_path / "mine" / "empty").mkdir(parents=True)
    assert_one_line_error(call_cli("train.py", *TINY_RUN, *no_data, "--out", "mine/empty/new/run"), "no such file")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["mine", "mine/empty"]


def test_a_diverged_run_ends_cleanly(tmp_path, monkeypatch):
    """lr 10 for one step: the validation loss is finite but its exp overflows, so the summary, the
    card and --score say perplexity inf (the run succeeds); lr 1e30: the second step's update makes the
    weights non-finite while its own loss was finite, and the evaluation stops the run in one line,
    saving nothing."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    run = [a for a in TINY_RUN if a not in ("--save-every", "3")]
    result = call_cli("train.py", *run, "--warmup-steps", "0", "--max-steps", "1", "--lr", "10",
                      "--out", str(tmp_path / "big"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"done: step 1, validation loss \d{3,}\.\d{4} \(perplexity inf\)", result.stdout), result.stdout
    assert "      value: .inf" in (tmp_path / "big" / "README.md").read_text()
    scored = call_cli("sample.py", "--model", str(tmp_path / "big"), "--score", "Why is the sky blue?")
    assert scored.returncode == 0 and "| perplexity inf" in scored.stdout, scored.stderr
    result = call_cli("train.py", *run, "--lr", "1e30", "--warmup-steps", "1", "--max-steps", "2",  # (lr 0, then 1e30)
                      "--out", str(tmp_path / "nan"))
    assert_one_line_error(result, "step 2: the validation loss is nan; stopping", "(none yet) is untouched")
    assert not (tmp_path / "nan" / ".ckpt").exists()


def test_a_blank_title_is_refused_by_the_qa_format(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "blank.jsonl"
    data.write_text(json.dumps({"title": "  ", "answers": {"text": ["An answer."], "score": [1]}}) + "\n")
    result = call_cli("train.py", *TINY_RUN, "--format", "qa", "--data", str(data), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "blank.jsonl: record 1 (line 1) has no 'title' text (needed by --format qa)")



def test_a_tilde_that_is_no_users_home_is_one_line_and_makes_nothing(tmp_path, tiny_hf_dir, monkeypatch):
    """`~nouser/x` (a typo for ~/x, or a user of another machine) was pathlib's "RuntimeError: Could not determine
    home directory", a traceback, in every CLI that takes a path. A file or folder of that very name is still
    read as it is, as a shell reads it."""
    from minigpt.files import home_expanded

    monkeypatch.chdir(tmp_path)
    nobody = "~minigpt_no_such_user_4821"
    for script, *args in (("sample.py", "--model", f"{nobody}/x", "hi"),
                          ("convert_hf_weights.py", f"{nobody}/x", "--out", str(tmp_path / "o")),
                          ("convert_hf_weights.py", str(tiny_hf_dir), "--out", f"{nobody}/x"),
                          ("train.py", "--preset", "tiny", "--data", f"{nobody}/d.jsonl", "--out", str(tmp_path / "t"))):
        result = call_cli(script, *args)
        assert_one_line_error(result, f"{nobody}/")
        assert f"{nobody} is no user's home folder here" in result.stderr or "no such file or folder" in result.stderr
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / nobody).mkdir()
    assert home_expanded(f"{nobody}/x") == Path(nobody, "x")
    assert home_expanded("~/x") == Path.home() / "x"
