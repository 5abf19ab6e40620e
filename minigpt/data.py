"""From ELI5 questions (or plain text) to cached blocks of GPT-2 tokens, and batches of those blocks.

The pipeline, one step per function:

    source --read--> records --split--> train / validation records
           --render--> one text per record (by format) --tokenize--> one token stream
           --cut--> (n_blocks, block_size) uint16 array --cache--> blocks.npy + manifest.json

Sources (the Hub's ELI5 file, .json[.gz] / .jsonl / .parquet / .csv records, .txt files or a folder
of them), their readers and the rendering of records as text by format are `minigpt/sources.py`.
In the `answers` format records are tokenized one by one, all token streams concatenated and cut
into blocks, and the remainder dropped, as HF's `group_texts` does. A `qa` text and each plain-text
document is followed by EOS (plain-text documents are unrelated, as in GPT-2's own training data).

Validation data is either an explicit source or a split of the training records made BEFORE
tokenizing, exactly as `datasets.Dataset.train_test_split(test_size=f, seed=s)` makes it:
`numpy.random.default_rng(s).permutation(n)`, the first ceil(f*n) indices for validation and the rest
for training, each part in permutation order.

The cache folder holds one sub-folder per (role, key). The key hashes the source (a local file's
bytes, the Hub's records), the tokenizer, the format, the block size, max-records and (for a split)
the fraction and seed, so any change to an input makes a new entry. An entry is written in a
temporary folder and renamed into place when complete, so a crash never leaves one that looks
finished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import MinigptError, count, integer_at_least
from .files import atomic_folder, clear_leftovers_in, home_expanded, read_json
from .formats import FORMATS
from .sources import Source, render
from .tokenizer import Tokenizer

CACHE_VERSION = 3  # (2: byte-order marks dropped; 3: whitespace-only answers tokenized) bump when the way blocks
# are made changes, so old entries are not reused
BLOCKS_FILE = "blocks.npy"
MANIFEST_FILE = "manifest.json"
ENCODE_CHUNK = 1024  # texts per encode_batch call: large enough to keep every core busy
# How to give a plain-text source more records (`Source._read` decides what one is).
MORE_RECORDS = {"txt": "more paragraphs (a .txt file's records are its paragraphs, separated by blank lines)",
                "txt-folder": "more .txt files (each file of a folder is one record)"}


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes blocks (the CLI flags in brackets)."""

    source: str | None = None  # [--data] None: the Hub's eli5_category train file; else a local path
    val_source: str | None = None  # [--val-data] None: split `val_fraction` off the training records
    format: str = "answers"  # [--format] "answers" | "qa", see minigpt.formats
    block_size: int = 128  # [--block-size] tokens per training example
    max_records: int | None = None  # [--max-records] None: 5000 for the Hub source, all for local ones
    val_fraction: float = 0.2  # [--val-fraction]
    seed: int = 42  # [--seed] the split's seed (the batch order has its own)
    cache_dir: str | None = None  # None: $MINIGPT_CACHE/data, else ~/.cache/minigpt/data

    def __post_init__(self) -> None:
        for name, kind in (("block_size", Integral), ("max_records", Integral), ("seed", Integral),
                           ("val_fraction", Real)):  # (64.0 passed the checks below, to fail in numpy)
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                what = "an integer" if kind is Integral else "a number"
                raise MinigptError(f"DataConfig: {name} must be {what}, got {value!r}")
            if value is not None:  # (NumPy's numbers as Python's: the cache key is JSON)
                setattr(self, name, int(value) if kind is Integral else float(value))
        if self.format not in FORMATS:
            raise MinigptError(f"DataConfig: unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        if self.block_size < 2:  # (a block predicts its tokens after the first: one token has no target)
            raise MinigptError(f"DataConfig: block_size must be at least 2, got {self.block_size}")
        if self.max_records is not None and self.max_records < 1:
            raise MinigptError(f"DataConfig: max_records must be at least 1, got {self.max_records}")
        if not 0 <= self.val_fraction < 1:
            raise MinigptError(f"DataConfig: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise MinigptError(f"DataConfig: seed must be >= 0, got {self.seed}")


def default_cache_dir() -> Path:
    """`$MINIGPT_CACHE/data` when that variable is set, else `~/.cache/minigpt/data`."""
    root = os.environ.get("MINIGPT_CACHE")  # ("~/c", as a Dockerfile's ENV leaves it: the home folder's)
    return (home_expanded(root) if root else Path.home() / ".cache" / "minigpt") / "data"


def tiny_preset_path() -> Path:
    """A 50-question ELI5 sample (~7,400 answer tokens) inside the package: `train.py --preset tiny`."""
    return Path(__file__).resolve().parent / "assets" / "eli5_tiny.jsonl"


# --- token blocks --------------------------------------------------------------------------------


class TokenBlocks:
    """A read-only view of cached blocks: `blocks[i]` is one training example of `block_size` ids."""

    def __init__(self, blocks: np.ndarray, manifest: dict) -> None:
        self.blocks = blocks  # uint16, (n_blocks, block_size); a memmap when loaded from the cache
        self.manifest = manifest

    @classmethod
    def load(cls, folder: Path) -> TokenBlocks:
        blocks = np.load(folder / BLOCKS_FILE, mmap_mode="r", allow_pickle=False)
        manifest = read_json(folder / MANIFEST_FILE)
        if (blocks.dtype != np.uint16 or blocks.ndim != 2 or len(blocks) != manifest.get("blocks")
                or blocks.shape[1] != manifest.get("block_size")):
            raise MinigptError(f"{folder}: cache entry does not match its manifest")
        return cls(blocks, manifest)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]

    @property
    def num_tokens(self) -> int:
        """Tokens in the blocks (the dropped remainder not included)."""
        return self.blocks.size

    @functools.cached_property
    def sha256(self) -> str:
        """The blocks' fingerprint (hex): a checkpoint records it, so a resume notices data edited since."""
        return hashlib.sha256(np.ascontiguousarray(self.blocks).data).hexdigest()

    def __repr__(self) -> str:
        size = f"{count(len(self), 'block')} of {count(self.block_size, 'token')}"
        return f"TokenBlocks({size}, {self.manifest.get('source')})"


def load_blocks(
    cfg: DataConfig, tokenizer: Tokenizer, progress: bool = True
) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, validation) blocks, from the cache when present, else built and cached.

    With `val_source` unset and `val_fraction` 0 the validation blocks are empty.
    """
    root, common = _cache_root_and_key(cfg, tokenizer)
    train_src = Source.resolve(cfg.source, "--data", cfg.max_records)
    if cfg.val_source is not None:
        val_src = Source.resolve(cfg.val_source, "--val-data", None)
        return (_source_blocks(root, common, "train", train_src, cfg, tokenizer, progress),
                _source_blocks(root, common, "validation", val_src, cfg, tokenizer, progress))

    train_key = {**common, **train_src.identity()}
    split = {"val_fraction": cfg.val_fraction, "seed": cfg.seed}
    train_key = val_key = {**train_key, **split}
    train = _cached(root, "train", train_key, tokenizer.vocab_size)
    val = _cached(root, "validation", val_key, tokenizer.vocab_size)
    if train is None or val is None:
        # Rendering is per record, so rendering before splitting equals splitting the records first.
        train_docs, val_docs = split_records(render(train_src, cfg.format), cfg.val_fraction, cfg.seed)
        if val_docs and not train_docs:  # (else _build would blame the block size for an empty train split)
            n = len(val_docs)
            raise MinigptError(
                f"{train_src.name}: only {count(n, 'record')}, and the validation split (--val-fraction "
                f"{cfg.val_fraction}, rounded up) takes {'it' if n == 1 else 'all of them'}, leaving none to "
                f"train on; pass --val-fraction 0, a separate --val-data, or "
                f"{MORE_RECORDS.get(train_src.kind, 'more records')}"
            )
        train = _build(root, "train", train_key, train_src, train_docs, cfg, tokenizer, progress)
        val = _build(root, "validation", val_key, train_src, val_docs, cfg, tokenizer, progress)
    return named(train, train_src), named(val, train_src)


def load_validation_blocks(cfg: DataConfig, tokenizer: Tokenizer, progress: bool = True) -> TokenBlocks:
    """The validation blocks of `load_blocks(cfg, ...)`, alone: with `val_source` set, the training
    source is never read (`train.py --eval-only --val-data` needs neither it nor the Hub)."""
    if cfg.val_source is None:  # a split of the training records: those must be read
        return load_blocks(cfg, tokenizer, progress)[1]
    root, common = _cache_root_and_key(cfg, tokenizer)
    val_src = Source.resolve(cfg.val_source, "--val-data", None)
    return _source_blocks(root, common, "validation", val_src, cfg, tokenizer, progress)


def _cache_root_and_key(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[Path, dict]:
    """(the cache folder, the part of every entry's key that is not the source's)."""
    if tokenizer.vocab_size > 2**16:
        raise MinigptError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the uint16 block cache")
    root = home_expanded(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    common = {
        "version": CACHE_VERSION,
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
        "format": cfg.format,
        "block_size": cfg.block_size,
    }
    return root, common


def _source_blocks(root: Path, common: dict, role: str, src: Source, cfg: DataConfig, tokenizer: Tokenizer,
                   progress: bool) -> TokenBlocks:
    """All of one source's records as `role` blocks (no split), from the cache or built into it."""
    key = {**common, **src.identity()}
    cached = _cached(root, role, key, tokenizer.vocab_size)
    return named(cached, src) if cached is not None else _build(root, role, key, src, render(src, cfg.format), cfg,
                                                                tokenizer, progress)


