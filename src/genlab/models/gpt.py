"""GPT: a decoder-only Transformer with the GPT-2 architecture (Radford et al. 2019).

Learned positions, pre-LayerNorm blocks, GELU MLP, causal scaled-dot-product attention and an
output head tied to the token embedding. Names follow GPT-2 (wte, wpe, h.i.ln_1, attn.c_attn, ...) so
weights map one-to-one onto `transformers.GPT2LMHeadModel` (see adapt/hf.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..nn.attention import CausalSelfAttention, KVCache, decode_attention
from . import NextTokenLM, decode_embedding, decode_linear, register_family


@dataclass(frozen=True)
class GPTConfig:
    family: str = "gpt"
    vocab_size: int = 0  # set from the tokenizer
    block_size: int = 64  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation GPT-2's weights use)

    def validate(self):
        for k in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 0 (0 = from the tokenizer)")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.activation not in GELU:
            raise ConfigError(f"model.activation={self.activation!r} must be one of: {', '.join(GELU)}")


GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # activation -> F.gelu's `approximate`

PRESETS = {
    "tiny": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "baby": {"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128},
    "small": {"block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2},
}


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.dropout, cfg.bias, GELU[cfg.activation])

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


@register_family("gpt", GPTConfig, PRESETS, modality="text")
class GPT(NextTokenLM, nn.Module):
    continuous_batching = True  # rows at their own positions share a decode step (sampling/text.py BatchDecoder)

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("GPT needs model.vocab_size >= 1 (it is normally taken from the tokenizer)")
        self.config = config
        self.context_size = config.block_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)


    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V). With a cache, idx continues the cached tokens. `at` (B,) picks
        one position per row: logits (B, V) of those only (a prompt's prefill needs its last)."""
        _B, T = idx.shape
        if cache is not None and cache.lens is not None:  # continuous batching: each row at its own position
            return self._head(self._ragged_forward(idx, cache), at)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self._head(x, at)  # (B, T, V), or (B, V) at `at`

    def _head(self, x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        if at is not None:
            x = x[torch.arange(x.size(0), device=x.device), at.to(x.device)]  # (B, C)
        return self.lm_head(self.transformer.ln_f(x))


    def _ragged_forward(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        pos = cache.positions()  # (B, 1)
        if int(pos.max()) >= self.config.block_size:
            raise ValueError(f"a sequence exceeds the context of {self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, 1, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        cache.lens[: cache.rows] += 1
        return x

    # -- the incremental-decode protocol used by sampling/text.py --
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        cache = KVCache(c.n_layer, batch, c.n_head, min(max_len, c.block_size), c.n_embd // c.n_head,
                        device=self.transformer.wpe.weight.device)
        cache.plan = self._decode_plan()
        return cache

    def _decode_plan(self) -> tuple | None:
        """The weights the one-token decode step reads, gathered once per cache (so once per generation, not
        per token: a module attribute lookup costs about as much as a small op), each projection as a callable
        (F.linear on its weights, or a quantized layer's own forward). None (use the modules) when a layer was
        swapped for another type or carries hooks, e.g. an adapter."""
        kinds = {"ln_1": nn.LayerNorm, "attn": CausalSelfAttention, "ln_2": nn.LayerNorm, "mlp": MLP}
        layers = []
        for block in self.transformer.h:
            if type(block) is not Block or any(type(block.get_submodule(n)) is not k or
                                               block.get_submodule(n)._forward_hooks for n, k in kinds.items()):
                return None
            fns = [decode_linear(block.get_submodule(n)) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
            if any(f is None for f in fns):
                return None
            ln_1, ln_2 = block.ln_1, block.ln_2
            layers.append((ln_1.weight, ln_1.bias, ln_1.eps, fns[0], fns[1], ln_2.weight, ln_2.bias, ln_2.eps,
                           fns[2], fns[3]))
        t = self.transformer
        head, wte = decode_linear(self.lm_head), decode_embedding(t.wte)
        if type(t.ln_f) is not nn.LayerNorm or head is None or wte is None:
            return None
        return (wte, t.wpe.weight, tuple(layers), t.ln_f.weight, t.ln_f.bias, t.ln_f.eps, head,
                self.config.n_head, (self.config.n_embd,), GELU[self.config.activation])

    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append ids (B, T) to the cache -> next-token logits (B, V) at the last position.

        One new token per row (the generate loop's every step) takes a fast path: the same math as
        `forward` (blocks of Block/MLP/CausalSelfAttention) written with functional ops on weights gathered
        in `new_cache`, no Module calls, attention through `decode_attention` and the head on one position."""
        plan = cache.plan
        if ids.size(1) != 1 or plan is None or self.training or cache.lens is not None:
            return self(ids, cache, at=torch.full((ids.size(0),), ids.size(1) - 1, dtype=torch.long))
        wte, wpe, layers, lnf_w, lnf_b, lnf_eps, head, n_head, shape, approx = plan
        p = cache.pos
        if p >= wpe.size(0):
            raise ValueError(f"sequence of {p + 1} tokens exceeds the context of {wpe.size(0)}")
        x = wte(ids.reshape(-1)) + wpe[p]  # (B, C)
        for i, (w1, b1, e1, c_attn, a_proj, w2, b2, e2, c_fc, m_proj) in enumerate(layers):
            y = decode_attention(c_attn(F.layer_norm(x, shape, w1, b1, e1)), cache, i, n_head)
            x = x + a_proj(y)
            x = x + m_proj(F.gelu(c_fc(F.layer_norm(x, shape, w2, b2, e2)), approximate=approx))
        cache.pos = p + 1
        return head(F.layer_norm(x, shape, lnf_w, lnf_b, lnf_eps))  # (B, V)
