"""From ELI5 questions (or plain text) to cached blocks of GPT-2 tokens, and batches of those blocks.

The pipeline, one step per function:

    source --read--> records --split--> train / validation records
           --render--> one text per record (by format) --tokenize--> one token stream
           --cut--> (n_blocks, block_size) uint16 array --cache--> blocks.npy + manifest.json

Sources
    None          the Hub's ELI5-Category training file (first 5,000 records, the published recipe)
    .json[.gz]    a JSON array of eli5_category records (JSON lines are accepted too)
    .jsonl        one eli5_category record per line
    .parquet      eli5_category columns; `answers` is a struct of lists
    .csv          columns `title`, `selftext`, `answers.text`, `answers.score` (the names
                  `datasets`' flatten() gives); the two `answers.*` cells hold JSON arrays
    .txt          plain text: every blank-line-separated paragraph is one document
    a folder      plain text: every .txt file under it (sorted by path) is one document

Formats (ELI5 records; see `minigpt.formats`)
    answers   the recipe: a record's answers joined with one space, no special tokens. Records are
              tokenized one by one, all token streams concatenated and cut into blocks, and the
              remainder dropped, as HF's `group_texts` does.
    qa        `Question: <title>\\nAnswer: <highest-scored answer>` followed by EOS, so a model
              learns the template `sample.py --interactive` prompts with. Only the title is the
              question: the selftext (empty in ~40% of records, often a long aside) is left out so
              that training prompts look like what a user types.
Plain-text documents are taken as they are, each followed by EOS (they are unrelated documents, as
in GPT-2's own training data); `qa` needs questions and answers, so it refuses plain text.

Validation data is either an explicit source or a split of the training records made BEFORE
tokenizing, exactly as `datasets.Dataset.train_test_split(test_size=f, seed=s)` makes it:
`numpy.random.default_rng(s).permutation(n)`, the first ceil(f*n) indices for validation and the rest
for training, each part in permutation order.

The cache folder holds one sub-folder per (role, key). The key hashes the source's bytes, the
tokenizer, the format, the block size, max-records and (for a split) the fraction and seed, so any
change to an input makes a new entry. An entry is written in a temporary folder and renamed into
place when complete, so a crash never leaves one that looks finished.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import atomic_folder, read_json
from .errors import MinigptError, reason
from .formats import FORMATS, answers_text, qa_text
from .tokenizer import Tokenizer

HUB_TRAIN_FILE = "hf://datasets/rexarski/eli5_category/eli5-category-train.json.gz"
HUB_MAX_RECORDS = 5000  # the published recipe fine-tunes on the first 5,000 training questions
TEXT_SUFFIXES = (".json", ".json.gz", ".jsonl", ".parquet", ".csv", ".txt")
CACHE_VERSION = 1  # bump when the way blocks are made changes, so old entries are not reused
BLOCKS_FILE = "blocks.npy"
MANIFEST_FILE = "manifest.json"
ENCODE_CHUNK = 1024  # texts per encode_batch call: large enough to keep every core busy


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

    def check(self) -> None:
        if self.format not in FORMATS:
            raise MinigptError(f"--format: unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        if self.block_size < 1:
            raise MinigptError(f"--block-size: must be at least 1, got {self.block_size}")
        if self.max_records is not None and self.max_records < 1:
            raise MinigptError(f"--max-records: must be at least 1, got {self.max_records}")
        if not 0 <= self.val_fraction < 1:
            raise MinigptError(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise MinigptError(f"--seed: must be >= 0, got {self.seed}")


def default_cache_dir() -> Path:
    """`$MINIGPT_CACHE/data` when that variable is set, else `~/.cache/minigpt/data`."""
    root = os.environ.get("MINIGPT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "minigpt") / "data"


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
        if blocks.dtype != np.uint16 or blocks.ndim != 2 or len(blocks) != manifest.get("blocks"):
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

    def __repr__(self) -> str:
        return f"TokenBlocks({len(self)} blocks of {self.block_size} tokens, {self.manifest.get('source')})"


def load_blocks(
    cfg: DataConfig, tokenizer: Tokenizer, progress: bool = True
) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, validation) blocks, from the cache when present, else built and cached.

    With `val_source` unset and `val_fraction` 0 the validation blocks are empty.
    """
    cfg.check()
    if tokenizer.vocab_size > 2**16:
        raise MinigptError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the uint16 block cache")
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    common = {
        "version": CACHE_VERSION,
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
        "format": cfg.format,
        "block_size": cfg.block_size,
    }
    train_src = _Source.resolve(cfg.source, "--data", cfg.max_records)
    train_key = {**common, **train_src.identity()}

    if cfg.val_source is not None:
        val_src = _Source.resolve(cfg.val_source, "--val-data", None)
        val_key = {**common, **val_src.identity()}
        blocks = []
        for role, key, src in (("train", train_key, train_src), ("validation", val_key, val_src)):
            cached = _cached(root, role, key)
            if cached is None:
                cached = _build(root, role, key, src, render(src, cfg.format), cfg, tokenizer, progress)
            blocks.append(cached)
        return blocks[0], blocks[1]

    split = {"val_fraction": cfg.val_fraction, "seed": cfg.seed}
    train_key = val_key = {**train_key, **split}
    train, val = _cached(root, "train", train_key), _cached(root, "validation", val_key)
    if train is None or val is None:
        # Rendering is per record, so rendering before splitting equals splitting the records first.
        train_docs, val_docs = split_records(render(train_src, cfg.format), cfg.val_fraction, cfg.seed)
        train = _build(root, "train", train_key, train_src, train_docs, cfg, tokenizer, progress)
        val = _build(root, "validation", val_key, train_src, val_docs, cfg, tokenizer, progress)
    return train, val


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


