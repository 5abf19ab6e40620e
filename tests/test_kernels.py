"""The inference kernels (minigpt/inference.py): every candidate computes the same function, the
measured choice is cached and named, and the rule for memory-hungry kernels holds."""

from __future__ import annotations

import collections
import copy
import gc
import pickle
import re
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from minigpt import inference, runtime
from minigpt.config import GPTConfig
from minigpt.errors import MinigptError
from minigpt.inference import LAYOUTS, available_kernels, kernel_summary, prepare_for_inference
from minigpt.layouts import UPCAST_CHUNK, OnThreads
from minigpt.model import GPT
from minigpt.opaque import opaque_product
from minigpt.sampling import SamplingConfig, generate_ids

# Every declared (precision, kernel) pair, whether or not this torch build offers it (skipped then).
ALL = [(p, k) for p, layouts in LAYOUTS.items() for layout in layouts for k in layout.kernels]
U32 = 2.0**-24  # unit roundoff of fp32 (24-bit significand)
U16 = 2.0**-8  # unit roundoff of bf16 (8-bit significand)


def build(precision: str, kernel: str, weight, bias, rows: int):
    if kernel not in available_kernels(precision):
        pytest.skip(f"this torch build and CPU offer no {precision} kernel {kernel!r}")
    layout = next(lay for lay in LAYOUTS[precision] if kernel in lay.kernels)
    return layout.build(weight, bias, rows, True, kernel)


def kernels_named(summary: str) -> dict[str, str]:
    """{role: kernel} from a `kernel_summary` line, each thread count ("on 1 thread") set aside."""
    parts = summary.removeprefix("kernels: ").split(", ")
    return dict(re.sub(r" on \d+ threads?$", "", part).rsplit(" ", 1) for part in parts)


