"""minigpt checkpoint folders: read, validate and write them, never leaving half a folder behind.

A checkpoint is a folder holding
    config.json         the GPTConfig, as JSON
    model.safetensors   the weights under minigpt's names, nn.Linear layout (out, in)
    tokenizer.json      the tokenizer, so the folder is self-contained
Training runs add their own files beside these (see `minigpt/run_folder.py`).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Collection

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from .config import GPTConfig
from .errors import MinigptError
from .files import atomic_folder, folder_destination, read_json, reading_safetensors, save_tensors
from .model import GPT
from .run_folder import CARD_FILE, check_outside_runs
from .runtime import resolve_device
from .tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The LM head shares wte's tensor; safetensors stores one copy and loading re-ties them.
TIED_KEYS = ("lm_head.weight",)
READ_BYTES = 16 * 2**20  # how much of a tensor one memory mapping of the file reads (`read_tensor`)


def is_minigpt_checkpoint(folder: Path) -> bool:
    """A minigpt folder's config.json is a GPTConfig (HF's has `model_type` instead)."""
    config = folder / CONFIG_FILE
    return config.is_file() and "model_type" not in read_json(config)


def read_config(folder: Path) -> GPTConfig:
    """The GPTConfig of checkpoint `folder` (its config.json; HF's field names are taken too), or a
    one-line MinigptError naming the file."""
    path = Path(folder) / CONFIG_FILE
    try:
        return GPTConfig.from_dict(read_json(path))
    except TypeError as e:  # a value of the wrong type
        raise MinigptError(f"{path}: {e}") from None
    except MinigptError as e:
        raise MinigptError(f"{path}: {e}") from None


class _NoRandomInit(TorchFunctionMode):
    """Inside it, `torch.nn.init`'s random fills leave their tensor as it is."""

    FILLS = (nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.trunc_normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def empty_model(config: GPTConfig) -> GPT:
    """A GPT whose tensors are on the meta device: shapes and dtypes, no memory, no numbers.

    The random initialisation is skipped too (`_NoRandomInit`): on the meta device it draws
    nothing, but the first `normal_` there imports torch's compiler (the meta kernel is written in
    Python behind a dynamo guard), ~0.9 s of every process that loads a model on 2 CPU cores.
    """
    with torch.device("meta"), _NoRandomInit():
        return GPT(config)


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a minigpt checkpoint of `config` must hold, by name, with its shape.

    Computed on the meta device: no memory is allocated, however large the config claims to be.
    """
    model = empty_model(config)
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
    bad = [name for name, t in tensors.items() if not all_finite(t)]
    if bad:
        warnings.warn(f"{path}: tensor {bad[0]!r} holds NaN or inf values", stacklevel=3)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`: its smallest and largest values are finite (a NaN makes both NaN).
    Unlike `torch.isfinite(t).all()`, this makes no temporaries as large as `t`: that check made
    ~250 MB of them for distilgpt2's embedding, the peak of the whole load."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def refuse_duplicate_names(path: Path) -> None:
    """Refuse a safetensors header that names a tensor twice.

    The safetensors parser silently keeps the last of two entries with one name, so such a file
    would load whichever copy its author chose to put last. Call this only on a file `safe_open`
    has accepted: its header size and JSON are then known to be sane.
    """
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))  # the header: 8-byte little-endian length + JSON
        entries = json.loads(f.read(size), object_pairs_hook=lambda pairs: pairs)
    seen = set()
    for name, _ in entries:
        if name in seen:
            raise MinigptError(f"{path}: tensor {name!r} is listed twice in the header")
        seen.add(name)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a .safetensors file's header declares; no tensor is read."""
    with reading_safetensors(path), safe_open(str(path), framework="pt") as f:
        refuse_duplicate_names(path)
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_tensors(path: Path, mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file that `mapping` ({name in the file: our name}, from
    `match_names`) selects, under our names: copies in memory of their own (`read_tensor`)."""
    with reading_safetensors(path):
        tensors = {target: read_tensor(path, name) for name, target in mapping.items()}
    check_tensors(path, tensors)
    return tensors


def load_safetensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load a minigpt .safetensors file's tensors, after checking them against `expected` (HF's
    files, whose names differ, are matched by `minigpt.hf` with `match_names`' `rename`).

    The header is checked before any tensor is read, so a file declaring the wrong tensors costs
    nothing to refuse; so is completeness (every name of `expected` present).
    """
    mapping = match_names(path, safetensors_shapes(path), expected)
    check_complete(path, mapping.values(), expected)
    return read_tensors(path, mapping)


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor `name` of a safetensors file, copied out a slice of rows (READ_BYTES) at a time,
    each slice through a memory mapping of the file of its own, gone before the next is made.

    Why: `safe_open` maps the whole file, and the pages read through a mapping stay in the
    process's memory until its last tensor is dropped. Read through one mapping, the weights sat
    in memory twice while they were copied out (loading distilgpt2 peaked 720 MB above the
    interpreter, for 328 MB of weights; now ~400, with the model built)."""
    with safe_open(str(path), framework="pt") as f:
        part = f.get_slice(name)
        shape = part.get_shape()
        if not shape or 0 in shape:  # (nothing to slice)
            return f.get_tensor(name).clone()
        first_row = part[:1]
        rows = max(1, READ_BYTES // (first_row.numel() * first_row.element_size()))
        if rows >= shape[0]:  # (one slice: this mapping reads it)
            return part[:].clone()
        out = torch.empty(shape, dtype=first_row.dtype)
        del first_row
    for start in range(0, shape[0], rows):
        with safe_open(str(path), framework="pt") as f:
            out[start:start + rows] = f.get_slice(name)[start:start + rows]
    return out


def check_complete(path: Path, names: Collection[str], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse (naming `path`) a set of tensor `names` that lacks one of `expected`."""
    names = set(names)
    missing = [name for name in expected if name not in names]
    if missing:
        raise MinigptError(f"{path}: missing tensor {missing[0]!r}")


def check_vocabulary(folder: Path, config: GPTConfig, tokenizer: Tokenizer) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    if tokenizer.vocab_size > config.vocab_size:
        raise MinigptError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )


def model_from_state(
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GPT:
    """Build a GPT around already-loaded tensors, without a random init. Consumes `state`.

    Each tensor becomes a contiguous one of `device` and `dtype` (copied where it is not one
    already), and is dropped from `state` as soon as it is, so the memory holds the weights about
    once, not twice, on the way. Contiguous: a transposed view (HF's Conv1D weights) keeps its
    strides through `.to()`, so its matmuls would take other kernels, and round otherwise, than the
    same weights read back from a checkpoint. (`state` must not view a memory-mapped file, which
    the model would then keep resident: `load_safetensors` gives copies.)
    """
    model = empty_model(config)
    owned = {}
    for name in list(state):
        owned[name] = state.pop(name).to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(owned, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def load_checkpoint(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, Tokenizer]:
    """Load a minigpt checkpoint folder: the model (eval mode) and its tokenizer; `device` as
    `resolve_device` takes it, checked before any file is read."""
    device, folder = resolve_device(device), Path(folder)
    config = read_config(folder)
    expected = expected_shapes(config)
    weights = folder / WEIGHTS_FILE
    tensors = load_safetensors(weights, expected)
    tokenizer = Tokenizer.from_dir(folder)
    check_vocabulary(folder, config, tokenizer)
    return model_from_state(config, tensors, device, dtype), tokenizer


def check_savable(model: GPT, tokenizer: Tokenizer, out: Path) -> None:
    """Refuse (one-line MinigptError naming `out`) to save what no loader would read back: tensors
    that are not those of a plain GPT of the model's config (such as the decoding layouts
    `prepare_for_inference` swaps in), an LM head untied from wte, or a `tokenizer` with more tokens
    than the model has rows (`check_vocabulary`). The public savers call it once, before making any folder."""
    if hasattr(model, "_orig_mod"):  # (its tensors' names start with "_orig_mod.")
        raise MinigptError("this is a torch.compile'd model: save the model it compiles (model._orig_mod, the same "
                           "weights)")
    state = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in TIED_KEYS}
    if state != expected_shapes(model.config):
        raise MinigptError("this model's tensors are not a plain GPT's (e.g. one prepared for inference, whose "
                           "decoding layouts cannot be saved): save the model before preparing it")
    # The files hold wte alone, and a loaded model reads its head from it: an untied head is not saved.
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise MinigptError("this model's LM head is no longer tied to its token embeddings (wte), and only wte "
                           "is saved (e.g. after load_state_dict(..., assign=True)): call model.tie_weights() first")
    check_vocabulary(out, model.config, tokenizer)


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors as safetensors wants them: contiguous, CPU, tied copies dropped."""
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
            if name not in TIED_KEYS}


def write_checkpoint_files(folder: Path, model: GPT, tokenizer: Tokenizer) -> None:
    """Write config.json, model.safetensors and tokenizer.json into `folder`, which must exist.

    Not atomic by itself: `save_checkpoint_folder` (or a training run's own checkpointing) calls it
    on a temporary folder that becomes the checkpoint once complete.
    """
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_tensors(model_state_for_saving(model), folder / WEIGHTS_FILE)
    tokenizer.save(folder / TOKENIZER_FILE)


def save_checkpoint_folder(out: str | os.PathLike, model: GPT, tokenizer: Tokenizer, overwrite: bool = False,
                           card: str | None = None) -> Path:
    """Create the checkpoint folder `out` atomically (see `files.atomic_folder`), with the model card
    `card` as README.md when given; `overwrite=True` replaces a folder that holds anything, whole
    (nothing else in it survives). A model and tokenizer that `load_checkpoint` would refuse together
    are refused before anything is written."""
    out = folder_destination(out)
    check_outside_runs(out)  # (a folder in a run's folder stops every later --resume of the run)
    check_savable(model, tokenizer, out)  # (before atomic_folder makes any folder)
    with atomic_folder(out, overwrite) as tmp:
        write_checkpoint_files(tmp, model, tokenizer)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return out