def _cached(root: Path, role: str, key: dict) -> TokenBlocks | None:
    folder = _entry(root, role, key)
    if not folder.is_dir():
        return None
    try:
        return TokenBlocks.load(folder)
    except (OSError, ValueError, MinigptError):  # damaged by hand: rebuild it
        return None


def _build(
    root: Path,
    role: str,
    key: dict,
    src: _Source,
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
            f"{src.name}: the {role} data ({len(docs)} records) has {len(stream)} tokens, fewer "
            f"than one block of {cfg.block_size} (--block-size); give more data or a smaller --block-size"
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
    with atomic_folder(_entry(root, role, key)) as tmp:
        np.save(tmp / BLOCKS_FILE, blocks)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return TokenBlocks.load(_entry(root, role, key))


# --- records -> texts -> tokens ------------------------------------------------------------------


def render(src: _Source, fmt: str) -> list[str | None]:
    """Each of the source's records as text in format `fmt`; None for a record whose answers are all
    empty (it is skipped; in the recipe it would add no tokens). Plain-text documents pass as they are."""
    if src.plain_text:
        if fmt == "qa":
            raise MinigptError(
                f"{src.name}: --format qa needs ELI5 records (title + answers), not plain text"
            )
        return list(src.records())
    texts: list[str | None] = []
    for i, record in enumerate(src.records()):
        answers = _answers(record, i, src)
        if not any(a.strip() for a in answers):
            texts.append(None)
        elif fmt == "answers":
            texts.append(answers_text(answers))
        else:
            title = record.get("title")
            if not isinstance(title, str):
                raise MinigptError(
                    f"{src.name}: {_which(record, i)} has no 'title' text (needed by --format qa)"
                )
            texts.append(qa_text(title, _best_answer(record, answers, i, src)))
    return texts


def _which(record: dict, i: int) -> str:
    q_id = record.get("q_id") if isinstance(record, dict) else None
    return f"record {i + 1}" + (f" (q_id {q_id!r})" if q_id else "")


def _answers(record: dict, i: int, src: _Source) -> list[str]:
    answers = record.get("answers") if isinstance(record, dict) else None
    texts = answers.get("text") if isinstance(answers, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise MinigptError(f"{src.name}: {_which(record, i)} has no 'answers.text' list of strings")
    return texts


def _best_answer(record: dict, answers: list[str], i: int, src: _Source) -> str:
    """The highest-scored non-empty answer; the first one on a tie or when there are no scores."""
    scores = record["answers"].get("score")
    if scores is None:
        scores = [0] * len(answers)
    numbers = isinstance(scores, list) and all(isinstance(s, (int, float)) for s in scores)
    if not numbers or len(scores) != len(answers):
        raise MinigptError(
            f"{src.name}: {_which(record, i)} has 'answers.score' not one number per 'answers.text'"
        )
    candidates = [(s, -j) for j, (s, a) in enumerate(zip(scores, answers)) if a.strip()]
    return answers[-max(candidates)[1]]


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
            count = sum(map(len, chunk))
            pieces.append(np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.uint16, count=count))
            bar.update(len(chunk))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


# --- sources -------------------------------------------------------------------------------------


class _Source:
    """One place data comes from: the Hub's ELI5 file, a local file, or a folder of .txt files.

    `limit` is the number of records used (None: all); the Hub source defaults to the recipe's 5,000.
    """

    def __init__(self, name: str, kind: str, path: Path | None, limit: int | None) -> None:
        self.name, self.kind, self.path, self.limit = name, kind, path, limit
        self._records: list | None = None

    @property
    def hub(self) -> bool:
        return self.kind == "hub"

    @property
    def plain_text(self) -> bool:
        return self.kind in ("txt", "txt-folder")

    @classmethod
    def resolve(cls, source: str | None, flag: str, limit: int | None) -> _Source:
        if source is None:
            return cls(HUB_TRAIN_FILE, "hub", None, HUB_MAX_RECORDS if limit is None else limit)
        path = Path(source).expanduser()
        if not path.exists():
            raise MinigptError(f"{path}: no such file or folder ({flag})")
        if path.is_dir():
            return cls(str(path), "txt-folder", path, limit)
        suffix = next((s for s in TEXT_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None:
            raise MinigptError(
                f"{path}: unknown data file type ({flag} takes "
                f"{', '.join(TEXT_SUFFIXES)} or a folder of .txt files)"
            )
        return cls(str(path), suffix.lstrip(".").removesuffix(".gz"), path, limit)

    def identity(self) -> dict:
        """What the cache key needs to know about the source: its kind, limit and a content hash.

        Local sources hash their bytes, so a cache hit costs no parsing; the Hub's file is hashed by
        the records actually used, which needs reading them first.
        """
        h = hashlib.sha256()
        if self.hub:
            h.update(json.dumps(self.records(), sort_keys=True).encode())
        elif self.kind == "txt-folder":
            for file in _text_files(self.path):  # names too: moving text between files changes documents
                h.update(file.relative_to(self.path).as_posix().encode() + b"\0")
                h.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return {"source_kind": self.kind, "source_sha256": h.hexdigest(), "max_records": self.limit}

    def records(self) -> list:
        """The records used: dicts for ELI5 sources, strings (documents) for plain text."""
        if self._records is None:
            self._records = self._read()[: self.limit]
            if not self._records:
                raise MinigptError(f"{self.name}: no records in this source")
        return self._records

    def _read(self) -> list:
        if self.hub:
            return _read_hub(self.limit)
        try:
            if self.kind == "txt-folder":
                files = _text_files(self.path)
                if not files:
                    raise MinigptError(f"{self.path}: folder holds no .txt files")
                return [text for f in files if (text := f.read_text(encoding="utf-8").strip())]
            if self.kind == "txt":
                text = self.path.read_text(encoding="utf-8")
                return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
            if self.kind == "parquet":
                return _read_parquet(self.path)
            if self.kind == "csv":
                return _read_csv(self.path)
            return _read_json(self.path, lines=self.kind == "jsonl")
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise MinigptError(f"{self.path}: cannot read ({e})") from None


def _text_files(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*.txt") if p.is_file())
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def _read_hub(limit: int) -> list[dict]:
    """The first `limit` records of the Hub's ELI5 training file (downloaded once by `datasets`)."""
    from datasets import load_dataset

    try:
        ds = load_dataset("json", data_files=HUB_TRAIN_FILE, split="train")
    except Exception as e:  # offline, Hub down, file moved: the user can always pass local files
        raise MinigptError(
            f"{HUB_TRAIN_FILE}: cannot load ELI5 from the Hugging Face Hub ({reason(e)}); if offline, "
            "pass local files instead: --data eli5-category-train.json.gz (or .jsonl/.parquet/.csv/.txt)"
        ) from None
    return ds.select(range(min(limit, len(ds)))).to_list()


def _read_json(path: Path, lines: bool) -> list[dict]:
    """A JSON array (`.json`, `.json.gz`) or JSON lines (`.jsonl`, or a `.json` that is not an array)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if not lines and text.lstrip().startswith("["):
        records = _parse_json(text, path, "")
    else:
        records = [
            _parse_json(line, path, f"line {n} ")
            for n, line in enumerate(io.StringIO(text), 1)
            if line.strip()
        ]
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise MinigptError(f"{path}: record {bad + 1} is not a JSON object")
    return records


def _parse_json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MinigptError(f"{path}: {where or 'file '}is not valid JSON ({e})") from None
    except RecursionError:  # hostile input: arrays nested thousands deep
        raise MinigptError(f"{path}: {where or 'file '}is not valid JSON (nested too deeply)") from None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        wanted = [c for c in ("q_id", "title", "selftext", "answers") if c in names]
        return pq.read_table(path, columns=wanted).to_pylist()
    except Exception as e:  # pyarrow's errors have many types; all mean "not a usable parquet file"
        raise MinigptError(f"{path}: not a readable parquet file ({reason(e)})") from None


def _read_csv(path: Path) -> list[dict]:
    """Rows with `title`, `selftext`, and JSON arrays in `answers.text` / `answers.score`."""
    csv.field_size_limit(sys.maxsize)  # an ELI5 answer cell can exceed csv's 128 KiB default
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            record: dict = {k: v for k, v in row.items() if k and not k.startswith("answers.")}
            answers = {}
            for field in ("text", "score"):
                cell = row.get(f"answers.{field}")
                if cell:
                    try:
                        answers[field] = json.loads(cell)
                    except json.JSONDecodeError:
                        raise MinigptError(
                            f"{path}: {_which(record, i)}: 'answers.{field}' is not a JSON array"
                        ) from None
            record["answers"] = answers
            records.append(record)
    return records


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
        if batch_size < 1:
            raise MinigptError(f"--batch-size: must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise MinigptError(f"rank {rank} is not in [0, world size {world_size})")
        if seed < 0:
            raise MinigptError(f"--seed: must be >= 0, got {seed}")
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
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "batch_size", "num_blocks"):
            ours = getattr(self, name) if name != "num_blocks" else len(self.blocks)
            if state.get(name) != ours:
                raise MinigptError(
                    f"batch iterator state: saved {name} {state.get(name)} differs from this run's {ours}; "
                    "resume with the same data, --batch-size and --seed"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

