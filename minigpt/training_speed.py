"""CPU training speed, applied from beside the model: the same function, computed faster.

`model.py` is the plain definition, in stock PyTorch ops. On the CPU, a few of those ops cost a
training step more than their arithmetic, and `prepare_for_training` swaps each for a leaner
module that computes the same numbers:

  dropout masks   `nn.Dropout` draws one random number per entry (`bernoulli_`, 7-9 ns an entry on
                  one core); `FastMaskDropout` reads 16 random bits an entry from 64-bit draws.
  the LM head     GPT-2's odd vocabulary (50,257) starts most rows of the (B, T, vocab) logits off a
                  64-byte boundary, and the CPU's matmul writes such rows slower; `PaddedRowsLMHead`
                  writes them into rows padded to 64 bytes (16 floats, 32 bf16).
  the loss        `F.cross_entropy`'s backward allocates two more (N, vocab) tensors (206 MB each
                  at 8 x 128 tokens); `InPlaceCrossEntropy` makes the gradient in place in the
                  log-probabilities it saved for the backward pass.
  and attention   with dropout, SDPA has no fused CPU kernel: it falls back to the written-out math
                  with torch's mask; `CPUTrainingAttention` runs the model's own written-out
                  reference path instead, with the fast mask.
  fresh memory    the head's logits, the loss's log-probabilities (206 MB each at 8 x 128 tokens),
                  the head's weight gradient and the token embedding's (154 MB each) are new
                  tensors every step, and glibc returns each freed block over 32 MB to the OS, so
                  every step page-faults them in again; the head, the loss and `WorkspaceEmbedding`
                  make them in a `Workspace`, memory they keep mapped and hand out again while no
                  tensor still uses it. Under bf16 autocast, so are the head's bf16 copy of its
                  weight (77 MB) and the logits' bf16 gradient (103 MB), and the head's bf16
                  weight gradient is cast to fp32 a block of rows at a time.

Measured at distilgpt2's shape, batch 8 x 128, fp32, torch 2.13.0: CPU seconds on one thread, the
median of 9 runs alternating stock and ours (an Intel Xeon with AVX-512 and AMX, shared with other
jobs), with the figures of the 2-core AMD EPYC development VM (two threads, torch.profiler) after:

  the 19 dropout masks of a step       0.14 s -> 0.085 s         (EPYC: 0.22 s -> 0.04 s)
  the LM head's forward                0.69 s -> 0.69 s, no gain (EPYC: 0.80-0.83 s -> 0.63 s)
  the loss, forward + backward         0.50 s -> 0.30 s, and two 206 MB tensors fewer
  an attention layer with dropout,     0.160 s -> 0.152 s
    forward + backward (x 6 layers)
  the whole forward + backward         5.10 s -> 4.53 s

The workspaces came later, measured as whole steps (forward, backward, clipping, AdamW) on the
2-core Intel Xeon VM (model 167), two models in one process taking turns, the medians of 12
steps, two runs: fp32 2.09 -> 1.91 s and 2.25 -> 2.04 s (1.09x, 1.11x), bf16 autocast
1.01 -> 0.96 s and 1.07 -> 1.00 s (1.05x, 1.07x). The LM head under bf16 autocast (padded bf16
rows, its weight's cast and its fp32 gradient in workspaces; before, autocast's stock linear) the
same way: 0.986 -> 0.885 s, 0.963 -> 0.867 s (1.11x, 1.11x); one cast of the whole bf16 weight
gradient instead of 2048 rows at a time: 1.09x. The token embedding's gradient in a workspace
(before, `embedding_dense_backward`'s fresh zeros): bf16 1.041x, 1.037x and 1.031x, fp32 1.022x
and 1.025x.

Each swapped module subclasses the stock module it replaces and adds no parameters or buffers (their
workspaces are memory, made on first use), so the swap changes the module's
class in place: its parameters, their names (the checkpoint keys) and the tied LM head stay exactly
as they were, and a swapped model saves and loads like a plain one. Each also falls
back to the stock op where the trick does not pay off or does not apply: under `torch.compile`
(whose kernels draw masks and fuse the loss well) and, for those that check the device, off the
CPU. `prepare_for_training` leaves a model that is not on the CPU
as it is, so GPUs run stock ops; prepare a model after moving it, not before.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .model import GPT, CausalSelfAttention, CrossEntropy

MASK_LEVELS = 2**16  # the values 16 random bits can take
PAD_BYTES = 64  # logits rows padded to a multiple of 64 bytes (16 floats, 32 bf16)
HEAD_GRAD_ROWS = 2048  # LM head weight-gradient rows made (then cast) at a time under autocast
LOG_SOFTMAX_ROWS = 32  # logits rows the loss turns into log-probabilities (or gradients) at a time: in cache


def _cpu_eager(x: torch.Tensor) -> bool:
    """Whether the CPU tricks apply: a CPU tensor, outside torch.compile's tracing."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


