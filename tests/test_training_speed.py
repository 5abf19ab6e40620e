"""The CPU training speed-ups: the swapped model computes the plain model's function."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import GPTConfig
from minigpt.model import GPT, CausalSelfAttention, CrossEntropy
from minigpt import training_speed
from minigpt.training_speed import (
    CPUTrainingAttention,
    FastMaskDropout,
    InPlaceCrossEntropy,
    PaddedRowsLMHead,
    Workspace,
    WorkspaceEmbedding,
    prepare_for_training,
)

# An odd vocabulary, as GPT-2's 50,257: the LM head's rows really are padded (301 -> 304).
CONFIG = GPTConfig(vocab_size=301, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def plain_and_swapped(config: GPTConfig = CONFIG) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    plain = GPT(config)
    swapped = copy.deepcopy(plain)  # (deepcopy keeps the tie: one wte/lm_head tensor)
    assert prepare_for_training(swapped) is swapped
    return plain, swapped


def test_every_trick_is_swapped_in_and_the_weights_stay_as_they_were():
    plain, swapped = plain_and_swapped()
    assert type(swapped.lm_head) is PaddedRowsLMHead and type(swapped.cross_entropy) is InPlaceCrossEntropy
    assert type(swapped.transformer.drop) is FastMaskDropout
    block = swapped.transformer.h[1]
    assert type(block.attn) is CPUTrainingAttention
    assert [type(m) for m in (block.attn.attn_dropout, block.attn.resid_dropout, block.mlp.dropout)] == [
        FastMaskDropout] * 3
    assert type(block.attn.c_attn) is nn.Linear and type(block.mlp.c_fc) is nn.Linear  # the rest: stock
    assert type(swapped.transformer.wte) is WorkspaceEmbedding and type(swapped.transformer.wpe) is nn.Embedding
    assert swapped.lm_head.weight is swapped.transformer.wte.weight  # still tied
    ours, theirs = swapped.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "FastMaskDropout(p=0.1 (as 6554/65536), 16-bit mask on the CPU)" in repr(swapped)
    assert "rows padded to 64 bytes on the CPU" in repr(swapped.lm_head)
    prepare_for_training(swapped)  # a second call changes nothing
    assert type(swapped.transformer.h[0].attn) is CPUTrainingAttention


def test_a_model_off_the_cpu_keeps_stock_ops():
    with torch.device("meta"):
        model = GPT(CONFIG)
    prepare_for_training(model)
    assert type(model.lm_head) is nn.Linear and type(model.transformer.drop) is nn.Dropout
    assert type(model.transformer.h[0].attn) is CausalSelfAttention
    assert type(model.cross_entropy) is CrossEntropy and type(model.transformer.wte) is nn.Embedding


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("mode", ["eval", "train without dropout"])
def test_same_logits_loss_and_gradients_as_the_plain_model(mode, impl):
    config = GPTConfig(**{**CONFIG.to_dict(), "attn_impl": impl, "dropout": 0.1 if mode == "eval" else 0.0})
    plain, swapped = plain_and_swapped(config)
    idx = torch.randint(0, 301, (3, 32), generator=torch.Generator().manual_seed(1))
    targets = idx.clone()
    targets[0, 5:9] = -100
    results = []
    for model in (plain, swapped):
        model.train(mode != "eval")
        logits, loss = model(idx, targets=targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    assert logits_b.stride()[-2] == 304  # the padded head really ran
    # The same arithmetic in fp32, up to the order of a few sums: relative differences ~1e-7.
    assert (logits_a - logits_b).abs().max().item() <= 1e-5 * logits_a.abs().max().item()
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert loss_a.item() == pytest.approx(5.7, abs=0.2)  # ~ln(301) = 5.71 for a fresh model
    for name, grad in grads_a.items():
        assert (grads_b[name] - grad).abs().max().item() <= 1e-5 * grad.abs().max().item() + 1e-9, name


def test_same_logits_loss_and_gradients_as_the_plain_model_under_bf16_autocast():
    """As train.py --dtype bf16 runs it: the padded head and the in-place loss in bf16 give the plain
    model's logits (the same bf16 products), its loss and, up to bf16 rounding, its gradients."""
    plain, swapped = plain_and_swapped()
    idx = torch.randint(0, 301, (3, 32), generator=torch.Generator().manual_seed(4))
    results = []
    for model in (plain, swapped):
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, targets=idx)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    assert logits_b.dtype == torch.bfloat16 and logits_b.stride()[-2] == 320  # the padded bf16 head ran
    assert (logits_a.float() - logits_b.float()).abs().max() <= 2**-8 * logits_a.float().abs().max()  # (equal on AMX)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-4)
    for name, grad in grads_a.items():
        assert grads_b[name].dtype == torch.float32, name
        assert (grads_b[name] - grad).abs().max().item() <= 2e-2 * grad.abs().max().item(), name


