"""Compiled decoding (minigpt/compiled_decoding.py): the compiled one-token step gives the eager
model's tokens and logits, through the cache's window sliding and in batches; which layers are
compiled through and which are called opaquely; the opaque registry forgets dead layers."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

from conftest import needs_cpu_compiler
from minigpt import compiled_decoding, layouts, opaque, runtime
from minigpt.compiled_decoding import CompiledDecoding, DecodeStep, compilable
from minigpt.config import GPTConfig
from minigpt.errors import MinigptError
from minigpt.inference import available_kernels, prepare_for_inference
from minigpt.model import GPT, KVCache
from minigpt.sampling import generate, next_token, seeded_generator
from minigpt.sampling_config import SamplingConfig

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=2100, dropout=0.0)
PROMPT = [5, 17, 300, 42, 7, 1999, 64, 3, 12, 900]


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def assert_one_step_is_eager(model: GPT, compiled: CompiledDecoding, within: float) -> None:
    """One compiled step's logits, after the prompt, against the eager model's at the same position:
    within `within` of the largest; the cache one position longer."""
    cache = compiled.new_cache(1, 20, torch.float32)
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        model(prompt, kv_cache=cache)
        got = compiled(torch.tensor([[77]]), cache)
        want = model(torch.cat([prompt, torch.tensor([[77]])], dim=1))[0][:, -1]
    assert cache.length == len(PROMPT) + 1
    torch.testing.assert_close(got, want, rtol=0, atol=within * want.abs().max().item())


def with_biases(model: GPT) -> GPT:
    """`model` with random biases (GPT-2 initialises them to zero, which would hide a bias left out)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(module.bias.numel()))
    return model


def tokens(model, config: SamplingConfig, compiled=None, num_samples: int = 1) -> list[list[int]]:
    steps = generate(model, PROMPT, config, num_samples, seeded_generator(model, 7), eos_id=None, compiled=compiled)
    return torch.stack(list(steps), dim=1).tolist()


def greedy_gap(model: GPT, compiled: CompiledDecoding) -> tuple[float, list[int]]:
    """(the largest gap between the compiled step's logits and the eager model's on the same tokens,
    as a fraction of the largest logit, over 40 greedy tokens; those tokens)."""
    seen = []

    def recording(logits, tokens_so_far, config, generator):
        seen.append(logits.clone())
        return next_token(logits, tokens_so_far, config, generator)

    greedy = SamplingConfig(max_new_tokens=40, greedy=True, repetition_penalty=2.0)
    new = [int(t) for t in generate(model, PROMPT, greedy, pick=recording, eos_id=None, compiled=compiled)]
    with torch.inference_mode():  # the eager model's logits on the same tokens, at each new token
        want = model(torch.tensor([PROMPT + new]))[0][0, len(PROMPT) - 1 : -1]
    assert len(seen) == 40
    return max(float((got[0] - w).abs().max() / w.abs().max()) for got, w in zip(seen, want)), new


@needs_cpu_compiler
@pytest.mark.parametrize("kernel", ["fbgemm", "int8mm"])
def test_compiled_int8_decodes_the_eager_tokens_through_a_sliding_window(kernel):
    """int8 layers are compiled through (their activation digits / conversions fuse into the graph).
    80 new tokens after 10 overrun the 64-token window: the cache slides, the eager prefill rebuilds
    it, and the compiled steps go on from there."""
    if kernel not in available_kernels("int8"):
        pytest.skip(f"this torch build and CPU offer no int8 kernel {kernel!r}")
    model = prepare_for_inference(small_model(), "int8", kernel=kernel)
    compiled = CompiledDecoding(model)
    assert not any(isinstance(m, opaque.OpaqueLayer) for m in compiled.step._orig_mod.layers.modules())
    greedy = SamplingConfig(max_new_tokens=80, greedy=True, repetition_penalty=2.0)  # (varied tokens)
    eager = tokens(model, greedy)
    assert tokens(model, greedy, compiled) == eager
    assert len(set(eager[0])) > 5  # (a real sequence, not one token repeated)

    assert_one_step_is_eager(model, compiled, 1e-4)


