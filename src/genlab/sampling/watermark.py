"""The green-list text watermark: a logits processor and its detector.

Kirchenbauer et al. 2023, "A Watermark for Large Language Models" (ICML, arXiv:2301.10226): Algorithm 2 (the
soft red list: add `delta` to the logits of a keyed pseudo-random "green" fraction `gamma` of the vocabulary,
seeded by the previous token) and eq. 3 (the one-proportion z-test on the count of green tokens).
Repeated (context, token) n-grams are scored once, as recommended by Kirchenbauer et al. 2024, "On the
Reliability of Watermarks for Large Language Models" (ICLR, arXiv:2306.04634), Sec. 3.

The green lists are bit-for-bit those of transformers' `WatermarkLogitsProcessor` (seeding schemes "lefthash" and
"selfhash") for the same integer key, so text watermarked by either library is detected by the other:
- left hash: the seed is `key * previous_token`; `context_width` only sets the n-gram used to skip repeats.
- self hash: a fixed random table `T = randperm(1_000_003)` drawn from the key; the seed is
  `min_i(key * (T[x_i] + 1) * (T[x_t] + 1))` over the last `context_width` tokens including the candidate `x_t`
  itself (int64 arithmetic), and only candidates among the 40 most likely that are in their own green list get
  the bias (a rejection-sampling approximation, as in transformers).
- in both, the green list is the first `int(gamma * V)` entries of `torch.randperm(V)` drawn from a CPU
  `torch.Generator` seeded with `seed % (2**64 - 1)`.
A key made only of digits is used as that integer (transformers' `hashing_key`); any other string is mapped to a
63-bit integer by SHA-256.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch

from ..core.errors import ConfigError, DataError

TABLE_SIZE = 1_000_003  # the self-hash table of transformers (and of the paper's reference code)
SELF_HASH_CANDIDATES = 40  # candidates tested per step by the self-hash rejection sampling (as transformers)
DEFAULT_FPR = 1e-3
DEFAULT_MIN_TOKENS = 16  # below this many scored tokens the detector answers "too short to judge"
_INT64 = 1 << 64


@dataclass(frozen=True)
class WatermarkConfig:
    key: str = field(repr=False)  # a secret: kept out of repr() and so out of logs
    gamma: float = 0.25  # the green fraction of the vocabulary
    delta: float = 2.0  # the bias added to green logits
    context_width: int = 1  # tokens hashed into the seed (self hash) / n-gram width for repeats (left hash)
    hashing: str = "left"  # "left" (seed from the previous token) or "self" (min-hash including the candidate)

    def __post_init__(self):
        key = self.key
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
            object.__setattr__(self, "key", key)
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"watermark key={self.key!r} must be a non-empty string (or a positive integer)")
        if key.isdigit() and not 0 < int(key) < 1 << 63:
            raise ConfigError(f"watermark key={key} must be an integer in [1, 2**63 - 1] or a non-numeric string")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int | float) or not 0 < self.gamma < 1:
            raise ConfigError(f"watermark gamma={self.gamma!r} must be in (0, 1) (the green fraction)")
        if (isinstance(self.delta, bool) or not isinstance(self.delta, int | float)
                or not 0 < self.delta <= 100):
            raise ConfigError(f"watermark delta={self.delta!r} must be in (0, 100] (the bias on green logits)")
        if (not isinstance(self.context_width, int) or isinstance(self.context_width, bool)
                or not 1 <= self.context_width <= 64):
            raise ConfigError(f"watermark context_width={self.context_width!r} must be an integer in [1, 64]")
        if self.hashing not in ("left", "self"):
            raise ConfigError(f"watermark hashing={self.hashing!r} must be 'left' or 'self'")

    @classmethod
    def from_value(cls, value) -> WatermarkConfig:
        """A `WatermarkConfig` from itself or a dict of its fields (unknown keys are refused)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            if unknown := sorted(set(value) - known):
                raise ConfigError(f"unknown watermark setting(s) {unknown}; known: {sorted(known)}")
            if "key" not in value:
                raise ConfigError("a watermark needs a key")
            return cls(**value)
        raise ConfigError(f"watermark must be a WatermarkConfig or a dict, not {type(value).__name__}")

    @cached_property
    def hash_key(self) -> int:
        """The integer key: the key itself if it is a decimal number, else 63 bits of its SHA-256."""
        if self.key.isdigit():
            return int(self.key)
        return (int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big") >> 1) or 1

    @property
    def seeding_scheme(self) -> str:
        """The name transformers gives this scheme (`WatermarkingConfig.seeding_scheme`)."""
        return f"{self.hashing}hash"

    def green_size(self, vocab_size: int) -> int:
        n = int(vocab_size * self.gamma)  # as transformers: int(V * gamma)
        if not 1 <= n < vocab_size:
            raise ConfigError(f"watermark gamma={self.gamma} leaves {n} green tokens of {vocab_size}: "
                              "it must leave at least one green and one red token")
        return n


# ---- green lists (cached: the same seeds come back all the time) ----

@lru_cache(maxsize=4)
def _fixed_table(hash_key: int) -> np.ndarray:
    g = torch.Generator().manual_seed(hash_key)
    return torch.randperm(TABLE_SIZE, generator=g).numpy()


def _seed(context: tuple[int, ...], cfg: WatermarkConfig) -> int:
    """The generator seed of transformers' `WatermarkLogitsProcessor.set_seed` for the last tokens `context`."""
    key = cfg.hash_key
    ctx = context[-cfg.context_width:]
    if cfg.hashing == "left":
        return key * ctx[-1] % (_INT64 - 1)
    table = _fixed_table(key)
    b = int(table[ctx[-1] % TABLE_SIZE]) + 1
    # key * a * b in int64 arithmetic (it wraps), then the minimum over the context
    prods = [((key * (int(table[t % TABLE_SIZE]) + 1) * b + (1 << 63)) % _INT64) - (1 << 63) for t in ctx]
    return min(prods) % (_INT64 - 1)


@lru_cache(maxsize=512)
def _green_mask(seed: int, vocab_size: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.randperm(vocab_size, generator=g)[:size]] = True
    return mask


@lru_cache(maxsize=65536)
def _is_green(context: tuple[int, ...], token: int, cfg: WatermarkConfig, vocab_size: int) -> bool:
    """Is `token` green after `context` (left hash), or in its own list seeded with `context` + token (self hash)?"""
    ctx = context + (token,) if cfg.hashing == "self" else context
    return bool(_green_mask(_seed(ctx, cfg), vocab_size, cfg.green_size(vocab_size))[token])


# ---- the logits processor ----

def apply_watermark(logits: torch.Tensor, history: torch.Tensor, cfg: WatermarkConfig) -> torch.Tensor:
    """Add `delta` to the green logits of each row (Kirchenbauer et al. 2023, Alg. 2): logits (B, V), history (B, L)
    the tokens so far (prompt included). With fewer than `context_width` tokens of history nothing is added."""
    if history.size(1) < cfg.context_width:
        return logits
    B, V = logits.shape
    size = cfg.green_size(V)
    contexts = [tuple(row) for row in history[:, -cfg.context_width:].tolist()]
    if cfg.hashing == "left":
        mask = torch.stack([_green_mask(_seed(c, cfg), V, size) for c in contexts])  # (B, V)
    else:
        k = min(SELF_HASH_CANDIDATES, V)
        top = logits.sort(dim=-1, descending=True).indices[:, :k].tolist()  # (B, k), the order transformers uses
        mask = torch.zeros(B, V, dtype=torch.bool)
        for b, (c, cands) in enumerate(zip(contexts, top, strict=True)):
            green = [t for t in cands if _is_green(c[1:], t, cfg, V)]  # seed: the last width-1 tokens + t
            mask[b, green] = True
    return torch.where(mask.to(logits.device), logits + cfg.delta, logits)


# ---- the detector ----

@dataclass(frozen=True)
class WatermarkResult:
    """The detector's answer. `verdict` is "watermarked", "not watermarked" or "too short to judge"."""

    z_score: float | None  # None when no token could be scored
    p_value: float | None  # one-sided, exact binomial tail P(X >= green | scored, green fraction)
    num_tokens: int  # tokens in the text
    num_scored: int  # (context, token) n-grams scored (repeats counted once unless asked otherwise)
    num_green: int
    gamma: float
    fpr: float  # the false-positive rate the verdict is taken at
    min_tokens: int
    verdict: str

    @property
    def watermarked(self) -> bool:
        return self.verdict == "watermarked"

    @property
    def green_fraction(self) -> float | None:
        return self.num_green / self.num_scored if self.num_scored else None

    def to_dict(self) -> dict:
        return {**asdict(self), "green_fraction": self.green_fraction, "watermarked": self.watermarked}


def z_score(num_green: int, num_scored: int, gamma: float) -> float:
    """Kirchenbauer et al. 2023, eq. 3: z = (|s|_G - gamma T) / sqrt(T gamma (1 - gamma))."""
    return (num_green - gamma * num_scored) / math.sqrt(num_scored * gamma * (1 - gamma))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space (no normal approximation: short texts too)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def score_ids(ids: list[int], cfg: WatermarkConfig, vocab_size: int, *,
              ignore_repeated: bool = True) -> tuple[int, int]:
    """(scored, green): every (context, token) n-gram of `ids` (the first tokens serve only as context)."""
    n = cfg.context_width if cfg.hashing == "self" else cfg.context_width + 1
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if ignore_repeated:
        grams = list(dict.fromkeys(grams))
    green = sum(_is_green(g[:-1], g[-1], cfg, vocab_size) for g in grams)
    return len(grams), green


def detect(ids: list[int], cfg: WatermarkConfig, vocab_size: int, *, fpr: float = DEFAULT_FPR,
           min_tokens: int = DEFAULT_MIN_TOKENS, ignore_repeated: bool = True) -> WatermarkResult:
    """Test token ids for the watermark of `cfg` (its key, gamma, hashing and context width; delta is not needed).

    `vocab_size` is the width of the generating model's logits. The verdict is "watermarked" when the exact
    one-sided p-value is at most `fpr`, and "too short to judge" below `min_tokens` scored tokens."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
        raise ConfigError(f"vocab_size={vocab_size!r} must be an integer >= 2")
    if not 0 < fpr < 1:
        raise ConfigError(f"fpr={fpr} must be in (0, 1)")
    if not isinstance(min_tokens, int) or min_tokens < 1:
        raise ConfigError(f"min_tokens={min_tokens!r} must be an integer >= 1")
    ids = [int(i) for i in ids]
    if bad := [i for i in ids if not 0 <= i < vocab_size]:
        raise DataError(f"token id {bad[0]} is outside the vocabulary of {vocab_size} tokens: "
                        "was the text tokenized with the model's tokenizer?")
    size = cfg.green_size(vocab_size)
    scored, green = score_ids(ids, cfg, vocab_size, ignore_repeated=ignore_repeated)
    z = z_score(green, scored, cfg.gamma) if scored else None
    p = binomial_sf(green, scored, size / vocab_size) if scored else None
    if scored < min_tokens:
        verdict = "too short to judge"
    else:
        verdict = "watermarked" if p <= fpr else "not watermarked"
    return WatermarkResult(z_score=z, p_value=p, num_tokens=len(ids), num_scored=scored, num_green=green,
                           gamma=cfg.gamma, fpr=fpr, min_tokens=min_tokens, verdict=verdict)


def encode_plain(tokenizer, text: str) -> list[int]:
    """The ids of `text` alone: no BOS or other special token the tokenizer would add."""
    if "add_special_tokens" in inspect.signature(tokenizer.encode).parameters:
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def detect_text(text: str, tokenizer, cfg: WatermarkConfig, *, vocab_size: int | None = None,
                **kw) -> WatermarkResult:
    """`detect` on the tokens of `text` (tokenized without special tokens); `vocab_size` defaults to the
    tokenizer's and must be the generating model's logits width where that differs."""
    if not isinstance(text, str):
        raise DataError(f"expected text (str), got {type(text).__name__}")
    return detect(encode_plain(tokenizer, text), cfg, vocab_size or tokenizer.vocab_size, **kw)
