"""minigpt checkpoint folders: read, validate and write them, never leaving half a folder behind.

A checkpoint is a folder holding
    config.json         the GPTConfig, as JSON
    model.safetensors   the weights under minigpt's names, nn.Linear layout (out, in)
    tokenizer.json      the tokenizer, so the folder is self-contained
Training runs add their own files beside these (see `minigpt/trainer.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GPTConfig
from .errors import MinigptError
from .model import GPT
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The LM head shares wte's tensor; safetensors stores one copy and loading re-ties them.
TIED_KEYS = ("lm_head.weight",)


def read_json(path: Path) -> dict:
    """Parse a JSON object from `path`, or raise a MinigptError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinigptError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinigptError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MinigptError(f"{path}: expected a JSON object")
    return data


def is_minigpt_checkpoint(folder: Path) -> bool:
    """A minigpt folder's config.json is a GPTConfig (HF's has `model_type` instead)."""
    config = folder / CONFIG_FILE
    return config.is_file() and "model_type" not in read_json(config)


def read_config(folder: Path) -> GPTConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        return GPTConfig.from_dict(read_json(path))
    except TypeError as e:  # a value of the wrong type
        raise MinigptError(f"{path}: {e}") from None
    except MinigptError as e:
        raise MinigptError(f"{path}: {e}") from None


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a minigpt checkpoint of `config` must hold, by name, with its shape.

    Computed on the meta device: no memory is allocated, however large the config claims to be.
    """
    with torch.device("meta"):
        model = GPT(config)
    return {
        name: tuple(t.shape) for name, t in model.state_dict().items() if name not in TIED_KEYS
    }


def match_names(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, str]:
    """Check a file's tensor names and shapes against `expected`; return {file name: our name}.

    `rename` maps a name in the file to ours (HF files differ), or to None to skip the tensor.
    """
    mapping = {}
    for name, shape in shapes.items():
        target = rename(name) if rename else name
        if target is None:
            continue
        if target not in expected:
            raise MinigptError(f"{path}: unexpected tensor {name!r}")
        if target in mapping.values():
            raise MinigptError(f"{path}: tensor {target!r} given twice")
        if tuple(shape) != expected[target]:
            raise MinigptError(
                f"{path}: tensor {name!r} has shape {list(shape)}, expected {list(expected[target])}"
            )
        mapping[name] = target
    return mapping


def check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse non-float tensors; warn (but load) when weights hold NaN or inf."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise MinigptError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected a float type")
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        warnings.warn(f"{path}: tensor {bad[0]!r} holds NaN or inf values", stacklevel=3)


def load_safetensors(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a .safetensors file's tensors under our names, after checking them against `expected`.

    The header is checked before any tensor is read, so a file declaring the wrong tensors costs
    nothing to refuse.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            mapping = match_names(path, shapes, expected, rename)
            tensors = {target: f.get_tensor(name) for name, target in mapping.items()}
    except SafetensorError as e:
        raise MinigptError(f"{path}: not a valid safetensors file ({e})") from None
    except FileNotFoundError:
        raise MinigptError(f"{path}: file not found") from None
    check_tensors(path, tensors)
    return tensors


def check_complete(
    path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> None:
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise MinigptError(f"{path}: missing tensor {missing[0]!r}")


def model_from_state(
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GPT:
    """Build a GPT around already-loaded tensors, without a random init or an extra copy."""
    with torch.device("meta"):
        model = GPT(config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def load_checkpoint(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, Tokenizer]:
    """Load a minigpt checkpoint folder: the model (eval mode) and its tokenizer."""
    folder = Path(folder)
    config = read_config(folder)
    expected = expected_shapes(config)
    weights = folder / WEIGHTS_FILE
    tensors = load_safetensors(weights, expected)
    check_complete(weights, tensors, expected)
    tokenizer = Tokenizer.from_dir(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise MinigptError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )
    return model_from_state(config, tensors, device, dtype), tokenizer


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors as safetensors wants them: contiguous, CPU, tied copies dropped."""
    return {
        name: t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if name not in TIED_KEYS
    }


def write_checkpoint(folder: Path, model: GPT, tokenizer: Tokenizer) -> None:
    """Write config.json, model.safetensors and tokenizer.json into an existing `folder`."""
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_file(model_state_for_saving(model), str(folder / WEIGHTS_FILE))
    tokenizer.save(folder / "tokenizer.json")


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; when the block succeeds it becomes `out`.

    If the block raises, the temporary folder is deleted and `out` is untouched. An existing `out`
    is replaced only after the new folder is complete: it is moved aside, the new one renamed in,
    and the old one deleted, so at every moment one complete folder exists under a known name.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MinigptError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(out: str | os.PathLike, model: GPT, tokenizer: Tokenizer) -> Path:
    """Write a complete minigpt checkpoint folder at `out`, atomically."""
    with atomic_folder(out) as tmp:
        write_checkpoint(tmp, model, tokenizer)
    return Path(out)