def named(blocks: TokenBlocks, src: Source) -> TokenBlocks:
    """`blocks` as made from `src`: a cache entry is keyed by the source's bytes, and its manifest
    names the path that first built it, maybe another file (a colleague's copy), not this run's."""
    blocks.manifest = {**blocks.manifest, "source": src.name}
    return blocks


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) records, as `datasets`' train_test_split(test_size=val_fraction, seed=seed)."""
    if val_fraction == 0:
        return records, []
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = math.ceil(val_fraction * len(records))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def _entry(root: Path, role: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps({"role": role, **key}, sort_keys=True).encode()).hexdigest()
    return root / f"{role}-{digest[:24]}"


def _cached(root: Path, role: str, key: dict, vocab_size: int) -> TokenBlocks | None:
    """The cache entry for `key`, or None if there is none or it is damaged (then it is rebuilt).
    Its ids are checked against the vocabulary too (one pass over the file, ~1 ms for 2 M tokens):
    an id out of range would otherwise stop training at the embedding with an IndexError."""
    folder = _entry(root, role, key)
    if not folder.is_dir():
        if folder.is_symlink() or folder.exists():  # a stray file, or a link to nothing, where the entry's
            with contextlib.suppress(OSError):  # folder belongs (the cache is ours): made way for the rebuild
                folder.unlink()
        return None
    try:
        blocks = TokenBlocks.load(folder)
    except (OSError, ValueError, EOFError, MinigptError):  # damaged (an empty file: EOFError): rebuild it
        return None
    if any(blocks.manifest.get(name) != value for name, value in json.loads(json.dumps(key)).items()):
        return None  # (a manifest, and blocks to match, written for other settings: another block size)
    if blocks.num_tokens and int(blocks.blocks.max()) >= vocab_size:
        return None
    return blocks


