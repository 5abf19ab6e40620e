"""sample.py --trace / --show-probs / --score, and minigpt.trace, against transformers as the oracle:
the traced ids, probabilities and alternatives against transformers' greedy tokens and softmax, `kept`
against its warpers on the same logits, the scored loss against its loss; escape codes only on a
terminal; one-line errors for bad values."""

from __future__ import annotations

import io
import json
import math
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import ROOT, TINY_HF, call_cli, python_path, run_cli, save_hf_model
from minigpt.errors import MinigptError
from minigpt.loading import load_model
from minigpt.sampling import SamplingConfig, generate, next_token
from minigpt.streaming import complete, trace_output
from minigpt.trace import PROB_BANDS, StepRecorder, format_score, score, score_ids, token_text

PROMPT = "The quick brown fox jumps over the lazy dog because"
ESCAPE = re.compile(r"\x1b\[(\d+)m(.*?)\x1b\[0m", re.S)
# Probabilities are compared to 1e-4 (the acceptance bound); they come from fp32 logits that differ
# from transformers' by ~1e-6 (the inference layout sums in another order), so the bound has ~100x room.
PROB_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny transformers GPT-2 with a wide init (0.5): logits spread over several units, so the
    distributions are peaked enough for top-p and the colour bands to matter."""
    return save_hf_model(tmp_path_factory.mktemp("peaked_hf"), seed=1, initializer_range=0.5, **TINY_HF)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return load_model(hf_dir)[1]


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits (T, vocab) for every position of `ids`."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def band(prob: float) -> str:
    return next(code for lowest, code, _, _ in PROB_BANDS if prob >= lowest)


# --- generation: ids, probabilities, alternatives ---------------------------------------------


def test_greedy_trace_equals_transformers(hf_dir, hf_model, tokenizer, tmp_path):
    """The acceptance case, end to end in a subprocess: one row per generated token, ids equal to
    transformers' greedy tokens, prob and the alternatives equal to its softmax."""
    trace = tmp_path / "trace.jsonl"
    r = run_cli("sample.py", "--model", str(hf_dir), "--greedy", "--trace", str(trace),
                "--top-alternatives", "3", "--max-new-tokens", "20", PROMPT)
    assert r.returncode == 0, r.stderr
    prompt = tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, pad_token_id=50256)
    new = out[0, len(prompt):].tolist()
    rows = read_rows(trace)
    assert [row["id"] for row in rows] == new
    assert [(row["prompt"], row["sample"], row["step"]) for row in rows] == [(0, 0, i) for i in range(len(new))]
    probs = hf_logits(hf_model, prompt + new)[len(prompt) - 1 : -1].softmax(-1)  # row i predicts new[i]
    for i, row in enumerate(rows):
        top = probs[i].topk(3)
        assert abs(row["prob"] - probs[i, new[i]].item()) <= PROB_TOL
        assert [a["id"] for a in row["alternatives"]] == top.indices.tolist()
        assert max(abs(a["prob"] - p) for a, p in zip(row["alternatives"], top.values.tolist())) <= PROB_TOL
        # greedy decoding's candidate set is its argmax alone
        assert [a["kept"] for a in row["alternatives"]] == [True, False, False]
        assert row["candidates"] == 1 and abs(row["candidate_mass"] - top.values[0].item()) <= PROB_TOL
        assert row["text"] == tokenizer.decode([row["id"]])
    assert r.stdout == PROMPT + tokenizer.decode(new) + "\n"  # the trace changes nothing in the text


def test_trace_prob_is_after_the_repetition_penalty(hf_dir, hf_model, tokenizer):
    """With --repetition-penalty, prob is the softmax of the penalised logits (HF's processor)."""
    r = call_cli("sample.py", "--model", str(hf_dir), "--greedy", "--repetition-penalty", "1.5",
                 "--trace", "-", "--top-alternatives", "2", "--max-new-tokens", "8", PROMPT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stderr.splitlines()]
    prompt, new = tokenizer.encode(PROMPT), [row["id"] for row in rows]
    logits = hf_logits(hf_model, prompt + new)
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    for i, row in enumerate(rows):
        seen = torch.tensor([prompt + new[:i]])
        probs = penalty(seen, logits[len(prompt) - 1 + i].unsqueeze(0).clone())[0].softmax(-1)
        assert row["id"] == int(probs.argmax())
        assert abs(row["prob"] - probs[row["id"]].item()) <= PROB_TOL
        assert [a["id"] for a in row["alternatives"]] == probs.topk(2).indices.tolist()