def bf16_exact(*shape, scale=1.0, seed=0):
    """Random numbers that bf16 represents exactly, so rounding the inputs to bf16 costs nothing and
    every kernel's error is its own arithmetic's."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16().float()


@pytest.mark.parametrize("precision, kernel", ALL)
@pytest.mark.parametrize("rows, call_rows", [(1, 1), (1, 5), (4, 4)])
def test_each_kernel_computes_x_wt_plus_b(precision, kernel, rows, call_rows):
    """Error bounds from the arithmetic, not from one CPU's rounding: with inputs exact in bf16, a
    dot product of K terms accumulated in fp32 is off by at most gamma = (K + 1) u32 / (1 - (K + 1) u32)
    times sum |x_i w_i| + |b| (the +1: the bias), in any summation order or blocking; a kernel whose
    output is bf16 rounds at most twice more (the product, then the bias added in bf16), each by
    u16 relative. An int8 kernel computes with the dequantized weights q * s (exact in fp32); one
    that rounds each activation row x to steps of max|x| / LEVELS (fbgemm) adds at most half a step
    times sum |w_i|, and rounds thrice more in fp32 (combining its digits, scaling, the bias)."""
    out_features, in_features = UPCAST_CHUNK + 52, 80  # crosses the chunked kernels' boundary
    weight, bias = bf16_exact(out_features, in_features), bf16_exact(out_features, seed=1)
    x = bf16_exact(2, call_rows, in_features, seed=2)[:1]  # (1, call_rows, in): a 3-D activation
    layer = build(precision, kernel, weight, bias, rows)
    with torch.no_grad():
        y = layer(x.to(torch.bfloat16 if precision == "bf16" else torch.float32)).double()
    w = weight.double()
    if precision == "int8":
        w = layer.qweight.double() * layer.scale.double().unsqueeze(1)
        assert (w - weight.double()).abs().max() <= layer.scale.double().max() / 2  # half a step
    expected = x.double() @ w.t() + bias.double()
    magnitude = x.double().abs() @ w.abs().t() + bias.double().abs()
    k = in_features + 1
    bound = (k * U32 / (1 - k * U32) + {"fp32": 0, "bf16": 2 * U16, "int8": 2 * U16}[precision]) * magnitude
    if kernel == "fbgemm":
        k = in_features + 4
        half_step = x.double().abs().amax(dim=-1, keepdim=True) / layer.LEVELS / 2
        bound = k * U32 / (1 - k * U32) * magnitude + half_step * w.abs().sum(dim=1)
    assert y.shape == expected.shape
    assert ((y - expected).abs() <= bound + 1e-30).all(), (y - expected).abs().max()


@pytest.mark.parametrize("precision, kernel", ALL)
def test_each_kernel_embeds_the_tied_rows(precision, kernel):
    weight = bf16_exact(64, 32)
    layer = build(precision, kernel, weight, None, 1)
    idx = torch.tensor([[3, 0], [63, 3]])
    rows = layer.embed(idx).float()
    expected = weight[idx]
    if precision == "int8":  # the dequantized rows
        expected = (layer.qweight.float() * layer.scale.float().unsqueeze(1))[idx]
    assert torch.equal(rows, expected)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=2100, dropout=0.0)).eval()


def prepared_copy(small_model: GPT, precision: str, kernel: str, train: bool = False) -> GPT:
    """A copy of `small_model` in `precision`'s dtype (int8: quantized), prepared with every layer on
    `kernel`; the test is skipped where this torch build and CPU lack the kernel."""
    if kernel not in available_kernels(precision):
        pytest.skip(f"this torch build and CPU offer no {precision} kernel {kernel!r}")
    model = copy.deepcopy(small_model).train(train)
    model = model.to(torch.bfloat16) if precision == "bf16" else model
    return prepare_for_inference(model, "int8" if precision == "int8" else None, kernel=kernel)


@pytest.mark.parametrize("precision, kernel", ALL)
def test_a_model_on_each_forced_kernel_matches_the_reference(small_model, precision, kernel):
    """The whole model, every layer on one kernel, against the plain model in the same precision.
    Tolerances relative to the largest logit. Measured worst cases over the kernels (Xeon with AMX,
    torch 2.13): fp32 1.8e-7, bf16 2.4e-4, int8 9.1e-3 (the quantization of every weight, which no
    kernel choice changes). fp32 keeps 50x room; bf16 allows a few bf16 roundings (2^-8 = 3.9e-3
    each) to differ per layer, as bf16 kernels on other CPUs round at other points; int8 5x."""
    if kernel not in available_kernels(precision):
        pytest.skip(f"this torch build and CPU offer no {precision} kernel {kernel!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    reference = copy.deepcopy(small_model).to(dtype)
    fast = prepare_for_inference(copy.deepcopy(reference), "int8" if precision == "int8" else None, kernel=kernel)
    assert kernel_summary(fast).count(f" {kernel}") == 5  # 4 groups of block layers + the head
    idx = torch.randint(0, 2100, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = reference(idx)
        got, _ = fast(idx)  # several rows
        one, _ = fast(idx[:1, -1:])  # one row: the decoding kernels
        expected_one, _ = reference(idx[:1, -1:])
    tol = {"fp32": 1e-5, "bf16": 0.03, "int8": 0.05}[precision] * expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= tol
    assert (one.float() - expected_one.float()).abs().max() <= tol


def test_the_measured_choice_is_named_and_cached(small_model, monkeypatch):
    monkeypatch.setattr(inference, "_CHOICES", {})
    first = prepare_for_inference(copy.deepcopy(small_model))
    summary = kernel_summary(first)
    chosen = kernels_named(summary)
    assert list(chosen) == ["lm_head", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert set(chosen.values()) <= set(available_kernels("fp32"))
    assert len(inference._CHOICES) == 5

    def no_timing(*args):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(inference, "_time_pass", no_timing)
    again = prepare_for_inference(copy.deepcopy(small_model))
    assert kernel_summary(again) == summary
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(first(idx)[0], again(idx)[0])
    assert kernel_summary(small_model) == ""  # an unprepared model names nothing


def test_a_choice_timed_for_one_batch_size_is_not_reused_for_another(small_model, monkeypatch):
    """The kernels are timed on the rows each decoding step feeds a layer (`batch_size`): with the
    batch size left out of the cache's key, a model prepared for 8 sequences after one prepared for
    1 ran the kernels chosen for 1 row, untimed (which kernel is fastest can change with the rows
    a call computes)."""
    monkeypatch.setattr(inference, "_CHOICES", {})
    timed = []
    real_time_pass = inference._time_pass

    def counting(*args, **kwargs):
        timed.append(1)
        return real_time_pass(*args, **kwargs)

    monkeypatch.setattr(inference, "_time_pass", counting)
    prepare_for_inference(copy.deepcopy(small_model), batch_size=1)
    assert len(inference._CHOICES) == 5 and timed
    del timed[:]
    prepare_for_inference(copy.deepcopy(small_model), batch_size=1)  # the same: all from the cache
    assert not timed and len(inference._CHOICES) == 5
    prepare_for_inference(copy.deepcopy(small_model), batch_size=8)
    assert timed and len(inference._CHOICES) == 10
    assert sorted(key[3] for key in inference._CHOICES) == [1] * 5 + [8] * 5  # (key[3]: the batch size)


def test_timing_the_kernels_leaves_torchs_random_generator_alone(small_model, monkeypatch):
    """The kernel race drew its input from torch's global generator, but only when it ran (not when
    the choice was cached): text sampled after `torch.manual_seed` differed between the first
    prepared model in a process and the next. So did measuring the bf16 speed-up, once a process."""
    from minigpt.runtime import cpu_bf16_speedup

    monkeypatch.setattr(inference, "_CHOICES", {})
    torch.manual_seed(0)
    state = torch.get_rng_state()
    prepare_for_inference(copy.deepcopy(small_model))
    cpu_bf16_speedup.cache_clear()
    cpu_bf16_speedup()
    assert torch.equal(torch.get_rng_state(), state)


def test_a_matrix_timed_on_its_first_rows_is_built_whole(small_model, monkeypatch):
    """The LM head is timed on its first TIME_BYTES of rows (in two halves: one warms, one is timed),
    its two fastest kernels then on all of them; the winner is built for all of them."""
    monkeypatch.setattr(inference, "_CHOICES", {})
    # (1,000 fp32 rows; the small model's head has 2,100)
    monkeypatch.setattr(inference, "TIME_BYTES", 1000 * small_model.config.n_embd * 4)
    timed_rows = []
    time_pass = inference._time_pass

    def noting_rows(layers, x, flush=None, core_only=False):
        timed_rows.append(layers[0](x).size(-1))
        return time_pass(layers, x, flush, core_only)

    monkeypatch.setattr(inference, "_time_pass", noting_rows)
    fast = prepare_for_inference(copy.deepcopy(small_model))
    assert 500 in timed_rows and 1000 not in timed_rows  # the head's heat, on a slice in halves
    assert timed_rows.count(2100) >= 2 * inference.TIMING_ROUNDS  # its final: two kernels, on all of it
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected, got = small_model(idx)[0], fast(idx)[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer(small_model, monkeypatch,
                                                                                    tmp_path):
    """Between two uses of a layer decoding reads the model's other weights, so each timed pass
    first reads a buffer as large as the model's matmul weights (written, so that it holds real
    pages), capped at twice the CPU's largest cache (from sysfs, 32 MiB where it cannot be read),
    which evicts everything. sysfs's size alone does not decide: a VM sees its host's whole cache,
    shared with others (300 MiB on the Intel Xeon VM, where a bf16 distilgpt2 timed from the cache
    chose slow kernels). The LM head is timed in two halves, one warming the code, one timed. (A
    model this small reads less than `runtime.EVICTION_FLOOR`: no fewer bytes are tried.)"""
    for index, size in (("index0", "32K"), ("index2", "1024K"), ("index3", "3M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert runtime.cpu_cache_bytes(tmp_path) == 3 * 2**20
    assert runtime.cpu_cache_bytes(tmp_path / "absent") == 32 * 2**20
    flushes = []
    time_pass = inference._time_pass

    def noting_flush(layers, x, flush, core_only=False):
        flushes.append(flush)
        widths.append([layer(x).size(-1) for layer in layers])
        return time_pass(layers, x, flush)

    monkeypatch.setattr(inference, "_time_pass", noting_flush)
    weight_bytes = 4 * sum(p.numel() for n, p in small_model.named_parameters() if n.endswith("weight")
                           and p.dim() == 2 and "wpe" not in n)  # the matmul weights (the head: wte)
    widths = []
    idx = torch.tensor([[1, 2, 3]])
    for cache, read in ((weight_bytes // 4, weight_bytes // 2), (2 * weight_bytes, weight_bytes)):
        monkeypatch.setattr(inference, "cpu_cache_bytes", lambda: cache)
        monkeypatch.setattr(inference, "_CHOICES", {})
        flushes.clear()
        widths.clear()
        fast = prepare_for_inference(copy.deepcopy(small_model))
        assert flushes and all(f.numel() * f.element_size() == read // 4 * 4 and bool((f == 1).all())
                               for f in flushes)
        assert [1050, 1050] in widths  # the head (2,100 rows) in two halves: one warms, one is timed
        with torch.no_grad():
            expected, got = small_model(idx)[0], fast(idx)[0]
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    bf16 = copy.deepcopy(small_model).to(torch.bfloat16)
    monkeypatch.setattr(inference, "_CHOICES", {})
    flushes.clear()
    prepare_for_inference(bf16)  # (cache: twice the fp32 weights) the bf16 weights' bytes
    assert flushes and all(f.numel() * f.element_size() == weight_bytes // 2 for f in flushes)

    order = []

    class Layer:
        def __init__(self, name):
            self.name = name

        def __call__(self, x):
            order.append(self.name)

    class Flush:
        def sum(self):
            order.append("flush")

    # the flush evicts the code and buffers too, which decoding keeps warm: the first layer warms
    # them up, the others are timed; a single matrix (then split in two by _choose) is timed cold
    monkeypatch.setattr(inference, "time", types.SimpleNamespace(perf_counter=lambda: order.append("clock") or 0.0))
    time_pass([Layer("warm"), Layer("timed")], torch.zeros(1), Flush())
    assert order == ["flush", "warm", "clock", "timed", "clock"]
    order.clear()
    time_pass([Layer("only")], torch.zeros(1), Flush())
    assert order == ["flush", "clock", "only", "clock"]


def test_the_flush_is_the_smallest_read_measured_to_evict_the_cache():
    """sysfs names a VM's host's cache, shared with others (480 MiB on an Intel Xeon VM whose
    process kept ~96 MiB cached), so the flush is measured: the smallest of limit, limit/sqrt(2),
    ... re-read no faster than memory (the limit) while every larger one is too; sizes below the
    first cached one are not measured; where everything stays cached, the smallest size."""
    mib = 2**20
    asked = []

    def machine(cached_up_to, disturbed=()):
        def rates(sizes):
            for size in sizes:
                asked.append(size)
                yield 20e9 if size > cached_up_to or size in disturbed else 50e9
        return rates

    limit = 400 * mib
    sizes = [limit]
    while sizes[-1] / 2**0.5 >= runtime.EVICTION_FLOOR:
        sizes.append(int(sizes[-1] / 2**0.5))
    assert sizes[-1] >= runtime.EVICTION_FLOOR > sizes[-1] / 2**0.5
    got = runtime.evicting_bytes(limit, machine(96 * mib))
    assert got == min(s for s in sizes if s > 96 * mib) and got < 200 * mib
    assert asked == [s for s in sizes if s >= got] + [max(s for s in sizes if s <= 96 * mib)]  # (stops there)
    # a size read within COLD_MARGIN of memory's speed counts as not cached (noise), above it as cached
    near = runtime.evicting_bytes(limit, lambda sizes: iter([20e9, 23.9e9, 24.1e9, 20e9]))
    assert near == sizes[1]
    # one disturbed (slow) re-read below a cached size does not count: the search stopped above it
    assert runtime.evicting_bytes(limit, machine(96 * mib, disturbed={sizes[-2]})) == got
    asked.clear()
    assert runtime.evicting_bytes(limit, machine(sizes[1])) == limit  # the first smaller size cached: stop there
    assert asked == sizes[:2]
    # the limit itself cached: all of it stays cached between uses, so the smallest evicts "enough"
    assert runtime.evicting_bytes(limit, lambda sizes: iter([50e9] * len(sizes))) == sizes[-1]
    asked.clear()
    assert runtime.evicting_bytes(10 * mib, machine(0)) == 10 * mib and not asked  # below the floor: unmeasured
    # measured on this machine: one of the sizes (each the one before over sqrt(2), rounded down,
    # as the search makes them: the third is a byte under 32 MiB)
    real = runtime.evicting_bytes(64 * mib)
    real_sizes = [64 * mib]
    while real_sizes[-1] / 2**0.5 >= runtime.EVICTION_FLOOR:
        real_sizes.append(int(real_sizes[-1] / 2**0.5))
    assert real in real_sizes


def test_the_flush_is_made_once_per_prepare_and_only_when_something_is_timed(small_model, monkeypatch):
    """The flush buffer is the `evicting_bytes` of the lesser of the model's matmul weight bytes and
    twice sysfs's cache, allocated once for all the groups; a prepare whose choices are all known in
    this process neither measures nor allocates it."""
    limits, flushes = [], set()
    monkeypatch.setattr(inference, "_CHOICES", {})
    monkeypatch.setattr(inference, "cpu_cache_bytes", lambda: 2**40)
    monkeypatch.setattr(inference, "evicting_bytes", lambda limit: limits.append(limit) or limit // 2)
    time_pass = inference._time_pass

    def noting(layers, x, flush, core_only=False):
        flushes.add((id(flush), flush.numel() * 4))
        return time_pass(layers, x, flush, core_only)

    monkeypatch.setattr(inference, "_time_pass", noting)
    weight_bytes = 4 * sum(p.numel() for n, p in small_model.named_parameters() if n.endswith("weight")
                           and p.dim() == 2 and "wpe" not in n)
    prepare_for_inference(copy.deepcopy(small_model))
    assert limits == [weight_bytes] and len(flushes) == 1 and next(iter(flushes))[1] == weight_bytes // 2 // 4 * 4
    prepare_for_inference(copy.deepcopy(small_model))
    assert limits == [weight_bytes] and len(flushes) == 1


def test_the_two_fastest_on_a_matrix_cut_for_timing_race_again_on_all_of_it(small_model, monkeypatch):
    """The LM head is timed on its first rows; a kernel's speed can change with the shape (on the
    Intel Xeon VM bf16 `bmm` streamed 49,152 rows at 18 GB/s and 50,256 at 10), so the two fastest
    there are built for the whole head and raced again, and the faster on it is kept. Here bmm-rows
    wins the heat on 1,000 rows and loses the final on 2,100 to addmm-t, second in the heat; the
    slower candidates are never built whole."""
    monkeypatch.setattr(inference, "_CHOICES", {})
    monkeypatch.setattr(inference, "TIME_BYTES", 1000 * small_model.config.n_embd * 4)
    heat = {"bmm-rows": 0.5, "addmm-t": 1.0, "bmm-split": 1.5, "linear": 2.0, "mkl": 5.0}
    final = {"bmm-rows": 3.0, "addmm-t": 2.0, "bmm-split": 1.0, "linear": 1.0, "mkl": 1.0}
    whole = collections.Counter()

    def scripted(layers, x, flush, core_only):
        with torch.no_grad():
            width = layers[-1](x).size(-1)
        if width == small_model.config.vocab_size:
            whole[layers[0].kernel] += 1
            return final[layers[0].kernel]
        return heat[layers[0].kernel]

    monkeypatch.setattr(inference, "_time_pass", scripted)
    fast = prepare_for_inference(copy.deepcopy(small_model))
    assert "lm_head addmm-t" in kernel_summary(fast).removeprefix("kernels: ").split(", ")
    assert set(whole) == {"bmm-rows", "addmm-t"}
    assert isinstance(fast.lm_head, inference.TransposedLinear) and fast.lm_head.weight_t.size(1) == 2100
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected, got = small_model(idx)[0], fast(idx)[0]
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("mkl_speedup, chosen", [(1.05, "addmm-t"), (1.25, "mkl")])
def test_a_kernel_holding_a_second_copy_must_win_clearly(small_model, monkeypatch, mkl_speedup, chosen):
    """MKL's packed weights come on top of the plain ones: chosen only when >= 10% faster."""
    if "mkl" not in available_kernels("fp32"):
        pytest.skip("this torch build has no MKL prepacked linear")
    seconds = {"addmm-t": 1.0, "linear": 1.5, "bmm-split": 1.2, "bmm-rows": 1.3, "mkl": 1.0 / mkl_speedup}
    monkeypatch.setattr(inference, "_CHOICES", {})
    monkeypatch.setattr(inference, "_time_pass", lambda layers, x, flush, core_only: seconds[layers[0].kernel])
    fast = prepare_for_inference(copy.deepcopy(small_model))
    assert set(kernel_summary(fast).removeprefix("kernels: ").split(", ")) == {
        f"{role} {chosen}" for role in ("lm_head", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_one_disturbed_pass_does_not_drop_the_fastest_kernel(small_model, monkeypatch):
    """A neighbour can slow any single pass: the fastest kernel, slowed 10x in its first timed pass
    only, still wins; a kernel over twice the best in its first two timed passes is dropped then
    (a warm-up pass and two timed ones), and the rest run all their rounds."""
    passes = collections.Counter()
    alive = []  # the layers timed, kept so that no two share an id

    def scripted(layers, x, flush, core_only):
        if isinstance(layers[0], OnThreads):  # the winner's thread race: all threads win
            return 100.0
        kernel = layers[0].kernel
        alive.append(layers[0])
        passes[id(layers[0]), kernel] += 1
        if kernel == "bmm-rows":  # pass 1 is the warm-up, pass 2 the first timed one
            return 10.0 if passes[id(layers[0]), kernel] == 2 else 0.5
        return {"linear": 3.0}.get(kernel, 1.0)

    monkeypatch.setattr(inference, "_CHOICES", {})
    monkeypatch.setattr(inference, "_time_pass", scripted)
    fast = prepare_for_inference(copy.deepcopy(small_model))
    roles = ("lm_head", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert kernel_summary(fast) == "kernels: " + ", ".join(f"{role} bmm-rows" for role in roles)
    linear = [n for (_, kernel), n in passes.items() if kernel == "linear"]
    assert linear == [3] * 5  # one race per group, out after its second timed pass
    assert all(n == 1 + inference.TIMING_ROUNDS for (_, kernel), n in passes.items() if kernel == "addmm-t")


def test_a_kernel_faster_on_fewer_threads_runs_on_them(small_model, monkeypatch):
    """The chosen kernel is also timed on fewer threads; where that wins by 10%, the layers run on
    that many (and only they: the count is back to all of them after each call), `--stats` says so."""
    every = torch.get_num_threads()
    torch.set_num_threads(4)  # the process's count while the model is prepared and run
    try:
        monkeypatch.setattr(inference, "_CHOICES", {})
        seconds = {4: 1.0, 2: 0.85, 1: 0.95}  # two threads fastest, for every kernel

        def by_threads(layers, x, flush, core_only):
            threads = layers[0].threads if isinstance(layers[0], OnThreads) else torch.get_num_threads()
            return seconds[threads] + (0.0 if layers[0].kernel == "addmm-t" else 0.5)

        monkeypatch.setattr(inference, "_time_pass", by_threads)
        fast = prepare_for_inference(copy.deepcopy(small_model))
        roles = ("lm_head", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        assert kernel_summary(fast) == "kernels: " + ", ".join(f"{role} addmm-t on 2 threads" for role in roles)
        assert set(inference._CHOICES.values()) == {("addmm-t", 2)}
        seen = []
        layer = fast.transformer.h[0].attn.c_attn.layer
        noting = lambda x, inner=layer.forward: seen.append(torch.get_num_threads()) or inner(x)  # noqa: E731
        monkeypatch.setattr(layer, "forward", noting)
        idx = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            expected, got = small_model(idx)[0], fast(idx)[0]
        assert seen == [2] and torch.get_num_threads() == 4
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        for seconds[2] in (1.2, 0.95):  # slower; faster, but by less than 10%: nothing is wrapped
            monkeypatch.setattr(inference, "_CHOICES", {})
            fast = prepare_for_inference(copy.deepcopy(small_model))
            assert kernel_summary(fast) == "kernels: " + ", ".join(f"{role} addmm-t" for role in roles)
            assert not any(isinstance(m, OnThreads) for m in fast.modules())
    finally:
        torch.set_num_threads(every)


def test_fewer_threads_must_win_two_races_in_a_row(small_model, monkeypatch):
    """A neighbour that takes a core for a while slows the all-threads runs of one race: fewer
    threads that win one race and lose the next are not chosen; winning both, they are."""
    every = torch.get_num_threads()
    races = []

    def scripted(runs, x, flush, core_only=False):  # kernels race alike; a group's thread races as `verdicts` say
        counts = [n for _, _, n in runs]
        if len(set(counts)) == 1:  # a group's kernel race: its thread races follow
            group_races.clear()
            return {(k, n): 1.0 for k, _, n in runs}
        races.append(counts)
        group_races.append(counts)
        fewer_wins = verdicts[len(group_races) - 1]
        return {(k, n): 1.0 if n == counts[0] else (0.5 if fewer_wins else 1.5) for k, _, n in runs}

    group_races = []

    monkeypatch.setattr(inference, "_race", scripted)
    torch.set_num_threads(4)
    try:
        for verdicts, wrapped in (((True, False), False), ((True, True), True), ((False, True), False)):
            monkeypatch.setattr(inference, "_CHOICES", {})
            races.clear()
            fast = prepare_for_inference(copy.deepcopy(small_model))
            assert any(isinstance(m, OnThreads) for m in fast.modules()) == wrapped
            assert all(counts == [4, 2, 1] for counts in races)
            assert len(races) == (10 if verdicts[0] else 5)  # 5 groups: a second race only after a win
    finally:
        torch.set_num_threads(every)


def test_a_layer_on_fewer_threads_gives_them_back_even_after_an_error():
    every = torch.get_num_threads()

    class Failing(torch.nn.Module):
        kernel = "failing"

        def forward(self, x):
            assert torch.get_num_threads() == 1
            raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        OnThreads(Failing(), 1)(torch.zeros(1, 4))
    assert torch.get_num_threads() == every


def test_a_layer_on_fewer_threads_never_takes_more_than_the_process_has_now():
    """A layer timed onto 2 of 4 threads set the count to 2 at every call: after the user lowered it
    to 1 (README's remedy for a container's quota), the layer widened torch's pool to 2 again, twice
    a layer a token. It runs on at most the count it is called under."""
    every, seen = torch.get_num_threads(), []

    class Recording(torch.nn.Module):
        kernel = "recording"

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    try:
        for threads in (4, 2, 1):
            torch.set_num_threads(threads)
            OnThreads(Recording(), 2)(torch.zeros(1, 4))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(every)
    assert seen == [2, 2, 1]


def test_the_thread_counts_timed_are_all_half_and_one():
    every = torch.get_num_threads()
    try:
        for threads, counts in ((8, [8, 4, 1]), (3, [3, 1]), (2, [2, 1]), (1, [1])):
            torch.set_num_threads(threads)
            assert inference._thread_counts(torch.device("cpu")) == counts
    finally:
        torch.set_num_threads(every)


def test_a_forced_kernel_that_cannot_run_says_why(small_model, monkeypatch):
    """Another precision's kernel, an unknown name, and one this machine lacks: each says which, and what is here."""
    here = f"(the fp32 kernels here: {', '.join(available_kernels('fp32'))})"
    with pytest.raises(MinigptError, match=re.escape(f"kernel 'onednn' is for bf16, not fp32 {here}")):
        prepare_for_inference(copy.deepcopy(small_model), kernel="onednn")
    with pytest.raises(MinigptError, match=re.escape(f"kernel 'int8': no fp32 kernel has that name {here}")):
        prepare_for_inference(copy.deepcopy(small_model), kernel="int8")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # (a CPU without bf16)
    assert "onednn" not in available_kernels("bf16")
    with pytest.raises(MinigptError, match=re.escape(
            "kernel 'onednn' needs a CPU with native bf16 (AVX-512 BF16 or AMX), which is not here (the bf16 kernels")):
        prepare_for_inference(copy.deepcopy(small_model).to(torch.bfloat16), kernel="onednn")
    # from Python: an unknown precision was a KeyError; a build without int8mm told a CPU user to try the CPU
    with pytest.raises(MinigptError, match=re.escape("precision: unknown 'fp64' (choose from fp32, bf16, int8)")):
        available_kernels("fp64")
    with pytest.raises(MinigptError, match=r"^quantize: unknown scheme 'int4' \(choose from int8\)$"):
        prepare_for_inference(copy.deepcopy(small_model), "int4")
    monkeypatch.setattr("minigpt.inference._has_int8mm", lambda device: False)
    with pytest.raises(MinigptError, match=r"^--quantize int8: this PyTorch build has no int8 weight-only kernel for cpu$"):
        prepare_for_inference(copy.deepcopy(small_model), "int8")



def test_a_prepared_model_is_in_eval_mode():
    """A model left in training mode (as `Trainer.fit` leaves it) comes back in eval mode, every module
    swapped in included, and decodes the tokens of the plain model in eval mode."""
    torch.manual_seed(0)
    training = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=2100, dropout=0.1))
    reference = copy.deepcopy(training).eval()
    prepared = prepare_for_inference(training, kernel="linear")
    assert not any(module.training for module in prepared.modules())
    config = SamplingConfig(max_new_tokens=10, greedy=True)
    expected = generate_ids(reference, [5, 17, 300], config, eos_id=None)
    assert generate_ids(prepared, [5, 17, 300], config, eos_id=None) == expected and len(expected[0]) == 10


def test_preparing_a_prepared_model_or_for_no_rows_is_refused_in_one_line(small_model):
    """Run twice (a notebook cell run again) it was "'SplitLinear' object has no attribute 'weight'";
    batch_size 0 failed deep in the layouts, with oneMKL's lines printed."""
    prepared = prepare_for_inference(copy.deepcopy(small_model), kernel="linear")
    summary = kernel_summary(prepared)
    with pytest.raises(MinigptError) as error:
        prepare_for_inference(prepared)
    assert str(error.value) == ("the model is already prepared for inference: use it as it is, or load it again "
                                "to redo it")
    assert kernel_summary(prepared) == summary  # left as it was
    for batch_size in (0, -3, 2.0, True, "8"):  # (2.0 failed inside MKL's packing: "Expected a value of type 'int'")
        with pytest.raises(MinigptError) as error:
            prepare_for_inference(copy.deepcopy(small_model), batch_size=batch_size)
        assert str(error.value) == f"batch_size must be an integer >= 1, got {batch_size!r}"
    numpy_rows = prepare_for_inference(copy.deepcopy(small_model), batch_size=np.int64(2), kernel="linear")
    assert kernel_summary(numpy_rows) == summary  # (a NumPy integer is an integer)


def test_a_model_whose_head_is_untied_or_on_meta_is_refused_in_one_line(small_model):
    """A prepared model embeds tokens with the LM head's rows (GPT-2 ties the two): a model whose head
    was untied (its own weights) was prepared into other logits without a word (1.59 apart on a test
    model). One on the meta device (shapes, no weights) failed in torch ("could not parse dispatch
    key: META"); generating from it too (".item() cannot be called on meta tensors")."""
    untied = copy.deepcopy(small_model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach() + 0.05)
    with pytest.raises(MinigptError, match=r"^this model's LM head is not tied to its token embeddings \(wte\), as "
                       r"GPT-2's is and a prepared model's must be: call model.tie_weights\(\) first$"):
        prepare_for_inference(untied)
    assert type(untied.lm_head) is nn.Linear  # left as it was
    with torch.device("meta"):
        meta = GPT(small_model.config).eval()
    for call in (lambda: prepare_for_inference(meta, "int8"), lambda: prepare_for_inference(meta),
                 lambda: generate_ids(meta, [5], SamplingConfig(max_new_tokens=2), eos_id=None)):
        with pytest.raises(MinigptError, match="^the model is on the meta device, which holds shapes and no weights: "
                           "load its weights first$"):
            call()


@pytest.mark.parametrize("precision, kernel", ALL)
def test_a_prepared_model_has_no_gradients_to_train(small_model, precision, kernel):
    """A prepared model kept wpe and the LayerNorms trainable: its logits carried a graph, an
    optimizer over its parameters trained those 11 tensors alone while the logits moved, and the
    kernels that write into their own buffers (mkl: "functions with out=... arguments don't support
    automatic differentiation") failed outside torch.no_grad()."""
    prepared = prepared_copy(small_model, precision, kernel, train=True)
    assert not any(p.requires_grad for p in prepared.parameters())
    logits = prepared(torch.tensor([[5, 17, 300]]))[0]  # (not under no_grad)
    assert not logits.requires_grad and logits.shape == (1, 3, 2100)


@pytest.mark.parametrize("precision, kernel", ALL)
def test_a_prepared_model_refuses_a_move_or_cast_in_one_line_and_stays_as_it_was(small_model, precision, kernel):
    """`prepared.to(torch.bfloat16)` cast what a cast reaches and failed later, deep in a kernel
    ("mixed dtype (CPU): expect parameter to have scalar type of Float"; MKL's packed weights:
    "Could not run 'aten::empty_strided' with arguments from the 'MkldnnCPU' backend"), or for
    FBGEMM's int8 decoded on, half cast. A move or cast that changes nothing is let through."""
    prepared = prepared_copy(small_model, precision, kernel)
    idx = torch.tensor([[5, 17, 300]])
    expected = prepared(idx)[0]
    casts = [lambda m: m.half(), lambda m: m.double(), lambda m: m.to("meta"),
             lambda m: m.to(torch.float32 if precision == "bf16" else torch.bfloat16)]
    for cast in casts:
        with pytest.raises(MinigptError, match=r"^this model is prepared for inference and cannot become torch\.\w+ "
                           r"on \w+: load it with the device and dtype wanted, then prepare it$"):
            cast(prepared)
        assert torch.equal(prepared(idx)[0], expected)  # nothing was cast
    unchanged = [lambda m: m.cpu(), lambda m: m.to("cpu")] + ([lambda m: m.float()] if precision == "fp32" else [])
    for same in unchanged:  # (bf16 rows, int8mm's bf16 scales and an fp32 stream: for them any cast changes something)
        assert same(prepared) is prepared and torch.equal(prepared(idx)[0], expected)


@pytest.mark.parametrize("precision, kernel", ALL)
def test_a_prepared_model_refuses_to_load_weights_in_one_line_and_stays_as_it_was(small_model, precision, kernel):
    """`prepared.load_state_dict(other)` reported success on FBGEMM's layers (fp16 and int8), whose
    packed weights no load reaches: the logits were neither model's (1.07 of the largest off the
    other's), the embedding the other's, the products the first's. Refused on every kernel, for the
    model and for any part of it, before anything changes; a copy refuses too."""
    prepared = prepared_copy(small_model, precision, kernel)
    other = copy.deepcopy(small_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)
    other = prepared_copy(other, precision, kernel)
    idx = torch.tensor([[5, 17, 300]])
    expected = prepared(idx)[0]
    message = (r"^this model is prepared for inference and cannot load weights into its packed layers: load them into "
               r"the plain model, then prepare it$")
    for model in (prepared, copy.deepcopy(prepared)):
        for part, state in ((model, other.state_dict()), (model.transformer.h[0].mlp.c_fc,
                                                          other.transformer.h[0].mlp.c_fc.state_dict())):
            for strict in (True, False):
                with pytest.raises(MinigptError, match=message):
                    part.load_state_dict(state, strict=strict)
        assert torch.equal(model(idx)[0], expected)


@pytest.mark.parametrize("precision, kernel", ALL)
def test_a_prepared_model_pickles_and_deep_copies_on_every_kernel(small_model, precision, kernel):
    """Whether a prepared model could be pickled (a worker process) or deep-copied depended on the
    kernel the timing chose: MKL's and oneDNN's packed weights failed ("Cannot access storage of
    OpaqueTensorImpl"), FBGEMM's int8 product was a closure ("Can't pickle local object"). Each
    copy packs its weights again and computes what the original did, after the original is gone
    (FBGEMM's product registered anew for compiled graphs, `opaque_product`)."""
    original = prepared_copy(small_model, precision, kernel)
    idx = torch.tensor([[5, 17, 300, 2099]])
    expected, summary = original(idx)[0], kernel_summary(original)
    copies = [pickle.loads(pickle.dumps(original)), copy.deepcopy(original)]
    del original
    gc.collect()
    for copied in copies:
        assert kernel_summary(copied) == summary and torch.equal(copied(idx)[0], expected)
        for name, layer in ((n, m) for n, m in copied.named_modules() if hasattr(m, "product")):  # FBGEMM's int8
            digits = layer.core_input(torch.randn(2, copied.config.n_embd * (4 if name.endswith("mlp.c_proj") else 1)))
            assert torch.equal(opaque_product(digits, layer.key), layer.product(digits))
        with pytest.raises(MinigptError, match="prepared for inference"):  # (still refuses a cast)
            copied.half()
    # share_memory() failed for MKL's and oneDNN's ("Cannot access storage of OpaqueTensorImpl", a
    # traceback) and passed for the other kernels: refused for all, in one line, before anything is shared
    with pytest.raises(MinigptError, match=r"^a model prepared for inference cannot be shared with other processes: "
                       r"share the plain model, and prepare it in each process$"):
        copies[0].share_memory()
    assert not any(t.is_shared() for t in copies[0].state_dict().values() if t.layout == torch.strided)
    assert torch.equal(copies[0](idx)[0], expected)


@pytest.mark.parametrize("dtype, quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8"),
                                             (torch.bfloat16, "int8"), (torch.float16, None)])
