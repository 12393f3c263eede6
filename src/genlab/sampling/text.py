"""Text decoding: a chain of pure logits processors over one generate loop with a KV cache (DESIGN.md 3).

Processors run in the order repetition penalty -> watermark -> temperature -> top-k -> top-p (transformers'
order: the watermark bias is added to the raw logits, so the temperature scales it too); temperature 0 means greedy.
The loop drives any model with the incremental-decode protocol (`new_cache`, `decode`, `context_size`),
so the GPT and the n-gram baseline share it. Text-level features (stop strings, streaming deltas, batched
prompts of different lengths) sit on top in `generate_text`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ..core.errors import ConfigError
from .watermark import WatermarkConfig, apply_watermark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats (Keskar et al. 2019)
    stop: tuple[str, ...] = ()
    watermark: WatermarkConfig | None = None  # the green-list watermark (sampling/watermark.py); a dict works too

    def __post_init__(self):
        if self.watermark is not None:
            object.__setattr__(self, "watermark", WatermarkConfig.from_value(self.watermark))
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or not (
            0 <= self.max_new_tokens <= 1_000_000
        ):
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be an integer in [0, 1000000]")
        if not self.temperature >= 0 or self.temperature > 1e4:  # also rejects NaN
            raise ConfigError(f"temperature={self.temperature} must be in [0, 10000] (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not 0 < self.repetition_penalty <= 100:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be in (0, 100] (1 = off)")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")


# ---- logits processors: pure functions (history (B, L), logits (B, V)) -> logits (B, V) ----

def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019, eq. 1): divide positive / multiply negative scores of seen tokens."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens with mass >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # mass before this token already reaches p; keeps >= 1 token
    return logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))


def process(logits: torch.Tensor, history: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.watermark is not None:
        logits = apply_watermark(logits, history, cfg.watermark)
    logits = apply_temperature(logits, cfg.temperature)
    logits = apply_top_k(logits, cfg.top_k)
    return apply_top_p(logits, cfg.top_p)


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator).squeeze(1)


# ---- the loop ----

def iter_tokens(
    model, prompt: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Yield the next token (B,) for `max_new_tokens` steps after `prompt` (B, T), T >= 1.

    The KV cache holds the whole window while it fits; past the model's context the window slides
    exactly (the last `context_size` tokens are re-encoded each step, as a model without a cache would).
    Each step runs under `torch.inference_mode`, which is off again while the caller holds a token."""
    ctx = model.context_size
    if ctx is not None and prompt.size(1) > ctx:
        prompt = prompt[:, -ctx:]
    n = cfg.max_new_tokens
    if n == 0:
        return
    if cfg.temperature == 0 and cfg.top_k:  # greedy: top-k keeps the max and its ties: the argmax stays
        cfg = replace(cfg, top_k=0)
    keep_all = cfg.repetition_penalty != 1.0 or cfg.watermark is not None  # both read the tokens so far
    # history (B, L): every token so far while the penalty needs it; else it is only brought up to date (from
    # `pending`, the new tokens (B, 1) not yet in it) when the window slides, and keeps the last ctx tokens.
    history, pending = prompt, []
    B = prompt.size(0)
    max_len = prompt.size(1) + n
    with torch.inference_mode():
        cache = model.new_cache(B, max_len if ctx is None else min(max_len, ctx))
        nxt = choose(process(model.decode(prompt, cache), history, cfg), cfg, generator)
    for _ in range(n - 1):
        yield nxt
        with torch.inference_mode():
            step = nxt.unsqueeze(1)  # (B, 1)
            if keep_all:
                history = torch.cat([history, step], dim=1)
            elif ctx is not None:
                pending.append(step)
            if ctx is not None and cache.pos >= ctx:  # window full: slide by re-encoding the last ctx tokens
                if pending:
                    history = torch.cat([history, *pending], dim=1)[:, -ctx:]
                    pending.clear()
                cache = model.new_cache(B, ctx)
                logits = model.decode(history[:, -ctx:], cache)
            else:
                logits = model.decode(step, cache)
            nxt = choose(process(logits, history, cfg), cfg, generator)
    yield nxt


def generate_ids(model, prompts: list[list[int]], *, generator: torch.Generator | None = None, **controls):
    """Token-level generation for prompts of equal length: list of new-token lists."""
    cfg = SamplingConfig(**controls)
    prompt = torch.tensor(prompts, dtype=torch.long)
    steps = list(iter_tokens(model, prompt, cfg, generator))
    return torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]


