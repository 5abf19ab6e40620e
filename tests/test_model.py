"""The model on its own: parity with transformers, both attention paths, the KV cache, init, loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import GPTConfig
from minigpt.loading import load_model
from minigpt.model import GPT, KVCache


def with_attention(model: GPT, impl: str) -> GPT:
    """The same weights behind the other attention implementation."""
    other = GPT(dataclasses.replace(model.config, attn_impl=impl)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("shape", ["tiny", "distil"])
def test_logits_equal_transformers(shape, impl, tiny_hf_dir, distil_hf_dir):
    from transformers import GPT2LMHeadModel

    folder = tiny_hf_dir if shape == "tiny" else distil_hf_dir
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = with_attention(load_model(folder)[0], impl)
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == expected.shape == (2, 33, 50257)
    # Measured 1.4e-6 (tiny, logits up to 3.5) and 1.5e-6 x 10 (distilgpt2 shape, logits up to 12.5):
    # fp32 rounding of 64- and 768-long sums. The tanh -> erf GELU mistake moves them by 8e-4 / 4e-3.
    tolerance = 5e-6 if shape == "tiny" else 5e-5
    assert (logits - expected).abs().max().item() < tolerance
    assert torch.equal(logits[:, -1].argmax(-1), expected[:, -1].argmax(-1))


def test_loss_equals_transformers(tiny_hf_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    ours, _ = load_model(tiny_hf_dir)
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(2))
    labels = idx.clone()
    labels[0, 10:20] = -100  # ignored positions
    with torch.no_grad():
        expected = hf(idx, labels=labels).loss
        _, loss = ours(idx, targets=labels)
    assert abs(loss.item() - expected.item()) < 5e-6  # measured 1e-6 on a loss of 11.09
    # and it is the textbook definition: mean next-token cross-entropy over non-ignored targets
    logits, _ = ours(idx)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 50257), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss.item() - manual.item()) < 1e-6


def test_sdpa_equals_reference_with_dropout_off_and_cache():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    sdpa = GPT(cfg).eval()
    ref = with_attention(sdpa, "reference")
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(sdpa(idx)[0], ref(idx)[0], atol=1e-5)
        # a chunk of several new tokens after a cached prefix needs an offset causal mask
        for model in (sdpa, ref):
            cache = KVCache(cfg, 2, 20)
            model(idx[:, :12], kv_cache=cache)
            chunk, _ = model(idx[:, 12:], kv_cache=cache)
            assert torch.allclose(chunk, ref(idx)[0][:, 12:], atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_kv_cache_matches_full_forward_every_step(impl, tiny_hf_dir):
    model = with_attention(load_model(tiny_hf_dir)[0], impl)
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, batch_size=2, max_len=24)
        step_logits, _ = model(idx[:, :8], kv_cache=cache, last_only=True)  # prefill
        assert step_logits.shape == (2, 1, 50257)
        assert (step_logits[:, 0] - full[:, 7]).abs().max().item() < 1e-5
        for t in range(8, 24):  # then one token at a time, positions offset by the cache
            step_logits, _ = model(idx[:, t : t + 1], kv_cache=cache, last_only=True)
            assert (step_logits[:, 0] - full[:, t]).abs().max().item() < 1e-5
        assert cache.length == 24


def test_context_window_is_enforced():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds"):
        KVCache(model.config, 1, 9)
    for batch, length in ((0, 4), (1, 0), (1, -1)):  # (a batch of 0 gave other logits, in silence)
        with pytest.raises(ValueError, match=f"at least one sequence of one position, got {batch} x {length}"):
            KVCache(model.config, batch, length)


def test_a_kv_cache_of_another_batch_dtype_or_device_is_named_and_left_unwritten():
    """A batch-1 step into a batch-2 cache broadcast its keys into both rows before torch failed on a
    reshape; a cache of another dtype or device failed inside SDPA, naming neither the cache nor why."""
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=8)).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    for cache, made in (
        (KVCache(model.config, 2, 8), "batch 2, torch.float32 on cpu"),
        (KVCache(model.config, 1, 8, dtype=torch.bfloat16), "batch 1, torch.bfloat16 on cpu"),
        (KVCache(model.config, 1, 8, device="meta"), "batch 1, torch.float32 on meta"),
    ):
        if cache.k[0].device.type == "cpu":
            for t in cache.k + cache.v:
                t.fill_(7)
        with pytest.raises(ValueError, match=f"KV cache made for {made}; this step is batch 1, torch.float32 on cpu"):
            model(idx, kv_cache=cache)
        assert cache.length == 0
        if cache.k[0].device.type == "cpu":
            assert all(bool((t == 7).all()) for t in cache.k + cache.v)
    cache = KVCache(model.config, 1, 8)
    assert model(idx, kv_cache=cache)[0].shape == (1, 3, 50) and cache.length == 3


def test_inputs_of_the_wrong_shape_are_named():
    """idx must be (B, T) and targets its shape: a 1-D idx failed as "not enough values to unpack",
    and targets (T, B) for an idx (B, T) gave a loss, of the wrong pairs, without a word; T = 0
    (nothing to compute) is refused too."""
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    idx = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^idx must be \(B, T\) with T >= 1, got shape \(4,\)$"):
        model(idx[0])
    for targets in (None, idx[:, :0]):  # (no tokens: with targets, torch's "cannot reshape tensor of 0 elements")
        with pytest.raises(ValueError, match=r"^idx must be \(B, T\) with T >= 1, got shape \(2, 0\)$"):
            model(idx[:, :0], targets)
    with pytest.raises(ValueError, match=r"^targets must have idx's shape \(2, 4\), got \(4, 2\)$"):
        model(idx, idx.T.contiguous())
    assert model(idx, idx)[1] is not None


def dropout_model(p: float, impl: str = "sdpa") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=p, attn_impl=impl))


IDX_300 = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(4))
# Where GPT-2 drops out, by the modules that do it ("sdpa": the dropout_p handed to the fused kernel).
DROPOUT_SITES = {
    "embeddings": lambda model: [model.transformer.drop],
    "attention-probabilities-reference": lambda model: [b.attn.attn_dropout for b in model.transformer.h],
    "attention-probabilities-sdpa": lambda model: [b.attn.attn_dropout for b in model.transformer.h],
    "attention-residual": lambda model: [b.attn.resid_dropout for b in model.transformer.h],
    "mlp": lambda model: [b.mlp.dropout for b in model.transformer.h],
}


def spy_on_sdpa(monkeypatch) -> list[float]:
    """The dropout_p of every scaled_dot_product_attention call model.py makes, from now on."""
    import minigpt.model

    seen, sdpa = [], minigpt.model.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(minigpt.model.F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("site", list(DROPOUT_SITES))
def test_dropout_is_applied_at_each_site_in_training(site, monkeypatch):
    """A plain GPT (not prepare_for_training's) in training mode with dropout 0.3 drops out at each of
    GPT-2's sites: the embeddings' sum, the attention probabilities (inside SDPA, or written out), the
    attention's and the MLP's outputs. Each site's dropout runs once a layer in training mode with
    p 0.3, zeroes 30% (+-3%) of its input and scales the rest by 1/0.7; and it shows in the logits:
    the same draw with only that site's p set to 0 gives other logits."""
    model = dropout_model(0.3, "reference" if site.endswith("reference") else "sdpa").train()
    modules = DROPOUT_SITES[site](model)
    runs = []

    def record(module, args, out):
        x = args[0]
        nonzero = x != 0
        zeroed = (out == 0) & nonzero
        runs.append((module.training, module.p, (zeroed.sum() / nonzero.sum()).item(),
                     torch.allclose(out[~zeroed], x[~zeroed] / 0.7, rtol=1e-6, atol=0)))

    if site.endswith("sdpa"):
        seen = spy_on_sdpa(monkeypatch)
    else:
        for module in modules:
            module.register_forward_hook(record)
    torch.manual_seed(1)
    logits, _ = model(IDX_300)
    if site.endswith("sdpa"):
        assert seen == [0.3] * model.config.n_layer
    else:
        assert len(runs) == len(modules)
        for training, p, zeroed, kept_scaled in runs:
            assert training and p == 0.3 and abs(zeroed - 0.3) < 0.03 and kept_scaled, runs
    for module in modules:
        module.p = 0.0
    torch.manual_seed(1)
    assert (model(IDX_300)[0] - logits).abs().max().item() > 0.1  # measured 0.29 to 0.64 (logits up to 1.03)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_dropout_is_off_in_eval_mode(impl, monkeypatch):
    """In eval mode a model with dropout 0.3 computes the logits of the same weights without dropout,
    bit for bit, every time (SDPA is handed dropout_p 0)."""
    model = dropout_model(0.3, impl).eval()
    plain = dropout_model(0.0, impl).eval()
    plain.load_state_dict(model.state_dict())
    seen = spy_on_sdpa(monkeypatch)
    with torch.no_grad():
        logits = model(IDX_300)[0]
        assert torch.equal(model(IDX_300)[0], logits) and torch.equal(plain(IDX_300)[0], logits)
    assert seen == ([0.0] * 3 * model.config.n_layer if impl == "sdpa" else [])  # (3 forwards of 2 layers)


def test_gpt2_init_statistics_and_tying():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=5000, block_size=128)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_parameters() == cfg.num_parameters()
    # the embeddings (the LM head too, tied) are N(0, 0.02): 1.3 M and 33 k draws, std measured 0.01999 / 0.01989
    for embedding in (model.transformer.wte, model.transformer.wpe):
        assert abs(embedding.weight.std().item() - 0.02) < 1e-3 and abs(embedding.weight.mean().item()) < 1e-3
    blk = model.transformer.h[0]
    assert abs(blk.mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    scaled = 0.02 / (2 * cfg.n_layer) ** 0.5
    assert abs(blk.attn.c_proj.weight.std().item() - scaled) < 1e-3
    assert abs(blk.mlp.c_proj.weight.std().item() - scaled) < 1e-3
    assert blk.attn.c_attn.bias.abs().sum() == 0 and torch.all(blk.ln_1.weight == 1)
    # a fresh model predicts nearly uniformly: loss ~ ln(vocab)
    idx = torch.randint(0, 5000, (2, 64))
    _, loss = model.eval()(idx, targets=idx)
    assert abs(loss.item() - torch.log(torch.tensor(5000.0)).item()) < 0.1


def test_distilgpt2_defaults():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (50257, 1024, 6, 12, 768)
    assert cfg.dropout == 0.1 and cfg.layer_norm_eps == 1e-5
    assert cfg.num_parameters() == 81_912_576  # distilgpt2's 82 M


def test_the_configs_bounds_are_exact():
    """dropout 1.0 (every activation dropped: training learns nothing) and n_layer 257 are refused;
    0.999 and 256 are not. The bad configs tried a NaN dropout and 5,000 layers only, so a check
    `dropout <= 1.0` or one layer past MAX_LAYERS went unnoticed."""
    from minigpt.errors import MinigptError

    small = dict(vocab_size=10, block_size=4, n_head=1, n_embd=8)
    assert GPTConfig(**small, n_layer=256).n_layer == 256
    with pytest.raises(MinigptError, match=r"^config: n_layer=257 is beyond any GPT-2 model \(at most 256\)$"):
        GPTConfig(**small, n_layer=257)
    assert GPTConfig(**small, dropout=0.999).dropout == 0.999
    with pytest.raises(MinigptError, match=r"^config: dropout must be in \[0, 1\), got 1\.0$"):
        GPTConfig(**small, dropout=1.0)