def test_the_stream_dtype_said_before_preparing_is_the_prepared_models(small_model, dtype, quantize):
    """sample.py checks the KV cache's memory before the kernels are timed, in the dtype that
    `prepared_stream_dtype` says the prepared model will hold: it must be the one it holds."""
    from minigpt.inference import prepared_stream_dtype
    from minigpt.runtime import activation_dtype

    model = copy.deepcopy(small_model).to(dtype)
    said = prepared_stream_dtype(model, quantize)
    assert said == activation_dtype(prepare_for_inference(model, quantize))
    assert said == (torch.float16 if dtype == torch.float16 else torch.float32)  # (fp16: nothing swapped)


def test_a_model_with_nothing_to_swap_keeps_its_gradients(small_model):
    """Where nothing is swapped (an fp16 model; any but int8 on a GPU) the model comes back as it
    was, in eval mode: it was made untrainable, in place, and a notebook that sampled then trained
    failed at backward()."""
    model = copy.deepcopy(small_model).half().train()
    assert prepare_for_inference(model) is model and not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_int8mm_is_kept_off_widths_it_computes_wrongly():
    """torch 2.13's CPU `_weight_int8pack_mm` returns garbage (or crashes) unless the input width is
    a multiple of 16; layers of width 72 take another int8 kernel instead, and forcing it is refused."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=72, block_size=16, vocab_size=256, dropout=0.0)).eval()
    fast = prepare_for_inference(copy.deepcopy(model), "int8")
    chosen = kernels_named(kernel_summary(fast))
    for role in ("lm_head", "attn.c_attn", "mlp.c_fc"):  # width 72
        assert chosen[role] in set(available_kernels("int8")) - {"int8mm"}
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(idx)[0], fast(idx)[0]
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()  # quantization, as above
    refusal = ("no int8 kernel takes these 216x72 layers: "
               "int8mm needs an input width that is a multiple of 16, not 72")
    with pytest.raises(MinigptError, match=refusal):
        prepare_for_inference(copy.deepcopy(model), "int8", kernel="int8mm")


def test_int8_takes_a_width_that_is_no_multiple_of_8():
    """A model 100 wide: the race passes over int8mm for its 100-wide inputs (mlp.c_proj's 400 may take it) and
    the other int8 kernels take them, each close to fp32."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=100, block_size=16, vocab_size=256, dropout=0.0)).eval()
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx)[0]
        for kernel in [None, *(set(available_kernels("int8")) - {"int8mm"})]:
            fast = prepare_for_inference(copy.deepcopy(model), "int8", kernel=kernel)
            chosen = kernels_named(kernel_summary(fast))
            assert all(chosen[role] != "int8mm" for role in ("lm_head", "attn.c_attn", "attn.c_proj", "mlp.c_fc"))
            assert (fast(idx)[0] - expected).abs().max() <= 0.05 * expected.abs().max(), kernel



