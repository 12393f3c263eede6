"""Tokenizers: character-level (exact, reports what it cannot encode) and byte-level BPE trained with the
`tokenizers` library (round-trips any UTF-8 text). Both save to and load from `tokenizer.json`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.checkpoint import atomic_write_text
from ..core.errors import CheckpointError, ConfigError, DataError


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """One token per Unicode character, over the characters seen in the training text."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise DataError("cannot build a character vocabulary from empty text")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(cps)
        self._sorted_cps = cps[self._order]

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode for long texts: (N,) int64."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted_cps, cps).clip(max=len(self._sorted_cps) - 1)
        bad = self._sorted_cps[pos] != cps
        if bad.any():
            missing = sorted({chr(c) for c in cps[bad][:10000]})
            shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(
                f"cannot encode {int(bad.sum())} character(s) not in the {self.vocab_size}-character vocabulary "
                f"of this tokenizer: {shown}"
            )
        return self._order[pos]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids (a character tokenizer has no special tokens to add: the flag is accepted for symmetry)."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"genlab_tokenizer": "char", "chars": self.chars}, ensure_ascii=False)

    def to_hf(self):
        """The same vocabulary as a Hugging Face `tokenizers.Tokenizer` (what transformers reads from a
        tokenizer.json): every character, newlines and spaces included, is one token with genlab's id, and
        decoding joins the pieces back exactly."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(self.chars)}))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok


def _chunks(text: str) -> list[str]:
    return [c for c in re.split(r"(?<=\n)(?=\S)", text) if c]


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained with Hugging Face `tokenizers`; the file is the library's own."""

    kind = "bpe"
    EOS = "<|endoftext|>"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 or vocab_size > 1_000_000:
            raise ConfigError(f"data.vocab_size={vocab_size}: byte-level BPE needs 257 <= vocab_size <= 1000000")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode_array(self, text: str) -> np.ndarray:
        # encode in pieces (parallel): cut only after a newline followed by a non-space character, where the
        # GPT-2 pre-tokenizer splits anyway, so the ids equal those of encoding the whole text at once
        chunks = _chunks(text)
        out = self._tok.encode_batch(chunks, add_special_tokens=False)
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in out])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` adds what the tokenizer's post-processor adds (an imported Llama's BOS),
        as transformers does for plain text; a chat prompt already holds them (its template writes them)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def to_hf(self):
        """The Hugging Face `tokenizers.Tokenizer` itself."""
        return self._tok


def train_tokenizer(kind: str, text: str, *, vocab_size: int = 1024) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(_chunks(text), vocab_size)
    raise ConfigError(f"unknown tokenizer {kind!r}; known: bpe, char")


def tokenizer_from_json(text: str, where: str = "tokenizer") -> Tokenizer:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where} is corrupt (not valid JSON: {e})") from None
    if isinstance(obj, dict) and obj.get("genlab_tokenizer") == "char":
        return CharTokenizer(obj["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as e:  # noqa: BLE001 -- the tokenizers library raises bare Exception on bad JSON
        raise CheckpointError(f"{where} is not a tokenizer file genlab can read ({e})") from None


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    atomic_write_text(path, tok.to_json())


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer not found: {path}")
    return tokenizer_from_json(path.read_text(encoding="utf-8"), str(path))
