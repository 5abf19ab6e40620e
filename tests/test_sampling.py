"""The logit filters against transformers' own processors, the decoding loop against
transformers' generate(), and the inference layouts against the reference model."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import call_cli
from minigpt.config import GPTConfig
from minigpt.errors import MinigptError
from minigpt.loading import load_model
from minigpt.inference import prepare_for_inference
from minigpt.quantized import Int8Linear
from minigpt.model import GPT
from minigpt.trace import score_ids
from minigpt.sampling import (
    SamplingConfig,
    TextStream,
    apply_repetition_penalty,
    apply_temperature,
    candidate_scores,
    candidates,
    check_finite,
    generate,
    generate_ids,
    next_token,
    penalized_scores,
    top_k_filter,
    top_p_filter,
)

VOCAB = 1000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_logits(seed: int, rows: int = 4, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def tied_logits(seed: int) -> torch.Tensor:
    """Logits with many exact ties, as bf16 logits have: rounded to a coarse grid."""
    return (random_logits(seed) * 2).round() / 2


# --- filters vs transformers' processors ------------------------------------------------------


@pytest.mark.parametrize("make", [random_logits, tied_logits])
@pytest.mark.parametrize("k", [1, 2, 5, 50, VOCAB, VOCAB + 7])
def test_top_k_equals_hf(make, k):
    for seed in range(3):
        logits = make(seed)
        expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(top_k_filter(logits, k), expected)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[True, False, True, True, True, False]]
    assert torch.equal(top_k_filter(logits, 2), TopKLogitsWarper(top_k=2)(None, logits.clone()))


@pytest.mark.parametrize("make", [random_logits, tied_logits])
@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_equals_hf(make, p):
    for seed in range(3):
        logits = make(seed)
        expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, p), expected)



def test_a_bf16_models_logits_are_filtered_in_fp32_as_transformers_does():
    """A bf16 model (`--dtype bf16`, or auto on a GPU) gives bf16 logits; the sampler filters them in
    fp32, as transformers does: its candidate set is the fp32 top-p of those same logits. Top-p
    summed in bf16 kept fewer candidates (here 724 against 725 in the first row; 41,842 against
    41,863 on a real model's logits), and no test noticed: every filter test gave fp32 logits."""
    config = SamplingConfig(top_k=0, top_p=0.95)
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = TopPLogitsWarper(top_p=0.95)(None, logits.float())
    values, ids = candidate_scores(penalized_scores(logits, None, config), config)
    assert values.isfinite().sum(-1).tolist() == expected.isfinite().sum(-1).tolist()  # (measured: 725, 734, 753, 751)
    assert (values.isfinite().sum(-1) > 700).all()  # (hundreds of candidates: a bf16 sum loses some)
    assert ids is None and values.dtype == torch.float32 and torch.equal(values, expected)

@pytest.mark.parametrize("p, n_kept", [(0.75, 3), (0.5, 2), (0.25, 1), (0.2, 1), (0.3, 2)])
def test_top_p_exact_thresholds(p, n_kept):
    """Four equal logits: probabilities exactly 0.25 each, cumulative mass exactly 0.25, 0.5, ...
    A cumulative mass that equals 1 - p exactly is dropped; the token that crosses it is kept."""
    logits = torch.zeros(1, 4)
    out = top_p_filter(logits, p)
    assert int(out.isfinite().sum()) == n_kept
    assert torch.equal(out, TopPLogitsWarper(top_p=p)(None, logits.clone()))


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[10.0, 0.0, -1.0, 2.0]])
    out = top_p_filter(logits, 1e-6)
    assert out.isfinite().tolist() == [[True, False, False, False]]
    assert torch.equal(out, TopPLogitsWarper(top_p=1e-6)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_hf(penalty):
    logits = random_logits(0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, 30), generator=g)
    tokens[:, 5] = tokens[:, 0]  # repeated ids are penalised once, not twice
    expected = RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, tokens, penalty), expected)


def test_repetition_penalty_sign_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 1.5])
def test_temperature_equals_hf(t):
    logits = random_logits(0)
    assert torch.equal(apply_temperature(logits, t), TemperatureLogitsWarper(t)(None, logits.clone()))


def test_the_full_chain_equals_hf_in_hf_order():
    logits = random_logits(3)
    tokens = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(4))
    expected = logits.clone()
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(40),
        TopPLogitsWarper(0.9),
    ):
        expected = processor(tokens, expected)
    ours = top_p_filter(top_k_filter(apply_temperature(apply_repetition_penalty(logits, tokens, 1.2), 0.8), 40), 0.9)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("t", [1.3, 0.7, 1e30])
def test_the_candidates_after_a_temperature_are_hfs_numbers(t):
    """With a temperature, the sampler's candidates are transformers' scores bit for bit, with top-k
    and without. Shifting every row to a maximum of 0 before dividing (kept now only for a row a
    tiny temperature overflows) rounded two close logits of this row (0.66976517 and 0.66976553,
    tokens 15761 and 45232) to one value, and top-p at 0.95 then kept the smaller and dropped the
    larger: not the most likely tokens."""
    logits = torch.randn(1, 50257, generator=torch.Generator().manual_seed(1748)) * 2.5
    hf = TopPLogitsWarper(0.95)(None, TemperatureLogitsWarper(t)(None, logits.clone()))
    values, ids = candidate_scores(logits, SamplingConfig(temperature=t, top_k=0, top_p=0.95))
    assert ids is None and torch.equal(values, hf)
    if t == 1.3:
        assert hf[0, 45232].isfinite() and not hf[0, 15761].isfinite()
    hf = TopPLogitsWarper(0.95)(None, TopKLogitsWarper(500)(None, TemperatureLogitsWarper(t)(None, logits.clone())))
    values, ids = candidate_scores(logits, SamplingConfig(temperature=t, top_k=500, top_p=0.95))
    assert torch.equal(torch.full_like(logits, float("-inf")).scatter(1, ids, values), hf)