def _build(
    root: Path,
    role: str,
    key: dict,
    src: Source,
    docs: list[str | None],
    cfg: DataConfig,
    tokenizer: Tokenizer,
    progress: bool,
) -> TokenBlocks:
    """Tokenize and cut one text per record (None: skipped), then write the cache entry atomically."""
    texts = [t for t in docs if t is not None]
    eos = cfg.format == "qa" or src.plain_text
    stream = tokenize(texts, tokenizer, eos=eos, progress=progress, desc=f"tokenizing {role}")
    n_blocks = len(stream) // cfg.block_size
    if n_blocks == 0 and (docs or role == "train"):  # (no validation records: --val-fraction 0)
        raise MinigptError(
            f"{src.name}: the {role} data ({count(len(docs), 'record')}) has {count(len(stream), 'token')}, "
            f"fewer than one block of {cfg.block_size} (--block-size); give more data or a smaller --block-size"
        )
    blocks = stream[: n_blocks * cfg.block_size].reshape(n_blocks, cfg.block_size)
    manifest = {
        **key,
        "role": role,
        "source": src.name,
        "records": len(docs),
        "skipped_empty": len(docs) - len(texts),
        "documents": len(texts),
        "tokens": len(stream),
        "blocks": n_blocks,
        "dropped_tokens": len(stream) - blocks.size,
        "dtype": "uint16",
    }
    entry = _entry(root, role, key)
    clear_leftovers_in(root)  # (of every entry: one no run asks for again, after --data changed, kept its own)
    try:  # (a damaged entry is replaced; a new one is never renamed over another process's, see below)
        with atomic_folder(entry, overwrite=entry.is_dir()) as tmp:
            np.save(tmp / BLOCKS_FILE, blocks)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except MinigptError:  # another run built the same entry at the same moment and renamed it first: it
        if (built := _cached(root, role, key, tokenizer.vocab_size)) is None:  # holds the same blocks
            raise
        return built
    return TokenBlocks.load(entry)