def test_fp16_is_refused_for_weights_beyond_its_range(small_model, monkeypatch):
    """A bf16 weight beyond 65504 has no fp16 twin: that group takes another bf16 kernel, even where
    fbgemm-fp16 was timed fastest (and cached) for a model that fits; forcing it is one clear error."""
    if "fbgemm-fp16" not in available_kernels("bf16"):
        pytest.skip("this torch build has no FBGEMM fp16 linear")
    def fast_fp16(layers, x, flush, core_only):
        return 0.1 if layers[0].kernel == "fbgemm-fp16" else 1.0

    monkeypatch.setattr(inference, "_CHOICES", {})
    monkeypatch.setattr(inference, "_time_pass", fast_fp16)
    fits = prepare_for_inference(copy.deepcopy(small_model).to(torch.bfloat16))
    assert kernel_summary(fits).count(" fbgemm-fp16") == 5
    wide = copy.deepcopy(small_model).to(torch.bfloat16)
    with torch.no_grad():
        wide.transformer.h[1].mlp.c_fc.weight[3, 5] = 2.0**17  # one weight beyond fp16 (exact in bf16)
    reference = copy.deepcopy(wide)
    fast = prepare_for_inference(wide)
    chosen = kernels_named(kernel_summary(fast))
    assert chosen["mlp.c_fc"] != "fbgemm-fp16" and chosen["mlp.c_proj"] == "fbgemm-fp16"
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected, got = reference(idx)[0].float(), fast(idx)[0].float()
    assert torch.isfinite(got).all() and (got - expected).abs().max() <= 0.03 * expected.abs().max()
    with pytest.raises(MinigptError, match="no bf16 kernel takes these 256x64 layers: a weight of 1.311e"):
        prepare_for_inference(copy.deepcopy(reference), kernel="fbgemm-fp16")
    # The other way round: a choice made without fbgemm-fp16 (refused for `wide`) is not reused for a
    # model that allows it (the cache's key named every kernel, refused or not).
    again = prepare_for_inference(copy.deepcopy(small_model).to(torch.bfloat16))
    assert kernel_summary(again).count(" fbgemm-fp16") == 5
    # A NaN weight: FBGEMM's fp16 packing makes it a number (finite logits from broken weights); it
    # was refused as "a weight of nan is beyond fp16's range". Timing takes another kernel, whose NaN
    # logits decoding refuses; forced, the error says NaN.
    broken = copy.deepcopy(small_model).to(torch.bfloat16)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    with pytest.raises(MinigptError, match="no bf16 kernel takes these 256x64 layers: a weight is NaN, which FBGEMM's"):
        prepare_for_inference(copy.deepcopy(broken), kernel="fbgemm-fp16")
    fast = prepare_for_inference(broken)
    assert kernels_named(kernel_summary(fast))["mlp.c_fc"] != "fbgemm-fp16"
    with torch.no_grad():
        assert torch.isnan(fast(idx)[0]).all()


