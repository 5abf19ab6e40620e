"""Text generation: the decoding loop on the KV cache, and the logit filters that shape each step.

One step of sampling (`next_token`) turns the model's next-token logits into a token, in Hugging
Face's order:

    scores = penalized_scores(logits, tokens so far, config)  # fp32; apply_repetition_penalty
    values, ids = candidate_scores(scores, config)            # the candidate set:
        #   apply_temperature(scores, t)                           < 1 sharpens, > 1 flattens
        #   candidates(scores, k)                                  top-k: the k most likely (and ties)
        #   top_p_filter(values, p)                                the fewest holding mass p
    token = draw(values, ids, generator)                     # multinomial(softmax(values))

Greedy decoding keeps the penalty (as HF does), skips the rest and takes the argmax. Each filter is
a small pure function equal, number for number, to its transformers counterpart
(RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper with
min_tokens_to_keep=1), so a setting means here what it means on the model card. `candidates` is
`top_k_filter` restricted to its survivors (the same set, sorted, without the full-vocabulary row);
`top_k_filter` itself is the one-line definition it is tested against.

The loop (`generate`) feeds the prompt through the model once (prefill), then one token per step,
asking the model for the LM-head logits of the last position only. It takes the step function as a
parameter (`pick`, `next_token` by default), so `minigpt.trace` can watch each step's numbers
without a second forward pass and without any cost when nobody watches. Given `compiled`
(`minigpt.compiled_decoding.CompiledDecoding`), the steps after the prompt run through the model's
compiled one-token step instead.

The prompt may be a list of ints or a 1-D integer tensor (what a Hugging Face user holds);
`token_ids` is the one place a prompt (or the ids `minigpt.trace.score_ids` reads) is checked. A
model in training mode with dropout on is refused (`check_eval_mode`): its dropout would make every
output random, greedy decoding and scoring included.
"""

from __future__ import annotations

import codecs
import math
import operator
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import MinigptError, integer_at_least
from .model import GPT, KVCache
from .runtime import activation_dtype, allocate, check_fits, model_device
from .sampling_config import SamplingConfig
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # (a speed module: the plain decoding loop does not load it)
    from .compiled_decoding import CompiledDecoding

TokenIds = list[int] | tuple[int, ...] | torch.Tensor  # a prompt: a list or tuple of ids, or a 1-D tensor


# --- the logit filters ------------------------------------------------------------------------


def apply_repetition_penalty(scores: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token id that occurs in `tokens` (B, L), once however often it occurs.

    A positive score is divided by `penalty`, a negative one multiplied by it, so with penalty > 1
    every seen token's score moves down (a score of 0 stays 0, and a seen token's probability can
    still rise where other seen tokens fall further) (CTRL, Keskar et al. 2019).
    """
    seen = torch.gather(scores, 1, tokens)  # (B, L): the scores of the tokens seen so far
    penalized = torch.where(seen < 0, seen * penalty, seen / penalty)
    # A penalty so extreme that a product overflows (inf - inf is NaN later) or rounds to 0 means its limit, as
    # does the most extreme one that keeps the row finite: below 1, all mass on the largest positive seen score;
    # far above 1, where every token was seen and each is negative (all -inf), all mass on the least negative.
    finfo = torch.finfo(scores.dtype)
    if penalty < 1:
        smallest = (scores.amax(dim=1, keepdim=True) / (finfo.max / 2)).clamp(min=max(penalty, finfo.tiny))
        limit = torch.where(seen < 0, seen * max(penalty, finfo.tiny), seen / smallest)
        penalized = torch.where(smallest > penalty, limit, penalized)  # (only where the penalty was too small)
    else:
        largest = (finfo.max / 2) / (-seen).amax(dim=1, keepdim=True).clamp(min=1.0)
        penalized = torch.where((largest < penalty) & (seen < 0), seen * largest, penalized)
    return scores.scatter(1, tokens, penalized)  # repeats write the same value, so "once" holds


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by `temperature`: below 1 the distribution sharpens, above 1 it flattens."""
    # Below the smallest normal float a temperature rounds to 0 (its reciprocal to inf: 0 * inf = NaN); the
    # smallest gives the limit on scores shifted to a maximum of 0, all mass on it. Above the largest it
    # rounds to inf, every score to 0: a tie that top-k kept whole.
    finfo = torch.finfo(scores.dtype)
    return scores / min(max(temperature, finfo.tiny), finfo.max)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every score >= the k-th largest of its row (so ties at the k-th value are all kept);
    set the rest to -inf."""
    k = min(max(k, 1), scores.size(-1))
    kth_largest = torch.topk(scores, k).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth_largest, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `p`.

    Sorted from least to most likely, a token is dropped while the cumulative probability up to and
    including it is still <= 1 - p; the token that crosses that line is kept, and so is the most
    likely token whatever p is. Dropped scores become -inf.
    """
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False  # never drop the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, float("-inf"))


