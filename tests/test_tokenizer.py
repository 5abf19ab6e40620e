"""The GPT-2 tokenizer equals transformers' GPT2Tokenizer, from every file format we load."""

from __future__ import annotations

import pytest

from conftest import gpt2_vocab_files
from minigpt.tokenizer import Tokenizer

TEXTS = [
    "Somatic hypermutation allows the immune system to",
    "Hello, world! It's 2026 and we're testing GPT-2's tokenizer.",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji: 🤖👍🏽🇫🇷👨‍👩‍👧 and symbols ∑∫√ ≠ ≤",
    "runs   of    spaces\n\n\nand\n newlines\t\ttabs \r\n windows",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
    "<|endoftext|>two documents<|endoftext|>",
    "   leading and trailing spaces   ",
    "",
    " ",
    "\u200b\u00a0zero width and nbsp",
    "ALLCAPS lowercase MiXeD 1234567890 3.14159 $100 #hashtag @user",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import GPT2Tokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    vocab, merges = gpt2_vocab_files()
    (folder / "vocab.json").write_bytes(vocab.read_bytes())
    (folder / "merges.txt").write_bytes(merges.read_bytes())
    return GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers_and_round_trips(text, gpt2_tokenizer, hf_tokenizer):
    ids = gpt2_tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.decode_bytes(ids) == text.encode("utf-8")


def test_known_ids_and_eos(gpt2_tokenizer):
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.eos_id == 50256 and gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_tokenizer_json_round_trip(gpt2_tokenizer, tmp_path):
    gpt2_tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    batch = gpt2_tokenizer.encode_batch(TEXTS)
    assert again.encode_batch(TEXTS) == batch == [gpt2_tokenizer.encode(t) for t in TEXTS]


def test_half_characters_are_bytes(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode("🤖")
    assert len(ids) > 1  # one emoji, several byte-level tokens
    partial = gpt2_tokenizer.decode_bytes(ids[:1])
    with pytest.raises(UnicodeDecodeError):
        partial.decode("utf-8")
