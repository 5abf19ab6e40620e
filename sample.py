#!/usr/bin/env python
"""Generate text with a GPT-2 model, streamed to stdout as it is decoded.

  python sample.py "Somatic hypermutation allows the immune system to"
  python sample.py --interactive                      # ask questions, answers stream back
  python sample.py --greedy --max-new-tokens 30 "The meaning of life is"
  python sample.py --num-samples 3 --seed 0 "Once upon a time"
  python sample.py --quantize int8 --stats "Why is the sky blue?"
  python sample.py --file prompts.txt                 # one prompt per line ("-" reads stdin)

stdout carries only text (each prompt followed by its continuation), so it pipes cleanly; warnings
and --stats go to stderr. Sampling settings default to the distilgpt2 model card's
(top-k 50, top-p 0.95, temperature 1.0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from minigpt.cli import non_negative_float, non_negative_int, positive_float, positive_int, run
from minigpt.cli import seed, unit_interval
from minigpt.errors import MinigptError

DEFAULT_CHECKPOINT = Path("checkpoints/eli5")  # where `python train.py` writes by default
DEFAULT_HUB_MODEL = "distilbert/distilgpt2"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "prompts", nargs="*", metavar="PROMPT",
        help='text to continue; several prompts are answered one after another; "-" reads one '
        'prompt per line from stdin; "" starts from <|endoftext|>',
    )
    p.add_argument("--file", metavar="PATH", help='read one prompt per line from a UTF-8 file ("-": stdin)')
    p.add_argument(
        "--model",
        help=f"a minigpt checkpoint folder, a Hugging Face GPT-2 folder or a Hub id (default: "
        f"{DEFAULT_CHECKPOINT}/ if train.py has written it, else {DEFAULT_HUB_MODEL})",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=100, metavar="N",
                   help="stop after N new tokens (or earlier, at <|endoftext|>) (default: 100)")
    g.add_argument("--temperature", type=non_negative_float, default=1.0, metavar="T",
                   help="divide the logits by T: < 1 is more focused, > 1 more random, "
                   "0 is greedy (default: 1.0)")
    g.add_argument("--top-k", type=non_negative_int, default=50, metavar="K",
                   help="sample only among the K most likely tokens; 0 turns it off (default: 50)")
    g.add_argument("--top-p", type=unit_interval, default=0.95, metavar="P",
                   help="sample only among the fewest most likely tokens whose probabilities add "
                   "up to P; 1 turns it off (default: 0.95)")
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0, metavar="R",
                   help="make tokens already in the text R times less likely; 1 turns it off, "
                   "1.2 is a common choice (default: 1.0)")
    g.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (deterministic; ignores T, K and P)")
    g.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                   help="continue each prompt N times, decoded together as one batch (default: 1)")
    g.add_argument("--seed", type=seed, help="random seed, for reproducible samples")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda or mps (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="number format of the weights and activations; auto is bf16 on a GPU that "
                   "supports it, else fp32 (default: auto)")
    g.add_argument("--quantize", choices=["int8"],
                   help="int8: weight-only int8 Linear layers and LM head (one scale per output "
                   "channel); a quarter of fp32's memory traffic, for fast CPU chat")
    g.add_argument("--stats", action="store_true",
                   help="print a line per prompt on stderr: prompt tokens, time to first token, "
                   "new tokens and the decode rate (prefill excluded)")
    p.add_argument("--interactive", action="store_true",
                   help="question/answer loop: type a question, the answer streams back "
                   "(prompted as 'Question: ...\\nAnswer:'); Ctrl-D exits")
    args = p.parse_args(argv)
    if args.interactive and (args.prompts or args.file):
        p.error("--interactive reads questions as you type them; give no PROMPT or --file")
    if not args.interactive and not args.prompts and args.file is None:
        p.error("give a PROMPT (or --file PATH, or --interactive)")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts in order: positional ones, "-" expanded to stdin's lines, then --file's lines."""
    prompts: list[str] = []
    for prompt in args.prompts:
        prompts += read_lines("-") if prompt == "-" else [prompt]
    if args.file is not None:
        prompts += read_lines(args.file)
    return prompts


