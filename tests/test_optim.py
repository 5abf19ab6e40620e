"""minigpt.optim against PyTorch's and transformers' own: AdamW, clipping, the schedule, the groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import minigpt.optim as optim
from minigpt.config import GPTConfig
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.optim import AdamW, clip_grad_norm, linear_schedule, param_groups


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 7))


def set_grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * (0.1 + step)  # varied scales, as real gradients


def has_fused(device: str = "cpu") -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", device.upper())


FUSED = [False, pytest.param(True, marks=pytest.mark.skipif(not has_fused(), reason="no fused AdamW on the CPU"))]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("bucket", [None, 7])  # 7 entries: every tensor is cut into many slices
def test_adamw_equals_torch_adamw(bucket, fused, monkeypatch):
    if bucket:
        monkeypatch.setattr(optim, "BUCKET", bucket)
    ours_model, torch_model = small_model(), small_model()
    lrs = [3e-3, 1e-3, 2e-4, 5e-4, 1e-4, 0.0]
    ours = AdamW(param_groups(ours_model, 0.1), lr=lrs[0], betas=(0.8, 0.99), eps=1e-6, fused=fused)
    assert ours.fused == fused
    theirs = torch.optim.AdamW(param_groups(torch_model, 0.1), lr=lrs[0], betas=(0.8, 0.99), eps=1e-6)
    for step, lr in enumerate(lrs):  # per-step learning rates, as a schedule sets them
        for group in ours.param_groups + theirs.param_groups:
            group["lr"] = lr
        set_grads(ours_model, step)
        set_grads(torch_model, step)
        ours.step()
        theirs.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert (a - b).abs().max().item() <= 1e-6
    # the moments too
    theirs_state = [theirs.state[p] for g in theirs.param_groups for p in g["params"]]
    for m, v, s in zip(ours.state_dict()["exp_avg"], ours.state_dict()["exp_avg_sq"], theirs_state):
        assert torch.allclose(m, s["exp_avg"], rtol=0, atol=1e-7)
        assert torch.allclose(v, s["exp_avg_sq"], rtol=1e-6, atol=0)


def run_steps(model: nn.Module, opt: AdamW, steps: range, own_layout: bool = False) -> None:
    """`opt`'s steps on set_grads' gradients (contiguous), or with `own_layout` each gradient given its
    parameter's strides first (as autograd gives them)."""
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (1 + step)
        set_grads(model, step)
        if own_layout:
            for p in model.parameters():
                p.grad = torch.empty_like(p).copy_(p.grad)
        opt.step()