def hf_candidates(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' candidate set for one row of logits: its warpers, in generate()'s order."""
    scores = logits.unsqueeze(0).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)  # the warpers do not read the ids
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores[0].isfinite()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 50, 0.95),  # the defaults
    (0.7, 20, 0.8),
    (1.0, 0, 0.5),  # top-p alone, over the whole vocabulary
    (1.6, 40, 1.0),  # top-k alone
    (0.5, 3, 0.9),
])
def test_kept_matches_transformers_warpers(hf_dir, hf_model, tokenizer, tmp_path, temperature, top_k, top_p):
    trace = tmp_path / "trace.jsonl"
    r = call_cli("sample.py", "--model", str(hf_dir), "--seed", "3", "--temperature", str(temperature),
                 "--top-k", str(top_k), "--top-p", str(top_p), "--trace", str(trace),
                 "--top-alternatives", "60", "--max-new-tokens", "8", PROMPT)
    assert r.returncode == 0, r.stderr
    rows = read_rows(trace)
    prompt, new = tokenizer.encode(PROMPT), [row["id"] for row in rows]
    logits = hf_logits(hf_model, prompt + new)[len(prompt) - 1 :]
    saw_dropped = False
    for i, row in enumerate(rows):
        kept = hf_candidates(logits[i], temperature, top_k, top_p)
        assert [a["kept"] for a in row["alternatives"]] == [bool(kept[a["id"]]) for a in row["alternatives"]]
        assert row["candidates"] == int(kept.sum())
        assert abs(row["candidate_mass"] - logits[i].softmax(-1)[kept].sum().item()) <= PROB_TOL
        assert kept[row["id"]]  # the sampled token was a candidate
        saw_dropped |= not all(a["kept"] for a in row["alternatives"])
    assert saw_dropped  # the filters cut inside the 60 alternatives: the comparison had both cases


def random_logits(seed: int, rows: int = 4, vocab: int = 1000) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature, top_k, top_p, tied", [
    (1.0, 50, 0.95, False), (0.6, 0, 0.7, False), (2.0, 10, 0.5, False), (1.0, 5, 1.0, True),
    (0.8, 1000, 0.3, False), (1.0, 0, 1e-9, False),  # p so small that only the guard keeps a token
])
def test_recorder_kept_equals_warpers_on_the_same_logits(temperature, top_k, top_p, tied):
    """On identical logits the candidate set is exactly transformers' (ties at the k-th value
    included), and the recorder draws the very token next_token draws."""
    logits = random_logits(0)
    if tied:
        logits = (logits * 2).round() / 2
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    recorder = StepRecorder(top_alternatives=1000)  # every token, so `kept` covers the vocabulary
    tokens = torch.zeros(4, 1, dtype=torch.long)
    picked = recorder(logits, tokens, config, torch.Generator().manual_seed(5))
    assert torch.equal(picked, next_token(logits, tokens, config, torch.Generator().manual_seed(5)))
    step = recorder.last
    for row in range(4):
        kept = hf_candidates(logits[row], temperature, top_k, top_p)
        ours = torch.zeros(1000, dtype=torch.bool)
        ours[step.alt_ids[row]] = step.alt_kept[row]
        assert torch.equal(ours, kept)
        assert int(step.candidates[row]) == int(kept.sum())
        torch.testing.assert_close(step.candidate_mass[row], logits[row].softmax(-1)[kept].sum())
        torch.testing.assert_close(step.prob[row], logits[row].softmax(-1)[picked[row]])


def test_every_sample_and_prompt_gets_its_rows(hf_dir, tokenizer, tmp_path):
    """--num-samples 3, two prompts: one row per token each sample kept (its EOS included)."""
    trace = tmp_path / "t.jsonl"
    r = call_cli("sample.py", "--model", str(hf_dir), "--seed", "0", "--num-samples", "3", "--trace", str(trace),
                 "--max-new-tokens", "6", "Hello", "Why")
    assert r.returncode == 0, r.stderr
    rows = read_rows(trace)
    outputs = r.stdout.split("\n\n")
    for prompt_index, prompt in enumerate(("Hello", "Why")):
        for s in range(3):
            ids = [row["id"] for row in rows if (row["prompt"], row["sample"]) == (prompt_index, s)]
            assert [row["step"] for row in rows if (row["prompt"], row["sample"]) == (prompt_index, s)] == list(range(len(ids)))
            text = tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
            assert outputs[3 * prompt_index + s].rstrip("\n") == prompt + text


# --- --show-probs: colours on a terminal only ---------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--num-samples", "2"], ["--dtype", "bf16"], ["--quantize", "int8"],
                                   ["--dtype", "bf16", "--quantize", "int8"]])
def test_piped_show_probs_is_plain_and_changes_nothing(hf_dir, extra):
    args = ["--model", str(hf_dir), "--seed", "11", "--max-new-tokens", "12", *extra, PROMPT]
    plain = call_cli("sample.py", *args)
    shown = call_cli("sample.py", "--show-probs", "--trace", "-", *args)
    assert plain.returncode == shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and shown.stdout == plain.stdout
    assert "stdout is not a terminal" in shown.stderr
    assert sum(line.startswith("{") for line in shown.stderr.splitlines()) >= 12 * (2 if "--num-samples" in extra else 1) - 2


def test_interactive_with_trace_and_show_probs_when_piped(hf_dir, tmp_path, monkeypatch):
    trace = tmp_path / "qa.jsonl"
    args = ["--model", str(hf_dir), "--interactive", "--greedy", "--max-new-tokens", "5"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is DNA?\n\nWhy?\n"))
    plain = call_cli("sample.py", *args)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is DNA?\n\nWhy?\n"))
    r = call_cli("sample.py", *args, "--show-probs", "--trace", str(trace))
    assert r.returncode == 0 and r.stdout == plain.stdout and "\x1b" not in r.stdout, r.stderr
    assert r.stdout.count("\n") == 2  # two answers
    rows = read_rows(trace)
    assert {row["prompt"] for row in rows} == {0, 1}  # one index per question


def run_on_terminal(*args: str) -> tuple[str, str]:
    """sample.py with stdout on a pseudo-terminal (stderr piped): (terminal output, stderr)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": python_path(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], stdout=follower,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    return b"".join(chunks).decode().replace("\r\n", "\n"), stderr


