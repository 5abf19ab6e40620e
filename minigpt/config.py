"""GPTConfig: the numbers that define a GPT-2-family model, and their mapping to HF's config.json.

gpt2, gpt2-medium, distilgpt2 and their fine-tunes share one architecture and differ only in these
numbers, so one dataclass describes them all. The defaults are distilgpt2's.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from .errors import MinigptError

# A sanity bound checked before anything is allocated, so a hostile or mistyped config.json
# (n_layer = 10**6, say) is refused instead of exhausting memory. gpt2-xl has 1.6 B parameters.
MAX_PARAMETERS = 20_000_000_000
# Depth is bounded on its own: even a model that is small in parameters takes seconds per hundred
# layers to lay out, and the deepest GPT-2 (gpt2-xl) has 48.
MAX_LAYERS = 256

ATTENTION_IMPLS = ("sdpa", "reference")
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")  # the shape: required in a config.json
# GPT2Config's other names for four of its fields (its `attribute_map`): a config.json may use either.
HF_ALIASES = {"n_embd": "hidden_size", "n_positions": "max_position_embeddings", "n_head": "num_attention_heads",
              "n_layer": "num_hidden_layers"}


@dataclass(frozen=True)  # (a built model copies what it needs: a field changed later would change nothing)
class GPTConfig:
    """The numbers that fix a GPT-2 model's shape and behaviour (defaults: distilgpt2's). The weights'
    shapes follow from four of the first five: wte (vocab_size, n_embd), wpe (block_size, n_embd),
    n_layer blocks, each with c_attn (3*n_embd, n_embd) and c_fc (4*n_embd, n_embd). n_head changes
    no shape, only how c_attn's output is split (n_embd / n_head channels a head): the weights
    cannot check it, so it must come from the config that was trained with them. Checked when made,
    so a bad config.json is one line, not a shape error deep in torch."""

    vocab_size: int = 50257  # GPT-2's byte-level BPE vocabulary (50,000 merges + 256 bytes + EOS)
    block_size: int = 1024  # context window: the number of learned position embeddings
    n_layer: int = 6  # distilgpt2 keeps 6 of GPT-2's 12 blocks
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1  # on embeddings, attention probabilities and residual outputs
    layer_norm_eps: float = 1e-5
    attn_impl: str = "sdpa"  # "sdpa": fused kernels; "reference": softmax(QK^T/sqrt(d))V written out

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MinigptError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("dropout", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MinigptError(f"config: {name} must be a number, got {value!r}")
        if self.n_layer > MAX_LAYERS:
            raise MinigptError(
                f"config: n_layer={self.n_layer} is beyond any GPT-2 model (at most {MAX_LAYERS})"
            )
        if self.n_embd % self.n_head:
            raise MinigptError(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MinigptError(f"config: dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.layer_norm_eps < float("inf"):
            raise MinigptError(f"config: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise MinigptError(
                f"config: attn_impl must be one of {ATTENTION_IMPLS}, got {self.attn_impl!r}"
            )
        if self.num_parameters() > MAX_PARAMETERS:
            raise MinigptError(
                f"config: {self.num_parameters():,} parameters (n_layer={self.n_layer}, "
                f"n_embd={self.n_embd}) is beyond any GPT-2 model; refusing to allocate it"
            )

    def num_parameters(self) -> int:
        """Parameter count implied by the numbers (the LM head is tied, so counted once)."""
        d = self.n_embd
        embeddings = (self.vocab_size + self.block_size) * d
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return embeddings + self.n_layer * block + 2 * d

    def to_dict(self) -> dict[str, Any]:
        """Every field by name: minigpt's config.json (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Build from minigpt's own config.json; unknown keys are an error, not silently dropped, and
        so is a missing shape field (distilgpt2's default would only fail later, blaming the weights
        or another field; a wrong n_head would not fail at all)."""
        if not isinstance(d, dict):
            raise MinigptError("config: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hf = " (an HF GPT-2 config.json? it names its model_type, \"gpt2\")" if "n_positions" in d else ""
            raise MinigptError(f"config: unknown field {unknown[0]!r}{hf}")
        missing = [name for name in SHAPE_FIELDS if name not in d]
        if missing:
            raise MinigptError(f"config: missing field {missing[0]!r}")
        return cls(**d)

    # --- Hugging Face GPT2Config <-> GPTConfig ------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "GPTConfig":
        """Map an HF GPT-2 `config.json` to a GPTConfig, refusing anything we cannot compute exactly."""
        hf = dict(hf)
        for name, alias in HF_ALIASES.items():  # (transformers reads either name)
            if alias in hf:
                value = hf.pop(alias)
                if hf.setdefault(name, value) != value:
                    raise MinigptError(f"config: {name} {hf[name]!r} and {alias} {value!r} (another name for it) differ")
        if hf.get("model_type") != "gpt2":
            raise MinigptError(f"config: model_type {hf.get('model_type')!r} is not 'gpt2'")
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise MinigptError(
                f"config: activation_function {activation!r} is not GPT-2's tanh GELU (gelu_new)"
            )
        # Flags whose non-default value changes the mathematics of GPT-2's attention, or of its
        # output: untied, the LM head is a matrix of its own, where ours reads the token embedding.
        for field, supported in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("add_cross_attention", False),
            ("tie_word_embeddings", True),
        ):
            if hf.get(field, supported) != supported:
                raise MinigptError(f"config: {field}={hf[field]!r} is not supported")
        config = cls(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=hf.get("n_embd", 768),
            dropout=hf.get("resid_pdrop", 0.1),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
        if hf.get("n_inner") not in (None, 4 * config.n_embd):  # (after cls checked n_embd is a number)
            raise MinigptError(f"config: n_inner={hf['n_inner']!r} is not 4 * n_embd")
        dropouts = {name: hf.get(name, 0.1) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if any(p != config.dropout for p in dropouts.values()):  # (only training sees it: inference is exact)
            warnings.warn(f"config: {', '.join(f'{k} {v!r}' for k, v in dropouts.items())} differ; minigpt has one "
                          f"dropout and trains with resid_pdrop's for all three (train.py --dropout sets it)",
                          stacklevel=2)
        return config

    def to_hf(self, eos_token_id: int, dtype: str = "float32") -> dict[str, Any]:
        """An HF `config.json` for GPT2LMHeadModel with these numbers; `eos_token_id` (also its
        `bos_token_id`) is the tokenizer's, `dtype` the saved weights' ("float32", "bfloat16"), which
        transformers' `dtype="auto"` reads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "use_cache": True,
            "dtype": dtype,
        }
