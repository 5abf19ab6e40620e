"""See the model think: each token's probability, the alternatives, what the filters kept, surprisal.

Everything here reads the numbers the sampler itself uses, from the same logits:

    prob        softmax of the step's scores: the model's logits in fp32, after the repetition
                penalty when one is set, before temperature / top-k / top-p
    kept        whether temperature + top-k + top-p (HF's order) left a token in the candidate set
                the sampler draws from; greedy decoding's candidate set is its one argmax token
    candidates  the size of that set; candidate_mass, the share of `prob` it held

During generation `StepRecorder` stands in for `sampling.next_token` (`generate(..., pick=recorder)`):
it picks the same token with the same random draw and keeps the step's `StepProbs`, so tracing
costs no second forward pass, and nothing at all when it is off. `score` reads a given text instead:
every token's probability after the tokens before it, and the text's mean loss and perplexity.

A notebook can call these directly:

    recorder = StepRecorder(top_alternatives=3)
    for new in generate(model, tokenizer.encode("Why"), config, pick=recorder, eos_id=tokenizer.eos_id):
        print(recorder.last.row(0, tokenizer))     # {"id": ..., "text": ..., "prob": ..., ...}
    result = score(model, tokenizer, "The sky is blue because")
    print(result.loss, result.perplexity, result.most_surprising(3))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence, TextIO

import torch

from .errors import MinigptError, integer_at_least
from .metrics import perplexity
from .model import GPT
from .runtime import model_device
from .sampling import TextStream, candidate_scores, check_eval_mode, check_finite, draw, penalized_scores, token_ids
from .sampling_config import SamplingConfig
from .tokenizer import Tokenizer

TOP_ALTERNATIVES = 5  # alternatives a trace row lists by default (sample.py's --top-alternatives says 5 too)
SCORE_CHUNK = 256  # positions whose (chunk, vocab) probabilities are held at once while scoring

# Colour bands for `--show-probs`: (lowest probability, ANSI colour code, colour name, label).
PROB_BANDS = (
    (0.5, "32", "green", ">= 50%"),
    (0.2, "33", "yellow", "20-50%"),
    (0.05, "35", "magenta", "5-20%"),
    (0.0, "31", "red", "< 5%"),
)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """The text of one token on its own.

    A GPT-2 token is a run of bytes that can start or end inside a multi-byte UTF-8 character. The
    bytes are decoded as far as they go: complete characters are kept, an unfinished character at
    the end is left out (the next token completes it), and a byte continuing a character begun by an
    earlier token becomes U+FFFD. A token holding only part of a character is therefore "".
    """
    return TextStream(tokenizer).push(token)  # (a fresh stream: nothing before it, nothing flushed after)


def _round(p: float) -> float:
    return float(f"{p:.6g}")  # 6 significant digits: readable, and far below any test's tolerance


@dataclass
class StepProbs:
    """The numbers of one step for a batch of B rows, as tensors (turned into rows by `row`).

    token (B,): the chosen (or scored) token; prob (B,): its probability; alt_ids / alt_probs /
    alt_kept (B, K): the K most likely tokens, most likely first, and whether each was a candidate;
    candidates (B,): the candidate set's size; candidate_mass (B,): the probability it held.
    """

    token: torch.Tensor
    prob: torch.Tensor
    alt_ids: torch.Tensor
    alt_probs: torch.Tensor
    alt_kept: torch.Tensor
    candidates: torch.Tensor
    candidate_mass: torch.Tensor

    @cached_property
    def _lists(self) -> tuple[list, ...]:
        """Everything as Python lists, fetched from the device once."""
        return tuple(t.tolist() for t in (self.token, self.prob, self.alt_ids, self.alt_probs,
                                          self.alt_kept, self.candidates, self.candidate_mass))

    def row(self, i: int, tokenizer: Tokenizer) -> dict:
        """Row `i` as a JSON-ready dict: id, text, prob, alternatives, candidates, candidate_mass."""
        token, prob, alt_ids, alt_probs, alt_kept, size, mass = (column[i] for column in self._lists)
        alternatives = [
            {"id": a, "text": token_text(tokenizer, a), "prob": _round(p), "kept": k}
            for a, p, k in zip(alt_ids, alt_probs, alt_kept)
        ]
        return {"id": token, "text": token_text(tokenizer, token), "prob": _round(prob),
                "alternatives": alternatives, "candidates": size, "candidate_mass": _round(mass)}


def step_probs(
    scores: torch.Tensor,
    token: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor | None,
    top_alternatives: int,
) -> StepProbs:
    """A step's numbers from its scores (B, vocab), the tokens (B,) and the candidate set that
    `sampling.candidate_scores` returned (values, ids)."""
    probs = torch.softmax(scores, dim=-1)
    if ids is None:  # top-k off: values covers the whole vocabulary
        kept = values.isfinite()
    else:
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, values.isfinite())
    alt_probs, alt_ids = probs.topk(min(top_alternatives, probs.size(-1)), dim=-1)
    return StepProbs(
        token=token,
        prob=probs.gather(1, token.unsqueeze(1)).squeeze(1),
        alt_ids=alt_ids,
        alt_probs=alt_probs,
        alt_kept=kept.gather(1, alt_ids),
        candidates=kept.sum(dim=-1),
        candidate_mass=probs.masked_fill(~kept, 0).sum(dim=-1),
    )


class StepRecorder:
    """`sampling.next_token` that also keeps each step's `StepProbs` in `last`.

    It picks exactly as `next_token` does (same scores, same candidate set, the same single random
    draw), so a seeded run gives the same text with or without it.
    """

    def __init__(self, top_alternatives: int = TOP_ALTERNATIVES) -> None:
        self.top_alternatives = integer_at_least(top_alternatives, 1, "top_alternatives")
        self.last: StepProbs | None = None

    def __call__(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        config: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        scores = penalized_scores(logits, tokens, config)
        values, ids = candidate_scores(scores, config)
        token = scores.argmax(dim=-1) if config.is_greedy else draw(values, ids, generator)
        self.last = step_probs(scores, token, values, ids, self.top_alternatives)
        return token


# --- scoring a text ---------------------------------------------------------------------------


@dataclass
class Score:
    """What the model thought of a text. `rows[j]` is token `j + 1`'s row (`StepProbs.row` plus
    "step", its position): the first token has nothing before it, so it is context only.
    loss: mean -ln p over the scored tokens (nats per token), transformers' loss on the same ids."""

    ids: list[int]
    rows: list[dict]
    loss: float
    nats: list[float]  # each row's surprisal -ln p, from the log-softmax: finite where p underflows to 0

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)  # (inf where exp overflows: a model that diverged)

    def bits(self, row: dict) -> float:
        """A row's surprisal in bits, -log2 p: how many bits its token cost (`rows[j]`, of step j + 1,
        has its -ln p in `nats[j]`)."""
        return self.nats[row["step"] - 1] / math.log(2)

    def most_surprising(self, n: int = 5) -> list[dict]:
        """The `n` rows whose token the model found least likely, least likely first."""
        order = sorted(range(len(self.rows)), key=lambda j: -self.nats[j])
        return [self.rows[j] for j in order[:n]]