def test_terminal_output_is_coloured_by_probability(hf_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    args = ["--model", str(hf_dir), "--greedy", "--max-new-tokens", "12", PROMPT]
    screen, stderr = run_on_terminal("--show-probs", "--trace", str(trace), *args)
    plain = call_cli("sample.py", *args).stdout
    assert ESCAPE.sub(r"\2", screen) == plain  # the same text once the colours are taken out
    rows = [row for row in read_rows(trace) if row["text"]]
    assert [(code, text) for code, text in ESCAPE.findall(screen)] == [(band(row["prob"]), row["text"]) for row in rows]
    assert "token probability: green >= 50% | yellow 20-50% | magenta 5-20% | red < 5%" in stderr


def test_complete_colours_every_sample(hf_dir, tmp_path):
    """The library: each sample of a batch coloured token by token, the text underneath unchanged."""
    model, tokenizer = load_model(hf_dir)
    config = SamplingConfig(max_new_tokens=10)
    out, coloured_out = io.StringIO(), io.StringIO()
    plain = complete(model, tokenizer, "Hi", config, num_samples=2, generator=torch.Generator().manual_seed(0), out=out)
    coloured = complete(model, tokenizer, "Hi", config, num_samples=2, generator=torch.Generator().manual_seed(0),
                        out=coloured_out, coloured=True)
    assert coloured.texts == plain.texts and ESCAPE.sub(r"\2", coloured_out.getvalue()) == out.getvalue()
    assert coloured_out.getvalue().count("\x1b[0m") >= 2 * 8


# --- --score --------------------------------------------------------------------------------


def test_score_equals_transformers_loss(hf_dir, hf_model, tokenizer, tmp_path):
    text = "The sky is blue because of Rayleigh scattering: short wavelengths scatter more."
    trace = tmp_path / "score.jsonl"
    r = call_cli("sample.py", "--model", str(hf_dir), "--score", text, "--trace", str(trace), "--top-alternatives", "3",
                 "--stats")
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("kernels: lm_head ") for line in r.stderr.splitlines()), r.stderr  # --stats
    ids = tokenizer.encode(text)
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    printed = float(re.search(r"mean loss (\S+) nats/token \| perplexity (\S+)", r.stdout).group(1))
    assert abs(printed - expected) <= 1e-4 * expected
    model = load_model(hf_dir)[0]
    result = score(model, tokenizer, text)
    assert abs(result.loss - expected) <= 1e-4 * expected and math.isclose(result.perplexity, math.exp(result.loss))
    # --trace: a row for every position after the first, with transformers' probabilities
    rows = read_rows(trace)
    probs = hf_logits(hf_model, ids)[:-1].softmax(-1)
    assert [row["step"] for row in rows] == list(range(1, len(ids))) and [row["id"] for row in rows] == ids[1:]
    for row, p in zip(rows, probs):
        assert abs(row["prob"] - p[row["id"]].item()) <= PROB_TOL
        assert [a["id"] for a in row["alternatives"]] == p.topk(3).indices.tolist()
    # the report names the least likely tokens, least likely first
    least = sorted(rows, key=lambda row: row["prob"])[:3]
    surprising = re.search(r"most surprising: (.*)", r.stdout).group(1)
    assert surprising.startswith(", ".join(f"{json.dumps(row['text'])} ({-math.log2(row['prob']):.1f} bits)" for row in least))