@needs_cpu_compiler
def test_compiled_fp32_decodes_a_batch_with_the_eager_logits():
    """fp32 layers are opaque calls of their eager kernels (inductor's own code for one row was
    slower); 3 samples at once, each step's logits within rounding of the eager model's."""
    model = prepare_for_inference(small_model(), None)
    compiled = CompiledDecoding(model)
    layers = list(compiled.step._orig_mod.layers.modules())
    assert sum(isinstance(m, opaque.OpaqueLayer) for m in layers) == 4 * CONFIG.n_layer
    config = SamplingConfig(max_new_tokens=30, greedy=True, repetition_penalty=2.0)
    seen = {"eager": [], "compiled": []}

    def recording(into):
        def pick(logits, tokens_so_far, config, generator):
            into.append(logits.clone())
            return next_token(logits, tokens_so_far, config, generator)
        return pick

    for name, c in (("eager", None), ("compiled", compiled)):
        list(generate(model, PROMPT, config, 3, pick=recording(seen[name]), eos_id=None, compiled=c))
    assert len(seen["compiled"]) == 30 and seen["compiled"][5].shape == (3, CONFIG.vocab_size)
    for got, want in zip(seen["compiled"], seen["eager"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@needs_cpu_compiler
def test_one_compiled_graph_serves_every_prompt_and_cache_length():
    """Attention reads the cache's filled positions, their count a dynamic dimension: after the
    warm-up (which races the two fp32 steps and keeps one), prompts and runs of other lengths, a one-token prompt and the window sliding included,
    compile nothing more and decode the eager tokens."""
    model = prepare_for_inference(small_model(), None)
    compiled = CompiledDecoding(model)
    compiled.warm_up(1, torch.float32)
    # fp32 on the CPU: warm_up compiled both steps, timed them, and decodes with the faster
    timed = compiled.seconds_per_token
    assert set(timed) == {"kernels", "inductor"} and all(0 < t < 1 for t in timed.values())
    assert compiled.chosen == min(timed, key=timed.get)
    assert compiled.describe().startswith("decoding compiled, products by ") and " ms a token; " in compiled.describe()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    step, calls = compiled.step, []
    compiled.step = lambda *args: calls.append(args[2][0].size(2)) or step(*args)  # (the lengths read)
    # (the last run overruns the 64-token window: 43 steps, one eager at the full window, a prefill, 24)
    for prompt, new, compiled_steps in ((PROMPT, 5, 4), (PROMPT[:1], 8, 7), (PROMPT[:3], 30, 29), (PROMPT * 2, 70, 67)):
        config = SamplingConfig(max_new_tokens=new, greedy=True, repetition_penalty=2.0)
        run = [generate(model, prompt, config, 1, seeded_generator(model, 7), eos_id=None, compiled=c)
               for c in (compiled, None)]
        got, want = ([int(t) for t in steps] for steps in run)
        assert got == want and len(got) == new
        assert len(calls) == compiled_steps and calls[0] == len(prompt) + 1  # (the filled positions, no more)
        calls.clear()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # (each run: a graph per
        # length would fail here fast, not after ~100 compiles)


def test_layers_on_fewer_threads_compile_through_on_all_of_them_or_stay_opaque():
    model = prepare_for_inference(small_model(), "int8", kernel="int8mm")
    layer = model.transformer.h[0].attn.c_attn
    assert compilable(layouts.OnThreads(layer, 1), 3 * CONFIG.n_embd) is layer
    fp32 = prepare_for_inference(small_model(), None).transformer.h[0].attn.c_attn
    assert isinstance(compilable(layouts.OnThreads(fp32, 1), 3 * CONFIG.n_embd), opaque.OpaqueLayer)


def test_the_opaque_registry_forgets_a_layer_once_it_is_gone():
    layer = torch.nn.Linear(8, 4)
    wrapped = opaque.OpaqueLayer(layer, 4)
    x = torch.randn(2, 8)
    torch.testing.assert_close(wrapped(x), layer(x))
    assert wrapped.key in opaque._OPAQUE_PRODUCTS
    del layer
    gc.collect()
    assert wrapped.key not in opaque._OPAQUE_PRODUCTS


@needs_cpu_compiler
def test_an_opaque_layer_may_return_a_strided_result():
    """The compiled graph expects a contiguous result; a layout may return a strided one (the fp32
    LM head at 8 rows returned rows padded to 50,258 for the vocabulary's 50,257)."""
    class Strided(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, x[..., :1]], dim=-1)[..., :-1]  # x's values, rows one element apart

    layer = Strided()
    wrapped = opaque.OpaqueLayer(layer, 8)
    twice = torch.compile(lambda x: wrapped(x) * 2, fullgraph=True, dynamic=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(twice(x), 2 * x)


def test_a_model_in_training_mode_or_a_cpu_without_a_compiler_or_python_headers_is_refused(monkeypatch):
    with pytest.raises(MinigptError, match="eval mode"):
        CompiledDecoding(GPT(CONFIG))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(MinigptError, match=r"needs a C\+\+ compiler \(no-such-compiler not found, or it fails"):
        CompiledDecoding(small_model())
    monkeypatch.setenv("CXX", "false")  # (found, but exits 1: it would fail deep inside inductor)
    with pytest.raises(MinigptError, match=r"needs a C\+\+ compiler \(false not found, or it fails to run\)"):
        CompiledDecoding(small_model())
    monkeypatch.setenv("CXX", sys.executable)  # (a program that exists passes the compiler check)
    monkeypatch.setattr(runtime.sysconfig, "get_path", lambda name: "/no/such/include")
    with pytest.raises(MinigptError, match=r"needs Python's C headers \(/no/such/include/Python.h not found"):
        CompiledDecoding(small_model())


@needs_cpu_compiler
def test_many_models_and_batch_sizes_each_keep_their_compiled_step(monkeypatch):
    """One graph per model and batch size, all of the same code: more than the 8 that
    dynamo keeps by default (a 9th was an error), here 5 models x 2 batch sizes. (Compiled without
    the C++ wrapper, beside the point here: it adds ~6 s to each of the 10 first compiles.)"""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, **{**kw, "options": None}))
    config = SamplingConfig(max_new_tokens=3, greedy=True)
    for seed in range(5):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=2100)).eval()
        compiled = CompiledDecoding(model)
        for batch in (1, 2):
            assert tokens(model, config, compiled, num_samples=batch) == tokens(model, config, num_samples=batch)


