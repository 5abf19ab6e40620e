"""Device and precision: the one place that decides where and in what number format we compute."""

from __future__ import annotations

import torch

from .errors import MinigptError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in DEVICES:
        raise MinigptError(f"--device: unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "cuda" and not torch.cuda.is_available():
        raise MinigptError("--device cuda: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MinigptError("--device mps: Apple MPS is not available on this machine (try --device cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, else fp32; fp16 and bf16 are refused where unsupported."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise MinigptError(f"--dtype: unknown precision {name!r} (choose from auto, {', '.join(DTYPES)})")
    if name == "fp16" and device.type == "cpu":
        raise MinigptError("--dtype fp16: half precision is not supported on the CPU (use bf16 or fp32)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MinigptError("--dtype bf16: this GPU does not support bfloat16 (use fp16 or fp32)")
    return DTYPES[name]


def setup_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Resolve `--device` and `--dtype` together, and enable TF32 matmuls on CUDA (fp32 runs)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev, dt
