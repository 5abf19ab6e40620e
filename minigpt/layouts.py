"""The weight layouts that `minigpt.inference` chooses among: modules computing `y = x W^T + b`.

Each holds one Linear layer's weights in the form its kernel reads fastest (transposed, sliced per
thread, prepacked by MKL / oneDNN / FBGEMM, int8), and names the kernel it runs in `kernel` (a
layout with several kernels switches by that attribute). The LM head's layout also has `embed`,
which returns rows of W for the token embedding that GPT-2 ties to it; the fp32 layouts have
`dense()`, W (out, in) and b as plain tensors, for a compiled step that multiplies them itself
(`compiled_decoding.FrozenGemm`). Why each exists, and what it measured against the others, is in
its docstring; which one a model gets is decided by timing (`minigpt/inference.py`).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinigptError
from .opaque import call_packed, opaque_product, register_opaque_product

# Kernels whose layers a compiled graph traces through, keeping only `core` (the product) as a call:
# the ops around it fuse (`minigpt/compiled_decoding.py`); their layouts have `core_input` and `core`.
FUSIBLE_KERNELS = ("fbgemm", "int8mm")
UPCAST_CHUNK = 2048  # output rows converted to fp32 at a time: a few MB, so the copy stays in cache
FP16_MAX = 65504.0  # the largest finite fp16 number
QUANTIZE_CHUNK = 4096  # rows quantized at a time, so quantizing the LM head needs no big temporaries


class TransposedLinear(nn.Module):
    """fp32 `y = x W^T + b`, with W stored as (in, out) so one activation row streams it in order."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "addmm-t") -> None:
        super().__init__()
        self.kernel = kernel
        self.register_buffer("weight_t", weight.detach().float().t().contiguous())  # (in, out)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        y = rows @ self.weight_t if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        return y.view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of W (for the token embedding that shares the LM head's matrix)."""
        return self.weight_t[:, idx].movedim(0, -1)  # (in, *idx.shape) -> (*idx.shape, in)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight_t.t(), self.bias  # (a view)