def compile_as(scale: float):
    """A stand-in for torch.compile: the step runs eager, its logits scaled by `scale`."""
    return lambda step, **options: lambda *args: step(*args) * scale


def compile_to(logits: torch.Tensor):
    """A stand-in for torch.compile whose step gives `logits`, whatever it is asked."""
    return lambda step, **options: lambda *args: logits


@needs_cpu_compiler
def test_warm_up_refuses_a_compiled_step_that_disagrees_with_the_eager_model(monkeypatch):
    """A wrong compiled step (NaN logits here, as inductor's cache written under another instruction
    set gave) is one clear error when it is compiled, not garbage text later."""
    model = prepare_for_inference(small_model(), None)
    monkeypatch.setattr(torch, "compile", compile_as(float("nan")))
    with pytest.raises(MinigptError, match=r"logits differ from the model's by nan .*TORCHINDUCTOR_CACHE_DIR"):
        CompiledDecoding(model).warm_up(2, torch.float32)
    monkeypatch.setattr(torch, "compile", compile_as(1.001))
    assert CompiledDecoding(model).warm_up(2, torch.float32) >= 0  # (rounding-sized gaps pass)


@needs_cpu_compiler
def test_warm_up_names_a_compiler_that_builds_nothing(monkeypatch):
    """A compiler that answers --version (so passes the check) but builds nothing (CXX a wrapper
    that fails, a broken toolchain) was a 40-line InductorError traceback at the first step."""
    def compiler_fails(step, **options):
        def run(*args):
            raise RuntimeError("CppCompileError: C++ compile error\n\nCommand:\ng++ ... -o header.i\n\nOutput: ...")
        return run

    monkeypatch.setattr(torch, "compile", compiler_fails)
    with pytest.raises(MinigptError, match=r"^compiled decoding: torch\.compile could not build the step \(CppCompileError: "
                                           r"C\+\+ compile error\); decode eagerly, without compiling$"):
        CompiledDecoding(prepare_for_inference(small_model(), None)).warm_up(1, torch.float32)


