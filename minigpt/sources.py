"""Where training text comes from: sources, their readers, and records rendered as text.

Sources (`Source.resolve`)
    None          the Hub's ELI5-Category training file (first 5,000 records, the published recipe),
                  downloaded once by `minigpt.hub`
    .json[.gz]    a JSON array of eli5_category records (JSON lines and a single record, pretty-printed or not,
                  are accepted too; so are the fields `answers.text` and `answers.score` for `answers`, as
                  `datasets`' flatten() writes them)
    .jsonl        one eli5_category record per line
    .parquet      eli5_category columns; `answers` is a struct of lists
    .csv          columns `title`, `selftext`, `answers.text`, `answers.score` (the names
                  `datasets`' flatten() gives); the two `answers.*` cells hold JSON arrays
    .txt          plain text: every blank-line-separated paragraph is one document
    a folder      plain text: every .txt file under it (sorted by path) is one document
Files are UTF-8; a byte-order mark at the start is dropped.

Formats (ELI5 records, `render`; the templates are `minigpt.formats`)
    answers   the recipe: a record's answers joined with one space, no special tokens.
    qa        `Question: <title>\\nAnswer: <highest-scored answer>`, so a model learns the template
              `sample.py --interactive` prompts with. Only the title is the question: the selftext
              (empty in ~40% of records, often a long aside) is left out so that training prompts look
              like what a user types.
Plain-text documents are taken as they are; `qa` needs questions and answers, so it refuses plain
text. What happens to the texts next (tokens, blocks, the cache) is `minigpt/data.py`'s part.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import re
import sys
import zlib
from pathlib import Path

from .errors import MinigptError, reason
from .files import LINE_BREAKS, home_expanded
from .formats import FORMATS, answers_text, qa_text
from .hub import load_eli5_records
from .tokenizer import lone_surrogate

HUB_DATASET = "rexarski/eli5_category"  # the recipe's data, as the Hub names it
HUB_TRAIN_NAME = "eli5-category-train.json.gz"
HUB_TRAIN_FILE = f"hf://datasets/{HUB_DATASET}/{HUB_TRAIN_NAME}"  # (the source's name, in messages)
HUB_MAX_RECORDS = 5000  # the published recipe fine-tunes on the first 5,000 training questions
TEXT_SUFFIXES = (".json", ".json.gz", ".jsonl", ".parquet", ".csv", ".txt")
TEXT_ENCODING = "utf-8-sig"  # UTF-8, less a leading byte-order mark (Excel's "CSV UTF-8" and Notepad write one)
FLAT_ANSWERS = ("answers.text", "answers.score")  # `answers` as `datasets`' flatten() leaves it: two fields


class Source:
    """One place data comes from: the Hub's ELI5 file, a local file, or a folder of .txt files.

    `limit` is the number of records used (None: all); the Hub source defaults to the recipe's 5,000.
    """

    def __init__(self, name: str, kind: str, path: Path | None, limit: int | None) -> None:
        self.name, self.kind, self.path, self.limit = name, kind, path, limit
        self._records: list | None = None
        self._lines: list[int] | None = None  # the line each record starts on, in a JSON-lines or CSV file

    @property
    def hub(self) -> bool:
        return self.kind == "hub"

    @property
    def plain_text(self) -> bool:
        return self.kind in ("txt", "txt-folder")

    @classmethod
    def resolve(cls, source: str | None, flag: str, limit: int | None) -> Source:
        if source is None:
            return cls(HUB_TRAIN_FILE, "hub", None, HUB_MAX_RECORDS if limit is None else limit)
        if not source:  # Path("") is ".": the current folder's .txt files would be read, silently
            raise MinigptError(f"{flag}: empty path")
        path = home_expanded(source)
        if not path.exists():
            raise MinigptError(f"{path}: no such file or folder ({flag})")
        if path.is_dir():
            return cls(str(path), "txt-folder", path, limit)
        if not path.is_file():  # (a FIFO hung the run: its bytes are hashed for the cache, then read)
            raise MinigptError(f"{path}: not a regular file ({flag} takes a file or a folder of .txt files, not a pipe "
                               "or a device)")
        suffix = next((s for s in TEXT_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None:
            raise MinigptError(
                f"{path}: unknown data file type ({flag} takes "
                f"{', '.join(TEXT_SUFFIXES)} or a folder of .txt files)"
            )
        # (the kind keeps .gz: the cache keys a file by its bytes and kind, and the same bytes named
        # .json.gz are read through gzip, so a plain file misnamed .gz is refused, cached or not)
        return cls(str(path), suffix.lstrip("."), path, limit)

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
                name = file.relative_to(self.path).as_posix()  # (its bytes: a name need not be UTF-8)
                h.update(name.encode("utf-8", "surrogateescape") + b"\0")
                h.update(_sha256(file).digest())
        else:
            h = _sha256(self.path)
        return {"source_kind": self.kind, "source_sha256": h.hexdigest(), "max_records": self.limit}

    def records(self) -> list:
        """The records used: dicts for ELI5 sources, strings (documents) for plain text."""
        if self._records is None:
            records, lines = self._read()
            self._records, self._lines = records[: self.limit], lines and lines[: self.limit]
            if not self._records:
                raise MinigptError(f"{self.name}: no records in this source")
        return self._records

    def where(self, i: int, record: dict) -> str:
        """Record `i` (from 0) as its reader finds it: its number, the line it starts on in a JSON-lines
        or CSV file (blank lines and a header make the two differ), its q_id."""
        return _which(record, i, self._lines[i] if self._lines else None)

    def _read(self) -> tuple[list, list[int] | None]:
        """The records, and the line each starts on where the file is read by lines (else None)."""
        if self.hub:
            return load_eli5_records(HUB_DATASET, HUB_TRAIN_NAME, self.limit), None
        try:
            if self.kind == "txt-folder":
                files = _text_files(self.path)
                if not files:
                    raise MinigptError(f"{self.path}: folder holds no .txt files")
                return [text for f in files if (text := _read_text_file(f).strip())], None
            if self.kind == "txt":
                text = self.path.read_text(encoding=TEXT_ENCODING)
                return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()], None
            if self.kind == "parquet":
                return _read_parquet(self.path, self.limit), None
            if self.kind == "csv":
                return _read_csv(self.path)
            return _read_json(self.path, lines=self.kind == "jsonl")
        except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:  # (zlib: a damaged .gz)
            raise MinigptError(f"{self.path}: cannot read ({e})") from None


def _sha256(file: Path):
    """The hash of one file's bytes; an unreadable file is a one-line error naming it."""
    h = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise MinigptError(f"{file}: cannot read ({e.strerror or e})") from None
    return h


