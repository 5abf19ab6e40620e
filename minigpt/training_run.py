"""train.py's run, assembled from its flags: the model (new, `--init` or the checkpoint to resume),
the data, AdamW with its schedule and the `Trainer`, wired together; and `--eval-only`.

The pieces know nothing of each other (the trainer no GPT-2, the model no training); this module is
where the recipe puts them together, so `train.py` itself only parses flags and calls `run_training`
or `eval_only` (after parsing: `--help` and flag errors never wait for torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import random
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from .card import LICENSE, card_license, render_card
from .checkpoint import model_from_state, model_state_for_saving, write_checkpoint_files
from .cli import sigterm_as_interrupt
from .config import GPTConfig
from .data import BatchIterator, TokenBlocks, load_blocks, load_validation_blocks
from .ddp import Ranks, launched_rank, torchrun_process_group
from .errors import MinigptError, alike_on_every_rank, count
from .files import scratch_folder
from .loading import load_model, load_tokenizer, resolve_model
from .metrics import evaluate, perplexity
from .model import GPT
from .optim import AdamW, linear_schedule, param_groups
from .run_folder import CARD_FILE, RunLock, check_out_folder, check_same_run, current_checkpoint, saved_run_settings
from .runtime import CLI_NAMES, check_fits, dtype_name, emulated_bf16_warning, setup_device
from .tokenizer import Tokenizer
from .train_flags import ADAM_BETAS, ADAM_EPS, RECIPE_MODEL, TrainFlags
from .trainer import Trainer
from .training_speed import prepare_for_training


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from, at its start: Python's `random`, NumPy's global
    generator, and torch's on the CPU and on every CUDA device (initialisation, dropout masks). The
    data split and the batch order draw from generators of their own, made from the same seed
    (`minigpt.data`), so with one seed the whole run is one deterministic function of its inputs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def build_model(args: TrainFlags, resume_from: Path | None,
                device: str = "cpu") -> tuple[GPT, Tokenizer, Path | None]:
    """(model on the CPU in fp32, tokenizer, the folder it came from): from the checkpoint to resume,
    `--init` (a Hub id's download), or new (folder None; its training must fit in `device`'s memory:
    a one-line error, not the allocator's traceback)."""
    if resume_from is not None:
        return *load_model(resume_from), resume_from
    if args.init == "scratch":
        # --preset tiny learns its own vocabulary, unless --tokenizer is given (a flag given still applies)
        if args.preset == "tiny" and args.tokenizer is None:
            tokenizer = args.preset_tokenizer()
        else:
            try:
                tokenizer = load_tokenizer(args.tokenizer_source())
            except MinigptError as e:  # (name the flag: there are several paths, and the default was never typed)
                raise MinigptError(f"--tokenizer{'' if args.tokenizer is not None else ', by default'} {e}") from None
        given = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "dropout": args.dropout}
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size,  # the rest: GPTConfig's
                           **{k: v for k, v in given.items() if v is not None})
        n = config.num_parameters()  # (weights, gradients and AdamW's two moments: 16 bytes each, in fp32)
        check_fits(16 * n, torch.device(device), f"--n-layer {config.n_layer} --n-embd {config.n_embd} --block-size "
                   f"{config.block_size}", "the new model with its gradients and AdamW's moments", f"{n:,} parameters")
        return GPT(config), tokenizer, None  # initialised from torch's generator, seeded by main
    model, tokenizer, folder = load_init(args)
    if args.dropout is not None and args.dropout != model.config.dropout:
        config = dataclasses.replace(model.config, dropout=args.dropout)
        model = model_from_state(config, model_state_for_saving(model))
    return model, tokenizer, folder


def load_init(args: TrainFlags) -> tuple[GPT, Tokenizer, Path]:
    """(model, tokenizer, its folder) of --init, which must see --block-size tokens."""
    try:
        folder, _ = resolve_model(args.init)  # (once: a Hub id is asked about once)
        model, tokenizer = load_model(folder)
    except MinigptError as e:  # (name the flag: there are several paths, and the default may never have been typed)
        recipe = args.init == RECIPE_MODEL  # (then say how to train offline, as sample.py does)
        hint = " Offline, `python train.py --preset tiny` trains a small model on a bundled sample." if recipe else ""
        default = recipe and "init" not in args.given  # (TrainFlags made in Python: given is empty)
        raise MinigptError(f"--init{', by default' if default else ''} {e}{hint}") from None
    if args.block_size > model.config.block_size:
        raise MinigptError(f"--block-size {args.block_size}: {args.init} sees at most {model.config.block_size} tokens")
    return model, tokenizer, folder


def eval_only(args: TrainFlags) -> int:
    """--eval-only: the validation loss of --init on the validation blocks training would use. A
    SIGTERM (`timeout`, `kill`) stops it as Ctrl-C does, so its temporary blocks are removed."""
    with sigterm_as_interrupt(True):  # (training has its own handler, which saves; this writes nothing)
        return _eval_only(args)


