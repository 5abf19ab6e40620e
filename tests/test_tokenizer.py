"""The GPT-2 tokenizer equals transformers' GPT2Tokenizer, from every file format we load."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gpt2_vocab_files
from minigpt.errors import MinigptError
from minigpt.tokenizer import EOS_TOKEN, Tokenizer

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
    stand-ins: decode_bytes (streaming, --trace, --score) raised KeyError: ' ' on it. It follows the
    byte-level decoder's rule, as `decode` and transformers do: a token whose characters all stand in
    for bytes is those bytes (a vocabulary token listed as added, "ĠHi", printed "ĠHi" for " Hi"; an
    added "<|ü|>" is the byte 0xFC between "<|" and "|>"), any other is its own text."""
    import random

    from tokenizers import Tokenizer as Backend

    for added, special, text in (("hello world", False, None), ("€uro", False, None), ("<|pad|>", True, None),
                                 ("<|ü|>", True, b"A <|\xfc|> B"), ("é!", False, b"A \xe9! B")):
        backend = Backend.from_str(gpt2_tokenizer.backend.to_str())
        (backend.add_special_tokens if special else backend.add_tokens)([added])
        tokenizer = Tokenizer(backend)
        ids = tokenizer.encode(f"A {added} B")
        assert ids == [32, 220, 50257, 347] and tokenizer.decode_bytes(ids) == (text or f"A {added} B".encode())
        assert tokenizer.decode_bytes(ids).decode("utf-8", "replace") == tokenizer.decode(ids)
    assert gpt2_tokenizer.decode_bytes([50256, 32]) == b"<|endoftext|>A"
    backend = Backend.from_str(gpt2_tokenizer.backend.to_str())
    backend.add_tokens(["\u0120Hi", "hello world", "\u00e9!", "\U0001f642x"])  # ("ĠHi" keeps its id, 15902)
    tokenizer = Tokenizer(backend)
    assert tokenizer.decode_bytes([87, 15902, 50257]) == b"x Hihello world"
    rng = random.Random(0)
    for _ in range(300):  # (half characters, added tokens, ids past the vocabulary: the same text both ways)
        ids = [rng.choice([rng.randrange(50260), 15902, 50256, 50257, 50258, 50259, 50300]) for _ in range(8)]
        assert tokenizer.decode_bytes(ids).decode("utf-8", "replace") == tokenizer.decode(ids), ids


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


def hf_tokenizer_folder(folder, tokenizer_json: bool | None, **files) -> Path:
    """A GPT-2 folder's tokenizer files: vocab.json + merges.txt, a tokenizer.json whose pre-tokenizer adds a
    prefix space or not (None: no tokenizer.json), and JSON `files` (name without .json: content)."""
    import json
    import shutil

    from tokenizers import pre_tokenizers

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    vocab, merges = gpt2_vocab_files()
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    if tokenizer_json is not None:
        tokenizer = Tokenizer.from_vocab_merges(vocab, merges)
        tokenizer.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=tokenizer_json)
        tokenizer.save(folder / "tokenizer.json")
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


SEP = {"content": "<sep>", "special": False, "lstrip": False, "rstrip": False, "normalized": True, "single_word": False}
PAD = {"content": "<pad>", "special": True, "lstrip": True, "rstrip": True, "normalized": False, "single_word": False}
HF_FOLDERS = {  # name: (tokenizer.json's prefix space, files); transformers 5 reads each so
    "class GPT2Tokenizer, add_prefix_space": (None, {"tokenizer_config": {"tokenizer_class": "GPT2Tokenizer",
                                                                          "add_prefix_space": True}}),
    "no class, add_prefix_space, over tokenizer.json's": (False, {"tokenizer_config": {"add_prefix_space": True}}),
    "GPT2TokenizerFast without it, over tokenizer.json's": (True, {"tokenizer_config": {
        "tokenizer_class": "GPT2TokenizerFast"}}),
    "PreTrainedTokenizerFast: tokenizer.json's": (True, {"tokenizer_config": {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False}}),
    "add_bos_token with a tokenizer.json: not applied": (False, {"tokenizer_config": {"add_bos_token": True}}),
    "added_tokens.json": (None, {"added_tokens": {"<sep>": 50257, "<pad>": 50258}}),
    "added_tokens.json beside tokenizer.json": (False, {"added_tokens": {"<sep>": 50257}}),
    "added_tokens_decoder, flags": (None, {"tokenizer_config": {"added_tokens_decoder": {"50257": SEP, "50258": PAD,
                                                                                        "50256": {"content": "<|endoftext|>"}}}}),
    "added_tokens_decoder, flags of <|endoftext|>": (False, {"tokenizer_config": {"added_tokens_decoder": {
        "50256": {"content": "<|endoftext|>", "special": True, "lstrip": True, "rstrip": True}}}}),
}