def test_a_bf16_models_score_is_the_fp32_loss_of_its_logits(hf_dir, tokenizer):
    """A bf16 model's --score: its bf16 logits go through the log-softmax in fp32 (as transformers'
    loss does), so the loss is the fp32 mean of those same logits' negative log-probabilities. A
    log-softmax in bf16 gave 21.540179 here where 21.541960 is right (10.977679 for 10.974556 on a less
    peaked model), and no test noticed: every score test read an fp32 model."""
    model = load_model(hf_dir, "cpu", torch.bfloat16)[0]
    ids = tokenizer.encode("The sky is blue because the air scatters blue light more than red light")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0, :-1]
    assert logits.dtype == torch.bfloat16
    nats = -torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    result = score_ids(model, tokenizer, ids)
    assert result.loss == pytest.approx(nats.double().mean().item(), rel=1e-6, abs=0)
    assert result.nats == pytest.approx(nats.tolist(), rel=1e-6, abs=0)
    probs = torch.softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert [row["prob"] for row in result.rows] == pytest.approx(probs.tolist(), rel=1e-5, abs=1e-9)


def test_score_slides_over_texts_longer_than_the_window(hf_dir, hf_model, tokenizer):
    """400 tokens, window 256: windows [0, 256), [128, 384), [256, 400); each token is scored once,
    by the first window that predicts it, so every token after the first window keeps >= 128 tokens
    of context (transformers' strided perplexity)."""
    ids = torch.randint(0, 50000, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    model = load_model(hf_dir)[0]
    result = score_ids(model, tokenizer, ids)
    nll = []
    for begin, end, first in [(0, 256, 1), (128, 384, 256), (256, 400, 384)]:
        logp = hf_logits(hf_model, ids[begin:end]).log_softmax(-1)
        nll += [-logp[t - 1 - begin, ids[t]].item() for t in range(first, end)]
    assert len(result.rows) == len(nll) == 399
    expected = sum(nll) / len(nll)
    assert abs(result.loss - expected) <= 1e-4 * expected
    assert max(abs(row["prob"] - math.exp(-n)) for row, n in zip(result.rows, nll)) <= PROB_TOL


@pytest.mark.parametrize("window", [33, 3])
def test_score_with_an_odd_window_is_transformers_strided_perplexity(tmp_path, tokenizer, window):
    """transformers' strided perplexity with stride W // 2: windows start at 0, s, 2s, ...; each
    scores the tokens the one before it did not reach. With an odd window the slide used to be
    W - W // 2, one more than the stride, and the losses differed (33: 11.00673 against 10.98976)."""
    folder = save_hf_model(tmp_path / "odd", seed=2, **{**TINY_HF, "n_positions": window})
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 50000, (3 * window + 5,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, reached, stride = [], 1, window // 2  # (the loop of transformers' perplexity guide)
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        logp = hf_logits(hf, ids[begin:end]).log_softmax(-1)
        nll += [-logp[t - 1 - begin, ids[t]].item() for t in range(reached, end)]
        reached = end
        if end == len(ids):
            break
    result = score_ids(load_model(folder)[0], tokenizer, ids)
    assert len(result.rows) == len(nll) == len(ids) - 1
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_score_report_and_colours(hf_dir, tokenizer):
    model = load_model(hf_dir)[0]
    result = score(model, tokenizer, "Why is the sky blue?", SamplingConfig(top_k=5, top_p=1.0))
    report = format_score(result, tokenizer, coloured=True)
    first_line = report.splitlines()[0]
    assert ESCAPE.sub(r"\2", first_line) == "Why is the sky blue?"
    assert [code for code, _ in ESCAPE.findall(first_line)] == [band(row["prob"]) for row in result.rows]
    assert "\x1b" not in format_score(result, tokenizer)
    assert all(row["candidates"] == 5 for row in result.rows)  # top-k 5, no ties in fp32 logits


def test_score_report_columns_and_totals_are_the_scores_numbers(hf_dir, tokenizer):
    """Each report row: its probability, its surprisal in bits (-log2 p, not nats), and the model's
    top guess (alternatives[0]; "(this token)" when the token is it); the last line: the mean loss and
    its perplexity exp(loss). The text ends with the model's own argmax, so both kinds of guess show."""
    model = load_model(hf_dir)[0]
    ids = tokenizer.encode("Why is the sky blue?")
    with torch.no_grad():
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    result = score_ids(model, tokenizer, ids)
    report = format_score(result, tokenizer).splitlines()
    table = [re.fullmatch(r" *(\d+)  +(\S+)  +(\S+)  (\".*?\") +  (.*)", line) for line in report[2:-2]]
    assert len(table) == len(result.rows) == len(ids) - 1 and all(table)
    guesses = []
    for row, line in zip(result.rows, table):
        step, prob, bits, text, guess = line.groups()
        assert (int(step), float(prob), json.loads(text)) == (row["step"], float(f"{row['prob']:.4g}"), row["text"])
        assert abs(float(bits) - -math.log2(row["prob"])) <= 0.05 + 1e-6, (line.group(0), row["prob"])
        best = row["alternatives"][0]
        assert best["prob"] == max(a["prob"] for a in row["alternatives"])
        assert guess == ("(this token)" if best["id"] == row["id"] else f"{json.dumps(best['text'])} {best['prob']:.4g}")
        guesses.append(guess == "(this token)")
    assert guesses[-1] and not all(guesses)  # (both kinds of row are shown)
    assert max(float(line.group(3)) for line in table) > 5  # (bits and nats differ by more than the rounding)
    totals = re.fullmatch(r"(\d+) tokens scored \| mean loss (\S+) nats/token \| perplexity (\S+)", report[-1])
    assert totals and int(totals.group(1)) == len(result.rows)
    assert float(totals.group(2)) == pytest.approx(result.loss, rel=1e-5)
    assert float(totals.group(3)) == pytest.approx(math.exp(result.loss), rel=1e-5)


def test_each_probability_band_begins_at_its_lower_edge_and_zero_is_red():
    """The colour bands are green >= 50%, yellow 20-50%, magenta 5-20%, red < 5%: each edge belongs to
    the band above it, and a probability that underflowed to 0 is red. Comparing with > instead of >=
    made 0.5 yellow and 0.0 match no band (StopIteration: `--score --show-probs` on a terminal failed
    on such a text, and so did the coloured legend), and no test noticed."""
    from minigpt.trace import colour, legend

    expected = [(1.0, "32"), (0.5, "32"), (0.4999, "33"), (0.2, "33"), (0.1999, "35"), (0.05, "35"),
                (0.0499, "31"), (1e-30, "31"), (0.0, "31")]
    assert [(p, colour("x", p)) for p, _ in expected] == [(p, f"\x1b[{code}mx\x1b[0m") for p, code in expected]
    assert ESCAPE.findall(legend(True)) == [("32", "green >= 50%"), ("33", "yellow 20-50%"), ("35", "magenta 5-20%"),
                                            ("31", "red < 5%")]


def test_the_coloured_text_keeps_characters_split_across_tokens(hf_dir, tokenizer):
    """日 and 本 each span two GPT-2 tokens: the coloured line shows them (each with the token that
    ends it) where joining each token's own text gave U+FFFD."""
    model = load_model(hf_dir)[0]
    result = score(model, tokenizer, "I love 日本 café 🙂")
    first_line = format_score(result, tokenizer, coloured=True).splitlines()[0]
    assert ESCAPE.sub(r"\2", first_line) == "I love 日本 café 🙂"


def test_surprisal_stays_finite_where_a_probability_underflows(hf_dir, tokenizer):
    """A model sure enough that a token's probability is below fp32's smallest (p = 0 in the row):
    its surprisal is still -log2 p, from the log-softmax (it printed "inf bits"), and the most
    surprising tokens are ordered by it, not by the rounded probability."""
    model = load_model(hf_dir)[0]
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(40)
        model.transformer.ln_f.bias.mul_(40)
    result = score(model, tokenizer, "The sky is blue because the air")
    with torch.no_grad():
        logits = model(torch.tensor([result.ids]))[0][0, :-1].double()
    nats = -torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(result.ids[1:]).unsqueeze(1)).squeeze(1)
    assert any(row["prob"] == 0 for row in result.rows)  # (else this tests nothing)
    bits = [result.bits(row) for row in result.rows]
    assert all(math.isfinite(b) and b > 0 for b in bits)
    torch.testing.assert_close(torch.tensor(bits, dtype=torch.float64), nats / math.log(2), rtol=1e-5, atol=1e-3)
    order = sorted(range(len(bits)), key=lambda j: -bits[j])
    assert [row["step"] for row in result.most_surprising(3)] == [j + 1 for j in order[:3]]
    report = format_score(result, tokenizer)
    assert "inf bits" not in report and f"({bits[order[0]]:.1f} bits)" in report.splitlines()[-2].split(", ")[0]
    assert result.loss == pytest.approx(float(nats.mean()), rel=1e-6)


def test_a_score_file_is_scored_as_its_bytes_say(hf_dir, tmp_path, monkeypatch):
    """A file with \\r\\n or \\r line ends scores the same text from its path as from stdin (the
    path's text had them made \\n: another text, another loss)."""
    text = tmp_path / "crlf.txt"
    text.write_bytes(b"Line one\r\nLine two\rLine three\r\n")
    model = ["--model", str(hf_dir)]
    from_path = call_cli("sample.py", *model, "--score-file", str(text))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.read_bytes())))
    from_stdin = call_cli("sample.py", *model, "--score-file", "-")
    inline = call_cli("sample.py", *model, "--score", "Line one\r\nLine two\rLine three\r\n")
    assert from_path.returncode == 0, from_path.stderr
    assert from_path.stdout == from_stdin.stdout == inline.stdout
    assert '"\\r\\n"' in from_path.stdout or '"\\r"' in from_path.stdout


