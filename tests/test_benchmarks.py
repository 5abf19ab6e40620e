"""The benchmarks run end to end: README's performance table is made of their output, and they are
run by hand, on whatever machine a session gets, so a change that breaks one must fail here, not
minutes into the next measuring. Each runs in this process on a tiny GPT-2 (conftest's, with GPT-2's
vocabulary) with the machine's peaks given instead of timed (`benchmark_scripts`), and its
table must hold every row, each with a rate or a time. (What the rows are worth is measured by hand:
benchmarks/HISTORY.md.)"""

from __future__ import annotations

import re

from conftest import ROOT, gpt2_vocab_files, table_rows


def number(cell: str) -> float:
    return float(re.match(r"[\d,.]+", cell).group().replace(",", ""))


def test_bench_sample_times_every_variant_and_the_end_to_end_runs(benchmark_scripts, tiny_hf_dir, capsys):
    import bench_sample

    bench_sample.main(["--model", str(tiny_hf_dir), "--tokens", "4", "--reps", "1", "--e2e-reps", "1", "--batches", "1",
                       "2", "--quick"])
    out = capsys.readouterr().out
    rows = table_rows(out, "batch")
    variants = ["transformers fp32", "ours fp32", "ours bf16", "ours int8"]
    assert [(row[0], row[1]) for row in rows] == [(b, v) for b in ("1", "2") for v in variants], out
    for row in rows:  # tokens/s, the ratio to transformers, time to first token; peak memory at batch 1 (--quick)
        assert number(row[2]) > 0 and row[3].endswith("x") and row[4].endswith(" ms"), row
        assert row[5].endswith(" MB") if row[0] == "1" else row[5] == "-", row
    for batch in (1, 2):  # (a layer's kernel may run on fewer threads, "fbgemm on 1 thread", where that won)
        for variant in variants[1:]:
            assert re.search(rf"^- batch {batch}, {variant}: kernels: lm_head [^,]+, attn\.c_attn [^,]+, ", out,
                             re.MULTILINE), out
    e2e = table_rows(out, "end to end")
    assert len(e2e) == 3 and "--quantize int8" in e2e[1][0] and "pipeline" in e2e[2][0]
    for row in e2e:
        assert row[1].endswith(" s") and number(row[1]) > 0 and 0 <= int(row[2]) <= 100, row


def test_bench_train_times_both_sides_in_both_precisions(benchmark_scripts, tiny_hf_dir, capsys):
    import bench_train

    bench_train.main(["--model", str(tiny_hf_dir), "--steps", "2", "--warmup", "1", "--batch-size", "2", "--block-size",
                      "16", "--dtype", "fp32,bf16", "--loss-steps", "2"])
    out = capsys.readouterr().out
    rows = table_rows(out, "precision")
    assert [(row[0], row[1]) for row in rows] == [(p, s) for p in ("fp32", "bf16") for s in ("transformers", "ours")]
    for row in rows:  # step times, tokens/s, ratios, MFU, peak memory (a fresh process each)
        best, median = (float(t) for t in row[2].split(" / "))
        assert 0 < best <= median and number(row[3]) > 0 and re.fullmatch(r"[\d.]+x / [\d.]+x", row[4]), row
        assert row[5].endswith("%") and number(row[6]) > 0, row
    assert re.search(r"^loss after 2 steps of our loop: fp32 [\d.]+, bf16 [\d.]+ \([\d.]+% apart\)", out, re.MULTILINE)


def test_bench_data_compares_both_pipelines_block_for_block(benchmark_scripts, tmp_path, capsys):
    import bench_data

    from minigpt.tokenizer import Tokenizer

    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer.from_vocab_merges(*gpt2_vocab_files()).backend.save(str(tokenizer))
    data = ROOT / "tests" / "data" / "eli5_small.json"  # (both pipelines cache in temporary folders)
    assert bench_data.main(["--data", str(data), "--tokenizer", str(tokenizer), "--block-size", "16",
                            "--rounds", "1"]) == 0  # (0: the same tokens, blocks within the recipe's drops)
    out = capsys.readouterr().out
    assert re.search(r"^minigpt load_blocks, cold cache +[\d.]+ +[\d,]+ +[\d,]+ +[\d,]+$", out, re.MULTILINE), out
    assert re.search(r"^recipe: datasets\.map x2, GPT2TokenizerFast +[\d.]+ +[\d,]+ +[\d,]+ +[\d,]+$", out,
                     re.MULTILINE), out
    assert "tokens identical: True" in out and "both recipes' blocks identical: True" in out
    assert re.search(r"^speed-up, cold cache, against the recipe as the guide writes it: [\d.]+x", out, re.MULTILINE)