@needs_cpu_compiler
def test_warm_up_refuses_a_batch_or_dtype_it_cannot_decode(monkeypatch):
    """A batch of 0 or 2.0, or a dtype other than the activations' (bf16 for an fp32 model, or a name
    such as "fp32"), failed in torch's own words (or a KeyError); one line now names what it takes."""
    monkeypatch.setattr(torch, "compile", compile_as(1.0))
    compiled = CompiledDecoding(small_model())
    for batch_size, dtype in ((0, torch.float32), (2.0, torch.float32), (1, torch.bfloat16), (1, "fp32"),
                              (True, torch.float32)):
        with pytest.raises(MinigptError, match=r"warm_up needs a batch size of at least 1 and the model's activation "
                                               rf"dtype \(torch.float32\), not {batch_size!r} and {dtype}"):
            compiled.warm_up(batch_size, dtype)
    assert compiled.warm_up(2, torch.float32) >= 0


@needs_cpu_compiler
def test_warm_up_allows_16_bit_rounding_and_no_more(monkeypatch):
    """With bf16 or fp16 activations (a GPU's) the eager model and the step each round every op to 8
    or 11 bits, and differently: warm_up's check allows 5e-2 of the largest logit there (measured up
    to 9.4e-3, distilgpt2's shape in bf16), 1e-2 in fp32; a larger gap is still refused. The bounds
    are pinned: a step whose logits are the eager model's times 1 + 0.99 x the bound passes, times
    1 + 1.01 x the bound is refused (fp16 runs on the CPU too, slowly, which this tiny model can afford)."""
    bf16 = small_model().to(torch.bfloat16)
    monkeypatch.setattr(torch, "compile", compile_as(1.03))
    assert CompiledDecoding(bf16).warm_up(1, torch.bfloat16) >= 0
    with pytest.raises(MinigptError, match=r"logits differ from the model's"):
        CompiledDecoding(small_model()).warm_up(1, torch.float32)
    monkeypatch.setattr(torch, "compile", compile_as(1.2))
    with pytest.raises(MinigptError, match=r"logits differ from the model's"):
        CompiledDecoding(bf16).warm_up(1, torch.bfloat16)

    bounds = {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-2}
    assert set(compiled_decoding.AGREEMENT) == set(bounds)
    for dtype, bound in bounds.items():
        model = small_model().to(dtype)
        with torch.inference_mode():  # (what warm_up compares with: the second of two tokens 0, in fp32)
            want = model(torch.zeros(1, 2, dtype=torch.long))[0][:, -1].float()
        monkeypatch.setattr(torch, "compile", compile_to(want * (1 + 0.99 * bound)))
        assert CompiledDecoding(model).warm_up(1, dtype) >= 0, dtype
        monkeypatch.setattr(torch, "compile", compile_to(want * (1 + 1.01 * bound)))
        with pytest.raises(MinigptError, match=r"logits differ from the model's"):
            CompiledDecoding(model).warm_up(1, dtype)


@pytest.mark.parametrize("kernel", available_kernels("fp32"))
def test_every_fp32_layout_gives_back_its_exact_weight_and_bias(kernel):
    """What the step with frozen GEMMs multiplies by (`dense()`) is the model's W and b, bit for bit."""
    model = with_biases(small_model())
    want = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (model.transformer.h[0].attn.c_attn,
                                                                           model.transformer.h[1].mlp.c_proj)]
    head = model.lm_head.weight.detach().clone()
    prepared = prepare_for_inference(model, None, kernel=kernel)
    for layer, (weight, bias) in zip((prepared.transformer.h[0].attn.c_attn, prepared.transformer.h[1].mlp.c_proj), want):
        got_weight, got_bias = compiled_decoding._unwrapped(layer).dense()
        assert torch.equal(got_weight, weight) and torch.equal(got_bias, bias)
    got_head, no_bias = compiled_decoding._unwrapped(prepared.lm_head).dense()
    assert torch.equal(got_head, head) and no_bias is None


@needs_cpu_compiler
def test_inductor_gemms_decode_the_eager_tokens_with_no_opaque_call():
    """gemms="inductor": every product is inductor's own, the weights frozen into the graph; the
    tokens are the eager model's and one step's logits are within fp32 rounding of its."""
    model = prepare_for_inference(with_biases(small_model()), None)
    compiled = CompiledDecoding(model, gemms="inductor")
    assert list(compiled.steps) == ["inductor"] and compiled.chosen == "inductor"
    layers = list(compiled.step._orig_mod.modules())
    assert not any(isinstance(m, opaque.OpaqueLayer) for m in layers)
    assert sum(isinstance(m, compiled_decoding.FrozenGemm) for m in layers) == 4 * CONFIG.n_layer + 1
    greedy = SamplingConfig(max_new_tokens=20, greedy=True, repetition_penalty=2.0)
    eager = tokens(model, greedy)
    assert tokens(model, greedy, compiled) == eager and len(set(eager[0])) > 5
    assert_one_step_is_eager(model, compiled, 1e-5)
    assert compiled.describe() == "decoding compiled, products by inductor's GEMMs"
    assert compiled.stats_note() == " (the prompt); decoding compiled, products by inductor's GEMMs"  # (--stats)