@pytest.mark.parametrize("case", list(HF_FOLDERS))
def test_an_hf_folders_tokenizer_settings_give_transformers_ids(case, tmp_path):
    """tokenizer_config.json's add_prefix_space and the added tokens of added_tokens.json or its added_tokens_decoder
    were not read: "Hello world" was [15496, 995] against transformers' [18435, 995]; "q<sep>a" split <sep> into
    pieces (and the next-token logits of a fine-tune with added tokens were 1.95 apart)."""
    from transformers import AutoTokenizer

    tokenizer_json, files = HF_FOLDERS[case]
    folder = hf_tokenizer_folder(tmp_path / "hf", tokenizer_json, **files)
    ours, theirs = Tokenizer.from_hf_dir(folder), AutoTokenizer.from_pretrained(folder)
    for text in ("Hello world", "question<sep>answer <pad> x", " a <sep> b<|endoftext|>c", "Hi <|endoftext|> there"):
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    assert ours.vocab_size == len(theirs)


TOKENIZER_JSON_EDITS = {  # a tokenizer.json setting: what transformers 5 makes of it
    "truncation": lambda tj: tj.update(truncation={"direction": "Right", "max_length": 3, "strategy": "LongestFirst",
                                                   "stride": 0}),  # (off unless a call asks)
    "padding": lambda tj: tj.update(padding={"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None,
                                             "pad_id": 50256, "pad_type_id": 0, "pad_token": "<|endoftext|>"}),
    "lowercase": lambda tj: tj.update(normalizer={"type": "Lowercase"}),  # (dropped by a GPT-2 class, kept otherwise)
    "bpe dropout": lambda tj: tj["model"].update(dropout=0.5),  # (dropped by a GPT-2 class: random pieces otherwise)
}


@pytest.mark.parametrize("edit, tokenizer_class", [  # (but BPE dropout in a generic class: random pieces in both)
    (edit, cls) for edit in TOKENIZER_JSON_EDITS for cls in (None, "GPT2Tokenizer", "PreTrainedTokenizerFast")
    if (edit, cls) != ("bpe dropout", "PreTrainedTokenizerFast")])
def test_tokenizer_json_settings_give_transformers_ids(edit, tokenizer_class, tmp_path):
    """A tokenizer.json that truncates (to 3 tokens: a prompt cut to its start, training records cut
    to 3 tokens) or pads was applied by minigpt to every text, and transformers applies neither; one
    that lowercases or drops BPE pieces at random was applied where transformers' GPT-2 classes drop it."""
    import json

    from transformers import AutoTokenizer

    folder = hf_tokenizer_folder(tmp_path / "hf", False,
                                 **({"tokenizer_config": {"tokenizer_class": tokenizer_class}} if tokenizer_class else {}))
    changed = json.loads((folder / "tokenizer.json").read_text())
    TOKENIZER_JSON_EDITS[edit](changed)
    (folder / "tokenizer.json").write_text(json.dumps(changed))
    ours, theirs = Tokenizer.from_hf_dir(folder), AutoTokenizer.from_pretrained(folder)
    for text in ("Hello World, how are you", "Why is the SKY blue? " * 3):
        assert ours.encode(text) == theirs(text)["input_ids"] == ours.encode_batch([text])[0], text
    assert ours.encode("Hello World") == ([31373, 995] if (edit, tokenizer_class) == ("lowercase", "PreTrainedTokenizerFast")
                                          else [15496, 2159])


def test_a_post_processor_that_adds_tokens_to_every_text_is_refused(tmp_path):
    """transformers adds a post-processor's special tokens to every text (<|endoftext|> first, as
    transformers 5 writes for add_bos_token); minigpt encodes without them: other ids, without a word."""
    import json

    folder = hf_tokenizer_folder(tmp_path / "hf", False)
    changed = json.loads((folder / "tokenizer.json").read_text())
    changed["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": EOS_TOKEN, "type_id": 0}},
                                                                          {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                                 "special_tokens": {EOS_TOKEN: {"id": EOS_TOKEN, "ids": [50256], "tokens": [EOS_TOKEN]}}}
    (folder / "tokenizer.json").write_text(json.dumps(changed))
    for load in (Tokenizer.from_hf_dir, Tokenizer.from_dir):
        with pytest.raises(MinigptError, match=re.escape(
                f"{folder / 'tokenizer.json'}: its post-processor adds 1 special token(s) to every text, which "
                "transformers would add and minigpt does not; remove it from the tokenizer.json")):
            load(folder)


