#!/usr/bin/env python
"""Fine-tune a GPT-2 model on ELI5 answers (or train a small one from scratch).

The defaults are the published recipe: distilgpt2, ELI5-Category answers, 128-token blocks, batch 8,
AdamW (lr 2e-5, weight decay 0.01), linear decay, gradient clipping at 1.0, 3 epochs, seed 42:

  python train.py --device cuda                        # the recipe, into checkpoints/eli5/
  python train.py --preset tiny                        # a small model on a bundled sample, ~1 min on a CPU
  python train.py --data eli5-category-train.json.gz   # local data instead of the Hub
  python train.py --resume                             # continue the run in --out where it stopped
  python train.py --eval-only --init checkpoints/eli5  # validation loss and perplexity; writes nothing
  torchrun --nproc_per_node=4 train.py --device cuda   # data-parallel on 4 GPUs (see README)

The output folder is a checkpoint that sample.py and convert_hf_weights.py --to-hf read as it is, with
a model card (README.md), metrics.jsonl and loss.png (with matplotlib) beside it. One run at a time
per folder; Ctrl-C saves a checkpoint and stops. --seed makes a run repeat exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

from minigpt.cli import fraction, non_negative_float, non_negative_int, positive_float, positive_int, run
from minigpt.errors import MinigptError

RECIPE_MODEL = "distilbert/distilgpt2"
DEFAULT_OUT = "checkpoints/eli5"  # where sample.py looks first
# --preset tiny: a model small enough to train on 2 CPU cores in well under a minute, on the ELI5
# sample shipped inside the package, with a BPE vocabulary learned from that sample (no download).
TINY_PRESET = dict(
    init="scratch", n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=16, lr=2e-3,
    warmup_steps=20, epochs=12, dropout=0.0, out="checkpoints/tiny", log_every=5, save_every=50,
)
TINY_VOCAB = 2048


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny"], help="tiny: a 2-layer, 128-wide model trained from scratch "
                   "on the 50-question ELI5 sample bundled with minigpt, with a 2,048-token vocabulary learned "
                   "from it (block 64, batch 16, lr 2e-3, 20 warm-up steps, 12 epochs, out checkpoints/tiny); "
                   "flags given as well still apply")
    g = p.add_argument_group("model")
    g.add_argument("--init", default=RECIPE_MODEL, metavar="SOURCE",
                   help="start from: a Hub id, an HF or minigpt checkpoint folder, or `scratch` for a new "
                   f"model of --n-layer/--n-head/--n-embd (default: {RECIPE_MODEL})")
    g.add_argument("--n-layer", metavar="N", type=positive_int, help="(--init scratch) Transformer blocks (default: 6)")
    g.add_argument("--n-head", metavar="N", type=positive_int, help="(--init scratch) attention heads (default: 12)")
    g.add_argument("--n-embd", metavar="N", type=positive_int, help="(--init scratch) model width (default: 768)")
    g.add_argument("--tokenizer", default=RECIPE_MODEL, metavar="SOURCE",
                   help="(--init scratch) the tokenizer: a Hub id or a folder with tokenizer.json "
                   f"(default: {RECIPE_MODEL}'s GPT-2 tokenizer)")
    g.add_argument("--dropout", metavar="X", type=fraction, help="dropout probability (default: the model's own, 0.1 for distilgpt2)")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", help="training data: an ELI5 .json[.gz]/.jsonl/.parquet/.csv file, "
                   "a .txt file or a folder of .txt files (default: ELI5-Category's train split from the Hub)")
    g.add_argument("--val-data", metavar="PATH", help="validation data (default: --val-fraction of --data's records)")
    g.add_argument("--val-fraction", metavar="X", type=fraction, default=0.2, help="share of the records held out for validation (default: 0.2)")
    g.add_argument("--format", default="answers", choices=["answers", "qa"],
                   help="answers: a record's answers joined (the recipe); qa: 'Question: ...\\nAnswer: ...' (default: answers)")
    g.add_argument("--max-records", metavar="N", type=positive_int, help="use only the first N records (default: 5000 from the Hub, all of a local file)")
    g.add_argument("--block-size", metavar="N", type=positive_int, default=128, help="tokens per training example (default: 128)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=8, help="examples per micro-batch per process (default: 8)")
    g.add_argument("--grad-accum", metavar="N", type=positive_int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", metavar="X", type=positive_float, default=2e-5, help="peak learning rate (default: 2e-5)")
    g.add_argument("--weight-decay", metavar="X", type=non_negative_float, default=0.01, help="AdamW weight decay, not on biases/LayerNorm (default: 0.01)")
    g.add_argument("--warmup-steps", metavar="N", type=non_negative_int, default=0, help="linear warm-up steps before the linear decay (default: 0)")
    g.add_argument("--epochs", metavar="N", type=positive_int, default=3, help="passes over the training data (default: 3)")
    g.add_argument("--max-steps", metavar="N", type=positive_int, help="stop after N optimizer steps; overrides --epochs and sets the schedule's length")
    g.add_argument("--max-grad-norm", metavar="X", type=non_negative_float, default=1.0, help="clip the gradient norm to this; 0: no clipping (default: 1.0)")
    g.add_argument("--seed", metavar="N", type=non_negative_int, default=42, help="seeds every generator the run "
                   "draws from: initialisation, data split and order, dropout (default: 42)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto: cuda, then mps, then cpu)")
    g.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16 (CUDA only, with loss scaling) compute precision; weights "
                   "stay fp32 (default: auto: bf16 on a GPU that has it, else fp32)")
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile (slow to start, faster steps)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output folder: the checkpoint, metrics.jsonl, loss.png (default: {DEFAULT_OUT})")
    g.add_argument("--log-every", metavar="N", type=positive_int, default=10, help="write a metrics row every N steps (default: 10)")
    g.add_argument("--eval-every", metavar="N", type=non_negative_int, default=0, help="also evaluate every N steps; 0: at each epoch's end only (default: 0)")
    g.add_argument("--save-every", metavar="N", type=non_negative_int, default=0, help="checkpoint every N steps; 0: at the end only (default: 0)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (same settings)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--eval-only", action="store_true", help="only print the validation loss and perplexity of "
                   "--init on the validation data training would use (--val-data, or the --val-fraction split "
                   "of --data with --seed), at --batch-size; trains and writes nothing")

    preset, _ = p.parse_known_args(argv)
    if preset.preset == "tiny":  # the preset changes defaults; flags given explicitly still win
        from minigpt.data import tiny_preset_path

        p.set_defaults(**TINY_PRESET, data=str(tiny_preset_path()))
    args = p.parse_args(argv)
    if args.seed >= 2**63:  # torch's generators take a 64-bit seed
        p.error(f"argument --seed: {args.seed} is too large (at most {2**63 - 1})")
    scratch_flags = [f for f in ("n_layer", "n_head", "n_embd") if getattr(args, f) is not None]
    if args.init != "scratch" and scratch_flags:
        p.error(f"--{scratch_flags[0].replace('_', '-')} needs --init scratch (a loaded model keeps its shape)")
    if args.eval_only and (args.init == "scratch" or args.resume):
        p.error("--eval-only evaluates a trained model: give --init SOURCE, without --resume or --init scratch")
    return args


def run_config(args: argparse.Namespace, world_size: int, dtype_name: str, max_steps: int) -> dict[str, Any]:
    """The settings that decide the run's numbers, by flag: a resume must use the same ones."""
    def where(source: str | None) -> str | None:  # the same file however it was spelled
        return str(Path(source).resolve()) if source and Path(source).exists() else source

    return {
        "--init": where(args.init), "--n-layer": args.n_layer, "--n-head": args.n_head, "--n-embd": args.n_embd,
        "--dropout": args.dropout, "--data": where(args.data), "--val-data": where(args.val_data),
        "--val-fraction": args.val_fraction, "--format": args.format, "--max-records": args.max_records,
        "--block-size": args.block_size, "--batch-size x processes": args.batch_size * world_size,
        "--grad-accum": args.grad_accum, "--lr": args.lr, "--weight-decay": args.weight_decay,
        "--warmup-steps": args.warmup_steps, "steps (--epochs / --max-steps)": max_steps,
        "--max-grad-norm": args.max_grad_norm, "--seed": args.seed, "--dtype": dtype_name,
    }


