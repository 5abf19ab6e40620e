"""Device and precision: the one place that decides where and in what number format we compute; and what
that device can hold (the memory checks before large allocations) and how the CPU compiles."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import re
import subprocess
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import torch

from .errors import MinigptError, count, named

if TYPE_CHECKING:
    from .model import GPT

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | int = "auto", what: str = "device") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available. A
    GPU of several is named as torch names it, "cuda:1" (or given as a `torch.device`, or as torch's
    bare index 1); "cpu:0" and "mps:0", which a tensor's `.device` may read, are the CPU and MPS.
    Errors name the argument `what` (a CLI passes its flag, "--device": see `errors.named`)."""
    name = f"cuda:{name}" if isinstance(name, int) and not isinstance(name, bool) else name
    name = str(name) if isinstance(name, torch.device) else name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, colon, index = name.partition(":") if isinstance(name, str) else (name, "", "")
    numbered = index.isdecimal() and (kind == "cuda" or index == "0")  # (one CPU, one MPS device: index 0)
    if kind not in DEVICES or kind == "auto" or (colon and not numbered):
        raise MinigptError(f"{what}: unknown device {name!r} (choose from {', '.join(DEVICES)}, or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MinigptError(f"{named(what, name)}: CUDA is not available on this machine (try {named(what, 'cpu')})")
    if kind == "cuda" and colon and int(index) >= torch.cuda.device_count():
        raise MinigptError(f"{named(what, name)}: this machine has {torch.cuda.device_count()} GPU(s), "
                           f"numbered from 0 (those CUDA_VISIBLE_DEVICES lets it see)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise MinigptError(f"{named(what, 'mps')}: Apple MPS is not available on this machine (try {named(what, 'cpu')})")
    return torch.device(name)


def model_device(model: GPT) -> torch.device:
    """Where the model computes: the device of its position embeddings, which every inference layout
    keeps. A model on the meta device (shapes, no weights: `torch.device("meta")` while building one)
    is a one-line MinigptError."""
    device = model.transformer.wpe.weight.device
    if device.type == "meta":
        raise MinigptError("the model is on the meta device, which holds shapes and no weights: load its weights first")
    return device


def activation_dtype(model: GPT) -> torch.dtype:
    """The dtype the residual stream (and so the KV cache) is computed in: that of the LayerNorms
    (the model's precision, or fp32 once `prepare_for_inference` has set it up for the CPU)."""
    return model.transformer.ln_f.weight.dtype


def check_dtype(dtype: torch.dtype, what: str) -> None:
    """Refuse (one line, `what` naming the argument) a dtype other than the three a model computes in:
    a name such as "bf16" would have turned autocast off, silently."""
    if dtype not in DTYPES.values():
        raise MinigptError(f"{what} must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The name `--dtype` gives `dtype`: "fp32", "bf16" or "fp16"."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_dtype(name: str, device: torch.device, what: str = "dtype") -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, else fp32; fp16 and bf16 are refused where
    unsupported, in errors naming the argument `what` (as `resolve_device`)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise MinigptError(f"{what}: unknown precision {name!r} (choose from auto, {', '.join(DTYPES)})")
    if name == "fp16" and device.type == "cpu":
        raise MinigptError(f"{named(what, 'fp16')}: half precision is not supported on the CPU (use fp32, or bf16: "
                           "bf16 is fast only on CPUs with AVX-512 BF16 or AMX)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MinigptError(f"{named(what, 'bf16')}: this GPU does not support bfloat16 (use fp16 or fp32)")
    return DTYPES[name]


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones, measured once per
    process on a 256 x 256 x 256 matmul on one thread (best of 5 each, interleaved; a few ms, ~0.3 s
    where bf16 is emulated).

    CPUs with bf16 instructions (AVX-512 BF16, AMX, Arm BF16) run bf16 matmuls as fast as fp32 or
    several times faster (1.2-3.6x on an AVX-512 BF16 EPYC, 2.1-2.3x in quiet runs; ~5x with AMX);
    without them PyTorch emulates bf16 and it runs ~100x slower than fp32. Measuring rather than reading CPU flags also sees
    whether this torch build uses the instructions. One thread, because a kernel on all of them
    waits for the slowest: with another busy thread on a 2-core machine (a tokenizer's pool), the
    bf16 kernel lost a whole scheduler slice, 8 ms against fp32's 0.2, in ~40% of runs."""
    own = torch.Generator().manual_seed(0)  # (torch's own generator is left as it was: runs seeded alike)
    a, b = torch.randn(256, 256, generator=own), torch.randn(256, 256, generator=own)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def seconds(x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        x @ y
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds(a, b), seconds(a16, b16)  # warm-up: first-call set-up
        fp32 = bf16 = float("inf")
        for _ in range(5):
            fp32, bf16 = min(fp32, seconds(a, b)), min(bf16, seconds(a16, b16))
    finally:
        torch.set_num_threads(threads)
    return fp32 / bf16


def cpu_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The CPU's largest cache, in bytes (from Linux's sysfs), or 32 MiB where it cannot be read."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for entry in sysfs.glob("index*/size"):
        text = entry.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=32 * 2**20)


EVICTION_FLOOR = 8 * 2**20  # the smallest read `evicting_bytes` considers: several times any core's L2
COLD_MARGIN = 1.2  # re-read at most this much faster than from memory: the buffer was not cached


def reread_rates(sizes: list[int]) -> Iterator[float]:
    """Bytes a second at which this process re-reads the first `size` bytes of one buffer, just
    read (best of 2), for each of `sizes` in turn, as asked for: a cache's speed where those bytes
    stay cached, memory's where they do not."""
    buffer = torch.ones(max(sizes) // 4)  # (written: real pages, not the one shared zero page)
    for size in sizes:
        part = buffer[: size // 4]
        part.sum()
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            part.sum()
            best = min(best, time.perf_counter() - start)
        yield size / best


@functools.cache
def evicting_bytes(limit: int, rates: Callable[[list[int]], Iterator[float]] = reread_rates) -> int:
    """How many bytes a read must cover to evict what the CPU caches for this process, at most
    `limit`: the smallest of `limit`, `limit`/sqrt(2), `limit`/2, ... (down to EVICTION_FLOOR) that
    this process, and every larger one, re-reads no faster than `limit` itself (by COLD_MARGIN).
    Measured once per process and limit, larger sizes first, down to the first one found cached
    (0.1-0.2 s for 330 MB, the buffer's page faults included).

    sysfs names a cache, but a VM sees its host's, shared with other tenants: 480 MiB on an Intel
    Xeon VM that re-read 64 MiB at ~50 GB/s and 128 MiB at memory's ~23. Where all of `limit`
    stays cached, so does every size, and the smallest is the answer: reading it leaves `limit`'s
    bytes cached, as they were. Stopping at the first size found cached keeps a disturbed (slow)
    re-read of a smaller, cached one from passing for memory's speed."""
    sizes = [limit]
    while sizes[-1] / 2**0.5 >= EVICTION_FLOOR:
        sizes.append(int(sizes[-1] / 2**0.5))
    if len(sizes) == 1:
        return limit
    measured = rates(sizes)
    from_memory = next(measured)
    cold = itertools.takewhile(lambda rate: rate <= COLD_MARGIN * from_memory, measured)
    return min((size for size, _ in zip(sizes[1:], cold)), default=limit)


def emulated_bf16_warning(device: torch.device, dtype: torch.dtype) -> str | None:
    """A one-line warning when bf16 training is asked for on a CPU that only emulates bf16 (bf16
    matmuls under a third of fp32's speed); None otherwise. Training still runs, much slower."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    speedup = cpu_bf16_speedup()
    if speedup >= 1 / 3:
        return None
    return (f"warning: --dtype bf16: this CPU has no native bf16 matmul (measured {1 / speedup:.0f}x "
            f"slower than fp32), so bf16 is emulated and training is much slower; fp32 is faster here")


def warn_other_cpu_threads(saved: int | None, device: torch.device) -> None:
    """Warn where a run saved under `saved` CPU threads resumes under another count: the CPU kernels
    split their sums by thread, so the run goes on equal to an uninterrupted one only to rounding."""
    now = torch.get_num_threads()
    if device.type == "cpu" and saved is not None and saved != now:
        warnings.warn(f"--resume: the run was saved with {count(saved, 'CPU thread')}, this process has {now}: it "
                      f"goes on equal to an uninterrupted run to float rounding, not bitwise (OMP_NUM_THREADS={saved} "
                      "for that)")


def wait_for(device: torch.device) -> None:
    """Wait until `device` has run all the work queued on it, before reading a clock: a GPU runs
    behind the host, which only queues its kernels. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Environment variables that cap the instruction sets of torch's kernels and libraries (README:
# "AVX2, emulated on the AVX-512 machine")
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")


def prepare_cpu_compile() -> Path:
    """Ready torch.compile to build C++ for the CPU; return the folder of inductor's disk cache.

    A C++ compiler (CXX, else g++) that runs and Python's C headers (inductor builds its kernels as
    Python extension modules) are checked first: without them, torch.compile fails deep inside
    inductor, at the first step.

    One cache folder per instruction set: TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER)
    is pointed at a subfolder of it for the instruction sets torch's kernels use in this process.
    Inductor keys a compiled graph by the graph and its settings, not by the instruction set it wrote
    the code for, nor the one oneDNN packed the frozen weights for. A decoding step compiled with the
    instruction sets capped to AVX2 and then loaded uncapped from the same cache corrupted the heap
    (glibc aborted 3 runs in 4, before any check could see the logits); the other way round it gave
    NaN logits. One subfolder per instruction set keeps such steps apart.

    Inductor's C++ builder imports `torch.utils.cpp_extension`, which on a machine with a CUDA
    toolkit (nvcc) but no GPU logs "No CUDA runtime is found, using CUDA_HOME=..." as it loads: a
    line about CUDA in a run on the CPU. It is imported here, with that logger quiet.
    """
    compiler = os.environ.get("CXX", "g++")
    if not program_runs(compiler):
        raise MinigptError(f"torch.compile on the CPU needs a C++ compiler ({compiler} not found, or it fails to run): "
                           "it writes and builds C++ there")
    headers = Path(sysconfig.get_path("include"), "Python.h")
    if not headers.exists():
        raise MinigptError(f"torch.compile on the CPU needs Python's C headers ({headers} not found; on Debian or "
                           "Ubuntu: apt install python3-dev)")
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    if re.fullmatch(r"isa-[a-z0-9-]+-[0-9a-f]{8}", base.name):  # (set by an earlier call; not a user's "isa-mine")
        base = base.parent
    # Inductor's build commands split paths at spaces ("g++: input file '/tmp/my' ..."), its cache's
    # and the temporary files' it precompiles headers in: say so now, not as a compiler error later.
    for what, path in (("TMPDIR", tempfile.gettempdir()), ("TORCHINDUCTOR_CACHE_DIR", str(base))):
        if any(c.isspace() for c in path):
            raise MinigptError(f"torch.compile on the CPU cannot build C++ under {path!r}, a path with a space "
                               f"(torch's build commands split it): set {what} to a folder without one")
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", ..., "Z VECTOR", "NO AVX"
    key = "|".join([capability, str(pick_vec_isa())] + [f"{v}={os.environ.get(v, '')}" for v in ISA_CAPS])
    name = re.sub(r"[^a-z0-9]+", "-", capability.lower())  # (no space in the folder's name, as above)
    folder = base / f"isa-{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def program_runs(program: str) -> bool:
    """Whether `program --version` runs and succeeds: a C++ compiler that is found may still compile
    nothing (CXX=false), and torch.compile would fail deep inside inductor."""
    try:
        return subprocess.run([program, "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # (not found, not executable, hung)
        return False


CLI_NAMES = ("--device", "--dtype")  # how the CLIs' errors name a device and a precision (`setup_device`)


def setup_device(device: str = "auto", dtype: str = "auto", names: tuple[str, str] = ("device", "dtype"),
                 ) -> tuple[torch.device, torch.dtype]:
    """Resolve a device and a precision together (`names`: how errors name them; the CLIs pass
    their flags, `CLI_NAMES`), and enable TF32 matmuls on CUDA (fp32 runs). A numbered
    GPU ("cuda:1") becomes the current one, where torch puts what a device is not given for (CUDA
    graphs' memory pools, bf16 support queried)."""
    dev = resolve_device(device, names[0])
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    dt = resolve_dtype(dtype, dev, names[1])
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev, dt


_T = TypeVar("_T")


def available_memory(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the CPU can still give without swapping: Linux's MemAvailable (free memory plus the
    caches it can drop). None on other devices, whose allocators refuse what they cannot give, and
    where Linux does not say. (A container's cgroup limit is not read: its usage counts page cache
    that would be dropped, so limit minus usage would refuse what fits.)"""
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024  # (kB)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def allocate(make: Callable[[], _T], nbytes: int, device: torch.device, flags: str, what: str, detail: str) -> _T:
    """`make()`, which allocates `nbytes` on `device`, after `check_fits`; an allocator's refusal
    becomes the same MinigptError."""
    check_fits(nbytes, device, flags, what, detail)
    try:
        return make()
    except RuntimeError as e:  # the CPU allocator's "can't allocate memory", CUDA's OutOfMemoryError
        if isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e):
            raise _too_large(nbytes, flags, what, detail) from None
        raise


def check_fits(nbytes: int, device: torch.device, flags: str, what: str, detail: str) -> None:
    """A MinigptError "{flags}: {what} ({detail}, N GB) does not fit in memory" when `nbytes` exceed
    int64 (torch cannot even be asked for them) or the memory available (on the CPU: Linux
    overcommits, so an allocation larger than the memory succeeds, and the process is killed, or
    swaps, later, as it writes into it)."""
    available = available_memory(device)
    if nbytes > torch.iinfo(torch.int64).max or (available is not None and nbytes > available):
        raise _too_large(nbytes, flags, what, detail)


def _too_large(nbytes: int, flags: str, what: str, detail: str) -> MinigptError:
    return MinigptError(f"{flags}: {what} ({detail}, {nbytes / 1e9:,.1f} GB) does not fit in memory")