def _eval_only(args: TrainFlags) -> int:
    with alike_on_every_rank():  # (under torchrun: one line for the job, not one a rank)
        device, dtype = setup_device(args.device, args.dtype, CLI_NAMES)
    # (evaluation in emulated bf16 is as slow as training: the same one-line warning)
    if (warning := emulated_bf16_warning(device, dtype)) and launched_rank() == 0:
        print(warning, file=sys.stderr, flush=True)
    seed_everything(args.seed)
    with torchrun_process_group(device) as (ranks, device):
        with alike_on_every_rank():  # (the same files, data and loss on every rank: a refusal is one line a job)
            model, tokenizer, _ = load_init(args)
            with scratch_folder("minigpt-eval-") as cache:  # write nothing, not even a cache
                # with --val-data only that file is read: the training data (the Hub's, by default) is not needed
                val_blocks = load_validation_blocks(args.data_config(cache_dir=cache), tokenizer,
                                                    progress=ranks.is_main and not args.no_progress)
                val_blocks = TokenBlocks(np.array(val_blocks.blocks), val_blocks.manifest)  # out of the cache
            if len(val_blocks) == 0:
                raise MinigptError("--eval-only: no validation data (give --val-data, or a --val-fraction above 0)")
            batches = BatchIterator(val_blocks, args.batch_size * ranks.world_size, shuffle=False,
                                    rank=ranks.rank, world_size=ranks.world_size)
            autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            loss = evaluate(model.to(device), lm_loss, batches, device, autocast, ranks)
            if not math.isfinite(loss):  # (a number, not a loss: every rank holds the same one and stops)
                overflow = " or overflow in fp16" if dtype == torch.float16 else ""
                raise MinigptError(f"--eval-only: the validation loss of {args.init} is {loss}: its weights hold "
                                   f"NaN or inf{overflow}")
        if ranks.is_main:
            print(f"{args.init}: {count(len(val_blocks), 'validation block')} of {args.block_size} tokens "
                  f"({val_blocks.num_tokens:,} tokens, each scored but the first of its block)")
            print(f"validation loss {loss:.6f} (perplexity {perplexity(loss):.4f})")
    return 0


def run_training(args: TrainFlags) -> int:
    """train.py's run: check --out, lock it, join the process group (under torchrun), then `train`.
    Returns the exit code (0); a user error is a MinigptError, which the CLI prints in one line."""
    with alike_on_every_rank():  # (under torchrun: one line for the job, not one a rank)
        device, dtype = setup_device(args.device, args.dtype, CLI_NAMES)
        check_out_folder(args.out, args.resume, locked=False)  # refuse a wrong --out before locking (making) it
    precision = dtype_name(dtype)
    # One run per folder: rank 0 holds the lock for the run's life (a second run is refused here) and
    # checks --out under it; the other ranks take its verdict once it has joined them.
    main_rank = launched_rank() == 0
    with RunLock(args.out) if main_rank else contextlib.nullcontext():
        resume_from = check_out_folder(args.out, args.resume) if main_rank else None
        seed_everything(args.seed)  # every path: initialisation, dropout (a resume restores its RNG states)
        with torchrun_process_group(device) as (ranks, device):
            if ranks.in_process_group:
                torch.distributed.barrier()  # (rank 0 is here only once it holds the lock and --out is right)
            if not main_rank and args.resume:
                resume_from = current_checkpoint(args.out)
            return train(args, device, dtype, precision, ranks, resume_from)