def test_a_refusal_leaves_the_model_as_it_was(small_model):
    """Layers were swapped group by group: a refusal in the fourth group left the first three in
    fbgemm-fp16, and a second call with another kernel then kept them (a mixed, unasked model)."""
    if "fbgemm-fp16" not in available_kernels("bf16"):
        pytest.skip("this torch build has no FBGEMM fp16 linear")
    model = copy.deepcopy(small_model).to(torch.bfloat16)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[3, 5] = 2.0**17  # (the last group of the blocks)
    with pytest.raises(MinigptError, match="no bf16 kernel takes these 64x256 layers"):
        prepare_for_inference(model, kernel="fbgemm-fp16")
    layers = [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    assert all(type(m) is torch.nn.Linear for m in [*layers, model.lm_head]) and not kernel_summary(model)
    chosen = kernels_named(kernel_summary(prepare_for_inference(model, kernel="linear")))
    assert set(chosen.values()) == {"linear"} and len(chosen) == 5


def test_timing_passes_beyond_the_memory_available_are_refused_before_any_swap(small_model, monkeypatch):
    """--num-samples 200000 made the race's outputs (rows x the head's timed rows) 40 GB: the
    allocator's traceback. Checked against the memory available before anything is built."""
    monkeypatch.setattr("minigpt.runtime.available_memory", lambda device: 2**30)
    model = copy.deepcopy(small_model)
    width, vocab = model.config.n_embd, model.config.vocab_size
    rows = 2**30 // ((width + 2 * vocab) * 4) + 1  # (the head: its widest output, twice for bmm-split's copy)
    with pytest.raises(MinigptError) as refused:
        prepare_for_inference(model, batch_size=rows)
    assert re.fullmatch(rf"--num-samples {rows}: the kernels' timing passes \({rows} rows x {width} activations "
                        rf"and 2 x {vocab} outputs, 1\.1 GB\) does not fit in memory", str(refused.value)), refused.value
    assert not kernel_summary(model)


def test_fp16_holds_every_bf16_weight_in_its_range():
    """fbgemm-fp16 multiplies the bf16 weights themselves: with fp32 activations its only errors are
    fp32 accumulation and, for weights below fp16's normal range (2^-14), at most 2^-25 each. Weights
    from 60,000 down to 1e-7, all exact in bf16."""
    if "fbgemm-fp16" not in available_kernels("bf16"):
        pytest.skip("this torch build has no FBGEMM fp16 linear")
    g = torch.Generator().manual_seed(0)
    magnitudes = 10.0 ** torch.randint(-7, 5, (96, 1), generator=g).float()  # one per row: tight bounds
    weight = (torch.randn(96, 64, generator=g) * magnitudes).clamp(-60000, 60000).bfloat16().float()
    bias = bf16_exact(96, seed=1)
    x = bf16_exact(3, 64, seed=2)
    layer = build("bf16", "fbgemm-fp16", weight, bias, 1)
    with torch.no_grad():
        y = layer(x).double()  # fp32 in, fp32 out: no bf16 rounding of the result
    w, k = weight.double(), 64 + 1
    expected = x.double() @ w.t() + bias.double()
    magnitude = x.double().abs() @ w.abs().t() + bias.double().abs()
    subnormal = (w.abs() < 2.0**-14).double()
    bound = k * U32 / (1 - k * U32) * magnitude + 2.0**-25 * (x.double().abs() @ subnormal.t())
    assert ((y - expected).abs() <= bound).all(), ((y - expected).abs() / bound).max()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_only_the_weights_keep_the_models_precision(small_model, quantize):
    """A prepared bf16 model runs its residual stream, attention and KV cache in fp32 (as llama.cpp's
    BF16 models do). With fbgemm-fp16 (fp32 activations, the bf16 weights exact) its logits are the
    fp32 model's with the bf16-rounded weights, to fp32 accuracy, in one pass and when decoding with
    the KV cache; the plain bf16 model, rounding every activation, is far from them."""
    from minigpt.runtime import activation_dtype
    from minigpt.sampling import SamplingConfig, generate_ids

    bf16 = copy.deepcopy(small_model).to(torch.bfloat16)
    fast = prepare_for_inference(copy.deepcopy(bf16), quantize)
    assert activation_dtype(fast) == torch.float32 and fast.transformer.wpe.weight.dtype == torch.float32
    if quantize is not None:
        return
    if "fbgemm-fp16" not in available_kernels("bf16"):
        pytest.skip("this torch build has no FBGEMM fp16 linear")
    fast = prepare_for_inference(copy.deepcopy(bf16), kernel="fbgemm-fp16")
    reference = copy.deepcopy(bf16).float()  # bf16 weights, fp32 arithmetic
    idx = torch.randint(0, 2100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, plain = reference(idx)[0], fast(idx)[0], bf16(idx)[0].float()
    scale = expected.abs().max()
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5 * scale  # measured 3.3e-7
    assert (plain - expected).abs().max() > 1e-3 * scale  # measured 3.4e-3: bf16 activations
    config = SamplingConfig(max_new_tokens=12, greedy=True)
    assert generate_ids(fast, [5, 6, 7], config, eos_id=None) == generate_ids(reference, [5, 6, 7], config, eos_id=None)


def test_sample_stats_names_the_kernels(tiny_minigpt_dir):
    from conftest import call_cli

    result = call_cli("sample.py", "--model", str(tiny_minigpt_dir), "--seed", "0", "--max-new-tokens", "2",
                      "--stats", "--num-samples", "2", "Hello")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("kernels: "))
    chosen = kernels_named(line)
    assert list(chosen) == ["lm_head", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert set(chosen.values()) <= set(available_kernels("fp32"))

# --- native bf16 (minigpt/runtime.py) -------------------------------------------------------------


def test_bf16_training_warns_in_one_line_only_where_bf16_is_emulated(monkeypatch):
    from minigpt import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.01)  # an AVX2 CPU: ~100x slower
    warning = runtime.emulated_bf16_warning(cpu, torch.bfloat16)
    assert warning.startswith("warning: --dtype bf16: this CPU has no native bf16 matmul (measured 100x")
    assert "\n" not in warning
    assert runtime.emulated_bf16_warning(cpu, torch.float32) is None
    assert runtime.emulated_bf16_warning(torch.device("cuda"), torch.bfloat16) is None
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 2.7)  # AVX-512 BF16
    assert runtime.emulated_bf16_warning(cpu, torch.bfloat16) is None


