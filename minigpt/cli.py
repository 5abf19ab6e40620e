"""What the three CLIs share: argument types that reject bad values, the error boundary, and flags
defined once, as dataclass fields from which argparse is built."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from dataclasses import Field, field, fields
from typing import Any, Callable, Iterator, NoReturn, Sequence

from .errors import MinigptError, reason


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
        sigterm_interrupts: bool = False) -> None:
    """Run a CLI's `main`: a MinigptError becomes one line on stderr and exit 2; Ctrl-C exits 130, and
    with `sigterm_interrupts` so does SIGTERM (`kill`, `timeout`), raised as a KeyboardInterrupt, so
    that a save it interrupts removes its temporary files as after Ctrl-C (killed outright, a
    conversion left a model-sized temporary folder; training has its own handler, which saves, and
    a rank waiting in C code, in a rendezvous, must not outlive torchrun's SIGTERM);
    a reader that closed our stdout (`... | head`) ends the run quietly, as it does `cat`'s (141);
    stdout that cannot be written (a full disk), and a MemoryError, are one line and exit 2. Python warnings (minigpt's,
    torch's) are one `warning: ...` line each, as the CLIs' own warnings are. A character that the
    terminal's encoding cannot show (PYTHONIOENCODING=latin-1, a model's Japanese) prints on stdout
    as "?", not as a UnicodeEncodeError (stderr writes it as `\\u65e5`, as Python sets it up). A stdin or
    stdout closed before the start (`<&-`, `>&-`) is one line where it is used (`ClosedStream`)."""
    for name in ("stdin", "stdout"):
        if getattr(sys, name) is None:  # (what Python leaves for a closed descriptor)
            setattr(sys, name, ClosedStream(name))
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        with one_line_warnings(), sigterm_as_interrupt(sigterm_interrupts):
            code = main(argv)
        sys.stdout.flush()  # (here a full disk behind stdout is reported, not in a warning at exit)
    except MinigptError as e:
        if not (e.every_rank and _other_rank("LOCAL_RANK")):  # (one line a machine, not one a rank)
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if not _other_rank():  # (torchrun signals every rank: one line for the job)
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # Python flushes stdout once more at exit, which would fail again and print a warning:
        # point the descriptor at /dev/null first.
        _drop_stdout()
        sys.exit(141)  # 128 + SIGPIPE, what the shell reports for a program that SIGPIPE ended
    except MemoryError:  # (a huge input: a .json.gz many times its size, a record of gigabytes; under ulimit -v)
        print("error: out of memory: what this run reads or makes does not fit in this machine's memory",
              file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # one no library call turned into a MinigptError: most often stdout's (a full disk)
        what = e.filename if e.filename is not None else "writing the output"
        print(f"error: {what}: {e.strerror or reason(e)}", file=sys.stderr)
        _drop_stdout()
        sys.exit(2)
    sys.exit(code or 0)


class ClosedStream:
    """Stands for a standard stream that was closed when the process started (`sample.py - <&-`, `>&-`):
    Python leaves sys.stdin or sys.stdout None there, and the first use was an AttributeError traceback.
    Reading or writing is a one-line MinigptError instead; nothing written means nothing to flush."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _refuse(self, *args: Any) -> Any:
        stdin = self.name == "stdin"
        raise MinigptError(f"{self.name} is closed (`{'<&-' if stdin else '>&-'}` in the shell): nothing can be "
                           f"{'read from' if stdin else 'written to'} it")

    read = readline = write = fileno = _refuse
    buffer = property(_refuse)

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def sigterm_as_interrupt(enabled: bool) -> Iterator[None]:
    """While inside, if `enabled`, SIGTERM raises KeyboardInterrupt (where nothing else handles it,
    in the main thread)."""
    in_main = threading.current_thread() is threading.main_thread()
    if not (enabled and in_main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """While inside, Python warnings print as `warning: <message>`: Python's own format starts with
    the source file and line that called `warnings.warn` and repeats that line of code, which tell
    the user of a CLI nothing. Only the format changes: which warnings show (each once per place, by
    default) is still up to the warning filters, and pytest still records them."""
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def _one_line_warning(message: Warning, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """`warnings.formatwarning` for a CLI: the message's first line (torch's warnings can run to
    several), and the category where it is not the plain UserWarning (a FutureWarning, say). The
    file, line number and code line are left out."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning: {reason(message)}{kind}\n"


def under_torchrun() -> bool:
    """Whether torchrun started this process: RANK and WORLD_SIZE both set (what minigpt.ddp reads as
    a job; this, without importing torch)."""
    return all(os.environ.get(name, "").strip() for name in ("RANK", "WORLD_SIZE"))


def _other_rank(variable: str = "RANK") -> bool:
    """Whether torchrun started this process as a rank (`LOCAL_RANK`: a rank on its machine) other
    than 0, which stays quiet where every rank would print the same line. A job is RANK and
    WORLD_SIZE both set, as `minigpt.ddp.launched_ranks` reads them: one of them or LOCAL_RANK alone,
    set by hand, is no job (a plain run, or one line saying what is missing), and its errors are
    said. (RANK itself is checked by minigpt.ddp, which imports torch, too slow for a usage error;
    one that is no integer counts here as rank 0, so that its error is seen.)"""
    if not under_torchrun():
        return False
    try:
        return int(os.environ.get(variable, "0")) != 0
    except ValueError:
        return False


def _drop_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so that Python's last flush at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line (and exit 2), like every other error: the
    full usage text would bury the one line that says what was wrong. `dash_hint`: what to add when
    an argument that starts with "-" was taken for a flag (a positional text such as a prompt)."""

    dash_hint: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse reads "-1e-3" and "-inf" as flags ("--lr: expected one argument"): here they are
        # values (no flag looks like a number), refused by the flag's own check, which says why.
        self._negative_number_matcher = re.compile(r"^-((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|inf(inity)?|nan)$", re.I)

    def error(self, message: str) -> NoReturn:
        if _other_rank():  # (under torchrun every rank parses the same flags: one line)
            self.exit(2)
        taken_for_a_flag = "unrecognized arguments: -" in message or "ignored explicit argument" in message
        hint = f"; {self.dash_hint}" if self.dash_hint and taken_for_a_flag else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")

    def given(self, argv: Sequence[str] | None) -> set[str]:
        """The destinations (`top_k` for --top-k) of the arguments present on the command line,
        whatever their values, a flag repeated at its default value included: `argv` parsed again
        with every default suppressed, so that only what was given lands in the namespace. (Comparing
        values with defaults cannot tell `--seed 42` from no --seed; scanning `argv` for "--flag"
        would miss the abbreviations argparse accepts, "--num 3" for --num-samples.)"""
        actions, defaults = [(a, a.default) for a in self._actions], self._defaults
        self._defaults = {}
        try:
            for action, _ in actions:
                action.default = argparse.SUPPRESS
            namespace, _ = self.parse_known_args(argv)
        finally:
            self._defaults = defaults
            for action, default in actions:
                action.default = default
        return set(vars(namespace))

    def refuse(self, given: set[str], dests: Sequence[str], why: str) -> None:
        """A usage error for the first of `dests` in `given` (see `given`): a flag that would change
        nothing in the mode asked for is refused in one line saying `why`, not silently dropped."""
        for dest in dests:
            if dest in given:
                self.error(f"--{dest.replace('_', '-')} {why}")


def _number(kind: type, test: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or not test(value):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
block_length = _number(int, lambda v: v >= 2, "an integer >= 2 (a block predicts its tokens after the first)")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
unit_interval = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed = _number(int, lambda v: 0 <= v < 2**63, "a seed in [0, 2**63)")  # torch's generator range


def path_text(text: str) -> str:
    """A path flag's value; an empty one is refused: Path("") is ".", the current folder, which a
    flag left empty by a shell variable (`--out "$DIR"`) never means."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return text


# --- flags defined once --------------------------------------------------------------------------


def flag(default: Any = None, help: str = "", *, group: str = "", run: bool = False, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag: `--name-with-dashes`, with its default,
    help text, argparse group and any other `add_argument` keyword (type, metavar, choices, action).
    `run=True` marks a flag that decides a training run's numbers (a resume must repeat it)."""
    return field(default=default, metadata={"help": help, "group": group, "run": run, "argparse": argparse_kwargs})


def _add_flag(parser: argparse._ActionsContainer, f: Field) -> None:
    kwargs = dict(f.metadata["argparse"])
    if kwargs.get("action") != "store_true":
        kwargs["default"] = f.default
    shown = f.default is not None and f.default is not False  # (`0 in (None, False)`: 0 == False hid every 0)
    help_text = f.metadata["help"] + (f" (default: {f.default})" if shown else "")
    parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs)


def add_flags(parser: argparse._ActionsContainer, options: type) -> None:
    """Add to `parser` (or one of its groups) a flag for each `flag` field of the dataclass
    `options`, in field order; fields without `flag` are not flags."""
    for f in fields(options):
        if "argparse" in f.metadata:
            _add_flag(parser, f)


def from_flags(options: type, args: argparse.Namespace, **more: Any) -> Any:
    """The dataclass `options` filled from parsed flags that `add_flags` added, plus `more`."""
    return options(**{f.name: getattr(args, f.name) for f in fields(options) if "argparse" in f.metadata}, **more)


def parser_from(options: type, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per `flag` field of the dataclass `options`, in order, grouped
    by their `group`; parse into the dataclass with `from_flags(options, parser.parse_args())`."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ActionsContainer] = {"": parser}
    for f in fields(options):
        if "argparse" not in f.metadata:
            continue
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        _add_flag(groups[f.metadata["group"]], f)
    return parser


def run_flags(options: Any) -> dict[str, Any]:
    """The values of `options`' flags marked `run=True`, by flag name."""
    return {"--" + f.name.replace("_", "-"): getattr(options, f.name) for f in fields(options)
            if f.metadata.get("run")}