@pytest.mark.skipif(not has_fused(), reason="no fused AdamW on the CPU")
def test_fused_adamw_is_the_written_out_update_and_shares_its_state():
    """Same formula, same state: a parameter stored transposed (as HF's Conv1D weights convert) and
    a state handed from one implementation to the other mid-run. Both round in fp32 in another
    order: updates of ~1e-2 agree to a few fp32 ulps of the weights (~1e-7)."""
    def model() -> nn.Module:
        m = small_model()
        m[2].weight = nn.Parameter(m[2].weight.detach().t().contiguous().t())  # (40, 16), column-major
        return m

    written, fused = model(), model()
    opt_w = AdamW(param_groups(written, 0.1), lr=1e-2, fused=False)
    opt_f = AdamW(param_groups(fused, 0.1), lr=1e-2, fused=True)
    run_steps(written, opt_w, range(4))
    # (the fused kernel takes whole tensors: a transposed weight's gradient with its strides, then
    # contiguous ones, copied to the weight's strides first)
    assert fused[2].weight.stride() == (1, 40)
    run_steps(fused, opt_f, range(2), own_layout=True)
    run_steps(fused, opt_f, range(2, 4))
    handed = AdamW(param_groups(fused, 0.1), lr=1e-2, fused=False)  # continue fused's run, written out
    handed.load_state_dict(opt_f.state_dict())
    run_steps(written, opt_w, range(4, 6))
    run_steps(fused, handed, range(4, 6))
    for a, b in zip(written.parameters(), fused.parameters()):
        assert (a - b).abs().max().item() <= 1e-6
    for m_w, m_f in zip(opt_w.state_dict()["exp_avg_sq"], handed.state_dict()["exp_avg_sq"]):
        assert torch.allclose(m_w, m_f, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", FUSED)
def test_grad_scaler_skips_an_overflowed_step_on_the_device(fused, monkeypatch):
    """fp16's loss scaler hands AdamW the overflow flag as a tensor: a finite step equals the same
    step without the scaler, an overflowed one changes nothing (weights, moments, t), and with the
    fused kernel the scaler's step reads nothing back to the host (on a GPU, each read is a wait)."""
    scaled, plain = small_model(), small_model()
    opt_s = AdamW(param_groups(scaled, 0.1), lr=1e-2, eps=0.5, fused=fused)  # a large eps: the scale matters
    opt_p = AdamW(param_groups(plain, 0.1), lr=1e-2, eps=0.5, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reads = []
    for step, overflow, unscale in ((0, False, True), (1, True, True), (2, False, False), (3, False, True)):
        set_grads(plain, step)
        for p, q in zip(scaled.parameters(), plain.parameters()):
            p.grad = scaler.scale(q.grad) * (float("inf") if overflow else 1.0)  # as backward gives them
        before = [p.detach().clone() for p in scaled.parameters()] + [m.clone() for m in opt_s.state_dict()["exp_avg"]]
        if unscale:
            scaler.unscale_(opt_s)  # (else the scaler passes its scale and AdamW divides by it)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda t: reads.append(step) or float(t.tolist()))
            scaler.step(opt_s)
        scaler.update()
        if overflow:
            after = [p.detach() for p in scaled.parameters()] + opt_s.state_dict()["exp_avg"]
            assert all(torch.equal(a, b) for a, b in zip(before, after)) and opt_s.step_count == 1
            continue
        opt_p.step()
        for a, b in zip(scaled.parameters(), plain.parameters()):
            assert (a - b).abs().max().item() <= 1e-6
    assert opt_s.step_count == opt_p.step_count == 3
    assert set(reads) == (set() if fused else {0, 1, 2, 3})  # written out, the host needs t: it reads


def test_fused_is_refused_where_the_build_has_none():
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))  # no fused kernel for fp64 parameters here
    with pytest.raises(MinigptError, match="no fused AdamW"):
        AdamW([p], fused=True)
    assert not AdamW([p]).fused  # auto: the written-out update
    assert AdamW([nn.Parameter(torch.ones(4))]).fused == has_fused()  # auto: fused where it exists


def test_adamw_first_step_by_hand():
    """t = 1: m^ = g and v^ = g^2, so the update is lr * g / (|g| + eps) after the decay."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([0.5, -0.25, 0.0])
    AdamW([p], lr=0.1, weight_decay=0.5, eps=1e-8).step()
    decayed = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5)
    expected = decayed - 0.1 * torch.tensor([0.5, -0.25, 0.0]) / (torch.tensor([0.5, 0.25, 0.0]) + 1e-8)
    assert torch.allclose(p.detach(), expected, atol=1e-7)


def test_parameters_without_gradients_are_left_alone():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    a.grad = torch.ones(3)
    AdamW([a, b], lr=0.1, weight_decay=0.1).step()
    assert torch.equal(b.detach(), torch.ones(3))
    assert not torch.equal(a.detach(), torch.ones(3))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("make", [lambda: torch.ones(4, 8)[:, :4], lambda: torch.ones(4, 1).expand(4, 4)],
                         ids=["slice", "expand"])
def test_a_parameter_that_is_no_dense_block_of_memory_is_refused(make, fused):
    # Updated through a flat copy instead of a view, such a parameter would silently never change.
    with pytest.raises(MinigptError, match=r"parameter 1 \(shape \[4, 4\].*memory of its own"):
        AdamW([nn.Parameter(torch.ones(3)), nn.Parameter(make())], fused=fused)


@pytest.mark.parametrize("fused", FUSED)
def test_a_transposed_parameter_is_updated_in_place_as_torch_does(fused):
    g = torch.Generator().manual_seed(0)
    ours, theirs = (nn.Parameter(torch.randn(8, 4, generator=g).t()) for _ in range(2))
    theirs.data.copy_(ours.detach())
    mine, ref = AdamW([ours], lr=0.1, fused=fused), torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.01)
    for step in range(3):
        ours.grad = theirs.grad = torch.randn(4, 8, generator=g)
        mine.step()
        ref.step()
    assert ours.stride() == (1, 4)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    model_a, model_b = small_model(), small_model()
    opt_a = AdamW(param_groups(model_a, 0.01), lr=1e-2)
    for step in range(3):
        set_grads(model_a, step)
        opt_a.step()
    state = opt_a.state_dict()
    assert state["step"] == 3 and state["param_groups"][1]["weight_decay"] == 0.0
    model_b.load_state_dict(model_a.state_dict())
    opt_b = AdamW(param_groups(model_b, 0.01), lr=1e-2)
    opt_b.load_state_dict({k: [t.clone() for t in v] if k.startswith("exp") else v for k, v in state.items()})
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        set_grads(model, 3)
        opt.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_other_shapes():
    opt = AdamW(param_groups(small_model(), 0.01))
    state = opt.state_dict()
    state["exp_avg"] = [torch.zeros(3) for _ in state["exp_avg"]]
    with pytest.raises(MinigptError, match="moment 0 has shape"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=0.0), dict(weight_decay=-0.1)])
def test_bad_hyper_parameters(bad):
    with pytest.raises(MinigptError, match="optimizer"):
        AdamW(small_model().parameters(), **bad)


def test_param_groups_are_hf_trainers():
    """HF Trainer decays every weight but biases and LayerNorm weights; for GPT-2 that is dim >= 2."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.trainer_pt_utils import get_parameter_names

    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=100, n_positions=32))
    names = get_parameter_names(hf, [nn.LayerNorm], ["bias", "layernorm", "rmsnorm"])
    hf_decay = {id(p) for n, p in hf.named_parameters() if n in names}
    decay, no_decay = param_groups(hf, 0.01)
    assert {id(p) for p in decay["params"]} == hf_decay
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(hf.parameters()))  # tied: once