def preset_tokenizer():
    """A TINY_VOCAB-token BPE vocabulary learned from the answers of the bundled ELI5 sample."""
    from minigpt.data import tiny_preset_path
    from minigpt.formats import answers_text
    from minigpt.tokenizer import Tokenizer

    lines = tiny_preset_path().read_text(encoding="utf-8").splitlines()
    texts = [answers_text(json.loads(line)["answers"]["text"]) for line in lines if line.strip()]
    return Tokenizer.train_bpe(texts, TINY_VOCAB)


def build_model(args: argparse.Namespace, resume_from: Path | None):
    """(model on the CPU in fp32, tokenizer): from the checkpoint to resume, `--init`, or new."""
    from minigpt.checkpoint import model_from_state, model_state_for_saving
    from minigpt.config import GPTConfig
    from minigpt.hf import load_model
    from minigpt.model import GPT
    from minigpt.tokenizer import Tokenizer

    if resume_from is not None:
        return load_model(resume_from)
    if args.init == "scratch":
        tokenizer = preset_tokenizer() if args.preset == "tiny" else Tokenizer.from_source(args.tokenizer)
        config = GPTConfig(
            vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer or 6,
            n_head=args.n_head or 12, n_embd=args.n_embd or 768,
            dropout=0.1 if args.dropout is None else args.dropout,
        )
        return GPT(config), tokenizer  # initialised from torch's generator, seeded by main
    model, tokenizer = load_model(args.init)
    if args.block_size > model.config.block_size:
        raise MinigptError(f"--block-size {args.block_size}: {args.init} sees at most {model.config.block_size} tokens")
    if args.dropout is not None and args.dropout != model.config.dropout:
        config = dataclasses.replace(model.config, dropout=args.dropout)
        model = model_from_state(config, model_state_for_saving(model))
    return model, tokenizer