@needs_cpu_compiler
def test_the_eager_model_that_wins_the_race_decodes_and_says_so(monkeypatch):
    """On a GPU warm_up also races the model's own forward ("eager", as decoding without compiling
    runs), which decoded faster there: here, with that entry added by hand and its timing won, every
    token goes through the model's forward, never the compiled step, and describe() says so."""
    model = small_model()
    compiled = CompiledDecoding(model, gemms="kernels")
    compiled.steps["eager"] = None
    compiled.chosen = "eager"  # (before any race: says so without timings)
    assert compiled.describe() == "decoding eager, through the model's own forward"
    monkeypatch.setattr(compiled, "_time_steps", lambda idx, dtype: {"kernels": 2e-3, "eager": 1.5e-3})
    compiled.warm_up(1, torch.float32)
    assert compiled.chosen == "eager" and compiled.stats_note() == ""  # (the kernels line is all there is)
    assert compiled.describe() == ("decoding eager: the compiled step (products by the chosen kernels) was slower "
                                   "(2.00 ms a token against 1.50)")

    def refuse(*args):
        raise AssertionError("the compiled step ran")

    compiled.steps["kernels"] = refuse
    greedy = SamplingConfig(max_new_tokens=20, greedy=True, repetition_penalty=2.0)
    assert tokens(model, greedy, compiled) == tokens(model, greedy)
    assert_one_step_is_eager(model, compiled, 1e-6)


def test_a_window_of_fewer_than_3_positions_is_refused_in_one_line():
    """In a 1- or 2-position window every step runs eager (an empty cache, or the whole one), and
    warm_up's check, which reads a third position, was KVCache's "max_len 3 exceeds the context
    window 2" in a traceback (sample.py --compile on such a checkpoint); 3 positions are taken."""
    for block_size in (1, 2):
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size, vocab_size=50, dropout=0.0))
        with pytest.raises(MinigptError) as e:
            CompiledDecoding(model.eval())
        assert str(e.value) == (f"compiled decoding needs a context window of at least 3 positions, not {block_size}: "
                                "in a smaller one every step runs eager (see __call__); decode without compiling")


@needs_cpu_compiler
def test_a_window_of_3_positions_is_taken():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=3, vocab_size=50, dropout=0.0)).eval()
    assert CompiledDecoding(model, gemms="kernels").model is model


