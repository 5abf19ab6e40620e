"""Decoding compiled whole: one `torch.compile` graph for each new token, over a static KV cache.

Why: a decoding step of a prepared model runs ~450 small PyTorch ops per token (distilgpt2, int8:
LayerNorms, residual adds, views, the int8 layers' activation digits), and on a CPU each costs more
than its arithmetic, ~13 us in place against 2-4 us hot, because its code and data come back from
memory after every layer's weights have streamed through the caches. Compiled, the step is one
graph: inductor fuses those ops into a few C++ loops around the matmuls, called from a C++ wrapper
(`cpp_wrapper`), attention written out. On the 2-core AMD EPYC with AVX-512 BF16 (greedy, one
process, interleaved runs, the same tokens as eager) int8 decoded 142.3 against 118.4 tokens/s,
then 162.6 against 151.1 with the C++ wrapper and the attention against without, fp32 and bf16
even (benchmarks/HISTORY.md); with the steps it races since (see `CompiledDecoding`), int8 reached
0.91x of llama.cpp's Q8_0 (0.50-0.53x eager). Compiling takes ~45-50 s (fp32) to ~50-70 s (int8)
on 2 Zen 4 cores with an empty inductor cache; with it int8 ~7 s, fp32 ~20 s (its inductor step not cached).

How: `DecodeStep` is the model's forward pass for one token per sequence (`GPT.forward` with
`T == 1`, calling the same modules), written so that one graph serves every step: the position is
a tensor, keys and values go into the cache with `index_copy_`, and the cache is handed over as
views of its filled positions, the new one included, whose length dynamo is told is dynamic
(`torch._dynamo.mark_dynamic`): inductor then writes the attention loops for any length, so a
process compiles once per batch size, whatever the prompt and the number of new tokens, and
attention reads only the positions filled (not a cache bucketed to powers of two, a graph per
bucket: benchmarks/HISTORY.md, "Tried and not kept"). The prompt itself (prefill) runs eager.
In the kernels' step, only the layers whose kernels fuse with the ops around them (FBGEMM's and
int8mm's; on a GPU, plain `nn.Linear`s: see `compilable`) are compiled through, on all threads;
every other layer is one opaque op (`minigpt/opaque.py`) running its eager forward, thread count
included. The "inductor" step (`frozen_gemm`) has no opaque layers: inductor writes every product.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinigptError, reason
from .inference import available_kernels
from .layouts import FUSIBLE_KERNELS, OnThreads
from .model import GPT, KVCache
from .opaque import OpaqueLayer
from .quantized import FbgemmInt8Linear, Int8Linear, int8mm_refuses
from .runtime import activation_dtype, model_device, prepare_cpu_compile, wait_for

# Graphs of `DecodeStep.forward` a process may hold: one per model and batch size, all compiled from
# the same code, where dynamo keeps 8 by default (with fullgraph=True the 9th is an error: a
# benchmark preparing 3 precisions at 2 batch sizes hit it).
GRAPHS_KEPT = 64
# How far a compiled step's logits may be from the eager model's, as a fraction of the largest: measured
# within 1e-4 for int8 (fused activation digits round an odd value to the next level), 2e-6 for fp32 and
# for bf16 weights on the CPU (whose activations are fp32). With bf16 or fp16 activations (a GPU) each
# side rounds every op to 8 or 11 bits, and differently (the step writes attention out): distilgpt2's
# shape, random weights, measured up to 9.4e-3 in bf16 and 1.3e-3 in fp16 (eager, on the CPU).
AGREEMENT = {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# inductor's options for the step with frozen weights: it times its own C++ GEMM against ATen's for
# each product (max-autotune) and keeps the faster (freezing, which lets it pack W, is set per call),
# without printing its timing tables on stderr
GEMM_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
STEP_NAMES = {"kernels": "products by the chosen kernels", "inductor": "products by inductor's GEMMs",
              "fbgemm": "products by FBGEMM on every layer", "cudagraphs": "one CUDA graph a token",
              "eager": "the model's own forward"}  # what decodes a token, per step (describe, stats_note)
TIMING_ROUNDS, TIMING_TOKENS = 3, 16  # warm_up's race between two compiled steps: ~0.5 s for distilgpt2


def compilable(layer: nn.Module, out_features: int) -> nn.Module:
    """`layer` itself where compiling through it pays (`layouts.FUSIBLE_KERNELS`: the ops around its
    product, such as FBGEMM's activation digits, fuse; run on all threads; or a plain `nn.Linear` on
    a GPU, whose product is cuBLAS's either way, its bias and the ops around it then fused), else
    one opaque call of its eager forward: on the CPU inductor's own code for one row of fp32 or bf16
    was slower than the kernels timing chose (fp32 decoding 26.8 against 67.6 tokens/s when traced
    through; bf16 even)."""
    inner = _unwrapped(layer)
    on_gpu = type(inner) is nn.Linear and inner.weight.device.type != "cpu"
    return inner if on_gpu or getattr(inner, "kernel", None) in FUSIBLE_KERNELS else OpaqueLayer(layer, out_features)


def frozen_gemm(layer: nn.Module) -> nn.Module:
    """`layer` as the step with frozen weights (`GEMM_OPTIONS`, freezing) computes it, a product that
    inductor writes itself: fp32 as `FrozenGemm`, int8 as its `int8mm_twin` (see `CompiledDecoding`)."""
    return int8mm_twin(layer) if _is_int8(layer) else FrozenGemm(layer)


class FrozenGemm(nn.Module):
    """An fp32 layer as the plain product `F.linear(x, W, b)` on its (out, in) weight (`dense()`), for
    a step compiled with the weights frozen into the graph as constants (`frozen_gemm`)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        weight, bias = _unwrapped(layer).dense()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _unwrapped(layer: nn.Module) -> nn.Module:
    """The layout itself, out of its `OnThreads` (a compiled graph runs it on all threads)."""
    return layer.layer if isinstance(layer, OnThreads) else layer


def _layers(model: GPT) -> list[nn.Module]:
    """The model's product layers: the LM head, then each block's four."""
    return [model.lm_head] + [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc,
                                                                      b.mlp.c_proj)]


