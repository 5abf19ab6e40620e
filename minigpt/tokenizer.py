"""GPT-2's byte-level BPE tokenizer, on the `tokenizers` library.

GPT-2 first splits the text into word-like pieces with a regex (a leading space stays with its
word), then maps every byte of each piece's UTF-8 to one of 256 printable characters (so any string,
emoji or broken bytes included, is representable), and then applies 50,000 learned merges within
each piece. `<|endoftext|>` (id 50256) separates documents and is
the only special token.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .errors import MinigptError, reason
from .files import read_json

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """The position of `text`'s first lone surrogate, or None. Bytes that are not UTF-8 reach
    Python as such (PEP 383: in sys.argv, and in sys.stdin under the C locale), and so does a JSON
    escape of half a UTF-16 pair ("\\ud800"); they are not Unicode, and no tokenizer takes them."""
    match = LONE_SURROGATE.search(text)
    return match.start() if match else None

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_MERGES = ["vocab.json", "merges.txt"]  # a tokenizer as older repos hold it, without tokenizer.json
TOKENIZER_FILES = [TOKENIZER_FILE, *VOCAB_MERGES]
HF_SETTINGS = ["tokenizer_config.json", "added_tokens.json"]  # how transformers reads an HF folder's tokenizer
GPT2_CLASSES = (None, "GPT2Tokenizer", "GPT2TokenizerFast")  # tokenizer_class values that rebuild GPT-2's pipeline
ADDED_TOKEN_FLAGS = ("special", "lstrip", "rstrip", "single_word", "normalized")  # (added_tokens_decoder's)
MIN_BPE_VOCAB = 256 + 1  # byte-level BPE: one token per byte, plus EOS_TOKEN


class Tokenizer:
    """Text <-> GPT-2 token ids. Build it with one of the `from_*` constructors (or, from a file, a
    folder or a Hub id, with `minigpt.loading.load_tokenizer`)."""

    def __init__(self, backend: HFTokenizer, source: str | os.PathLike = "tokenizer") -> None:
        """`source` names where `backend` came from, for error messages. A tokenizer.json may ask to
        truncate or pad every text: transformers turns both off unless a call asks for them, and so
        does this; it may also add special tokens to every text (a post-processor that starts each
        with <|endoftext|>), which transformers does and minigpt's data and prompts do not: refused."""
        self.backend, self.source = backend, str(source)
        backend.no_truncation()
        backend.no_padding()
        eos_id = backend.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise MinigptError(f"{source}: no {EOS_TOKEN} token in the vocabulary")
        if (added := backend.num_special_tokens_to_add(False)) > 0:  # (False: for one text, not a pair)
            raise MinigptError(f"{source}: its post-processor adds {added} special token(s) to every text, which "
                               "transformers would add and minigpt does not; remove it from the tokenizer.json")
        self.eos_id: int = eos_id

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a `tokenizer.json` (the fast-tokenizer format every minigpt checkpoint carries)."""
        path = Path(path)
        if not path.is_file():
            raise MinigptError(f"{path}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions with multi-line text
            raise MinigptError(f"{path}: not a valid tokenizer.json ({reason(e)})") from None
        return cls(backend, source=path)

    @classmethod
    def from_vocab_merges(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> "Tokenizer":
        """Build GPT-2's tokenizer from `vocab.json` (a.k.a. encoder.json) + `merges.txt` (vocab.bpe)."""
        for path in (vocab, merges):
            if not Path(path).is_file():
                raise MinigptError(f"{path}: tokenizer file not found")
        try:
            backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise MinigptError(f"{vocab}: not a GPT-2 vocabulary + merges pair ({reason(e)})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([EOS_TOKEN])  # matched whole in text, never split into pieces
        return cls(backend, source=vocab)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load from a checkpoint folder: `tokenizer.json`, else `vocab.json` + `merges.txt`."""
        folder = Path(folder)
        if (folder / TOKENIZER_FILE).is_file():
            return cls.from_file(folder / TOKENIZER_FILE)
        vocab, merges = (folder / name for name in VOCAB_MERGES)
        if vocab.is_file() and merges.is_file():
            return cls.from_vocab_merges(vocab, merges)
        raise MinigptError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt)")

    @classmethod
    def from_hf_dir(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face model folder's tokenizer as transformers' AutoTokenizer reads it: `from_dir`'s,
        with the settings of `tokenizer_config.json` and `added_tokens.json` where the folder has them.

        A GPT-2 tokenizer class (`tokenizer_class` GPT2Tokenizer, GPT2TokenizerFast, or none) makes transformers
        rebuild GPT-2's pipeline: its byte-level pre-tokenizer adds a prefix space only where the config says
        `add_prefix_space` (tokenizer.json's own setting is not read), and tokenizer.json's normalizer (a
        lowercasing one, say) and BPE dropout (random pieces) are dropped. Added tokens (`added_tokens.json`, the
        config's `added_tokens_decoder`) are matched whole, each at the id it names: transformers appends them
        in order whatever id they name, so an id that is not the vocabulary's next is refused, as is
        `add_bos_token` without a tokenizer.json (transformers then starts every text with <|endoftext|>),
        and `split_special_tokens` (<|endoftext|> in a text read as plain characters). Each gave other
        token ids than transformers', without a word."""
        folder = Path(folder)
        tokenizer = cls.from_dir(folder)
        config, added = (read_json(folder / name) if (folder / name).is_file() else {} for name in HF_SETTINGS)
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):  # (read_json checked the files are objects; this one is inside)
            raise MinigptError(f"{folder / HF_SETTINGS[0]}: added_tokens_decoder is not a JSON object of id -> token")
        if config.get("tokenizer_class") in GPT2_CLASSES:  # (as transformers' GPT2Tokenizer builds it)
            prefix = config.get("add_prefix_space") is True
            tokenizer.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
            tokenizer.backend.normalizer = None
            if isinstance(tokenizer.backend.model, models.BPE):
                tokenizer.backend.model.dropout = None
        if config.get("add_bos_token") is True and not (folder / TOKENIZER_FILE).is_file():
            raise MinigptError(f"{folder / HF_SETTINGS[0]}: add_bos_token is true, which starts every text with "
                               f"{EOS_TOKEN} in transformers and not in minigpt; remove it, or add a tokenizer.json")
        if config.get("split_special_tokens") is True:  # (a checkpoint's tokenizer.json could not keep it)
            raise MinigptError(f"{folder / HF_SETTINGS[0]}: split_special_tokens is true, which makes transformers read "
                               f"a {EOS_TOKEN} in a text as plain characters, and minigpt reads it as the special "
                               "token; remove it to read it as minigpt does")
        tokens = {content: {"id": i} for content, i in added.items()}
        tokens.update({t.get("content"): {**t, "id": i} for i, t in decoder.items() if isinstance(t, dict)})
        for content, token in tokens.items():  # (an id of ASCII digits: "²" passes isdigit(), and int() refuses it)
            if not isinstance(content, str) or not re.fullmatch(r"[0-9]{1,18}", str(token["id"])):
                raise MinigptError(f"{folder}: added token {content!r} with id {token['id']!r}: not a text and an id")
            if bad := [k for k in ADDED_TOKEN_FLAGS if k in token and not isinstance(token[k], bool)]:
                raise MinigptError(f"{folder}: added token {content!r}: {bad[0]} is {token[bad[0]]!r}, not true or "
                                   "false")
        for content, token in sorted(tokens.items(), key=lambda item: int(item[1]["id"])):
            tokenizer._add_at(content, int(token["id"]), token, folder)
        return tokenizer

    def _add_at(self, content: str, where: int, flags: dict, folder: Path) -> None:
        """Add token `content` with an `added_tokens_decoder` entry's `flags` at id `where`, or find it
        there (and give it the entry's flags: `lstrip` on <|endoftext|> changes how " <|endoftext|>" reads)."""
        n = self.backend.get_vocab_size()
        keep = {k: flags[k] for k in ADDED_TOKEN_FLAGS if k in flags}
        if self.backend.token_to_id(content) == where:
            if keep:  # (the token keeps its id; only the flags given change)
                self.backend.add_tokens([AddedToken(content, **keep)])
            return
        if where != n:
            raise MinigptError(f"{folder}: added token {content!r} names id {where}, but the vocabulary's next id "
                               f"is {n} (transformers would give it {n}): the model and tokenizer disagree")
        self.backend.add_tokens([AddedToken(content, **keep)])

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn a GPT-2-style byte-level BPE vocabulary of at most `vocab_size` tokens from `texts`
        (fewer where the texts run out of pairs to merge).

        For small from-scratch models: a small vocabulary keeps the embedding and LM head small,
        and it needs nothing from the Hub. `texts` is an iterable of texts: a str alone would be
        read one character at a time, as texts of one character each, so it is refused. The
        vocabulary starts from the 256 bytes and `<|endoftext|>`, and each merge adds one token:
        `vocab_size` is at least MIN_BPE_VOCAB (257), which learns no merge at all.
        """
        from tokenizers import trainers

        if isinstance(texts, str):
            raise TypeError("texts: a list of strings (an iterable of texts), got str; pass [text] for one text")
        if vocab_size < MIN_BPE_VOCAB:
            raise MinigptError(f"vocab_size {vocab_size} is below the {MIN_BPE_VOCAB} tokens byte-level BPE "
                               f"needs (256 bytes + {EOS_TOKEN})")

        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    # --- use ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """How many token ids there are (GPT-2's: 50,257, `<|endoftext|>` the last)."""
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a MinigptError if it holds bytes that were not UTF-8 (as lone
        surrogates, `lone_surrogate`), which the Rust side cannot take."""
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            _refuse_not_utf8([text], "text")
            raise
        except BaseException as e:
            self._refuse_panic(e)
            raise

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust side spreads the work over all CPU cores. A text
        that is not valid UTF-8 is a MinigptError naming it, as in `encode`."""
        if isinstance(texts, str):
            raise TypeError("texts: a list of strings, got str; encode one text with encode")
        # The `_fast` variant skips computing character offsets, which we never use.
        try:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        except TypeError:
            _refuse_not_utf8(texts, "text {}")
            raise
        except BaseException as e:
            self._refuse_panic(e)
            raise

    def _refuse_panic(self, e: BaseException) -> None:
        """Raise the Rust side's panic (a BaseException, which no `except Exception` stops: a
        traceback) as a MinigptError; e.g. the retry limit of a tokenizer.json's Split regex, on a
        text it fits badly. Anything else (KeyboardInterrupt, say) the caller raises as it was."""
        if type(e).__name__ == "PanicException":
            raise MinigptError(f"{self.source}: the tokenizer failed on a text ({reason(e)}): a regex of its "
                               "tokenizer.json (a Split or Replace pattern) may not suit the text") from None

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; an id at or beyond `vocab_size` decodes to "" (as transformers'
        decoding does), a negative one is a MinigptError."""
        return self.backend.decode(self._non_negative(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw UTF-8 bytes of `ids` (ids as `decode` takes them), which `decode` reads as UTF-8; one
        token can hold half a character, so streaming output should decode bytes incrementally rather
        than token by token. A token is GPT-2's printable stand-ins for bytes ("Ġ" for a space), each
        read back as its byte; one with a character that stands in for no byte (an added token such as
        "hello world") is its own text, whole: the rule of `tokenizers`' byte-level decoder, so a token
        a fine-tune added as "é!" reads as the byte 0xE9 and "!", in transformers too."""
        byte_decoder = _byte_decoder()

        def piece(token: str) -> bytes:
            if all(c in byte_decoder for c in token):
                return bytes(byte_decoder[c] for c in token)
            return token.encode()

        return b"".join(piece(self.backend.id_to_token(t) or "") for t in self._non_negative(ids))

    def _non_negative(self, ids: list[int]) -> list[int]:
        """`ids` as a list, refusing a negative id (the Rust side takes ids as unsigned integers and
        raises an OverflowError on one) and anything but one sequence of integers (a batch of them,
        a single int: a TypeError that says so, not the Rust side's "'<' not supported")."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # (a tensor or NumPy array of ids)
        try:  # (operator.index: any integer, NumPy's and 0-d tensors' too; not a float, nor a list)
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise TypeError("decode takes one sequence of token ids (a list of ints or a 1-D tensor), "
                            f"got {ids!r:.80}") from None
        bad = next((t for t in ids if t < 0), None)
        if bad is not None:
            raise MinigptError(f"token id {bad} is negative (token ids run from 0 to {self.vocab_size - 1})")
        return ids

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json`."""
        try:
            self.backend.save(str(path))
        except Exception as e:  # the Rust side reports a failed write (a full disk) as a plain Exception
            raise OSError(f"{path}: {e}") from None

    def to_hf_files(self, folder: str | os.PathLike, model_max_length: int) -> None:
        """Write the files `transformers.AutoTokenizer` expects beside an exported model, whose
        context window is `model_max_length` tokens (what transformers truncates a pipeline's input to).

        The class named is the generic fast tokenizer, which runs tokenizer.json as it is. Named
        `GPT2Tokenizer`, transformers rebuilt GPT-2's own pipeline around the vocabulary, dropping
        any other setting the file holds: a tokenizer that adds a prefix space, or lowercases,
        gave other ids in transformers than the ones the model was trained on."""
        folder = Path(folder)
        self.save(folder / TOKENIZER_FILE)
        special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, **special}
        (folder / HF_SETTINGS[0]).write_text(json.dumps(config, indent=2))


def _refuse_not_utf8(texts: list[str], name: str) -> None:
    """Raise the MinigptError for the first of `texts` holding a lone surrogate (`lone_surrogate`),
    named by `name` formatted with its index; return if none does (the caller's error stands then)."""
    for i, text in enumerate(texts):
        surrogate = lone_surrogate(text) if isinstance(text, str) else None
        if surrogate is not None:
            raise MinigptError(f"{name.format(i)} is not valid UTF-8 (character {surrogate} stands for an "
                               f"undecodable byte)") from None


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (the inverse of its bytes_to_unicode)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}