def read_lines(path: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, or of stdin for "-"."""
    try:
        if path == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinigptError(f"{path}: prompt file not found") from None
    except IsADirectoryError:
        raise MinigptError(f"{path}: is a folder, not a prompt file") from None
    except UnicodeDecodeError as e:
        raise MinigptError(f"{'stdin' if path == '-' else path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def load(args: argparse.Namespace):
    """The model (in its inference layout) and tokenizer that --model, --device, --dtype and
    --quantize ask for."""
    from minigpt.hf import load_model
    from minigpt.inference import prepare_for_inference
    from minigpt.runtime import setup_device

    device, dtype = setup_device(args.device, args.dtype)
    if args.model is not None:
        model, tokenizer = load_model(args.model, device, dtype)
    elif (DEFAULT_CHECKPOINT / "config.json").is_file():
        model, tokenizer = load_model(DEFAULT_CHECKPOINT, device, dtype)
    else:
        try:
            model, tokenizer = load_model(DEFAULT_HUB_MODEL, device, dtype)
        except MinigptError:
            raise MinigptError(
                f"no --model given, no checkpoint in {DEFAULT_CHECKPOINT}/, and {DEFAULT_HUB_MODEL} "
                f"could not be fetched (the Hugging Face Hub is unreachable or offline): pass "
                f"--model FOLDER (a minigpt or HF GPT-2 folder), or train one with "
                f"`python train.py --preset tiny` and pass --model checkpoints/tiny"
            ) from None
    return prepare_for_inference(model, args.quantize), tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = [] if args.interactive else read_prompts(args)

    import torch  # heavy imports after parsing, so --help and usage errors are instant

    from minigpt.formats import qa_prompt
    from minigpt.sampling import SamplingConfig

    model, tokenizer = load(args)
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        greedy=args.greedy,
        eos_id=tokenizer.eos_id,
    )
    generator = torch.Generator(device=model.transformer.wpe.weight.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()

    if args.interactive:
        while True:
            sys.stderr.write("question> ")
            sys.stderr.flush()
            question = sys.stdin.readline()
            if not question:  # Ctrl-D
                sys.stderr.write("\n")
                return 0
            if question.strip():
                complete(model, tokenizer, qa_prompt(question), "", config, args, generator)
    for i, prompt in enumerate(prompts):
        if i:
            sys.stdout.write("\n")  # a blank line between outputs
        complete(model, tokenizer, prompt, prompt, config, args, generator)
    return 0


def complete(model, tokenizer, prompt: str, shown: str, config, args, generator) -> None:
    """Continue `prompt`, writing `shown` and then the continuation to stdout.

    One sample streams token by token; several are decoded as one batch and written when done.
    """
    from minigpt.sampling import TextStream, generate

    ids = tokenizer.encode(prompt)
    window = model.config.block_size
    if len(ids) > window:
        print(
            f"warning: the prompt is {len(ids)} tokens, longer than the model's {window}-token "
            f"context window; only its last {window} tokens are used",
            file=sys.stderr,
        )
    streams = [TextStream(tokenizer) for _ in range(args.num_samples)]
    texts = [shown] * args.num_samples
    counts = [0] * args.num_samples  # new tokens per sample, its EOS included
    finished = [False] * args.num_samples
    live = args.num_samples == 1
    if live:
        sys.stdout.write(shown)
        sys.stdout.flush()

    start = time.perf_counter()
    first = last = start
    for new in generate(model, ids, config, args.num_samples, generator):
        last = time.perf_counter()
        if first == start:
            first = last  # the first token ends the prefill
        for row, token in enumerate(new.tolist()):
            if finished[row]:
                continue
            counts[row] += 1
            finished[row] = token == config.eos_id
            piece = "" if finished[row] else streams[row].push(token)
            texts[row] += piece
            if live and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
    tails = [stream.flush() for stream in streams]  # a character cut off by the last token
    if live:
        sys.stdout.write(tails[0] + "\n")
    else:
        sys.stdout.write("\n".join(text + tail + "\n" for text, tail in zip(texts, tails)))
    sys.stdout.flush()

    if args.stats:
        decoded = sum(counts) - args.num_samples  # the first token of each sample ends the prefill
        rate = decoded / (last - first) if last > first else 0.0
        print(
            f"prompt tokens {min(len(ids), window) or 1} | time to first token "
            f"{first - start:.3f} s | new tokens {sum(counts)} | decode {rate:.1f} tokens/s",
            file=sys.stderr,
        )


if __name__ == "__main__":
    run(main)