@needs_cpu_compiler
def test_the_race_between_steps_fits_a_small_window(monkeypatch):
    """It timed 16 tokens in a cache of 19 positions whatever the model's window: "max_len 19 exceeds
    the context window 8" for `--compile` on an 8-position model. (The steps are stand-ins here.)"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50, dropout=0.0)).eval()
    compiled = CompiledDecoding(model, gemms="kernels")
    compiled.steps = {"a": None, "b": None}
    lengths = []

    def step(self, idx, cache):
        assert cache.length + 1 <= cache.max_len <= model.config.block_size
        cache.length += 1
        lengths.append(cache.length)
        return torch.zeros(idx.size(0), 50)

    monkeypatch.setattr(CompiledDecoding, "__call__", step)
    idx = torch.zeros(1, 1, dtype=torch.long)
    assert set(compiled._time_steps(idx, torch.float32)) == {"a", "b"}
    assert max(lengths) == 7  # 1 eager, 1 to warm, 5 timed: 8 positions less the one a whole-cache step would need


@needs_cpu_compiler
def test_the_whole_cache_step_decodes_the_eager_tokens_in_the_same_tensors_every_run():
    """The CUDA-graph step (gemms="cudagraphs", a GPU's) reads the whole window's cache at every
    token, the positions after the new one masked, in tensors kept for every run (a graph replays
    fixed addresses). Here that step runs uncompiled on the CPU through CompiledDecoding: the eager
    model's tokens, in batches and through the window sliding, and in a short run after a long one
    whose keys are still in the cache beyond the new positions."""
    model = with_biases(small_model())
    compiled = CompiledDecoding(model, gemms="kernels")  # (then given the whole-cache step by hand)
    step, lengths = DecodeStep(model, whole_cache=True), []
    compiled.steps = {"cudagraphs": lambda idx, pos, keys, values: lengths.append(keys[0].size(2)) or step(
        idx, pos, keys, values)}
    compiled.chosen = "cudagraphs"
    long = SamplingConfig(max_new_tokens=80, greedy=True, repetition_penalty=2.0)  # (10 + 80 > 64: slides)
    for batch in (1, 3):
        assert tokens(model, long, compiled, batch) == tokens(model, long, None, batch)
    assert set(lengths) == {CONFIG.block_size} and len(lengths) > 100
    keys = compiled.whole_caches[(1, torch.float32)].k[0]
    assert keys[0, 0, 40:].abs().sum() > 0  # (the long run's keys, which the short one must not see)
    short = SamplingConfig(max_new_tokens=6, greedy=True, repetition_penalty=2.0)
    assert tokens(model, short, compiled) == tokens(model, short)
    assert compiled.whole_caches[(1, torch.float32)].k[0] is keys and set(compiled.whole_caches) == {
        (1, torch.float32), (3, torch.float32)}
    assert_one_step_is_eager(model, compiled, 1e-5)
    with pytest.raises(MinigptError, match=r"decodes into a cache from new_cache\(\)"):
        with torch.inference_mode():
            plain = KVCache(CONFIG, 1, 20)
            model(torch.tensor([PROMPT]), kv_cache=plain)
            compiled(torch.tensor([[77]]), plain)


@needs_cpu_compiler
def test_a_cuda_toolkit_without_a_gpu_adds_no_line_about_cuda(tmp_path):
    """Inductor's C++ builder imports torch.utils.cpp_extension, which on a machine with a CUDA
    toolkit but no GPU logs "No CUDA runtime is found" as it loads (torch's CUDA builds): the CPU's
    compile preparation imports it with that logger quiet."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def stderr(prepare: bool) -> str:
        code = f"from minigpt.runtime import prepare_cpu_compile; {'prepare_cpu_compile();' * prepare} " \
               "import torch.utils.cpp_extension"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr

    if torch.version.cuda:  # (a CUDA build: the line this prevents)
        assert "No CUDA runtime is found" in stderr(prepare=False)
    assert stderr(prepare=True) == ""


@needs_cpu_compiler
def test_only_fp32_and_int8_on_the_cpu_offer_inductor_gemms():
    """The step with inductor's GEMMs needs fp32 layouts that give back W (`dense()`) or int8 ones
    (as int8mm, `int8mm_twin`): not bf16's, whose products inductor wrote no faster."""
    bf16 = small_model().to(torch.bfloat16)
    assert list(CompiledDecoding(bf16).steps) == ["kernels"]
    torch.manual_seed(0)  # int8mm takes input widths in multiples of 16: 40 is not, so no int8mm twins
    narrow = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=40, block_size=16, vocab_size=100, dropout=0.0)).eval()
    assert "inductor" not in CompiledDecoding(prepare_for_inference(narrow, "int8")).steps
    with pytest.raises(MinigptError, match=r"gemms='inductor' needs an fp32 or int8 model on the CPU"):
        CompiledDecoding(bf16, gemms="inductor")
    with pytest.raises(MinigptError, match=r"gemms='fbgemm' needs an int8 model on the CPU with int8mm layers"):
        CompiledDecoding(small_model(), gemms="fbgemm")
    with pytest.raises(MinigptError, match=r"gemms must be one of \('measure', 'kernels', 'inductor', "
                       r"'fbgemm', 'cudagraphs'\), not 'fast'"):
        CompiledDecoding(small_model(), gemms="fast")
    with pytest.raises(MinigptError, match=r"gemms='cudagraphs' needs a GPU"):
        CompiledDecoding(small_model(), gemms="cudagraphs")
    fp32 = prepare_for_inference(small_model(), None)
    assert list(CompiledDecoding(fp32, gemms="kernels").steps) == ["kernels"]
    assert list(CompiledDecoding(small_model()).steps) == ["kernels"]  # (not prepared: plain nn.Linear layers)


