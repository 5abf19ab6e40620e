"""The CUDA paths, run only on a GPU machine (`pytest -m cuda`; skipped elsewhere, see conftest.py):
the model in fp32 (TF32) / bf16 against the CPU, the fused AdamW against the written-out one,
decoding with the KV cache, int8, and short training runs in fp32, bf16 and fp16 with loss scaling
whose metrics are valid JSON, the step timing by CUDA events, and --compile-mode reduce-overhead
(CUDA graphs) without a recompile for a short batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import call_cli

pytestmark = pytest.mark.cuda


@pytest.fixture
def shared_cache(tmp_path_factory) -> Path:
    """One cache for every run of the tiny preset here: its vocabulary is learned once, not per test
    (seconds each, in gpu_check.sh's time box)."""
    return tmp_path_factory.getbasetemp() / "tiny-preset-cache"


def reject_constant(name: str):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 0.01), (torch.bfloat16, 0.05)])
def test_logits_on_cuda_match_the_cpu(tiny_minigpt_dir, dtype, tol):
    """TF32 matmuls keep 10 mantissa bits (relative 2^-11 a product), bf16 8 bits (2^-9): the
    tolerances, relative to the largest logit, allow the errors of a 2-layer model to add up."""
    from minigpt.loading import load_model
    from minigpt.runtime import setup_device

    device, _ = setup_device("cuda", "fp32")  # TF32 on, as the CLIs set it
    cpu, _ = load_model(tiny_minigpt_dir, "cpu")
    gpu, _ = load_model(tiny_minigpt_dir, device, dtype)
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = cpu(idx)[0], gpu(idx.to(device))[0].float().cpu()
    assert (got - expected).abs().max() <= tol * expected.abs().max()


def test_fused_adamw_on_cuda_equals_the_cpu_update():
    """The fused kernel on whole tensors, two weights stored transposed (as HF's Conv1D weights
    convert): one's gradient has its strides, the other's is contiguous (copied to them first).
    (Early in this file, the only CUDA test of the optimizer: gpu_check.sh's time box may stop the
    slow ones below; in test_optim.py it ran last.)"""
    import torch.nn as nn
    from test_optim import set_grads, small_model

    from minigpt.optim import AdamW, param_groups

    def model() -> nn.Module:
        m = small_model()
        for i in (2, 4):
            m[i].weight = nn.Parameter(m[i].weight.detach().t().contiguous().t())
        return m

    cpu, gpu = model(), model().cuda()
    opt_cpu = AdamW(param_groups(cpu, 0.1), lr=1e-2, fused=False)  # the written-out definition
    opt_gpu = AdamW(param_groups(gpu, 0.1), lr=1e-2)
    assert opt_gpu.fused  # auto: fused where the build has it
    for step in range(4):
        set_grads(cpu, step)
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            q.grad = p.grad.cuda()
        gpu[2].weight.grad = torch.empty_like(gpu[2].weight).copy_(gpu[2].weight.grad)
        assert gpu[2].weight.grad.stride() == gpu[2].weight.stride() != gpu[4].weight.grad.stride()
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert (a - b.cpu()).abs().max().item() <= 1e-6


def test_decoding_with_the_cache_on_cuda_is_the_full_forward(tiny_minigpt_dir):
    from minigpt.loading import load_model
    from minigpt.inference import prepare_for_inference
    from minigpt.sampling import SamplingConfig, generate_ids

    model, _ = load_model(tiny_minigpt_dir, "cuda")
    model = prepare_for_inference(model)
    prompt = [464, 2068, 7586]
    new = generate_ids(model, prompt, SamplingConfig(max_new_tokens=8, greedy=True), eos_id=None)[0]
    ids = torch.tensor([prompt + new], device="cuda")
    with torch.no_grad():
        logits, _ = model(ids)
    # greedy = argmax of the full pass, up to fp32 rounding: cuBLAS sums 1 row and 11 in other orders,
    # and a near-tie may go either way (each token within 1e-5 of the largest logit of its row)
    full = logits[0, len(prompt) - 1 : -1].float()  # (8, vocab)
    picked = full.gather(1, torch.tensor(new, device="cuda")[:, None]).squeeze(1)
    assert len(new) == 8 and bool((picked >= full.amax(-1) - 1e-5 * full.abs().amax()).all()), new


