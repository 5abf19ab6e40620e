"""What the three CLIs share: argument types that reject bad values, flags built from config
dataclasses (each defined once), and the error boundary."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

from .errors import MinigptError


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI's `main`: a MinigptError becomes one line on stderr and exit 2; Ctrl-C exits 130."""
    try:
        code = main(argv)
    except MinigptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _number(kind: type, test: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or not test(value):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
unit_interval = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed = _number(int, lambda v: 0 <= v < 2**63, "a seed in [0, 2**63)")  # torch's generator range


# --- flags defined once, on the config dataclass they fill ------------------------------------


def flag(help: str, parse: Callable[[str], Any] | None = None, metavar: str | None = None) -> dict:
    """A dataclass field's metadata making it a command-line flag: `--field-name`, parsed with
    `parse` (None: a boolean switch), its default the field's. Use as `field(metadata=flag(...))`."""
    return {"flag": (help, parse, metavar)}


def add_config_flags(group: argparse._ActionsContainer, config_class: type) -> None:
    """Add one flag per field of `config_class` that carries `flag` metadata, in field order."""
    for f in dataclasses.fields(config_class):
        if "flag" not in f.metadata:
            continue
        help, parse, metavar = f.metadata["flag"]
        name = "--" + f.name.replace("_", "-")
        if parse is None:
            group.add_argument(name, dest=f.name, action="store_true", help=help)
        else:
            group.add_argument(name, dest=f.name, type=parse, default=f.default, metavar=metavar,
                               help=f"{help} (default: {f.default})")


def config_from_flags(config_class: type, args: argparse.Namespace, **more: Any) -> Any:
    """`config_class` filled from the parsed flags `add_config_flags` added (plus `more`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if "flag" in f.metadata}
    return config_class(**values, **more)