# --- texts -> tokens ----------------------------------------------------------------------------


def tokenize(
    texts: list[str],
    tokenizer: Tokenizer,
    *,
    eos: bool = False,
    progress: bool = True,
    desc: str = "tokenizing",
) -> np.ndarray:
    """All texts' tokens, one text after another (plus EOS after each if asked), as one uint16 array.

    Each text is encoded on its own (no special tokens), as the recipe does, but many at a time:
    `encode_batch` spreads a chunk over all CPU cores in Rust.
    """
    pieces = []
    with tqdm(total=len(texts), desc=desc, unit="doc", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK])
            if eos:
                chunk = [ids + [tokenizer.eos_id] for ids in chunk]
            n_ids = sum(map(len, chunk))
            pieces.append(np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.uint16, count=n_ids))
            bar.update(len(chunk))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


# --- batches -------------------------------------------------------------------------------------


class BatchIterator:
    """Yields LongTensor batches (B, T) of blocks (labels = inputs; the model shifts).

    `batch_size` is the GLOBAL batch, all ranks together. Epoch e visits the blocks in an order that
    depends only on (seed, e), never on the rank or world size, so a run can resume on a different
    number of processes. Global batch i is order[i*B:(i+1)*B]; rank r gets its contiguous share of it,
    shares differing by at most one row (so on a last batch smaller than the world size some ranks
    get an empty (0, T) tensor). The last partial batch is kept unless `drop_last`; `shuffle=False`
    keeps file order (for evaluation).

    For exact resume, `position` is the index of the next global batch: it moves on as each batch is
    handed out, so `state_dict()` taken after training on a batch resumes with the batch after it.
    """

    def __init__(
        self,
        blocks: TokenBlocks,
        batch_size: int,
        *,
        seed: int = 42,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        batch_size = integer_at_least(batch_size, 1, "batch_size")  # (ints: its state_dict is JSON)
        seed = integer_at_least(seed, 0, "seed")
        if not 0 <= rank < world_size:
            raise MinigptError(f"rank {rank} is not in [0, world size {world_size})")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        n = len(self.blocks)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The block indices of one epoch, in the order they are visited."""
        if not self.shuffle:
            return np.arange(len(self.blocks))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.order(self.epoch)
        while self.position < len(self):
            batch = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            base, extra = divmod(len(batch), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            mine = batch[start : start + base + (self.rank < extra)]
            self.position += 1
            yield torch.from_numpy(self.blocks.blocks[mine].astype(np.int64))
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_blocks": len(self.blocks),
            "blocks_sha256": self.blocks.sha256,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "batch_size"):
            if state.get(name) != getattr(self, name):
                raise MinigptError(f"batch iterator state: saved {name} {state.get(name)} differs from this run's "
                                   f"{getattr(self, name)}; resume with the same --batch-size and --seed")
        # The same settings made other blocks: the data changed (sha256 None: a checkpoint from before
        # blocks were fingerprinted).
        saved, sha256 = state.get("num_blocks"), state.get("blocks_sha256")
        if saved != len(self.blocks) or sha256 not in (None, self.blocks.sha256):
            role = {"train": "training ", "validation": "validation "}.get(self.blocks.manifest.get("role"), "")
            source = f" ({self.blocks.manifest['source']})" if self.blocks.manifest.get("source") else ""
            what = "as many blocks, other tokens" if saved == len(self.blocks) else f"{saved} blocks, now {len(self.blocks)}"
            raise MinigptError(f"--resume: the {role}data{source} is not what the run was saved with ({what}: a file "
                               "edited since?); resume with the same data, or start a new run")
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position <= len(self)):
            # (a ValueError, as for a value of the wrong type: a resume names training_state.json then)
            raise ValueError(f"batch iterator state: epoch {epoch!r} and position {position!r} are no place in "
                             f"this data (an epoch >= 0, a position from 0 to {len(self)} batches)")
        self.epoch, self.position = epoch, position