def _is_int8(layer: nn.Module) -> bool:
    return isinstance(_unwrapped(layer), (Int8Linear, FbgemmInt8Linear))


def int8mm_twin(layer: nn.Module) -> Int8Linear:
    """An int8 layer as an `int8mm` layer (bf16 activations), whose product inductor writes itself once
    the weights are frozen: the same q (quantizing q * s gives it back, each row's largest |q| being
    127), the scales rounded to bf16 (int8mm's), the same bias. An int8mm layer is its own twin."""
    inner = _unwrapped(layer)
    if inner.kernel == "int8mm":
        return inner
    q = inner.qweight if isinstance(inner, Int8Linear) else inner.int8_weight()
    return Int8Linear(q.float() * inner.scale.float().unsqueeze(1), inner.bias, kernel="int8mm")


def fbgemm_twin(layer: nn.Module) -> FbgemmInt8Linear:
    """An `int8mm` layer's int8 weights in FBGEMM's kernel: the same q and scales (quantizing q * s
    again gives them back exactly, each row's largest |q| being 127), the same bias."""
    inner = _unwrapped(layer)
    return FbgemmInt8Linear(inner.qweight.float() * inner.scale.float().unsqueeze(1), inner.bias, keep_rows=False)


def _has_fp32_dense(layer: nn.Module) -> bool:
    inner = _unwrapped(layer)
    # (each layout's first buffer is its W, in whatever form; dense() may copy)
    return hasattr(inner, "dense") and next(inner.buffers()).dtype == torch.float32