def test_attention_with_dropout_takes_the_reference_path_only_in_training(monkeypatch):
    _, swapped = plain_and_swapped()
    idx = torch.randint(0, 301, (2, 32), generator=torch.Generator().manual_seed(2))
    expected, _ = swapped.eval()(idx)  # eval: SDPA, as the plain model
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    assert torch.equal(swapped(idx)[0], expected) and len(calls) == CONFIG.n_layer
    swapped.train()(idx)
    assert len(calls) == CONFIG.n_layer  # training with dropout: SDPA not called again


def test_attention_with_dropout_is_unbiased():
    """Dropout's expectation is the identity: averaged over many masks, one attention layer in
    training gives its eval output (it is linear in the dropped probabilities and outputs)."""
    torch.manual_seed(0)
    config = GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.3})
    attn = CausalSelfAttention(config, 0)
    attn.__class__ = CPUTrainingAttention
    for name in ("attn_dropout", "resid_dropout"):
        getattr(attn, name).__class__ = FastMaskDropout
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        expected = attn.eval()(x)[0]
        draws = attn.train()(x.expand(4000, 8, 32))  # each copy gets masks of its own
    # Each draw's error is about the output's scale; the mean of 4,000 has 1/63 of it: 5 sigma.
    sigma = draws.std(0) / 4000**0.5
    assert ((draws.mean(0) - expected).abs() <= 5 * sigma + 1e-6).float().mean().item() > 0.99
    assert not torch.equal(draws[0], draws[1])  # the masks differ from call to call


def test_fast_dropout_statistics_scaling_and_gradient():
    drop = FastMaskDropout(0.1).train()
    torch.manual_seed(0)
    x = torch.full((2_000_000,), 2.0, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 1e-3  # 2M Bernoulli(0.1) draws: std 2e-4
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 * 65536 / (65536 - 6554)))  # p rounded to 6554/2^16
    y.sum().backward()
    assert torch.equal(x.grad, y.detach() / 2.0)  # the gradient goes through the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()), y.detach())  # masks come from torch's RNG: reproducible
    assert torch.equal(drop.eval()(x), x)  # eval mode: the identity
    assert torch.equal(FastMaskDropout(0.0).train()(x), x)
    # the mask's 16-bit draws are independent of position: no stripe of 4 (one 64-bit draw) is biased
    ones = torch.ones(400_000, 4)
    frac = (FastMaskDropout(0.5).train()(ones) == 0).float().mean(0)
    assert (frac - 0.5).abs().max().item() < 5e-3


def test_lm_head_pads_rows_and_equals_a_plain_linear():
    torch.manual_seed(0)
    head = nn.Linear(24, 301, bias=False)
    head.__class__ = PaddedRowsLMHead
    x = torch.randn(3, 5, 24, requires_grad=True)
    logits = head(x)
    assert logits.shape == (3, 5, 301) and logits.stride() == (5 * 304, 304, 1)  # rows padded to 16
    expected = F.linear(x, head.weight)
    assert torch.allclose(logits, expected, atol=1e-6)
    g = torch.randn(3, 5, 301)
    gx, gw = torch.autograd.grad(logits, (x, head.weight), g)
    ex, ew = torch.autograd.grad(expected, (x, head.weight), g)
    assert torch.allclose(gx, ex, atol=1e-5) and torch.allclose(gw, ew, atol=1e-5)