def test_a_tokenizer_that_panics_on_a_text_is_one_line(tmp_path, gpt2_tokenizer):
    """A tokenizer.json's Split regex that backtracks past the regex engine's retry limit made the
    Rust side panic: a PanicException, which no `except Exception` stops (a traceback, exit 1)."""
    import json

    folder = hf_tokenizer_folder(tmp_path / "hf", False)
    changed = json.loads((folder / "tokenizer.json").read_text())
    changed["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False},
        changed["pre_tokenizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(changed))
    tokenizer = Tokenizer.from_dir(folder)
    assert tokenizer.encode("a" * 20 + "b") == gpt2_tokenizer.encode("a" * 20 + "b")  # (within the limit: as GPT-2's)
    message = (re.escape(f"{folder / 'tokenizer.json'}: the tokenizer failed on a text (") + r"[^\n]*retry-limit[^\n]*"
               + re.escape("): a regex of its tokenizer.json (a Split or Replace pattern) may not suit the text") + "$")
    for encode in (lambda: tokenizer.encode("a" * 40 + "b"), lambda: tokenizer.encode_batch(["x", "a" * 40 + "b"])):
        with pytest.raises(MinigptError, match=message):
            encode()


def test_what_transformers_would_read_otherwise_is_refused_in_one_line(tmp_path):
    """An added token whose id is not the vocabulary's next (transformers gives it the next id anyway) and
    add_bos_token without a tokenizer.json (transformers starts every text with <|endoftext|>)."""
    cases = {
        "gap": ({"added_tokens": {"<sep>": 50260}}, "added token '<sep>' names id 50260, but the vocabulary's next "
                                                    "id is 50257 (transformers would give it 50257)"),
        "bos": ({"tokenizer_config": {"add_bos_token": True}}, "tokenizer_config.json: add_bos_token is true"),
        "junk": ({"added_tokens": {"<sep>": "x"}}, "added token '<sep>' with id 'x': not a text and an id"),
        "list": ({"tokenizer_config": [1]}, "tokenizer_config.json: expected a JSON object"),
        # tracebacks before: AttributeError, int("²") (which isdigit() passes), int() of 5,000 digits, AddedToken
        "decoder": ({"tokenizer_config": {"added_tokens_decoder": [1, 2]}},
                    "tokenizer_config.json: added_tokens_decoder is not a JSON object of id -> token"),
        "superscript": ({"added_tokens": {"<sep>": "\u00b2"}}, "added token '<sep>' with id '\u00b2': not a text"),
        "digits": ({"added_tokens": {"<sep>": "9" * 5000}}, "added token '<sep>' with id '999"),
        "flag": ({"tokenizer_config": {"added_tokens_decoder": {"50257": {"content": "<sep>", "special": "yes"}}}},
                 "added token '<sep>': special is 'yes', not true or false"),
        # transformers then reads "<|endoftext|>" in a text as its 7 characters' tokens, minigpt as the one token
        "split": ({"tokenizer_config": {"split_special_tokens": True}},
                  "tokenizer_config.json: split_special_tokens is true, which makes transformers read a <|endoftext|>"),
    }
    for name, (files, message) in cases.items():
        folder = hf_tokenizer_folder(tmp_path / name, None, **files)
        with pytest.raises(MinigptError, match=re.escape(message)):
            Tokenizer.from_hf_dir(folder)
    assert Tokenizer.from_dir(tmp_path / "bos").encode("Hello") == [15496]  # (a minigpt folder's reading: as it is)


def test_an_hf_models_folder_gives_one_tokenizer_whichever_loader_reads_it(tmp_path):
    """An HF model folder with a tokenizer.json and no tokenizer_config.json (README's offline download
    makes one): train.py --tokenizer FOLDER read tokenizer.json as it is (its prefix space: "Hello
    world" [18435, 995]), where --init FOLDER and transformers read [15496, 995]."""
    from transformers import AutoTokenizer

    from minigpt.loading import load_tokenizer

    folder = hf_tokenizer_folder(tmp_path / "hf", True)  # (config.json with a model_type, no settings file)
    expected = AutoTokenizer.from_pretrained(folder).encode("Hello world")
    assert load_tokenizer(folder).encode("Hello world") == Tokenizer.from_hf_dir(folder).encode("Hello world") == expected
    assert expected == [15496, 995]
    (folder / "config.json").unlink()  # tokenizer files alone: read as they are, as transformers reads them
    assert load_tokenizer(folder).encode("Hello world") == AutoTokenizer.from_pretrained(folder).encode("Hello world")