@pytest.mark.parametrize("make", [random_logits, tied_logits])
def test_candidates_are_the_top_k_survivors(make):
    """The sampling loop's shortcut keeps exactly the tokens (and scores) top_k_filter keeps."""
    for seed in range(5):
        logits = make(seed)
        values, ids = candidates(logits, 20)
        full = torch.full_like(logits, float("-inf")).scatter(1, ids, values)
        assert torch.equal(full, top_k_filter(logits, 20))
        # then top-p over the survivors gives HF's distribution over the whole vocabulary
        hf = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(20)(None, logits.clone()))
        ours = torch.full_like(logits, float("-inf")).scatter(1, ids, top_p_filter(values, 0.9))
        if make is random_logits:  # with ties, which tied token crosses the line is sort order
            assert torch.equal(ours.isfinite(), hf.isfinite())
            torch.testing.assert_close(ours.softmax(-1), hf.softmax(-1))


def test_candidates_keep_a_tie_at_the_kth_value_in_any_one_row():
    """Ties right at the k-th value (in one row only, at both ends of k's range) are all kept."""
    logits = random_logits(7, rows=3, vocab=10)
    logits[1] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0, -2.0, -2.0])
    for k in (1, 3, 4, 5, 8, 9, 10):
        values, ids = candidates(logits, k)
        full = torch.full_like(logits, float("-inf")).scatter(1, ids, values)
        assert torch.equal(full, top_k_filter(logits, k)), k
    assert candidates(logits, 3)[0].size(1) == 5 and candidates(logits, 9)[0].size(1) == 10


def test_sampling_config_rejects_bad_values():
    for bad in (
        dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1),
        dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0),
    ):
        with pytest.raises(MinigptError):
            SamplingConfig(**bad)
    # infinity is refused, and the message says why ("must be >= 0, got inf" contradicted itself)
    for field, what in (("temperature", "a finite number >= 0"), ("repetition_penalty", "a finite number > 0")):
        with pytest.raises(MinigptError, match=f"^{field} must be {what}, got inf$"):
            SamplingConfig(**{field: float("inf")})


def test_sampling_config_names_a_value_of_the_wrong_type():
    """From Python, "0.5" or 3.0 failed deep in torch and greedy="False" (a non-empty str) meant greedy."""
    import numpy as np

    for field, value, what in (("max_new_tokens", 3.0, "an integer"), ("top_k", "5", "an integer"),
                               ("temperature", "0.5", "a number"), ("top_p", None, "a number"),
                               ("repetition_penalty", True, "a number"), ("greedy", "False", "True or False"),
                               ("max_new_tokens", True, "an integer")):
        with pytest.raises(MinigptError, match=f"^{field} must be {what}, got {value!r}$".replace("(", r"\(")):
            SamplingConfig(**{field: value})
    config = SamplingConfig(max_new_tokens=np.int64(3), top_k=np.int32(2), temperature=1, top_p=np.float32(0.5))
    assert (config.max_new_tokens, config.top_k, config.temperature) == (3, 2, 1)


def test_sampling_config_warns_of_filters_greedy_decoding_ignores():
    """SamplingConfig(greedy=True, temperature=0.5) decoded greedily without a word, where sample.py
    refuses the pair (and transformers' GenerationConfig warns of it)."""
    import warnings

    for kwargs, said in ((dict(greedy=True, temperature=0.5), "temperature=0.5 has no effect with greedy=True"),
                         (dict(temperature=0, top_k=5, top_p=0.9), "top_k=5 and top_p=0.9 have no effect with temperature=0"),
                         (dict(greedy=True, top_p=0.5), "top_p=0.5 has no effect with greedy=True")):
        with pytest.warns(UserWarning, match=f"^SamplingConfig: {said}: greedy decoding always takes the most likely "
                                             "token$") as caught:
            SamplingConfig(**kwargs)
        assert len(caught) == 1 and caught[0].filename == __file__  # (pointing at the caller's line)
    with warnings.catch_warnings():  # the defaults, filters off, or both greedy settings: nothing to say
        warnings.simplefilter("error")
        for kwargs in (dict(greedy=True), dict(temperature=0), dict(greedy=True, temperature=0, top_k=0, top_p=1.0),
                       dict(greedy=True, temperature=1.0, top_k=50, top_p=0.95), dict(temperature=0.5, top_k=5)):
            SamplingConfig(**kwargs)