def data_config(args: argparse.Namespace):
    """The data flags as a DataConfig: training and --eval-only build their blocks from the same one."""
    from minigpt.data import DataConfig

    return DataConfig(
        source=args.data, val_source=args.val_data, format=args.format, block_size=args.block_size,
        max_records=args.max_records, val_fraction=args.val_fraction, seed=args.seed,
    )


def run_facts(args, model, train_blocks, val_blocks, world_size: int, dtype_name: str, max_steps: int):
    """What the model card says about this run (minigpt.card.RunFacts)."""
    from minigpt.card import RunFacts

    c = model.config
    scratch = args.init == "scratch"
    datasets = ["rexarski/eli5_category"] if args.data is None else [Path(args.data).name]
    if args.val_data is not None:
        datasets.append(Path(args.val_data).name)
    split = (f"from --val-data {args.val_data}" if args.val_data else
             f"the --val-fraction {args.val_fraction:g} split of the records, seed {args.seed}")
    data = [f"source: {train_blocks.manifest.get('source')}, format `{args.format}`"]
    for role, blocks, how in (("training", train_blocks, ""), ("validation", val_blocks, f" ({split})")):
        m = blocks.manifest
        data.append(f"{role}: {m.get('records', 0):,} records, {m.get('tokens', 0):,} tokens, "
                    f"{len(blocks):,} blocks of {args.block_size} tokens{how}")
    accum, total = args.grad_accum, args.batch_size * args.grad_accum * world_size
    hyper = [
        ("learning_rate", f"{args.lr:g}"), ("train_batch_size", args.batch_size),
        ("eval_batch_size", args.batch_size), ("seed", args.seed), ("gradient_accumulation_steps", accum),
        ("num_processes", world_size), ("total_train_batch_size", total),
        ("optimizer", f"AdamW (minigpt.optim) with betas=(0.9,0.999) and epsilon=1e-08, weight decay "
                      f"{args.weight_decay:g} (not on biases and LayerNorm weights)"),
        ("lr_scheduler_type", "linear"), ("lr_scheduler_warmup_steps", args.warmup_steps),
        ("training_steps", max_steps) if args.max_steps else ("num_epochs", args.epochs),
        ("max_grad_norm", f"{args.max_grad_norm:g}"), ("dropout", f"{c.dropout:g}"),
        ("precision", "fp32" if dtype_name == "fp32" else f"{dtype_name} autocast, fp32 weights"),
    ]
    return RunFacts(
        name=Path(args.out).resolve().name, out=args.out, base_model=None if scratch else args.init,
        base_on_hub=not scratch and not Path(args.init).exists(), datasets=datasets,
        model=f"A GPT-2 language model of {model.num_parameters():,} parameters: {c.n_layer} layers, {c.n_head} "
              f"heads, {c.n_embd} wide, a {c.block_size}-token context, a vocabulary of {c.vocab_size:,}; "
              "trained with minigpt, a from-scratch PyTorch GPT-2.",
        data=data, hyperparameters=hyper, max_steps=max_steps,
    )