def test_int8_on_cuda_computes_the_model(tiny_minigpt_dir):
    """int8 decodes on a GPU with torch's `int8mm` (the H200 run: 192 tokens/s at batch 1); a refusal
    ("no int8 weight-only kernel for cuda") used to pass this test too."""
    from minigpt.loading import load_model
    from minigpt.inference import kernel_summary, prepare_for_inference

    model, _ = load_model(tiny_minigpt_dir, "cuda")
    reference, _ = load_model(tiny_minigpt_dir, "cuda")
    prepare_for_inference(model, "int8")
    assert kernel_summary(model).startswith("kernels: lm_head ")  # (int8mm or upcast, whichever times faster)
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected, got = reference(idx)[0], model(idx)[0]
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()  # quantization, as on the CPU


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_runs_and_logs_valid_json(tmp_path, monkeypatch, shared_cache, dtype):
    monkeypatch.setenv("MINIGPT_CACHE", str(shared_cache))
    out = tmp_path / "out"
    result = call_cli("train.py", "--preset", "tiny", "--no-progress", "--max-steps", "6", "--log-every", "1",
                      "--device", "cuda", "--dtype", dtype, "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line, parse_constant=reject_constant)
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # lr 2e-3 on a tiny model: 6 steps lower the loss


def test_step_numbers_time_with_cuda_events_and_read_back_once():
    from minigpt.metrics import StepNumbers

    numbers = StepNumbers(torch.device("cuda"))
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        numbers.start()
        loss = (a @ a).mean()
        numbers.stop(loss, a.norm(), tokens=2048)
    expected = [(a @ a).mean().item()] * 3
    losses, norms, tokens, seconds = numbers.read()
    assert losses == pytest.approx(expected, rel=1e-5) and norms == pytest.approx([a.norm().item()] * 3, rel=1e-5)
    assert tokens == 3 * 2048 and seconds > 0 and len(numbers) == 0


def test_reduce_overhead_compiles_once_for_the_short_last_batch(tmp_path, monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs): batches of 4, 4 and a short last one of 2 train
    with one compiled graph (a recompile is an error here), and the loss matches the eager run."""
    from test_trainer import make_trainer, micro_model, random_blocks

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 matmuls on both sides
    train = random_blocks(10, 16, 300, seed=5)
    make_trainer(tmp_path / "eager", micro_model().cuda(), train, max_steps=6, device="cuda").fit()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    make_trainer(tmp_path / "graphs", micro_model().cuda(), train, max_steps=6, device="cuda", compile=True,
                 compile_mode="reduce-overhead").fit()
    rows = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    got, expected = [r["loss"] for r in rows(tmp_path / "graphs")], [r["loss"] for r in rows(tmp_path / "eager")]
    assert got == pytest.approx(expected, rel=1e-3)  # fused kernels only round differently


def test_training_with_reduce_overhead_through_the_cli(tmp_path, monkeypatch, shared_cache):
    monkeypatch.setenv("MINIGPT_CACHE", str(shared_cache))
    out = tmp_path / "out"
    result = call_cli("train.py", "--preset", "tiny", "--no-progress", "--max-steps", "8", "--log-every", "1",
                      "--device", "cuda", "--compile", "--compile-mode", "reduce-overhead", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line, parse_constant=reject_constant)
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_compiled_decoding_on_cuda_decodes_the_eager_tokens(tiny_minigpt_dir):
    """sample.py --compile on a GPU: the step replayed as one CUDA graph a token, over the whole
    window's cache, gives the eager model's greedy tokens, in fp32 (TF32) exactly and in bf16 up to
    rounding (`greedy_up_to_rounding`), for one sample and for three, in runs of several lengths (the
    cache's tensors kept between them); warm_up races it against the model's own forward, keeps the
    faster, and still decodes the eager tokens."""
    from minigpt.compiled_decoding import CompiledDecoding
    from minigpt.loading import load_model
    from minigpt.runtime import setup_device
    from minigpt.sampling import SamplingConfig, generate, penalized_scores

    device, _ = setup_device("cuda", "fp32")
    prompt = [464, 2068, 7586]

    def run(model, new, samples=1, compiled=None):
        config = SamplingConfig(max_new_tokens=new, greedy=True, repetition_penalty=2.0)
        return [t.tolist() for t in generate(model, prompt, config, samples, eos_id=None, compiled=compiled)]

    def greedy_up_to_rounding(model, steps, samples, within):
        """Whether each sample's tokens are, step by step, the eager model's greedy choice (its full
        forward over them, penalised) or within `within` x its largest score of it: compiled code
        fuses and rounds otherwise (bf16: four bf16 steps, 2^-6; the tiny model's bf16 logits hold
        exact ties), and TF32's (2^-9) can turn a near-tie in fp32 too."""
        config = SamplingConfig(max_new_tokens=len(steps), greedy=True, repetition_penalty=2.0)
        for row in zip(*steps):
            ids = torch.tensor([prompt + list(row)], device=device)
            with torch.no_grad():
                logits = model(ids)[0][0].float()
            for i, token in enumerate(row):
                n = len(prompt) + i
                scores = penalized_scores(logits[n - 1 : n], ids[:, :n], config)[0]
                if scores[token] < scores.max() - within * scores.abs().max():
                    return False
        return len(steps) > 0 and all(len(step) == samples for step in steps)

    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_model(tiny_minigpt_dir, device, dtype)
        compiled = CompiledDecoding(model)
        assert list(compiled.steps) == ["cudagraphs", "eager"] and compiled.chosen == "cudagraphs"

        def same_as_eager(new, samples):  # fp32 (TF32): the eager tokens, or a near-tie turned by TF32
            got = run(model, new, samples, compiled)
            if dtype == torch.float32 and got == run(model, new, samples):
                return True
            within = 2**-9 if dtype == torch.float32 else 2**-6
            return len(got) == new and greedy_up_to_rounding(model, got, samples, within)

        for new, samples in ((40, 1), (12, 1), (20, 3)):
            assert same_as_eager(new, samples), (dtype, new, samples)
        compiled.warm_up(1, dtype)  # (checks one step's logits against the model's: see AGREEMENT)
        timed = compiled.seconds_per_token
        assert set(timed) == {"cudagraphs", "eager"} and compiled.chosen == min(timed, key=timed.get)
        assert same_as_eager(40, 1), compiled.describe()
        print(dtype, compiled.describe())


def test_a_training_step_takes_a_batch_already_on_the_gpu(tmp_path):
    """train_step pins a CPU batch for an asynchronous copy; a batch already on the GPU (as the
    benchmarks hand it) is used as it is, and the step is the one a CPU batch gives."""
    from test_trainer import counting_blocks, make_trainer, micro_model

    losses = []
    for on_gpu in (False, True):
        model = micro_model().cuda()
        trainer = make_trainer(tmp_path / str(on_gpu), model, counting_blocks(8, 16, 300, seed=0), device="cuda")
        batch = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
        losses.append(float(trainer.train_step([batch.cuda() if on_gpu else batch])["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and math.isfinite(losses[0])


def test_torchrun_on_a_gpu_trains_over_nccl_as_a_plain_run(tmp_path, monkeypatch, shared_cache):
    """DDP on a GPU: under torchrun each process joins an NCCL process group (one GPU here, so one
    process, whose gradients still go through NCCL's all-reduce) and trains the plain run's steps:
    the same losses, the same weights."""
    from test_ddp import FLAGS, metrics, torchrun, weights

    monkeypatch.setenv("MINIGPT_CACHE", str(shared_cache))
    monkeypatch.setenv("NCCL_DEBUG", "VERSION")  # (NCCL prints its version when a group starts)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # (where torchrun leaves its torchelastic_* folder)
    plain = call_cli("train.py", *FLAGS, "--device", "cuda", "--dropout", "0", "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    ddp = torchrun(tmp_path / "ddp", "--device", "cuda", "--dropout", "0", nproc=1)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "NCCL version" in ddp.stdout + ddp.stderr
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ddp")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 20
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-4), (x, y)
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "ddp")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4) for k in wa)