@needs_cpu_compiler
def test_int8mm_layers_race_a_step_with_fbgemm_on_every_layer():
    """An int8 model with int8mm layers gets a second step with FBGEMM's kernel on every layer, on
    the same int8 weights (`fbgemm_twin`: the same q, scales and bias); warm_up keeps the faster.
    Each of the FBGEMM step's logits lies within the activations' rounding of the eager model's on
    the same tokens: int8mm rounds them to bf16 (2e-3 an element), FBGEMM to 14-bit digits (1.2e-4
    of the row's largest); measured 3.9e-3 of the largest logit over 40 tokens. (A twin without its
    scales or its bias is off by far more.)"""
    if "fbgemm" not in available_kernels("int8"):
        pytest.skip("this torch build and CPU offer no FBGEMM int8 kernel")
    model = prepare_for_inference(with_biases(small_model()), "int8", kernel="int8mm")
    layer = model.transformer.h[1].mlp.c_fc
    twin = compiled_decoding.fbgemm_twin(layer)
    assert torch.equal(twin.scale, layer.scale.float()) and torch.equal(twin.bias, layer.bias)
    x = torch.randn(3, CONFIG.n_embd, generator=torch.Generator().manual_seed(1))
    weight = layer.qweight.float() * layer.scale.float().unsqueeze(1)  # the int8 weights q * s, (out, in)
    # FBGEMM rounds each x to 14 bits, within max|x| / 8127 / 2 an element: each output within that
    # times its row's sum of |W|
    bound = x.abs().max() / 8127 / 2 * weight.abs().sum(dim=1).max()
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), x @ weight.t() + layer.bias, rtol=0, atol=bound.item())
    compiled = CompiledDecoding(model)
    assert list(compiled.steps) == ["kernels", "inductor", "fbgemm"]
    step = compiled.steps["fbgemm"]._orig_mod  # (its `model` keeps the int8mm layers the prompt runs on)
    assert {m.kernel for m in [*step.layers.modules(), step.lm_head] if hasattr(m, "kernel")} == {"fbgemm"}
    compiled.warm_up(1, torch.float32)
    timed = compiled.seconds_per_token
    assert set(timed) == {"kernels", "inductor", "fbgemm"} and compiled.chosen == min(timed, key=timed.get)
    others = [f"{compiled_decoding.STEP_NAMES[k]} {timed[k] * 1e3:.2f}" for k in timed if k != compiled.chosen]
    assert compiled.describe() == (f"decoding compiled, {compiled_decoding.STEP_NAMES[compiled.chosen]} "
                                   f"({timed[compiled.chosen] * 1e3:.2f} ms a token; {', '.join(others)})")
    compiled.chosen = "fbgemm"  # (whichever won: the FBGEMM step, compiled by warm_up)
    gap, new = greedy_gap(model, compiled)
    assert len(set(new)) > 5 and gap <= 1e-2


@pytest.mark.parametrize("kernel", ["fbgemm", "int8mm", "upcast"])
def test_an_int8_layers_int8mm_twin_has_its_q_and_bias_and_its_scales_in_bf16(kernel):
    """`int8mm_twin`, the form of an int8 layer whose product inductor writes: the same q (read back
    from FBGEMM's packing), the scales rounded to bf16 (int8mm's), the same bias; an int8mm layer
    is its own twin."""
    if kernel not in available_kernels("int8") or "int8mm" not in available_kernels("int8"):
        pytest.skip(f"this torch build and CPU offer no int8 kernel {kernel!r} or no int8mm")
    layer = prepare_for_inference(with_biases(small_model()), "int8", kernel=kernel).transformer.h[1].mlp.c_proj
    twin = compiled_decoding.int8mm_twin(layer)
    assert (twin is layer) == (kernel == "int8mm") and twin.kernel == "int8mm"
    q = layer.qweight if layer.qweight is not None else layer.packed.unpack()[0].int_repr()
    assert torch.equal(twin.qweight, q) and torch.equal(twin.bias, layer.bias)
    assert torch.equal(twin.scale, layer.scale.to(torch.bfloat16))


