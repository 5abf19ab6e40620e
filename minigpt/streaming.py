"""Continue a prompt and write the text as it is decoded: what `sample.py` does for each prompt.

One sample streams token by token, whole UTF-8 characters at a time (`sampling.TextStream`);
several samples are decoded as one batch and written when all are done. Optionally each token is
coloured by its probability (for a terminal) and every token's numbers are written as JSON lines
(`minigpt.trace`); both read the sampler's own logits, and neither costs anything when off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TextIO

import torch

from .checkpoint import WEIGHTS_FILE
from .errors import MinigptError
from .files import LINE_BREAKS, atomic_file
from .model import GPT
from .sampling import TextStream, generate, next_token
from .sampling_config import SamplingConfig
from .tokenizer import Tokenizer, lone_surrogate
from .trace import TOP_ALTERNATIVES, StepRecorder, colour, write_rows

if TYPE_CHECKING:  # (a speed module: the plain decoding loop does not load it)
    from .compiled_decoding import CompiledDecoding


@dataclass
class Completion:
    """What `complete` produced, and how fast.

    texts: each sample's continuation (without the prompt); prompt_tokens: the tokens the model read
    (at most its context window); new_tokens: over all samples, each one's <|endoftext|> included;
    time_to_first_token: seconds until the prefill's token; decode_rate: new tokens per second
    after that first step, all samples together (0.0 when only one step ran).
    """

    texts: list[str]
    prompt_tokens: int
    new_tokens: int
    time_to_first_token: float
    decode_rate: float


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    config: SamplingConfig,
    *,
    shown: str | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    out: TextIO | None = None,
    coloured: bool = False,
    trace: TextIO | None = None,
    top_alternatives: int = TOP_ALTERNATIVES,
    prompt_index: int = 0,
    compiled: CompiledDecoding | None = None,
) -> Completion:
    """Continue `prompt` `num_samples` times, writing `shown` (default: the prompt) and then each
    continuation to `out` (default: stdout), followed by a newline.

    The samples stop at the tokenizer's <|endoftext|> (`tokenizer.eos_id`). A prompt longer than the
    context window keeps its last tokens, with a warning on stderr.
    coloured: wrap each token's text in the ANSI colour of its probability (`trace.PROB_BANDS`).
    trace: write one JSON line per generated token and sample: {"prompt": prompt_index, "sample",
        "step", **StepProbs.row} with `top_alternatives` alternatives.
    compiled: decode through `model`'s compiled step (`minigpt.compiled_decoding`).
    """
    out = sys.stdout if out is None else out
    shown = prompt if shown is None else shown
    ids = tokenizer.encode(prompt)
    window = model.config.block_size
    if len(ids) > window:
        print(
            f"warning: the prompt is {len(ids)} tokens, longer than the model's {window}-token "
            f"context window; only its last {window} tokens are used",
            file=sys.stderr,
        )
    recorder = StepRecorder(top_alternatives) if coloured or trace is not None else None
    start = time.perf_counter()
    first = last = start
    # (generate allocates its buffers at once: an output too large for memory stops before anything is written)
    steps = generate(model, ids, config, num_samples, generator, pick=recorder or next_token,
                     eos_id=tokenizer.eos_id, compiled=compiled)
    streams = [TextStream(tokenizer) for _ in range(num_samples)]
    texts = [""] * num_samples  # the continuations, plain
    written = [shown] * num_samples  # what is written, coloured when asked
    counts = [0] * num_samples  # new tokens per sample, its EOS included
    finished = [False] * num_samples
    live = num_samples == 1
    if live:
        out.write(shown)
        out.flush()

    for step, new in enumerate(steps):
        last = time.perf_counter()
        if first == start:
            first = last  # the first token ends the prefill
        for row, token in enumerate(new.tolist()):
            if finished[row]:
                continue
            counts[row] += 1
            finished[row] = token == tokenizer.eos_id
            numbers = recorder.last.row(row, tokenizer) if recorder else None
            if trace is not None:
                write_rows(trace, [{"step": step, **numbers}], prompt=prompt_index, sample=row)
            piece = "" if finished[row] else streams[row].push(token)
            texts[row] += piece
            if coloured and piece:
                piece = colour(piece, numbers["prob"])
            written[row] += piece
            if live and piece:
                out.write(piece)
                out.flush()
        if trace is not None:
            trace.flush()
    tails = [stream.flush() for stream in streams]  # a character cut off by the last token
    if live:
        out.write(tails[0] + "\n")
    else:
        out.write("\n".join(text + tail + "\n" for text, tail in zip(written, tails)))
    out.flush()

    decoded = sum(counts) - num_samples  # the first token of each sample ends the prefill
    return Completion(
        texts=[text + tail for text, tail in zip(texts, tails)],
        prompt_tokens=min(len(ids), window) or 1,
        new_tokens=sum(counts),
        time_to_first_token=first - start,
        decode_rate=decoded / (last - first) if last > first else 0.0,
    )


def questions(ask: str = "question> ") -> Iterator[str]:
    """Questions typed on stdin, each asked for with `ask` on stderr, until Ctrl-D (end of input);
    a blank line asks again. A line ends at \\n, \\r\\n or \\r, as a prompt file's (`sample.py -`). A
    line that is not UTF-8 names its first bad byte: typed at a terminal, in an error line, and the
    question is asked again; piped in, in a MinigptError (as a prompt file's)."""
    line = 0
    while True:
        sys.stderr.write(ask)
        sys.stderr.flush()
        typed = _read_line()
        line += 1
        if line == 1:  # (a file piped in may start with a byte-order mark: not part of the question)
            typed = typed.removeprefix("\ufeff")
        if not typed:
            sys.stderr.write("\n")
            return
        bad = lone_surrogate(typed)
        if bad is not None:
            byte = len(typed[:bad].encode("utf-8", "surrogateescape"))
            message = f"stdin: line {line} is not UTF-8 text (byte {byte})"
            if not sys.stdin.isatty():
                raise MinigptError(message)
            sys.stderr.write(f"error: {message}; ask again\n")
            continue
        yield from (question for question in LINE_BREAKS.split(typed) if question.strip())


def _read_line() -> str:
    """One line of stdin, its bytes that are not UTF-8 decoded to lone surrogates whatever the locale:
    stdin's own decoding is strict under a UTF-8 locale, and would raise on them."""
    buffer = getattr(sys.stdin, "buffer", None)  # (None: a text stream, as tests give)
    return buffer.readline().decode("utf-8", "surrogateescape") if buffer is not None else sys.stdin.readline()


def check_trace_path(path: str | None, reads: Sequence[str | None] = ()) -> None:
    """Refuse, before any work, a trace file that could not be written ("-" is stderr), or one that
    would replace what is not ours to replace.

    `reads`: the local files and folders the run reads (its prompt file, its model's folder). The
    trace may be none of them, nor lie inside one, nor sit in any model's folder (one that holds
    model.safetensors, as a training run's does): it would replace the weights, the prompts or a
    run's metrics, or leave a file there that `train.py --resume` refuses as foreign."""
    if path is None or path == "-":
        return
    if not path:
        raise MinigptError("--trace: empty path (give a file name, or - for stderr)")
    target = Path(path)
    if target.is_dir():
        raise MinigptError(f"--trace {path}: is a folder, not a file")
    if not target.parent.is_dir():
        raise MinigptError(f"--trace {path}: folder {target.parent} does not exist")
    written = Path(os.path.realpath(target))  # (through a symlink: the file written is the one it names)
    for read in reads:
        if read is not None and read != "-" and os.path.exists(read):
            source = Path(os.path.realpath(read))
            if written == source or source in written.parents:
                raise MinigptError(f"--trace {path}: would write over {read}, which this run reads; choose another file")
    if (written.parent / WEIGHTS_FILE).exists():
        raise MinigptError(f"--trace {path}: {target.parent} holds a model ({WEIGHTS_FILE}); write the trace "
                           "elsewhere, not among a model's or a training run's files")


@contextlib.contextmanager
def trace_output(path: str | None) -> Iterator[TextIO | None]:
    """The stream to write trace lines to: None for no trace, stderr for "-", else a temporary file
    beside `path` (`files.atomic_file`) that replaces it when the block ends, also on Ctrl-C, keeping
    the lines written so far; on an error the temporary file is removed and an earlier file at
    `path` stays as it was. A `path` that exists and is not a plain file (a device such as
    /dev/null or /dev/stderr, a pipe, a symlink) is written through instead: a rename would put a
    file in the place of the device or the link."""
    if path is None or path == "-":
        yield None if path is None else sys.stderr
        return
    check_trace_path(path)
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        with _open_trace(target, "w", path) as f:
            yield _TraceFile(f, path)
        return
    interrupted: BaseException | None = None
    with atomic_file(path) as temporary, _open_trace(temporary, "x", path) as f:
        try:
            yield _TraceFile(f, path)
        except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, SIGTERM or stdout's error (a reader gone, `| head`;
            interrupted = e  # a full disk: the trace's own are MinigptErrors): the file keeps what was written
    if interrupted is not None:
        raise interrupted


class _TraceFile:
    """The trace's file, its write errors named as the trace's: stdout's, raised in the same block,
    were reported as the trace's ("saving failed ... Broken pipe": exit 2, not `| head`'s quiet 141)."""

    def __init__(self, file: TextIO, path: str) -> None:
        self.file, self.path = file, path

    def write(self, text: str) -> int:
        return self._named(self.file.write, text)

    def writelines(self, lines: Iterable[str]) -> None:
        self._named(self.file.writelines, lines)

    def flush(self) -> None:
        self._named(self.file.flush)

    def _named(self, call: Callable, *args: object):
        try:
            return call(*args)
        except OSError as e:
            raise MinigptError(f"--trace {self.path}: writing it failed ({e.strerror or e})") from None


def _open_trace(file: Path, mode: str, path: str) -> TextIO:
    try:
        return open(file, mode, encoding="utf-8")
    except OSError as e:
        raise MinigptError(f"--trace {path}: cannot write there ({e.strerror or e})") from None
