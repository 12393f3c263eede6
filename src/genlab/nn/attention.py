"""Causal multi-head self-attention with an optional key/value cache (GPT-2 naming: c_attn, c_proj)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys/values for every layer: (L, B, H, T_max, D). `pos` = tokens already cached."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, dtype=torch.float32):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.pos = 0
        self.max_len = max_len


@functools.lru_cache(maxsize=16)
def causal_mask(T: int, offset: int = 0) -> torch.Tensor:
    """(T, offset + T) bool: query i (at position offset + i) may see keys 0..offset + i."""
    return torch.ones(T, offset + T, dtype=torch.bool).tril(diagonal=offset)


def attention(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1), written out: on CPU at these sizes it is
    several times faster than the fused kernel under bf16 autocast, and it matches it in fp32."""
    att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)  # (B, H, Tq, Tk)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = att.softmax(dim=-1)
    if dropout:
        att = F.dropout(att, dropout)
    return att @ v  # (B, H, Tq, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is None:
            y = attention(q, k, v, causal_mask(T), self.dropout if self.training else 0.0)
        else:
            p = cache.pos
            cache.k[layer, :, :, p : p + T] = k
            cache.v[layer, :, :, p : p + T] = v
            k, v = cache.k[layer, :, :, : p + T], cache.v[layer, :, :, : p + T]
            y = attention(q, k, v, causal_mask(T, p) if T > 1 else None)  # one new query sees every cached key
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))
