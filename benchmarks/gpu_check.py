"""The timing half of benchmarks/gpu_check.sh: training steps and decoding on one CUDA GPU, ours
against transformers + torch.optim.AdamW / transformers' generate(), same weights, same run.

    training   one optimizer step (bench_train.py's two sides) at the recipe's 8 x 128 and at a
               GPU-sized batch (default 64 x 1024) in fp32 (TF32 matmuls, as train.py), bf16
               autocast and fp16 autocast + GradScaler; ours also compiled (--compile shapes);
               median step time over --steps steps after warm-up, tokens/s, and MFU against the
               GPU's measured bf16 matmul peak (an 8192^3 matmul)
    decode     batch 1 and 8, 100 new tokens (top-k 50, top-p 0.95), ours vs generate(), fp32
               and bf16: decode tokens/s after the first token

A time budget (--budget seconds) keeps the whole check under its limit: cells left when it runs
out are reported as skipped. Ends with one table. Run through gpu_check.sh (which runs the CUDA
tests first); without CUDA it stops with one line.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]  # "The quick brown fox ..." ids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8x128", "64x1024"], help="batch x block shapes to train at")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], help="training precisions")
    p.add_argument("--compile-shapes", nargs="*", default=["8x128"], help="shapes at which ours is also "
                   "timed compiled, in every precision (default: 8x128; compiling takes ~30 s each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per cell (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--tokens", type=int, default=100, help="new tokens per decode run (default: 100)")
    p.add_argument("--budget", type=float, default=330, help="seconds for all timings (default: 330)")
    return p.parse_args(argv)


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


def decode_rate(model, hf: bool, batch: int, tokens: int) -> float:
    """Decode tokens/s after the first token, ours (minigpt.sampling.generate) or transformers'."""
    import torch

    if hf:
        ids = torch.tensor([PROMPT] * batch, device="cuda")
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=50, top_p=0.95, pad_token_id=50256)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=1, **kwargs)  # the first token (prefill), timed apart
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kwargs)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
            torch.cuda.synchronize()
            total = time.perf_counter() - start
        assert out.shape[1] == len(PROMPT) + tokens
        return (tokens - 1) * batch / (total - first)
    from minigpt.sampling import SamplingConfig, generate

    config = SamplingConfig(max_new_tokens=tokens, top_k=50, top_p=0.95)
    list(generate(model, PROMPT, config, batch, torch.Generator().manual_seed(0), eos_id=None))  # warm-up
    times = [time.perf_counter() for _ in generate(model, PROMPT, config, batch, torch.Generator().manual_seed(0),
                                                    eos_id=None)]  # no early stop: every step timed
    return (tokens - 1) * batch / (times[-1] - times[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was timed", file=sys.stderr)
        return 1
    import hardware
    from bench_train import Ours, Transformers, model_folder, step_flops

    from minigpt.config import GPTConfig
    from minigpt.runtime import DTYPES, setup_device

    started = time.monotonic()
    device, _ = setup_device("cuda", "fp32")  # TF32 for fp32, as train.py
    info = hardware.describe(device)
    print(hardware.hardware_line(info), flush=True)
    try:
        import transformers  # noqa: F401  (the oracle side; optional here)

        have_hf = True
    except ImportError:
        have_hf = False
        print("transformers is not installed here: ours only", flush=True)
    rows: list[tuple[str, ...]] = []

    def left() -> float:
        return args.budget - (time.monotonic() - started)

    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(argparse.Namespace(model=None), Path(tmp))
        config = GPTConfig.from_hf(json.loads((folder / "config.json").read_text()))
        for shape in args.shapes:
            b, t = (int(x) for x in shape.split("x"))
            batch = torch.randint(0, 50257, (b, t), generator=torch.Generator().manual_seed(0)).to(device)
            flops = step_flops(config, b * t, t)
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                makers = ([lambda: Transformers(folder, device, dtype)] if have_hf else []) + \
                    [lambda: Ours(folder, device, dtype)] + \
                    ([lambda: Ours(folder, device, dtype, compile=True)] if shape in args.compile_shapes else [])
                base = None
                for make in makers:
                    if left() < 20:
                        rows.append(("train", shape, dtype_name, "(skipped: time budget)", "", "", "", ""))
                        continue
                    side, name = None, "?"
                    try:
                        side = make()
                        name = side.name
                        seconds = median_step(side, batch, args)
                    except torch.cuda.OutOfMemoryError:
                        rows.append(("train", shape, dtype_name, name, "out of memory", "", "", ""))
                        continue
                    finally:
                        del side
                        gc.collect()
                        torch.cuda.empty_cache()
                    base = base or (seconds if name == "transformers" else None)
                    rows.append(("train", shape, dtype_name, name, f"{seconds * 1000:.1f} ms",
                                 f"{b * t / seconds:,.0f}", f"{base / seconds:.2f}x" if base else "",
                                 f"{flops / seconds / info['bf16']:.1%}"))
                    print(" | ".join(rows[-1]), flush=True)
        from minigpt.loading import convert_to_minigpt, load_model

        mg_dir = convert_to_minigpt(folder, Path(tmp) / "minigpt")
        for dtype_name in ("fp32", "bf16"):
            dtype = DTYPES[dtype_name]
            ours, _ = load_model(mg_dir, device, dtype)
            hf_model = None
            if have_hf:
                from transformers import GPT2LMHeadModel

                hf_model = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()
                hf_model.generation_config.eos_token_id = None
            for batch in (1, 8):
                if left() < 10:
                    rows.append(("decode", f"batch {batch}", dtype_name, "(skipped: time budget)", "", "", "", ""))
                    continue
                base = decode_rate(hf_model, True, batch, args.tokens) if hf_model is not None else None
                rate = decode_rate(ours, False, batch, args.tokens)
                if base:
                    rows.append(("decode", f"batch {batch}", dtype_name, "transformers generate()", "",
                                 f"{base:,.1f}", "1.00x", ""))
                rows.append(("decode", f"batch {batch}", dtype_name, "ours", "", f"{rate:,.1f}",
                             f"{rate / base:.2f}x" if base else "", ""))
                print(" | ".join(rows[-1]), flush=True)
            del ours, hf_model
            gc.collect()
            torch.cuda.empty_cache()

    print(f"\n{info['name']}; bf16 matmul peak {info['bf16'] / 1e12:,.1f} TFLOP/s (MFU is against it); "
          f"{time.monotonic() - started:.0f} s\n")
    print("| what | shape | precision | side | step | tokens/s | vs transformers | MFU |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