def test_bf16_warning_starts_below_a_third_of_fp32s_speed(monkeypatch):
    """bf16 is called emulated where its matmuls run at under a third of fp32's speed: 5x slower
    warns, 0.34 of the speed does not. The test above tried 100x slower and 2.7x faster only, so a
    bound of 1/30 went unnoticed: a CPU 5-29x slower in bf16 trained emulated without a word."""
    from minigpt import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.2)
    assert runtime.emulated_bf16_warning(cpu, torch.bfloat16).startswith(
        "warning: --dtype bf16: this CPU has no native bf16 matmul (measured 5x slower than fp32)")
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.34)
    assert runtime.emulated_bf16_warning(cpu, torch.bfloat16) is None


def test_bf16_speedup_is_measured_once_per_process_on_one_thread(monkeypatch):
    """On one thread (a kernel on all of them waits for the slowest, and a busy neighbour made
    native bf16 look emulated in ~40% of train.py runs); the process's thread count comes back."""
    from minigpt import runtime

    runtime.cpu_bf16_speedup.cache_clear()
    counts, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (counts.append(n), real(n)))
    before = torch.get_num_threads()
    first = runtime.cpu_bf16_speedup()
    assert counts == [1, before] and torch.get_num_threads() == before
    assert first > 0 and runtime.cpu_bf16_speedup() == first  # cached: the same number