# An anonymous map is shared with a fork()ed child by default (MAP_SHARED): a child training on would
# write the parent's logits and gradients (a multiprocessing pool forked after a step). Private:
# each process's pages its own once written.
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}


class Workspace:
    """Memory that a step's largest tensors take again, step after step, while no tensor still
    uses it.

    A fresh (1024, 50,257) fp32 tensor costs more than the arithmetic that fills it: glibc hands
    every freed block over 32 MB back to the OS, so each new one is page-faulted in again. A
    workspace keeps its blocks mapped, one per name, and hands a block out again whenever it is
    free; when a tensor still uses it (the caller kept the last step's logits, or its gradient),
    it maps a new block and leaves the old one to that tensor. Whether a block is free is known
    exactly: it is handed out through a new memoryview that only the tensor's memory holds
    (`torch.frombuffer`'s storage), for as long as the tensor or any view, alias or saved copy of
    it is alive; the workspace keeps a weak reference to that memoryview, which dies with the last
    of them. Copies and pickles of a workspace start empty.
    """

    def __init__(self) -> None:
        # name -> (its block, a weak reference to the memoryview the block was last handed out through)
        self._blocks: dict[str, tuple[mmap.mmap, weakref.ref]] = {}
        self._lock = threading.Lock()  # (the check and the handing out are one step)

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` and `dtype` in block `name` (page-aligned);
        off the CPU, a plain `torch.empty`."""
        numel = math.prod(shape)
        if numel == 0 or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            block, lent = self._blocks.get(name, (None, None))
            if block is None or len(block) < numel * dtype.itemsize or lent() is not None:
                block = mmap.mmap(-1, numel * dtype.itemsize, **_PRIVATE)
            view = memoryview(block)
            self._blocks[name] = (block, weakref.ref(view))
            flat = torch.frombuffer(view, dtype=dtype, count=numel)
        # one tensor on the block's memory, not a view of `flat`: autograd adds a second gradient
        # into the first in place only where no other tensor shares its storage
        return torch.empty(0, dtype=dtype).set_(flat, 0, shape)

    def __reduce__(self) -> tuple:
        return (Workspace, ())


def _workspace(module: nn.Module) -> Workspace:
    """`module`'s Workspace, made on first use (a swapped module's class changed; no __init__ ran)."""
    if "workspace" not in module.__dict__:
        module.__dict__["workspace"] = Workspace()
    return module.__dict__["workspace"]


class FastMaskDropout(nn.Dropout):
    """Dropout whose CPU mask costs 16 random bits an entry instead of one random float.

    An entry is dropped when its 16 bits, read as a number in [0, 2^16), fall below p * 2^16, so
    one 64-bit draw from torch's generator masks 4 entries. p is thereby rounded to a multiple of
    2^-16 (0.1 -> 6554 / 65536 = 0.1000061) and the kept entries are scaled by 1 / (1 - rounded p):
    the output's expectation is still exactly the input. Masks come from torch's RNG, so a seeded
    run is reproducible. Off the CPU it is `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not _cpu_eager(x):
            return super().forward(x)
        dropped = self.dropped_levels()
        bits = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        # int16 is signed: the 16 bits read as a number in [-2^15, 2^15), so the threshold shifts too
        keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - MASK_LEVELS // 2
        return x.mul(keep).mul_(MASK_LEVELS / (MASK_LEVELS - dropped))

    def dropped_levels(self) -> int:
        """How many of the 2^16 values of a 16-bit draw drop an entry: p * 2^16, rounded."""
        return min(round(self.p * MASK_LEVELS), MASK_LEVELS - 1)

    def extra_repr(self) -> str:
        return f"p={self.p} (as {self.dropped_levels()}/{MASK_LEVELS}), 16-bit mask on the CPU"


