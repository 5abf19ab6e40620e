"""sample.py: greedy output equal to transformers' generate, streaming, prompts from files and
stdin, --stats, --interactive, and one-line errors for bad input."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import sys

import pytest
import torch

import sample
from conftest import call_cli, needs_cpu_compiler, run_cli
from minigpt.errors import MinigptError

PROMPT = "Somatic hypermutation allows the immune system to"
STATS = re.compile(
    r"^prompt tokens \d+ \| time to first token \d+\.\d{3} s \| new tokens \d+ \| decode \d+\.\d tokens/s$"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_greedy_text(hf_dir, tokenizer, prompt: str, n: int) -> str:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, pad_token_id=50256,
        )
    new = out[0, len(ids):].tolist()
    if 50256 in new:
        new = new[: new.index(50256)]
    return tokenizer.decode(new)


def test_greedy_cli_equals_hf_generate(tiny_hf_dir, gpt2_tokenizer):
    """The acceptance test, end to end: a subprocess, the HF folder converted on the fly."""
    expected = PROMPT + hf_greedy_text(tiny_hf_dir, gpt2_tokenizer, PROMPT, 25) + "\n"
    r = run_cli("sample.py", "--model", str(tiny_hf_dir), "--greedy", "--max-new-tokens", "25", "--stats", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert STATS.match(r.stderr.strip().splitlines()[-1]), r.stderr
    assert "new tokens 25 " in r.stderr


def test_in_process_greedy_matches_too(tiny_minigpt_dir, tiny_hf_dir, gpt2_tokenizer, capsys):
    sample.main(["--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "12", PROMPT, "Why"])
    out = capsys.readouterr().out
    expected = [p + hf_greedy_text(tiny_hf_dir, gpt2_tokenizer, p, 12) + "\n" for p in (PROMPT, "Why")]
    assert out == "\n".join(expected)  # a blank line between the outputs of two prompts


def test_without_a_model_the_hubs_distilgpt2_fails_in_its_own_words(tmp_path, monkeypatch, tiny_hf_dir):
    """Every failure of the default model was "could not be fetched (the Hugging Face Hub is
    unreachable or offline)", a cached copy without its tokenizer too."""
    from conftest import call_cli

    monkeypatch.chdir(tmp_path)  # (no checkpoints/eli5 here)
    broken = tmp_path / "snapshot"
    shutil.copytree(tiny_hf_dir, broken, ignore=shutil.ignore_patterns("tokenizer.json", "vocab.json", "merges.txt"))

    def offline(repo, patterns, optional=()):
        raise MinigptError(f"{repo.repo_id}: no such local folder, and the Hugging Face Hub could not provide it (offline)")

    for download, cause in ((offline, "no such local folder, and the Hugging Face Hub could not provide it (offline)"),
                            # (a cache holding part of the repo: the Hub's reason, not the snapshot folder's lack)
                            (lambda repo, patterns, optional=(): broken, "distilbert/distilgpt2: no such local folder; "
                             "the local cache holds part of the repository but no tokenizer.json (nor vocab.json + "
                             "merges.txt) (a download that stopped part-way?), and the Hugging Face Hub could not "
                             "provide it (")):
        monkeypatch.setattr("minigpt.hub.HubRepo.files", download)
        result = call_cli("sample.py", "hi")
        assert result.returncode == 2
        [line] = result.stderr.splitlines()
        assert line.startswith("error: no --model given and no checkpoint in checkpoints/eli5/; ")
        assert cause in line and line.endswith("`python train.py --preset tiny` makes one in checkpoints/tiny)")


def test_seeded_sampling_reproducible_and_batched(tiny_minigpt_dir, capsys):
    args = ["--model", str(tiny_minigpt_dir), "--max-new-tokens", "15", "--num-samples", "3"]
    sample.main(args + ["--seed", "7", "Hello"])
    first = capsys.readouterr().out
    sample.main(args + ["--seed", "7", "Hello"])
    assert capsys.readouterr().out == first
    sample.main(args + ["--seed", "8", "Hello"])
    assert capsys.readouterr().out != first
    samples = first.split("\n\n")
    assert len(samples) == 3 and all(s.startswith("Hello") for s in samples)
    assert len(set(samples)) == 3


