"""GPT-2, as a reader meets it.

The model is a stack of identical pre-LayerNorm Transformer blocks between a token + position
embedding and a final LayerNorm, read out by an LM head that shares its weight with the token
embedding:

    x = wte[idx] + wpe[pos]                       # (B, T, C)
    for block in h:  x = x + attn(ln_1(x))        # tokens exchange information
                     x = x + mlp(ln_2(x))         # each token thinks on its own
    logits = ln_f(x) @ wte.T                      # (B, T, vocab)

Module names mirror the Hugging Face checkpoint keys (`transformer.wte`, `transformer.h.0.attn.c_attn`,
`mlp.c_fc`, ...), so converting weights is a key-for-key copy; only HF's Conv1D layers store their
weight transposed (see `minigpt/hf.py`). This file knows nothing about files, training or sampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


class KVCache:
    """Keys and values of the positions seen so far, so decoding does not recompute them.

    Preallocated for `max_len` positions: each step writes its new keys/values in place and
    attention reads the filled prefix, which avoids re-allocating (and copying) the cache per token.
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
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hs)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0  # number of positions already stored

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values for `layer`; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Dropout(nn.Module):
    """Zero each entry with probability p and scale the rest by 1 / (1 - p) (identity in eval mode).

    The same as nn.Dropout, with a cheaper random mask on the CPU. torch draws one random number per
    entry there (bernoulli_, ~9 ns an entry on one core: ~0.2 s of a distilgpt2 training step); 16
    random bits an entry are plenty, so here one 64-bit draw masks 4 entries: an entry is dropped when
    its 16 bits, read as a number in [0, 2^16), fall below p * 2^16. p is thereby rounded to a multiple
    of 2^-16 (0.1 -> 0.1000061) and the kept entries are scaled by the rounded keep probability, so the
    output's expectation is still exactly the input. On GPUs and under torch.compile, whose kernels
    draw masks fast, this is F.dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        dropped = min(round(self.p * 2**16), 2**16 - 1)  # of the 2^16 values 16 random bits can take
        bits = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 2**15  # (int16 is signed)
        return x.mul(keep).mul_(2**16 / (2**16 - dropped))

    def extra_repr(self) -> str:
        return f"p={self.p}"


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
        self.attn_dropout = Dropout(config.dropout)  # on the attention probabilities
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
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

        dropout_p = self.attn_dropout.p if self.training else 0.0
        # On the CPU no fused kernel supports dropout: SDPA would fall back to the reference math
        # itself, with torch's slower dropout mask.
        if self.attn_impl == "sdpa" and not (dropout_p > 0 and x.device.type == "cpu"):
            if t_past == 0:  # a whole sequence: the fused kernels' built-in causal mask applies
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
            else:  # new tokens after cached ones: each sees all the past and its own prefix
                mask = None if T == 1 else causal_mask(T, t_past, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y = self._reference_attention(q, k, v, t_past)  # (B, nh, T, hs)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def _reference_attention(
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
    not the exact erf form; the two differ by ~1e-3, enough to break parity with the trained weights.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(x))


class LMHead(nn.Linear):
    """The read-out to vocabulary logits: x @ weight.T with no bias (the weight is wte's, tied).

    An nn.Linear, except for where it writes its output on the CPU: rows padded to a multiple of 16
    entries (64 bytes). With GPT-2's odd vocabulary of 50,257 an unpadded (B, T, 50257) output starts
    most rows off a 64-byte boundary, and the CPU's matmul writes such rows ~30% slower (measured on 2
    cores for 8 x 128 tokens: 0.84 s unpadded, 0.60 s padded; the head is the model's largest
    matmul). The logits returned are a view that leaves the padding out, so they are not contiguous.
    """

    def __init__(self, n_embd: int, vocab_size: int) -> None:
        super().__init__(n_embd, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return super().forward(x)
        return _PaddedRowsMatmul.apply(x, self.weight)


class _PaddedRowsMatmul(torch.autograd.Function):
    """x @ weight.T into an output whose rows are padded to 16 entries (see `LMHead`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.size(-1))  # (N, C)
        n_out = weight.size(0)
        padded = x2.new_empty(x2.size(0), (n_out + 15) // 16 * 16)  # (N, n_out rounded up)
        out = padded[:, :n_out]
        torch.mm(x2, weight.t(), out=out)
        return out.view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.size(-1))  # (N, n_out)
        grad_x = (grad2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad2.t() @ x.reshape(-1, x.size(-1)) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: normalise, transform, add back to the residual stream."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2 language model: token ids in, next-token logits (and optionally the loss) out."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = LMHead(config.n_embd, config.vocab_size)
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
        """Distinct parameters (the tied LM head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for `idx` (B, T), plus the loss when `targets` are given.

        targets: labels aligned with `idx` (usually `idx` itself); the model shifts them so position
            t is scored on predicting token t + 1, and -100 marks positions to ignore. The loss is
            the mean cross-entropy over the scored positions (see `next_token_loss`).
        kv_cache: keys/values of earlier positions; `idx` then continues after them.
        last_only: compute the LM head for the last position only (decoding needs nothing else, and
            the head is the single largest matmul).
        """
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
        shifted = F.pad(targets[:, 1:], (0, 1), value=-100)
        return logits, next_token_loss(logits.view(B * T, -1), shifted.reshape(-1))


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, vocab) logits against (N,) targets, -100 ignored.

    The same numbers as F.cross_entropy, in less memory and time: for 8 x 128 tokens over GPT-2's
    vocabulary every (N, vocab) tensor is 206 MB. Both keep log_softmax(logits) for the backward
    pass, but F.cross_entropy's backward then allocates two more such tensors (a zero-filled one
    for the picked entries, and the gradient). Here the backward computes the gradient,

        d loss / d logits = (softmax(logits) - onehot(target)) / n_scored,

    in place in the saved log-probabilities, which nothing else holds.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # fp32 even under autocast, as F.cross_entropy does: a softmax over 50k entries needs it
        if logits.is_contiguous():
            logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, vocab)
        else:  # padded rows (see LMHead): log_softmax would first copy them whole; 32 rows at a
            # time, each copy is small enough to stay in cache
            logprobs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            for rows, out in zip(logits.split(32), logprobs.split(32)):
                torch.log_softmax(rows, dim=-1, dtype=torch.float32, out=out)
        scored = targets != -100
        safe = targets.masked_fill(~scored, 0)  # any valid index; those rows are zeroed
        picked = logprobs.gather(1, safe[:, None]).squeeze(1).masked_fill_(~scored, 0.0)
        n = scored.sum()
        ctx.save_for_backward(logprobs, safe, scored, n)
        ctx.logits_dtype = logits.dtype
        return -picked.sum() / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logprobs, safe, scored, n = ctx.saved_tensors
        grad = logprobs.exp_()  # softmax, in place
        grad.scatter_add_(1, safe[:, None], -torch.ones_like(grad[:, :1]))  # - onehot(target)
        grad.mul_((scored * (grad_loss / n))[:, None])  # mean over scored rows; ignored rows -> 0
        return grad.to(ctx.logits_dtype), None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits, targets, ignore_index=-100), in less memory (see `_CrossEntropy`)."""
    return _CrossEntropy.apply(logits, targets)