def test_text_stream_never_splits_a_character(gpt2_tokenizer):
    text = "naïve café 😀 日本語 ok"
    ids = gpt2_tokenizer.encode(text)
    stream = TextStream(gpt2_tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some token ended mid-character and was held back



def test_a_stream_cut_inside_a_character_ends_as_decode_ends_it(gpt2_tokenizer):
    """A sample stopped (--max-new-tokens) after the first tokens of a character split across tokens:
    the held-back bytes end as U+FFFD, as `tokenizer.decode` of the same ids ends. A flush that
    returned "" dropped them (the text ended one character short), and no test noticed."""
    ids = gpt2_tokenizer.encode(" \U0001d11e")[:2]  # (the space and the first bytes of the 4-byte 𝄞)
    stream = TextStream(gpt2_tokenizer)
    held = "".join(stream.push(t) for t in ids)
    tail = stream.flush()
    assert held + tail == gpt2_tokenizer.decode(ids) == " \ufffd"
    assert tail == "\ufffd" and stream.flush() == ""  # (flushed once)

# --- the decoding loop -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    model, tokenizer = load_model(tiny_hf_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_tiny(tiny_hf_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


def hf_greedy(hf_model, prompt: list[int], n: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=50256,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs,
        )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_hf_generate(tiny, hf_tiny, gpt2_tokenizer, penalty):
    model, tokenizer = tiny
    prompt = gpt2_tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    config = SamplingConfig(max_new_tokens=40, greedy=True, repetition_penalty=penalty)
    expected = hf_greedy(hf_tiny, prompt, 40, repetition_penalty=penalty)
    assert generate_ids(model, prompt, config, eos_id=tokenizer.eos_id) == [expected]
    # the inference layout (fp32 on the CPU) decodes the same tokens
    fast = prepare_for_inference(copy.deepcopy(model))
    assert generate_ids(fast, prompt, config, eos_id=tokenizer.eos_id) == [expected]
    # several samples are one batch; greedy makes them identical
    assert generate_ids(fast, prompt, config, num_samples=3, eos_id=tokenizer.eos_id) == [expected] * 3


def test_temperature_zero_is_greedy(tiny):
    model, tokenizer = tiny
    greedy = generate_ids(model, [464, 2068], SamplingConfig(max_new_tokens=10, greedy=True), eos_id=tokenizer.eos_id)
    zero = generate_ids(model, [464, 2068], SamplingConfig(max_new_tokens=10, temperature=0.0), eos_id=tokenizer.eos_id)
    assert zero == greedy


def test_empty_prompt_starts_from_eos(tiny, hf_tiny):
    model, tokenizer = tiny
    expected = hf_greedy(hf_tiny, [tokenizer.eos_id], 8)
    assert generate_ids(model, [], SamplingConfig(max_new_tokens=8, greedy=True), eos_id=tokenizer.eos_id) == [expected]
    with pytest.raises(MinigptError, match="an empty prompt starts from eos_id, and none was given"):
        generate_ids(model, [], SamplingConfig(max_new_tokens=8, greedy=True), eos_id=None)


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    config = SamplingConfig(max_new_tokens=20)

    def run(seed):
        return generate_ids(model, [464, 2068], config, 3, torch.Generator().manual_seed(seed), eos_id=tokenizer.eos_id)

    first = run(0)
    assert run(0) == first
    assert run(1) != first
    assert len({tuple(row) for row in first}) == 3  # the batched samples differ from each other
    assert all(len(row) == 20 for row in first)


def test_sampling_only_picks_top_k_tokens(tiny):
    """With top_k=1 sampling has one candidate per step: it must equal greedy decoding."""
    model, tokenizer = tiny
    greedy = generate_ids(model, [464], SamplingConfig(max_new_tokens=15, greedy=True), eos_id=tokenizer.eos_id)
    config = SamplingConfig(max_new_tokens=15, top_k=1)
    sampled = generate_ids(model, [464], config, 2, torch.Generator().manual_seed(0), eos_id=tokenizer.eos_id)
    assert sampled == greedy * 2


def test_stops_at_eos(tiny):
    """(The penalty keeps the random model from repeating one token, so a later first occurrence exists.)"""
    model, _ = tiny
    config = SamplingConfig(max_new_tokens=12, greedy=True, repetition_penalty=1.5)
    free = generate_ids(model, [464, 2068], config, eos_id=None)[0]
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    steps = list(generate(model, [464, 2068], config, eos_id=stop))
    assert len(steps) == free.index(stop) + 1  # the loop ended at the stop token
    assert generate_ids(model, [464, 2068], config, eos_id=stop)[0] == free[: free.index(stop) + 1]


def test_generation_slides_past_the_context_window(tiny):
    """A full window is rebuilt from its last half and decoding goes on; the tokens after the slide
    are what the model predicts from that half."""
    model, _ = tiny
    window = model.config.block_size  # 256
    prompt = torch.randint(0, 50000, (window,), generator=torch.Generator().manual_seed(0)).tolist()
    new = generate_ids(model, prompt, SamplingConfig(max_new_tokens=3, greedy=True), eos_id=None)[0]
    with torch.no_grad():
        full, _ = model(torch.tensor([prompt]))
        assert new[0] == int(full[0, -1].argmax())
        seq = prompt + new
        # the slide re-reads the last window // 2 tokens, the first new token included
        after_slide, _ = model(torch.tensor([seq[window + 1 - window // 2 : window + 2]]))
    assert new[1] == int(after_slide[0, -2].argmax())
    assert new[2] == int(after_slide[0, -1].argmax())  # the next step decodes from that cache
    # a prompt longer than the window keeps its last `window` tokens
    long = list(range(1000, 1000 + window + 50))
    config = SamplingConfig(max_new_tokens=2, greedy=True)
    assert generate_ids(model, long, config, eos_id=None) == generate_ids(model, long[-window:], config, eos_id=None)


# --- inference layouts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512, dropout=0.0)).eval()


# Largest logit error of each layout as a fraction of the largest logit, measured on this model:
# fp32 1.2e-7, bf16 0.34%, int8 0.59%, bf16 + int8 0.76% (bf16 keeps 8 bits of mantissa: 0.4% a value).
@pytest.mark.parametrize("dtype, quantize, tol", [
    (torch.float32, None, 1e-6), (torch.bfloat16, None, 0.01),
    (torch.float32, "int8", 0.015), (torch.bfloat16, "int8", 0.015),
])
def test_inference_layouts_match_the_reference(small_model, dtype, quantize, tol):
    idx = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = small_model(idx)
        fast = prepare_for_inference(copy.deepcopy(small_model).to(dtype), quantize)
        got, _ = fast(idx)  # several rows
        one, _ = fast(idx[:1, -1:])  # one row: the decoding kernels
        ref_one, _ = small_model(idx[:1, -1:])
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() <= tol * scale
    assert (one.float() - ref_one).abs().max() <= tol * scale
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())


def test_int8_quantization_is_per_output_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g) * torch.logspace(-3, 1, 16).unsqueeze(1)  # rows of very different size
    layer = Int8Linear(w, None)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127
    dequantized = layer.qweight.float() * layer.scale.float().unsqueeze(1)
    # each row's error is at most half a step of its own scale
    assert ((dequantized - w).abs() <= layer.scale.float().unsqueeze(1) / 2 + 1e-7).all()
    x = torch.randn(2, 32, generator=g)
    torch.testing.assert_close(layer(x), x @ dequantized.t(), rtol=0.02, atol=0.02 * (x @ w.t()).abs().max().item())


def test_int8_refuses_widths_the_kernel_cannot_take_and_upcast_takes_any():
    """int8mm needs input widths that are multiples of 16; `upcast` is fp32 products of q * s: any width."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 12, generator=g), torch.randn(3, 12, generator=g)
    with pytest.raises(MinigptError, match="multiple of 16"):
        Int8Linear(w, None)
    layer = Int8Linear(w, None, kernel="upcast")
    torch.testing.assert_close(layer(x), x @ (layer.qweight.float() * layer.scale.float().unsqueeze(1)).t())


@pytest.mark.parametrize("dtype, quantize", [(torch.bfloat16, None), (torch.float32, "int8"), (torch.bfloat16, "int8")])
def test_decoding_in_every_layout_gives_the_fp32_tokens(tiny, gpt2_tokenizer, dtype, quantize):
    """Greedy decoding in a fast layout (KV cache in its dtype, two rows: the several-rows kernels)
    picks fp32's tokens. Rounding cannot swap two candidates whose fp32 logits are more than twice
    the layout's logit error apart; the test checks that this holds at every step of this prompt,
    so the tokens must be equal, not just equally long."""
    model, _ = tiny
    prompt = gpt2_tokenizer.encode("first prompt")
    config = SamplingConfig(max_new_tokens=8, greedy=True)
    expected = generate_ids(model, prompt, config, eos_id=None)[0]
    fast = prepare_for_inference(copy.deepcopy(model).to(dtype), quantize)
    with torch.no_grad():
        sequence = torch.tensor([prompt + expected])
        reference = model(sequence)[0][0, len(prompt) - 1 : -1]  # the logits that chose each token
        error = (fast(sequence)[0][0, len(prompt) - 1 : -1].float() - reference).abs().max()
    assert error <= 0.03 * reference.abs().max()  # measured 1.3% (bf16), 2.1% (int8) on this flat model
    top2 = reference.topk(2).values
    assert (top2[:, 0] - top2[:, 1] > 2 * error).all()  # measured: smallest gap 0.31, error <= 0.08
    assert generate_ids(fast, prompt, config, num_samples=2, eos_id=None) == [expected, expected]


@pytest.mark.parametrize("config", [SamplingConfig(max_new_tokens=5, greedy=True), SamplingConfig(max_new_tokens=5)],
                         ids=["greedy", "top-k-top-p"])
def test_weights_that_make_no_finite_logits_are_named_not_decoded(tiny, config):
    """Weights a diverged run left huge are finite, but their logits are not: sampling used to
    crash in torch.multinomial with a traceback, greedy decoding to print token 0 ("!") over and
    over. Both stop with one line before the first token."""
    model, tokenizer = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.h[0].attn.c_attn.weight.fill_(1e30)  # finite; q . k overflows to inf, softmax to NaN
    with pytest.raises(MinigptError, match=r"the model's logits are not finite \(inf or NaN\)"):
        generate_ids(broken, [464, 2068], config, eos_id=tokenizer.eos_id)
    with pytest.raises(MinigptError, match=r"the model's logits are not finite"):  # --score: no NaN table
        score_ids(broken, tokenizer, [464, 2068, 7586], config)
    # the intact model decodes as before
    seeded = torch.Generator().manual_seed(0)  # (an EOS drawn would end it sooner)
    assert len(generate_ids(model, [464, 2068], config, 1, seeded, eos_id=tokenizer.eos_id)[0]) == 5


@pytest.mark.parametrize("greedy", [True, False])
def test_logits_that_break_after_the_prompt_are_named_at_that_step(greedy):
    """Weights that break only at later positions (finite, huge position embeddings from position 6): the
    check ran on the prompt's logits alone, and then sampling crashed in torch.multinomial, greedy printed
    token 0 over and over (exit 0). Each new token's logits are checked now; the tokens before it came out."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    with torch.no_grad():
        model.transformer.wpe.weight[6:].fill_(1e20)  # (the LayerNorm's x * x overflows: NaN from there on)
    config = SamplingConfig(max_new_tokens=10, greedy=greedy)
    steps = generate(model, [5, 6, 7], config, 1, torch.Generator().manual_seed(0), eos_id=None)
    assert len([next(steps) for _ in range(4)]) == 4  # the logits read at positions 2 to 5: finite
    with pytest.raises(MinigptError, match=r"^the model's logits are not finite \(inf or NaN\)"):
        next(steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_reads_every_logit_and_no_overflowing_sum(dtype):
    """check_finite reads the logits' sum first (one pass): a sum that is finite says every logit
    is. A sum that overflows (logits finite but huge) or is NaN is checked entry by entry, so it
    refuses an inf, a -inf or a NaN anywhere in the batch, and never finite logits."""
    big = torch.finfo(dtype).max
    logits = torch.zeros(3, 50257, dtype=dtype)
    logits[:, :4] = big  # finite: the sum overflows to inf
    check_finite(logits)
    check_finite(-logits)
    for bad in (float("inf"), float("-inf"), float("nan")):
        for row, col in ((0, 0), (2, 50256)):
            broken = logits.clone()
            broken[row, col] = bad
            with pytest.raises(MinigptError, match=r"^the model's logits are not finite \(inf or NaN\)"):
                check_finite(broken)
    both = torch.zeros(1, 8, dtype=dtype)
    both[0, 1], both[0, 5] = float("inf"), float("-inf")  # (a NaN sum)
    with pytest.raises(MinigptError, match=r"not finite"):
        check_finite(both)


def test_the_repetition_penalty_counts_prompt_tokens_beyond_the_window():
    """The penalty is on every token already in the text; the model reads only a long prompt's
    last block_size tokens, but the tokens before them are still text (they used to be forgotten)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    config = SamplingConfig(max_new_tokens=1, greedy=True, repetition_penalty=50.0)
    prompt = list(range(100, 116))  # exactly one window
    [[first]] = generate_ids(model, prompt, config, eos_id=None)
    assert first not in prompt
    [[again]] = generate_ids(model, [first] * 3 + prompt, config, eos_id=None)  # the same window, `first` before it
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][0, -1]
    expected = apply_repetition_penalty(logits[None], torch.tensor([[first, *prompt]]), 50.0).argmax()
    assert again != first and again == expected.item()


# --- extreme but legal values: a vanishing temperature or penalty, an output too large to hold ---

# Positive in float64 but 0 in float32 (1e-46, 7e-46, 1e-320), or below its smallest normal value
# (1e-39), where logits / temperature gave 0 / 0 = NaN and torch.multinomial refused the row.
VANISHING = [1e-46, 7e-46, 1e-320, 1e-45, 1e-39]


@pytest.mark.parametrize("t", VANISHING)
@pytest.mark.parametrize("filters", [dict(), dict(top_k=0, top_p=1.0)], ids=["top-k-top-p", "no-filters"])
def test_a_vanishing_temperature_is_its_limit_all_mass_on_the_maximum(t, filters):
    logits = random_logits(0)
    config = SamplingConfig(temperature=t, **filters)
    values, ids = candidate_scores(logits, config)
    assert not values.isnan().any()
    probs = torch.softmax(values, dim=-1)
    if ids is None:  # no top-k: the whole vocabulary, in its order
        assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))
    else:  # top-p after the temperature keeps one candidate a row: the maximum
        assert torch.equal(ids[values.isfinite()], logits.argmax(dim=-1))
    assert torch.equal(probs.amax(dim=-1), torch.ones(4))
    tokens = torch.zeros(4, 1, dtype=torch.long)
    for seed in range(3):
        assert torch.equal(next_token(logits, tokens, config, torch.Generator().manual_seed(seed)), logits.argmax(-1))


@pytest.mark.parametrize("t", [1e38, 3.5e38, 1e39, 1e300, 1.7e308])
def test_a_huge_temperature_keeps_top_k(t):
    """Above float32's largest value a temperature rounded to inf and every score to 0: top-k's tie at
    the k-th value kept the whole vocabulary, and tokens far outside the top 5 were drawn (HF's
    warpers do the same). The largest finite temperature keeps the scores apart: top-k holds."""
    logits = random_logits(0)
    values, ids = candidate_scores(logits, SamplingConfig(temperature=t, top_k=5, top_p=1.0))
    assert ids.shape == (4, 5) and torch.equal(ids, logits.topk(5).indices)
    assert values.isfinite().all() and not (values == 0).all()
    config, tokens = SamplingConfig(temperature=t, top_k=5), torch.zeros(4, 1, dtype=torch.long)
    drawn = {int(i) for seed in range(20) for i in next_token(logits, tokens, config, torch.Generator().manual_seed(seed))}
    assert drawn <= set(logits.topk(5).indices.flatten().tolist()) and len(drawn) > 4  # (nearly uniform among them)


@pytest.mark.parametrize("t", VANISHING)
def test_sampling_at_a_vanishing_temperature_decodes_greedy_tokens(tiny, t):
    model, tokenizer = tiny
    greedy = generate_ids(model, [464, 2068], SamplingConfig(max_new_tokens=8, greedy=True), eos_id=tokenizer.eos_id)
    config = SamplingConfig(max_new_tokens=8, temperature=t)
    sampled = generate_ids(model, [464, 2068], config, 2, torch.Generator().manual_seed(0), eos_id=tokenizer.eos_id)
    assert sampled == greedy * 2


@pytest.mark.parametrize("t", [1e-320, 1e-30])
def test_a_vanishing_temperature_keeps_one_candidate_in_the_trace(tiny, t):
    """`--score --trace` at 1e-320 wrote "candidates": 0 and the top token "kept": false (NaN scores)."""
    model, tokenizer = tiny
    rows = score_ids(model, tokenizer, [31373, 612, 318, 257], SamplingConfig(temperature=t)).rows
    for row in rows:
        top = row["alternatives"][0]
        assert row["candidates"] == 1 and top["kept"] and row["candidate_mass"] == top["prob"] > 0, row


def test_the_cli_samples_greedy_text_at_a_vanishing_temperature(tiny_minigpt_dir, tmp_path):
    model = ["--model", str(tiny_minigpt_dir), "--max-new-tokens", "5"]
    greedy = call_cli("sample.py", *model, "--greedy", "Why")
    assert greedy.returncode == 0 and greedy.stdout.startswith("Why"), greedy.stderr
    tiny = call_cli("sample.py", *model, "--temperature", "1e-46", "--seed", "3", "Why")
    assert (tiny.returncode, tiny.stdout, tiny.stderr) == (0, greedy.stdout, "")
    trace = tmp_path / "trace.jsonl"
    scored = call_cli("sample.py", *model[:2], "--score", "hello there", "--trace", str(trace), "--temperature", "1e-320")
    assert scored.returncode == 0, scored.stderr
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows and all(row["candidates"] == 1 and row["alternatives"][0]["kept"] for row in rows)


@pytest.mark.parametrize("penalty", [1e-39, 1e-46, 1e-320, 1e-38, 1e-30])
def test_a_vanishing_repetition_penalty_is_its_limit(penalty):
    """As the penalty goes to 0, a positive seen score / penalty goes to +inf (the largest of them
    fastest) and a negative seen score * penalty to 0: all mass on the largest positive seen score.
    Below ~1e-38 the division overflowed to inf (1e-46 and less: the penalty is 0 in fp32) and the
    softmax, or the temperature's shift, made NaN of inf - inf."""
    logits = random_logits(0)
    tokens = torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(1))
    out = apply_repetition_penalty(logits, tokens, penalty)
    assert out.isfinite().all()
    seen = logits.gather(1, tokens)
    largest_seen = tokens.gather(1, seen.argmax(dim=1, keepdim=True)).squeeze(1)
    assert (seen.amax(dim=1) > 0).all() and torch.equal(out.argmax(dim=-1), largest_seen)
    assert torch.equal(torch.softmax(out, dim=-1).amax(dim=-1), torch.ones(4))
    after = out.gather(1, tokens)
    assert ((seen < 0) <= ((after <= 0) & (after >= seen))).all()  # negative ones: towards 0, never past it
    unseen = torch.ones_like(logits, dtype=torch.bool).scatter(1, tokens, False)
    assert torch.equal(out[unseen], logits[unseen])
    if penalty == 1e-30:  # no overflow: transformers' numbers exactly
        assert torch.equal(out, RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone()))
    for config in (SamplingConfig(repetition_penalty=penalty), SamplingConfig(repetition_penalty=penalty, greedy=True),
                   SamplingConfig(repetition_penalty=penalty, temperature=0.5, top_k=0, top_p=1.0)):
        assert torch.equal(next_token(logits, tokens, config, torch.Generator().manual_seed(0)), largest_seen)


def test_a_vanishing_repetition_penalty_stays_finite_without_positive_seen_scores():
    logits = torch.tensor([[-1.0, -2.0, 0.0, 3.0], [-1.0, -2.0, -3.0, -0.5]])
    tokens = torch.tensor([[0, 1, 2], [0, 1, 2]])
    out = apply_repetition_penalty(logits, tokens, 1e-46)
    assert out.isfinite().all() and (out[:, :3] <= 0).all() and (out[:, :3] > -1e-37).all()
    assert out[:, 3].tolist() == [3.0, -0.5]
    assert out[1].argmax() == 0  # the order of the penalised negatives holds: -1 * penalty is the largest
    config = SamplingConfig(repetition_penalty=1e-46, top_k=0, top_p=1.0)
    assert next_token(logits, tokens, config, torch.Generator().manual_seed(0))[0] == 3


@pytest.mark.parametrize("penalty", [1e37, 1e38, 1e39, 1e300])
def test_a_huge_repetition_penalty_on_a_row_all_seen_and_negative_is_its_limit(penalty):
    """Every token seen, every score negative: as the penalty grows, score * penalty goes to -inf, the least
    negative one slowest, so all mass goes to it. Above ~1e37 the product overflowed to -inf in every entry
    (NaN probabilities: a torch.multinomial traceback; argmax token 0)."""
    logits = -random_logits(2, rows=3, vocab=50).abs() - 0.5
    logits[2, :25] = 2.0 + logits[2, :25]  # a row with positive scores too: they go to 0 and win
    tokens = torch.arange(50).repeat(3, 2)  # (3, 100): every token, twice
    out = apply_repetition_penalty(logits, tokens, penalty)
    assert out.isfinite().all()
    assert torch.equal(out.argmax(dim=-1)[:2], logits.argmax(dim=-1)[:2])  # the least negative
    assert torch.equal(torch.softmax(out[:2], dim=-1).amax(dim=-1), torch.ones(2))
    assert (out[logits < 0] < 0).all() and (out[logits >= 0] >= 0).all()
    for config in (SamplingConfig(repetition_penalty=penalty), SamplingConfig(repetition_penalty=penalty, greedy=True),
                   SamplingConfig(repetition_penalty=penalty, temperature=0.01, top_k=0, top_p=1.0)):
        picked = next_token(logits[:2], tokens[:2], config, torch.Generator().manual_seed(0))
        assert torch.equal(picked, logits[:2].argmax(dim=-1))
    if penalty == 1e37:  # no overflow: transformers' numbers exactly
        assert torch.equal(out, RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone()))
    unseen_too = apply_repetition_penalty(logits, tokens[:, :30], penalty)  # tokens 30-49 unseen: untouched
    assert torch.equal(unseen_too[:, 30:], logits[:, 30:])


@pytest.mark.parametrize("penalty", [1e-39, 1e-46, 1e-320])
def test_decoding_with_a_vanishing_repetition_penalty_is_decoding_at_its_limit(tiny, penalty):
    """Sampled or greedy, the text is the one a penalty of 1e-30 (no overflow) gives."""
    model, tokenizer = tiny
    for greedy in (True, False):
        limit, vanishing = (
            generate_ids(model, [464, 2068], SamplingConfig(max_new_tokens=8, greedy=greedy, repetition_penalty=r),
                         2, torch.Generator().manual_seed(0), eos_id=tokenizer.eos_id)
            for r in (1e-30, penalty)
        )
        assert vanishing == limit and len(limit[0]) == 8


def test_an_output_that_cannot_be_allocated_is_refused_when_generate_is_called(tiny):
    """The token buffer is sized prompt + max_new_tokens for every sample up front: a size beyond
    int64 was a TypeError with C++ frames, one beyond memory the allocator's RuntimeError, both
    after the prompt was shown. (2**58 bytes is beyond any machine's address space.)"""
    model, tokenizer = tiny
    cases = [
        (10**20, 1, "--max-new-tokens 100000000000000000000 x --num-samples 1: the output "
                    "(100000000000000000002 token ids with the prompt, 800,000,000,000.0 GB) does not fit in memory"),
        (2**55 - 2, 1, "--max-new-tokens 36028797018963966 x --num-samples 1: the output "
                       "(36028797018963968 token ids with the prompt, 288,230,376.2 GB) does not fit in memory"),
        (3, 2**53 - 1, f"--max-new-tokens 3 x --num-samples {2**53 - 1}: the output "
                       f"({5 * (2**53 - 1)} token ids with the prompt, 360,287,970.2 GB) does not fit in memory"),
    ]
    for max_new_tokens, num_samples, message in cases:
        config = SamplingConfig(max_new_tokens=max_new_tokens)
        with pytest.raises(MinigptError) as refused:
            generate(model, [464, 2068], config, num_samples, eos_id=tokenizer.eos_id)  # (not iterated)
        assert str(refused.value) == message
    # beyond the context window is fine: the window slides (and the buffer holds the prompt + 100 ids)
    assert len(generate_ids(model, [464], SamplingConfig(max_new_tokens=100, greedy=True), eos_id=None)[0]) == 100


def test_a_kv_cache_that_cannot_be_allocated_is_refused(tiny, monkeypatch):
    model, tokenizer = tiny

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("minigpt.sampling.KVCache", out_of_memory)
    c = model.config
    with pytest.raises(MinigptError) as refused:
        generate(model, [464, 2068], SamplingConfig(max_new_tokens=3), 1000, eos_id=tokenizer.eos_id)
    gigabytes = 2 * c.n_layer * 1000 * 5 * c.n_embd * 4 / 1e9
    assert str(refused.value) == (f"--num-samples 1000: the KV cache (1000 x 5 positions x {c.n_layer} layers, "
                                  f"{gigabytes:,.1f} GB) does not fit in memory")


def test_a_kv_cache_beyond_the_memory_available_is_refused_before_it_is_allocated(tiny):
    """Linux overcommits: a KV cache larger than the memory succeeds as an allocation, and decoding
    into it then gets the process killed (or swapping). So the CPU's MemAvailable is checked first."""
    from minigpt.runtime import available_memory

    model, tokenizer = tiny
    c = model.config
    available = available_memory(torch.device("cpu"))
    assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_sample = 2 * c.n_layer * 5 * c.n_embd * 4  # (prompt 2 + 3 new tokens, fp32 keys and values)
    samples = 2 * available // per_sample  # (twice the memory: Linux still gives each layer's tensors)
    with pytest.raises(MinigptError, match=rf"^--num-samples {samples}: the KV cache .* does not fit in memory$"):
        generate(model, [464, 2068], SamplingConfig(max_new_tokens=3), samples, eos_id=tokenizer.eos_id)


def test_a_decoding_step_beyond_the_memory_available_is_refused_before_it_runs(tiny, monkeypatch):
    """Few new tokens for many samples: the output and the KV cache are small, while each step's
    logits (and the sampler's sorted copies) take ~12 bytes a sample per vocabulary entry:
    200,000 samples asked the allocator for 40 GB, a traceback."""
    model, tokenizer = tiny
    monkeypatch.setattr("minigpt.runtime.available_memory", lambda device: 2**30)
    vocab = model.config.vocab_size
    samples = 2**30 // (vocab * 12) + 1
    with pytest.raises(MinigptError) as refused:
        generate(model, [464, 2068], SamplingConfig(max_new_tokens=1), samples, eos_id=tokenizer.eos_id)
    assert re.fullmatch(rf"--num-samples {samples}: a decoding step with its KV cache \({samples} rows of "
                        rf"{vocab:,} logits, 1\.1 GB\) does not fit in memory", str(refused.value)), refused.value
    assert len(list(generate(model, [464, 2068], SamplingConfig(max_new_tokens=1), samples // 4,
                             eos_id=tokenizer.eos_id))) == 1  # (a quarter fits)


@pytest.mark.parametrize("num_samples, n_prompt, max_new_tokens, dtype", [
    (3, 5, 7, torch.float32), (2, 200, 100, torch.float32), (4, 1, 9, torch.bfloat16)])
def test_the_kv_cache_estimate_is_the_bytes_the_cache_allocates(tiny, num_samples, n_prompt, max_new_tokens, dtype):
    """`decoding_bytes`' KV-cache figure, which decides whether decoding is refused for memory, is the
    size of the KVCache `generate` allocates: keys and values, every layer, positions up to the
    window. Counting the keys alone (half) let a cache that did not fit pass the check, unnoticed."""
    from minigpt.model import KVCache
    from minigpt.sampling import decoding_bytes

    model, _ = tiny
    cache = KVCache(model.config, num_samples, min(model.config.block_size, n_prompt + max_new_tokens), dtype=dtype)
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert decoding_bytes(model, num_samples, n_prompt, max_new_tokens, dtype)[0] == allocated


def test_available_memory_is_linuxs_memavailable(tmp_path):
    from minigpt.runtime import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   12345 kB\n")
    assert available_memory(torch.device("cpu"), meminfo) == 12345 * 1024
    meminfo.write_text("MemTotal:       24576000 kB\n")  # (a kernel before 3.14: not said)
    assert available_memory(torch.device("cpu"), meminfo) is None
    assert available_memory(torch.device("cpu"), tmp_path / "missing") is None
    assert available_memory(torch.device("meta"), meminfo) is None  # (a GPU's allocator refuses by itself)


def test_the_cli_refuses_an_output_too_large_in_one_line(tiny_minigpt_dir):
    result = call_cli("sample.py", "--model", str(tiny_minigpt_dir), "--max-new-tokens", "99999999999999999999", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        "error: --max-new-tokens 99999999999999999999 x --num-samples 1: the output "
        "(100000000000000000000 token ids with the prompt, 800,000,000,000.0 GB) does not fit in memory"
    ]


# --- what generate takes, from a notebook ------------------------------------------------------


def test_a_prompt_is_a_list_a_tuple_or_a_1d_integer_tensor(tiny):
    """One check (`sampling.token_ids`) for every prompt: a tensor was "Boolean value of Tensor with
    more than one value is ambiguous", and float ids were truncated to other tokens in silence."""
    model, tokenizer = tiny
    config = SamplingConfig(max_new_tokens=6, greedy=True)
    ids = [464, 2068, 7586]
    expected = generate_ids(model, ids, config, eos_id=tokenizer.eos_id)
    assert len(expected[0]) == 6
    for same in (tuple(ids), torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), [torch.tensor(t) for t in ids]):
        assert generate_ids(model, same, config, eos_id=tokenizer.eos_id) == expected
    assert [t.tolist() for t in generate(model, torch.tensor(ids), config, eos_id=None)] == [[t] for t in expected[0]]
    expected_kind = "prompt: a list of token ids or a 1-D integer tensor, got "
    refused = [
        ("The quick", "str; encode text with tokenizer.encode"),
        (np.array(ids), "numpy.ndarray"),
        ([ids], "a list whose item 0 is list"),
        ([464, 1.5, 2.7], "a list whose item 1 is float"),
        (torch.tensor([ids]), "a 2-D torch.int64 tensor; for one row of a batch pass ids[0]"),
        (torch.tensor([464.0, 2068.0]), "a 1-D torch.float32 tensor"),
        (None, "NoneType"),
    ]
    for prompt, got in refused:
        with pytest.raises(TypeError) as error:
            generate_ids(model, prompt, config, eos_id=tokenizer.eos_id)
        assert str(error.value) == expected_kind + got