def test_each_seeded_prompt_gets_the_text_it_gets_alone(tiny_minigpt_dir, tmp_path, capsys):
    """One generator served every prompt of a --file, so under --seed a prompt's text hung on the
    prompts before it (how many tokens they drew): line 57's answer could not be had again alone.
    Each prompt starts from the seed; without --seed, prompts still differ (one random generator)."""
    args = ["--model", str(tiny_minigpt_dir), "--max-new-tokens", "12", "--num-samples", "2"]
    alone = {}
    for prompt in ("Hello", "A"):
        sample.main([*args, "--seed", "7", prompt])
        alone[prompt] = capsys.readouterr().out
    (tmp_path / "two.txt").write_text("Hello\nA\n", encoding="utf-8")
    sample.main([*args, "--seed", "7", "--file", str(tmp_path / "two.txt")])
    assert capsys.readouterr().out == alone["Hello"] + "\n" + alone["A"]
    sample.main([*args, "--seed", "7", "A", "A"])
    assert capsys.readouterr().out == alone["A"] + "\n" + alone["A"]
    sample.main([*args, "A", "A"])
    out = capsys.readouterr().out  # (unseeded: one random generator, two texts)
    half = out[: (len(out) - 1) // 2]
    assert out.startswith("A") and out != half + "\n" + half


def test_stdin_file_empty_prompt_and_int8(tiny_minigpt_dir, tiny_hf_dir, gpt2_tokenizer, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    sample.main(["--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "3",
                 "--quantize", "int8", "-", "", "--file", str(prompts)])
    outputs = capsys.readouterr().out.split("\n\n")
    # stdin's line, the empty prompt, then the file's two non-blank lines, each continued as the
    # library's int8 layout continues it
    expected = [p + int8_greedy_text(tiny_minigpt_dir, p, 3) for p in ("from stdin", "", "first prompt", "second prompt")]
    assert outputs == [*expected[:3], expected[3] + "\n"]
    # and where fp32's top two logits are far apart (smallest gap 0.31, int8 moves logits by <= 0.08),
    # int8 must pick transformers' fp32 tokens
    assert outputs[2] == "first prompt" + hf_greedy_text(tiny_hf_dir, gpt2_tokenizer, "first prompt", 3)


def test_a_decoding_step_beyond_the_memory_is_refused_before_the_kernels_race(tiny_minigpt_dir, monkeypatch):
    """The kernels' race (and --compile's warm-up) run on --num-samples rows before generate checks
    its step: --num-samples 60000 was killed for memory after minutes of timing, and --kernel mkl
    with 2**63 samples a RuntimeError traceback from MKL's packing."""
    import minigpt.inference

    monkeypatch.setattr("minigpt.runtime.available_memory", lambda device: 2**30)
    monkeypatch.setattr(minigpt.inference, "prepare_for_inference", lambda *a, **k: pytest.fail("kernels raced first"))
    rows = 2**30 // (50257 * 12) + 1  # (a step's logits and the sampler's copies: 12 bytes a row per token)
    for flags in (["--num-samples", str(rows)], ["--kernel", "mkl", "--num-samples", str(2**63)]):
        with pytest.raises(MinigptError, match=rf"^--num-samples {flags[-1]}: a decoding step with its KV cache "
                                               r"\(.*\) does not fit in memory$"):
            sample.main(["--model", str(tiny_minigpt_dir), "--max-new-tokens", "2", *flags, "hi"])


def test_a_bf16_models_kv_cache_is_checked_as_the_fp32_one_it_will_hold_before_the_kernels_race(
    tiny_minigpt_dir, monkeypatch
):
    """On the CPU a bf16 model decodes with an fp32 residual stream, so its KV cache is fp32 once
    prepared: the check before the kernels' race counted 2 bytes a value, passed a cache that then
    did not fit, and the refusal came only after the race, from generate."""
    import minigpt.inference
    from minigpt.loading import load_model
    from minigpt.sampling import decoding_bytes

    model, _ = load_model(tiny_minigpt_dir, torch.device("cpu"), torch.bfloat16)
    flags = ["--num-samples", "64", "--max-new-tokens", "4000"]  # (a whole context window each)
    (cache, step), (fp32_cache, _) = (decoding_bytes(model, 64, 1, 4000, dtype) for dtype in (None, torch.float32))
    assert fp32_cache == 2 * cache
    as_bf16, as_fp32 = cache + step, fp32_cache + step
    monkeypatch.setattr("minigpt.runtime.available_memory", lambda device: (as_bf16 + as_fp32) // 2)
    monkeypatch.setattr(minigpt.inference, "prepare_for_inference", lambda *a, **k: pytest.fail("kernels raced first"))
    with pytest.raises(MinigptError, match=rf"^--num-samples 64: a decoding step with its KV cache \(64 rows of "
                                           rf"50,257 logits, {as_fp32 / 1e9:,.1f} GB\) does not fit in memory$"):
        sample.main(["--model", str(tiny_minigpt_dir), "--dtype", "bf16", *flags, "hi"])


def test_a_prompt_not_utf8_is_refused_before_any_answer_and_stdin_read_once(tiny_minigpt_dir, capsys):
    """A PROMPT of bytes that are not UTF-8 was refused only when its turn came, after the prompts
    before it were answered (and a blank line printed), in words that named no prompt; "- --file -"
    read stdin twice, the second time nothing."""
    model = ["--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "2"]
    with pytest.raises(MinigptError, match=r"^PROMPT 2: not UTF-8 text \(invalid start byte at byte 2\)$"):
        sample.main([*model, "ok", "ab\udcffcd"])  # (b"ab\xffcd" as sys.argv holds it)
    with pytest.raises(MinigptError, match=r"^PROMPT 1: not UTF-8 text \(a lone surrogate at character 1\)$"):
        sample.main([*model, "x\ud800"])  # (a surrogate no byte makes: from Python, sample.main([...]))
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as usage:
        sample.main([*model, "-", "--file", "-"])
    assert usage.value.code == 2 and "stdin (-) is read once" in capsys.readouterr().err


def test_a_prompt_line_ends_only_at_a_line_break(tmp_path, monkeypatch):
    """One prompt per line, where `--interactive` would end the line: at \\n, \\r\\n or \\r. A form feed,
    U+2028 or U+0085 inside a line is part of its prompt (`str.splitlines` split the line there)."""
    content = "first\u2028half\x0cand \x85more\r\nsecond\rthird\n\n"
    expected = ["first\u2028half\x0cand \x85more", "second", "third"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content.encode("utf-8"))
    assert sample.read_lines(str(prompts)) == expected
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(content.encode("utf-8"))))
    assert sample.read_lines("-") == expected


def test_a_byte_order_mark_is_not_part_of_the_text(tiny_minigpt_dir, tmp_path, capsys, monkeypatch):
    """Notepad and Excel start UTF-8 files with a byte-order mark: a prompt file, stdin and a
    --score-file give what they give without it (as data files do); an empty path is one line."""
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("first prompt\n", encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    outputs = []
    for args in (["--file", str(plain)], ["--file", str(marked)], ["-"], ["--score-file", str(plain)],
                 ["--score-file", str(marked)], ["--score-file", "-"]):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(marked.read_bytes())))
        generating = [] if "--score-file" in args else ["--greedy", "--max-new-tokens", "3"]
        sample.main(["--model", str(tiny_minigpt_dir), *generating, *args])
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("first prompt") and outputs[1] == outputs[2] == outputs[0]
    assert '"first"' in outputs[3] and outputs[5] == outputs[4] == outputs[3]
    for flag in ("--file", "--score-file", "--trace"):
        with pytest.raises(SystemExit) as stop:
            sample.main(["--model", str(tiny_minigpt_dir), flag, "", *(["x"] if flag == "--trace" else [])])
        assert stop.value.code == 2 and f"error: argument {flag}: empty path" in capsys.readouterr().err


@needs_cpu_compiler
def test_compile_decodes_the_greedy_text_of_transformers(tiny_hf_dir, gpt2_tokenizer):
    """--compile: the step compiles before the first prompt (a stderr line says how long), and the text is the
    eager one, which is transformers' (two prompts, one of a single token, one compiled step for both)."""
    r = run_cli("sample.py", "--model", str(tiny_hf_dir), "--greedy", "--max-new-tokens", "12", "--compile",
                "--stats", PROMPT, "Why")
    assert r.returncode == 0, r.stderr
    expected = [p + hf_greedy_text(tiny_hf_dir, gpt2_tokenizer, p, 12) + "\n" for p in (PROMPT, "Why")]
    assert r.stdout == "\n".join(expected)
    assert re.search(r"^--compile: compiled in \d+\.\d s$", r.stderr, re.M), r.stderr
    assert len([line for line in r.stderr.splitlines() if STATS.match(line)]) == 2
    # --stats' kernels line names what decodes where warm_up's race chose other products than the kernels'
    chosen = re.search(r"^--compile: decoding compiled, (products by [^(]*?)(?: \(|$)", r.stderr, re.M)
    kernels = [line for line in r.stderr.splitlines() if line.startswith("kernels: ")]
    assert chosen and len(kernels) == 2, r.stderr
    note = "" if chosen[1] == "products by the chosen kernels" else f" (the prompt); decoding compiled, {chosen[1]}"
    assert all(line.endswith(note) and line.count("decoding") == (note != "") for line in kernels), r.stderr


@pytest.mark.parametrize("precision, kernel", [([], "linear"), (["--dtype", "bf16"], "mv-upcast"),
                                               (["--quantize", "int8"], "upcast")])
def test_kernel_pins_every_layer_and_gives_the_librarys_text(tiny_minigpt_dir, capsys, precision, kernel):
    """--kernel NAME computes every layer with NAME (what --stats names), so that --seed reproduces a
    sampled text whatever timing would have chosen in another run: the text is the library's with
    that kernel forced."""
    from minigpt.inference import prepare_for_inference
    from minigpt.loading import load_model
    from minigpt.sampling import SamplingConfig, generate_ids, seeded_generator

    assert sample.main(["--model", str(tiny_minigpt_dir), "--seed", "3", "--max-new-tokens", "8", "--stats",
                        "--kernel", kernel, *precision, PROMPT]) == 0
    out, err = capsys.readouterr()
    (line,) = [line for line in err.splitlines() if line.startswith("kernels: ")]
    roles = line.removeprefix("kernels: ").split(", ")
    assert len(roles) == 5 and all(role.split(" ")[1] == kernel for role in roles), line
    model, tokenizer = load_model(tiny_minigpt_dir, "cpu", torch.bfloat16 if "bf16" in precision else torch.float32)
    model = prepare_for_inference(model, "int8" if "int8" in precision else None, kernel=kernel)
    ids = generate_ids(model, tokenizer.encode(PROMPT), SamplingConfig(max_new_tokens=8),
                       generator=seeded_generator(model, 3), eos_id=tokenizer.eos_id)[0]
    assert out == PROMPT + tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) + "\n"


