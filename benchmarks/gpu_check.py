"""The timing half of benchmarks/gpu_check.sh: training steps and decoding on one CUDA GPU, ours
against transformers + torch.optim.AdamW / transformers' generate(), same weights, same run.

    decode     batch 1 and 8, 100 new tokens (top-k 50, top-p 0.95), ours (eager, then compiled as
               sample.py --compile) vs generate(), fp32 and bf16: decode tokens/s after the first token,
               each side after a whole untimed run (generate(): a whole run less its first token, each
               the fastest of 3 runs); ours with int8 weights (--quantize int8) too
    training   one optimizer step (bench_train.py's two sides) at the recipe's 8 x 128 and at a
               GPU-sized batch (default 64 x 1024) in fp32 (TF32 matmuls, as train.py), bf16
               autocast and fp16 autocast + GradScaler; median step time over --steps steps after
               warm-up, tokens/s, and MFU against the GPU's measured matmul peak in the row's own
               precision (an 8192^3 matmul: fp32 against the TF32 peak, as it runs; bf16 against
               bf16's; fp16 against fp16's, or bf16's where fp16 is not timed); then ours compiled
               (--compile-mode, default reduce-overhead: CUDA graphs, for the launch-bound 8 x 128)
               at --compile-shapes

The cheap cells come first, each training shape's compiled cells after its eager ones, so a time
budget (--budget seconds) that runs out skips the costly ones: a skipped cell says so, a cell that
fails says why, and the table is printed whatever happens (an interrupt, as `timeout -s INT` sends,
included). Run through gpu_check.sh (which runs the CUDA tests first); without CUDA it stops with
one line.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from minigpt.cli import Parser, non_negative_int, positive_float, positive_int  # noqa: E402  (after the path set-up)
from minigpt.train_flags import COMPILE_MODES  # noqa: E402

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]  # "The quick brown fox ..." ids
WINDOW = 1024  # the positions of the distilgpt2-shaped model timed (bench_train.model_folder)


def matmul_peak_for(precision: str, peaks: dict[str, float]) -> tuple[float, str]:
    """(FLOP/s, its name) of the measured matmul peak a training precision's MFU is against: its own
    (fp32's is TF32's, as train.py runs fp32 on a GPU and hardware.describe measured it), fp16 falling
    back to bf16's (the same tensor-core rate on NVIDIA's GPUs) where fp16's was not measured."""
    if precision in peaks:
        return peaks[precision], "TF32" if precision == "fp32" else precision
    return peaks["bf16"], "bf16"


def mfu(flops: float, seconds: float, precision: str, peaks: dict[str, float]) -> float:
    """Model FLOPs utilisation of a step of `flops` taking `seconds`, in `precision`."""
    return flops / seconds / matmul_peak_for(precision, peaks)[0]


class Shape(NamedTuple):
    """A training shape: `batch` sequences of `block` tokens, printed as BATCHxBLOCK."""

    batch: int
    block: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.block}"


def shape(text: str) -> Shape:
    """A training shape from BATCHxBLOCK (e.g. 8x128), checked when the arguments are read, not in a
    cell minutes into the run."""
    batch, _, block = text.partition("x")
    if not (batch.isdigit() and block.isdigit() and int(batch) > 0 and int(block) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxBLOCK, e.g. 8x128")
    return Shape(int(batch), int(block))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=shape, default=[Shape(8, 128), Shape(64, 1024)],
                   help="batch x block shapes to train at")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16", "fp16"],
                   help="training precisions")
    p.add_argument("--compile-shapes", nargs="*", type=shape, default=[Shape(8, 128)], help="shapes at which ours is also "
                   "timed compiled, in every precision (default: 8x128; compiling takes ~30-60 s each)")
    p.add_argument("--compile-mode", default="reduce-overhead", choices=COMPILE_MODES,
                   help="torch.compile's mode for those cells (default: reduce-overhead)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per cell (default: 10)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--tokens", type=positive_int, default=100, help="new tokens per decode run (default: 100)")
    p.add_argument("--budget", type=positive_float, default=280, help="seconds for all timings (default: 280)")
    p.add_argument("--check-options", action="store_true", help=argparse.SUPPRESS)  # gpu_check.sh: before the tests
    args = p.parse_args(argv)
    for name in ("shapes", "dtypes", "compile_shapes"):  # (one given twice is timed once, not printed twice)
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    # (refused here, before the CUDA tests spend minutes: on a GPU a position past the window is a
    # device-side assert, which breaks every later cell of the run)
    for flag, shapes in (("--shapes", args.shapes), ("--compile-shapes", args.compile_shapes)):
        for s in shapes:
            if s.block > WINDOW:
                p.error(f"{flag} {s}: distilgpt2 sees at most {WINDOW} tokens")
    if args.tokens < 2:  # (a decode rate is timed from the first new token to the last)
        p.error(f"--tokens: at least 2 new tokens are timed, got {args.tokens}")
    if len(PROMPT) + args.tokens > WINDOW:
        p.error(f"--tokens {args.tokens}: after the {len(PROMPT)}-token prompt, beyond distilgpt2's {WINDOW} positions")
    return args