def test_ids_outside_the_vocabulary_are_named_with_its_size(tiny):
    """Out-of-range ids (and an out-of-range eos_id) were torch's bare "index out of range in self"."""
    model, tokenizer = tiny
    config = SamplingConfig(max_new_tokens=2, greedy=True)
    vocabulary = "is outside the model's vocabulary of 50257 tokens (ids 0 to 50256)"
    for prompt, name, bad, eos_id in [([464, 50257, 99999], "prompt", 50257, tokenizer.eos_id),
                                      (torch.tensor([5, -2]), "prompt", -2, tokenizer.eos_id),
                                      ([464], "eos_id", 50257, 50257), ([], "eos_id", -1, -1)]:
        with pytest.raises(MinigptError) as error:
            generate_ids(model, prompt, config, eos_id=eos_id)
        assert str(error.value) == f"{name}: token id {bad} {vocabulary}"
    assert len(generate_ids(model, [0, 50256], config, eos_id=0)[0]) >= 1  # both ends of the range are ids


def test_generate_checks_num_samples_generator_and_eos_id_when_called(tiny):
    """num_samples 2.0 or True was a TypeError from torch.empty inside the output's allocation, "2" a
    comparison error; a generator that is none was a TypeError from torch.multinomial at the first
    step, after generate had returned; eos_id "x" a TypeError from a comparison."""
    model, tokenizer = tiny
    config = SamplingConfig(max_new_tokens=2)
    for bad in (2.0, True, "2", 0):
        with pytest.raises(MinigptError, match=rf"^num_samples must be an integer >= 1, got {re.escape(repr(bad))}$"):
            generate(model, [464], config, bad, eos_id=tokenizer.eos_id)
    assert len(generate_ids(model, [464], config, np.int64(2), eos_id=None)) == 2  # (a NumPy integer is one)
    with pytest.raises(TypeError, match=r"^generator: a torch\.Generator \(or None\), got int$"):
        generate(model, [464], config, 1, 12345, eos_id=tokenizer.eos_id)
    for bad in ("x", 1.0):  # "x" was a TypeError from comparing a str with an int
        with pytest.raises(TypeError, match=rf"^eos_id: a token id \(an int\) or None, got {type(bad).__name__}$"):
            generate(model, [464], config, eos_id=bad)
    eos = torch.tensor(tokenizer.eos_id)  # a 0-D tensor integer is an id
    greedy = SamplingConfig(max_new_tokens=2, greedy=True)
    assert generate_ids(model, [464], greedy, eos_id=eos) == generate_ids(model, [464], greedy, eos_id=tokenizer.eos_id)