@torch.inference_mode()
def score_ids(
    model: GPT,
    tokenizer: Tokenizer,
    ids: Sequence[int] | torch.Tensor,
    config: SamplingConfig | None = None,
    top_alternatives: int = TOP_ALTERNATIVES,
) -> Score:
    """Score every token of `ids` (a list of ints or a 1-D integer tensor, `sampling.token_ids`)
    after the first: one forward pass over a text that fits the context window, and no sampling.

    `config` decides only `kept` / `candidates` (which tokens its temperature, top-k and top-p would
    have left); the probabilities are the model's own, so a repetition penalty is refused. A text
    longer than the context window W is read in windows that slide by W // 2 (transformers'
    "strided perplexity" with that stride): the first window scores its tokens as usual, and every
    later token is predicted from at least the W - W // 2 tokens before it.
    """
    check_eval_mode(model, "scoring")
    ids = token_ids(ids, model.config.vocab_size, "ids")
    config = config or SamplingConfig()
    if config.repetition_penalty != 1.0:
        raise MinigptError("scoring reads the model's own probabilities; a repetition penalty "
                           "applies only when generating")
    top_alternatives = integer_at_least(top_alternatives, 1, "top_alternatives")
    if len(ids) < 2:
        raise MinigptError(f"the text is {len(ids)} token{'s' * (len(ids) != 1)}; scoring needs "
                           f"at least 2 (the first is context for the rest)")
    window = model.config.block_size
    if window < 2:
        raise MinigptError(f"a {window}-token context window has no room to predict a token from another")
    device = model_device(model)
    rows: list[dict] = []
    nats: list[float] = []
    begin, target = 0, 1  # the window's first token; the first token this window scores
    while target < len(ids):
        end = min(begin + window, len(ids))
        logits, _ = model(torch.tensor([ids[begin:end]], device=device))
        # position p predicts token p + 1: targets [target, end) come from positions [target - 1, end - 1)
        logits = logits[0, target - 1 - begin : end - 1 - begin]
        check_finite(logits)
        for start in range(0, logits.size(0), SCORE_CHUNK):
            scores = logits[start : start + SCORE_CHUNK].float()
            first = target + start
            tokens = torch.tensor(ids[first : first + scores.size(0)], device=device)
            nats += (-torch.log_softmax(scores, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1).double()).tolist()
            values, cand_ids = candidate_scores(scores, config)
            probs = step_probs(scores, tokens, values, cand_ids, top_alternatives)
            rows += [{"step": first + i, **probs.row(i, tokenizer)} for i in range(scores.size(0))]
        target = end
        begin = end - (window - window // 2)  # the next window ends W // 2 tokens further on
    return Score(ids=ids, rows=rows, loss=math.fsum(nats) / (len(ids) - 1), nats=nats)


def score(
    model: GPT,
    tokenizer: Tokenizer,
    text: str,
    config: SamplingConfig | None = None,
    top_alternatives: int = TOP_ALTERNATIVES,
) -> Score:
    """`score_ids` of `text`'s tokens; an empty text is a MinigptError."""
    if not text:
        raise MinigptError("the text to score is empty")
    return score_ids(model, tokenizer, tokenizer.encode(text), config, top_alternatives)


def write_rows(stream: TextIO | None, rows: list[dict], **first: object) -> None:
    """Write `rows` to `stream` as JSON lines (nothing when it is None), each beginning with the
    fields `first` (sample.py's "prompt" and "sample"); text stays UTF-8, not \\u-escaped."""
    if stream is not None:
        stream.writelines(json.dumps({**first, **row}, ensure_ascii=False) + "\n" for row in rows)


# --- showing it -------------------------------------------------------------------------------


def colour(text: str, prob: float) -> str:
    """`text` wrapped in the ANSI colour of `prob`'s band (for a terminal only)."""
    code = next(code for lowest, code, _, _ in PROB_BANDS if prob >= lowest)
    return f"\x1b[{code}m{text}\x1b[0m" if text else text


def legend(coloured: bool) -> str:
    """One line naming the bands, each label in its colour when `coloured`."""
    bands = [f"{name} {label}" for _, _, name, label in PROB_BANDS]
    if coloured:
        bands = [colour(band, lowest) for band, (lowest, *_) in zip(bands, PROB_BANDS)]
    return "token probability: " + " | ".join(bands)


def format_score(result: Score, tokenizer: Tokenizer, coloured: bool = False, n_surprising: int = 5) -> str:
    """A readable report: each token with its probability and surprisal (bits), the model's top
    guess, the most surprising tokens and the mean loss and perplexity. `coloured`: begin with the
    text itself, each token coloured by its probability."""
    first = token_text(tokenizer, result.ids[0])
    lines = []
    if coloured:  # the text's own characters: one split across tokens goes with the token that ends it
        stream = TextStream(tokenizer)
        text = stream.push(result.ids[0])
        for row in result.rows:
            text += colour(stream.push(row["id"]), row["prob"])
        lines += [text + stream.flush(), ""]
    lines.append(f"the first token, {json.dumps(first, ensure_ascii=False)}, is context only")
    lines.append(f"{'pos':>5}  {'prob':>9}  {'bits':>5}  {'token':<20}  the model's top guess")
    for row in result.rows:
        guess = row["alternatives"][0]
        shown = "(this token)" if guess["id"] == row["id"] else \
            f"{json.dumps(guess['text'], ensure_ascii=False)} {guess['prob']:.4g}"
        lines.append(f"{row['step']:>5}  {row['prob']:>9.4g}  {result.bits(row):>5.1f}  "
                     f"{json.dumps(row['text'], ensure_ascii=False):<20}  {shown}")
    surprising = ", ".join(f"{json.dumps(row['text'], ensure_ascii=False)} ({result.bits(row):.1f} bits)"
                           for row in result.most_surprising(n_surprising))
    lines.append(f"most surprising: {surprising}")
    lines.append(f"{len(result.rows)} tokens scored | mean loss {result.loss:.6g} nats/token | "
                 f"perplexity {result.perplexity:.6g}")
    return "\n".join(lines) + "\n"

