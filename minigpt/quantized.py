"""The int8 layouts that `minigpt.inference` chooses among for `--quantize int8`: W ~= q * s, q int8
with one scale s per output channel, read by `torch._weight_int8pack_mm` or in fp32 chunks
(`Int8Linear`), or multiplied in integers by FBGEMM (`FbgemmInt8Linear`). Like the layouts of
`minigpt/layouts.py` they compute `y = x W^T + b`, name their kernel in `kernel` and, as the tied LM
head, embed the tokens (`embed`).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn

from .errors import MinigptError
from .layouts import UPCAST_CHUNK, state_without
from .opaque import call_packed, opaque_product, register_opaque_product

QUANTIZE_CHUNK = 4096  # rows quantized at a time, so quantizing the LM head needs no big temporaries


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~= q * s: q int8 (out, in), one scale s per output channel (in `scale_dtype`, the numbers
    the kernel multiplies by), chosen so each row's largest |value| maps to 127."""
    out_features, in_features = weight.shape
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=scale_dtype, device=weight.device)
    for rows in range(0, out_features, QUANTIZE_CHUNK):  # in chunks: no full-size temporaries
        w = weight[rows : rows + QUANTIZE_CHUNK].detach().float()
        s = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(scale_dtype)
        # rounding s to bf16 can push the largest |w| / s a hair past 127: clamp
        q[rows : rows + QUANTIZE_CHUNK] = (w / s.float().unsqueeze(1)).round_().clamp_(-127, 127)
        scale[rows : rows + QUANTIZE_CHUNK] = s
    return q, scale