@pytest.mark.parametrize("max_norm", [1.0, 0.01, 1e6])
def test_clip_grad_norm_equals_torch(max_norm):
    a, b = small_model(), small_model()
    set_grads(a, 2)
    set_grads(b, 2)
    ours = clip_grad_norm(list(a.parameters()), max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm)
    assert torch.equal(ours, theirs)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_clip_grad_norm_zero_means_measure_only():
    model = small_model()
    set_grads(model, 1)
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(list(model.parameters()), 0.0)
    assert norm.item() > 1
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_clip_grad_norm_without_gradients_is_a_zero_on_the_parameters_device():
    """No gradient at all (every parameter frozen): the norm is 0 on the parameters' device, not the
    CPU, since the training loop stacks it with the losses there (a GPU run failed on the mix); a
    generator of parameters is read once."""
    on_meta = [torch.zeros(3, device="meta", requires_grad=True)]
    assert clip_grad_norm(iter(on_meta), 1.0).device.type == "meta"
    norm = clip_grad_norm((p for p in [torch.ones(2, requires_grad=True)]), 1.0)
    assert norm.device.type == "cpu" and norm.item() == 0.0
    assert clip_grad_norm([], 1.0).item() == 0.0


@pytest.mark.parametrize("total,warmup", [(10, 0), (10, 3), (7, 7), (1, 0), (5, 9)])
def test_linear_schedule_equals_transformers(total, warmup):
    from transformers import get_linear_schedule_with_warmup

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    for step in range(total + 3):
        assert abs(opt.param_groups[0]["lr"] - 2.0 * linear_schedule(step, total, warmup)) < 1e-12
        opt.step()
        sched.step()


def test_linear_schedule_values():
    assert [linear_schedule(s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [linear_schedule(s, 6, 2) for s in range(4)] == [0.0, 0.5, 1.0, 0.75]


@pytest.mark.parametrize("args,message", [((-1, 10), "step must be >= 0, got -1"),  # (it gave 1.1)
                                          ((-3, 10, 2), "step must be >= 0, got -3"),  # (it gave -1.5)
                                          ((0, 10, -2), "warmup_steps must be >= 0, got -2")],  # (it gave 10 / 12)
                         ids=["step", "step-in-warmup", "warmup"])
def test_linear_schedule_refuses_negative_steps(args, message):
    with pytest.raises(MinigptError) as e:
        linear_schedule(*args)
    assert str(e.value) == f"linear_schedule: {message}"


# --- misuse: the error torch.optim.AdamW gives (or a clearer one), never a silently wrong step ------


@pytest.mark.parametrize("fused", FUSED)
def test_a_parameter_given_twice_is_refused_as_torch_does(fused):
    """GPT-2's head is its token embedding (tied): a group of the transformer's parameters and one of
    the head's hold that matrix twice, and every step would update it twice. torch refuses it too."""
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8))
    assert model.lm_head.weight is model.transformer.wte.weight
    def groups() -> list[dict]:
        return [{"params": model.transformer.parameters()}, {"params": model.lm_head.parameters(), "lr": 1e-3}]

    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        torch.optim.AdamW(groups())
    with pytest.raises(ValueError) as e:
        AdamW(groups(), fused=fused)
    assert str(e.value) == (
        "AdamW: some parameters appear more than once, in one group or in several: parameter 16 (shape [50, 8], "
        "counting through all groups) is parameter 0; list each once (GPT-2's lm_head.weight is its "
        "transformer.wte.weight, tied: model.parameters() and param_groups hold it once)"
    )
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))  # twice within one group
    with pytest.raises(ValueError, match=r"parameter 2 \(shape \[3\], counting through all groups\) is parameter 0;"):
        AdamW([a, b, a], fused=fused)


