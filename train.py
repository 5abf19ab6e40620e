#!/usr/bin/env python
"""Fine-tune a GPT-2 model on ELI5 answers (or train a small one from scratch).

The defaults are the published recipe: distilgpt2, ELI5-Category answers, 128-token blocks, batch 8,
AdamW (lr 2e-5, weight decay 0.01), linear decay, gradient clipping at 1.0, 3 epochs, seed 42:

  python train.py --device cuda                        # the recipe, into checkpoints/eli5/
  python train.py --preset tiny                        # a small model on a bundled sample, ~10 s on a CPU
  python train.py --data eli5-category-train.json.gz --max-records 5000   # the recipe from a local file
  python train.py --resume                             # continue the run in --out where it stopped
  python train.py --eval-only --init checkpoints/eli5  # validation loss and perplexity; writes nothing
  torchrun --nproc_per_node=4 train.py --device cuda   # data-parallel on 4 GPUs (see README)

The output folder is a checkpoint that sample.py and convert_hf_weights.py --to-hf read as it is, with
a model card (README.md), metrics.jsonl and loss.png (with matplotlib) beside it. One run at a time
per folder; Ctrl-C saves a checkpoint and stops. --seed makes a run repeat exactly.
"""

from __future__ import annotations

from typing import Sequence

from minigpt.cli import run, under_torchrun
from minigpt.train_flags import TrainFlags, parse_train_flags


def parse_args(argv: Sequence[str] | None) -> TrainFlags:
    """The command line as TrainFlags (minigpt/train_flags.py defines each flag once)."""
    return parse_train_flags(argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from minigpt.training_run import eval_only, run_training  # (torch and the rest after parsing: --help is quick)

    return eval_only(args) if args.eval_only else run_training(args)


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a scheduler) stops a run as Ctrl-C does (once training, by saving); under
    # torchrun it stays fatal: a rank waiting in C code (a barrier) would never run a Python handler.
    run(main, sigterm_interrupts=not under_torchrun())
