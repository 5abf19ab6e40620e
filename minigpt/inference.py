"""Inference-time weight layouts and kernels, chosen by measuring on the machine at hand.

Decoding one sequence multiplies a single activation row by every weight matrix of the model, once
per token. That is bound by how fast the weights stream from memory, not by arithmetic, so the
layout, the number format and the kernel that reads them decide the speed. Which kernel is fastest
depends on the CPU, and the differences are large (50,257 x 768 LM head, one activation row):

  AMD EPYC, AVX2 only       fp32 W cut in one slice per thread (`torch.bmm`) beats `addmm` on a
                            transposed copy, which beats `F.linear`; bf16 `torch.mv` is fast
                            while bf16 `F.linear` is not (no bf16 instructions)
  AMD EPYC, AVX-512 BF16    fp32 `F.linear` 13.4 ms, MKL-prepacked 9.0; bf16 `F.linear` 6.9,
                            oneDNN-prepacked 4.4, as fp16 in FBGEMM's fp16 GEMM 3.0
  Intel Xeon with AMX (VM)  fp32 `addmm` 8.0 ms; bf16 `bmm` on row blocks 7.8 (3.2 for 2/3 of
                            the rows), fbgemm-fp16 5.1-5.5, `F.linear` 9.8

So no one choice is right everywhere. For each precision there are candidate kernels (grouped in
`Layout`s: a weight layout and the kernels that read it) that compute the same `y = x W^T + b`:

  fp32   addmm-t   W stored transposed (in, out), `addmm`          (`TransposedLinear`)
         linear    W as it is (out, in), `F.linear`                (`DenseLinear`)
         bmm-split W in column slices, one per thread, `torch.bmm` (`SplitLinear`)
         bmm-rows  W in blocks of rows, one per thread, `torch.baddbmm` (`RowSplitLinear`): faster than
                   column slices for the projections back to the residual stream
         mkl       W prepacked by MKL, `torch.ops.mkl._mkl_linear` (`MklLinear`; holds W as well)
  bf16   mv-upcast bf16 (out, in); `torch.mv` for one row; for several, W read in chunks converted
                   to fp32, fp32 matmuls: the fast path on CPUs without bf16 instructions when
                   several rows make the product compute-bound (`DenseLinear`)
         linear    bf16 (out, in), `F.linear` (`DenseLinear`)
         bmm-rows  bf16 blocks of rows, one per thread, `torch.baddbmm` (oneDNN's where bf16 is native)
         onednn    W prepacked by oneDNN, `torch.ops.mkldnn._linear_pointwise` (`OneDnnLinear`)
         fbgemm-fp16  W as fp16 (exact for bf16 weights in fp16's range) prepacked by FBGEMM, fp32
                   activations and sums (`Fp16Linear`): streams W fastest for one row on AVX-512 BF16
  int8   int8mm    weight-only int8, one scale per output channel, `torch._weight_int8pack_mm`
         upcast    the same int8 weights converted to fp32 in chunks (exactly: q * s fits fp32)
         fbgemm    int8 W prepacked by FBGEMM, integer products; activations rounded to 14 bits
                   and split into two small integer digits (`FbgemmInt8Linear`)

Each kernel chosen is also timed on fewer threads (half, one): a small layer on many cores can cost more in
handing out work than it saves; it runs on fewer where that is >= 10% faster twice in a row (`OnThreads`).

The layouts are in `minigpt/layouts.py` and `minigpt/quantized.py`. `prepare_for_inference` times
the candidates this torch build has on the model's real shapes (the first layers of each group of
same-shaped layers, the LM head's first rows and then the best two on all of it, for the rows one
decoding step feeds, each pass after a read that evicts the layer, as decoding's reads of the other
weights do), keeps the fastest and drops the rest: ~1 s (2-3 s on the Intel Xeon VMs, half of it
the evicting reads), building the candidates included (MKL's or FBGEMM's packing of the LM head: up
to a second on 2 cores). Cached per process and shape;
`kernel_summary` names the choice (and "on N threads").
`model.py` knows nothing of this; every candidate computes the same function up to rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .errors import MinigptError, integer_at_least
from .layouts import (FUSIBLE_KERNELS, DenseLinear, Fp16Linear, MklLinear, OneDnnLinear, OnThreads, RowSplitLinear,
                      SharedEmbedding, SplitLinear, TransposedLinear, fp16_refuses, refuse_loading)
from .model import GPT
from .quantized import FbgemmInt8Linear, Int8Linear, int8mm_refuses
from .runtime import activation_dtype, check_fits, cpu_cache_bytes, evicting_bytes, model_device, wait_for

QUANTIZATIONS = ("int8",)
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}  # bytes a weight takes in each precision
TIMING_ROUNDS = 5  # timed passes per candidate: the best of them is the least disturbed one
EXTRA_MEMORY_MARGIN = 0.9  # a kernel holding a second copy of W must be >= 10% faster to be chosen
FEWER_THREADS_MARGIN = 0.9  # and fewer threads (torch's pool resizing between layers is not timed)


# --- the candidates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A weight layout and the kernels that read it (switched by setting the layer's `kernel`).
    build(weight, bias, rows, tied, kernel) makes a layer: `rows` is the row count a decoding step
    feeds it, `tied` whether it is the LM head (whose rows also embed the tokens)."""

    kernels: tuple[str, ...]
    build: Callable[[torch.Tensor, torch.Tensor | None, int, bool, str], nn.Module]
    available: Callable[[torch.device], bool] = lambda device: True
    needs: str = ""  # what `available` looks for, for the refusal of a kernel asked for where it is missing
    extra_memory: bool = False  # holds a second copy of W: must win by EXTRA_MEMORY_MARGIN
    refuses: Callable[[str, torch.Tensor], str | None] = lambda kernel, weight: None  # why not this W, or None