class PaddedRowsLMHead(nn.Linear):
    """The LM head (x @ weight.T, no bias), writing its CPU output into rows padded to 64 bytes.

    With an unpadded (N, 50257) output most rows start off a 64-byte boundary, and the CPU's matmul
    writes those more slowly. The logits returned leave the padding out, so they are not contiguous
    (`InPlaceCrossEntropy` reads them as they are; `.view(N, -1)` fails, `.reshape` copies). They
    and the backward's weight gradient take turns in one block of the head's workspace: the logits
    are freed once the loss has read them, unless the caller keeps them. Under autocast it computes
    what autocast's linear does (x and the weight cast to bf16, bf16 products; the weight's gradient
    made in bf16, then cast to fp32), with the weight's cast in the workspace too. Off the CPU and
    under torch.compile it is `nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _cpu_eager(x):
            return super().forward(x)
        autocast = torch.is_autocast_enabled("cpu") and x.dtype != torch.float64  # (autocast leaves fp64 as it is)
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        return _PaddedRowsMatmul.apply(x, self.weight, dtype, _workspace(self))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows padded to {PAD_BYTES} bytes on the CPU"


class _PaddedRowsMatmul(torch.autograd.Function):
    """x @ weight.T in `dtype` into an output whose rows are padded to 64 bytes (see `PaddedRowsLMHead`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1)).to(dtype)  # (N, C)
        w = weight
        if weight.dtype != dtype:  # (autocast: the weight's cast, made again each step, as autocast's)
            w = workspace.empty("weight", tuple(weight.shape), dtype, weight.device).copy_(weight)
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.x_dtype, ctx.weight_dtype, ctx.workspace = x.shape, x.dtype, weight.dtype, workspace
        n_out, pad = weight.size(0), PAD_BYTES // dtype.itemsize
        padded = workspace.empty("out", (x2.size(0), (n_out + pad - 1) // pad * pad), dtype, x2.device)
        out = padded[:, :n_out]
        torch.mm(x2, w.t(), out=out)
        # returned as a tensor of its own on the block (not a view of `padded`): a caller may then edit
        # the logits in place, as nn.Linear's, where autograd refuses that on a Function's view output
        logits = out.view(*x.shape[:-1], n_out)
        return torch.empty(0, dtype=dtype).set_(padded.untyped_storage(), 0, logits.shape, logits.stride())

    @staticmethod
    @once_differentiable  # (its backward is no graph: a second derivative is refused, not wrong)
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x2, w = ctx.saved_tensors
        # (N, n_out), in the output's dtype; dense: autograd hands logits edited in place a gradient
        # with their padded rows, and oneDNN's bf16 matmul reads a row's padding too (NaN there: NaN out)
        grad2 = grad.contiguous().view(-1, grad.size(-1))
        grad_x = (grad2 @ w).to(ctx.x_dtype).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # in the logits' block, free by now unless the caller kept them
            grad_w = ctx.workspace.empty("out", tuple(w.shape), ctx.weight_dtype, x2.device)
            if w.dtype == ctx.weight_dtype:
                torch.mm(grad2.t(), x2, out=grad_w)
            else:  # a few thousand rows at a time, each cast to the weight's dtype while in cache
                for rows in range(0, w.size(0), HEAD_GRAD_ROWS):
                    grad_w[rows : rows + HEAD_GRAD_ROWS].copy_(grad2[:, rows : rows + HEAD_GRAD_ROWS].t() @ x2)
        return grad_x, grad_w, None, None


class InPlaceCrossEntropy(CrossEntropy):
    """Mean cross-entropy of (N, vocab) logits against (N,) targets: F.cross_entropy's numbers in
    less memory and time.

    Both keep log_softmax(logits) for the backward pass, but F.cross_entropy's backward then
    allocates two more (N, vocab) tensors (a zero-filled one for the picked entries, and the
    gradient). Here the backward computes the gradient,

        d loss / d logits = (softmax(logits) - onehot(target)) / n_scored,

    in place in the saved log-probabilities, which nothing else holds. (Fresh tensors that large
    are expensive on the CPU: glibc returns each freed block over 32 MB to the OS, so every new one
    is page-faulted in again. The log-probabilities, and a bf16 gradient, are made in the loss's
    workspace.) bf16 logits are not first copied whole to fp32, as `CrossEntropy`
    copies them: the log-softmax reads LOG_SOFTMAX_ROWS rows at a time, and the backward makes the
    gradient a block of rows at a time, its softmax, one-hot, scale and (bf16) cast done while the
    block is in cache: one pass over memory where whole-tensor ops made four. Measured on the Intel
    Xeon VM, bf16 logits of the recipe's 1024 x 50,257, loss and gradient: 200.5 ms against 265.8
    (the same numbers; fp32 129.6 against 134.0), with `exp_` for the softmax. That is now softmax's
    per-row kernel: `exp_` now and then gave other bits in a process's first step (torch 2.13: 4 of
    100 fresh processes, the per-row kernel 0 of 150), and a resumed run must end where an
    uninterrupted one does; 7 ms more in fp32, 15 in bf16, on another Xeon VM. Under torch.compile
    it is `CrossEntropy`. The backward runs once: a second one through the same loss (retain_graph)
    is refused by autograd, the saved log-probabilities being the gradient by then.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(logits, targets)
        return _CrossEntropy.apply(logits, targets, self.ignore_index, _workspace(self))


class _CrossEntropy(torch.autograd.Function):
    """The loss and its in-place gradient (see `InPlaceCrossEntropy`)."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, workspace: Workspace
    ) -> torch.Tensor:
        # fp32 even under autocast, as F.cross_entropy does: a softmax over 50k entries needs it.
        # A few rows at a time: whole, log_softmax would first copy padded or bf16 rows (to fp32); and
        # in blocks it measured faster on contiguous fp32 rows too (32 against 62 ms at 1024 x 50,257)
        logprobs = workspace.empty("logprobs", tuple(logits.shape), torch.float32, logits.device)  # (N, vocab)
        for rows, out in zip(logits.split(LOG_SOFTMAX_ROWS), logprobs.split(LOG_SOFTMAX_ROWS)):
            torch.log_softmax(rows, dim=-1, dtype=torch.float32, out=out)
        scored = targets != ignore_index
        safe = targets.masked_fill(~scored, 0)  # any valid index; those rows are zeroed
        picked = logprobs.gather(1, safe[:, None]).squeeze(1).masked_fill_(~scored, 0.0)
        n = scored.sum()
        ctx.save_for_backward(logprobs, safe, scored, n)
        ctx.logits_dtype, ctx.workspace = logits.dtype, workspace
        return -picked.sum() / n

    @staticmethod
    @once_differentiable  # (its backward is no graph: a second derivative is refused, not wrong)
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logprobs, safe, scored, n = ctx.saved_tensors
        # mean over the scored rows; ignored rows -> 0 (and all of them ignored: zeros, not NaN, as torch's)
        scale = (scored * (grad_loss / n.clamp(min=1)))[:, None]
        # (bf16 logits: the gradient in bf16, as autograd would convert it, each row block while in cache)
        grad = logprobs
        if ctx.logits_dtype != logprobs.dtype:
            grad = ctx.workspace.empty("grad", tuple(logprobs.shape), ctx.logits_dtype, logprobs.device)
        blocks = (t.split(LOG_SOFTMAX_ROWS) for t in (logprobs, grad, safe, scale))  # one pass over memory
        for block, out, target, block_scale in zip(*blocks):
            # softmax, in place (of log-probabilities: their exp), row by row: not exp_ (see the docstring)
            torch.softmax(block, dim=-1, out=block)
            block.scatter_add_(1, target[:, None], -torch.ones_like(block[:, :1]))  # - onehot(target)
            block.mul_(block_scale)
            if grad is not logprobs:
                out.copy_(block)
        return grad, None, None, None


class WorkspaceEmbedding(nn.Embedding):
    """The token embedding, its CPU weight gradient made in a workspace.

    The gradient of a lookup is dense, (vocab, C) for wte: zeros, with each looked-up row's
    gradient added into its token's row (`index_add_`, as torch's own backward does: the same
    numbers). torch makes the zeros fresh each step (154 MB at GPT-2's vocabulary); here they are
    the workspace's block, zeroed again. Autograd then adds the tied LM head's gradient into one of
    the two in place. With `padding_idx`, `max_norm`, `scale_grad_by_freq` or `sparse`, weights in
    bf16 or fp16 (torch sums those otherwise), off the CPU and under torch.compile it is `nn.Embedding`.
    """

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        stock = self.padding_idx is not None or self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        if stock or self.weight.dtype not in (torch.float32, torch.float64) or not _cpu_eager(self.weight):
            return super().forward(idx)
        return _EmbeddingLookup.apply(idx, self.weight, _workspace(self))


class _EmbeddingLookup(torch.autograd.Function):
    """weight[idx] and its dense weight gradient in a workspace (see `WorkspaceEmbedding`)."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.weight_shape, ctx.workspace = tuple(weight.shape), workspace
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable  # (its backward is no graph: a second derivative is refused, not wrong)
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (idx,) = ctx.saved_tensors
        grad_w = ctx.workspace.empty("grad", ctx.weight_shape, grad.dtype, grad.device).zero_()
        return None, grad_w.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.size(-1))), None


class CPUTrainingAttention(CausalSelfAttention):
    """Attention that, training with dropout on the CPU, runs the written-out reference path.

    No fused CPU kernel of SDPA supports dropout: SDPA then runs the same math itself, with torch's
    slower mask. The reference path uses the module's own `attn_dropout`, a `FastMaskDropout` once
    swapped. Without dropout (evaluation, or p = 0), off the CPU and under torch.compile, it is
    `CausalSelfAttention` as configured.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_past: int) -> torch.Tensor:
        if self.training and self.attn_dropout.p > 0 and _cpu_eager(q):
            return self.reference_attention(q, k, v, t_past)
        return super().attend(q, k, v, t_past)


# stock module type -> its CPU training counterpart (a subclass adding no state)
SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Dropout: FastMaskDropout,
    CausalSelfAttention: CPUTrainingAttention,
    CrossEntropy: InPlaceCrossEntropy,
}


def prepare_for_training(model: GPT) -> GPT:
    """Swap in the CPU training tricks above, in place, and return `model` (for a model on the CPU;
    on any other device it is returned as it is).

    The swapped model computes the same function: the same logits, loss and gradients (up to float
    rounding) in eval mode, and dropout with the same distribution in training mode. Its parameters
    and their names are untouched, so an optimizer may be built before or after.
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
    if type(model.lm_head) is nn.Linear:  # (not the other Linears: their widths are multiples of 16)
        model.lm_head.__class__ = PaddedRowsLMHead
    if type(model.transformer.wte) is nn.Embedding:  # (not wpe: 3 MB, its gradient no burden)
        model.transformer.wte.__class__ = WorkspaceEmbedding
    return model