@pytest.mark.parametrize("fused", FUSED)
def test_params_are_taken_as_torch_takes_them(fused):
    """A group's "params" may be one tensor (the tensor, not its rows, which would train nothing),
    and the parameters may come named, as model.named_parameters() gives them: the steps then equal
    torch.optim.AdamW's given the same. A bare tensor as `params` is refused, as torch refuses it."""
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(4, 3))
    theirs.data.copy_(ours.detach())
    before = ours.detach().clone()
    mine, ref = AdamW([{"params": ours}], lr=0.1, fused=fused), torch.optim.AdamW([{"params": theirs}], lr=0.1)
    ours.grad = theirs.grad = torch.randn(4, 3)
    mine.step()
    ref.step()
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert (ours - before).abs().min().item() > 0.09  # a first step moves every entry by about lr
    named_ours, named_theirs = small_model(), small_model()
    mine = AdamW(named_ours.named_parameters(), lr=1e-2, fused=fused)
    ref = torch.optim.AdamW(named_theirs.named_parameters(), lr=1e-2)
    names = ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert mine.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == names
    for step in range(2):
        set_grads(named_ours, step)
        set_grads(named_theirs, step)
        mine.step()
        ref.step()
    for a, b in zip(named_ours.parameters(), named_theirs.parameters()):
        assert (a - b).abs().max().item() <= 1e-6
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
        torch.optim.AdamW(ours)
    with pytest.raises(TypeError) as e:
        AdamW(ours)
    assert str(e.value) == "AdamW: params must be an iterable of tensors or of dicts, not one tensor; pass [tensor]"