@needs_cpu_compiler
def test_int8_layers_race_a_step_whose_int8_products_inductor_writes():
    """An int8 model gets a step with every layer as its int8mm twin, the weights frozen, so
    inductor writes the int8 products itself (max-autotune: its C++ GEMM, raced against ATen's
    int8mm). Distilgpt2 on the Zen 4: 249 against 185 tokens/s. Here FBGEMM's layers, whose twins
    round the activations to bf16 where the eager model rounds them to 14 bits: each logit within
    that rounding of the eager model's (measured 4.4e-3 of the largest); a twin without its scales
    or its bias is far off."""
    kernel = "fbgemm" if "fbgemm" in available_kernels("int8") else "int8mm"
    if "int8mm" not in available_kernels("int8"):
        pytest.skip("this torch build and CPU offer no int8mm kernel")
    model = prepare_for_inference(with_biases(small_model()), "int8", kernel=kernel)
    assert "inductor" in CompiledDecoding(model).steps
    compiled = CompiledDecoding(model, gemms="inductor")
    step = compiled.step._orig_mod
    assert not any(isinstance(m, opaque.OpaqueLayer) for m in step.modules())
    assert {m.kernel for m in [*step.layers.modules(), step.lm_head] if hasattr(m, "kernel")} == {"int8mm"}
    gap, new = greedy_gap(model, compiled)
    assert len(set(new)) > 5 and gap <= 1e-2
    assert compiled.describe() == "decoding compiled, products by inductor's GEMMs"


@needs_cpu_compiler
def test_steps_compiled_for_other_instruction_sets_keep_to_their_own_cache(monkeypatch, tmp_path):
    """Inductor's disk cache does not tell instruction sets apart: a step compiled with torch's
    kernels capped to AVX2 and loaded uncapped corrupted the heap (glibc aborted 3 runs in 4). So
    compiled decoding points the cache at one subfolder of it per instruction set, the caps included."""
    from minigpt.runtime import ISA_CAPS, prepare_cpu_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    for variable in ISA_CAPS:
        monkeypatch.delenv(variable, raising=False)
    CompiledDecoding(small_model().eval())  # (compiles nothing yet)
    native = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert os.path.dirname(native) == str(tmp_path)
    assert os.path.basename(native).startswith(f"isa-{torch.backends.cpu.get_cpu_capability().lower()}-")
    assert str(prepare_cpu_compile()) == native  # a second model: the same folder, not one below
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = prepare_cpu_compile()
    assert capped.parent == tmp_path and str(capped) != native
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(capped)


@needs_cpu_compiler  # (the folders here are beside pytest's, which hold no space then)
def test_a_temporary_or_cache_folder_with_a_space_is_refused_in_one_line(monkeypatch, tmp_path):
    """torch's C++ build commands split paths at spaces: with TMPDIR="/tmp/my temp", `sample.py
    --compile` failed at its first step with "CppCompileError: C++ compile error"."""
    import tempfile

    from minigpt.runtime import prepare_cpu_compile

    spaced = tmp_path / "my temp"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(spaced))
    with pytest.raises(MinigptError, match=f"^torch.compile on the CPU cannot build C\\+\\+ under '{spaced}', a path "
                       r"with a space \(torch's build commands split it\): set TMPDIR to a folder without one$"):
        prepare_cpu_compile()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(spaced))
    with pytest.raises(MinigptError, match="set TORCHINDUCTOR_CACHE_DIR to a folder without one$"):
        prepare_cpu_compile()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    assert prepare_cpu_compile().parent == tmp_path / "cache"


@needs_cpu_compiler
def test_a_compiled_step_of_another_model_or_of_swapped_layers_is_refused():
    """generate(model, compiled=...) ran the prompt on `model` and every later token on the other
    model's compiled step, in silence; one made before prepare_for_inference swapped the layers
    failed in a 53-frame dynamo traceback. Both are refused before anything runs."""
    model, other = small_model(), small_model()
    compiled = CompiledDecoding(other, gemms="kernels")
    config = SamplingConfig(max_new_tokens=3, greedy=True)
    with pytest.raises(MinigptError, match="made for another model, or before the model's layers were swapped"):
        list(generate(model, PROMPT, config, eos_id=None, compiled=compiled))
    compiled = CompiledDecoding(model, gemms="kernels")
    prepare_for_inference(model, kernel="linear")
    with pytest.raises(MinigptError, match="make one of the model as it is"):
        list(generate(model, PROMPT, config, eos_id=None, compiled=compiled))