@pytest.mark.parametrize("grad_rows", [2048, 64])
def test_lm_head_under_autocast_pads_bf16_rows_and_equals_autocasts_linear(monkeypatch, grad_rows):
    """Under bf16 autocast the head multiplies in bf16, as autocast's linear does, into rows padded
    to 64 bytes (32 bf16), and makes the weight's fp32 gradient from bf16 products a block of rows
    at a time (64: 301 rows in 5 blocks, the last one short)."""
    monkeypatch.setattr(training_speed, "HEAD_GRAD_ROWS", grad_rows)
    torch.manual_seed(0)
    head = nn.Linear(24, 301, bias=False)
    head.__class__ = PaddedRowsLMHead
    x = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 301).bfloat16()
    for step in range(2):  # the second step takes the same workspace memory again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x)
            expected = F.linear(x, head.weight)
        assert logits.dtype == torch.bfloat16 and logits.stride() == (5 * 320, 320, 1)  # rows padded to 32
        gx, gw = torch.autograd.grad(logits, (x, head.weight), g)
        ex, ew = torch.autograd.grad(expected, (x, head.weight), g)
        assert gx.dtype == gw.dtype == torch.float32  # the parameters' and the input's dtype
        # bf16 products, rounded, then cast, as autocast's: equal on the Xeon with AMX; a CPU whose
        # kernels sum in another order for another layout may round an entry the other way
        for ours, stock in ((logits, expected), (gx, ex), (gw, ew)):
            assert (ours.float() - stock.float()).abs().max() <= 2**-8 * stock.float().abs().max()
        assert gw.abs().min() > 0  # (every block of rows written)
        del logits, gw


def test_the_embeddings_gradient_is_torchs_bit_for_bit_in_memory_it_takes_again():
    """The token embedding's dense gradient, made in a workspace: the same numbers as nn.Embedding's
    (repeated tokens add up, int32 ids too), the same memory step after step while the caller keeps
    no gradient, a kept one left as it was; with padding_idx, max_norm, scale_grad_by_freq or sparse
    it is nn.Embedding's own path."""
    def pair(**options) -> tuple[nn.Embedding, nn.Embedding]:
        torch.manual_seed(0)
        plain = nn.Embedding(301, 24, **options)
        ours = copy.deepcopy(plain)
        ours.__class__ = WorkspaceEmbedding
        return plain, ours

    plain, ours = pair()
    idx = torch.tensor([[3, 7, 3, 3], [300, 0, 7, 3]])
    g = torch.randn(2, 4, 24)
    at = []
    for ids in (idx, idx.int(), idx):
        out = ours(ids)
        assert torch.equal(out, plain(idx))
        out.backward(g)
        plain(idx).backward(g)
        assert torch.equal(ours.weight.grad, plain.weight.grad) and ours.weight.grad[3].abs().sum() > 0
        assert not ours.weight.grad[1].any()  # (a token not looked up: zeros, in memory used before)
        assert not ours.weight.grad.untyped_storage().resizable()  # (a workspace's block; torch's own is)
        at.append(ours.weight.grad.data_ptr())
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    assert at[0] == at[1] == at[2]  # the same memory each step
    ours(idx).backward(g)
    kept = ours.weight.grad  # the caller keeps it: the next step's gradient is made elsewhere
    kept_copy = kept.clone()
    ours.weight.grad = None
    ours(idx).backward(2 * g)
    assert torch.equal(kept, kept_copy) and ours.weight.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(ours.weight.grad, 2 * kept)
    assert not ours.requires_grad_(False)(idx).requires_grad  # a frozen embedding: no gradient made
    for options in ({"padding_idx": 3}, {"scale_grad_by_freq": True}, {"sparse": True}, {"max_norm": 1.0},
                    {"dtype": torch.bfloat16}, {"dtype": torch.float16}):  # (torch sums bf16/fp16 otherwise)
        plain, ours = pair(**options)
        many = torch.randint(0, 4, (64, 32), generator=torch.Generator().manual_seed(0))  # (ids repeated)
        grad = torch.randn(64, 32, 24, dtype=plain.weight.dtype)
        ours(many).backward(grad)
        plain(many).backward(grad)
        assert torch.equal(ours.weight.grad.to_dense(), plain.weight.grad.to_dense()), options
        assert ours.weight.grad.is_sparse == ours.sparse
        assert ours.sparse or ours.weight.grad.untyped_storage().resizable()  # (torch's own memory)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_cross_entropy_equals_cross_entropy_in_value_and_gradient(dtype, padded):
    """The memory-saving cross-entropy (its gradient made in place) is F.cross_entropy, also on
    logits whose rows are padded (not contiguous), as the padded LM head writes them."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 1000, (37,), generator=g)
    targets[[0, 5, 36]] = -100
    ours_in, ref_in = logits.clone().requires_grad_(), logits.float().requires_grad_()
    ours_logits = ours_in * 1  # (a non-leaf input, as the LM head's output is)
    if padded:
        ours_logits = torch.cat([ours_logits, torch.full((37, 8), 1e4, dtype=dtype)], dim=1)[:, :1000]
        assert not ours_logits.is_contiguous()
    ours = InPlaceCrossEntropy()(ours_logits, targets)  # (-100: ignored)
    ref = F.cross_entropy(ref_in * 1, targets, ignore_index=-100)
    (ours * 3).backward()
    (ref * 3).backward()
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ours_in.grad.dtype == dtype
    tolerance = 1e-7 if dtype == torch.float32 else 1e-3
    assert (ours_in.grad.float() - ref_in.grad).abs().max().item() < tolerance
    assert not ours_in.grad[[0, 5, 36]].any()  # ignored positions get no gradient


def test_a_bf16_models_loss_is_computed_in_fp32():
    """A model cast to bf16 (no autocast: `load_model(dtype=torch.bfloat16)` evaluated by hand) took
    the log-softmax over the vocabulary in bf16: 10.8125 against 10.8443 from the same logits in fp32.
    int32 targets, which the model's embedding takes, were refused by the loss ("expected target dtype
    to be Long")."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=50257)).eval()
    model.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})  # (bf16-exact)
    model = model.to(torch.bfloat16)
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = model(idx, idx)
        _, loss_int32 = model(idx.int(), idx.int())
    expected = F.cross_entropy(logits.float()[:, :-1].reshape(-1, 50257), idx[:, 1:].reshape(-1))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_int32.item() == loss.item()
    assert abs(F.cross_entropy(logits[:, :-1].reshape(-1, 50257), idx[:, 1:].reshape(-1)).item() - loss.item()) > 1e-3