def _has_op(namespace: str, name: str) -> bool:  # (an op this torch build has)
    return hasattr(getattr(torch.ops, namespace), name)


def _mkl_ok(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkl.is_available() and _has_op("mkl", "_mkl_linear")


def _onednn_ok(device: torch.device) -> bool:
    return (device.type == "cpu" and _has_op("mkldnn", "_linear_pointwise")
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _fbgemm_ok(op: str) -> Callable[[torch.device], bool]:
    """Whether FBGEMM runs the quantized op `op` on a device (this build has it, FBGEMM is the engine)."""
    return lambda device: (device.type == "cpu" and _has_op("quantized", op)
                           and torch.backends.quantized.engine in ("x86", "fbgemm"))


def _thread_parts() -> int:  # slices of W for the split layouts: one per thread (at least two)
    return max(2, torch.get_num_threads())


def _thread_counts(device: torch.device) -> list[int]:
    """The thread counts a kernel is timed on, most first: all the process has, half, one (off the
    CPU all only: torch's thread count governs CPU work)."""
    every = torch.get_num_threads()
    return sorted({every, max(1, every // 2), 1}, reverse=True) if device.type == "cpu" else [every]


def _has_int8mm(device: torch.device) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", device.type.upper())


def _int8mm_refuses(kernel: str, weight: torch.Tensor) -> str | None:
    return int8mm_refuses(kernel, weight.size(1))


LAYOUTS: dict[str, tuple[Layout, ...]] = {  # the candidates per precision ("int8": --quantize int8)
    "fp32": (
        Layout(("addmm-t",), lambda w, b, rows, tied, k: TransposedLinear(w, b, k)),
        Layout(("linear",), lambda w, b, rows, tied, k: DenseLinear(w, b, torch.float32, k)),
        Layout(("bmm-split",), lambda w, b, rows, tied, k: SplitLinear(w, b, _thread_parts(), k)),
        Layout(("bmm-rows",), lambda w, b, rows, tied, k: RowSplitLinear(w, b, _thread_parts(), kernel=k)),
        Layout(("mkl",), lambda w, b, rows, tied, k: MklLinear(w, b, rows, k), _mkl_ok, "MKL", extra_memory=True),
    ),
    "bf16": (
        Layout(("mv-upcast", "linear"), lambda w, b, rows, tied, k: DenseLinear(w, b, torch.bfloat16, k)),
        Layout(("bmm-rows",), lambda w, b, rows, tied, k: RowSplitLinear(w, b, _thread_parts(), torch.bfloat16, k)),
        Layout(("onednn",), lambda w, b, rows, tied, k: OneDnnLinear(w, b, rows, tied, k), _onednn_ok,
               "a CPU with native bf16 (AVX-512 BF16 or AMX)"),
        Layout(("fbgemm-fp16",), lambda w, b, rows, tied, k: Fp16Linear(w, b, tied, k),
               _fbgemm_ok("linear_dynamic_fp16"), "FBGEMM, torch's quantized engine on x86 CPUs",
               refuses=lambda kernel, weight: fp16_refuses(weight)),
    ),
    "int8": (
        Layout(("int8mm", "upcast"), lambda w, b, rows, tied, k: Int8Linear(w, b, k),
               refuses=_int8mm_refuses),
        Layout(("fbgemm",), lambda w, b, rows, tied, k: FbgemmInt8Linear(w, b, tied, k),
               _fbgemm_ok("linear_with_input_q_dq_qweight_dq_output_fp32"),
               "FBGEMM, torch's quantized engine on x86 CPUs"),
    ),
}
TIME_LAYERS = 2  # layers of a group the candidates are timed on (the rest is built with the winner)
# A matrix with more output rows (the LM head) is timed on its first rows, TIME_BYTES of them in the
# precision at hand (the whole head in int8): the candidates do not each hold a full copy at once
# (that made `sample.py`'s peak memory ~250 MB higher). 16,384 rows of int8 (12.6 MB, within a 32 MB
# L3) timed FBGEMM's head about even with int8mm's, which decoded 1.20x slower (Zen 5, compiled).
TIME_BYTES = 48 * 2**20

# (precision, the kernel names the weights allow, shape, rows, threads, device, tied, compiled) ->
# (the chosen kernel's name, its thread count), per process
_CHOICES: dict[tuple, tuple[str, int]] = {}


def available_kernels(precision: str, device: torch.device | str = "cpu") -> list[str]:
    """Names of the `precision`'s ("fp32", "bf16", "int8") candidate kernels this torch build offers on `device`."""
    if precision not in LAYOUTS:
        raise MinigptError(f"precision: unknown {precision!r} (choose from {', '.join(LAYOUTS)})")
    device = torch.device(device)
    return [k for layout in LAYOUTS[precision] if layout.available(device) for k in layout.kernels]


def _kernel_refusal(kernel: str, precision: str, device: torch.device) -> str:
    """Why `kernel` cannot run `precision` here: missing on this machine, another precision's, or unknown."""
    here = f"the {precision} kernels here: {', '.join(available_kernels(precision, device))}"
    missing = [lay.needs for lay in LAYOUTS[precision] if kernel in lay.kernels]
    if missing:  # (a layout that can be missing says what it needs)
        return f"kernel {kernel!r} needs {missing[0]}, which is not here ({here})"
    other = [p for p, layouts in LAYOUTS.items() if any(kernel in lay.kernels for lay in layouts)]
    if other:
        return f"kernel {kernel!r} is for {'/'.join(other)}, not {precision} ({here})"
    return f"kernel {kernel!r}: no {precision} kernel has that name ({here})"


def _time_pass(
    layers: list[nn.Module], x: torch.Tensor, flush: torch.Tensor | None = None, core_only: bool = False
) -> float:
    """Seconds for one pass of `x` through each of `layers` in turn (as a decoding step does).

    `core_only`: time a layer with a fusible kernel (`layouts.FUSIBLE_KERNELS`) by its product
    alone, as a compiled decoding step runs it (the ops around it fused into the graph): timed
    whole, FBGEMM's int8 layers lose the race to their eager ops, and they win compiled decoding.

    `flush`: a buffer read first, as decoding reads the model's weights between two uses of a layer:
    as many bytes, or fewer where fewer evict all this process's cache holds (measured: sysfs names
    a VM's host's cache, shared with others; `runtime.evicting_bytes`). A layer then comes from
    memory, or stays cached, as in decoding; timed from the cache, kernels rank differently (bf16
    distilgpt2 so timed on the Intel Xeon VM decoded slower than fp32). The flush also evicts the
    code, the activation and the kernels' buffers, which decoding keeps warm: the first layer warms
    them and the rest are timed. ~2 ms a pass where the cache is 32 MiB, ~7 ms on an Intel Xeon VM
    (benchmarks/HISTORY.md: "How kernels are timed" has the figures).
    """
    if flush is not None:
        flush.sum()
        if len(layers) > 1:  # warm what every layer shares (code, buffers, x); time the cold rest
            layers[0](x)
            layers = layers[1:]
    calls = [(layer.core, layer.core_input(x)) if core_only and layer.kernel in FUSIBLE_KERNELS else (layer, x)
             for layer in layers]
    wait_for(x.device)
    start = time.perf_counter()
    for call, arg in calls:
        call(arg)
    wait_for(x.device)
    return time.perf_counter() - start


def _race(
    runs: list[tuple[str, list[nn.Module], int]], x: torch.Tensor, flush: torch.Tensor | None,
    core_only: bool = False,
) -> dict[tuple[str, int], float]:
    """{(kernel, threads): best seconds} for runs of (kernel, the layers built for it, threads).

    The runs are timed in interleaved rounds (a noisy neighbour slows them alike), each keeping its
    best pass, the least disturbed one; after the second round a run whose best is over twice the
    best time is out of the race. Not after the first: one disturbed pass then dropped the fastest
    kernel for good (FBGEMM's int8 LM head in 2 of 12 prepares on the AVX-512 BF16 EPYC). Threads
    fewer than the process has: the layers run in `OnThreads`. `core_only`: see `_time_pass`."""
    every = torch.get_num_threads()
    best = {(kernel, n): float("inf") for kernel, _, n in runs}
    racing = list(runs)
    with torch.inference_mode():
        for round_ in range(TIMING_ROUNDS + 1):  # round 0: warm-up (first-call set-up)
            for kernel, layers, n in racing:
                for layer in layers:
                    layer.kernel = kernel
                on_n = layers if n == every else [OnThreads(lay, n) for lay in layers]
                seconds = _time_pass(on_n, x, flush, core_only)
                best[kernel, n] = min(best[kernel, n], seconds) if round_ else best[kernel, n]
            if round_ == 2:
                racing = [r for r in racing if best[r[0], r[2]] <= 2 * min(best.values())]
    return best


def _thread_count(kernel: str, layers: list[nn.Module], x: torch.Tensor, flush: torch.Tensor | None) -> int:
    """The threads to run `kernel`'s layers on: all of them unless fewer (`_thread_counts`) win by
    FEWER_THREADS_MARGIN in two races in a row. Why two: on a shared VM a neighbour that takes one
    core for a while slows every run that needs all cores, however interleaved, and one race then
    crowned a single thread 1.25-1.5x slower in a quiet minute (once in 10 prepares)."""
    thread_counts = _thread_counts(x.device)
    every = thread_counts[0]
    if len(thread_counts) == 1:
        return every
    for _ in range(2):
        on = _race([(kernel, layers, n) for n in thread_counts], x, flush)
        fewer = min(thread_counts[1:], key=lambda n: on[kernel, n])
        if on[kernel, fewer] >= FEWER_THREADS_MARGIN * on[kernel, every]:
            return every
    return fewer


def _time_rows(precision: str, w: torch.Tensor) -> int:  # the output rows of `w` a timing pass computes
    return min(len(w), max(1, TIME_BYTES // (w.size(1) * WEIGHT_BYTES[precision])))


def _settle(candidates: list[tuple[Layout, str]], precision: str,
            weights: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int) -> list[tuple[Layout, str]]:
    """The candidates that take all `weights` (`Layout.refuses`), if their race fits in memory: else a MinigptError."""
    refusals = {k: next(filter(None, (lay.refuses(k, w) for w, _ in weights)), None) for lay, k in candidates}
    if all(refusals.values()):
        shape = "x".join(map(str, weights[0][0].shape))
        raise MinigptError(f"no {precision} kernel takes these {shape} layers: " + "; ".join(refusals.values()))
    settled = [(lay, k) for lay, k in candidates if refusals[k] is None]
    if len(settled) > 1:  # (one is used untimed; bmm-split makes its output twice, in slices and joined)
        width, out = weights[0][0].size(1), _time_rows(precision, weights[0][0])
        check_fits(rows * (width + 2 * out) * 4, weights[0][0].device, f"--num-samples {rows}",
                   "the kernels' timing passes", f"{rows} rows x {width} activations and 2 x {out} outputs")
    return settled


def _pick(candidates: list[tuple[Layout, str]], best: dict[tuple[str, int], float]) -> tuple[Layout, str]:
    """The fastest of `candidates` on all threads (`best`: a race's); one holding a second W must win
    by EXTRA_MEMORY_MARGIN."""
    every = torch.get_num_threads()
    lean = [c for c in candidates if not c[0].extra_memory] or candidates
    winner = min(lean, key=lambda c: best[c[1], every])
    heavy = [c for c in candidates
             if c[0].extra_memory and best[c[1], every] < EXTRA_MEMORY_MARGIN * best[winner[1], every]]
    return min(heavy, key=lambda c: best[c[1], every]) if heavy else winner


def _choose(
    candidates: list[tuple[Layout, str]], key: tuple, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
    rows: int, dtype: torch.dtype, tied: bool, flush: torch.Tensor | None, compiled: bool = False,
) -> list[nn.Module]:
    """This group of same-shaped layers, built with the fastest of `candidates` ((layout, kernel),
    those `_settle` left), run on the fastest thread count (fewer than the process has: in `OnThreads`).

    The candidates' layouts are built for the group's first TIME_LAYERS layers (their first
    TIME_BYTES of output rows) and raced on all threads (`_race`). Where that cut a matrix (the LM
    head), the two fastest are built whole and raced again, the final: a kernel's speed can change
    with the shape (on the Intel Xeon VM oneDNN's bf16 `bmm` streamed 49,152 rows of 768 at 18 GB/s,
    50,256 at 10: `bmm-rows` won the heat on the head's first rows and was 1.6x slower on all of
    it). Then the winner alone is raced on each thread count (`_thread_count`). `flush`: a buffer
    each pass first reads (`_time_pass`), or None. The choice is cached under `key`, which
    names the candidates; a single one is used on all threads, untimed. `compiled`: timed as a compiled
    decoding step runs the layers (`_time_pass`'s core_only), and a fusible kernel runs on all threads."""
    every = torch.get_num_threads()
    if len(candidates) == 1:
        _CHOICES[key] = (candidates[0][1], every)
    timed: list[nn.Module] = []  # the winner's layers built for timing are kept, not built again
    if key not in _CHOICES:
        def rows_of(w: torch.Tensor, b: torch.Tensor | None, part: slice):  # (W, bias) cut to output rows
            return w[part], None if b is None else b[part]

        sample = [rows_of(w, b, slice(_time_rows(key[0], w))) for w, b in weights[:TIME_LAYERS]]  # (key[0]: precision)
        if flush is not None and len(sample) == 1 and len(sample[0][0]) > 1:  # one matrix: half warms, half is timed
            half = len(sample[0][0]) // 2
            sample = [rows_of(*sample[0], slice(half)), rows_of(*sample[0], slice(half, None))]
        first: dict[int, tuple[Layout, str]] = {}  # each layout is built for its first fitting kernel
        for layout, kernel in candidates:
            first.setdefault(id(layout), (layout, kernel))
        built = {id(layout): [layout.build(w, b, rows, tied, kernel) for w, b in sample]
                 for layout, kernel in first.values()}
        own = torch.Generator(weights[0][0].device).manual_seed(0)  # (torch's own RNG untouched: seeded runs alike)
        x = torch.randn(rows, weights[0][0].size(1), device=own.device, generator=own).to(dtype)  # (pages written)
        best = _race([(kernel, built[id(layout)], every) for layout, kernel in candidates], x, flush, compiled)
        layout, kernel = _pick(candidates, best)
        timed = built[id(layout)]
        if any(sw.shape != w.shape for (sw, _), (w, _) in zip(sample, weights)):  # a matrix cut: the final
            runner_up = min((c for c in candidates if c[1] != kernel), key=lambda c: best[c[1], every])
            built.clear()  # (the heats' layers: the finalists are built whole)
            whole = {k: [lay.build(*weights[0], rows, tied, k)] for lay, k in ((layout, kernel), runner_up)}
            layout, kernel = _pick([(layout, kernel), runner_up], _race([(k, lays, every) for k, lays in whole.items()],
                                                                        x, flush, compiled))
            timed = whole.pop(kernel)
            del whole
        fused = compiled and kernel in FUSIBLE_KERNELS
        _CHOICES[key] = (kernel, every if fused else _thread_count(kernel, timed, x, flush))
        del built
    kernel, threads = _CHOICES[key]
    layout = next(lay for lay, k in candidates if k == kernel)
    layers = timed + [layout.build(w, b, rows, tied, kernel) for w, b in weights[len(timed):]]
    for layer in layers:
        layer.kernel = kernel
    return layers if threads == every else [OnThreads(layer, threads) for layer in layers]


def prepare_for_inference(
    model: GPT, quantize: str | None = None, batch_size: int = 1, kernel: str | None = None,
    compiled: bool = False,
) -> GPT:
    """Swap `model`'s Linear layers and tied LM head for the fastest layouts measured here, in place.

    The candidates are those of the model's dtype (fp32 or bf16), or of `quantize="int8"` whatever
    the dtype. `batch_size`: the sequences decoded together, i.e. the rows each decoding step feeds
    a layer, which the kernels are timed on. `kernel`: use this candidate for every layer instead of
    measuring (tests, benchmarks). `compiled`: time the candidates as a compiled decoding step
    (`minigpt.compiled_decoding`) runs them, where the ops around FBGEMM's and int8mm's products
    fuse (`_time_pass`). On a GPU only quantization changes anything: its matmul libraries handle
    the standard layout well. On the CPU only the matmul weights stay bf16 or int8, the rest runs in
    fp32. The model comes back in eval mode; `kernel_summary(model)` names the kernels chosen.
    Where it swapped the layers (on the CPU, or with int8) it is for inference only: no gradients,
    not savable as a checkpoint, and a second call (a notebook cell run again) is refused.
    """
    if isinstance(model.transformer.wte, SharedEmbedding):
        raise MinigptError("the model is already prepared for inference: use it as it is, or load it again to redo it")
    if model.lm_head.weight is not model.transformer.wte.weight:  # (a prepared model embeds with the head's rows)
        raise MinigptError("this model's LM head is not tied to its token embeddings (wte), as GPT-2's is and a "
                           "prepared model's must be: call model.tie_weights() first")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MinigptError(f"quantize: unknown scheme {quantize!r} (choose from {', '.join(QUANTIZATIONS)})")
    batch_size = integer_at_least(batch_size, 1, "batch_size")
    device, dtype = model_device(model), activation_dtype(model)
    if quantize == "int8":
        if not _has_int8mm(device):
            raise MinigptError(f"--quantize int8: this PyTorch build has no int8 weight-only kernel for "
                               f"{device.type}" + ("" if device.type == "cpu" else " (try --device cpu)"))
        precision = "int8"
    elif device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        if kernel is not None:
            raise MinigptError(f"kernel {kernel!r}: only fp32 and bf16 models on the CPU, and --quantize int8, "
                               "have kernels to choose from")
        return model.eval()  # (nothing swapped: still the plain model; fp16 is refused on the CPU by setup_device)
    else:
        precision = "fp32" if dtype == torch.float32 else "bf16"
    candidates = [(lay, k) for lay in LAYOUTS[precision] if lay.available(device) for k in lay.kernels]
    if kernel is not None:
        candidates = [(lay, k) for lay, k in candidates if k == kernel]
        if not candidates:
            raise MinigptError(_kernel_refusal(kernel, precision, device))

    # Groups of same-shaped layers in the same role; each group gets one kernel.
    groups: dict[str, list[tuple[nn.Module, str]]] = {}
    for block in model.transformer.h:
        for role, parent in (("attn", block.attn), ("mlp", block.mlp)):
            for name in ("c_attn", "c_fc", "c_proj"):
                if isinstance(getattr(parent, name, None), nn.Linear):
                    groups.setdefault(f"{role}.{name}", []).append((parent, name))
    stream_dtype = prepared_stream_dtype(model, quantize)
    groups["lm_head"] = [(model, "lm_head")]  # (the tied head last: the embedding follows it)
    weights = {role: [(getattr(p, n).weight, getattr(p, n).bias) for p, n in m] for role, m in groups.items()}
    settled = {role: _settle(candidates, precision, w, batch_size) for role, w in weights.items()}  # before any
    keys = {role: (precision, tuple(k for _, k in settled[role]), ws[0][0].shape, batch_size, torch.get_num_threads(),
                   device.type, role == "lm_head", compiled) for role, ws in weights.items()}
    weight_bytes = sum(w.numel() for group in weights.values() for w, _ in group) * WEIGHT_BYTES[precision]
    timing = device.type == "cpu" and any(len(settled[r]) > 1 and keys[r] not in _CHOICES for r in keys)
    # (decoding reads the other weights between two uses of a layer: so does a timed pass, `_time_pass`)
    flush = torch.ones(evicting_bytes(min(weight_bytes, 2 * cpu_cache_bytes())) // 4) if timing else None
    with torch.no_grad():  # swap: a refusal leaves the model as it was
        for role, ws in weights.items():
            layers = _choose(settled[role], keys[role], ws, batch_size, stream_dtype, role == "lm_head", flush, compiled)
            for (parent, name), layer in zip(groups[role], layers):
                setattr(parent, name, layer)
    model.transformer.wte = SharedEmbedding(model.lm_head, stream_dtype)
    model.transformer.wpe.to(stream_dtype)
    for module in model.modules():
        module.register_load_state_dict_pre_hook(refuse_loading)  # (the model's, and each part's own)
        if isinstance(module, nn.LayerNorm):
            module.to(stream_dtype)
    # No gradients: a step would train only wpe and the LayerNorms, and out= kernels refuse autograd
    return model.eval().requires_grad_(False)


def prepared_stream_dtype(model: GPT, quantize: str | None = None) -> torch.dtype:
    """The dtype of the residual stream (embeddings, LayerNorms, attention, KV cache) once
    `prepare_for_inference(model, quantize)` has run: fp32 on the CPU wherever it swaps the layers.
    There only the matmul weights keep the model's precision, as in llama.cpp's BF16 and Q8_0 models:
    no conversions around the layers, and fp32 attention is the faster one on the CPU (distilgpt2 in
    bf16 decoded 207.0 against 181.5 tokens/s; at 8 rows 637 against 606)."""
    device, dtype = model.transformer.wpe.weight.device, model.transformer.ln_f.weight.dtype
    swapped = quantize is not None or dtype in (torch.float32, torch.bfloat16)
    return torch.float32 if device.type == "cpu" and swapped else dtype


def kernel_summary(model: nn.Module) -> str:
    """One line naming the kernel of each group of layers, e.g. "kernels: lm_head onednn,
    attn.c_attn onednn, attn.c_proj int8mm on 1 thread, ..." (a thread count only where it is fewer
    than all; empty when the model kept its standard layout)."""
    chosen: dict[str, str] = {}
    head = getattr(model, "lm_head", None)
    wrapped = {id(m.layer) for m in model.modules() if isinstance(m, OnThreads)}
    for name, module in model.named_modules():
        if hasattr(module, "kernel") and hasattr(module, "embed") and id(module) not in wrapped:
            role = "lm_head" if module is head else ".".join(name.split(".")[-2:])
            on = f" on {module.threads} thread{'s' * (module.threads > 1)}" if isinstance(module, OnThreads) else ""
            chosen.setdefault(role, module.kernel + on)
    return ("kernels: " + ", ".join(f"{role} {k}" for role, k in chosen.items())) if chosen else ""