# --- one decoding step ------------------------------------------------------------------------


def candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k_filter` restricted to the survivors: their scores (sorted, descending) and token ids.

    Every token outside the top k (plus ties) gets probability 0 anyway, so sampling among the
    survivors alone is the same distribution, and top-p then sorts a few dozen values instead of
    the whole vocabulary. Ties at the k-th value cost one wider `topk`, never a full sort. Rows with
    fewer ties than the widest row are padded with -inf. (One thing a shorter sort can change: when
    two tokens with exactly equal logits straddle the top-p line, which of them is kept follows the
    sort order of equal values, which no definition of top-p fixes.)
    """
    k = min(max(k, 1), scores.size(-1))
    # One more than k: when the (k+1)-th largest is below the k-th in every row, nothing outside
    # the k ties the k-th value, and no pass over the whole vocabulary is needed to know it.
    values, ids = torch.topk(scores, min(k + 1, scores.size(-1)))
    kth_largest = values[:, k - 1 : k]
    if values.size(1) == k or not bool((values[:, k:] == kth_largest).any()):
        return values[:, :k], ids[:, :k]
    # ties at the k-th value: all of them are kept, as top_k_filter does
    survivors = int((scores >= kth_largest).sum(dim=-1).max())
    values, ids = torch.topk(scores, survivors)
    return values.masked_fill(values < kth_largest, float("-inf")), ids


def penalized_scores(logits: torch.Tensor, tokens: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The logits (B, vocab) in fp32, with the repetition penalty applied when one is set: the
    scores whose softmax is the model's distribution over the next token, as sampling sees it."""
    scores = logits.float()  # filter and sample in fp32 whatever the model computes in, as HF does
    if config.repetition_penalty != 1.0:  # HF applies it to greedy decoding too
        scores = apply_repetition_penalty(scores, tokens, config.repetition_penalty)
    return scores


def candidate_scores(
    scores: torch.Tensor, config: SamplingConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidate set the sampler draws from: temperature, then top-k, then top-p (HF's order).

    Returns (values, ids): the scores of the candidates after the temperature, -inf for those top-p
    dropped, and their token ids, (B, n) each; `ids` is None when top-k is off and `values` then
    covers the whole vocabulary in its own order. Greedy decoding's candidate set is its argmax.
    """
    if config.is_greedy:
        values, ids = scores.max(dim=-1, keepdim=True)
        return values, ids
    if config.temperature != 1.0:
        scaled = apply_temperature(scores, config.temperature)  # HF's numbers, bit for bit
        # A tiny temperature can overflow a row's maximum to inf (and the softmax to NaN). Such rows
        # are shifted to a maximum of 0 first, which changes no probability. Only those rows: the
        # shift rounds, and two close scores made equal could swap places at the top-p line.
        shifted = apply_temperature(scores - scores.amax(dim=-1, keepdim=True), config.temperature)
        scores = torch.where(scaled.amax(dim=-1, keepdim=True).isfinite(), scaled, shifted)
    ids = None
    if config.top_k > 0:
        scores, ids = candidates(scores, config.top_k)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    return scores, ids


def draw(
    values: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample one token per row (B,) from the softmax of the candidates' `values`."""
    choice = torch.multinomial(F.softmax(values, dim=-1), 1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)


def next_token(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token of each row from its logits (B, vocab), given the tokens so far (B, L)."""
    scores = penalized_scores(logits, tokens, config)
    if config.is_greedy:
        return scores.argmax(dim=-1)
    return draw(*candidate_scores(scores, config), generator)


def check_finite(logits: torch.Tensor) -> None:
    """Refuse logits that hold inf or NaN: no probability follows from them (torch.multinomial
    fails on them; argmax picks the inf or NaN entry, or token 0 from a row all NaN). Finite weights
    can give them, as a diverged run leaves. The sum is read first: it is finite only where every
    logit is, and one pass over them costs less than `isfinite`'s four (distilgpt2's 50,257 logits,
    caches flushed: 30-39 against 107-177 us on the AMD EPYC Zen 4; greedy int8 decoding 280.2
    against 273.3 tokens/s, 15 interleaved rounds); only a sum that is not finite (or overflowed)
    is checked entry by entry (summed in fp32: fp16 logits would overflow fp16's sum)."""
    if not math.isfinite(logits.sum(dtype=torch.float32)) and not bool(logits.isfinite().all()):
        raise MinigptError("the model's logits are not finite (inf or NaN): its weights are "
                           "broken, as a diverged training run leaves them")


def token_ids(ids: TokenIds, vocab_size: int, name: str = "prompt") -> list[int]:
    """`ids` as a list of Python ints, each a token of a `vocab_size`-token vocabulary.

    Taken: a list or tuple of ints, or a 1-D integer tensor (a Hugging Face tokenizer's
    `input_ids[0]`). Anything else is a TypeError naming `name` and what was given: a str is text,
    not ids; a float is no token id (truncating 1.5 to 1 would pick a token nobody chose); a 2-D
    tensor is a batch, and `generate` makes its batch from one prompt (`num_samples`). An id outside
    [0, vocab_size) is a MinigptError (`check_in_vocabulary`).
    """
    expected = f"{name}: a list of token ids or a 1-D integer tensor"
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            batch = "; for one row of a batch pass ids[0]" if ids.dim() == 2 else ""
            raise TypeError(f"{expected}, got a {ids.dim()}-D {ids.dtype} tensor{batch}")
        ids = ids.tolist()
    elif isinstance(ids, (list, tuple)):
        ints = []
        for i, t in enumerate(ids):
            try:
                ints.append(operator.index(t))  # an int, or a numpy or 0-D tensor integer
            except TypeError:
                raise TypeError(f"{expected}, got a {type(ids).__name__} whose item {i} is "
                                f"{type(t).__name__}") from None
        ids = ints
    else:
        cls = type(ids)
        kind = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"  # numpy.ndarray
        text = "; encode text with tokenizer.encode" if isinstance(ids, str) else ""
        raise TypeError(f"{expected}, got {kind}{text}")
    check_in_vocabulary(ids, vocab_size, name)
    return ids


def check_in_vocabulary(ids: list[int], vocab_size: int, name: str) -> None:
    """Refuse an id outside [0, vocab_size), naming the first: the embedding would fail on it with
    a bare IndexError (and a negative one would count from the end in Python's indexing)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise MinigptError(f"{name}: token id {bad} is outside the model's vocabulary of {vocab_size} tokens "
                           f"(ids 0 to {vocab_size - 1})")


def check_eval_mode(model: GPT, what: str) -> None:
    """Refuse a model in training mode (as `Trainer.fit` or `.train()` leaves it) whose dropout is on:
    its outputs would be random, greedy tokens and scores included. `what`: the task, for the message.
    The dropout layers are asked, not the config: theirs is the probability applied."""
    if rates := [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0]:
        raise MinigptError(f"{what} needs the model in eval mode (model.eval()): in training mode its dropout "
                           f"({max(rates)}) makes every output random")


Pick = Callable[[torch.Tensor, torch.Tensor, SamplingConfig, "torch.Generator | None"], torch.Tensor]


# --- the decoding loop ------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: TokenIds,
    config: SamplingConfig,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    pick: Pick = next_token,
    *,
    eos_id: int | None,
    compiled: CompiledDecoding | None = None,
) -> Iterator[torch.Tensor]:
    """Continue `prompt` (token ids) `num_samples` times at once; yield each step's new tokens (B,).

    The samples share one batched forward pass per step. A sample that has emitted `eos_id` (the
    tokenizer's, `tokenizer.eos_id`) is finished: from then on its slot in each step's tokens holds
    eos_id again (as HF pads), and the loop ends when all samples are finished or after
    `config.max_new_tokens` steps. eos_id=None never stops early (what a benchmark asks for).

    pick(logits (B, vocab), tokens so far (B, L), config, generator) chooses each step's tokens;
    `minigpt.trace.StepRecorder` is a `next_token` that also keeps the step's probabilities.

    `prompt`: a list of ints or a 1-D integer tensor (`token_ids`, which names what else was given). An empty
    prompt starts from `eos_id`, as HF does. The model sees at most `block_size` tokens: of a longer prompt it
    reads the last `block_size` (the repetition penalty still counts every token of it, as it does the generated
    tokens that slide out), and when generation fills the window the cache is rebuilt from the last
    `block_size // 2` tokens (one prefill) so decoding can continue. compiled: `model`'s compiled decoding step,
    for every step after a prefill.

    The arguments (and the model's mode, `check_eval_mode`) are checked and the buffers allocated when
    `generate` is called, before the first step: an output or KV cache that does not fit in memory is a
    MinigptError naming its size then.
    """
    check_eval_mode(model, "generation")
    num_samples = integer_at_least(num_samples, 1, "num_samples")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: a torch.Generator (or None), got {type(generator).__name__}")
    prompt = token_ids(prompt, model.config.vocab_size)
    if eos_id is not None:
        try:
            eos_id = operator.index(eos_id)  # an int, or a numpy or 0-D tensor integer
        except TypeError:
            raise TypeError(f"eos_id: a token id (an int) or None, got {type(eos_id).__name__}") from None
        check_in_vocabulary([eos_id], model.config.vocab_size, "eos_id")
    elif not prompt:
        raise MinigptError("an empty prompt starts from eos_id, and none was given")
    window = model.config.block_size
    device = model_device(model)
    prompt = list(prompt) or [eos_id]
    n_prompt = len(prompt)

    # All tokens so far, the whole prompt included: the repetition penalty counts every token of
    # the text, and the window is rebuilt from them.
    count = num_samples * (n_prompt + config.max_new_tokens)
    flags = f"--max-new-tokens {config.max_new_tokens} x --num-samples {num_samples}"
    tokens = allocate(
        lambda: torch.empty(num_samples, n_prompt + config.max_new_tokens, dtype=torch.long, device=device),
        count * 8, device, flags, "the output", f"{count} token ids with the prompt",
    )
    tokens[:, :n_prompt] = torch.tensor(prompt, device=device)
    needed = min(window, n_prompt + config.max_new_tokens)
    dtype, c = activation_dtype(model), model.config
    if compiled is not None:  # (its step may need the cache in tensors of its own)
        compiled.check_model(model)
        new_cache = partial(compiled.new_cache, num_samples, needed, dtype)
    else:
        new_cache = partial(KVCache, c, num_samples, needed, device=device, dtype=dtype)
    cache_bytes = decoding_bytes(model, num_samples, n_prompt, config.max_new_tokens)[0]
    cache = allocate(new_cache, cache_bytes, device, f"--num-samples {num_samples}", "the KV cache",
                     f"{num_samples} x {needed} positions x {c.n_layer} layers")
    check_decoding_fits(model, num_samples, n_prompt, config.max_new_tokens)  # (the cache allocated, not yet used)
    return _steps(model, tokens, n_prompt, cache, config, generator, pick, eos_id, compiled)


def decoding_bytes(model: GPT, num_samples: int, n_prompt: int, max_new_tokens: int,
                   cache_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(KV cache, a step's own tensors) in bytes, for decoding `num_samples` rows of `model`: a
    step's tensors are the logits and the sampler's sorted copies of them, ~12 bytes a row per
    vocabulary entry, and the prompt pass's activations, ~10 floats a row per position and channel
    (both measured). The cache holds `cache_dtype`, else `activation_dtype(model)`."""
    c, itemsize = model.config, (cache_dtype or activation_dtype(model)).itemsize
    positions = min(c.block_size, n_prompt + max_new_tokens)
    cache = 2 * c.n_layer * num_samples * positions * c.n_head * (c.n_embd // c.n_head) * itemsize
    return cache, num_samples * (c.vocab_size * 12 + min(c.block_size, n_prompt) * c.n_embd * 40)


def check_decoding_fits(model: GPT, num_samples: int, n_prompt: int, max_new_tokens: int,
                        cache_dtype: torch.dtype | None = None) -> None:
    """A one-line MinigptError when a decoding step with its KV cache (`decoding_bytes`) exceeds the
    memory available. `generate` checks it; sample.py also checks it, for a one-token prompt and the
    prepared model's cache dtype, before the kernels are timed or the step compiled on as many rows."""
    cache, step = decoding_bytes(model, num_samples, n_prompt, max_new_tokens, cache_dtype)
    check_fits(cache + step, model_device(model), f"--num-samples {num_samples}", "a decoding step with its KV cache",
               f"{num_samples} rows of {model.config.vocab_size:,} logits")


@torch.inference_mode()
def _steps(
    model: GPT,
    tokens: torch.Tensor,
    n_prompt: int,
    cache: KVCache,
    config: SamplingConfig,
    generator: torch.Generator | None,
    pick: Pick,
    eos_id: int | None,
    compiled: CompiledDecoding | None,
) -> Iterator[torch.Tensor]:
    """`generate`'s loop, writing into its buffers: `tokens` (B, prompt + max new tokens) holds the
    prompt in its first `n_prompt` columns, `cache` is empty."""
    window = model.config.block_size
    length = n_prompt
    finished = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
    model_input = tokens[:, max(0, n_prompt - window) : n_prompt]  # first step: the prompt (prefill)

    for _ in range(config.max_new_tokens):
        if cache.length + model_input.size(1) > cache.max_len:  # the window is full: slide it
            cache.length = 0
            model_input = tokens[:, length - max(1, window // 2) : length]
        if compiled is not None and model_input.size(1) == 1:
            logits = compiled(model_input, cache)  # (B, vocab)
        else:
            logits = model(model_input, kv_cache=cache, last_only=True)[0][:, -1]  # (B, vocab)
        check_finite(logits)  # (every step: weights can break at later positions only; on a GPU, a wait)
        new = pick(logits, tokens[:, :length], config, generator)  # (B,)
        if eos_id is not None:
            new = new.masked_fill(finished, eos_id)
            finished |= new == eos_id
        tokens[:, length] = new
        length += 1
        yield new
        if eos_id is not None and bool(finished.all()):  # (reading it waits for a GPU: only when it can be true)
            return
        model_input = tokens[:, length - 1 : length]


def seeded_generator(model: GPT, seed: int | None = None) -> torch.Generator:
    """A random generator on the model's device, seeded with `seed` (None: a fresh random seed)."""
    generator = torch.Generator(device=model_device(model))
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generate_ids(
    model: GPT,
    prompt: TokenIds,
    config: SamplingConfig,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    eos_id: int | None,
) -> list[list[int]]:
    """All new token ids of each sample, up to and including its EOS (`generate`'s `eos_id`)."""
    steps = [t.tolist() for t in generate(model, prompt, config, num_samples, generator, eos_id=eos_id)]
    rows = [list(row) for row in zip(*steps)]
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]  # (None is in no row)


class TextStream:
    """Token ids in, text out, one whole UTF-8 character at a time.

    A GPT-2 token is a run of bytes, and a character outside ASCII can be split across tokens
    (an emoji is often three of them). Decoding each token on its own would print replacement
    characters; this keeps the incomplete tail of a character until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that `token` completes (possibly empty)."""
        return self.decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD, as decode() does)."""
        return self.decoder.decode(b"", final=True)