def test_generation_refuses_a_model_in_training_mode_with_dropout(tiny):
    """`Trainer.fit` leaves its model in training mode: greedy decoding with dropout on gave a different
    text each run. Refused in one line; with dropout 0 training mode computes what eval mode does."""
    model, tokenizer = tiny
    config = SamplingConfig(max_new_tokens=8, greedy=True)
    expected = generate_ids(model, [464, 2068], config, eos_id=tokenizer.eos_id)
    training = copy.deepcopy(model).train()
    message = ("generation needs the model in eval mode (model.eval()): in training mode its dropout (0.1) "
               "makes every output random")
    for call in (generate_ids, generate):
        with pytest.raises(MinigptError) as error:
            call(training, [464, 2068], config, eos_id=tokenizer.eos_id)
        assert str(error.value) == message
    assert generate_ids(training.eval(), [464, 2068], config, eos_id=tokenizer.eos_id) == expected
    no_dropout = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    assert no_dropout.training
    in_eval = generate_ids(copy.deepcopy(no_dropout).eval(), [5, 6], config, eos_id=None)
    assert generate_ids(no_dropout, [5, 6], config, eos_id=None) == in_eval
    # The dropout layers are asked, not the config (which a built model no longer reads, and which is frozen):
    # a layer's own probability set by hand makes outputs random as well.
    with pytest.raises(dataclasses.FrozenInstanceError):
        training.config.dropout = 0.0
    no_dropout.transformer.h[0].mlp.dropout.p = 0.2
    with pytest.raises(MinigptError, match=r"in training mode its dropout \(0\.2\) makes every output random"):
        generate_ids(no_dropout, [5, 6], config, eos_id=None)
