"""The GPT-2 tokenizer equals transformers' GPT2Tokenizer, from every file format we load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import gpt2_vocab_files
from minigpt.errors import MinigptError
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


def test_added_tokens_decode_to_their_own_text_as_bytes(gpt2_tokenizer):
    """A token a fine-tune added ("hello world", "€uro") holds its text as it is, not GPT-2's byte
    stand-ins: decode_bytes (streaming, --trace, --score) raised KeyError: ' ' on it."""
    from tokenizers import Tokenizer as Backend

    for added, special in (("hello world", False), ("€uro", False), ("<|pad|>", True), ("<|ü|>", True)):
        backend = Backend.from_str(gpt2_tokenizer.backend.to_str())
        (backend.add_special_tokens if special else backend.add_tokens)([added])
        tokenizer = Tokenizer(backend)
        ids = tokenizer.encode(f"A {added} B")
        assert ids == [32, 220, 50257, 347] and tokenizer.decode_bytes(ids) == f"A {added} B".encode()
    assert gpt2_tokenizer.decode_bytes([50256, 32]) == b"<|endoftext|>A"


def test_a_negative_id_is_refused_and_one_beyond_the_vocabulary_decodes_to_nothing(gpt2_tokenizer):
    """A negative id was the Rust side's OverflowError; an id >= the vocabulary size is "" (as transformers)."""
    hello = gpt2_tokenizer.encode("Hello")
    for decode in (gpt2_tokenizer.decode, gpt2_tokenizer.decode_bytes):
        for ids in ([-1], hello + [-7]):
            with pytest.raises(MinigptError) as error:
                decode(ids)
            assert str(error.value) == f"token id {ids[-1]} is negative (token ids run from 0 to 50256)"
    assert gpt2_tokenizer.decode(hello + [50257, 10**6]) == "Hello"
    assert gpt2_tokenizer.decode_bytes([50257] + hello) == b"Hello"


def test_decode_takes_one_sequence_of_ids_and_says_so_of_anything_else(gpt2_tokenizer):
    """A batch ([[1, 2], [3]]) was the Rust side's "'<' not supported between instances of 'list'
    and 'int'", a 0-d tensor "iteration over a 0-d tensor"; a 1-D tensor or array of ids is one sequence,
    as is a list of NumPy integers or of 0-d integer tensors."""
    hello = gpt2_tokenizer.encode("Hello world")
    for ids in (hello, torch.tensor(hello), np.array(hello), tuple(hello), iter(hello), [np.int64(t) for t in hello],
                list(torch.tensor(hello)), list(np.array(hello, dtype=np.uint32))):  # (any integers: operator.index)
        assert gpt2_tokenizer.decode(ids) == "Hello world"
    assert gpt2_tokenizer.decode_bytes(torch.tensor(hello)) == b"Hello world"
    for bad, shown in (([hello, [3]], str([hello, [3]])), (torch.tensor(5), "5"), (5, "5"), ([1.0], "[1.0]"),
                       (torch.tensor([hello]), str([hello])), ([torch.tensor(5.0)], "[tensor(5.)]")):
        for decode in (gpt2_tokenizer.decode, gpt2_tokenizer.decode_bytes):
            with pytest.raises(TypeError) as error:
                decode(bad)
            assert str(error.value) == ("decode takes one sequence of token ids (a list of ints or a 1-D tensor), "
                                        f"got {shown:.80}")


def test_encode_batch_names_a_text_that_is_not_utf8_as_encode_does(gpt2_tokenizer):
    """A lone surrogate (a byte that was not UTF-8) was an opaque TypeError from the batch."""
    with pytest.raises(MinigptError) as error:
        gpt2_tokenizer.encode("a\ud800")
    assert str(error.value) == "text is not valid UTF-8 (character 1 stands for an undecodable byte)"
    with pytest.raises(MinigptError) as error:
        gpt2_tokenizer.encode_batch(["ok", "ab\udc80"])
    assert str(error.value) == "text 1 is not valid UTF-8 (character 2 stands for an undecodable byte)"
    with pytest.raises(TypeError) as error:
        gpt2_tokenizer.encode_batch("ok")
    assert str(error.value) == "texts: a list of strings, got str; encode one text with encode"
    assert gpt2_tokenizer.encode_batch(["ok", "Hello world"]) == [gpt2_tokenizer.encode("ok"), [15496, 995]]


def test_train_bpe_refuses_a_str_and_a_vocabulary_below_the_bytes_and_eos():
    """A str was trained on one character at a time; a vocabulary below 257 was accepted in silence."""
    with pytest.raises(TypeError) as error:
        Tokenizer.train_bpe("hello world", 300)
    assert str(error.value) == "texts: a list of strings (an iterable of texts), got str; pass [text] for one text"
    with pytest.raises(MinigptError) as error:
        Tokenizer.train_bpe(["hello world"], 256)
    assert str(error.value) == "vocab_size 256 is below the 257 tokens byte-level BPE needs (256 bytes + <|endoftext|>)"
    smallest = Tokenizer.train_bpe(["hello world"], 257)  # the bytes and EOS, no merge
    assert smallest.vocab_size == 257 and [smallest.decode([i]) for i in smallest.encode("hello")] == list("hello")
    merged = Tokenizer.train_bpe(["hello hello hello"], 260)
    ids = merged.encode("hello")
    assert merged.vocab_size == 260 and len(ids) < 5 and merged.decode(ids) == "hello"


def test_an_exported_tokenizer_gives_transformers_the_same_ids(gpt2_tokenizer, tmp_path):
    """The export named `GPT2Tokenizer`, and transformers rebuilt GPT-2's pipeline around the
    vocabulary: a tokenizer.json that adds a prefix space (as some GPT-2 fine-tunes' do) or
    lowercases gave other ids in transformers ("Hello World": [15496, 2159] against the model's
    [18435, 2159]). The stock tokenizer, one of each kind, and one learned from scratch all agree."""
    import json

    from transformers import AutoTokenizer

    gpt2_tokenizer.save(tmp_path / "stock.json")
    stock = json.loads((tmp_path / "stock.json").read_text())
    kinds = {"stock": gpt2_tokenizer, "learned": Tokenizer.train_bpe(TEXTS * 3, 400)}
    for name, edit in (("prefix", lambda tj: tj["pre_tokenizer"].update(add_prefix_space=True)),
                       ("lowercase", lambda tj: tj.update(normalizer={"type": "Lowercase"}))):
        changed = json.loads(json.dumps(stock))
        edit(changed)
        (tmp_path / f"{name}.json").write_text(json.dumps(changed))
        kinds[name] = Tokenizer.from_file(tmp_path / f"{name}.json")
    assert kinds["prefix"].encode("Hello World") == [18435, 2159] and kinds["lowercase"].encode("Hello") == [31373]
    for name, tokenizer in kinds.items():
        (tmp_path / name).mkdir()
        tokenizer.to_hf_files(tmp_path / name, model_max_length=64)
        theirs = AutoTokenizer.from_pretrained(tmp_path / name)
        assert (theirs.eos_token_id, theirs.model_max_length) == (tokenizer.eos_id, 64)
        for text in TEXTS:
            assert theirs(text)["input_ids"] == tokenizer.encode(text), (name, text)