def dequantized_rows(q: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of W = q * s in fp32 (exact: an int8 times a bf16 or fp32 scale fits fp32)."""
    return q[idx].float() * scale[idx].float().unsqueeze(-1)


def int8mm_refuses(kernel: str, in_features: int) -> str | None:
    """Why `kernel` cannot compute a layer `in_features` wide, or None: int8mm takes only multiples of 16
    (torch 2.13's CPU kernel returns garbage for others); the other int8 kernels take any width."""
    bad = kernel == "int8mm" and in_features % 16
    return f"int8mm needs an input width that is a multiple of 16, not {in_features}" if bad else None


class Int8Linear(nn.Module):
    """Weight-only int8 `y = x W^T + b`: W ~= q * s, q int8 (out, in), one scale s per output channel.

    Each row of W is scaled so its largest |value| maps to 127. The scales are kept exactly as the
    bf16 numbers the kernel multiplies by, so rounding q is the only error. kernel "int8mm":
    `torch._weight_int8pack_mm`, activations in bf16; "upcast": chunks of q * s in fp32 (exact),
    fp32 matmuls. The result returns in the caller's dtype, the residual stream's.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "int8mm") -> None:
        super().__init__()
        self.kernel = kernel
        in_features = weight.size(1)
        if kernel == "int8mm" and in_features % 16:  # (`int8mm_refuses`)
            raise MinigptError(int8mm_refuses(kernel, in_features))
        q, scale = quantize_int8(weight, torch.bfloat16)
        self.register_buffer("qweight", q)  # (out, in)
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        if self.kernel == "upcast":
            fp32_rows = rows.float()
            y = torch.cat([
                fp32_rows @ (q.float() * s.float().unsqueeze(1)).t()
                for q, s in zip(self.qweight.split(UPCAST_CHUNK), self.scale.split(UPCAST_CHUNK))
            ], dim=1)
        else:
            y = self.core(self.core_input(x))  # bf16
        if self.bias is not None:
            y = torch.add(self.bias, y)  # in fp32: the sum and the conversion in one op
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def core_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8mm's input: the rows in bf16 (in a compiled graph this conversion fuses with the ops before)."""
        return x.reshape(-1, x.size(-1)).to(torch.bfloat16)

    def core(self, rows: torch.Tensor) -> torch.Tensor:
        """int8mm's product alone, (n, in) bf16 -> (n, out) bf16: what a compiled graph still runs as a call."""
        return torch._weight_int8pack_mm(rows, self.qweight, self.scale)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantized_rows(self.qweight, self.scale, idx)


class FbgemmInt8Linear(nn.Module):
    """int8 `y = x W^T + b` on integer dot products (FBGEMM's int8 GEMM), activations kept to 14 bits.

    Why: on a CPU without bf16 instructions (the AMD EPYC with AVX2 only), `_weight_int8pack_mm`
    converts every weight to a float before multiplying, about one weight per cycle per core, while
    FBGEMM multiplies 8-bit integers, 32 pairs an instruction: the 50,257 x 768 LM head for one row
    in 3.6 ms (FBGEMM's op alone 2.1-2.4 ms) against 6.6-7.8 ms there, and a decoding step with it
    where timing picks it 19-30% faster than with `_weight_int8pack_mm` everywhere.
    Integer products need integer activations, and rounding x to 8 bits costs a few % of the output
    when one channel is far larger than the rest, as in GPT-2's LayerNorm outputs. So each row is
    rounded to 14 bits, x ~= s * x_q with s = max|x| / 8127 and |x_q| <= 8127, and x_q is written as
    two digits, x_q = 128 * hi + lo with hi = round(x_q / 128) in [-63, 63] and lo in [-64, 64]: two
    integer rows that one pass over W multiplies, W x_q = 128 (W hi) + W lo (exact in int32). Small
    digits, not 8 bits: without VNNI instructions the kernel adds pairs of 8-bit products in 16
    bits, which 2 * 255 * 127 overflows and 2 * 128 * 127 does not.
    W is int8 with one scale per output channel, as for the other int8 kernels; the activation's
    rounding adds at most s / 2 per element. FBGEMM's packed W cannot be read by rows, so as the
    tied LM head (`keep_rows`) the layer also keeps q for the token embedding. (FBGEMM's weights are
    built through torch's quantized tensors, deprecated: when a torch release drops them, this
    candidate is simply unavailable.)
    """

    LEVELS = 8127  # the largest |x_q|: hi = round(x_q / 128) stays in [-63, 63]

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, keep_rows: bool, kernel: str = "fbgemm"
    ) -> None:
        super().__init__()
        self.kernel = kernel
        q, scale = quantize_int8(weight, torch.float32)
        self.register_buffer("qweight", q if keep_rows else None)  # (out, in)
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._pack(q)

    def _pack(self, q: torch.Tensor) -> None:
        """Pack the int8 W for FBGEMM (not a tensor: an attribute) and register its product."""
        with warnings.catch_warnings():  # the quantized tensor is only FBGEMM's input format
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            zero_points = torch.zeros_like(self.scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, self.scale.double(), zero_points, 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.product = self._digit_product(self.packed)
        self.key = register_opaque_product(self, self.product, len(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).float()
        n = rows.size(0)
        digits, step = self._digits(rows)
        w_digits = self.core(digits)  # (2n, out): s_W W hi, then s_W W lo
        y = torch.add(w_digits[n:], w_digits[:n], alpha=128)  # W x_q, (n, out)
        y = y.mul_(step) if self.bias is None else torch.addcmul(self.bias, y, step)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def int8_weight(self) -> torch.Tensor:
        """W's q (out, in), int8: read back from FBGEMM's packing (`qweight` is kept only with `keep_rows`)."""
        return self.packed.unpack()[0].int_repr()

    def __getstate__(self) -> dict:  # (W as plain int8: FBGEMM's packing is made again on load)
        return {**state_without(self, "packed", "product", "key"), "q": self.int8_weight()}

    def __setstate__(self, state: dict) -> None:
        q = state.pop("q")
        super().__setstate__(state)
        self._pack(q)

    def _digits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((2n, in) digits: hi, then lo (the kernel rounds lo), (n, 1) step s) of fp32 rows (n, in)."""
        largest = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True)  # max |x|, (n, 1)
        step = largest.clamp_(min=1e-30) / self.LEVELS  # s
        scaled = rows / step  # x / s: x_q before rounding, (n, in)
        hi = (scaled * (1 / 128)).round_()
        return torch.cat([hi, torch.add(scaled, hi, alpha=-128)]), step

    def core_input(self, x: torch.Tensor) -> torch.Tensor:
        """FBGEMM's input: the activation digits (in a compiled graph they fuse with the ops before)."""
        return self._digits(x.reshape(-1, x.size(-1)).float())[0]

    def core(self, digits: torch.Tensor) -> torch.Tensor:
        """FBGEMM's product alone: what a compiled graph still runs as a call (an opaque op there)."""
        return opaque_product(digits, self.key) if torch.compiler.is_compiling() else self.product(digits)

    @staticmethod
    def _digit_product(packed: object) -> Callable[[torch.Tensor], torch.Tensor]:
        # The kernel rounds each digit d, reads it as the 8-bit integer d + 64 (zero point 64), returns s_W W d.
        op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
        return lambda digits: call_packed(op, digits, 1.0, 64, packed)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantized_rows(self.qweight, self.scale, idx)
