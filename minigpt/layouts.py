"""The weight layouts that `minigpt.inference` chooses among: modules computing `y = x W^T + b`.

Each holds one Linear layer's weights in the form its kernel reads fastest (transposed, sliced per
thread, prepacked by MKL / oneDNN / FBGEMM; the int8 ones are in `minigpt/quantized.py`), and names
the kernel it runs in `kernel` (a layout with several kernels switches by that attribute). The LM
head's layout also has `embed`, which returns rows of W for the token embedding that GPT-2 ties to
it (`SharedEmbedding`); the fp32 layouts have `dense()`, W (out, in) and b as plain tensors, for a
compiled step that multiplies them itself (`compiled_decoding.FrozenGemm`). Why each exists, and
what it measured against the others, is in its docstring; which one a model gets is decided by
timing (`minigpt/inference.py`). Packed weights that Python cannot copy are left out of a pickle or
deep copy and packed again (`state_without`), so a prepared model copies whatever was chosen.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinigptError
from .opaque import call_packed

# Kernels whose layers a compiled graph traces through, keeping only `core` (the product) as a call:
# the ops around it fuse (`minigpt/compiled_decoding.py`); their layouts have `core_input` and `core`.
FUSIBLE_KERNELS = ("fbgemm", "int8mm")
UPCAST_CHUNK = 2048  # output rows converted to fp32 at a time: a few MB, so the copy stays in cache
FP16_MAX = 65504.0  # the largest finite fp16 number


def state_without(module: nn.Module, *names: str) -> dict:
    """`module`'s state to pickle (or deep-copy) without the attributes or buffers `names`: packed
    weights that Python cannot copy (MKL's and oneDNN's tensors have no storage; FBGEMM's product is
    a closure), which the layer's `__setstate__` packs again."""
    state = module.__dict__.copy()
    state["_buffers"] = {k: v for k, v in module._buffers.items() if k not in names}
    for name in names:
        state.pop(name, None)
    return state


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

    def __getstate__(self) -> dict:
        return state_without(self, "packed")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(self.weight, self.rows))

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
        self.rows = rows
        plain = weight.detach().to(torch.bfloat16).contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(plain, rows))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())
        self.register_buffer("rows_weight", plain if keep_rows else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def __getstate__(self) -> dict:
        return {**state_without(self, "packed"), "plain": self.packed.to_dense()}  # (W, unpacked)

    def __setstate__(self, state: dict) -> None:
        plain = state.pop("plain")
        super().__setstate__(state)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(plain, self.rows))

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
    """Why `Fp16Linear` cannot hold `weight` exactly enough (a weight beyond fp16's range, or NaN:
    FBGEMM's packing makes a NaN a number, +-21760 in an output measured, where every other kernel
    gives NaN logits, which decoding refuses as broken weights), or None."""
    largest = weight.detach().abs().max().item()
    if largest != largest:
        return "a weight is NaN, which FBGEMM's fp16 packing turns into a number (the weights are broken)"
    return f"a weight of {largest:.4g} is beyond fp16's range ({FP16_MAX:g})" if largest > FP16_MAX else None


class SharedEmbedding(nn.Module):
    """The token embedding, reading its rows from the LM head's matrix (GPT-2 ties the two), so the
    inference layout holds that largest matrix once."""

    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = head
        self.out_dtype = dtype  # the residual stream's dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.embed(idx).to(self.out_dtype)

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        """Refuse a move or cast of the prepared model (`.to(...)`, `.half()`), or `share_memory()`: its
        layers hold weights packed for the chosen kernels, which no cast converts (errors came later,
        deep in a kernel) and MKL's and oneDNN's have no storage to share.
        Refused before anything changes: this is the model's first module (`nn.Module._apply` visits
        children first, in order)."""
        tensors = [*self.head.parameters(), *self.head.buffers()]
        for dtype in {self.out_dtype, *(t.dtype for t in tensors)}:
            probe = torch.zeros((), dtype=dtype, device=tensors[0].device)
            if (moved := fn(probe)).dtype != dtype or moved.device != probe.device:
                raise MinigptError(f"this model is prepared for inference and cannot become {moved.dtype} on "
                                   f"{moved.device}: load it with the device and dtype wanted, then prepare it")
            if moved.is_shared():  # (share_memory(): MKL's and oneDNN's packed weights have no storage to share)
                raise MinigptError("a model prepared for inference cannot be shared with other processes: share "
                                   "the plain model, and prepare it in each process")
        return super()._apply(fn, recurse)


def refuse_loading(module: nn.Module, *hook_args: object) -> None:
    """A load_state_dict pre-hook on every part of a prepared model: its layers hold the weights packed
    for the chosen kernels, where a load does not reach (into FBGEMM's it reported success, and the
    model computed with old and new weights mixed). The model's own hook runs first: nothing changes."""
    raise MinigptError("this model is prepared for inference and cannot load weights into its packed layers: load "
                       "them into the plain model, then prepare it")


class OnThreads(nn.Module):
    """Another layout's layer, run on `threads` of the process's threads (fewer than all of them), or
    on all it has when called where that is fewer (a count lowered after the timing holds).

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
        if every <= self.threads:  # (the count lowered since the timing, torch.set_num_threads(1): never more)
            return self.layer(x)
        torch.set_num_threads(self.threads)
        try:
            return self.layer(x)
        finally:  # the rest of the model runs on all threads again, even after an error
            torch.set_num_threads(every)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.layer.embed(idx)