def test_an_unknown_kernel_is_one_line(tiny_minigpt_dir):
    r = run_cli("sample.py", "--model", str(tiny_minigpt_dir), "--quantize", "int8", "--kernel", "mkl", PROMPT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: kernel 'mkl' is for fp32, not int8 (the int8 kernels here: int8mm, upcast, fbgemm)"], r.stderr


def int8_greedy_text(model_dir, prompt: str, n: int) -> str:
    from minigpt.loading import load_model
    from minigpt.inference import prepare_for_inference
    from minigpt.sampling import SamplingConfig, generate_ids

    model, tokenizer = load_model(model_dir)
    config = SamplingConfig(max_new_tokens=n, greedy=True)
    fast = prepare_for_inference(model, "int8")
    new = generate_ids(fast, tokenizer.encode(prompt), config, eos_id=tokenizer.eos_id)[0]
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id])


def test_long_prompt_is_truncated_with_a_warning(tiny_minigpt_dir, capsys):
    long = "word " * 400  # 400 tokens > the tiny model's 256-token window
    sample.main(["--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "4", "--stats", long])
    captured = capsys.readouterr()
    assert "longer than the model's 256-token context window" in captured.err
    assert "prompt tokens 256 " in captured.err
    assert captured.out.startswith(long)


def test_interactive_streams_answers_until_ctrl_d(tiny_minigpt_dir, tiny_hf_dir, gpt2_tokenizer):
    from minigpt.formats import qa_prompt

    r = run_cli("sample.py", "--model", str(tiny_minigpt_dir), "--interactive", "--greedy",
                "--max-new-tokens", "8", input="What is DNA?\n\nWhy?\n")
    assert r.returncode == 0, r.stderr
    expected = "".join(
        hf_greedy_text(tiny_hf_dir, gpt2_tokenizer, qa_prompt(q), 8) + "\n" for q in ("What is DNA?", "Why?")
    )
    assert r.stdout == expected
    assert r.stderr.count("question> ") == 4  # asked again after each answer and the blank line


@pytest.mark.parametrize("flag, value", [
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"), ("--temperature", "-0.5"),
    ("--max-new-tokens", "0"), ("--num-samples", "0"), ("--repetition-penalty", "0"),
])
def test_bad_numbers_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([flag, value, "hi"])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("args, complaint", [
    (("--score", "a b", "--num-samples", "2"),
     "--num-samples has no effect with --score/--score-file, which generate nothing"),
    (("--score", "a b", "--num", "2"), "--num-samples has no effect"),  # an abbreviation is the flag
    (("--score", "a b", "--max-new-tokens", "100"), "--max-new-tokens has no effect"),  # at its default too
    (("--score", "a b", "--seed", "1"), "--seed has no effect"),
    (("--score-file", "t.txt", "--compile"), "--compile has no effect"),
    (("--score", "a b", "--repetition-penalty", "1.2"), "--repetition-penalty does not apply to --score"),
    (("--score", "a b", "--temperature", "0.5"), "--temperature changes nothing --score prints without --trace"),
    (("--score", "a b", "--top-k", "3"), "--top-k changes nothing --score prints"),
    (("--score", "a b", "--greedy"), "; give --trace FILE (see --help)"),
    (("--top-alternatives", "3", "hi"),
     "--top-alternatives has no effect without --trace: it sets how many alternatives each --trace row lists"),
    (("--score", "a b", "--top-alternatives", "3"), "--top-alternatives has no effect without --trace"),
    # greedy decoding: --seed changes nothing, more samples would be copies (HF's generate refuses those too)
    (("--greedy", "--seed", "0", "hi"),
     "--seed has no effect with --greedy: greedy decoding always takes the most likely token"),
    (("--temperature", "0", "--seed", "7", "hi"), "--seed has no effect with --temperature 0"),
    (("--greedy", "--num-samples", "3", "hi"),
     "--num-samples 3 with --greedy would print 3 copies of one text: greedy decoding always takes the most "
     "likely token; sample without it"),
    (("--temperature", "0", "--num-samples", "2", "--interactive"), "--num-samples 2 with --temperature 0 would"),
    (("--top-k", "1", "--num-samples", "3", "hi"), "--num-samples 3 with --top-k 1 would print 3 copies of one text"),
    # a negative value that argparse took for a flag ("expected one argument") is the flag's own refusal
    (("--temperature", "-inf", "hi"), "argument --temperature: '-inf' is not a number >= 0"),
    (("--top-p", "-1e-3", "hi"), "argument --top-p: '-1e-3' is not"),
    # and the filters: greedy's candidate set is its one most likely token (a --trace's `kept` column too)
    (("--greedy", "--top-k", "5", "hi"), "--top-k has no effect with --greedy: greedy decoding takes the most "
     "likely token, whatever the temperature, top-k and top-p"),
    (("--greedy", "--temperature", "3", "hi"), "--temperature has no effect with --greedy"),
    (("--temperature", "0", "--top-p", "0.5", "hi"), "--top-p has no effect with --temperature 0"),
    (("--score", "a b", "--trace", "t.jsonl", "--greedy", "--top-k", "3"), "--top-k has no effect with --greedy"),
])
def test_a_flag_that_would_change_nothing_is_refused(args, complaint, capsys):
    """A flag that has no effect in the mode asked for is a usage error naming it (it used to be
    dropped in silence: `--score TEXT --temperature 0.5` printed the model's own perplexity)."""
    with pytest.raises(SystemExit) as e:
        sample.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and complaint in err, err


def test_flags_that_apply_are_accepted_in_each_mode():
    """The other side of the refusals above: what does apply is parsed as given."""
    args = sample.parse_args(["--score", "a b", "--trace", "t.jsonl", "--top-k", "3",
                              "--top-alternatives", "2", "--stats", "--kernel", "linear"])
    assert (args.top_k, args.greedy, args.top_alternatives) == (3, False, 2)
    assert sample.parse_args(["--score", "a b", "--trace", "t.jsonl", "--greedy"]).greedy  # (kept: the argmax)
    args = sample.parse_args(["--seed", "1", "--num-samples", "2", "--repetition-penalty", "1.2", "hi"])
    assert (args.seed, args.num_samples, args.repetition_penalty) == (1, 2, 1.2)
    args = sample.parse_args(["--greedy", "--num-samples", "1", "--trace", "t.jsonl", "--repetition-penalty", "1.3",
                              "hi"])
    assert (args.greedy, args.num_samples, args.repetition_penalty) == (True, 1, 1.3)  # (the penalty moves the argmax)
    args = sample.parse_args(["--temperature", "1e-3", "--seed", "1", "--num-samples", "2", "hi"])
    assert (args.seed, args.num_samples) == (1, 2)  # (a low temperature still samples)
    assert sample.parse_args(["--top-k", "1", "hi"]).top_k == 1 and sample.parse_args(["-1e3"]).prompts == ["-1e3"]


def test_given_names_what_the_command_line_holds():
    """Parser.given: the flags present, at their default value or not, abbreviated or not; never a
    default of set_defaults; and the parser's defaults unchanged afterwards."""
    from minigpt.cli import Parser

    p = Parser()
    p.add_argument("words", nargs="*")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(seed=7, extra="x")
    assert p.given(["--num", "1", "w"]) == {"num_samples", "words"}
    assert p.given(["--quiet", "--seed=7"]) == {"quiet", "seed"}
    assert p.given([]) == set()
    assert vars(p.parse_args([])) == {"words": [], "num_samples": 1, "seed": 7, "quiet": False, "extra": "x"}


def test_a_prompt_taken_for_a_flag_is_told_about_double_dash(tiny_minigpt_dir, capsys):
    """ "-hello" parses as -h with "ello" attached: the usage error says how to pass such a prompt,
    and that way works; a mistyped flag of train.py gets no such hint."""
    hint = 'a PROMPT that starts with "-" goes after --, as in: sample.py -- "-text" (see --help)\n'
    for argv in (["-hello"], ["-x", "hi"]):
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.endswith(hint) and err.count("\n") == 1, err
    sample.main(["--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "2", "--", "-hello"])
    assert capsys.readouterr().out.startswith("-hello")
    import train

    with pytest.raises(SystemExit):
        train.main(["--lrr", "3"])
    assert capsys.readouterr().err.endswith(": error: unrecognized arguments: --lrr 3 (see --help)\n")


def test_under_torchrun_only_rank_0_prints_a_usage_error(capsys, monkeypatch):
    """Every rank parses the same flags: the job's usage error is one line, rank 0's; all exit 2.
    RANK or LOCAL_RANK set by hand without WORLD_SIZE is no torchrun job (minigpt.ddp runs it as a
    plain run, or says WORLD_SIZE is missing): its errors were swallowed, exit 2 and nothing said."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", ""), ("0", "error: argument --top-p")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            sample.main(["--top-p", "0", "hi"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and printed in err and (err == "") == (rank == "1"), (rank, err)
    monkeypatch.delenv("WORLD_SIZE")
    for variable in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv("RANK")
        monkeypatch.setenv(variable, "1")
        with pytest.raises(SystemExit) as e:
            sample.main(["--top-p", "0", "hi"])
        assert e.value.code == 2 and "error: argument --top-p" in capsys.readouterr().err, variable
        result = call_cli("convert_hf_weights.py", "gpt2")
        assert result.returncode == 2 and "the following arguments are required: --out" in result.stderr, variable


def test_library_errors_name_the_fault(tiny_minigpt_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        (["--model", "", "hi"], "empty model path"),
        (["--model", str(tiny_minigpt_dir), "--file", str(tmp_path / "missing.txt")], "missing.txt: prompt file not found"),
        (["--model", str(tiny_minigpt_dir), "--file", str(bad)], "latin1.txt: not UTF-8"),
        (["--model", str(tiny_minigpt_dir), "--device", "tpu", "hi"], "--device: unknown device 'tpu'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", str(tiny_minigpt_dir), "--device", "cuda", "hi"], "CUDA is not available"))
    for argv, message in cases:
        with pytest.raises(MinigptError, match=re.escape(message)):
            sample.main(argv)


def test_file_flags_expand_a_tilde_as_the_others_do(tiny_minigpt_dir, tmp_path, monkeypatch, capsys):
    """`--file=~/p.txt` (no shell expands a ~ after "="): "~/p.txt: prompt file not found" while the
    file was there, and --trace made no file ("folder ~ does not exist"); --model, train.py's paths
    and convert's --out expand it. Now --file, --score-file and --trace do too."""
    import json

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.txt").write_text("Hello\n", encoding="utf-8")
    model = ["--model", str(tiny_minigpt_dir), "--greedy", "--max-new-tokens", "2"]
    sample.main([*model, "--file=~/p.txt", "--trace=~/t.jsonl"])
    generated = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    assert generated.startswith("Hello") and len(rows) >= 2
    sample.main(["--model", str(tiny_minigpt_dir), "--score-file=~/p.txt"])
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(MinigptError, match=re.escape("~nosuchuser8/p.txt: ~nosuchuser8 is no user's home folder here")):
        sample.main([*model, "--file=~nosuchuser8/p.txt"])
    assert not (tmp_path / "~").exists()


def test_errors_are_one_line_without_traceback(tmp_path):
    r = run_cli("sample.py", "--model", str(tmp_path / "nowhere"), "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_reader_that_stops_early_ends_the_run_quietly(tiny_minigpt_dir):
    """`sample.py ... | head -c 10`: once the reader has gone, writing fails (EPIPE); the run ends
    as `cat`'s would (141 = 128 + SIGPIPE), with nothing on stderr, on the first prompt or a later one."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(sample.Path(sample.__file__).parent)}
    job = subprocess.Popen(
        [sys.executable, sample.__file__, "--model", str(tiny_minigpt_dir), "--seed", "0",
         "--max-new-tokens", "40", "one", "two", "three"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert len(job.stdout.read(5)) == 5
    job.stdout.close()  # the reader goes away
    stderr = job.stderr.read().decode()
    assert job.wait(timeout=120) == 141
    assert stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (a disk that is always full)")
def test_a_full_disk_behind_stdout_is_one_line(tiny_minigpt_dir):
    """`sample.py ... > file` on a full disk: writing stdout fails (ENOSPC), and that is one line
    and exit 2, not a traceback; so for the other CLIs, which share `cli.run`."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(sample.Path(sample.__file__).parent)}
    with open("/dev/full", "w") as full:
        job = subprocess.run([sys.executable, sample.__file__, "--model", str(tiny_minigpt_dir), "--seed", "0",
                              "--max-new-tokens", "5", "hi"], stdout=full, stderr=subprocess.PIPE, text=True,
                             env=env, timeout=120)
    assert job.returncode == 2 and job.stderr == "error: writing the output: No space left on device\n", job.stderr


def test_offline_without_a_local_model_says_what_to_do(tmp_path, monkeypatch):
    """No --model, no checkpoints/eli5 here, and no Hub: one line on how to get a model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached either
    r = run_cli("sample.py", "hi", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "--model" in lines[0] and "python train.py --preset tiny" in lines[0] and "Hub" in lines[0]


def test_help_explains_every_option():
    r = run_cli("sample.py", "--help")
    assert r.returncode == 0
    for flag in ("--model", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                 "--greedy", "--num-samples", "--seed", "--device", "--dtype", "--quantize", "--compile", "--stats",
                 "--interactive", "--file"):
        assert flag in r.stdout


def test_a_trace_run_stopped_by_sigterm_or_a_closed_pipe_keeps_its_rows(tiny_minigpt_dir, tmp_path):
    """`timeout` or `kill` (SIGTERM) ended sample.py outright: no trace file, only a hidden
    temporary copy that no later run removed; and with `| head`, the closed pipe was reported as
    the trace's failure ("saving failed ... Broken pipe", exit 2, the rows lost). SIGTERM is now
    Ctrl-C (exit 130, the rows written so far kept); a closed pipe ends quietly with 141, rows kept."""
    import json
    import signal
    import subprocess

    from conftest import ROOT, python_path

    env = {**os.environ, "PYTHONPATH": python_path()}
    trace = tmp_path / "t.jsonl"
    command = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_minigpt_dir), "Hello", "--greedy",
               "--max-new-tokens", "100000", "--trace", str(trace)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        proc.stdout.read(40)  # (tokens are coming)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stderr.splitlines()[-1] == "interrupted", stderr
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) > 0 and [r["step"] for r in rows] == list(range(len(rows)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # (no temporary copy left)

    piped = subprocess.run(f"{shlex.join(map(str, command))} | head -c 20", shell=True, capture_output=True, text=True,
                           env=env, timeout=300, executable="/bin/bash")
    assert piped.stderr == "" and len(piped.stdout) == 20
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


@pytest.mark.parametrize("args, closed", [(["-"], 0), (["--interactive"], 0), (["--max-new-tokens", "2", "Hi"], 1)],
                         ids=["prompts from stdin", "interactive", "stdout"])
def test_a_closed_stdin_or_stdout_is_one_line(tiny_minigpt_dir, args, closed):
    """`sample.py - <&-` (and `--interactive`, `--file -`, `--score-file -`) and `sample.py Hi >&-`: Python leaves
    sys.stdin / sys.stdout None, and the first use was an AttributeError traceback, exit 1."""
    result = run_cli("sample.py", "--model", str(tiny_minigpt_dir), *args, preexec_fn=lambda: os.close(closed))
    what = ("stdin is closed (`<&-` in the shell): nothing can be read from it" if closed == 0 else
            "stdout is closed (`>&-` in the shell): nothing can be written to it")
    assert result.returncode == 2 and result.stderr.strip().endswith(f"error: {what}"), result.stderr
    assert "Traceback" not in result.stderr


def test_running_out_of_memory_is_one_line(tiny_minigpt_dir, monkeypatch):
    """A MemoryError (a compressed input many times its size, under `ulimit -v`) was a traceback."""
    import minigpt.loading

    def too_big(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(minigpt.loading, "load_model", too_big)
    result = call_cli("sample.py", "--model", str(tiny_minigpt_dir), "hi")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: out of memory: what this run reads or makes does not fit in this machine's memory"]


# --- sample.py's default model, complete()'s stream and numbers --------------------------------


def test_without_a_model_the_checkpoint_train_py_wrote_is_sampled(tiny_minigpt_dir, tmp_path, monkeypatch):
    """`python train.py` then `python sample.py "Why"`: with no --model the user's fine-tune in
    checkpoints/eli5 is the model. With that branch gone the Hub's distilgpt2 was sampled instead
    (offline: an error), and no test noticed: each one without --model ran where no checkpoints/eli5 is."""
    monkeypatch.chdir(tmp_path)  # (call_cli runs in this process: sample.py's relative checkpoints/eli5 is here)
    shutil.copytree(tiny_minigpt_dir, tmp_path / "checkpoints" / "eli5")
    monkeypatch.setattr("minigpt.hub.HubRepo.files", lambda *a, **k: pytest.fail("the Hub was asked for a model"))
    default = call_cli("sample.py", "--greedy", "--max-new-tokens", "3", "Why")
    given = call_cli("sample.py", "--model", "checkpoints/eli5", "--greedy", "--max-new-tokens", "3", "Why")
    assert (default.returncode, given.returncode) == (0, 0), default.stderr + given.stderr
    assert default.stdout == given.stdout and default.stdout.startswith("Why") and len(default.stdout) > len("Why\n")


def eos_first_model(tiny_minigpt_dir):
    """The tiny model, made to take <|endoftext|> as its greedy token after any prompt: the final
    LayerNorm outputs EOS's (scaled) embedding, whose logit then beats every other token's."""
    from minigpt.loading import load_model

    model, tokenizer = load_model(tiny_minigpt_dir)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[tokenizer.eos_id] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[tokenizer.eos_id])
    return model.eval(), tokenizer


@pytest.mark.parametrize("num_samples, written", [(1, "Why\n"), (2, "Why\n\nWhy\n")])
def test_an_answer_that_ends_at_eos_prints_no_eos_text(tiny_minigpt_dir, num_samples, written):
    """A sample's <|endoftext|> ends it and is not text: an answer that is EOS at once prints the
    prompt alone. With EOS streamed like any token every such answer ended "<|endoftext|>", unnoticed."""
    from minigpt.sampling_config import SamplingConfig
    from minigpt.streaming import complete

    model, tokenizer = eos_first_model(tiny_minigpt_dir)
    out = io.StringIO()
    done = complete(model, tokenizer, "Why", SamplingConfig(greedy=True, max_new_tokens=5), num_samples=num_samples,
                    out=out)
    assert (done.texts, done.new_tokens, out.getvalue()) == ([""] * num_samples, num_samples, written)


def test_each_sample_streams_its_own_characters(monkeypatch, gpt2_tokenizer):
    """--num-samples 2, each writing " 𝄞 ok" (𝄞 spans several tokens): each sample keeps its own
    incomplete character until its next token completes it. One TextStream shared by the samples
    mixed their bytes and garbled every character split across tokens, unnoticed."""
    from minigpt.sampling_config import SamplingConfig
    from minigpt.streaming import complete

    ids = gpt2_tokenizer.encode(" 𝄞 ok")
    assert len(ids) > len(" 𝄞 ok".split()) + 1  # (𝄞 is more than one token, else this tests nothing)
    monkeypatch.setattr("minigpt.streaming.generate", lambda *a, **k: iter([torch.tensor([t, t]) for t in ids]))

    class Model:  # (only its window is read: the token steps above replace the decoding)
        config = type("Config", (), {"block_size": 256})()

    out = io.StringIO()
    done = complete(Model(), gpt2_tokenizer, "Q:", SamplingConfig(), num_samples=2, out=out)
    assert done.texts == [" 𝄞 ok", " 𝄞 ok"]
    assert out.getvalue() == "Q: 𝄞 ok\n\nQ: 𝄞 ok\n"


def test_a_prompt_warns_from_one_token_past_the_window(tiny_minigpt_dir, gpt2_tokenizer, capsys):
    """A prompt of exactly the window's 256 tokens is read whole, silently; one of 257 loses its first
    token, with the warning. The warning from 258 tokens on only (one token dropped in silence) went
    unnoticed: the test's prompt was 400 tokens."""
    from minigpt.loading import load_model
    from minigpt.sampling_config import SamplingConfig
    from minigpt.streaming import complete

    model, tokenizer = load_model(tiny_minigpt_dir)
    for n in (256, 257):
        prompt = "a" + " a" * (n - 1)
        assert len(gpt2_tokenizer.encode(prompt)) == n
        done = complete(model, tokenizer, prompt, SamplingConfig(greedy=True, max_new_tokens=1), out=io.StringIO())
        err = capsys.readouterr().err
        assert done.prompt_tokens == 256
        if n == 256:
            assert err == ""
        else:
            assert err == ("warning: the prompt is 257 tokens, longer than the model's 256-token context window; "
                           "only its last 256 tokens are used\n")


@pytest.mark.parametrize("num_samples", [1, 4])
def test_the_decode_rate_leaves_out_the_prefills_tokens(tiny_minigpt_dir, monkeypatch, num_samples):
    """A clock that reads 0, 1, 2, ... s: 10 steps, the first (the prefill) done at 1 s and the last at
    10 s, so 9 decoded tokens a sample in 9 s: exactly `num_samples` tokens/s. Counting each sample's
    prefill token as decoded (10/9 and 40/9 tokens/s) went unnoticed: --stats was checked for its form."""
    import itertools
    import types

    from minigpt.loading import load_model
    from minigpt.sampling_config import SamplingConfig
    from minigpt.streaming import complete

    model, tokenizer = load_model(tiny_minigpt_dir)
    clock = itertools.count()
    monkeypatch.setattr("minigpt.streaming.time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    done = complete(model, tokenizer, "Why", SamplingConfig(greedy=True, max_new_tokens=10), num_samples=num_samples,
                    out=io.StringIO())
    assert done.new_tokens == 10 * num_samples  # (no sample stopped at EOS)
    assert (done.time_to_first_token, done.decode_rate) == (1.0, float(num_samples))


def test_readmes_sampling_defaults_are_sample_pys(capsys):
    """README's sample.py option table states each sampling default; they are SamplingConfig's, which
    are the parser's. `--max-new-tokens` defaulting to 50 while README said 100 went unnoticed."""
    import dataclasses

    from conftest import ROOT
    from minigpt.sampling_config import SamplingConfig

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Options\n", 1)[1].split("\n\n", 1)[0]
    stated = dict(re.findall(r"^\| `--([a-z-]+)[^`]*` \| ([^|]*) \|", table, re.MULTILINE))
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    assert set(defaults) == {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "greedy"}
    args = sample.parse_args(["Why"])
    for name, default in defaults.items():
        text = stated[name.replace("_", "-")].strip()
        assert (text == "off") if default is False else (type(default)(text) == default), (name, text, default)
        assert getattr(args, name) == default, name
    assert defaults["max_new_tokens"] == 100