def test_a_workspace_hands_its_block_out_again_only_once_no_tensor_uses_it():
    ws = Workspace()
    cpu = torch.device("cpu")
    a = ws.empty("out", (4, 300), torch.float32, cpu)
    first = a.data_ptr()
    assert a.shape == (4, 300) and a.is_contiguous() and first % 4096 == 0  # (page-aligned)
    a.fill_(1.0)
    view = a[1:].detach()  # an alias of its memory, and not the tensor handed out
    del a
    b = ws.empty("out", (4, 300), torch.float32, cpu)  # the first block is still in use: a new one
    assert b.data_ptr() != first
    b.fill_(2.0)
    assert torch.equal(view, torch.ones(3, 300))
    second = b.data_ptr()
    del view, b
    assert ws.empty("out", (2, 300), torch.float32, cpu).data_ptr() == second  # free again; smaller fits
    assert ws.empty("out", (8, 300), torch.float32, cpu).data_ptr() != second  # larger: a new block
    assert ws.empty("other", (2, 300), torch.float32, cpu).data_ptr() != ws.empty("out", (2, 300), torch.float32, cpu).data_ptr()

    # held by an autograd graph only (a tensor saved for the backward pass): still in use
    x = torch.ones(3, requires_grad=True)
    saved = ws.empty("saved", (3,), torch.float32, cpu).copy_(torch.arange(3.0))
    y = (x * saved).sum()
    ptr = saved.data_ptr()
    del saved
    assert ws.empty("saved", (3,), torch.float32, cpu).fill_(9.0).data_ptr() != ptr
    y.backward()
    assert torch.equal(x.grad, torch.arange(3.0))

    bf16 = ws.empty("bf16", (5, 7), torch.bfloat16, cpu)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (5, 7)
    assert ws.empty("none", (0, 7), torch.float32, cpu).shape == (0, 7)
    assert ws.empty("meta", (2, 3), torch.float32, torch.device("meta")).device.type == "meta"  # off the CPU: plain
    held = ws.empty("out", (2, 300), torch.float32, cpu)
    for copied in (copy.deepcopy(ws), pickle.loads(pickle.dumps(ws))):  # copies start empty, and apart
        assert copied.empty("out", (2, 300), torch.float32, cpu).data_ptr() != held.data_ptr()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept(autocast):
    """The logits, the log-probabilities (the logits' gradient, later) and the head's weight gradient
    (wte's) live in workspaces: step after step the same memory, unless the caller still holds a
    tensor in it, which then stays as it was. (A workspace's memory is not resizable; torch's own is.)
    Under bf16 autocast, so do the logits' bf16 gradient and the head's bf16 copy of its weight."""
    plain, swapped = plain_and_swapped(GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.0}))
    idx = torch.randint(0, 301, (3, 32), generator=torch.Generator().manual_seed(3))
    wte = swapped.transformer.wte.weight

    def step(model):  # as train.py's loss function, the logits dropped before the backward pass
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, targets=idx)
        seen = []  # the logits' gradient, as it passes
        logits.register_hook(lambda g: seen.append((g.data_ptr(), g.untyped_storage().resizable())))
        ptr = logits.data_ptr()
        if model is swapped:  # the weight the head multiplied by: wte, or its bf16 copy
            weight = logits.grad_fn.saved_tensors[1]
            assert (weight.data_ptr() == wte.data_ptr()) != autocast
            seen.append((weight.data_ptr(), weight.untyped_storage().resizable()))
            assert seen[0][1] != autocast  # a copy in a workspace, or wte itself
            del weight
        del logits
        loss.backward()
        grad = model.transformer.wte.weight.grad
        model.zero_grad(set_to_none=True)
        return ptr, seen, grad

    logits_at, (weight_at, logits_grad), grad = step(swapped)
    assert grad.data_ptr() == logits_at and not grad.untyped_storage().resizable()  # in the logits' block
    assert logits_grad[0] != logits_at and not logits_grad[1]
    del grad
    again = step(swapped)
    assert again[:2] == (logits_at, [weight_at, logits_grad]) and again[2].data_ptr() == logits_at  # the same memory
    kept_grad = again[2]  # the caller keeps a gradient ...
    kept_copy = kept_grad.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = swapped(idx, targets=idx)  # ... and the logits over the backward pass
    logits_copy = logits.clone()
    loss.backward()
    assert torch.equal(kept_grad, kept_copy) and torch.equal(logits, logits_copy)
    assert wte.grad.data_ptr() not in (kept_grad.data_ptr(), logits.data_ptr())
    expected = step(plain)[2]
    # (bf16 products: another CPU's kernel may round an entry the other way)
    rtol, atol = (2**-8, 2**-8 * expected.abs().max().item()) if autocast else (1e-5, 1e-7)
    assert torch.allclose(wte.grad, expected, rtol=rtol, atol=atol)
    # gradients accumulated over two backward passes (no zeroing in between): twice one pass's
    swapped.zero_grad(set_to_none=True)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = swapped(idx, targets=idx)[1]
        loss.backward()
    assert torch.allclose(wte.grad, 2 * expected, rtol=rtol, atol=2 * atol)