def _read_text_file(file: Path) -> str:
    """One .txt file of a folder source; an error names that file, not just the folder."""
    try:
        return file.read_text(encoding=TEXT_ENCODING)
    except (UnicodeDecodeError, OSError) as e:
        raise MinigptError(f"{file}: cannot read ({e})") from None


def _text_files(folder: Path) -> list[Path]:
    """Every file under `folder` whose name ends in .txt, in any case (as a single file's does)."""
    files = (p for p in folder.rglob("*") if p.suffix.lower() == ".txt" and p.is_file())
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def _read_json(path: Path, lines: bool) -> tuple[list[dict], list[int] | None]:
    """A JSON array or a single record (`.json`, `.json.gz`), or JSON lines (`.jsonl`, or a `.json` that
    is neither), with the line each record starts on for JSON lines."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding=TEXT_ENCODING) as f:
        text = f.read()
    numbers = None
    if not lines and (whole := _whole_json(text, path)) is not None:
        records = whole if isinstance(whole, list) else [whole]
    else:
        numbered = [(n, line) for n, line in enumerate(io.StringIO(text), 1) if line.strip()]
        numbers = [n for n, _ in numbered]
        records = [_parse_json(line, path, f"line {n} ") for n, line in numbered]
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise MinigptError(f"{path}: {f'line {numbers[bad]}' if numbers else f'record {bad + 1}'} is not a JSON object")
    return _fold_flat_answers(records), numbers


def _whole_json(text: str, path: Path):
    """The file as one JSON value (an array of records, or one record however it is laid out), or None
    where it holds more than one: JSON lines, which json reads up to the end of the first ("Extra data")."""
    if not text.strip():
        return None  # (no records, which is said once they are counted)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return None
    except (ValueError, RecursionError):  # (an integer of more than 4,300 digits; arrays nested too deeply)
        pass
    return _parse_json(text, path, "")  # (its error, named as the whole file's)


def _fold_flat_answers(records: list[dict]) -> list[dict]:
    """Records whose `answers` is two fields, as `datasets`' flatten() writes them (`answers.text`,
    `answers.score`: the recipe's `ds.flatten().to_json()`), with the struct folded back."""
    for r in records:
        if "answers" not in r and any(k in r for k in FLAT_ANSWERS):
            r["answers"] = {k.split(".")[1]: r.pop(k) for k in FLAT_ANSWERS if k in r}
    return records


def _parse_json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except ValueError as e:  # (not JSON; or an integer of more than 4,300 digits, which Python refuses)
        raise MinigptError(f"{path}: {where or 'file '}is not valid JSON ({e})") from None
    except RecursionError:  # hostile input: arrays nested thousands deep
        raise MinigptError(f"{path}: {where or 'file '}is not valid JSON (nested too deeply)") from None