def test_token_text_decodes_as_far_as_the_bytes_go(tokenizer):
    """GPT-2 splits 🙂 (f0 9f 99 82) into f0 9f + 99 82 and 日 (e6 97 a5) into e6 97 + a5."""
    assert [tokenizer.decode_bytes([t]) for t in tokenizer.encode("🙂日")] == [b"\xf0\x9f", b"\x99\x82", b"\xe6\x97", b"\xa5"]
    # an unfinished character at the end is left out; a stray continuation byte is one U+FFFD each
    assert [token_text(tokenizer, t) for t in tokenizer.encode("🙂日")] == ["", "\ufffd\ufffd", "", "\ufffd"]
    assert [token_text(tokenizer, t) for t in tokenizer.encode(" €5 é")] == [" €", "5", " é"]


# --- bad values: one line, exit 2 ---------------------------------------------------------------


def assert_one_line(result, *needles: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_values_are_one_line_and_exit_2(hf_dir, tmp_path):
    model = ["--model", str(hf_dir)]
    assert_one_line(call_cli("sample.py", *model, "--trace", "t.jsonl", "--top-alternatives", "0", "hi"),
                    "--top-alternatives", "'0'")
    assert_one_line(call_cli("sample.py", *model, "--trace", str(tmp_path / "missing" / "t.jsonl"), "hi"),
                    str(tmp_path / "missing"), "does not exist")
    assert not (tmp_path / "missing").exists()
    assert_one_line(call_cli("sample.py", *model, "--trace", str(tmp_path), "hi"), "is a folder")
    assert_one_line(call_cli("sample.py", *model, "--score", ""), "--score", "empty")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line(call_cli("sample.py", *model, "--score-file", str(tmp_path / "empty.txt")), "empty.txt", "empty")
    assert_one_line(call_cli("sample.py", *model, "--score-file", str(tmp_path / "nope.txt")), "nope.txt", "not found")
    assert_one_line(call_cli("sample.py", *model, "--score", "Hi"), "1 token", "at least 2")
    assert_one_line(call_cli("sample.py", *model, "--score", "a b", "--repetition-penalty", "1.2"), "repetition penalty")
    assert_one_line(call_cli("sample.py", *model, "--score", "a b", "a prompt"), "--score")


def test_a_failed_run_leaves_an_earlier_trace_alone(hf_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("earlier\n")
    assert_one_line(call_cli("sample.py", "--model", str(tmp_path / "no_model"), "--trace", str(trace), "hi"))
    assert trace.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
    r = call_cli("sample.py", "--model", str(hf_dir), "--greedy", "--max-new-tokens", "2", "--trace", str(trace), "hi")
    assert r.returncode == 0 and len(read_rows(trace)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # no temporary file left


def test_a_trace_never_writes_over_what_the_run_reads_or_a_models_files(hf_dir, tmp_path):
    """The weights sampled from, the prompt or score file, any file inside the model's folder or in
    another model's (a training run's metrics): each refused in one line before any work, and left
    as it was, also through a symlink."""
    import shutil

    model, other = shutil.copytree(hf_dir, tmp_path / "model"), shutil.copytree(hf_dir, tmp_path / "run")
    (model / "notes").mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    prompts, text = tmp_path / "prompts.txt", tmp_path / "text.txt"
    prompts.write_text("hi\n")
    text.write_text("a b c\n")
    (tmp_path / "link.jsonl").symlink_to(model / "model.safetensors")
    before = {p: p.read_bytes() for p in (model / "model.safetensors", other / "metrics.jsonl", prompts, text)}
    cases = [
        (["--trace", str(model / "model.safetensors"), "hi"], "which this run reads"),
        (["--trace", str(tmp_path / "link.jsonl"), "hi"], "which this run reads"),
        (["--trace", str(model / "notes" / "t.jsonl"), "hi"], "which this run reads"),
        (["--trace", str(prompts), "--file", str(prompts)], "which this run reads"),
        (["--trace", str(text), "--score-file", str(text)], "which this run reads"),
        (["--trace", str(other / "metrics.jsonl"), "hi"], "holds a model (model.safetensors)"),
    ]
    for args, needle in cases:
        generating = [] if "--score-file" in args else ["--max-new-tokens", "2"]
        assert_one_line(call_cli("sample.py", "--model", str(model), *generating, *args), needle)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (model / "notes").iterdir()) == []
    r = call_cli("sample.py", "--model", str(model), "--greedy", "--max-new-tokens", "2", "--file", str(prompts),
                 "--trace", str(tmp_path / "t.jsonl"))
    assert r.returncode == 0 and len(read_rows(tmp_path / "t.jsonl")) == 2


def test_trace_output_is_replaced_whole_kept_on_ctrl_c_and_untouched_on_an_error(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("earlier\n")
    with pytest.raises(ValueError), trace_output(str(trace)) as f:
        f.write("half\n")
        raise ValueError("a bug")
    assert trace.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
    with pytest.raises(KeyboardInterrupt), trace_output(str(trace)) as f:
        f.write("so far\n")
        raise KeyboardInterrupt  # Ctrl-C: the lines written so far replace the earlier file
    assert trace.read_text() == "so far\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
    # stdout's own error in the block (`| head` closed it; a full disk) is not the trace's: it was
    # "t.jsonl: saving failed ([Errno 32] Broken pipe)", exit 2 and the rows lost, where the CLI
    # ends quietly (141) without --trace. It goes on as it is; the file keeps the rows written so far.
    with pytest.raises(BrokenPipeError), trace_output(str(trace)) as f:
        f.write("before the pipe closed\n")
        raise BrokenPipeError(32, "Broken pipe")
    assert trace.read_text() == "before the pipe closed\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
    # and the trace's own write error names the trace, also written through to a device (it was
    # "writing the output", which reads as stdout)
    full = Path("/dev/full")
    if full.exists():
        with pytest.raises(MinigptError, match=r"^--trace /dev/full: writing it failed \(No space left on device\)$"):
            with trace_output(str(full)) as f:
                f.write("x" * 100_000)
                f.flush()


def test_a_trace_path_that_is_no_plain_file_is_written_through_not_replaced(tmp_path):
    """A symlink keeps pointing where it did and its target gets the lines; a device (here a
    second /dev/null) stays a device: a rename over either would have put a plain file there."""
    import stat

    (tmp_path / "real.jsonl").write_text("earlier\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to("real.jsonl")
    with trace_output(str(link)) as f:
        f.write("new\n")
    assert link.is_symlink() and os.readlink(link) == "real.jsonl" and (tmp_path / "real.jsonl").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:  # (not root: /dev/null itself is then safe to try, a rename there would fail)
        device = Path("/dev/null")
    with trace_output(str(device)) as f:
        f.write("gone\n")
    assert stat.S_ISCHR(device.stat().st_mode)
    with pytest.raises(MinigptError, match="--trace: empty path"), trace_output(""):
        pass


def test_generate_without_a_recorder_is_unchanged(hf_dir, tokenizer):
    """A seeded run draws the same tokens with and without the recorder watching."""
    model = load_model(hf_dir)[0]
    config = SamplingConfig(max_new_tokens=10)
    prompt = tokenizer.encode(PROMPT)
    plain = [t.tolist() for t in generate(model, prompt, config, 2, torch.Generator().manual_seed(4), eos_id=None)]
    recorder = StepRecorder(2)
    watched = [t.tolist() for t in generate(model, prompt, config, 2, torch.Generator().manual_seed(4), pick=recorder,
                                            eos_id=None)]
    assert watched == plain and recorder.last.token.tolist() == plain[-1]


# --- score_ids and score from a notebook -------------------------------------------------------


def test_score_ids_takes_a_1d_tensor_and_refuses_a_batch_or_bad_ids(hf_dir, tokenizer):
    """The ids go through `sampling.token_ids`, as generate's prompt does: a (1, T) tensor was
    "the text is 1 token", an id beyond the vocabulary torch's bare IndexError."""
    model = load_model(hf_dir)[0]
    ids = tokenizer.encode(PROMPT)
    expected = score_ids(model, tokenizer, ids)
    from_tensor = score_ids(model, tokenizer, torch.tensor(ids))
    assert from_tensor.ids == ids and from_tensor.rows == expected.rows and from_tensor.loss == expected.loss
    with pytest.raises(TypeError) as error:
        score_ids(model, tokenizer, torch.tensor([ids]))
    assert str(error.value) == ("ids: a list of token ids or a 1-D integer tensor, got a 2-D torch.int64 tensor; "
                                "for one row of a batch pass ids[0]")
    with pytest.raises(TypeError) as error:
        score_ids(model, tokenizer, PROMPT)
    assert str(error.value) == ("ids: a list of token ids or a 1-D integer tensor, got str; "
                                "encode text with tokenizer.encode")
    with pytest.raises(MinigptError) as error:
        score_ids(model, tokenizer, [464, 70000, 2068])
    assert str(error.value) == "ids: token id 70000 is outside the model's vocabulary of 50257 tokens (ids 0 to 50256)"
    for bad in (0, 2.0, "3"):  # (2.0 was taken, then torch's topk() TypeError at the first step)
        for call in (lambda: score_ids(model, tokenizer, ids, top_alternatives=bad), lambda: StepRecorder(bad)):
            with pytest.raises(MinigptError) as error:
                call()
            assert str(error.value) == f"top_alternatives must be an integer >= 1, got {bad!r}"


def test_scoring_refuses_a_model_in_training_mode_with_dropout(hf_dir, tokenizer):
    """With dropout on, each score of the same text gave another loss."""
    model = load_model(hf_dir)[0]
    text = "The sky is blue because of Rayleigh scattering."
    expected = score(model, tokenizer, text).loss
    model.train()
    for call in (lambda: score(model, tokenizer, text), lambda: score_ids(model, tokenizer, tokenizer.encode(text))):
        with pytest.raises(MinigptError) as error:
            call()
        assert str(error.value) == ("scoring needs the model in eval mode (model.eval()): in training mode its "
                                    "dropout (0.1) makes every output random")
    assert score(model.eval(), tokenizer, text).loss == expected
