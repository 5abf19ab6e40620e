"""Hugging Face's GPT-2 checkpoint layout, and conversion both ways.

This is the only module that knows HF's weight files, tensor names and tensor layout (HF's
config.json keys are `minigpt/config.py`'s, its tokenizer files `minigpt/tokenizer.py`'s, `TOKENIZER_FILES` and
`HF_SETTINGS`; fetching
the files from the Hub is `minigpt/hub.py`'s job, asked by `minigpt/loading.py`). An HF GPT-2 checkpoint differs
from a minigpt one in three ways:
  1. keys may or may not carry the `transformer.` prefix (the original gpt2 upload has none);
  2. attention layers may hold non-parameter mask buffers (`h.N.attn.bias`, `h.N.attn.masked_bias`);
  3. c_attn, c_proj and c_fc are `Conv1D` modules that store weights as (in, out), the transpose of
     `nn.Linear`'s (out, in).
It may also hold `lm_head.weight`: minigpt's LM head IS the token embedding (`GPT.tie_weights`), so
such a tensor is never loaded, only checked to be an exact copy of wte (`_check_head_is_wte`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_complete,
    check_savable,
    check_tensors,
    check_vocabulary,
    expected_shapes,
    match_names,
    model_from_state,
    model_state_for_saving,
    read_tensors,
    safetensors_shapes,
)
from .config import GPTConfig
from .errors import MinigptError, reason
from .files import atomic_folder, folder_destination, read_json, save_tensors
from .model import GPT
from .run_folder import CARD_FILE, check_outside_runs
from .runtime import resolve_device
from .sampling_config import SamplingConfig
from .tokenizer import Tokenizer

# Weights stored (in, out) by HF's Conv1D; every other tensor has the same layout in both.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older transformers saved inside each attention layer; not weights.
MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
# The files of an HF model folder, as glob patterns (what `--force` may replace as a model's: a Hub
# download fetches one form only, `loading._download_model`).
INDEX_FILE = "model.safetensors.index.json"  # which shard file holds which tensor
MODEL_FILES = [CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, "model-*.safetensors"]
LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"  # (tensors only read)
LEGACY_FILES = [LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE, "pytorch_model-*.bin"]  # (shards as save_pretrained names them)
HEAD, EMBEDDING = "lm_head.weight", "transformer.wte.weight"  # (the same names in both layouts)
GENERATION_FILE = "generation_config.json"  # transformers' sampling settings, which an export writes


def hf_to_minigpt_name(name: str) -> str | None:
    """The HF <-> minigpt key map: an HF GPT-2 tensor name -> its minigpt name (None: not a weight).

    minigpt's module tree mirrors HF's, so the map is the identity up to the `transformer.` prefix.
    Mask buffers are skipped. `lm_head.weight` keeps its name: the loader checks that it is a copy
    of wte (`_check_head_is_wte`) rather than trusting it to be one.
    Export needs no inverse: minigpt's names are exactly HF's `GPT2LMHeadModel` names.
    """
    if MASK_BUFFER.match(name):
        return None
    return name if name.startswith("transformer.") or name == HEAD else "transformer." + name


def is_conv1d_weight(name: str) -> bool:
    """Whether the tensor `name` (HF's or ours) is one HF stores transposed, as its Conv1D does."""
    return name.endswith(CONV1D_WEIGHTS)


# --- HF -> minigpt --------------------------------------------------------------------------


def _hf_expected(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """minigpt names with the shapes HF stores them in (Conv1D weights transposed), and the
    optional LM head (wte's shape), which `expected_shapes` leaves out as minigpt never saves it."""
    shapes = {
        name: tuple(reversed(shape)) if is_conv1d_weight(name) else shape
        for name, shape in expected_shapes(config).items()
    }
    return {**shapes, HEAD: shapes[EMBEDDING]}


def _check_head_is_wte(folder: Path, head: torch.Tensor | None, wte: torch.Tensor, untied: bool) -> None:
    """Refuse a checkpoint whose LM head is not the token embedding: minigpt's head is wte itself.

    `save_pretrained` may write the tied head as a copy of wte; that loads. Other values are a head
    of its own, which transformers uses (untied, with a warning, even when config.json asks to tie)
    and which minigpt would replace by wte: other logits. A config that declares the head untied
    (`tie_word_embeddings: false`) must hold it, or transformers draws a random one.
    """
    if head is None and untied:
        raise MinigptError(f"{folder}: config.json sets tie_word_embeddings false, but the weights hold no "
                           f"{HEAD} (transformers would draw a random LM head)")
    copy = head is not None and head.shape == wte.shape and head.dtype == wte.dtype and torch.allclose(
        head, wte, rtol=0, atol=0, equal_nan=True)  # (torch.equal: a NaN differs from itself, a copy from wte)
    if head is not None and not copy:
        raise MinigptError(f"{folder}: {HEAD} differs from {EMBEDDING}: an LM head of its own, which minigpt "
                           "cannot load (its head is the token embedding, tied as in GPT-2)")


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of an HF folder, in transformers' order of preference: model.safetensors,
    else the safetensors shards its index lists, else pytorch_model.bin, else the .bin shards its
    index lists. (The shards are named whether or not they are there yet: a download fetches them.)"""
    for single, index in ((WEIGHTS_FILE, INDEX_FILE), (LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MinigptError(f"{folder / index}: no weight_map of tensor names to shard files")
            for shard in weight_map.values():  # plain names only: an index must not point outside its folder
                if (not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", "..") or "\\" in shard
                        or not shard.isprintable() or len(shard.encode("utf-8", "surrogatepass")) > 255):
                    shown = repr(shard) if len(repr(shard)) <= 100 else f"{repr(shard)[:96]}...'"  # (one readable line)
                    raise MinigptError(f"{folder / index}: {shown} is not a file name in this folder")
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    return []


def _load_legacy_bin(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a legacy `pytorch_model.bin` with `weights_only=True`: tensors only, never code.

    mmap=True maps a zip-format file (torch >= 1.6) instead of reading it, so its names and shapes
    cost nothing to check; tensors that view the file must not outlive the check (`model_from_state`).
    """
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols; failures are reported below
            warnings.simplefilter("ignore")
            mmap = mmap and zipfile.is_zipfile(path)
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # a pickle that asks for something other than tensors, or no pickle
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        if culprit is None:  # (bytes the tensor-only unpickler cannot read: a damaged or foreign file)
            raise MinigptError(f"{path}: not a PyTorch weights file (no pickle of plain tensors)") from None
        raise MinigptError(
            f"{path}: refused to load: not a plain tensor file (it asks for {culprit.group(1)}); minigpt never "
            "unpickles anything else, as that can run code. Use a model.safetensors instead"
        ) from None
    except Exception as e:  # RuntimeError for a damaged zip, EOFError for an empty file, KeyError for text, ...
        with open(path, "rb") as f:
            head = f.read(4)
        what = ("an empty file" if not head else f"a damaged or truncated zip archive: {reason(e).split('. ')[0]}"
                if head == b"PK\x03\x04" else "no pickle of plain tensors")  # (a text file gave "(101)")
        raise MinigptError(f"{path}: not a PyTorch weights file ({what})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and _is_plain(t) for k, t in raw.items()):
        raise MinigptError(f"{path}: not a state dict of tensors (names to plain ones: not sparse, not on the meta "
                           "device)")
    return raw


def _is_plain(t: object) -> bool:
    """A tensor of numbers in memory: not sparse, not on the meta device (shapes without values)."""
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu"


def _hf_tensors(folder: Path, expected: dict[str, tuple[int, ...]], untied: bool) -> dict[str, torch.Tensor]:
    """The weights of an HF folder under minigpt's names, in HF's layout (Conv1D weights (in, out)),
    with `HEAD` beside them when the folder holds one.

    Every file's names and shapes are checked, and the set is checked complete, before any weight
    is read. A tied checkpoint may store its embedding only as `lm_head.weight` (transformers ties
    it back): that copy is then the embedding.
    """
    files = hf_weight_files(folder)
    if not files:
        raise MinigptError(f"{folder}: no model.safetensors (or pytorch_model.bin) in this folder")
    legacy = files[0].suffix == ".bin"
    for path in files:
        if not path.is_file():
            raise MinigptError(f"{path}: file not found (a shard its index names)")
    if legacy:  # (memory-mapped: names and shapes cost nothing to check)
        shapes = {path: {name: tuple(t.shape) for name, t in _load_legacy_bin(path, mmap=True).items()} for path in files}
    else:
        shapes = {path: safetensors_shapes(path) for path in files}
    mappings = {path: match_names(path, shapes[path], expected, hf_to_minigpt_name) for path in files}
    found: dict[str, Path] = {}  # our name -> the file holding it
    for path, mapping in mappings.items():
        for target in mapping.values():
            if target in found:  # (across shards; within one file, match_names refuses it)
                raise MinigptError(f"{folder}: tensor {target!r} is in both {found[target].name} and {path.name}")
            found[target] = path
    if EMBEDDING not in found and HEAD in found and not untied:
        mapping = mappings[found[HEAD]]
        mapping.update({name: EMBEDDING for name, target in mapping.items() if target == HEAD})
        found[EMBEDDING] = found.pop(HEAD)
    required = {name: shape for name, shape in expected.items() if name != HEAD}
    index = folder / (LEGACY_INDEX_FILE if legacy else INDEX_FILE)
    check_complete(files[0] if len(files) == 1 else index, found, required)
    if not legacy:
        return {name: t for path, mapping in mappings.items() for name, t in read_tensors(path, mapping).items()}
    tensors = {}
    for path, mapping in mappings.items():  # (each read now: the weights in memory once, not viewing the file)
        raw = _load_legacy_bin(path)
        part = {target: raw[name] for name, target in mapping.items()}
        check_tensors(path, part)
        tensors |= part
    return tensors


def load_hf_checkpoint(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, Tokenizer]:
    """Load an HF GPT-2 folder (config.json + safetensors, or a legacy .bin) as a minigpt model;
    `device` as `resolve_device` takes it, checked before any file is read."""
    device, folder = resolve_device(device), Path(folder)
    config_path = folder / CONFIG_FILE
    hf_config = read_json(config_path)
    # `tie_word_embeddings: false` alone is not refused, as GPTConfig.from_hf would: an untied head
    # may still be an exact copy of wte. The weights decide, in `_check_head_is_wte`.
    untied = hf_config.get("tie_word_embeddings") is False
    try:
        config = GPTConfig.from_hf({**hf_config, "tie_word_embeddings": True} if untied else hf_config)
    except (MinigptError, TypeError) as e:
        raise MinigptError(f"{config_path}: {e}") from None
    state = _hf_tensors(folder, _hf_expected(config), untied)
    _check_head_is_wte(folder, state.pop(HEAD, None), state[EMBEDDING], untied)  # (popped: freed once checked)
    tokenizer = Tokenizer.from_hf_dir(folder)
    check_vocabulary(folder, config, tokenizer)
    state = {k: v.t() if is_conv1d_weight(k) else v for k, v in state.items()}
    return model_from_state(config, state, device, dtype), tokenizer


# --- minigpt -> HF --------------------------------------------------------------------------


def export_hf(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike, card: str | None = None,
              overwrite: bool = False) -> Path:
    """Write an HF `GPT2LMHeadModel` folder (config, safetensors, tokenizer files, a
    `generation_config.json` with sample.py's sampling settings, and the model card `card` as
    README.md when given), atomically; `overwrite=True` replaces a folder that holds
    anything, whole (as `save_checkpoint_folder`)."""
    out = folder_destination(out)
    check_outside_runs(out)  # (as `save_checkpoint_folder`)
    check_savable(model, tokenizer, out)  # (before atomic_folder makes any folder)
    state = {
        name: t.t().contiguous() if is_conv1d_weight(name) else t
        for name, t in model_state_for_saving(model).items()
    }
    dtype = str(state[EMBEDDING].dtype).removeprefix("torch.")
    generation = SamplingConfig().to_hf(tokenizer.eos_id, model.config.block_size)  # (sample.py's defaults)
    with atomic_folder(out, overwrite) as tmp:
        hf_config = model.config.to_hf(eos_token_id=tokenizer.eos_id, dtype=dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        save_tensors(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.to_hf_files(tmp, model.config.block_size)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return out
