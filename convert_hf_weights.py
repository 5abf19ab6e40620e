#!/usr/bin/env python
"""Convert GPT-2 weights between Hugging Face and minigpt checkpoint folders.

  HF -> minigpt:  python convert_hf_weights.py distilbert/distilgpt2 --out checkpoints/distilgpt2
  minigpt -> HF:  python convert_hf_weights.py --to-hf checkpoints/eli5 --out exported/
"""

from __future__ import annotations

import argparse
from typing import Sequence

from minigpt.cli import Parser, path_text, run
from minigpt.errors import MinigptError
from minigpt.files import check_source_outside, folder_destination


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "source", nargs="?",
        help="what to convert into a minigpt checkpoint: a Hub id (e.g. distilbert/distilgpt2, "
        "downloaded once into the Hugging Face cache), a local HF GPT-2 folder, or a minigpt checkpoint or run folder",
    )
    p.add_argument(
        "--to-hf", metavar="CHECKPOINT",
        help="export this minigpt checkpoint folder as a transformers GPT2LMHeadModel folder instead",
    )
    p.add_argument("--out", required=True, type=path_text,
                   help="output folder (written only if everything succeeds)")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds a model (a minigpt "
                   "or HF folder, or a training run's); a folder holding other files is never replaced")
    args = p.parse_args(argv)
    if (args.source is None) == (args.to_hf is None):
        p.error("give either SOURCE (HF -> minigpt) or --to-hf CHECKPOINT (minigpt -> HF)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = folder_destination(args.out)  # a file, a path under one, the current folder: refused at once
    to_hf = args.to_hf is not None  # (an empty --to-hf is still the export: load_model names the empty path)
    check_source_outside(out, args.to_hf if to_hf else args.source, "--to-hf" if to_hf else "SOURCE", "--out")
    from minigpt.loading import check_replaceable, convert_to_minigpt, export_to_hf  # heavy imports after parsing

    if out.is_dir() and not out.is_symlink():  # (a symlink is replaced itself, not what it names)
        check_replaceable(out)  # (first: --force is suggested only where it would replace the folder)
    replacing = out.is_dir() and any(out.iterdir())  # (a folder filled after this is never replaced)
    if replacing and not args.force:
        raise MinigptError(f"{args.out}: already exists and is not empty (pass --force to replace it)")

    # (overwrite: --force, and check_replaceable, decided above; never the folder of a live training run)
    if to_hf:
        export_to_hf(args.to_hf, out, overwrite=replacing)  # (a training run's model card travels with it)
        print(f"wrote a transformers GPT2LMHeadModel folder to {args.out}")
    else:
        convert_to_minigpt(args.source, out, overwrite=replacing)
        print(f"wrote a minigpt checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    run(main, sigterm_interrupts=True)