@pytest.mark.parametrize("betas", [0.9, (0.9,), (0.9, 0.99, 0.999), ("0.9", "0.999"), (True, 0.9)])
def test_betas_that_are_not_a_pair_of_numbers_are_refused(betas):
    with pytest.raises(TypeError) as e:
        AdamW(small_model().parameters(), betas=betas)
    assert str(e.value) == f"optimizer: betas must be a pair of numbers (beta1, beta2), e.g. (0.9, 0.999), got {betas}"
    assert AdamW(small_model().parameters(), betas=[0.8, 0.99]).param_groups[0]["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("fused", FUSED)
def test_each_parameter_counts_its_own_steps_as_torch_does(fused):
    """A parameter that first has a gradient at the third step was corrected with t = 3 (0.64 x lr moved instead of
    lr; 0.056 from torch.optim.AdamW after 6 steps); t is now each parameter's own, through a state dict too."""
    ours_p = [nn.Parameter(torch.linspace(-1, 1, 5)), nn.Parameter(torch.linspace(1, -1, 3))]
    torch_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = AdamW(ours_p, lr=0.1, weight_decay=0.01, fused=fused)
    reference = torch.optim.AdamW(torch_p, lr=0.1, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 3:  # the state dict of parameters at t = 3 and t = 1 goes through a new optimizer
            state = ours.state_dict()
            assert state["step"] == [3, 1]
            ours = AdamW(ours_p, lr=0.1, weight_decay=0.01, fused=fused)
            ours.load_state_dict(state)
        for i, (a, b) in enumerate(zip(ours_p, torch_p)):
            grad = torch.randn(a.shape, generator=g) if i == 0 or step >= 2 else None
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        ours.step()
        reference.step()
        for a, b in zip(ours_p, torch_p):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    assert ours.state_dict()["step"] == [6, 4] and ours.step_count == 6


@pytest.mark.parametrize("fused", FUSED)
def test_a_parameter_given_new_data_is_updated_there_and_a_new_shape_is_refused(fused):
    """`p.data = ...` (as `model.to(...)` and back does) left the fused kernel writing the old memory: the
    parameter stopped changing, without a word."""
    p, q = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    ours, reference = AdamW([p], lr=0.1, fused=fused), torch.optim.AdamW([q], lr=0.1)
    for step in range(3):
        if step == 1:
            p.data, q.data = torch.full((4,), 2.0), torch.full((4,), 2.0)
        p.grad, q.grad = torch.full((4,), 0.5), torch.full((4,), 0.5)
        ours.step()
        reference.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(p.detach(), torch.full((4,), 2.0))
    p.data = torch.ones(2, 2)
    p.grad = torch.ones(2, 2)
    with pytest.raises(MinigptError, match=r"AdamW: parameter 0 is now \[2, 2\], strides \[2, 1\], torch.float32 on "
                       r"cpu, not the \[4\], \[1\], torch.float32 on cpu its moments were made for"):
        ours.step()
    # model.to(dtype) (or to another device) after AdamW(...): the moments stay; it was torch's dtype error
    p.data, p.grad = torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(MinigptError, match=r"is now \[4\], strides \[1\], torch.bfloat16 on cpu, not the \[4\], "
                       r"\[1\], torch.float32 on cpu its moments were made for; make a new optimizer after "
                       r"changing a parameter \(model.to\(...\) after AdamW\(...\)\)"):
        ours.step()


def test_lr_zero_is_taken_as_torch_takes_it_and_a_warm_up_state_with_lr_0_loads():
    """lr 0 is a legal AdamW learning rate (torch.optim.AdamW takes it), and a warm-up's first step has
    exactly that: a checkpoint saved at step 0 of a warm-up stores lr 0.0. Refusing lr 0 (`> 0` for
    `>= 0`) made every such checkpoint's --resume fail, and no test noticed."""
    torch.optim.AdamW(small_model().parameters(), lr=0.0)  # (torch's: accepted)
    model = small_model()
    opt = AdamW(param_groups(model, 0.01), lr=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    set_grads(model, 0)
    opt.step()  # lr 0: nothing moves, as in torch (the decay is lr * weight_decay, 0 too)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    state = opt.state_dict()
    assert [g["lr"] for g in state["param_groups"]] == [0.0, 0.0]
    other = AdamW(param_groups(small_model(), 0.01), lr=1e-3)
    other.load_state_dict(state)
    assert [g["lr"] for g in other.param_groups] == [0.0, 0.0] and other.step_count == 1


def test_zero_grad_without_none_zeroes_the_gradients_as_torch_does():
    """zero_grad(set_to_none=False) must zero the gradients in place, so that the next backward gives
    one backward's gradient; a zero_grad that did nothing there let the gradients add up across steps
    (twice the gradient after two backwards), and no test called it with set_to_none=False."""
    model, reference = small_model(), small_model()
    ours, theirs = AdamW(model.parameters(), lr=0.1), torch.optim.AdamW(reference.parameters(), lr=0.1)
    x = torch.tensor([[1, 2, 3, 4]])
    for m, opt in ((model, ours), (reference, theirs)):
        m(x).sum().backward()
        opt.zero_grad(set_to_none=False)
        m(x).sum().backward()
    once = small_model()
    once(x).sum().backward()
    for p, q, o in zip(model.parameters(), reference.parameters(), once.parameters()):
        assert p.grad is not None and torch.equal(p.grad, o.grad) and torch.equal(q.grad, o.grad)
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_a_frozen_parameter_is_in_no_group_and_gets_no_moments():
    """param_groups leaves out parameters with requires_grad=False, as HF Trainer's create_optimizer does
    (`... and p.requires_grad`); without that filter a frozen embedding went into the decayed group, where
    AdamW allocated two moments for it (twice its memory) and saved them in every checkpoint."""
    model = small_model()
    model[0].weight.requires_grad_(False)  # (a frozen embedding, 50 x 16)
    decay, no_decay = param_groups(model, 0.01)
    grouped = {id(p) for p in decay["params"] + no_decay["params"]}
    assert id(model[0].weight) not in grouped
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert [list(p.shape) for p in decay["params"]] == [[40, 16], [7, 40]]
    opt = AdamW(param_groups(model, 0.01), lr=0.1)
    assert sum(m.numel() for ms in opt.exp_avg for m in ms) == sum(p.numel() for p in model.parameters()) - 50 * 16
    # torch's AdamW on the same groups keeps no state for it either
    assert all(p is not model[0].weight for g in torch.optim.AdamW(param_groups(model, 0.01)).param_groups
               for p in g["params"])
