#!/usr/bin/env python
"""Generate text with a GPT-2 model, streamed to stdout as it is decoded; or see what it thinks of a text.

  python sample.py "Somatic hypermutation allows the immune system to"
  python sample.py --interactive                      # ask questions, answers stream back
  python sample.py --greedy --max-new-tokens 30 "The meaning of life is"
  python sample.py --num-samples 3 --seed 0 "Once upon a time"
  python sample.py --quantize int8 --stats "Why is the sky blue?"
  python sample.py --file prompts.txt                 # one prompt per line ("-" reads stdin)
  python sample.py --show-probs "Why is the sky blue?"          # tokens coloured by probability
  python sample.py --trace trace.jsonl --top-alternatives 3 "Why"  # each token's numbers, JSON lines
  python sample.py --score "The sky is blue because of Rayleigh scattering."  # surprisal, perplexity

stdout carries only text (each prompt followed by its continuation), so it pipes cleanly; warnings
and --stats go to stderr. Sampling settings default to the published ELI5 fine-tune's
(top-k 50, top-p 0.95, temperature 1.0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

from minigpt.cli import Parser, add_flags, from_flags, path_text, positive_int, run, seed
from minigpt.errors import MinigptError
from minigpt.files import LINE_BREAKS, home_expanded
from minigpt.sampling_config import SamplingConfig
from minigpt.train_flags import DEFAULT_OUT, RECIPE_MODEL

if TYPE_CHECKING:  # (torch and the model are imported where used: --help stays quick)
    from minigpt.compiled_decoding import CompiledDecoding
    from minigpt.model import GPT
    from minigpt.tokenizer import Tokenizer

DEFAULT_CHECKPOINT = Path(DEFAULT_OUT)  # where `python train.py` writes by default
DEFAULT_HUB_MODEL = RECIPE_MODEL


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.dash_hint = 'a PROMPT that starts with "-" goes after --, as in: sample.py -- "-text"'
    p.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help='text to continue; several prompts are answered one after another; "-" '
                   'reads one prompt per line from stdin; "" starts from <|endoftext|>')
    p.add_argument("--file", metavar="PATH", type=path_text,
                   help='read one prompt per line from a UTF-8 file ("-": stdin)')
    p.add_argument("--model", metavar="SOURCE", help=f"a minigpt checkpoint folder, a Hugging Face GPT-2 folder or "
                   f"a Hub id (default: {DEFAULT_CHECKPOINT}/ if train.py has written it, else {DEFAULT_HUB_MODEL})")
    g = p.add_argument_group("sampling")
    add_flags(g, SamplingConfig)
    g.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                   help="continue each prompt N times, decoded together as one batch (default: 1)")
    g.add_argument("--seed", type=seed, help="random seed, for reproducible samples: the same seed gives the "
                   "same text with the same kernels (see --kernel); each prompt of --file (each --interactive "
                   "question) starts from it, so its text is the one it gets alone (default: a random one)")
    g = p.add_argument_group("see the model think")
    g.add_argument("--show-probs", action="store_true",
                   help="colour each new token by the probability the model gave it (legend on "
                   "stderr); only when stdout is a terminal, so piped text stays plain")
    g.add_argument("--trace", metavar="FILE", type=path_text,
                   help='a JSON line per new token and sample ("-": stderr): its id, text and '
                   "probability, the likeliest alternatives, whether temperature/top-k/top-p kept "
                   "each, the candidate set's size and mass. Probabilities: the softmax of the "
                   "logits before temperature/top-k/top-p, after the repetition penalty if set")
    g.add_argument("--top-alternatives", type=positive_int, default=5, metavar="K",
                   help="alternatives per --trace row (default: 5)")
    g.add_argument("--score", metavar="TEXT",
                   help="generate nothing: each token of TEXT with its probability after the ones "
                   "before it, the most surprising tokens, mean loss, perplexity (--trace: rows)")
    g.add_argument("--score-file", metavar="PATH", type=path_text,
                   help='--score the text of a UTF-8 file ("-": stdin)')
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N (one GPU of several) or mps "
                   "(default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="number format of the weights, and on a GPU of the activations too (on the "
                   "CPU they stay fp32: faster there, and closer to fp32); auto is bf16 on a GPU that "
                   "supports it, else fp32: on a CPU, auto stays fp32 because most CPUs only emulate bf16 "
                   "(ask for bf16 on one with AVX-512 BF16 or AMX; --stats shows the kernels) (default: auto)")
    g.add_argument("--quantize", choices=["int8"],
                   help="int8: int8 weights for the Linear layers and LM head (one scale per output "
                   "channel); a quarter of fp32's memory traffic, for fast CPU chat. The fastest "
                   "int8 kernel here is measured; one (fbgemm) also rounds activations to 14 bits. On a GPU "
                   "it decodes slower than fp32 (0.47x on an H200)")
    g.add_argument("--kernel", metavar="NAME",
                   help="compute every layer with this kernel instead of timing the candidates and keeping the "
                   "fastest (--stats names the kernels chosen; fp32: addmm-t, linear, bmm-split, bmm-rows, mkl; "
                   "bf16: mv-upcast, linear, bmm-rows, onednn, fbgemm-fp16; int8: int8mm, upcast, fbgemm). "
                   "Timing may choose other kernels in another run, and bf16's and int8's round differently, "
                   "so a sampled text is reproduced exactly by --seed only with the kernels pinned; with "
                   "--compile on the CPU it also keeps them (no race against other steps) (default: timed)")
    g.add_argument("--compile", action="store_true",
                   help="decode through one torch.compile graph per token (the prompt runs as usual): "
                   "it pays on the CPU for --quantize int8 and fp32, where a step with inductor's own GEMMs "
                   "(int8: on bf16 activations, as int8mm) is raced against the chosen kernels and the "
                   "fastest kept (int8 1.35x the kernels' step on an AMD Zen 4, ~260 MB more memory; fp32 "
                   "1.36x on an AMD Zen 5, about even on a Zen 4, ~540 MB more; where timing gave some int8 "
                   "layers int8mm, a step with FBGEMM on every layer is raced too); bf16 about even. "
                   "Compiling takes ~45-50 s (fp32) to ~50-70 s (int8) on 2 CPU cores the first time (int8 ~7 s "
                   "once inductor's disk cache has it; fp32 ~20 s, its step with inductor's GEMMs being one "
                   "that cache cannot keep), and needs a C++ "
                   "compiler and Python's C headers (python3-dev). On a GPU each token replays as one "
                   "CUDA graph (1.8x decoding without it at batch 1 on an H200); it is raced against "
                   "decoding without it there and the faster is kept")
    g.add_argument("--stats", action="store_true",
                   help="print two lines per prompt on stderr: the kernels chosen for each layer (with --compile, "
                   "also what decodes where it is not them), then "
                   "prompt tokens, time to first token, new tokens and the decode rate (prefill excluded); "
                   "with --score, the kernels line")
    p.add_argument("--interactive", action="store_true",
                   help="question/answer loop: type a question, the answer streams back "
                   "(prompted as 'Question: ...\\nAnswer:'); Ctrl-D exits")
    args = p.parse_args(argv)
    args.scoring = args.score is not None or args.score_file is not None
    if args.scoring and (args.prompts or args.file or args.interactive or (args.score_file and args.score)):
        p.error("--score / --score-file read one text and generate nothing; give no PROMPT, "
                "--file, --interactive or second text")
    if args.interactive and (args.prompts or args.file):
        p.error("--interactive reads questions as you type them; give no PROMPT or --file")
    if not args.interactive and not args.scoring and not args.prompts and args.file is None:
        p.error("give a PROMPT (or --file PATH, --interactive or --score TEXT)")
    if [*args.prompts, args.file, args.score_file].count("-") > 1:
        p.error("stdin (-) is read once: give it as one PROMPT, --file or --score-file, not several")
    given = p.given(argv)  # a flag that would change nothing here is refused, not ignored
    if args.scoring:
        p.refuse(given, ("num_samples", "max_new_tokens", "seed", "compile"),
                 "has no effect with --score/--score-file, which generate nothing")
        p.refuse(given, ("repetition_penalty",), "does not apply to --score: scoring reads the model's own "
                 "probabilities; a repetition penalty applies only when generating")
        if args.trace is None:
            p.refuse(given, ("temperature", "top_k", "top_p", "greedy"), "changes nothing --score prints "
                     "without --trace: the sampling settings only mark, in --trace rows, which tokens they would "
                     "keep; give --trace FILE")
    why = "--greedy" if args.greedy else "--temperature 0" if args.temperature == 0 else None
    if why and not args.scoring:  # (HF's generate refuses num_return_sequences > 1 there too)
        p.refuse(given, ("seed",), f"has no effect with {why}: greedy decoding always takes the most likely token")
    copies = why or ("--top-k 1" if args.top_k == 1 else None)  # (each takes the most likely token)
    if copies and not args.scoring and args.num_samples > 1:
        p.error(f"--num-samples {args.num_samples} with {copies} would print {args.num_samples} copies of one "
                "text: greedy decoding always takes the most likely token; sample without it")
    if why:  # (the candidate set, a --trace's `kept` too, is the one most likely token)
        p.refuse(given, ("temperature", "top_k", "top_p") if args.greedy else ("top_k", "top_p"),
                 f"has no effect with {why}: greedy decoding takes the most likely token, whatever the "
                 "temperature, top-k and top-p")
    if args.trace is None:
        p.refuse(given, ("top_alternatives",), "has no effect without --trace: it sets how many alternatives "
                 "each --trace row lists; give --trace FILE")
    for name in ("file", "score_file", "trace"):  # (`--file=~/p.txt`: no shell expands a ~ after "=")
        if getattr(args, name) not in (None, "-"):
            setattr(args, name, str(home_expanded(getattr(args, name))))
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts in order: positional ones, "-" expanded to stdin's lines, then --file's lines. A
    PROMPT that is not UTF-8 is refused before any is answered, as a file's is. (A file or stdin of
    blank lines only is no prompt, and nothing is printed: `grep ... | sample.py -` that matched
    nothing.)"""
    prompts: list[str] = []
    for number, prompt in enumerate(args.prompts, 1):
        if prompt != "-":
            try:  # (bytes that are not UTF-8 reach sys.argv as lone surrogates, PEP 383)
                prompt.encode("utf-8", "surrogateescape").decode("utf-8")
            except UnicodeDecodeError as e:
                raise MinigptError(f"PROMPT {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except UnicodeEncodeError as e:  # (a surrogate no byte made: "\ud800" passed from Python)
                raise MinigptError(f"PROMPT {number}: not UTF-8 text (a lone surrogate at character "
                                   f"{e.start})") from None
        prompts += read_lines("-") if prompt == "-" else [prompt]
    if args.file is not None:
        prompts += read_lines(args.file)
    return prompts


def read_lines(path: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, or of stdin for "-". A line ends at \\n, \\r\\n or \\r only,
    as `--interactive` reads it (`str.splitlines` would also split at form feeds and U+2028)."""
    return [line for line in LINE_BREAKS.split(read_text(path)) if line.strip()]


def read_text(path: str, what: str = "prompt file") -> str:
    """A UTF-8 text file's text, or stdin's for "-", less a leading byte-order mark (as for data files)."""
    from minigpt.sources import TEXT_ENCODING

    try:
        # bytes, decoded as they are: a file's \r\n stays \r\n, as it does from stdin (Path.read_text would
        # make it \n, and --score-file would score another text than --score-file - < the same file)
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return data.decode(TEXT_ENCODING)
    except FileNotFoundError:
        raise MinigptError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise MinigptError(f"{path}: is a folder, not a {what}") from None
    except UnicodeDecodeError as e:
        raise MinigptError(f"{'stdin' if path == '-' else path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load(args: argparse.Namespace) -> tuple[GPT, Tokenizer]:
    """The model (in its inference layout) and tokenizer that --model/--device/--dtype/--quantize ask for."""
    from minigpt.loading import load_model
    from minigpt.inference import prepare_for_inference, prepared_stream_dtype
    from minigpt.runtime import CLI_NAMES, setup_device

    device, dtype = setup_device(args.device, args.dtype, CLI_NAMES)
    if args.model is not None:
        model, tokenizer = load_model(args.model, device, dtype)
    elif (DEFAULT_CHECKPOINT / "config.json").is_file():
        model, tokenizer = load_model(DEFAULT_CHECKPOINT, device, dtype)
    else:
        try:
            model, tokenizer = load_model(DEFAULT_HUB_MODEL, device, dtype)
        except MinigptError as e:  # (its own words: the Hub unreachable, or a cached copy that is broken)
            raise MinigptError(
                f"no --model given and no checkpoint in {DEFAULT_CHECKPOINT}/; {e} (--model takes a minigpt or "
                f"HF GPT-2 folder; `python train.py --preset tiny` makes one in checkpoints/tiny)"
            ) from None
    if not args.scoring:  # (the kernels' race and --compile's warm-up run on as many rows as a step)
        from minigpt.sampling import check_decoding_fits

        cache_dtype = prepared_stream_dtype(model, args.quantize)  # (a bf16 model's KV cache: fp32 on the CPU)
        check_decoding_fits(model, args.num_samples, 1, args.max_new_tokens, cache_dtype)
    model = prepare_for_inference(model, args.quantize, batch_size=args.num_samples, kernel=args.kernel,
                                  compiled=args.compile)
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text = None
    if args.scoring:
        text = args.score if args.score is not None else read_text(args.score_file, "text file")
        if not text:
            raise MinigptError(f"{args.score_file or '--score'}: the text to score is empty")
    prompts = [] if args.interactive or args.scoring else read_prompts(args)

    # heavy imports (torch) after parsing, so --help and usage errors are instant
    from minigpt.formats import qa_prompt
    from minigpt.sampling import seeded_generator
    from minigpt.streaming import check_trace_path, complete, questions, trace_output
    from minigpt.trace import format_score, legend, score, write_rows

    check_trace_path(args.trace, reads=[args.file, args.score_file, args.model or DEFAULT_CHECKPOINT])
    model, tokenizer = load(args)
    config = from_flags(SamplingConfig, args)
    coloured = args.show_probs and sys.stdout.isatty()
    if args.show_probs:  # the legend, or why there are no colours
        print(legend(sys.stderr.isatty()) if coloured else "--show-probs: stdout is not a terminal, "
              "so the text stays plain (--trace FILE writes the numbers)", file=sys.stderr)

    def print_kernels(compiled: CompiledDecoding | None = None) -> None:
        from minigpt.inference import kernel_summary

        note = compiled.stats_note() if compiled is not None else ""
        print((kernel_summary(model) or "kernels: the standard layout") + note, file=sys.stderr)

    if args.scoring:
        if args.stats:
            print_kernels()
        result = score(model, tokenizer, text, config, args.top_alternatives)
        sys.stdout.write(format_score(result, tokenizer, coloured))
        with trace_output(args.trace) as trace:
            write_rows(trace, result.rows, prompt=0, sample=0)
        return 0

    generator = seeded_generator(model, args.seed)
    compiled = None
    if args.compile:
        from minigpt.compiled_decoding import CompiledDecoding
        from minigpt.runtime import activation_dtype, model_device

        pinned = args.kernel is not None and model_device(model).type == "cpu"  # (see --kernel)
        compiled = CompiledDecoding(model, gemms="kernels" if pinned else "measure")
        print("--compile: compiling the decoding step ...", file=sys.stderr, flush=True)  # (torch may log meanwhile)
        seconds = compiled.warm_up(args.num_samples, activation_dtype(model))
        print(f"--compile: compiled in {seconds:.1f} s", file=sys.stderr)
        print(f"--compile: {compiled.describe()}", file=sys.stderr)

    def answer(prompt: str, shown: str, index: int, trace: TextIO | None) -> None:
        if args.seed is not None:  # each prompt from the seed: its text is the one it gets alone
            generator.manual_seed(args.seed)
        done = complete(model, tokenizer, prompt, config, shown=shown, num_samples=args.num_samples,
                        generator=generator, coloured=coloured, trace=trace, compiled=compiled,
                        top_alternatives=args.top_alternatives, prompt_index=index)
        if args.stats:
            print_kernels(compiled)
            print(f"prompt tokens {done.prompt_tokens} | time to first token {done.time_to_first_token:.3f} s "
                  f"| new tokens {done.new_tokens} | decode {done.decode_rate:.1f} tokens/s", file=sys.stderr)

    with trace_output(args.trace) as trace:
        if args.interactive:
            for index, question in enumerate(questions()):
                answer(qa_prompt(question), "", index, trace)
        for index, prompt in enumerate(prompts):
            if index:
                sys.stdout.write("\n")  # a blank line between outputs
            answer(prompt, prompt, index, trace)
    return 0


if __name__ == "__main__":
    run(main, sigterm_interrupts=True)  # (SIGTERM as Ctrl-C: a --trace file keeps its rows)