def _read_parquet(path: Path, limit: int | None) -> list[dict]:
    """The first `limit` rows (None: all), read a batch at a time: a small file can hold millions of
    rows (compressed, or one value repeated), which --max-records would otherwise cut only once read."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        # `answers` as a struct, or as `datasets`' flatten() leaves it: columns answers.text, answers.score
        flat = [] if "answers" in names else [c for c in FLAT_ANSWERS if c in names]
        wanted = [c for c in ("q_id", "title", "selftext", "answers") if c in names] + flat
        rows: list[dict] = []
        for batch in file.iter_batches(batch_size=1024, columns=wanted):
            rows += batch.to_pylist()
            if limit is not None and len(rows) >= limit:
                break
        return _fold_flat_answers(rows[:limit])
    except Exception as e:  # pyarrow's errors have many types; all mean "not a usable parquet file"
        raise MinigptError(f"{path}: not a readable parquet file ({reason(e)})") from None


def _read_csv(path: Path) -> tuple[list[dict], list[int]]:
    """Rows with `title`, `selftext`, and JSON arrays in `answers.text` / `answers.score`, and the line
    each starts on (a quoted cell can hold line breaks)."""
    csv.field_size_limit(sys.maxsize)  # an ELI5 answer cell can exceed csv's 128 KiB default
    records, lines = [], []
    with open(path, newline="", encoding=TEXT_ENCODING) as f:
        reader = csv.DictReader(f)
        for i, row in enumerate(reader):
            # the line it ends on, less the line breaks inside its quoted cells
            line = reader.line_num - sum(len(LINE_BREAKS.findall(v)) for v in row.values() if isinstance(v, str))
            record: dict = {k: v for k, v in row.items() if k and not k.startswith("answers.")}
            answers = {}
            for field in ("text", "score"):
                cell = row.get(f"answers.{field}")
                if cell:
                    try:
                        answers[field] = json.loads(cell)
                    except (ValueError, RecursionError):  # (not JSON, a 5,000-digit number, nested too deep)
                        if field == "text":  # (scores count only for --format qa, which checks them)
                            raise MinigptError(
                                f"{path}: {_which(record, i, line)}: 'answers.text' is not a JSON array"
                            ) from None
                        answers[field] = cell
            record["answers"] = answers
            records.append(record)
            lines.append(line)
    return records, lines


# --- records -> texts ---------------------------------------------------------------------------


def render(src: Source, fmt: str) -> list[str | None]:
    """Each of the source's records as text in format `fmt`; None for a record whose answers are all
    empty (it is skipped: in the recipe it adds no tokens), and in format qa one whose answers are
    all whitespace (no answer to pick). Plain-text documents pass as they are."""
    if fmt not in FORMATS:
        raise MinigptError(f"format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if src.plain_text:
        if fmt == "qa":
            raise MinigptError(
                f"{src.name}: --format qa needs ELI5 records (title + answers), not plain text"
            )
        return list(src.records())
    texts: list[str | None] = []
    for i, record in enumerate(src.records()):
        answers = _answers(record, i, src)
        if not answers_text(answers) or (fmt == "qa" and not any(a.strip() for a in answers)):
            texts.append(None)  # (the recipe's join of them is "", no tokens; qa needs an answer with text)
        elif fmt == "answers":
            texts.append(answers_text(answers))
        else:
            title = record.get("title")
            if not isinstance(title, str) or not title.strip():  # (a blank question teaches nothing)
                raise MinigptError(
                    f"{src.name}: {src.where(i, record)} has no 'title' text (needed by --format qa)"
                )
            texts.append(qa_text(title, _best_answer(record, answers, i, src)))
        if texts[-1] is not None and lone_surrogate(texts[-1]) is not None:
            raise MinigptError(f"{src.name}: {src.where(i, record)} holds a lone surrogate (a JSON escape such "
                               f"as \\ud800 with no pair): not Unicode text, which no tokenizer takes")
    return texts


def _which(record: dict, i: int, line: int | None = None) -> str:
    q_id = record.get("q_id") if isinstance(record, dict) else None
    details = ([f"line {line}"] if line else []) + ([f"q_id {q_id!r}"] if q_id else [])
    return f"record {i + 1}" + (f" ({', '.join(details)})" if details else "")


def _answers(record: dict, i: int, src: Source) -> list[str]:
    answers = record.get("answers") if isinstance(record, dict) else None
    texts = answers.get("text") if isinstance(answers, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise MinigptError(f"{src.name}: {src.where(i, record)} has no 'answers.text' list of strings")
    return texts


def _best_answer(record: dict, answers: list[str], i: int, src: Source) -> str:
    """The highest-scored non-empty answer; the first one on a tie or when there are no scores."""
    scores = record["answers"].get("score")
    if scores is None:
        scores = [0] * len(answers)
    numbers = isinstance(scores, list) and all(  # (an int of any size; NaN, inf and JSON's true are no score)
        (isinstance(s, int) and not isinstance(s, bool)) or (isinstance(s, float) and math.isfinite(s))
        for s in scores)
    if not numbers or len(scores) != len(answers):  # (NaN: max() would keep whichever came first)
        raise MinigptError(
            f"{src.name}: {src.where(i, record)} has 'answers.score' not one finite number per 'answers.text'"
        )
    candidates = [(s, -j) for j, (s, a) in enumerate(zip(scores, answers)) if a.strip()]
    return answers[-max(candidates)[1]]
