"""GPT-2, as a reader meets it.

The model is a stack of identical pre-LayerNorm Transformer blocks between a token + position
embedding and a final LayerNorm, read out by an LM head that shares its weight with the token
embedding:

    x = wte[idx] + wpe[pos]                       # (B, T, C)
    for block in h:  x = x + attn(ln_1(x))        # tokens exchange information
                     x = x + mlp(ln_2(x))         # each token thinks on its own
    logits = ln_f(x) @ wte.T                      # (B, T, vocab)

Shapes in the comments: B sequences in a batch, T tokens each, C = n_embd channels a token; attention
splits C into nh = n_head heads of hs = C / nh channels. The KV cache (`KVCache`, after the block)
is for decoding: read it last.

Module names mirror the Hugging Face checkpoint keys (`transformer.wte`, `transformer.h.0.attn.c_attn`,
`mlp.c_fc`, ...), so converting weights is a key-for-key copy; only HF's Conv1D layers store their
weight transposed (see `minigpt/hf.py`). This file knows nothing about files, training or sampling,
and uses stock PyTorch ops only: the CPU speed-ups for training are swapped in from beside it by
`minigpt/training_speed.py`, the decoding layouts by `minigpt/inference.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


def causal_mask(t_new: int, t_past: int, device: torch.device) -> torch.Tensor:
    """(t_new, t_past + t_new) boolean mask: new token i may attend to every position <= t_past + i."""
    return torch.ones(t_new, t_past + t_new, dtype=torch.bool, device=device).tril(diagonal=t_past)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends only to itself and the past."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.attn_impl = config.attn_impl
        # One matmul produces queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)  # on the attention probabilities
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). With `kv_cache`, x holds the tokens after the cached ones."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # Split the channels into heads: (B, T, C) -> (B, nh, T, hs).
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        t_past = 0
        if kv_cache is not None:
            t_past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, t_past + T, hs)

        y = self.attend(q, k, v, t_past)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_past: int) -> torch.Tensor:
        """Each new query's weighted mix of the values it may see, by `config.attn_impl`."""
        if self.attn_impl == "reference":
            return self.reference_attention(q, k, v, t_past)
        T = q.size(2)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if t_past == 0:  # a whole sequence: the fused kernels' built-in causal mask applies
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        # new tokens after cached ones: each sees all the past and its own prefix
        mask = None if T == 1 else causal_mask(T, t_past, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def reference_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_past: int
    ) -> torch.Tensor:
        """softmax(Q K^T / sqrt(hs) + causal mask) V, written out: the definition SDPA must equal."""
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, t_past + T)
        att = att.masked_fill(~causal_mask(T, t_past, q.device), float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back.

    GPT-2 uses the tanh approximation of GELU,
        gelu(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))),
    not the exact erf form; the two differ by up to ~5e-4, enough to break parity with the trained weights.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), each position on its own."""
        x = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(x))


class CrossEntropy(nn.Module):
    """Mean cross-entropy of (N, vocab) logits against (N,) next tokens; -100 marks ignored targets.

    Computed in fp32 whatever the logits' dtype, as HF computes it: a log-softmax over 50k entries
    in bf16 is off by ~0.3%. (A module rather than a call to F.cross_entropy, so that it can be
    swapped for a leaner one that computes the same numbers: minigpt/training_speed.py.)
    """

    ignore_index = -100

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over the targets that are not -100: a scalar, in fp32."""
        return F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: normalise, transform, add back to the residual stream."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C): the residual stream, with what attention and the MLP add to it."""
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of the positions seen so far, so decoding does not recompute them.

    Preallocated for `max_len` positions of `batch_size` sequences, in `dtype` (the model's: a bf16
    model needs torch.bfloat16): each step writes its new keys/values in place and attention reads
    the filled prefix, which avoids re-allocating (and copying) the cache per token. In one forward
    pass every layer stores the same positions, from `length` on; `GPT.forward` then advances
    `length` by the step's T, once, after the last layer (a caller driving blocks itself does too).
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len > config.block_size:
            raise ValueError(f"max_len {max_len} exceeds the context window {config.block_size}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"a KV cache holds at least one sequence of one position, got {batch_size} x {max_len}")
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hs)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0  # positions already stored (by every layer): GPT.forward advances it

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values for `layer`; return all keys/values so far."""
        cache = self.k[layer]
        # (a step of another batch would broadcast into the cache, or fail later in a torch error)
        if (k.size(0), k.dtype, k.device) != (cache.size(0), cache.dtype, cache.device):
            raise ValueError(f"KV cache made for batch {cache.size(0)}, {cache.dtype} on {cache.device}; this "
                             f"step is batch {k.size(0)}, {k.dtype} on {k.device}")
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class GPT(nn.Module):
    """GPT-2 language model: token ids in, next-token logits (and optionally the loss) out."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        # The read-out to vocabulary logits, x @ wte.T: its weight is wte's (tied, see below).
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.cross_entropy = CrossEntropy()
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share one matrix between reading tokens in (wte) and writing logits out (lm_head).

        Call again after replacing parameters (e.g. `load_state_dict(..., assign=True)`).
        """
        self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation, for training from scratch (loading weights overwrites it)."""
        if isinstance(module, nn.Linear):
            if module is not self.lm_head:  # the LM head is wte, initialised as an embedding
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (MLP, CausalSelfAttention)):
            # The projections back into the residual stream are scaled by 1/sqrt(2 * n_layer):
            # each block adds two of them, and the stream's variance should not grow with depth.
            # (`apply` visits children first, so this overrides the plain Linear init above.)
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self) -> int:
        """Distinct parameters (the tied LM head counted once). A model prepared for inference
        keeps its matmul weights in its layouts' buffers: `config.num_parameters()` counts them."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for `idx` (B, T), plus the loss when `targets` are given. There is no attention
        mask (as in nanoGPT): each row is one sequence from position 0. Rows of other lengths are
        padded on the right, with -100 targets there (left padding would shift every position).

        targets: (B, T) labels aligned with `idx` (usually `idx` itself); the model shifts them so
            position t is scored on predicting token t + 1, and -100 marks positions to ignore. The
            loss is the mean cross-entropy over the scored positions (NaN where none is: T = 1).
        kv_cache: keys/values of earlier positions; `idx` then continues after them.
        last_only: compute the LM head for the last position only (decoding needs nothing else, and
            the head is the single largest matmul); no loss then (targets, if given, still (B, T)).
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        # Transposed (T, B) targets would still flatten to B * T labels: the loss of the wrong pairs.
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        B, T = idx.shape
        t_past = kv_cache.length if kv_cache is not None else 0
        if t_past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {t_past + T} tokens exceeds the context window {self.config.block_size}"
            )
        pos = torch.arange(t_past, t_past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)

        if last_only:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, vocab)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits, None
        # Position t is scored on token t + 1; the last position has nothing to predict. Shifting
        # the targets (not the logits) avoids copying the (B, T - 1, vocab) slice of the logits.
        shifted = F.pad(targets[:, 1:], (0, 1), value=-100).long()
        return logits, self.cross_entropy(logits.view(B * T, -1), shifted.reshape(-1))
