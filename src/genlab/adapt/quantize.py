"""Weight-only quantization of a language model's Linear layers: int8 per output channel, int4 in groups.

- int8: w ~ q * s, q in [-127, 127], one scale per output row (absmax; LLM.int8's vector-wise scaling without
  the outliers, Dettmers et al. 2022, eq. 1-2).
- int4: w ~ (q - 8) * s + z, q in [0, 15], one scale and offset per group of `group_size` inputs of a row
  (asymmetric min-max, as GPTQ/AWQ checkpoints and llama.cpp's Q4_1 store it), two values per byte.
Decoding reads every weight for one token per sequence, so its speed is the bytes read. PyTorch's own CPU kernels
for these layouts (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) and its dynamic int8 (fbgemm) were
measured on this project's CPUs: the first two are 2.4-12x slower than fp32 at batch 1, the third is fast but
its 8-bit activations cost SmolLM2 7% perplexity token by token and triple it over a prompt
(benchmarks/quant_routes.py). So small AVX2 kernels (nn/kernels.cpp: widen 8 weights to floats, FMA into the rows
of x) do batch <= 16; they are built once with PyTorch's extension builder and tested against PyTorch's kernels. Without a compiler or AVX2, and for longer
inputs (a prompt), the layer multiplies by its dequantized weight: the same numbers, at fp32 speed.
Activations stay in floating point. The token embedding tied to the output layer is quantized with it (the rows
of the int8 matrix are the token vectors), so the file shrinks by the embedding too; under int4 the tied
embedding/output matrix stays int8, as llama.cpp's 4-bit files keep their output layer at higher precision.
Where a kernel is missing (another device), the layer multiplies by its dequantized weight: same numbers, slower.
A quantized run is for inference: config.json records the method and training refuses the run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..nn.kernels import MAX_ROWS, kernels

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)


def check(method: str, group_size: int | None) -> int | None:
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is unknown; known: {', '.join(METHODS)}")
    if method == "int8":
        if group_size is not None:
            raise ConfigError("--group-size goes with int4 (int8 has one scale per output row)")
        return None
    group_size = 32 if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size}: int4 groups of {', '.join(map(str, GROUP_SIZES))} inputs")
    return group_size


# ---- the maths, as pure functions (the reference the kernels are tested against) ----

def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scales (N,) fp32: symmetric absmax per row."""
    s = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w.float() / s[:, None]).clamp(-127, 127).to(torch.int8), s


def int4_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) uint8 in [0, 15], scales and offsets (N, K / group) fp32: min-max per group."""
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, s, lo + 8 * s  # w ~ (q - 8) s + z, the kernel's convention


def int4_dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    g = q.reshape(N, s.size(1), -1).float()
    return ((g - 8) * s[..., None] + z[..., None]).reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K / 2) uint8, the even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p & 15, p >> 4), dim=-1).reshape(p.size(0), -1)


KERNEL_MAX_ROWS = MAX_ROWS


class QuantLinear(nn.Module):
    """A Linear layer (no bias) holding int8 or int4 weights; forward(x) = x @ dequantized(W).T."""

    quantized = True
    decode_ready = True  # the llama/gpt decode fast paths may call its forward directly

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None = None,
                 bias: bool = False):
        super().__init__()
        if in_features % 2 or (group_size and in_features % group_size):
            raise ConfigError(f"a {in_features}-wide layer cannot be split into int4 groups of {group_size}")
        self.in_features, self.out_features, self.method, self.group_size = in_features, out_features, method, \
            group_size
        if method == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features))
        else:
            n = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n))
            self.register_buffer("offsets", torch.zeros(out_features, n))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, method: str, group_size: int | None = None) -> QuantLinear:
        m = cls(lin.in_features, lin.out_features, method, group_size, bias=lin.bias is not None)
        with torch.no_grad():
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
            if method == "int8":
                q, s = int8_quantize(lin.weight)
                m.qweight.copy_(q)
                m.scales.copy_(s)
            else:
                q, s, z = int4_quantize(lin.weight, group_size)
                m.qweight.copy_(pack_nibbles(q))
                m.scales.copy_(s)
                m.offsets.copy_(z)
        return m

    def dequantize(self) -> torch.Tensor:
        if self.method == "int8":
            return self.qweight.float() * self.scales[:, None]
        return int4_dequantize(unpack_nibbles(self.qweight), self.scales, self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        fits = x2.size(0) <= KERNEL_MAX_ROWS and self.in_features % 8 == 0 and x.dtype == torch.float32 and \
            not (x.requires_grad and torch.is_grad_enabled())  # the kernels have no backward: an adapter below trains
        k = kernels() if fits and x.device.type == "cpu" else None
        if k is not None:
            y = k.int8_mm(x2, self.qweight, self.scales) if self.method == "int8" else \
                k.int4_mm(x2, self.qweight, self.scales, self.offsets, self.group_size)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*shape[:-1], self.out_features)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), b)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{g}"


class QuantEmbedding(nn.Module):
    """A token embedding read from the int8 rows of the output layer it is tied to."""

    quantized = True

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = [head]  # a plain list: the weights are saved once, with the head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head[0]
        return F.embedding(ids, h.qweight).float() * F.embedding(ids, h.scales[:, None])


def quantize_model(model: nn.Module, method: str, group_size: int | None = None, *, empty: bool = False) -> nn.Module:
    """Replace every Linear layer of `model` (in place) by a QuantLinear; a token embedding tied to the
    output layer reads the quantized output matrix (int8, also under int4). `empty`: the structure only, for
    loading a quantized run's weights."""
    group_size = check(method, group_size)
    embeds = {id(m.weight): (name, m) for name, m in model.named_modules() if type(m) is nn.Embedding}
    swaps = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            tied = embeds.get(id(m.weight))
            kind, g = ("int8", None) if tied else (method, group_size)
            if kind == "int4" and m.in_features % g:
                kind, g = "int8", None  # a width the groups do not divide stays int8
            q = QuantLinear(m.in_features, m.out_features, kind, g, bias=m.bias is not None) if empty \
                else QuantLinear.from_linear(m, kind, g)
            swaps.append((name, q, tied))
    if not swaps:
        raise ConfigError(f"{type(model).__name__} has no Linear layer to quantize")
    for name, q, tied in swaps:
        _set(model, name, q)
        if tied:
            _set(model, tied[0], QuantEmbedding(q))
    return model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "quantized", False) for m in model.modules())