def eval_only(args: argparse.Namespace) -> int:
    """--eval-only: the validation loss of --init on the validation blocks training would use."""
    import tempfile

    import numpy as np
    import torch

    from minigpt.data import BatchIterator, TokenBlocks, load_blocks
    from minigpt.ddp import torchrun_process_group
    from minigpt.hf import load_model
    from minigpt.metrics import evaluate, perplexity
    from minigpt.runtime import setup_device
    from minigpt.trainer import seed_everything

    device, dtype = setup_device(args.device, args.dtype)
    seed_everything(args.seed)
    with torchrun_process_group(device) as (ranks, device):
        model, tokenizer = load_model(args.init)
        if args.block_size > model.config.block_size:
            raise MinigptError(f"--block-size {args.block_size}: {args.init} sees at most {model.config.block_size} tokens")
        with tempfile.TemporaryDirectory(prefix="minigpt-eval-") as cache:  # write nothing, not even a cache
            cfg = dataclasses.replace(data_config(args), cache_dir=cache)
            _, val_blocks = load_blocks(cfg, tokenizer, progress=ranks.is_main and not args.no_progress)
            val_blocks = TokenBlocks(np.array(val_blocks.blocks), val_blocks.manifest)  # out of the cache
        if len(val_blocks) == 0:
            raise MinigptError("--eval-only: no validation data (give --val-data, or a --val-fraction above 0)")
        batches = BatchIterator(val_blocks, args.batch_size * ranks.world_size, shuffle=False,
                                rank=ranks.rank, world_size=ranks.world_size)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        loss = evaluate(model.to(device), lm_loss, batches, device, autocast, ranks)
        if ranks.is_main:
            print(f"{args.init}: {len(val_blocks):,} validation blocks of {args.block_size} tokens "
                  f"({val_blocks.num_tokens:,} tokens, each scored but the first of its block)")
            print(f"validation loss {loss:.4f} (perplexity {perplexity(loss):.4f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.eval_only:
        return eval_only(args)
    import contextlib

    import torch  # heavy imports after parsing, so --help and flag errors are instant

    from minigpt.ddp import launched_rank, torchrun_process_group
    from minigpt.run_folder import RunLock, check_out_folder
    from minigpt.runtime import setup_device
    from minigpt.trainer import seed_everything

    device, dtype = setup_device(args.device, args.dtype)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    check_out_folder(args.out, args.resume)  # refuse a wrong --out before locking it
    # One run per folder: rank 0 holds the lock for the run's life (a second run is refused here).
    with RunLock(args.out) if launched_rank() == 0 else contextlib.nullcontext():
        resume_from = check_out_folder(args.out, args.resume)  # again, now that no other run can change it
        seed_everything(args.seed)  # every path: initialisation, dropout (a resume restores its RNG states)
        with torchrun_process_group(device) as (ranks, device):
            return train(args, device, dtype, dtype_name, ranks, resume_from)


def train(args, device, dtype, dtype_name: str, ranks, resume_from: Path | None) -> int:
    """The training run itself, once --out is locked and the process group joined."""
    import torch

    from minigpt.card import render_card
    from minigpt.checkpoint import write_checkpoint
    from minigpt.data import BatchIterator, load_blocks
    from minigpt.optim import AdamW, linear_schedule, param_groups
    from minigpt.trainer import Trainer, TrainConfig

    say = print if ranks.is_main else (lambda *a, **k: None)
    model, tokenizer = build_model(args, resume_from)
    model = model.to(device).train()
    if ranks.world_size > 1:  # each rank draws its own dropout masks (one seed would repeat rank 0's)
        torch.manual_seed(args.seed + ranks.rank)

    if not ranks.is_main:  # rank 0 builds the token cache; the others then read it
        torch.distributed.barrier()
    train_blocks, val_blocks = load_blocks(data_config(args), tokenizer, progress=ranks.is_main and not args.no_progress)
    if ranks.is_main and ranks.in_process_group:
        torch.distributed.barrier()
    global_micro = args.batch_size * ranks.world_size
    shard = dict(rank=ranks.rank, world_size=ranks.world_size)
    train_batches = BatchIterator(train_blocks, global_micro, seed=args.seed, **shard)
    val_batches = BatchIterator(val_blocks, global_micro, shuffle=False, **shard) if len(val_blocks) else None
    steps_per_epoch = math.ceil(len(train_batches) / args.grad_accum)
    max_steps = args.max_steps or args.epochs * steps_per_epoch

    optimizer = AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    config = TrainConfig(
        max_steps=max_steps, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, dtype=dtype,
        compile=args.compile, log_every=args.log_every, eval_every=args.eval_every,
        save_every=args.save_every, progress=not args.no_progress,
    )
    facts = run_facts(args, model, train_blocks, val_blocks, ranks.world_size, dtype_name, max_steps)
    trainer = Trainer(
        model=model, loss_fn=lm_loss, optimizer=optimizer,
        schedule=lambda step: linear_schedule(step, max_steps, args.warmup_steps),
        train_batches=train_batches, val_batches=val_batches, config=config, out=args.out,
        save_model=lambda folder: write_checkpoint(folder, model, tokenizer),
        device=device, ranks=ranks, run_config=run_config(args, ranks.world_size, dtype_name, max_steps),
        card=lambda rows, step: render_card(facts, rows, step),
    )
    if resume_from is not None:
        trainer.resume(resume_from)

    c = model.config
    source = f"resumed from {args.out} at step {trainer.step}" if resume_from else (
        "new (random init)" if args.init == "scratch" else f"from {args.init}")
    epochs = f"{max_steps / steps_per_epoch:g} epochs" if args.max_steps else f"{args.epochs} epochs"
    say(f"model: {model.num_parameters():,} parameters ({c.n_layer} layers, {c.n_head} heads, "
        f"{c.n_embd} wide, vocabulary {c.vocab_size:,}), {source}")
    say(f"data: {len(train_blocks):,} training and {len(val_blocks):,} validation blocks of {args.block_size} tokens")
    say(f"batch: {args.batch_size} x {args.block_size} tokens x {args.grad_accum} accumulation x "
        f"{ranks.world_size} process(es) = {global_micro * args.grad_accum} examples, "
        f"{global_micro * args.grad_accum * args.block_size:,} tokens per step")
    say(f"schedule: {steps_per_epoch:,} steps per epoch, {max_steps:,} steps ({epochs}); lr {args.lr:g}, "
        f"{args.warmup_steps} warm-up steps, then linear decay to 0")
    say(f"device: {device}, precision {dtype_name}{' (autocast)' if dtype != torch.float32 else ''}"
        f"{', compiled' if args.compile else ''}; seed {args.seed}")
    say(f"out: {args.out}", flush=True)

    result = trainer.fit()
    val = result.get("val_loss")
    summary = f"done: step {result['step']}" + (f", validation loss {val:.4f} (perplexity {math.exp(val):.1f})" if val is not None else "")
    say(f"{summary}\nsample from it: python sample.py --model {args.out}")
    return 0


def lm_loss(model, batch):
    """Next-token cross-entropy of a batch of blocks (the model shifts the targets itself)."""
    return model(batch, targets=batch)[1]


if __name__ == "__main__":
    run(main)
