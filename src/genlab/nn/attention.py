"""Causal multi-head self-attention with an optional key/value cache (GPT-2 naming: c_attn, c_proj)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys/values for every layer: `k`, `v` (L, B, H, T_max, D); `pos` = tokens already cached.

    Both live in one buffer `kv` (L, 2, B, H, T_max, D), so a decode step stores its key and value with one
    copy (`layers[i]` is layer i's (2, B, H, T_max, D) slice). Slots at and past `pos` are uninitialised:
    attention only ever reads the first `pos` (+ the new) positions. `plan` is free for the model that made
    the cache (GPT keeps its weights gathered once per generation there)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, dtype=torch.float32,
                 device=None):
        self.kv = torch.empty((n_layer, 2, batch, n_head, max_len, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]
        self.layers = [self.kv[i] for i in range(n_layer)]  # not unbind: its views refuse in-place writes
        self.pos = 0
        self.max_len = max_len
        self.plan = None
        # continuous batching: rows at their own positions. When set, `lens` (B,) counts the tokens cached per row,
        # a step feeds one token to each of the first `rows` rows, and `pos` is unused (see `ragged_attention`).
        self.lens: torch.Tensor | None = None
        self.rows = 0

    def positions(self) -> torch.Tensor:
        """(rows, 1) the position of each active row's next token (continuous batching)."""
        return self.lens[: self.rows, None]


def decode_attention(qkv: torch.Tensor, cache: KVCache, layer: int, n_head: int) -> torch.Tensor:
    """One new token per row: qkv (B, 3C), the c_attn output -> attention output (B, C), before c_proj.

    Stores the token's key and value at `cache.pos` (the caller advances `pos` once for all layers) and lets
    its query see every cached key 0..pos: no mask is needed, so one fused call does
    softmax(q k^T / sqrt(d)) v (the same numbers as `attention()` to ~1e-7 in fp32) with fewer ops per step
    than the written-out form."""
    B = qkv.size(0)
    p = cache.pos
    qkv = qkv.view(B, 3, n_head, 1, -1)  # (B, 3, H, 1, D)
    kv = cache.layers[layer]  # (2, B, H, T_max, D)
    kv.narrow(3, p, 1).copy_(qkv[:, 1:].transpose(0, 1))  # k and v of the new token in one copy
    kv = kv.narrow(3, 0, p + 1)
    k, v = kv[0], kv[1]  # (B, H, p + 1, D)
    y = F.scaled_dot_product_attention(qkv[:, 0], k, v)  # (B, H, 1, D)
    return y.reshape(B, -1)  # (B, C): heads side by side, as the full path's transpose + view


def ragged_attention(q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
    """One new token per row, each row at its own position (continuous batching: requests that joined at different
    times share the decode step): q (B, H, 1, D), k and v (B, Hkv, 1, D) of the new tokens, B = `cache.rows`.
    Stores each row's key and value at `cache.lens[b]` and lets its query see only its own keys 0..lens[b]; the
    caller advances `lens` once for all layers."""
    B = q.size(0)
    lens = cache.lens[:B]
    rows = torch.arange(B, device=lens.device)
    kv = cache.layers[layer]  # (2, B_max, Hkv, T_max, D)
    kv[0][rows, :, lens] = k[:, :, 0]
    kv[1][rows, :, lens] = v[:, :, 0]
    T = int(lens.max()) + 1
    mask = (torch.arange(T, device=lens.device) <= lens[:, None])[:, None, None, :]  # (B, 1, 1, T)
    keys, values = kv[0, :B, :, :T], kv[1, :B, :, :T]
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                          enable_gqa=q.size(1) != k.size(1))


@functools.lru_cache(maxsize=16)
def causal_mask(T: int, offset: int = 0) -> torch.Tensor:
    """(T, offset + T) bool: query i (at position offset + i) may see keys 0..offset + i."""
    return torch.ones(T, offset + T, dtype=torch.bool).tril(diagonal=offset)


def attention(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1). `mask` is `causal_mask(Tq, offset)` or None; k and
    v may have fewer heads than q, each serving H / Hkv query heads (grouped-query attention, Ainslie et al. 2023).

    In fp32 (and on a GPU) this is PyTorch's fused kernel, which on a CPU runs forward and backward ~1.5x faster
    than the written-out form and never copies the shared key/value heads. Under bf16 autocast on a CPU the
    written-out form below is several times faster than the fused kernel, so it is used there."""
    groups = q.size(1) // k.size(1)
    if q.device.type != "cpu" or (q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        square = mask is not None and mask.size(-1) == mask.size(-2)  # causal_mask(T, 0): plain causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if square else mask, dropout_p=dropout,
                                              is_causal=square, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
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
        elif cache.lens is not None:
            y = ragged_attention(q, k, v, cache, layer)
        else:
            p = cache.pos
            cache.k[layer, :, :, p : p + T] = k
            cache.v[layer, :, :, p : p + T] = v
            k, v = cache.k[layer, :, :, : p + T], cache.v[layer, :, :, : p + T]
            y = attention(q, k, v, causal_mask(T, p) if T > 1 else None)  # one new query sees every cached key
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))
