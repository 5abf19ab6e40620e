"""Inference-time weight layouts: the same model, its matrices stored the way fast decoding reads them.

Decoding one sequence multiplies a single activation row by every weight matrix of the model, once
per token. That is bound by how fast the weights stream from memory, not by arithmetic, so the layout
and number format of the weights decide the speed. On the CPU, measured on distilgpt2's shapes:

  fp32   `F.linear` on one row reads an (out, in) matrix slower than `addmm` reads the same matrix
         stored transposed, (in, out); `TransposedLinear` keeps that copy (for the 50,257 x 768 LM
         head the difference is the largest).
  bf16   half the bytes, but bf16 `F.linear` is slow on CPUs without native bf16 matmul, while
         `torch.mv` on (out, in) bf16 weights is a fast matrix-vector kernel: `MatVecLinear`.
  int8   weight-only quantization with one scale per output channel, w ~= q * s with q in
         [-127, 127]: a quarter of fp32's bytes, multiplied by `torch._weight_int8pack_mm`, a
         kernel made for exactly this (it takes bf16 activations): `Int8Linear`.

`prepare_for_inference` swaps a loaded model's Linear layers (and the LM head, which shares its
matrix with the token embedding) for these, in place. `model.py` stays the readable definition and
knows nothing of this; the swapped model computes the same function up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinigptError
from .model import GPT

QUANTIZATIONS = ("int8",)
UPCAST_CHUNK = 2048  # output rows converted to fp32 at a time: a few MB, so the copy stays in cache
QUANTIZE_CHUNK = 4096  # rows quantized at a time, so quantizing the LM head needs no big temporaries


class TransposedLinear(nn.Module):
    """fp32 `y = x W^T + b`, with W stored as (in, out) so one activation row streams it in order."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous())  # (in, out)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        if self.bias is None:
            y = rows @ self.weight_t
        else:
            y = torch.addmm(self.bias, rows, self.weight_t)
        return y.view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of W (for the token embedding that shares the LM head's matrix)."""
        return self.weight_t[:, idx].movedim(0, -1)  # (in, *idx.shape) -> (*idx.shape, in)


class MatVecLinear(nn.Module):
    """bf16 `y = x W^T + b`, W stored (out, in): `torch.mv` for one row, fp32 matmuls for several.

    Several rows (a prompt, or a batch of samples) make the product compute-bound, where CPUs without
    bf16 instructions are slow; there each chunk of W is converted to fp32 on the fly instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        if rows.size(0) == 1:
            y = torch.mv(self.weight, rows[0]).unsqueeze(0)
            if self.bias is not None:
                y = y + self.bias
        else:
            fp32_rows = rows.float()
            y = torch.cat(
                [fp32_rows @ w.float().t() for w in self.weight.split(UPCAST_CHUNK)], dim=1
            )
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class Int8Linear(nn.Module):
    """Weight-only int8 `y = x W^T + b`: W ~= q * s, q int8 (out, in), one scale s per output channel.

    Each row of W is scaled so its largest |value| maps to 127. The scales are kept exactly as the
    bf16 numbers the kernel multiplies by, so rounding q is the only error. Activations enter the
    kernel in bf16 and the result returns in the caller's dtype, so the residual stream, LayerNorms
    and attention keep the model's precision.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 8:  # the kernel reads 8 inputs at a time
            raise MinigptError(
                f"--quantize int8: layer input width {in_features} is not a multiple of 8"
            )
        q = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
        scale = torch.empty(out_features, dtype=torch.bfloat16, device=weight.device)
        for rows in range(0, out_features, QUANTIZE_CHUNK):  # in chunks: no full-size temporaries
            w = weight[rows : rows + QUANTIZE_CHUNK].detach().float()
            s = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
            # rounding s to bf16 can push the largest |w| / s a hair past 127: clamp
            q[rows : rows + QUANTIZE_CHUNK] = (w / s.float().unsqueeze(1)).round_().clamp_(-127, 127)
            scale[rows : rows + QUANTIZE_CHUNK] = s
        self.register_buffer("qweight", q)  # (out, in)
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.qweight, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight[idx].float() * self.scale[idx].float().unsqueeze(-1)


class SharedEmbedding(nn.Module):
    """The token embedding, reading its rows from the LM head's matrix (GPT-2 ties the two), so the
    inference layout holds that largest matrix once."""

    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = head
        self.out_dtype = dtype  # the residual stream's dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.embed(idx).to(self.out_dtype)


def prepare_for_inference(model: GPT, quantize: str | None = None) -> GPT:
    """Swap `model`'s Linear layers and tied LM head for fast decoding layouts, in place; returns it.

    On the CPU the layout follows the model's dtype (fp32: `TransposedLinear`, bf16: `MatVecLinear`);
    `quantize="int8"` gives `Int8Linear` whatever the dtype. On a GPU only quantization changes
    anything: its matmul libraries handle the standard layout well. The model is for inference
    afterwards (no gradients, not savable as a checkpoint).
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MinigptError(f"--quantize: unknown scheme {quantize!r} (choose from {QUANTIZATIONS})")
    device = model.transformer.wpe.weight.device
    dtype = model.transformer.ln_f.weight.dtype
    if quantize == "int8":
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::_weight_int8pack_mm", device.type.upper()
        ):
            raise MinigptError(
                f"--quantize int8: this PyTorch build has no int8 weight-only kernel for "
                f"{device.type} (try --device cpu)"
            )
        layout = Int8Linear
    elif device.type != "cpu":
        return model
    elif dtype == torch.float32:
        layout = TransposedLinear
    elif dtype == torch.bfloat16:
        layout = MatVecLinear
    else:
        return model  # fp16 is refused on the CPU by runtime.setup_device

    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_fc", "c_proj"):
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, layout(linear.weight, linear.bias))
    head = layout(model.lm_head.weight, None)
    model.lm_head = head
    model.transformer.wte = SharedEmbedding(head, dtype)
    # The loader maps the safetensors file rather than copying it. The big matrices now have their
    # own copies; copying the few small tensors that still point into the file (LayerNorms, position
    # embeddings) lets the mapping go, so the old layout does not stay resident beside the new one.
    for p in model.parameters():
        p.data = p.data.clone()
    return model