class SplitLinear(nn.Module):
    """fp32 `y = x W^T + b` with W's output columns cut into `parts` slices, stored (parts, in, out /
    parts) and multiplied by one batched matmul.

    Why: for a single activation row, MKL computes `x W^T` as one matrix-vector product on one
    thread, however many the process has, so one core streams all of W. `torch.bmm` gives the
    slices to the threads, and every core streams its share. Measured on the AMD EPYC with AVX2
    (2 threads), the 50,257 x 768 LM head for one row: `addmm` on W^T 9.4 ms, split in two 6.1 ms;
    the 24 block layers of distilgpt2 12.2 -> 10.6 ms. W is padded with zero columns to a multiple
    of `parts`; the padding is cut off the result.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: int, kernel: str = "bmm-split") -> None:
        super().__init__()
        self.kernel = kernel
        out_features, in_features = weight.shape
        self.out_features = out_features
        width = -(-out_features // parts)  # columns per slice
        weight_parts = weight.new_zeros(parts, in_features, width, dtype=torch.float32)
        for i, rows in enumerate(weight.detach().split(width)):  # slice by slice: no full-size temporary
            weight_parts[i, :, : rows.size(0)] = rows.t()
        self.register_buffer("weight_parts", weight_parts)  # (parts, in, width)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        parts = self.weight_parts.size(0)
        y = torch.bmm(rows.expand(parts, -1, -1), self.weight_parts)  # (parts, rows, width)
        y = y.transpose(0, 1).reshape(rows.size(0), -1)[:, : self.out_features]  # (rows, out)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        width = self.weight_parts.size(2)
        return self.weight_parts[idx // width, :, idx % width]  # (*idx.shape, in)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight_t = self.weight_parts.transpose(0, 1).reshape(self.weight_parts.size(1), -1)  # (in, out padded)
        return weight_t[:, : self.out_features].t().contiguous(), self.bias  # (a copy)


class RowSplitLinear(nn.Module):
    """`y = x W^T + b` with W (in `dtype`) cut into `parts` blocks of output rows, stored (parts,
    out / parts, in) and multiplied by one batched matmul with the activations as columns: each
    output is the dot product of one contiguous row of W with x, and each thread takes a block.

    Why, beside `SplitLinear`'s column slices: which of the two reads W faster depends on its shape.
    Measured in fp32 on the AMD EPYC with AVX2 (2 threads, 12 distinct layers streamed in turn, one
    row): 768 x 768 in 2.5 ms against 3.5 for column slices and `addmm` on W^T, 3.8 for `F.linear`;
    768 x 3072 (the MLP's projection back) 9.4 ms against 14.4, 16.8 and 12.0; for the wide layers
    (2304 or 3072 x 768, the LM head) column slices are as fast or faster. Decoding distilgpt2 with
    both projections on this layout: 43.1 tokens/s against 37.7 (medians of 7, one process). In
    bf16, torch hands the batched matmul to oneDNN where the CPU has bf16 instructions. The bias is
    added by the same call (`baddbmm`); W is padded with zero rows to a multiple of `parts`.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, parts: int, dtype: torch.dtype = torch.float32,
        kernel: str = "bmm-rows",
    ) -> None:
        super().__init__()
        self.kernel = kernel
        out_features, in_features = weight.shape
        self.out_features = out_features
        height = -(-out_features // parts)  # rows per block
        weight_rows = weight.new_zeros(parts * height, in_features, dtype=dtype)
        weight_rows[:out_features] = weight.detach()
        self.register_buffer("weight_rows", weight_rows.view(parts, height, in_features))
        bias_rows = None
        if bias is not None:
            bias_rows = weight.new_zeros(parts * height, 1, dtype=dtype)
            bias_rows[:out_features, 0] = bias.detach()
            bias_rows = bias_rows.view(parts, height, 1)
        self.register_buffer("bias_rows", bias_rows)  # (parts, height, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = x.reshape(-1, x.size(-1)).to(self.weight_rows.dtype).t()  # (in, rows)
        columns = columns.expand(self.weight_rows.size(0), -1, -1)  # (parts, in, rows), no copy
        if self.bias_rows is None:
            y = torch.bmm(self.weight_rows, columns)  # (parts, height, rows)
        else:
            y = torch.baddbmm(self.bias_rows, self.weight_rows, columns)
        y = y.view(-1, y.size(2))[: self.out_features].t()  # (rows, out)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_rows.view(-1, self.weight_rows.size(2)))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.weight_rows.view(-1, self.weight_rows.size(2))[: self.out_features]  # (views)
        return weight, None if self.bias_rows is None else self.bias_rows.view(-1)[: self.out_features]


class DenseLinear(nn.Module):
    """`y = x W^T + b` with W (out, in) in `dtype`, by kernel "linear" (`F.linear`) or "mv-upcast"
    (`torch.mv` for one row, fp32 matmuls on chunks of W converted on the fly for several)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, kernel: str) -> None:
        super().__init__()
        self.kernel = kernel
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).to(self.weight.dtype)
        if self.kernel == "mv-upcast" and rows.size(0) == 1:
            y = torch.mv(self.weight, rows[0]).unsqueeze(0)
            y = y if self.bias is None else y + self.bias
        elif self.kernel == "mv-upcast":
            fp32_rows = rows.float()
            y = torch.cat([fp32_rows @ w.float().t() for w in self.weight.split(UPCAST_CHUNK)], dim=1)
            y = y if self.bias is None else y + self.bias.float()
        else:
            y = F.linear(rows, self.weight, self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias


class MklLinear(nn.Module):
    """fp32 `y = x W^T + b` through MKL's prepacked GEMM. The packed copy is made for `rows` rows a
    call; MKL's op falls back to `F.linear` on the plain W (which it therefore also keeps) for other
    row counts, such as a prompt."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, kernel: str = "mkl") -> None:
        super().__init__()
        self.kernel = kernel
        self.rows = rows
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).float()
        y = torch.ops.mkl._mkl_linear(rows, self.packed, self.weight, self.bias, self.rows)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias


class OneDnnLinear(nn.Module):
    """bf16 `y = x W^T + b` through oneDNN with W reordered once into its preferred blocked layout
    (for `rows` rows a call; any row count works). The packed W cannot be read by rows, so as the
    tied LM head (`keep_rows`) it also keeps the plain bf16 W for the token embedding."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, keep_rows: bool, kernel: str = "onednn"
    ) -> None:
        super().__init__()
        self.kernel = kernel
        plain = weight.detach().to(torch.bfloat16).contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(plain, rows))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())
        self.register_buffer("rows_weight", plain if keep_rows else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.rows_weight)


class Fp16Linear(nn.Module):
    """bf16 `y = x W^T + b` through FBGEMM's half-precision GEMM: W held as fp16, prepacked, the
    activations and the sums in fp32.

    Why a bf16 model may use fp16 weights: a bf16 number has 8 significant bits and fp16 has 11, so
    every bf16 weight in fp16's normal range [2^-14, 65504] converts exactly; below it, fp16's
    subnormals keep it to within 2^-25 (1/4096 of a bf16 step of a weight near 0.02).
    Layers holding a weight beyond 65504 are refused (`fp16_refuses`). Why FBGEMM: the weights stream
    at the memory's speed for one activation row. Measured on the AMD EPYC with AVX-512 BF16 (2
    threads, distinct layers streamed in turn, one row): 21-29 GB/s against oneDNN's bf16 15-23 GB/s,
    the LM head 3.0 ms against 4.4; with 8 rows oneDNN is about as fast layer by layer (the timing
    decides; decoding at 8 rows with this kernel everywhere was 9% faster than with oneDNN's).
    FBGEMM's packed W cannot be read by rows, so as the tied LM head (`keep_rows`) the layer also
    keeps the plain bf16 W for the token embedding. Packing is slow, on one thread: ~0.6 s for the
    LM head, ~1 s for all of distilgpt2 (oneDNN's packing: ~0.15 s), paid once per `sample.py` run.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, keep_rows: bool, kernel: str = "fbgemm-fp16"
    ) -> None:
        super().__init__()
        self.kernel = kernel
        plain = weight.detach().to(torch.bfloat16)
        fp32_bias = None if bias is None else bias.detach().to(torch.bfloat16).float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(plain.float(), fp32_bias)  # (an attribute)
        self.register_buffer("rows_weight", plain.contiguous() if keep_rows else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = call_packed(torch.ops.quantized.linear_dynamic_fp16, x.float(), self.packed)
        return y.to(x.dtype)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.rows_weight)


def fp16_refuses(weight: torch.Tensor) -> str | None:
    """Why `Fp16Linear` cannot hold `weight` exactly enough (a weight beyond fp16's range), or None."""
    largest = weight.detach().abs().max().item()
    return None if largest <= FP16_MAX else f"a weight of {largest:.4g} is beyond fp16's range ({FP16_MAX:g})"


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
        if kernel == "int8mm" and in_features % 16:  # (torch 2.13's CPU kernel returns garbage)
            raise MinigptError(f"int8mm: layer input width {in_features} is not a multiple of 16")
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
        with warnings.catch_warnings():  # the quantized tensor is only FBGEMM's input format
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            zero_points = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)  # (not a tensor: an attribute)
        self.product = self._digit_product(self.packed)
        self.key = register_opaque_product(self, self.product, weight.size(0))
        self.register_buffer("qweight", q if keep_rows else None)  # (out, in)
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).float()
        n = rows.size(0)
        digits, step = self._digits(rows)
        w_digits = self.core(digits)  # (2n, out): s_W W hi, then s_W W lo
        y = torch.add(w_digits[n:], w_digits[:n], alpha=128)  # W x_q, (n, out)
        y = y.mul_(step) if self.bias is None else torch.addcmul(self.bias, y, step)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

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


class OnThreads(nn.Module):
    """Another layout's layer, run on `threads` of the process's threads (fewer than all of them).

    Why: each kernel call hands its work to every thread of torch's pool and waits for the last one;
    for a small layer on many cores that hand-off can cost more than the work it shares out, and a
    few threads may already draw all the memory bandwidth there is. `minigpt.inference` times each
    kernel on fewer threads too and wraps a layer in this only where that was >= 10% faster in two
    races in a row. On the 2-core AMD EPYC with AVX-512 BF16 one thread was slower for every
    distilgpt2 layer and kernel timed (one row, from memory: int8 `int8mm` 2304 x 768 330 against
    179 us, FBGEMM's int8 185 against 177, fp32 `bmm-rows` 345 against 243), so there nothing is
    wrapped. Where torch has more threads than the cores it may use (a container whose CPU quota
    torch does not see), it pays: torch set to 16 threads on those 2 cores, timing put most layers
    on one thread, and greedy decoding went from 65.4 to 74.0 tokens/s in int8 and from 72.0 to
    84.3 in bf16 (one process, medians of 6; fp32 kept all threads, 45.0 against 43.9; with 4
    threads, int8 83.5 against 83.7). Setting the count costs ~1.3 us a call.
    """

    def __init__(self, layer: nn.Module, threads: int) -> None:
        super().__init__()
        self.layer = layer
        self.threads = threads

    @property
    def kernel(self) -> str:
        return self.layer.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        every = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.layer(x)
        finally:  # the rest of the model runs on all threads again, even after an error
            torch.set_num_threads(every)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.layer.embed(idx)