# --- what the plain model allows, the swapped one allows too (or refuses in one line) ---------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX's")
def test_a_workspace_is_not_shared_with_a_forked_child():
    """Its blocks were anonymous maps, which fork() shares: a child training on (a multiprocessing
    pool forked after a step) wrote the parent's logits and gradients (23 of 40 of the parent's
    steps wrong). Private maps: the child's writes are its own."""
    ws = Workspace()
    block = ws.empty("out", (1024,), torch.float32, torch.device("cpu")).fill_(1.0)
    pid = os.fork()
    if pid == 0:  # the child: writes through numpy (no torch threads in a forked child)
        block.numpy()[:] = 2.0
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and torch.equal(block, torch.ones(1024))


def test_the_swapped_model_takes_what_the_plain_one_takes():
    """Found by an audit: every target ignored gave NaN gradients (torch's are zeros: a micro-batch
    with nothing to score poisoned the step); the logits could not be edited in place ("a view ...
    created inside a custom Function"); an fp64 model under bf16 autocast got a bf16 head (autocast
    leaves fp64 alone). (A bf16 model's embedding gradient: the embedding's test.)
    Each now as the plain model (the gradients up to the order of a few sums, as always)."""
    idx = torch.randint(0, 301, (3, 32), generator=torch.Generator().manual_seed(2))

    def run(model, targets, edit, autocast, dtype):
        model.eval().to(dtype).zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = model.transformer.wte(idx) + model.transformer.wpe.weight[:32]  # (a model without its blocks)
            logits = model.lm_head(model.transformer.ln_f(h))
            if edit:
                logits[..., 0] = -1e4
                logits.mul_(0.5)
            loss = model.cross_entropy(logits.reshape(-1, 301), targets.reshape(-1))
        loss.backward()
        return logits, loss, [p.grad for p in model.parameters() if p.grad is not None]

    for targets, edit, autocast, dtype in ((torch.full_like(idx, -100), False, False, torch.float32),
                                           (idx, True, False, torch.float32), (idx, True, True, torch.float32),
                                           (idx, False, True, torch.float64)):
        plain, swapped = plain_and_swapped()
        (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = (run(m, targets, edit, autocast, dtype)
                                                                   for m in (plain, swapped))
        case = (targets[0, 0].item(), edit, autocast, dtype)
        near = 2**-8 if autocast and dtype == torch.float32 else 1e-6  # (bf16 products: one rounding, other CPUs)
        assert logits_b.dtype == logits_a.dtype, case
        assert (logits_b.double() - logits_a.double()).abs().max() <= near * logits_a.double().abs().max(), case
        assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-4, nan_ok=True), case  # (nothing scored: NaN)
        assert len(grads_b) == len(grads_a) and grads_b[0].dtype == grads_a[0].dtype, case
        for a, b in zip(grads_a, grads_b):
            assert b.isfinite().all() and (b - a).abs().max() <= (2e-2 if near > 1e-6 else 1e-5) * a.abs().max(), case
        assert targets[0, 0] != -100 or not any(g.any() for g in grads_b)  # (nothing scored: zeros, as torch's)


