"""Smoothed n-gram language model: interpolated Kneser-Ney (Chen & Goodman 1998, eq. 26), the classic baseline.

Counts live in sorted tensors of n-gram keys (an n-gram of ids w1..wk is the integer sum wi * V^(k-i)), so
look-ups are `searchsorted` calls and the whole model saves to safetensors like any other. For each order k:

  P(w | h) = max(c(h w) - D_k, 0) / c(h .) + D_k * N1+(h .) / c(h .) * P(w | h')      if c(h .) > 0
           = P(w | h')                                                               otherwise

with raw counts at the highest order, continuation counts N1+(. h w) below it, D_k = n1 / (n1 + 2 n2) (kept
within [0.05, 0.95]), and
the unigram level interpolated with the uniform distribution so unseen tokens keep non-zero mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.outputs import StepOutput
from . import register_family


def discount(n1: int, n2: int) -> float:
    """Ney's absolute discount n1 / (n1 + 2 n2), kept within [0.05, 0.95] so that a small or repetitive corpus
    (no singletons: D = 0) still leaves probability mass for unseen tokens."""
    d = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
    return min(max(d, 0.05), 0.95)


@dataclass(frozen=True)
class NGramConfig:
    family: str = "ngram"
    vocab_size: int = 0  # set from the tokenizer
    order: int = 5

    def validate(self):
        if not 1 <= self.order <= 16:
            raise ConfigError(f"model.order={self.order} must be in [1, 16]")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 0 (0 = from the tokenizer)")
        if self.vocab_size > 1 and self.order * math.log2(self.vocab_size) >= 62:
            raise ConfigError(
                f"model.order={self.order} with vocab_size={self.vocab_size} overflows 64-bit n-gram keys; "
                f"use order <= {int(61 // math.log2(self.vocab_size))}"
            )


PRESETS = {"tiny": {"order": 3}, "char5": {"order": 5}, "char7": {"order": 7}, "token3": {"order": 3}}


class _History:
    """The n-gram 'cache': the last order-1 tokens of each row."""

    def __init__(self, batch: int, keep: int):
        self.tokens = torch.zeros(batch, 0, dtype=torch.long)
        self.keep = keep
        self.pos = 0


@register_family("ngram", NGramConfig, PRESETS, modality="text")
class NGram(nn.Module):
    def __init__(self, config: NGramConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("ngram needs model.vocab_size >= 1 (it is normally taken from the tokenizer)")
        self.config = config
        self.context_size = None  # unbounded: only the last order-1 tokens matter
        N = config.order
        # per order k (1..N): sorted keys of seen k-grams and their counts (raw at N, continuation below);
        # per context order k (2..N): sorted context keys, total count c(h .), and N1+(h .); discounts D_k
        for k in range(1, N + 1):
            self.register_buffer(f"keys{k}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"counts{k}", torch.zeros(0))
            if k > 1:
                self.register_buffer(f"ctx_keys{k}", torch.zeros(0, dtype=torch.long))
                self.register_buffer(f"ctx_total{k}", torch.zeros(0))
                self.register_buffer(f"ctx_types{k}", torch.zeros(0))
        self.register_buffer("discount", torch.zeros(N + 1))
        self.register_buffer("n_trained", torch.zeros((), dtype=torch.long))
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # keeps .parameters() non-empty

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):  # counts have data-dependent sizes
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def num_params(self) -> int:
        """Stored statistics: one count per distinct n-gram of every order."""
        return sum(len(getattr(self, f"keys{k}")) for k in range(1, self.config.order + 1))

    # ---- estimation ----
    @torch.no_grad()
    def fit_data(self, data) -> dict[str, float]:
        """Count every n-gram of the training split (data.train_ids) once: the closed-form 'training'."""
        ids = data.train_ids.long()
        V, N = self.config.vocab_size, self.config.order
        if len(ids) < N:
            raise ValueError(f"need at least {N} training tokens for order {N}, got {len(ids)}")
        top = torch.zeros(len(ids) - N + 1, dtype=torch.long)  # key of the N-gram ending at each position
        for j in range(N):
            top = top * V + ids[j : len(ids) - N + 1 + j]
        for k in range(N, 0, -1):
            if k == N:
                uniq, cnt = torch.unique(top, return_counts=True)
            else:  # continuation count: how many distinct tokens precede this k-gram
                higher = getattr(self, f"keys{k + 1}")
                uniq, cnt = torch.unique(higher % V**k, return_counts=True)
            setattr(self, f"keys{k}", uniq)
            setattr(self, f"counts{k}", cnt.double())
            n1, n2 = (cnt == 1).sum().item(), (cnt == 2).sum().item()
            self.discount[k] = discount(n1, n2)
            if k > 1:
                ctx, inverse = torch.unique(uniq // V, return_inverse=True)
                setattr(self, f"ctx_keys{k}", ctx)
                setattr(self, f"ctx_total{k}", torch.zeros(len(ctx), dtype=torch.float64).index_add_(
                    0, inverse, cnt.double()))
                setattr(self, f"ctx_types{k}", torch.bincount(inverse, minlength=len(ctx)).double())
        self.n_trained.fill_(len(ids))
        return {"ngrams": float(sum(len(getattr(self, f"keys{k}")) for k in range(1, N + 1)))}

    @staticmethod
    def _lookup(sorted_keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if len(sorted_keys) == 0:
            return torch.zeros(q.shape, dtype=torch.float64)
        i = torch.searchsorted(sorted_keys, q.contiguous()).clamp(max=len(sorted_keys) - 1)
        return torch.where(sorted_keys[i] == q, values[i], torch.zeros((), dtype=values.dtype))

    def _prob(self, context: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """P(w | context) for context (M, N-1) and candidates w (M, K) -> (M, K), float64.

        Context entries < 0 mean 'before the start' and shorten the usable history."""
        V, N = self.config.vocab_size, self.config.order
        if self.n_trained.item() == 0:
            raise RuntimeError("the n-gram model has not been fitted (train it first)")
        w = w.long()
        uni = self.counts1.sum()
        # unigram level: continuation probability interpolated with uniform (Chen & Goodman 1998, eq. 24)
        c1 = self._lookup(self.keys1, self.counts1, w)
        D1 = self.discount[1]
        p = (c1 - D1).clamp(min=0) / uni + D1 * len(self.keys1) / uni / V
        ctx_key = torch.zeros(context.size(0), dtype=torch.long)
        valid = torch.ones(context.size(0), dtype=torch.bool)
        for k in range(2, N + 1):
            tok = context[:, N - k]  # the token k-1 places before w
            valid = valid & (tok >= 0)
            ctx_key = tok.clamp(min=0) * V ** (k - 2) + ctx_key  # key of the (k-1)-token context
            total = self._lookup(getattr(self, f"ctx_keys{k}"), getattr(self, f"ctx_total{k}"), ctx_key)
            types = self._lookup(getattr(self, f"ctx_keys{k}"), getattr(self, f"ctx_types{k}"), ctx_key)
            c = self._lookup(getattr(self, f"keys{k}"), getattr(self, f"counts{k}"), ctx_key[:, None] * V + w)
            D = self.discount[k]
            seen = (valid & (total > 0))[:, None]
            safe_total = total.clamp(min=1e-12)[:, None]
            p = torch.where(seen, (c - D).clamp(min=0) / safe_total + D * types[:, None] / safe_total * p, p)
        return p

    def _contexts(self, x: torch.Tensor) -> torch.Tensor:
        """For x (B, T): the N-1 tokens before each position (B*T, N-1), -1 where before the start."""
        B, T = x.shape
        N = self.config.order
        padded = torch.cat([torch.full((B, N - 1), -1, dtype=torch.long), x.long()], dim=1)
        return padded.unfold(1, N - 1, 1)[:, :T].reshape(B * T, N - 1) if N > 1 else torch.zeros(B * T, 0,
                                                                                                  dtype=torch.long)

    def _logp_next(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log P(y_t | x_<=t) for windows x, y (B, T) as in LM training batches -> (B, T)."""
        B, T = x.shape
        ctx = self._contexts(torch.cat([x, y[:, -1:]], dim=1))  # (B*(T+1), N-1)
        ctx = ctx.view(B, T + 1, -1)[:, 1:].reshape(B * T, -1)
        return torch.log(self._prob(ctx, y.reshape(-1, 1))).view(B, T)

    loss_unit = "nats/token"  # what loss() returns, named wherever it is printed

    def loss(self, batch) -> StepOutput:
        x, y = batch
        nll = -self._logp_next(x, y).mean()
        return StepOutput(nll.float() + 0 * self.dummy, {}, n_items=y.numel())

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_1..x_{T-1} | x_0) in nats, (B,), the same quantity as GPT.log_prob."""
        return self._logp_next(x[:, :-1], x[:, 1:]).sum(dim=1).float()

    # ---- the incremental-decode protocol of sampling/text.py ----
    def new_cache(self, batch: int, max_len: int) -> _History:
        return _History(batch, self.config.order - 1)

    def decode(self, ids: torch.Tensor, cache: _History) -> torch.Tensor:
        hist = torch.cat([cache.tokens, ids.long()], dim=1)
        cache.tokens = hist[:, hist.size(1) - cache.keep :] if cache.keep else hist[:, :0]
        cache.pos += ids.size(1)
        B, N, V = hist.size(0), self.config.order, self.config.vocab_size
        ctx = torch.full((B, N - 1), -1, dtype=torch.long)
        if N > 1:
            tail = hist[:, -(N - 1):]
            ctx[:, ctx.size(1) - tail.size(1):] = tail
        probs = self._prob(ctx, torch.arange(V).expand(B, V))
        return torch.log(probs).float()  # (B, V) log-probabilities serve as logits

    def sample(self, n: int, *, generator: torch.Generator | None = None, **controls) -> torch.Tensor:
        from ..sampling.text import generate_ids

        return torch.tensor(generate_ids(self, [[0]] * n, generator=generator, **controls))