def median_step(side, batch, args) -> float:
    """Median seconds of one training step (each step synchronised, so a step's time is its own)."""
    import torch

    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        side.step(batch)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(model, hf: bool, batch: int, tokens: int, compiled=None) -> float:
    """Decode tokens/s after the first token, ours (minigpt.sampling.generate, through `compiled`, a
    CompiledDecoding, when given) or transformers'."""
    import torch

    if hf:
        ids = torch.tensor([PROMPT] * batch, device=model.device)
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=50, top_p=0.95, pad_token_id=50256)
        with torch.inference_mode():
            # a whole run first, as for ours: every cache length's first use (kernel choice, caching
            # allocator) is then out of the timed runs
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)

            def seconds(new: int) -> float:  # the fastest of 3 runs: each is a fixed amount of work
                runs = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
                    torch.cuda.synchronize()
                    runs.append(time.perf_counter() - start)
                assert out.shape[1] == len(PROMPT) + new
                return min(runs)

            first = seconds(1)  # the first token (prefill), timed apart
            total = seconds(tokens)
        if total <= first:  # (a difference of two timings: noise can outweigh a few tokens' decode)
            raise RuntimeError(f"{tokens} tokens timed no slower than 1 ({total * 1e3:.1f} vs {first * 1e3:.1f} ms): "
                               "too few --tokens to time")
        return (tokens - 1) * batch / (total - first)
    from minigpt.sampling import SamplingConfig, generate, seeded_generator

    config = SamplingConfig(max_new_tokens=tokens, top_k=50, top_p=0.95)
    list(generate(model, PROMPT, config, batch, seeded_generator(model, 0), eos_id=None, compiled=compiled))  # warm-up
    times = []
    for _ in generate(model, PROMPT, config, batch, seeded_generator(model, 0), eos_id=None,
                      compiled=compiled):  # no early stop
        times.append(time.perf_counter())
    torch.cuda.synchronize()  # the last step's work done
    times[-1] = time.perf_counter()
    return (tokens - 1) * batch / (times[-1] - times[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_options:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was timed", file=sys.stderr)
        return 1
    try:
        import transformers  # noqa: F401  (the other side of every row)
    except ImportError:
        print("gpu_check: transformers is not installed (pip install -e \".[test]\"); nothing was timed",
              file=sys.stderr)
        return 1
    import hardware
    from bench_train import Ours, Transformers, hf_dtype, model_folder, step_flops

    from minigpt.compiled_decoding import CompiledDecoding
    from minigpt.config import GPTConfig
    from minigpt.errors import MinigptError
    from minigpt.inference import prepare_for_inference
    from minigpt.loading import convert_to_minigpt, load_model
    from minigpt.runtime import DTYPES, setup_device

    started = time.monotonic()
    device, _ = setup_device("cuda", "fp32")  # TF32 for fp32, as train.py
    info = hardware.describe(device)
    print(hardware.hardware_line(info), flush=True)
    peaks = {"fp32": info["fp32"], "bf16": info["bf16"]}  # fp32: TF32 matmuls (setup_device above)
    if "fp16" in args.dtypes:
        peaks["fp16"] = hardware.matmul_peak(device, torch.float16)[0]
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []  # what each compiled decoding chose

    def left() -> float:
        return args.budget - (time.monotonic() - started)

    def cell(what: str, shape: str, precision: str, side: str, needs: float, run) -> None:
        """One row: run() gives the row's last four columns; skipped when less than `needs` seconds
        of the budget are left, and a failure is written in the row, so the others still run."""
        if left() < needs:
            rows.append((what, shape, precision, side, "(skipped: time budget)", "", "", ""))
        else:
            try:
                rows.append((what, shape, precision, side, *run()))
            except torch.cuda.OutOfMemoryError:
                rows.append((what, shape, precision, side, "out of memory", "", "", ""))
            except Exception as e:  # noqa: BLE001  (a benchmark row, not a crash: the table goes on)
                rows.append((what, shape, precision, side, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                             "", "", ""))
            finally:
                gc.collect()
                torch.cuda.empty_cache()
        print(" | ".join(rows[-1]), flush=True)

    base: dict[tuple[Shape, str], float] = {}  # (shape, precision) -> transformers' step seconds

    def int8_rate(mg_dir: Path, ref: float | None, batch: int) -> tuple[str, ...]:
        """Ours with int8 weights (from fp32), against transformers' fp32 rate `ref`."""
        try:
            model = prepare_for_inference(load_model(mg_dir, device, torch.float32)[0], "int8", batch_size=batch)
        except MinigptError as e:  # (a build without an int8 kernel for CUDA says so: not a failure)
            return (f"not offered: {e}", "", "", "")
        rate = decode_rate(model, False, batch, args.tokens)
        return ("", f"{rate:,.1f}", f"{rate / ref:.2f}x" if ref else "", "")

    def train_cell(folder: Path, shape: Shape, dtype_name: str, side: str, make, needs: float = 20) -> None:
        b, t = shape
        config = GPTConfig.from_hf(json.loads((folder / "config.json").read_text()))

        def run():
            batch = torch.randint(0, 50257, (b, t), generator=torch.Generator().manual_seed(0)).to(device)
            seconds = median_step(make(), batch, args)
            if side == "transformers":
                base[(shape, dtype_name)] = seconds
            ref = base.get((shape, dtype_name))
            return (f"{seconds * 1000:.1f} ms", f"{b * t / seconds:,.0f}", f"{ref / seconds:.2f}x" if ref else "",
                    f"{mfu(step_flops(config, b * t, t), seconds, dtype_name, peaks):.1%}")

        cell("train", str(shape), dtype_name, side, needs, run)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = model_folder(argparse.Namespace(model=None), Path(tmp))
            mg_dir = convert_to_minigpt(folder, Path(tmp) / "minigpt")
            from transformers import GPT2LMHeadModel

            for dtype_name in ("fp32", "bf16"):  # decode first: cheap, and never starved by compiling
                dtype = DTYPES[dtype_name]
                models = {}

                def load(dtype=dtype):
                    models["ours"] = load_model(mg_dir, device, dtype)[0]
                    models["hf"] = GPT2LMHeadModel.from_pretrained(folder, **hf_dtype(dtype)).to(device).eval()
                    models["hf"].generation_config.eos_token_id = None

                for batch in (1, 8):
                    rates = {}

                    def run_side(side, batch=batch):
                        if not models:
                            load()
                        if side == "ours, compiled":  # as sample.py --compile: warm_up races the steps
                            compiled = CompiledDecoding(models["ours"])
                            compiled.warm_up(batch, dtype)
                            skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # (so far)
                            notes.append(f"decode batch {batch} {dtype_name}, ours compiled: {compiled.describe()}"
                                         f" (CUDA graphs skipped so far: {skips})")
                            print(notes[-1], flush=True)
                            rates[side] = decode_rate(models["ours"], False, batch, args.tokens, compiled)
                        else:
                            rates[side] = decode_rate(models[side], side == "hf", batch, args.tokens)
                        ref = rates.get("hf")
                        return ("", f"{rates[side]:,.1f}", f"{rates[side] / ref:.2f}x" if ref else "", "")

                    cell("decode", f"batch {batch}", dtype_name, "transformers generate()", 10, lambda: run_side("hf"))
                    cell("decode", f"batch {batch}", dtype_name, "ours", 10, lambda: run_side("ours"))
                    cell("decode", f"batch {batch}", dtype_name, "ours, compiled", 40,
                         lambda: run_side("ours, compiled"))
                    if dtype_name == "fp32":  # sample.py --quantize int8, where this build has a kernel for it
                        cell("decode", f"batch {batch}", "int8", "ours", 10, lambda rates=rates, batch=batch: int8_rate(
                            mg_dir, rates.get("hf"), batch))
                models.clear()

            def compiled_cells(shape: Shape) -> None:  # (~10-20 s each on an H200)
                for dtype_name in args.dtypes:
                    dtype = DTYPES[dtype_name]
                    train_cell(folder, shape, dtype_name, f"ours, compiled ({args.compile_mode})",
                               lambda: Ours(folder, device, dtype, compile=True, compile_mode=args.compile_mode), 45)

            # Each shape's compiled cells right after its eager ones: the recipe's 8x128, launch-bound,
            # is what CUDA graphs are for, and must not be starved by the large shape's eager cells.
            for shape in args.shapes:
                for dtype_name in args.dtypes:
                    dtype = DTYPES[dtype_name]
                    train_cell(folder, shape, dtype_name, "transformers", lambda: Transformers(folder, device, dtype))
                    train_cell(folder, shape, dtype_name, "ours", lambda: Ours(folder, device, dtype))
                if shape in args.compile_shapes:
                    compiled_cells(shape)
            for shape in args.compile_shapes:
                if shape not in args.shapes:
                    compiled_cells(shape)
    except KeyboardInterrupt:  # timeout -s INT: what was timed is still reported
        rows.append(("(interrupted)", "", "", "", "", "", "", ""))
    finally:
        against = ", ".join(f"{p} against {name} {rate / 1e12:,.1f}" for p in args.dtypes
                            for rate, name in [matmul_peak_for(p, peaks)])
        print(f"\n{info['name']}; MFU against each precision's measured matmul peak, TFLOP/s: {against}; "
              f"{time.monotonic() - started:.0f} s\n")
        print("| what | shape | precision | side | step | tokens/s | vs transformers | MFU |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print("\n".join(["", *notes]))
    # transformers running out of memory (its fp32 64x1024 step holds ~80 GB on an 80 GB card) is a
    # row without a reference, not a failure of ours
    failed = [row for row in rows
              if row[4].startswith("error") or (row[4] == "out of memory" and not row[3].startswith("transformers"))]
    if failed:
        print(f"gpu_check: {len(failed)} of {len(rows)} rows failed (see the table)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