@dataclass
class TextDelta:
    """A piece of streamed text: `text` is appended to sample `index`; `done` marks its last piece."""

    index: int
    text: str
    done: bool = False


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still turn into a stop string or a partial UTF-8 character."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    if text.endswith("\ufffd"):  # an incomplete multi-byte character from byte-level BPE
        n = max(n, len(text) - len(text.rstrip("\ufffd")))
    return n


def _whole(text: str) -> str:
    """The text of a finished sample without a trailing incomplete UTF-8 character (byte-level BPE can stop after
    the first bytes of a character: those bytes decode to U+FFFD and would never be completed)."""
    return text.rstrip("\ufffd")


class TextAssembler:
    """The text of one sample as its tokens arrive: `push(token)` returns the new text that is safe to show. A stop
    string ends the sample (it is not included), so does an end-of-sequence id; text that might still turn into a
    stop string or a partial UTF-8 character is held back until it cannot. `finish_reason` is "stop" or "length"."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), eos: set[int] | frozenset = frozenset()):
        self.tokenizer, self.stop, self.eos = tokenizer, tuple(stop), eos
        self.ids: list[int] = []
        self.emitted = 0
        self.done = False
        self.finish_reason: str | None = None

    def push(self, t: int) -> str:
        if t in self.eos:
            return self.finish("stop")
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids)
        hits = [h for s in self.stop if (h := text.find(s, max(self.emitted - len(s), 0))) >= 0]
        if hits:
            self.done, self.finish_reason = True, "stop"
            return text[self.emitted: min(hits)]
        safe = len(text) - _held_back(text, self.stop)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def finish(self, reason: str = "length") -> str:
        """End the sample (out of tokens, or `reason`): the rest of its text."""
        self.done, self.finish_reason = True, reason
        return _whole(self.tokenizer.decode(self.ids))[self.emitted:]


def stream_text(
    model,
    tokenizer,
    prompts: list[str],
    cfg: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    start_id: int = 0,
    eos_id: int | list[int] | None = None,
) -> Iterator[TextDelta]:
    """Generate a continuation of each prompt (a string, or a list of token ids already encoded), streaming
    `TextDelta`s as the tokens arrive.

    Prompts of equal token length are batched together; stop strings end a sample (the stop string is
    not included); an `eos_id` token (or any of a list) ends it too."""
    eos = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    encoded = []
    warned = False
    for p in prompts:
        ids = (list(p) or [start_id]) if not isinstance(p, str) else tokenizer.encode(p) if p else [start_id]
        ctx = model.context_size
        if ctx is not None and len(ids) > ctx:
            if not warned:
                log.warning("prompt of %d tokens is longer than the context (%d): keeping the last %d", len(ids),
                            ctx, ctx)
                warned = True
            ids = ids[-ctx:]
        encoded.append(ids)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    for length in sorted(groups):
        rows = groups[length]
        prompt = torch.tensor([encoded[i] for i in rows], dtype=torch.long)
        texts = [TextAssembler(tokenizer, cfg.stop, eos) for _ in rows]
        for tok in iter_tokens(model, prompt, cfg, generator):
            for r, t in enumerate(tok.tolist()):
                if texts[r].done:
                    continue
                piece = texts[r].push(t)
                if piece or texts[r].done:
                    yield TextDelta(rows[r], piece, done=texts[r].done)
            if all(a.done for a in texts):
                break
        for r, a in enumerate(texts):
            if not a.done:
                yield TextDelta(rows[r], a.finish(), done=True)


def generate_text(model, tokenizer, prompts: list[str], cfg: SamplingConfig, **kw) -> list[str]:
    out = [""] * len(prompts)
    for d in stream_text(model, tokenizer, prompts, cfg, **kw):
        out[d.index] += d.text
    return out


# ---- continuous batching: sequences that join and leave a shared decode step (the server's engine) ----

class Sequence:
    """One sample decoded by a `BatchDecoder`: its prompt and tokens so far (what the repetition penalty reads), its
    own controls and random generator (so a seeded request gives the same text whatever else shares the batch), and
    the text assembled so far."""

    def __init__(self, prompt: list[int], cfg: SamplingConfig, tokenizer, eos: set[int],
                 generator: torch.Generator | None = None):
        if cfg.temperature == 0 and cfg.top_k:  # as in iter_tokens: greedy keeps the argmax
            cfg = replace(cfg, top_k=0)
        self.prompt, self.cfg, self.generator = list(prompt), cfg, generator
        self.history = torch.tensor([self.prompt], dtype=torch.long)  # (1, L)
        self.text = TextAssembler(tokenizer, cfg.stop, eos)
        self.new_tokens = 0

    def next_token(self, logits: torch.Tensor) -> int:
        """Choose the next token from this sequence's logits (V,) with its own controls. Sampling is by the inverse
        CDF (one uniform draw from the sequence's generator against the cumulative probabilities): an exact draw
        from the same distribution as `choose`, several times cheaper than torch.multinomial for one row."""
        logits = process(logits[None].float().cpu(), self.history, self.cfg)  # (1, V)
        if self.cfg.temperature == 0:
            t = logits.argmax(dim=-1)
        else:
            cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)
            u = (1.0 - torch.rand((1, 1), generator=self.generator)) * cdf[:, -1:]  # in (0, total]: never a p = 0 token
            t = torch.searchsorted(cdf, u).clamp_(max=cdf.size(-1) - 1)[:, 0]
        self.history = torch.cat([self.history, t[:, None]], dim=1)
        self.new_tokens += 1
        return int(t)


class BatchDecoder:
    """Continuous batching (Yu et al. 2022, "Orca", iteration-level scheduling) over one KV cache of `slots` rows:
    `add` prefills a new prompt into a free row, `step` feeds one token to every active row in ONE forward pass
    (each row at its own position, attending only to its own keys), `remove` frees a row between steps. Rows are
    kept packed: the active rows are 0..rows-1 (removing a row moves the last one into its place). Needs a model
    with `continuous_batching = True` (gpt, llama); a row ends at `max_len` tokens (the model's context, or less
    to bound the cache's memory; no sliding window)."""

    def __init__(self, model, slots: int, max_len: int | None = None):
        if not getattr(model, "continuous_batching", False):
            raise ConfigError(f"{type(model).__name__} does not support continuous batching")
        if slots < 1:
            raise ConfigError(f"slots={slots} must be >= 1")
        self.model, self.slots = model, slots
        self.max_len = min(model.context_size, max_len or model.context_size)  # the cache holds slots x max_len
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            self.cache = model.new_cache(slots, self.max_len)  # its plan: llama's compiled step takes ragged rows
            self.cache.kv.zero_()  # masked slots are read too (weight 0): they must not hold NaN
            self.cache.lens = torch.zeros(slots, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return self.cache.rows

    def length(self, row: int) -> int:
        """Tokens cached for `row` (its prompt and the tokens fed so far)."""
        return int(self.cache.lens[row])

    def add(self, prompt: list[int]) -> torch.Tensor:
        """Prefill `prompt` into row `rows` (which becomes active) -> the next-token logits (V,)."""
        return self.add_many([prompt])[0]

    def add_many(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill several prompts in ONE forward pass (right-padded to the longest; a row's padding comes after its
        tokens, so the causal mask keeps it out of them, and attention never reads past a row's length) into rows
        `rows`.. -> the next-token logits of each (k, V)."""
        k, r = len(prompts), self.rows
        if r + k > self.slots:
            raise RuntimeError("no free row")
        lengths = [len(p) for p in prompts]
        if not all(1 <= n < self.max_len for n in lengths):
            bad = next(n for n in lengths if not 1 <= n < self.max_len)
            raise ConfigError(f"a prompt of {bad} tokens must have 1 to {self.max_len - 1} tokens (the context)")
        T = max(lengths)
        ids = torch.zeros((k, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        with torch.inference_mode():
            many = self.model.new_cache(k, T)
            n = torch.tensor(lengths, device=self.device)
            last = self.model(ids.to(self.device), many, at=n - 1)  # (k, V): each row's last real position
            self.cache.kv[:, :, r : r + k, :, :T] = many.kv[:, :, :, :, :T]
            self.cache.lens[r : r + k] = n
        self.cache.rows = r + k
        return last

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens[r] to each active row r -> next-token logits (rows, V)."""
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for {self.rows} active rows")
        with torch.inference_mode():
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
            return self.model.decode(ids, self.cache)

    def remove(self, row: int) -> int | None:
        """Free `row`; the last active row moves into it. Returns the old index of the row that moved (or None)."""
        last = self.rows - 1
        moved = None
        if row != last:
            with torch.inference_mode():
                n = int(self.cache.lens[last])
                self.cache.kv[:, :, row, :, :n] = self.cache.kv[:, :, last, :, :n]
                self.cache.lens[row] = n
            moved = last
        self.cache.rows = last
        return moved