def train(args: TrainFlags, device: torch.device, dtype: torch.dtype, precision: str, ranks: Ranks,
          resume_from: Path | None) -> int:
    """The training run itself, once --out is locked and the process group joined."""
    say = print if ranks.is_main else (lambda *a, **k: None)
    with alike_on_every_rank():  # (every rank reads the same flags and files)
        if resume_from is not None:  # the settings the data does not decide, before any is read (the Hub's, by default)
            settings = args.run_config(ranks.world_size, precision, max_steps=args.max_steps)  # (--epochs: None)
            saved = saved_run_settings(resume_from)
            check_same_run(args.out, {k: v for k, v in saved.items() if k in settings}, settings)
        model, tokenizer, source = build_model(args, resume_from, device)
    model = prepare_for_training(model.to(device).train())
    if ranks.world_size > 1:  # each rank draws its own dropout masks (one seed would repeat rank 0's)
        torch.manual_seed(args.seed + ranks.rank)

    if not ranks.is_main:  # rank 0 builds the token cache; the others then read it
        try:
            torch.distributed.barrier()
        except RuntimeError:  # rank 0 left the job: its own line says why
            raise MinigptError(f"rank {ranks.rank}: rank 0 stopped while preparing the data") from None
    train_blocks, val_blocks = load_blocks(args.data_config(), tokenizer, progress=ranks.is_main and not args.no_progress)
    if ranks.is_main and ranks.in_process_group:
        torch.distributed.barrier()
    global_micro = args.batch_size * ranks.world_size
    shard = dict(rank=ranks.rank, world_size=ranks.world_size)
    train_batches = BatchIterator(train_blocks, global_micro, seed=args.seed, **shard)
    val_batches = BatchIterator(val_blocks, global_micro, shuffle=False, **shard) if len(val_blocks) else None
    steps_per_epoch = math.ceil(len(train_batches) / args.grad_accum)
    max_steps = args.max_steps or args.epochs * steps_per_epoch

    optimizer = AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    facts = args.card_facts(model, train_blocks, val_blocks, ranks.world_size, precision, max_steps,
                            stated_license(source))
    def schedule(step: int) -> float:
        return linear_schedule(step, max_steps, args.warmup_steps)

    trainer = Trainer(
        model=model, loss_fn=lm_loss, optimizer=optimizer, schedule=schedule,
        train_batches=train_batches, val_batches=val_batches, config=args.train_config(max_steps, dtype), out=args.out,
        save_model=lambda folder: write_checkpoint_files(folder, model, tokenizer),
        device=device, ranks=ranks, run_config=args.run_config(ranks.world_size, precision, max_steps),
        card=lambda rows, step: render_card(facts, rows, step),
    )
    if resume_from is not None:
        with alike_on_every_rank():  # (the same checkpoint and data on every rank: a refusal is one line a job)
            trainer.resume(resume_from)

    c = model.config
    source = f"resumed from {args.out} at step {trainer.step}" if resume_from else (
        "new (random init)" if args.init == "scratch" else f"from {args.init}")
    epochs = max_steps / steps_per_epoch if args.max_steps else args.epochs
    epochs = f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
    say(f"model: {model.num_parameters():,} parameters ({c.n_layer} layers, {c.n_head} heads, "
        f"{c.n_embd} wide, vocabulary {c.vocab_size:,}), {source}")
    say(f"data: {len(train_blocks):,} training and {count(len(val_blocks), 'validation block')} "
        f"of {args.block_size} tokens")
    examples = min(global_micro * args.grad_accum, len(train_blocks))  # (a batch beyond the data: all of it)
    whole = " (the whole training set)" if examples < global_micro * args.grad_accum else ""
    say(f"batch: {args.batch_size} x {args.block_size} tokens x {args.grad_accum} accumulation x "
        f"{ranks.world_size} process(es) = {examples} examples{whole}, {examples * args.block_size:,} tokens per step")
    say(f"schedule: {count(steps_per_epoch, 'step')} per epoch, {count(max_steps, 'step')} ({epochs}); lr {args.lr:g}, "
        f"{args.warmup_steps} warm-up steps, then linear decay to 0")
    if args.warmup_steps >= max_steps:  # (the schedule is HF's: it only warms up, and never reaches --lr)
        say(f"warning: --warmup-steps {args.warmup_steps} is not fewer than the run's {count(max_steps, 'step')}: the "
            f"learning rate only rises, to {args.lr * schedule(max_steps - 1):.3g} at the last step, never to --lr "
            f"{args.lr:g}", file=sys.stderr)
    say(f"device: {device}, precision {precision}{' (autocast)' if dtype != torch.float32 else ''}"
        f"{', compiled' if args.compile else ''}; seed {args.seed}")
    say(f"out: {args.out}", flush=True)
    if warning := emulated_bf16_warning(device, dtype):
        say(warning, file=sys.stderr, flush=True)
    if args.compile_mode == "reduce-overhead" and device.type != "cuda":  # (torch.compile itself says nothing)
        say(f"note: --compile-mode reduce-overhead replays CUDA graphs, which only a GPU has: on {device.type} it "
            "brings nothing over the default mode", file=sys.stderr, flush=True)
    if importlib.util.find_spec("matplotlib") is None:  # (the curve's numbers are in metrics.jsonl either way)
        say('note: loss.png is not drawn: matplotlib is not installed (pip install -e ".[plot]")', file=sys.stderr,
            flush=True)

    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trainer saved the step it stopped at (unless a second one came)
        if trainer.last_save_step == trainer.step:
            say(f"stopped at step {trainer.step}: checkpoint saved in {args.out}; to continue, run the same "
                "command with --resume", file=sys.stderr, flush=True)
        raise
    val = result.get("val_loss")
    summary = f"done: step {result['step']}" + (f", validation loss {val:.4f} (perplexity {perplexity(val):.1f})" if val is not None else "")
    say(f"{summary}\nsample from it: python sample.py --model {shlex.quote(str(args.out))}")
    return 0


def stated_license(source: Path | None) -> dict[str, str]:
    """The licence a run's card states, given the folder its model came from (`build_model`): on a
    resume, the one the run's card stated; from --init, the one that model's own card states ({}
    where it states none: a fine-tune of gpt2, MIT, is not labelled Apache-2.0); minigpt's for a
    model trained from scratch (no folder)."""
    return {"license": LICENSE} if source is None else card_license(source / CARD_FILE)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch of blocks (the model shifts the targets itself)."""
    return model(batch, targets=batch)[1]