def test_train_cli_prints_the_warning_once(tmp_path, monkeypatch):
    from conftest import call_cli

    from minigpt import runtime

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.01)
    result = call_cli("train.py", "--preset", "tiny", "--no-progress", "--n-layer", "1", "--max-steps", "1",
                      "--dtype", "bf16", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "bf16" in line] == [
        runtime.emulated_bf16_warning(torch.device("cpu"), torch.bfloat16)]


@pytest.mark.parametrize("dtype, quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8")])
def test_a_one_row_head_timed_from_memory_is_not_split_into_an_empty_half(monkeypatch, dtype, quantize):
    """Timed from memory, a group of one matrix is split in two (half warms the code, half is
    timed); a matrix of one row (a one-token vocabulary) is timed whole: an empty half is no layer
    (oneDNN cannot pack one; the other kernels would time nothing)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=1, dropout=0.0)).eval()
    monkeypatch.setattr(inference, "cpu_cache_bytes", lambda: 16)  # every model is larger: a flush
    time_pass = inference._time_pass

    def no_empty_layer(layers, x, *args, **kwargs):
        with torch.no_grad():
            assert all(layer(x).size(-1) for layer in layers), "a layer of no rows was timed"
        return time_pass(layers, x, *args, **kwargs)

    monkeypatch.setattr(inference, "_time_pass", no_empty_layer)
    monkeypatch.setattr(inference, "_CHOICES", {})
    fast = prepare_for_inference(copy.deepcopy(model).to(dtype), quantize)
    idx = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        expected, got = model(idx)[0], fast(idx)[0]
    assert got.shape == (1, 3, 1)
    tolerance = 1e-5 if dtype == torch.float32 and quantize is None else 0.05  # bf16, int8: their rounding
    assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max() + 1e-6


def test_for_compiled_decoding_fusible_kernels_are_timed_by_their_product_alone():
    """A compiled step fuses the ops around FBGEMM's and int8mm's products (`core`), so timing for
    it runs `core` on `core_input` and never the whole layer; other kernels run whole either way."""
    weight, bias = bf16_exact(48, 64), bf16_exact(48, seed=1)
    x = bf16_exact(1, 1, 64, seed=2)
    for kernel in ("fbgemm", "int8mm"):
        layer = build("int8", kernel, weight, bias, 1)
        assert layer.core(layer.core_input(x)).shape == (1 if kernel == "int8mm" else 2, 48)  # (2: the digits)

        def whole(_x):
            raise AssertionError("the whole layer was timed")

        layer.forward = whole
        assert inference._time_pass([layer], x, None, core_only=True) >= 0
        with pytest.raises(AssertionError, match="whole layer"):
            inference._time_pass([layer], x, None)
    fp32 = build("fp32", "addmm-t", weight, bias, 1)
    fp32.forward = whole
    with pytest.raises(AssertionError, match="whole layer"):
        inference._time_pass([fp32], x, None, core_only=True)


def test_prepared_for_compiled_decoding_the_race_sees_the_fused_costs(small_model, monkeypatch):
    if not {"fbgemm", "int8mm"} <= set(available_kernels("int8")):
        pytest.skip("this torch build lacks one of the two int8 kernels")
    # eager, FBGEMM's digits make its layers slower; compiled, its product alone is the faster
    seconds = {("fbgemm", False): 2.0, ("fbgemm", True): 0.5, ("int8mm", False): 1.0, ("int8mm", True): 1.0}
    monkeypatch.setattr(inference, "_time_pass",
                        lambda layers, x, flush, core_only: seconds.get((layers[0].kernel, core_only), 9.0))
    monkeypatch.setattr(inference, "_CHOICES", {})
    eager = prepare_for_inference(copy.deepcopy(small_model), "int8")
    compiled = prepare_for_inference(copy.deepcopy(small_model), "int8", compiled=True)
    assert set(kernels_named(kernel_summary(eager)).values()) == {"int8mm"}
    assert set(kernels_named(kernel_summary(compiled)).values()) == {"fbgemm"}
    assert " on " not in kernel_summary(compiled)  # (a fused layer runs on all threads: no thread race)