class DecodeStep(nn.Module):
    """`model`'s logits for one new token per sequence, its keys and values written into the cache.

    forward(idx (B, 1), pos (1,), keys, values) -> logits (B, vocab): `pos` is the new token's
    position, keys / values the cache's per-layer (B, nh, pos + 1, hs) views of the positions up to
    and including it (those before it filled); with `whole_cache`, the whole (B, nh, max_len, hs)
    cache, attention masking the positions after `pos`, so that every token has the same shapes
    (what a CUDA graph replays). The same computation as `GPT.forward` for one token, on the same
    modules.
    """

    def __init__(self, model: GPT, frozen_gemms: bool = False, twins: dict | None = None,
                 whole_cache: bool = False) -> None:
        super().__init__()
        self.model = model
        self.whole_cache = whole_cache
        C, V = model.config.n_embd, model.config.vocab_size
        twins = twins or {}  # a layer of the model -> the layer that computes its product here

        def layer(module: nn.Module, out_features: int) -> nn.Module:
            return frozen_gemm(module) if frozen_gemms else compilable(twins.get(module, module), out_features)

        self.layers = nn.ModuleList(
            nn.ModuleList([layer(b.attn.c_attn, 3 * C), layer(b.attn.c_proj, C),
                           layer(b.mlp.c_fc, 4 * C), layer(b.mlp.c_proj, C)])
            for b in model.transformer.h
        )
        self.lm_head = layer(model.lm_head, V)

    def forward(
        self, idx: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> torch.Tensor:
        t = self.model.transformer
        B, C, nh = idx.size(0), self.model.config.n_embd, self.model.config.n_head
        x = t.drop(t.wte(idx) + t.wpe(pos))  # (B, 1, C)
        # (the whole cache: the positions after pos hold nothing yet, or an earlier run's keys)
        unfilled = torch.arange(keys[0].size(2), device=pos.device) > pos if self.whole_cache else None
        for block, (c_attn, c_proj, c_fc, mlp_proj), k_cache, v_cache in zip(t.h, self.layers, keys, values):
            q, k, v = c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (z.view(B, 1, nh, C // nh).transpose(1, 2) for z in (q, k, v))  # (B, nh, 1, hs)
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            # softmax(q K^T / sqrt(hs)) V over the positions so far (a view of them needs no mask), written
            # out: SDPA's kernel for one query cost ~70 us a layer in place on a CPU; inductor fuses this
            att = (q @ k_cache.transpose(-2, -1)) / math.sqrt(C // nh)  # (B, nh, 1, pos + 1 or max_len)
            if unfilled is not None:
                att = att.masked_fill(unfilled, float("-inf"))
            y = att.softmax(dim=-1) @ v_cache  # (B, nh, 1, hs)
            x = x + block.attn.resid_dropout(c_proj(y.transpose(1, 2).reshape(B, 1, C)))
            x = x + block.mlp.dropout(mlp_proj(F.gelu(c_fc(block.ln_2(x)), approximate="tanh")))
        return self.lm_head(t.ln_f(x))[:, -1]  # (B, vocab)


class CompiledDecoding:
    """A model's decoding step, compiled once per process and reused by every `generate` call.

    `minigpt.sampling.generate(..., compiled=CompiledDecoding(model))` runs the prompt eager and
    every further token through the compiled step, on a KV cache from `new_cache`.

    `gemms`: who computes the products of an fp32 or int8 model on the CPU. "kernels": the
    layers' own kernels, chosen by `prepare_for_inference`, each an opaque call in the graph (int8
    ones compiled through). "inductor" (fp32 and int8): every product traced with the weights frozen
    into the graph (`frozen_gemm`: plain `F.linear` for fp32, `int8mm_twin` for int8), so inductor
    times its C++ GEMM against ATen's for each shape and writes the one it keeps; the graph then has
    no opaque calls at all. "fbgemm" (int8, where some layers got `int8mm`): every layer in FBGEMM's
    kernel, the same weights (`fbgemm_twin`), held beside the model's. "measure" (the default):
    `warm_up` compiles the kernels' step and the others and keeps the fastest over a few timed
    steps (`chosen` names it); without `warm_up` the kernels' step decodes and the others are never
    compiled; bf16 has only "kernels".

    Why the "inductor" step: inductor's GEMM for one row streamed the 50,257 x 768 head at ~80 GB/s
    against ~65 for `bmm-rows` in fp32 (Zen 5), the int8 head (bf16 activations) at 27 against 23 for
    FBGEMM's op (Zen 4), and the graph has no opaque calls: greedy fp32 198.4 against 146.2 tokens/s,
    int8 249.4 against 184.7 (interleaved runs in one process, the same tokens). int8 pays with
    int8mm's bf16 activations instead of FBGEMM's 14 bits (logits within 4.4e-3 of the largest, a
    small model). Compiling takes longer (with autotuning, ~27 s more for fp32, ~55 s for int8, the
    first time on 2 cores), and the frozen graph holds its own packed copy of the weights beside the
    model's, which the eager prompt still uses (resident after warm_up: fp32 1,041 MB against 704
    with "kernels" alone, int8 1,175 against 911).

    Why race whole steps: timing the products one by one, as `prepare_for_inference` does, rated
    FBGEMM's and int8mm's int8 kernels about even for distilgpt2's layers on torch 2.15 (Zen 5) and
    picked int8mm for most, while the step with FBGEMM everywhere decoded 349.0 against 272.6
    tokens/s: the products timed alone do not see what separates them inside the step. With a
    twin's step the prompt still runs on the model's own layers, so a greedy token can differ from
    the eager model's where its two best logits lie within the other activation rounding (3.9e-3 of
    the largest logit for "fbgemm", a small model); the twins stay beside the model's layers
    whichever step wins ("fbgemm", int8mm everywhere: 1,002 MB against 860, torch 2.15).

    On a GPU a token is ~100 small kernel launches, and launching them, not running them, is what a
    token costs; compiling alone did not change that. "cudagraphs" records the step once as a CUDA
    graph and replays it, one launch a token (mode="reduce-overhead"); a graph replays fixed shapes
    at fixed addresses, so this step reads the whole window's cache, the positions after the new
    token masked (`whole_cache`), in the same tensors for every run (`new_cache`). There "measure"
    races it against the model's own forward ("eager") and keeps the faster: on two H200s 0.25-0.47
    ms a token against 0.76-2.32, fp32 at batch 1 1.8x (README's "On a GPU").

    One choice per instance, as `prepare_for_inference` makes one per model: the race is run for
    the batch size given to `warm_up`, and its winner decodes every batch size after it (a second
    `warm_up` races again). To decode each batch size at its best, make a `CompiledDecoding` per
    batch size, of a model prepared for it, as the benchmarks do. The context managers entered
    around each call (the graph limit; freezing, for the inductor step) cost ~6 us each (Zen 5).
    """

    GEMMS = ("measure", "kernels", "inductor", "fbgemm", "cudagraphs")

    def __init__(self, model: GPT, gemms: str = "measure") -> None:
        if model.training:
            raise MinigptError("compiled decoding needs the model in eval mode (model.eval())")
        if gemms not in self.GEMMS:
            raise MinigptError(f"compiled decoding: gemms must be one of {self.GEMMS}, not {gemms!r}")
        if model.config.block_size < 3:  # (warm_up's check reads a third position: a KVCache ValueError)
            raise MinigptError(f"compiled decoding needs a context window of at least 3 positions, not "
                               f"{model.config.block_size}: in a smaller one every step runs eager (see __call__); "
                               "decode without compiling")
        on_cpu = model_device(model).type == "cpu"
        if on_cpu:  # (a compiler and headers are checked; inductor's cache is kept per instruction set)
            prepare_cpu_compile()
        self.model = model
        # On the CPU the graph's wrapper is C++ too (`cpp_wrapper`): it calls each kernel without
        # Python's per-call cost, which runs from cold caches between layers
        options = {"cpp_wrapper": True} if on_cpu else None
        self.steps = {}
        if gemms == "kernels" or (gemms == "measure" and on_cpu):
            self.steps["kernels"] = torch.compile(DecodeStep(model), fullgraph=True, dynamic=False, options=options)
        layers = _layers(model)
        self.layer_ids = [id(m) for m in layers]  # (the steps' graphs call these layers: check_model)
        int8mm = [m for m in layers if getattr(_unwrapped(m), "kernel", None) == "int8mm"]
        widths = (model.config.n_embd, 4 * model.config.n_embd)  # (the layers' inputs: int8mm takes multiples of 16)
        int8_frozen = (all(_is_int8(m) for m in layers) and "int8mm" in available_kernels("int8")
                       and not any(int8mm_refuses("int8mm", width) for width in widths))
        if gemms in ("measure", "inductor") and on_cpu and (all(_has_fp32_dense(m) for m in layers) or int8_frozen):
            self.steps["inductor"] = torch.compile(DecodeStep(model, frozen_gemms=True), fullgraph=True, dynamic=False,
                                                   options={**options, **GEMM_OPTIONS})
        if gemms in ("measure", "fbgemm") and on_cpu and int8mm and "fbgemm" in available_kernels("int8"):
            twins = {m: fbgemm_twin(m) for m in int8mm}
            self.steps["fbgemm"] = torch.compile(DecodeStep(model, twins=twins), fullgraph=True, dynamic=False,
                                                 options=options)
        if gemms in ("measure", "cudagraphs") and not on_cpu:
            # A token replayed as one CUDA graph (mode="reduce-overhead"), which needs the same shapes
            # and addresses at every token: the whole-window cache of `new_cache`
            self.steps["cudagraphs"] = torch.compile(DecodeStep(model, whole_cache=True), fullgraph=True,
                                                     dynamic=False, mode="reduce-overhead")
            if gemms == "measure":
                self.steps["eager"] = None  # (no step: the model's own forward decodes, see __call__)
        if gemms not in self.steps and gemms != "measure":
            raise MinigptError(f"compiled decoding: gemms={gemms!r} needs " + {
                "cudagraphs": "a GPU (CUDA graphs)",
                "inductor": "an fp32 or int8 model on the CPU (int8: where the int8mm kernel is available)",
                "fbgemm": "an int8 model on the CPU with int8mm layers and a torch build with FBGEMM"}[gemms])
        self.chosen = next(iter(self.steps))  # the step __call__ runs; warm_up may choose another
        self.seconds_per_token: dict[str, float] = {}  # what warm_up measured, per step
        self.graphs_kept = torch._dynamo.config.patch(recompile_limit=GRAPHS_KEPT)  # (~5 us a call)
        # Freezing must be on whenever the frozen step compiles (at its first call for a batch size),
        # and only then: it would also fold the weights that the other step's fused int8 layers trace
        self.frozen = torch._inductor.config.patch(freezing=True)
        self.dynamic_for: set[tuple[str, int]] = set()  # (step, batch size) compiled for any cache length
        self.whole_caches: dict[tuple[int, torch.dtype], KVCache] = {}  # (batch size, dtype) -> new_cache's

    @property
    def step(self) -> Callable[..., torch.Tensor]:
        """The compiled step that decodes (`chosen`)."""
        return self.steps[self.chosen]

    @step.setter
    def step(self, value: Callable[..., torch.Tensor]) -> None:
        self.steps[self.chosen] = value

    def describe(self) -> str:
        """One line: what computes the products, and what warm_up measured, e.g. "decoding compiled,
        products by inductor's GEMMs (4.50 ms a token; products by the chosen kernels 5.91)"."""
        timed = self.seconds_per_token
        if self.chosen == "eager":
            if len(timed) < 2:
                return "decoding eager, through the model's own forward"
            step = next(k for k in timed if k != "eager")
            return (f"decoding eager: the compiled step ({STEP_NAMES[step]}) was slower ({timed[step] * 1e3:.2f} ms a "
                    f"token against {timed['eager'] * 1e3:.2f})")
        if len(timed) < 2:
            return f"decoding compiled, {STEP_NAMES[self.chosen]}"
        others = ", ".join(f"{STEP_NAMES[k]} {t * 1e3:.2f}" for k, t in timed.items() if k != self.chosen)
        return f"decoding compiled, {STEP_NAMES[self.chosen]} ({timed[self.chosen] * 1e3:.2f} ms a token; {others})"

    def stats_note(self) -> str:
        """What `--stats` adds to the kernels line (the prompt's, eager): what decodes, where not those kernels."""
        chosen = self.chosen
        return "" if chosen in ("kernels", "eager") else f" (the prompt); decoding compiled, {STEP_NAMES[chosen]}"

    def check_model(self, model: GPT) -> None:
        """Refuse a model other than this step's, or one whose layers were swapped since it was made
        (`prepare_for_inference` after it): the compiled graphs call the layers they saw."""
        if model is not self.model or [id(m) for m in _layers(model)] != self.layer_ids:
            raise MinigptError("compiled decoding: this CompiledDecoding was made for another model, or before the "
                               "model's layers were swapped (prepare_for_inference): make one of the model as it is")

    @torch.inference_mode()  # (as `generate` runs: a graph compiled under another grad mode would not be reused)
    def warm_up(self, batch_size: int, dtype: torch.dtype) -> float:
        """Compile each step for `batch_size` sequences now, not at the first token, and check it
        once against the eager model (a second token's logits, after an eager first); with two
        steps ("measure"), time each over a few tokens and keep the faster. Returns the seconds
        compiling took. Why check: a wrong compiled kernel decodes garbage without an error;
        inductor's disk cache, written under another instruction set (which its key leaves out),
        gave NaN logits on the AMD EPYC capped to AVX2."""
        activations = activation_dtype(self.model)  # (what the KV cache holds)
        if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1) or dtype != activations:
            raise MinigptError(f"compiled decoding: warm_up needs a batch size of at least 1 and the model's activation "
                               f"dtype ({activations}), not {batch_size!r} and {dtype}")
        idx = torch.zeros(batch_size, 1, dtype=torch.long, device=model_device(self.model))
        seconds = 0.0
        for name in self.steps:
            self.chosen = name
            # (room for one position more than the step reads: a step that reads the whole cache runs eager)
            cache = self.new_cache(batch_size, 3, dtype)
            self.model(idx, kv_cache=cache)  # the first token, eager (as a prompt is)
            start = time.perf_counter()
            with warnings.catch_warnings():  # (inductor's autotuning uses an API torch itself deprecates)
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                try:
                    got = self(idx, cache).float()
                except Exception as e:  # (a compiler that answers --version and builds nothing: CppCompileError)
                    raise MinigptError(f"compiled decoding: torch.compile could not build the step ({reason(e)}); "
                                       "decode eagerly, without compiling") from None
            seconds += time.perf_counter() - start
            want = self.model(torch.cat([idx, idx], dim=1))[0][:, -1].float()  # (B, vocab)
            gap, largest = (got - want).abs().max().item(), want.abs().max().item()
            if not gap <= AGREEMENT[dtype] * largest:  # (NaN fails too; dtype: the activations')
                raise MinigptError(
                    f"compiled decoding: the compiled step's logits differ from the model's by {gap:.3g} (largest "
                    f"{largest:.3g}): a miscompiled kernel, or inductor's cache written under another instruction "
                    "set (try TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)); or decode eagerly, without compiling")
        if len(self.steps) > 1:
            self.seconds_per_token = self._time_steps(idx, dtype)
            self.chosen = min(self.seconds_per_token, key=self.seconds_per_token.get)
        return seconds

    def _time_steps(self, idx: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
        """{step: best seconds a token} over TIMING_TOKENS tokens (fewer in a window too small for
        them), the steps in interleaved rounds (a noisy neighbour slows them alike)."""
        best = dict.fromkeys(self.steps, float("inf"))
        tokens = max(1, min(TIMING_TOKENS, self.model.config.block_size - 3))
        for _ in range(TIMING_ROUNDS):
            for name in self.steps:
                self.chosen = name
                cache = self.new_cache(idx.size(0), min(tokens + 3, self.model.config.block_size), dtype)
                self.model(idx, kv_cache=cache)
                self(idx, cache)  # (the caches and code warm)
                wait_for(idx.device)
                start = time.perf_counter()
                for _ in range(tokens):
                    self(idx, cache)
                wait_for(idx.device)  # (a GPU runs behind the host: wait for the last token)
                best[name] = min(best[name], (time.perf_counter() - start) / tokens)
        return best

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype) -> KVCache:
        """An empty KV cache for `max_len` positions, to decode into (`generate` asks for one per run).

        With the CUDA-graph step it is a view of a whole-window cache kept per batch size and dtype:
        a graph replays the memory addresses it was recorded at, so every run must keep its keys
        and values in the same tensors (marked static for torch.compile, which then neither copies
        them in nor refuses their in-place writes; it keeps such tensors alive until
        `torch._dynamo.reset()`: ~38 MB for distilgpt2 in fp32 at batch 1). They start zeroed: the
        step masks the positions not yet filled, and a masked NaN would still make 0 * NaN = NaN."""
        config, device = self.model.config, model_device(self.model)
        if "cudagraphs" not in self.steps:
            return KVCache(config, batch_size, max_len, device=device, dtype=dtype)
        whole = self.whole_caches.get((batch_size, dtype))
        if whole is None:
            whole = KVCache(config, batch_size, config.block_size, device, dtype)
            self.whole_caches[(batch_size, dtype)] = whole
            for tensor in whole.k + whole.v:
                tensor.zero_()
                torch._dynamo.mark_static_address(tensor)
        cache = copy.copy(whole)  # (its own length and lists, of views of the first max_len positions)
        cache.k, cache.v, cache.max_len = [k[:, :, :max_len] for k in whole.k], [v[:, :, :max_len] for v in whole.v], max_len
        return cache

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) for idx (B, 1) at position `cache.length`, which then grows by one.
        `cache`: one from `new_cache`, its first positions filled by the model (the prompt)."""
        n = cache.length + 1  # the positions attention reads: those so far and the new one
        # The first call for a batch size compiles its graph: with the length marked dynamic it serves
        # every later length (marking costs ~0.1 ms a tensor, so only then). Two views it would not
        # serve run eager instead, each would compile a graph of its own: a length of 1 (an empty
        # cache, as for a one-token prompt), which dynamo specializes; and a view of the whole cache
        # (the last step before the window slides), whose strides are those of a contiguous tensor,
        # for which its matmuls take another path. ("eager" won the race: every token runs so.)
        if n == 1 or n == cache.max_len or self.chosen == "eager":
            return self.model(idx, kv_cache=cache, last_only=True)[0][:, -1]
        pos = torch.full((1,), cache.length, device=idx.device)  # (a fill: no copy from the host to wait on)
        graphed = self.chosen == "cudagraphs"
        if graphed:  # the whole cache, the same tensors at every token (see new_cache)
            whole = self.whole_caches.get((idx.size(0), cache.k[0].dtype))
            if whole is None or cache.k[0].data_ptr() != whole.k[0].data_ptr():
                raise MinigptError("compiled decoding: the CUDA-graph step decodes into a cache from new_cache()")
            keys, values = whole.k, whole.v
            torch.compiler.cudagraph_mark_step_begin()  # (a new token, not a step of the same one)
        else:
            keys, values = [k[:, :, :n] for k in cache.k], [v[:, :, :n] for v in cache.v]
            if (self.chosen, idx.size(0)) not in self.dynamic_for:
                self.dynamic_for.add((self.chosen, idx.size(0)))
                for view in keys + values:
                    torch._dynamo.mark_dynamic(view, 2)
        # (a slice of the tokens so far has their row stride: a fresh (B, 1) keeps one graph for all)
        with self.graphs_kept, self.frozen if self.chosen == "inductor" else contextlib.nullcontext():
            logits = self.step(idx.clone(memory_format=torch.contiguous_format), pos, keys, values)
        cache.length += 1
        # (a graph's output lives in its memory pool, which the next token's replay writes over)
        return logits.clone() if graphed else logits