def test_a_second_derivative_or_backward_is_refused_not_wrong():
    """A gradient penalty (`create_graph=True`) failed deep in a kernel in fp32 ("mm(): functions
    with out=... arguments don't support automatic differentiation") and, under bf16 autocast, ran
    and gave wrong gradients: the swapped Functions' backwards are no graph. Now refused by autograd
    in one line; the plain model is the one for it. A second backward through the loss
    (retain_graph) is refused too: the loss makes its gradient in place of what it saved."""
    idx = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(3))
    for autocast in (False, True):
        _, swapped = plain_and_swapped()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = swapped.eval()(idx, targets=idx)
        grads = torch.autograd.grad(loss, list(swapped.parameters()), create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            sum(g.pow(2).sum() for g in grads).backward()
    _, loss = swapped(idx, targets=idx)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_gradient_in_padded_rows_is_read_dense():
    """Logits edited in place get, from autograd, a gradient laid out as they are, in padded rows
    whose padding is fresh memory; oneDNN's bf16 matmul (AMX here) reads a row's padding too, and a
    NaN there made the head's input gradient NaN (wte's, wpe's, ln_f's: 2 in 30 such steps). The
    backward reads such a gradient dense. (Here the padding is NaN on purpose, through a hook.) A
    CPU whose kernel skips the padding (the Zen 4's) gives the right numbers either way: the
    matmuls' operands are checked dense too, as torch's dispatcher hands them to the kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, swapped = plain_and_swapped()
    x = torch.randn(3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = swapped.lm_head(x)

    def in_padded_rows(grad):
        padded = torch.full((96, 320), float("nan"), dtype=grad.dtype)[:, :301].view(3, 32, 301)
        return padded.copy_(grad)

    class Operands(TorchDispatchMode):  # (the gradient's matrix as each matmul gets it)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
                read.extend(a for a in args if isinstance(a, torch.Tensor) and {96, 301} <= set(a.shape))
            return func(*args, **(kwargs or {}))

    read = []
    logits.register_hook(in_padded_rows)
    with Operands():
        logits.float().sum().backward()
    assert read and all(a.is_contiguous() or a.t().is_contiguous() for a in read), [a.stride() for a in read]
    assert x.grad.isfinite().all() and swapped.lm_head.weight.grad.isfinite().all()
    expected = torch.ones(3, 32, 301, dtype=torch.bfloat16) @ swapped.lm_head.weight.detach().bfloat16()
    assert torch.equal(x.grad, expected.float())
