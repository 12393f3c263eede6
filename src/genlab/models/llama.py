"""Llama: a decoder-only Transformer with the Llama architecture (Touvron et al. 2023).

Against GPT-2 (gpt.py): RMSNorm instead of LayerNorm (Zhang & Sennrich 2019), rotary position embeddings
instead of learned ones (Su et al. 2021, eq. 34, in the "rotate half" layout of Hugging Face), grouped-query
attention with fewer key/value heads than query heads (Ainslie et al. 2023), a SwiGLU MLP (Shazeer 2020,
eq. 6) and no biases. Module names follow `transformers.LlamaForCausalLM` (model.layers.i.self_attn.q_proj,
...), so pretrained weights map one-to-one (adapt/hf.py). SmolLM2 is this architecture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..nn.attention import KVCache, attention, causal_mask, ragged_attention
from ..nn.kernels import MAX_ROWS, kernels, operand
from . import NextTokenLM, decode_embedding, decode_linear, register_family


@dataclass(frozen=True)
class LlamaConfig:
    family: str = "llama"
    vocab_size: int = 0  # set from the tokenizer
    block_size: int = 64  # context length (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads; n_head must be a multiple (grouped-query attention)
    n_embd: int = 128
    intermediate_size: int = 384  # SwiGLU hidden width
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0

    def validate(self):
        for k in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 0 (0 = from the tokenizer)")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"the head size n_embd/n_head={self.n_embd // self.n_head} must be even for rotary "
                              "embeddings")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("model.rope_theta and model.rms_norm_eps must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


# baby has the parameters of gpt's baby (SwiGLU 3 x 128 x 384 ~ GELU 2 x 128 x 512; GQA saves what RoPE adds)
PRESETS = {
    "tiny": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "intermediate_size": 96},
    "baby": {"block_size": 64, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128, "intermediate_size": 384},
    "small": {"block_size": 256, "n_layer": 6, "n_head": 6, "n_kv_head": 2, "n_embd": 384,
              "intermediate_size": 1024, "dropout": 0.2},
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019, eq. 4), computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


@functools.lru_cache(maxsize=8)
def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, head_dim) of RoFormer eq. 34: angle pos * theta^(-2i/d), each frequency twice."""
    with torch.inference_mode(False), torch.no_grad():  # cached: usable later with or without autograd
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        ang = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by their angles: x cos + rotate_half(x) sin. x (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = 0
        if cache is not None and cache.lens is not None:  # continuous batching: rows at their own positions
            return self.o_proj(ragged_attention(q, k, v, cache, layer).transpose(1, 2).reshape(B, T, -1))
        if cache is not None:  # the cache holds keys after rotation, so they never rotate again
            p = cache.pos
            cache.k[layer, :, :, p : p + T] = k
            cache.v[layer, :, :, p : p + T] = v
            k, v = cache.k[layer, :, :, : p + T], cache.v[layer, :, :, : p + T]
        mask = None if (cache is not None and T == 1) else causal_mask(T, p)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, eq. 6)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, layer))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


