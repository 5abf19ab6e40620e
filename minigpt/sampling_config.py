"""SamplingConfig: how `minigpt.sampling` picks each next token, and `sample.py`'s flags for it.

A module of its own, free of torch, so the CLI can build its flags and answer `--help` at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral, Real

from .cli import flag, non_negative_float, non_negative_int, positive_float, positive_int, unit_interval
from .errors import MinigptError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. The defaults are the published ELI5 fine-tune's.

    temperature 0 (or greedy=True) means greedy decoding: always the most likely token. top_k 0 and
    top_p 1.0 switch those filters off; repetition_penalty 1.0 switches the penalty off. Where a
    sample stops early is not a setting but the tokenizer's: `generate` is given its `eos_id`.
    Each `flag` field is also a sample.py option (`minigpt.cli.add_flags`).
    """

    max_new_tokens: int = flag(100, "stop after N new tokens (or earlier, at <|endoftext|>); past the model's context "
                               "window (1,024 tokens for GPT-2) it goes on from the last half of it", group="sampling",
                               type=positive_int, metavar="N")
    temperature: float = flag(1.0, "divide the logits by T: < 1 is more focused, > 1 more random, 0 is greedy",
                              group="sampling", type=non_negative_float, metavar="T")
    top_k: int = flag(50, "sample only among the K most likely tokens; 0 turns it off", group="sampling",
                      type=non_negative_int, metavar="K")
    top_p: float = flag(0.95, "sample only among the fewest most likely tokens whose probabilities add up to P; "
                        "1 turns it off", group="sampling", type=unit_interval, metavar="P")
    repetition_penalty: float = flag(1.0, "push down tokens already in the text: a positive logit divided by R, a "
                                     "negative one multiplied by it; 1 turns it off, 1.2 is a common choice",
                                     group="sampling", type=positive_float, metavar="R")
    greedy: bool = flag(False, "always take the most likely token (deterministic; --temperature, --top-k and --top-p "
                        "are refused with it, as they would change nothing)",
                        group="sampling", action="store_true")

    def __post_init__(self) -> None:
        for name, kind, what in (("max_new_tokens", Integral, "an integer"), ("top_k", Integral, "an integer"),
                                 ("temperature", Real, "a number"), ("top_p", Real, "a number"),
                                 ("repetition_penalty", Real, "a number"), ("greedy", bool, "True or False")):
            value = getattr(self, name)  # ("3" or 3.0 would fail deep in torch; greedy="False" is truthy)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise MinigptError(f"{name} must be {what}, got {value!r}")
        if self.max_new_tokens < 1:
            raise MinigptError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise MinigptError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MinigptError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MinigptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise MinigptError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.is_greedy:  # (transformers' GenerationConfig warns so with do_sample=False; sample.py refuses them)
            cls = type(self)  # (its attributes hold the fields' defaults)
            unused = [f"{name}={value!r}" for name, value, keep in (
                ("temperature", self.temperature, (0, 1)), ("top_k", self.top_k, (0, cls.top_k)),
                ("top_p", self.top_p, (cls.top_p, 1))) if value not in keep]  # (the defaults, or off)
            if unused:
                warnings.warn(f"SamplingConfig: {' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no "
                              f"effect with {'greedy=True' if self.greedy else 'temperature=0'}: greedy decoding "
                              "always takes the most likely token", stacklevel=3)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def to_hf(self, eos_token_id: int, window: int) -> dict:
        """transformers' `generation_config.json` for these settings, so that `generate()` and
        `pipeline` on an exported folder sample as sample.py does (without one they take
        transformers' defaults: greedy, or a temperature of 0.7). Its length is the context `window`,
        prompt and new tokens together (`max_length`): transformers does not slide the window, and
        fails past it, so it stops there (or at <|endoftext|>) where sample.py would go on; a call
        may still ask for `max_new_tokens`."""
        sampling = {} if self.is_greedy else {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "do_sample": not self.is_greedy, **sampling,
                "repetition_penalty": self.repetition_penalty, "max_length": window}
