"""AdamW and the linear learning-rate schedule, written out.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), for every parameter p with
gradient g, at step t = 1, 2, ... with learning rate lr:

    p   <- p * (1 - lr * weight_decay)              # decoupled weight decay: shrink p, not g
    m   <- beta1 * m + (1 - beta1) * g              # first moment: a running mean of g
    v   <- beta2 * v + (1 - beta2) * g * g          # second moment: a running mean of g^2
    m^  =  m / (1 - beta1^t)                        # bias correction: m and v start at 0, so
    v^  =  v / (1 - beta2^t)                        #   early averages are too small by this factor
    p   <- p - lr * m^ / (sqrt(v^) + eps)

`AdamW.step` computes exactly this (it agrees with `torch.optim.AdamW` to ~1e-7), with the two bias
corrections folded into scalars (see `_update`). As in torch, t counts each parameter's own updates: one
that first gets a gradient at the optimizer's third step is corrected with t = 1 there, not 3.

Speed. On the distilgpt2 shape the optimizer touches 82 M parameters and as many entries of g, m
and v; each line above is a full pass over them, bound by memory bandwidth, not arithmetic. So the
update makes as few passes as it can (7; torch.optim.AdamW makes 8), all in place, and allocates
nothing: the denominator goes to one preallocated scratch buffer, which is why tensors are cut into
buckets of at most `BUCKET` entries. Within a bucket, `torch._foreach_*` ops update many tensors per
call (biases and LayerNorm weights are tiny). Measured on the 2-core AVX2 EPYC (82 M parameters,
best of 6 interleaved steps, torch 2.14.1, 2026-12-05): 0.13 s a step against 0.27 s for
torch.optim.AdamW's default CPU implementation.

Fused. Written out, the update is still 7 passes over memory (on a GPU ~120 kernel launches and
~18 fp32 passes per parameter). So wherever the torch build has it (CUDA, and the CPU since torch
2.4), `AdamW` hands the tensors to `torch._fused_adamw_`, PyTorch's one-pass AdamW, which computes
the same formula from the same state (m, v and the step count); the written-out `_update` stays
the definition (`fused=False`), and the tests check the two agree. Measured with the figures
above: 0.04 s fused, against 0.13 s written out.

fp16. `torch.amp.GradScaler` skips a step whose gradients overflowed. For an ordinary optimizer it
decides on the host, reading its overflow flag back every step (a wait for the GPU). `AdamW` says
it can skip on the device instead (`_step_supports_amp_scaling`): the scaler then hands it the flag
as a tensor (`found_inf`), which the fused kernel reads itself, and the step count t stays on the
device too (a skipped step does not count, as in torch's own fused AdamW).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import torch
import torch.nn as nn

from .errors import MinigptError

# Entries per bucket: the scratch denominator holds one bucket (64 MiB in fp32). Each op on each
# slice is one parallel region (CPU threads fork and join) or kernel launch (GPU); measured on a
# shared 2-core CPU, cache-sized buckets (1 MiB) gained nothing when the machine was quiet and lost
# much when it was busy, since every region then waits for a preempted thread.
BUCKET = 1 << 24
HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed and a non-decayed group.

    The rule is generic: matrices and embeddings (dim >= 2) are decayed; biases and LayerNorm
    weights (dim < 2) are not, since shrinking an offset or a scale towards 0 is no regulariser.
    For GPT-2 these are exactly the groups Hugging Face's Trainer builds. Tied parameters (the LM
    head and the token embedding) appear once.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class AdamW:
    """AdamW over parameter groups, each with its own lr / betas / eps / weight_decay.

    params: as torch.optim's: an iterable of tensors or of (name, tensor) pairs (one group; e.g.
        `model.named_parameters()`), or of dicts {"params": those or one tensor, **hyper-parameters}
        whose missing hyper-parameters take the defaults given here. Each parameter appears once.
    fused: use `torch._fused_adamw_` (None: wherever the build has it for these parameters;
        True: the same, else an error; False: never, the written-out update).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        fused: bool | None = None,
    ) -> None:
        if isinstance(params, torch.Tensor):  # (list(t) would be its rows, views no gradient reaches)
            raise TypeError("AdamW: params must be an iterable of tensors or of dicts, not one tensor; pass [tensor]")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[dict[str, Any]] = []
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                what = "a dict without 'params'" if isinstance(group, dict) else f"a {type(group).__name__}"
                raise TypeError(f"AdamW: parameter group {i} is {what}; give every group as {{'params': [...], ...}}")
            group = {**defaults, **group, **_group_params(group["params"])}
            _check_hyper_parameters(group)
            self.param_groups.append(group)
        params = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in params}) < len(params):  # (a step would update such a parameter twice)
            i, j = next((i, j) for i, p in enumerate(params) for j in range(i) if params[j] is p)
            raise ValueError(
                f"AdamW: some parameters appear more than once, in one group or in several: parameter {i} (shape "
                f"{list(params[i].shape)}, counting through all groups) is parameter {j}; list each once (GPT-2's "
                "lm_head.weight is its transformer.wte.weight, tied: model.parameters() and param_groups hold it once)"
            )
        # The moments, one per parameter, allocated once (zeros, as the formula starts them).
        self.exp_avg = [[torch.zeros_like(p) for p in g["params"]] for g in self.param_groups]
        self.exp_avg_sq = [[torch.zeros_like(p) for p in g["params"]] for g in self.param_groups]
        if len({(p.device, p.dtype) for p in params}) > 1:
            raise ValueError("AdamW: all parameters must share one device and dtype")
        flat_params = [_flat(p.detach(), p) for p in params]
        for i, (p, flat) in enumerate(zip(params, flat_params)):  # both updates write p through it: a view
            if p.numel() and flat.data_ptr() != p.data_ptr():
                raise MinigptError(
                    f"AdamW: parameter {i} (shape {list(p.shape)}, strides {list(p.stride())}) has gaps or "
                    f"overlaps in memory (a slice or expand of a larger tensor), so it cannot be updated in "
                    f"place; give it memory of its own, e.g. nn.Parameter(t.clone())"
                )
        first = params[0] if params else torch.empty(0)
        has_fused = torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::_fused_adamw_", first.device.type.upper()
        ) and first.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if fused and not has_fused:
            raise MinigptError(f"AdamW: this PyTorch build has no fused AdamW for {first.device.type} {first.dtype}")
        self.fused = has_fused and fused is not False
        # t in the formula, one per parameter (the steps it had a gradient in), on the parameters' device: the
        # fused kernel reads them there, and a step that GradScaler skips leaves them without the host knowing
        self._steps = torch.zeros(len(params), dtype=torch.float32, device=first.device)
        self._step_of = dict(zip(params, self._steps.unbind()))  # (views: the kernel's per-tensor t)
        self._index = {p: i for i, p in enumerate(params)}
        scratch = 1 if self.fused else max(1, min(sum(p.numel() for p in params), BUCKET))
        self._scratch = first.new_empty(scratch)
        # The fused kernel needs no scratch, so no buckets: it takes whole tensors, flat in p's memory
        # order (on a transposed weight it ran ~2x slower, CPU), those of p, m and v made here once, so
        # a step flattens only the new gradients. Cutting all four into slices every step was ~900
        # small tensor ops of host time, the most of ours in the launch-bound 8 x 128 step on an H200
        # (torch.profiler: 304 permutes and 332 slices a step).
        ms, vs = (m for ms in self.exp_avg for m in ms), (v for vs in self.exp_avg_sq for v in vs)
        self._flats = {p: (flat, _flat(m, p), _flat(v, p)) for p, flat, m, v in zip(params, flat_params, ms, vs)
                       } if self.fused else {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients. None (the default) lets backward write fresh gradients instead of
        adding into zeroed ones: one pass over the parameters fewer."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    # torch.amp.GradScaler.step: set `found_inf` (and `grad_scale`, None once unscale_ ran) on this
    # optimizer and call step(), rather than read found_inf back to decide whether to call it
    _step_supports_amp_scaling = True

    @property
    def step_count(self) -> int:
        """t of the parameters updated most: the steps made so far (reading it waits for the device)."""
        return int(self._steps.max().item()) if self._steps.numel() else 0

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient. Under GradScaler, a step whose
        gradients overflowed (`self.found_inf` is 1) changes nothing, t included."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if not self.fused and found_inf is not None:  # the written-out update decides on the host
            if found_inf.item():
                return
            found_inf = None
        todos = [[(p, p.grad, m, v) for p, m, v in zip(group["params"], exp_avgs, exp_avg_sqs) if p.grad is not None]
                 for group, exp_avgs, exp_avg_sqs in zip(self.param_groups, self.exp_avg, self.exp_avg_sq)]
        for p, _, m, _ in (item for todo in todos for item in todo):  # (`p.data = ...` since: the moments no longer fit)
            if (p.shape, p.stride(), p.dtype, p.device) != (m.shape, m.stride(), m.dtype, m.device):
                raise MinigptError(f"AdamW: parameter {self._index[p]} is now {list(p.shape)}, strides "
                                   f"{list(p.stride())}, {p.dtype} on {p.device}, not the {list(m.shape)}, "
                                   f"{list(m.stride())}, {m.dtype} on {m.device} its moments were made for; make a "
                                   "new optimizer after changing a parameter (model.to(...) after AdamW(...))")
        counted = [self._index[p] for todo in todos for p, *_ in todo]
        increment = 1 if found_inf is None else 1 - found_inf
        if len(counted) == len(self._steps):  # (every parameter has a gradient: the usual step)
            self._steps += increment
        elif counted:
            self._steps[torch.tensor(counted, device=self._steps.device)] += increment
        ts = None if self.fused else self._steps.tolist()  # the written-out update needs t on the host
        for group, todo in zip(self.param_groups, todos):
            if self.fused and todo:  # one call, on the flat views made in __init__ and the new gradients
                params, ms, vs = ([self._fused_views(p)[i] for p, *_ in todo] for i in range(3))
                grads = [_flat(g, p) for p, g, _, _ in todo]
                steps = [self._step_of[p] for p, *_ in todo]
                self._update(group, params, grads, ms, vs, steps=steps, grad_scale=grad_scale, found_inf=found_inf)
            elif todo:
                for t in dict.fromkeys(ts[self._index[p]] for p, *_ in todo):  # (one t, unless some skipped steps)
                    same_t = [item for item in todo if ts[self._index[item[0]]] == t]
                    for bucket in _buckets(same_t, BUCKET):
                        self._update(group, *bucket, t=int(t), grad_scale=grad_scale, found_inf=found_inf)

    def _fused_views(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p, m and v flat, for the fused kernel: the views made in __init__, p's made again where `p.data` was
        assigned since (the kernel wrote the old memory, and the parameter stopped changing)."""
        flat, m, v = self._flats[p]
        if flat.data_ptr() != p.data_ptr():
            flat = _flat(p.detach(), p)
            if p.numel() and flat.data_ptr() != p.data_ptr():
                raise MinigptError(f"AdamW: parameter {self._index[p]} was given memory with gaps or overlaps "
                                   f"(p.data = a slice); give it memory of its own")
            self._flats[p] = flat, m, v
        return flat, m, v

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        t: int | None = None,
        steps: list[torch.Tensor] | None = None,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """The formula of the module docstring on one bucket of (slices of) tensors, in place.
        t: the bucket's step (the fused kernel reads each tensor's from the device instead, `steps`);
        grad_scale: the gradients are still multiplied by it (GradScaler without unscale_)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if self.fused:  # the same formula, one kernel (see the module docstring)
            torch._fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, [], steps,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                grad_scale=grad_scale, found_inf=found_inf,
            )
            return
        if grad_scale is not None:
            grads = torch._foreach_div(grads, grad_scale)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1 - beta1)(g - m)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        # lr * m^ / (sqrt(v^) + eps) = lr * c / (1 - beta1^t) * m / (sqrt(v) + eps * c), where
        # c = sqrt(1 - beta2^t): the bias corrections fold into two scalars, saving a pass over v.
        c = math.sqrt(1 - beta2**t)
        denom = _views(self._scratch, exp_avg_sqs)
        for v, d in zip(exp_avg_sqs, denom):
            torch.sqrt(v, out=d)
        torch._foreach_add_(denom, eps * c)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr * c / (1 - beta1**t))

    # --- checkpoints: tensors (for safetensors) and plain numbers (for JSON) kept apart ------

    def state_dict(self) -> dict[str, Any]:
        """{"step", "param_groups" (hyper-parameters only), "exp_avg", "exp_avg_sq"}; the moments are
        lists of tensors in parameter order (group by group), "step" each one's t (one number where all agree)."""
        steps = [int(t) for t in self._steps.tolist()]
        return {
            "step": steps[0] if len(set(steps)) == 1 else steps,  # (one number, unless some parameters skipped steps)
            "param_groups": [
                {k: list(g[k]) if k == "betas" else g[k] for k in HYPER_PARAMETERS}
                for g in self.param_groups
            ],
            "exp_avg": [m for ms in self.exp_avg for m in ms],
            "exp_avg_sq": [v for vs in self.exp_avg_sq for v in vs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`: the moments are copied into this optimizer's own tensors."""
        if len(state["param_groups"]) != len(self.param_groups):
            raise MinigptError(
                f"optimizer state: {len(state['param_groups'])} parameter groups, expected "
                f"{len(self.param_groups)}"
            )
        ours = [(m, v) for ms, vs in zip(self.exp_avg, self.exp_avg_sq) for m, v in zip(ms, vs)]
        if len(state["exp_avg"]) != len(ours) or len(state["exp_avg_sq"]) != len(ours):
            raise MinigptError(f"optimizer state: moments for {len(state['exp_avg'])} tensors, expected {len(ours)}")
        for i, ((m, v), m_saved, v_saved) in enumerate(zip(ours, state["exp_avg"], state["exp_avg_sq"])):
            if m_saved.shape != m.shape or v_saved.shape != v.shape:
                raise MinigptError(
                    f"optimizer state: moment {i} has shape {list(m_saved.shape)}, expected {list(m.shape)}"
                )
            m.copy_(m_saved)
            v.copy_(v_saved)
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update({k: saved[k] for k in HYPER_PARAMETERS})
            _check_hyper_parameters(group)  # (a hand-edited state's negative eps is refused, not trained with)
        steps = state["step"]
        if isinstance(steps, list) and len(steps) != len(self._steps):
            raise MinigptError(f"optimizer state: steps for {len(steps)} tensors, expected {len(self._steps)}")
        self._steps.copy_(torch.tensor(steps, dtype=torch.float32).expand(self._steps.shape))


def _group_params(params: torch.Tensor | Iterable[torch.Tensor | tuple[str, torch.Tensor]]) -> dict[str, list]:
    """A group's "params" as torch.optim takes them: one tensor, or tensors, or (name, tensor) pairs
    in a fixed order (not a set). Returns {"params": tensors}, with {"param_names": names} for pairs."""
    if isinstance(params, set):  # (its order changes from run to run: a resume would swap the moments)
        raise TypeError("AdamW: parameters in a set have no fixed order; give them as a list")
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    named = [isinstance(item, tuple) for item in items]
    if any(named) and not all(named):
        raise ValueError("AdamW: give every parameter of a group a name, as (name, tensor), or none")
    tensors = [item[1] if is_named else item for item, is_named in zip(items, named)]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"AdamW: parameter {i} is a {type(t).__name__}; give tensors, (name, tensor) pairs or "
                            "{'params': ...} dicts")
    return {"params": tensors, **({"param_names": [item[0] for item in items]} if items and all(named) else {})}


def _check_hyper_parameters(group: dict[str, Any]) -> None:
    """Refuse a value AdamW's formula breaks on, in one line; makes `betas` a tuple of floats."""
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in betas)):
        raise TypeError(f"optimizer: betas must be a pair of numbers (beta1, beta2), e.g. (0.9, 0.999), got {betas!r}")
    beta1, beta2 = group["betas"] = (float(betas[0]), float(betas[1]))
    if not group["lr"] >= 0:
        raise MinigptError(f"optimizer: lr must be >= 0, got {group['lr']}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise MinigptError(f"optimizer: betas must be in [0, 1), got {group['betas']}")
    if not group["eps"] > 0:
        raise MinigptError(f"optimizer: eps must be > 0, got {group['eps']}")
    if not group["weight_decay"] >= 0:
        raise MinigptError(f"optimizer: weight_decay must be >= 0, got {group['weight_decay']}")


def _buckets(
    todo: list[tuple[torch.Tensor, ...]], limit: int
) -> Iterable[list[list[torch.Tensor]]]:
    """Cut (p, g, m, v) tensors into flat slices of at most `limit` entries and group the slices
    into buckets of at most `limit` entries; yields [ps, gs, ms, vs] per bucket."""
    bucket: list[list[torch.Tensor]] = [[], [], [], []]
    size = 0
    for tensors in todo:
        flat = [_flat(t, tensors[0]) for t in tensors]
        for start in range(0, flat[0].numel(), limit):
            n = min(limit, flat[0].numel() - start)
            if size + n > limit and size:
                yield bucket
                bucket, size = [[], [], [], []], 0
            for out, t in zip(bucket, flat):
                out.append(t[start : start + n])
            size += n
    if size:
        yield bucket


def _flat(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`t` as one dimension, in the memory order of `param` (which may be a transposed view, one a
    caller assigned from `W.t()`, say: minigpt's loaders make every weight contiguous). The
    elementwise update does not care about the order as long as p, g, m and v share it: p, m and v
    have the same strides, so their flat forms are views; a gradient with other strides is copied,
    which is fine as it is only read."""
    order = sorted(range(param.dim()), key=lambda d: -param.stride(d))
    return t.permute(order).reshape(-1)


def _views(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of `buffer` shaped like `like` (whose sizes sum to at most its length)."""
    views, start = [], 0
    for t in like:
        views.append(buffer[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return views


def linear_schedule(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The learning-rate multiplier for optimizer step `step` (0-based): a linear warm-up from 0 to 1
    over `warmup_steps`, then a linear decay to 0 at `total_steps`.

    The same numbers as `transformers.get_linear_schedule_with_warmup`: step k of a run uses
    base_lr * linear_schedule(k, ...), where the Trainer's LambdaLR has stepped k times.
    """
    # (a negative step would give a negative multiplier; a negative warm-up, a decay that starts below 1)
    for name, value in (("step", step), ("warmup_steps", warmup_steps)):
        if value < 0:
            raise MinigptError(f"linear_schedule: {name} must be >= 0, got {value}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so that their global L2 norm is at most `max_norm` (0: leave
    them); returns the norm before clipping. The same arithmetic as `torch.nn.utils.clip_grad_norm_`:

        norm = || (||g_1||, ||g_2||, ...) ||        coef = min(1, max_norm / (norm + 1e-6))
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:  # (a zero on the parameters' device: the loop stacks it with the losses there)
        return torch.zeros((), device=params[0].device if params else None)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm
