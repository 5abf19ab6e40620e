"""The decoding step and loop against transformers: the distribution `next_token` samples from is
the one transformers' logits-processor chain gives on the same logits, and with the same random
numbers the loop draws the same tokens.

test_sampling.py checks each filter on its own; here the filters are not called by the test. The
probabilities come out of `next_token` itself: `torch.multinomial` is replaced, for the call only,
by a stand-in that records the probabilities it is handed and picks a chosen position, so each
position can be mapped back to its token id (`next_token` may sample among a subset of the
vocabulary, the top-k survivors). HF's chain is applied in HF's order:
repetition penalty -> temperature -> top-k -> top-p.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minigpt.loading import load_model
from minigpt.sampling import SamplingConfig, generate, generate_ids, next_token

VOCAB = 1000


def random_logits(seed: int, rows: int = 4, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def random_tokens(seed: int, rows: int = 4, length: int = 30) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def hf_distribution(logits: torch.Tensor, tokens: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """softmax of transformers' processor chain, in the order its generate() applies them."""
    chain = []
    if config.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k > 0:
        chain.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        chain.append(TopPLogitsWarper(config.top_p))
    scores = logits.clone()
    for processor in chain:
        scores = processor(tokens, scores)
    return scores.softmax(dim=-1)


def next_token_distribution(logits: torch.Tensor, tokens: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The (rows, vocab) probabilities `next_token` hands to torch.multinomial, in vocabulary order."""
    seen: dict[str, torch.Tensor] = {}
    real = torch.multinomial

    def pick(probs, num_samples, *args, **kwargs):
        seen["probs"] = probs.detach().clone()
        return torch.full((probs.size(0), num_samples), seen["position"], dtype=torch.long)

    torch.multinomial = pick
    try:
        seen["position"] = 0
        next_token(logits, tokens, config)
        probs = seen["probs"]
        full = torch.zeros(logits.shape)
        for position in range(probs.size(1)):  # which token id each sampled position stands for
            seen["position"] = position
            ids = next_token(logits, tokens, config)
            full[torch.arange(len(ids)), ids] += probs[:, position]
    finally:
        torch.multinomial = real
    return full


def assert_same_distribution(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Same kept tokens, and probabilities equal to fp32 rounding (sums over at most 1000 terms)."""
    assert torch.equal(ours > 0, expected > 0), (ours > 0).sum(-1).tolist() + (expected > 0).sum(-1).tolist()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


CHAINS = {
    "everything": dict(repetition_penalty=1.3, temperature=0.7, top_k=40, top_p=0.8),
    "flattening": dict(repetition_penalty=0.8, temperature=1.6, top_k=200, top_p=0.95),
    "top_p_only": dict(repetition_penalty=1.2, temperature=1.3, top_k=0, top_p=0.6),
    "top_k_only": dict(repetition_penalty=1.0, temperature=0.5, top_k=7, top_p=1.0),
    "model_card": dict(),  # temperature 1, top_k 50, top_p 0.95
    "nothing": dict(top_k=0, top_p=1.0),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_next_token_samples_from_hf_chain(name, seed):
    """Temperature before the filters matters: top-p after a temperature keeps another set of tokens
    than top-p before it (so does every reordering of the chain)."""
    config = SamplingConfig(**CHAINS[name])
    logits, tokens = random_logits(seed), random_tokens(seed + 100)
    assert_same_distribution(next_token_distribution(logits, tokens, config), hf_distribution(logits, tokens, config))


def test_temperature_before_top_p_is_what_decides_the_kept_set():
    """Guards the test above: on these logits, applying the temperature after top-p would keep
    another set of tokens, so a loop in the wrong order cannot pass it."""
    config = SamplingConfig(**CHAINS["top_p_only"])
    logits, tokens = random_logits(0), random_tokens(100)
    penalised = RepetitionPenaltyLogitsProcessor(1.2)(tokens, logits.clone())
    wrong_order = TemperatureLogitsWarper(1.3)(tokens, TopPLogitsWarper(0.6)(tokens, penalised.clone()))
    assert not torch.equal(wrong_order.isfinite(), hf_distribution(logits, tokens, config) > 0)


def test_ties_at_the_top_k_line_are_all_kept():
    """Five tokens share the 3rd-largest score: top-k 3 keeps all of them (seven in all), then
    top-p takes its line far from the ties."""
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, 10], logits[:, 20] = 4.0, 3.5
    logits[:, [30, 31, 32, 33, 34]] = 2.0
    logits[1, 999] = 2.0  # one more tie in the second row
    tokens = torch.tensor([[20, 20, 5], [7, 8, 9]])
    config = SamplingConfig(repetition_penalty=1.1, temperature=0.9, top_k=3, top_p=0.999)
    ours = next_token_distribution(logits, tokens, config)
    assert (ours > 0).sum(-1).tolist() == [7, 8]
    assert_same_distribution(ours, hf_distribution(logits, tokens, config))


@pytest.mark.parametrize("top_k", [0, 50])
def test_a_tiny_top_p_keeps_only_the_most_likely_token(top_k):
    """With p = 1e-9, 1 - p rounds to 1.0 in fp32 and every cumulative mass is <= it: without the
    "always keep the most likely token" rule nothing would be left to sample from."""
    logits, tokens = random_logits(5), random_tokens(6)
    config = SamplingConfig(repetition_penalty=1.2, temperature=0.8, top_k=top_k, top_p=1e-9)
    ours = next_token_distribution(logits, tokens, config)
    expected = hf_distribution(logits, tokens, config)
    assert (expected > 0).sum(-1).tolist() == [1, 1, 1, 1]
    assert torch.equal(ours, expected)
    assert torch.equal(next_token(logits, tokens, config), expected.argmax(-1))


def test_a_draw_with_the_same_generator_is_hfs_draw():
    """Without top-k the step samples over the whole vocabulary, as transformers does: the same
    generator state gives the same token, row by row and draw by draw."""
    config = SamplingConfig(repetition_penalty=1.3, temperature=0.7, top_k=0, top_p=0.9)
    ours_generator, hf_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for seed in range(20):
        logits, tokens = random_logits(seed), random_tokens(seed + 50)
        expected = torch.multinomial(hf_distribution(logits, tokens, config), 1, generator=hf_generator)[:, 0]
        assert torch.equal(next_token(logits, tokens, config, ours_generator), expected)


# --- the loop ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    from transformers import GPT2LMHeadModel

    return load_model(tiny_hf_dir)[0], GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


def test_sampled_loop_equals_hf_generate_with_the_same_seed(models, gpt2_tokenizer):
    """transformers' generate(do_sample=True) draws from the global generator, once per step, over
    the whole vocabulary; with top-k off minigpt's loop does the same, so the tokens are equal.
    (With top-k on, minigpt samples among the survivors only: the same distribution, other draws.)"""
    ours, hf = models
    prompt = gpt2_tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    settings = dict(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.3)
    config = SamplingConfig(max_new_tokens=30, **settings)
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt] * 2), attention_mask=torch.ones(2, len(prompt), dtype=torch.long),
                max_new_tokens=30, do_sample=True, pad_token_id=50256, **settings,
            )
        expected = out[:, len(prompt):].tolist()
        torch.manual_seed(seed)
        got = generate_ids(ours, prompt, config, num_samples=2, eos_id=None)
        assert got == expected
        assert got[0] != got[1]  # two real samples, not one greedy path


def test_a_finished_sample_is_padded_while_the_others_go_on(models, gpt2_tokenizer):
    """Two samples, one of which emits the stop token early: from then on its slot holds that token
    (transformers pads finished rows with pad_token_id; set to the same token here), while the
    other sample keeps drawing exactly as transformers' does."""
    ours, hf = models
    prompt = gpt2_tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    settings = dict(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(0)
    config = SamplingConfig(max_new_tokens=30, **settings)
    free = generate_ids(ours, prompt, config, num_samples=2, eos_id=None)
    stop = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i] and t not in free[1])
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt] * 2), attention_mask=torch.ones(2, len(prompt), dtype=torch.long),
            max_new_tokens=30, do_sample=True, eos_token_id=stop, pad_token_id=stop, **settings,
        )
    expected = out[:, len(prompt):]
    torch.manual_seed(0)
    steps = torch.stack(list(generate(ours, prompt, config, 2, eos_id=stop)), 1)
    assert torch.equal(steps, expected)
    cut = free[0].index(stop)
    assert (steps[0, cut:] == stop).all() and steps[0, :cut].tolist() == free[0][:cut] and steps[1].tolist() == free[1]
