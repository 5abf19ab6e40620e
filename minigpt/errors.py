"""The one exception type for mistakes a user can fix.

Library code raises `MinigptError` with a one-line message that names the file, argument or tensor
at fault (an argument as the function spells it, `device='cuda'`, or as a CLI's flag, `--device
cuda`, where the CLI passes its name: `named`). The CLIs catch it, print the message and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator


class MinigptError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported setting."""

    every_rank = False  # met alike by every process of a torchrun job (see `alike_on_every_rank`)


@contextlib.contextmanager
def alike_on_every_rank() -> Iterator[None]:
    """Mark the MinigptErrors raised inside as ones every process of a torchrun job meets alike: the
    same flags, environment and files give each the same error (a device that is missing, an --out
    that is a file). The CLIs then print such an error once a machine (from local rank 0), not once
    a rank; an error of one rank's own (its GPU, a lost connection) is printed by that rank."""
    try:
        yield
    except MinigptError as e:
        e.every_rank = True
        raise


def named(what: str, value: object) -> str:
    """How an error names an argument given `value`: as the CLI spells it where `what` is a flag
    (`--device cuda`), else as Python does (`device='cuda'`): one function serves both callers."""
    return f"{what} {value}" if what.startswith("--") else f"{what}={value!r}"


def integer_at_least(value: object, least: int, name: str) -> int:
    """`value` as an int, if it is an integer (Python's, NumPy's or a 0-d tensor's; not a bool, not a
    float) >= `least`; else a one-line MinigptError naming `name`."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < least:
        raise MinigptError(f"{name} must be an integer >= {least}, got {value!r}")
    return number


def reason(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): wrapped libraries
    raise multi-line errors, and a user error must stay one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def count(n: int, noun: str) -> str:
    """`n` and `noun` as a message says them: "1 record", "0 records", "2,048 records"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