@register_family("llama", LlamaConfig, PRESETS, modality="text")
class Llama(NextTokenLM, nn.Module):
    continuous_batching = True  # rows at their own positions share a decode step (sampling/text.py BatchDecoder)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("Llama needs model.vocab_size >= 1 (it is normally taken from the tokenizer)")
        self.config = config
        self.context_size = config.block_size
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.model.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.model.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for m in self.modules():  # Llama's initialisation: N(0, 0.02) everywhere, norms at one
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V). With a cache, idx continues the cached tokens. `at` (B,) picks
        one position per row: logits (B, V) of those only (a prompt's prefill needs its last; the head is ~a fifth
        of a small model's work per position)."""
        c = self.config
        T = idx.size(1)
        if cache is not None and cache.lens is not None:  # continuous batching: each row at its own position
            pos = cache.positions()  # (B, 1)
            if int(pos.max()) >= c.block_size:
                raise ValueError(f"a sequence exceeds the context of {c.block_size}")
            cos, sin = rope_tables(c.n_embd // c.n_head, c.block_size, float(c.rope_theta))
            cos, sin = cos.to(idx.device)[pos][:, None], sin.to(idx.device)[pos][:, None]  # (B, 1, 1, D)
            x = self.model.embed_tokens(idx)
            for i, block in enumerate(self.model.layers):
                x = block(x, cos, sin, cache, i)
            cache.lens[: cache.rows] += 1
            return self._head(x, at)
        start = cache.pos if cache is not None else 0
        if start + T > c.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {c.block_size}")
        cos, sin = rope_tables(c.n_embd // c.n_head, c.block_size, float(c.rope_theta))
        cos, sin = cos[start : start + T].to(idx.device), sin[start : start + T].to(idx.device)
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
        return self._head(x, at)

    def _head(self, x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        if at is not None:
            x = x[torch.arange(x.size(0), device=x.device), at.to(x.device)]  # (B, C)
        return self.lm_head(self.model.norm(x))


    # -- the incremental-decode protocol used by sampling/text.py --
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        dtype = self.model.norm.weight.dtype  # the activations' type (an int8 embedding gives floats)
        cache = KVCache(c.n_layer, batch, c.n_kv_head, min(max_len, c.block_size), c.n_embd // c.n_head, dtype,
                        device=self.model.norm.weight.device)
        cache.plan = self._decode_plan()
        return cache

    def _decode_plan(self) -> tuple | None:
        """What the one-token decode step reads, gathered once per cache: per layer the two norm weights and a
        callable per projection (F.linear on the weight, or a quantized layer's own forward). None (use the
        modules) when a layer was swapped for another type or carries hooks, e.g. an adapter."""
        kinds = {"input_layernorm": RMSNorm, "self_attn": Attention, "post_attention_layernorm": RMSNorm, "mlp": MLP}
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
        layers = []
        for block in self.model.layers:
            if type(block) is not Block or any(type(block.get_submodule(n)) is not k or
                                               block.get_submodule(n)._forward_hooks for n, k in kinds.items()):
                return None
            fns = [decode_linear(block.get_submodule(n)) for n in names]
            if any(f is None for f in fns):
                return None
            layers.append((block.input_layernorm.weight, block.post_attention_layernorm.weight, *fns))
        head, emb = decode_linear(self.lm_head), decode_embedding(self.model.embed_tokens)
        if head is None or emb is None or type(self.model.norm) is not RMSNorm:
            return None
        c = self.config
        cos, sin = rope_tables(c.n_embd // c.n_head, c.block_size, float(c.rope_theta))
        dev = self.model.norm.weight.device
        return emb, tuple(layers), self.model.norm.weight, head, cos.to(dev), sin.to(dev), self._compiled_plan()

    def _compiled_plan(self) -> tuple | None:
        """The layers as the compiled CPU kernel takes them (nn/kernels.cpp: one call per layer step): per layer
        the norm weights and each projection's operands; None where it does not apply (another device or dtype,
        an adapter, no compiler), and the Python step below runs instead."""
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
        layers = []
        for block in self.model.layers:
            ops = [operand(block.get_submodule(n)) for n in names]
            norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
            if any(o is None for o in ops) or any(w.dtype != torch.float32 or w.device.type != "cpu" for w in norms):
                return None
            layers.append((norms[0].detach(), norms[1].detach(), [t for o in ops for t in o[1:4]],
                           [o[0] for o in ops], [o[4] for o in ops]))
        k = kernels()
        return None if k is None else (k, layers, operand(self.lm_head))

    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append ids (B, T) to the cache -> next-token logits (B, V) at the last position.

        One new token per row (the generate loop's every step) takes a fast path: the same math as `forward`
        with functional ops on what `new_cache` gathered, no Module calls, the rotary angles of one position,
        and grouped-query attention without repeating keys: the query heads of a group are one matrix product
        against their shared key/value head."""
        plan = cache.plan
        B, T = ids.shape
        compiled = plan[-1] if plan is not None and not self.training else None
        kernel = compiled is not None and T == 1 and B <= MAX_ROWS and cache.kv.dtype == torch.float32
        if cache.lens is not None and not kernel:  # rows at their own positions, through the modules
            return self(ids, cache)[:, -1, :]
        if T != 1 or plan is None or self.training:
            return self(ids, cache, at=torch.full((B,), T - 1, dtype=torch.long))
        emb, layers, norm_w, head, cos, sin, compiled = plan
        c = self.config
        if cache.lens is not None:  # continuous batching: each row at its own position
            if B != cache.rows:
                raise ValueError(f"{B} tokens for {cache.rows} active rows")
            pos = cache.lens[:B].clone()
        else:
            pos, p = None, cache.pos
        last = int(pos.max()) if pos is not None else p
        if last >= min(c.block_size, cache.max_len):
            raise ValueError(f"sequence of {last + 1} tokens exceeds the context of "
                             f"{min(c.block_size, cache.max_len)}")
        if kernel:
            k, ops, head_op = compiled
            x = emb(ids.reshape(-1)).float().contiguous()  # (B, C), updated in place layer by layer
            if pos is None:
                pos = torch.full((B,), p, dtype=torch.long)
            for i, (w_in, w_post, ws, kinds, groups) in enumerate(ops):
                k.llama_layer(x, w_in, w_post, ws, kinds, groups, cache.layers[i], pos, cos, sin, c.rms_norm_eps,
                              c.n_head, c.n_kv_head)
            if cache.lens is not None:
                cache.lens[:B] += 1
            else:
                cache.pos = p + 1
            x = F.rms_norm(x, (c.n_embd,), norm_w.float(), c.rms_norm_eps)
            return head(x) if head_op is None else k.linear(x, *head_op)
        H, Hkv, D, shape, eps = c.n_head, c.n_kv_head, c.n_embd // c.n_head, (c.n_embd,), c.rms_norm_eps
        cos, sin, half = cos[p], sin[p], D // 2

        def rope(t):  # (..., D) at position p: t cos + rotate_half(t) sin, in t's dtype (the cache's)
            return (t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin).to(t.dtype)

        def norm(t, w):
            return F.rms_norm(t.float(), shape, w.float(), eps).to(t.dtype)

        x = emb(ids.reshape(-1))  # (B, C)
        for i, (w_in, w_post, q_proj, k_proj, v_proj, o_proj, gate, up, down) in enumerate(layers):
            h = norm(x, w_in)
            q = rope(q_proj(h).view(B, Hkv, H // Hkv, D))  # (B, Hkv, G, D): a group's query heads together
            kv = cache.layers[i]  # (2, B, Hkv, T_max, D)
            kv[0, :, :, p] = rope(k_proj(h).view(B, Hkv, D))
            kv[1, :, :, p] = v_proj(h).view(B, Hkv, D)
            k, v = kv[0, :, :, : p + 1], kv[1, :, :, : p + 1]  # (B, Hkv, p + 1, D)
            att = (q @ k.transpose(-2, -1) * D**-0.5).softmax(dim=-1)  # (B, Hkv, G, p + 1)
            x = x + o_proj((att @ v).reshape(B, -1))
            h = norm(x, w_post)
            x = x + down(F.silu(gate(h)) * up(h))
        cache.pos = p + 1
        return head(norm(x, norm_w))  # (B, V)
