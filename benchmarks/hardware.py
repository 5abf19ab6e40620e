"""What the machine can do, measured, so every benchmark figure carries its hardware: the fp32 and
bf16 matmul peaks and the memory read bandwidth. Used by bench_sample.py, bench_train.py and
gpu_check.py; `python benchmarks/hardware.py [--device cuda]` prints the line alone.

    matmul peak   the best rate of timed square matmuls, large enough to take tens of
                  milliseconds or more (a ~10 microsecond matmul mostly times the call and
                  overstates MFU); the size grows until the best of 3 takes >= 20 ms or reaches
                  4096 (8192 on a GPU), and the best rate over the sizes is the peak. Where bf16 is
                  emulated (~1 GFLOP/s) the size stays small.
    memory read   sum over a 1 GiB fp32 buffer (far beyond any cache), best of 3: bytes read / s
    machine       the CPU's name and matmul-relevant flags, the instruction set torch's kernels run,
                  and the variables capping it where set (minigpt.runtime.ISA_CAPS: an older CPU emulated)
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path


def _best_seconds(fn, device, repeats: int) -> float:
    from minigpt.runtime import wait_for

    fn()  # warm-up
    wait_for(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        wait_for(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device, dtype, max_size: int | None = None) -> tuple[float, int]:
    """(best FLOP/s, matrix size n) of an n x n x n matmul in `dtype` on `device`.

    Each size is timed best of 3 and the best rate over the sizes tried is the peak: on a busy
    machine one run of a small matmul can take tens of milliseconds (its threads wait on each
    other), and judging the size by that one run stopped the growth at 256^3 with a peak of
    1.5 GFLOP/s against 86 at 2048^3 in the same process (an MFU of 400%)."""
    import torch

    max_size = max_size or (8192 if device.type == "cuda" else 4096)
    n, best, best_n = 256, 0.0, 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(lambda: a @ b, device, 3)
        if 2 * n**3 / seconds > best:
            best, best_n = 2 * n**3 / seconds, n
        if seconds >= 0.02 or n >= max_size:
            break
        n *= 2
    repeats = max(3, min(20, int(0.5 / max(seconds, 1e-6))))
    seconds = _best_seconds(lambda: a @ b, device, repeats)
    rate = 2 * n**3 / seconds
    return (rate, n) if rate >= best else (best, best_n)


def memory_read_bandwidth(device) -> float:
    """Bytes per second read by a sum over a 1 GiB fp32 buffer (best of 3)."""
    import torch

    buffer = torch.ones(2**28, device=device)  # 1 GiB
    return buffer.numel() * 4 / _best_seconds(lambda: buffer.sum(), device, 3)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The matmul-relevant instruction sets this CPU reports (Linux), e.g. "avx512_bf16 amx_bf16"."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "?"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
    have = set(flags.split(":", 1)[1].split())
    return " ".join(f for f in wanted if f in have) or "none of avx2/avx512/amx"


def cpu_kernels() -> str:
    """The instruction set torch's own CPU kernels run (e.g. "AVX512"), and any ISA_CAPS set."""
    import torch

    from minigpt.runtime import ISA_CAPS

    caps = " ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name))
    return f"torch kernels {torch.backends.cpu.get_cpu_capability()}" + (f", capped: {caps}" if caps else "")


def describe(device) -> dict:
    """The machine line's numbers: name, peaks (FLOP/s), sizes, bandwidth (bytes/s)."""
    import torch

    fp32, n32 = matmul_peak(device, torch.float32)
    bf16, n16 = matmul_peak(device, torch.bfloat16)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"{cpu_name()} [{cpu_flags()}; {cpu_kernels()}], {os.cpu_count()} CPUs, "
                f"{torch.get_num_threads()} threads")
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32  # (setup_device: bench_train, gpu_check)
    return {"name": f"{name}; torch {torch.__version__}", "fp32": fp32, "fp32_n": n32, "bf16": bf16,
            "bf16_n": n16, "read": memory_read_bandwidth(device), "fp32_label": "fp32 (TF32)" if tf32 else "fp32"}


def hardware_line(info: dict) -> str:
    return (f"machine: {info['name']}\n"
            f"hardware: matmul peak {info['fp32_label']} {info['fp32'] / 1e9:,.1f} GFLOP/s "
            f"({info['fp32_n']}^3), "
            f"bf16 {info['bf16'] / 1e9:,.1f} GFLOP/s ({info['bf16_n']}^3, {info['bf16'] / info['fp32']:.2f}x fp32); "
            f"memory read {info['read'] / 1e9:,.1f} GB/s")


def main(argv=None) -> None:
    from minigpt.cli import Parser
    from minigpt.runtime import resolve_device

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    device = resolve_device(p.parse_args(argv).device, "--device")
    print(hardware_line(describe(device)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from minigpt.cli import run

    run(main)
