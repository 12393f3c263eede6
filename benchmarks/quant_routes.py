"""Quantized Linear routes on this CPU: which way of running int8 / int4 weights beats fp32 at decode time?

The model is SmolLM2-135M (Llama: hidden 576, 9 / 3 heads of 64, MLP 1536, 30 layers, vocab 49152 with
the lm_head tied to the embedding). One decode step runs 30 x 7 projections and the lm_head once:

    q_proj / o_proj 576x576, k_proj / v_proj 192x576, gate / up 1536x576, down 576x1536, lm_head 49152x576

For every route below we hold a whole model's worth of weights (210 distinct layer weights + lm_head, the
real SmolLM2 weights when `--weights` points at an imported run, else N(0, 0.02)), so each call reads its
weight from memory as a real decode step does (the working set is far above the 16 MiB L3), and time one
decode step's projections at M=1 and M=8 rows, per projection kind (per-call time = group time / 30).
Routes are interleaved in a shuffled order every round and we report medians; each thread count runs in a
fresh subprocess (its own inductor cache, so compile times are cold).

Routes (fp32 activations in and out unless named):
  fp32               F.linear                                           (baseline)
  fp32_compiled      torch.compile(F.linear)                            (compile overhead baseline)
  bf16 / fp16        F.linear on bf16 / fp16 weights and activations
  fbgemm_fp16        quantized::linear_dynamic_fp16 (fp16 weights, fp32 math, FBGEMM AVX2)
  aten_int8          torch._weight_int8pack_mm (int8 per-channel weight-only)
  fbgemm_int8        quantized::linear_dynamic, per-channel int8 weights, dynamic per-tensor uint8
                     activations (reduce_range, as torch.ao.quantization.quantize_dynamic does on x86)
  onednn_int8 / qnnpack_int8   the same op with weights prepacked for the onednn / qnnpack engines
  aten_int4_g32/g64/g128       aten._weight_int4pack_mm_for_cpu (tinygemm layout, asymmetric, float zero)
                     g128 cannot split in=576, so `_g128` uses g64 for those layers (only down_proj is g128)
  aten_dyn4_g32      aten._dyn_quant_matmul_4bit (symmetric int4 g32, dynamic int8 activations)
  ao_int8wo, ao_int8dyn, ao_int4wo_g32   torchao Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                     PrototypeInt4WeightOnlyConfig (CPU tinygemm layout) -- eager and `_compiled`
  cpp_int8, cpp_int4_g32   not torch: a ~150-line AVX2 weight-only kernel in this file (CPP_SOURCE), built
                     with torch.utils.cpp_extension.load_inline, to see what a plain vectorised kernel gets

Then the whole model (skip with --no-model): held-out perplexity (windows of 1024 tokens over the last 16k
characters of the Shakespeare split) and greedy decoding speed (generate_ids, 64 new tokens, batch 1 and 8)
with the Linear layers swapped for the small modules defined here (MODEL_VARIANTS).
Caveat on quality: `genlab import smollm2` reads a Q4_1 GGUF, so the imported layer weights are already
int4 g32 with a min: re-quantizing them to int4 g32 is exact (only the lm_head, a finer tensor in that file,
loses), which flatters int4 g32; int4 g64 / g128 and int8 are real losses. `accuracy_random_weights` gives
the per-Linear errors on N(0, 0.02) weights as well.

    python benchmarks/quant_routes.py              # full run (~40 min on 2 busy cores)
    python benchmarks/quant_routes.py --quick      # smoke run
    python benchmarks/quant_routes.py --no-model   # per-Linear timings only

Caveat on speed: the CPU is shared with other work, so single timings are noisy (2-thread runs suffer most
when the other core is busy); routes are interleaved and medians reported, and the load average is recorded.
Writes benchmarks/results/quant_routes.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quant_routes.json"
DEFAULT_WEIGHTS = "/tmp/smolrun"

LAYERS, HIDDEN, INTER, KV, VOCAB = 30, 576, 1536, 192, 49152
SHAPES = {  # name -> (out, in), in the order a layer runs them
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER),
    "lm_head": (VOCAB, HIDDEN),
}
SLOW_STEP_S = 0.3  # a route whose decode step takes longer is timed in fewer rounds


# --- quantizers (shared with the modules)

def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~= q * s[:, None], q in [-127, 127] int8 (N, K), s fp32 (N,)."""
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s.float()


def int4_tinygemm(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise uint4 in the tinygemm convention (aten._weight_int4pack_mm_for_cpu, torchao).

    Returns q int32 (N, K) with values 0..15 and scales_and_zeros fp32 (K / group, N, 2) where [..., 0] is the
    scale and [..., 1] the zero: w[n, k] ~= (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n].
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale
    q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).reshape(n, k).to(torch.int32)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def int4_dequant(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    s, z = sz[..., 0].t(), sz[..., 1].t()  # (N, K / group)
    return ((q.reshape(n, k // group, group).float() - 8) * s[..., None] + z[..., None]).reshape(n, k)


def int4_group_for(k: int, group: int) -> int:
    """The group actually used: g128 cannot split in=576, so those layers fall back to g64."""
    return group if k % group == 0 else 64


def int4_symmetric(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4 for aten._dyn_quant_pack_4bit_weight: packed uint8 (N, K/2) holding q + 8
    with the even k in the low nibble, and scales fp32 (N, K / group); w ~= q * scale, q in [-8, 7]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(dim=-1) / 8).clamp(min=1e-12)
    u = (torch.clamp(torch.round(g / scale[..., None]), -8, 7).reshape(n, k) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), scale


def fbgemm_prepack_int8(w: torch.Tensor, engine: str = "x86"):
    q, s = int8_per_channel(w)
    qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = old


# --- a small AVX2 kernel (not in torch: load_inline)

# Weight-only GEMV/GEMM for few rows with fp32 activations, OpenMP over output channels (at::parallel_for,
# so torch.set_num_threads applies). int4: groups of 32 along K, 16 bytes a group (byte i = q[i] | q[16 + i]
# << 4), w = q * scale + min. int8: w = q * scale[n]. Built on first use (~30 s; needs g++ and ninja); the
# route is recorded as an error where that fails.
CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int4, groups of 32 along K: 16 bytes a group, byte i = q[k0 + i] | q[k0 + 16 + i] << 4; w = q * scale + min
template <int MB>
void int4_rows(const float* x, int64_t K, const uint8_t* qp, const float* sc, const float* mn,
               const float* xsum, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t G = K / 32;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    const uint8_t* qn = qp + n * (K / 2);
    const float* sn = sc + n * G;
    for (int64_t g = 0; g < G; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + g * 16));
      const __m128i lo = _mm_and_si128(b, mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      const __m256 s = _mm256_set1_ps(sn[g]);
      const float* xg = x + g * 32;
      for (int m = 0; m < MB; ++m) {
        const float* xm = xg + m * K;
        __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xm), w0);
        __m256 u = _mm256_mul_ps(_mm256_loadu_ps(xm + 8), w1);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), w2, t);
        u = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), w3, u);
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(t, u), s, acc[m]);
      }
    }
    const float* mnn = mn + n * G;
    for (int m = 0; m < MB; ++m) {
      float z = 0.f;
      for (int64_t g = 0; g < G; ++g) z += mnn[g] * xsum[m * G + g];
      y[m * ldy + n] = hsum(acc[m]) + z;
    }
  }
}

// int8 per output channel: w = q * scale[n]
template <int MB>
void int8_rows(const float* x, int64_t K, const int8_t* q, const float* sc, float* y, int64_t ldy,
               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    const int8_t* qn = q + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k));
      const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k + 16));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
      for (int m = 0; m < MB; ++m) {
        const float* xm = x + m * K + k;
        __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xm), w0);
        __m256 u = _mm256_mul_ps(_mm256_loadu_ps(xm + 8), w1);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), w2, t);
        u = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), w3, u);
        acc[m] = _mm256_add_ps(acc[m], _mm256_add_ps(t, u));
      }
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = hsum(acc[m]) * sc[n];
  }
}

template <typename F>
void by_blocks(int64_t M, F f) {  // rows in blocks of up to 8, each block a compile-time size
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: f(m0, std::integral_constant<int, 1>{}); break;
      case 2: f(m0, std::integral_constant<int, 2>{}); break;
      case 3: f(m0, std::integral_constant<int, 3>{}); break;
      case 4: f(m0, std::integral_constant<int, 4>{}); break;
      case 5: f(m0, std::integral_constant<int, 5>{}); break;
      case 6: f(m0, std::integral_constant<int, 6>{}); break;
      case 7: f(m0, std::integral_constant<int, 7>{}); break;
      default: f(m0, std::integral_constant<int, 8>{}); break;
    }
  }
}

}  // namespace

// x (M, K) fp32, packed (N, K/2) uint8, scales / mins (N, K/32) fp32 -> (M, N) fp32
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x: contiguous (M, K) float32");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0 && packed.size(1) == K / 2 && packed.scalar_type() == torch::kByte &&
              packed.is_contiguous(), "packed: (N, K/2) uint8");
  TORCH_CHECK(scales.sizes() == mins.sizes() && scales.size(0) == N && scales.size(1) == G &&
              scales.is_contiguous() && mins.is_contiguous(), "scales/mins: contiguous (N, K/32) float32");
  auto y = torch::empty({M, N}, x.options());
  auto xsum = x.view({M, G, 32}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>(); const uint8_t* qp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>(); const float* mp = mins.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    by_blocks(M, [&](int64_t m0, auto mb) {
      int4_rows<decltype(mb)::value>(xp + m0 * K, K, qp, sp, mp, xs + m0 * G, yp + m0 * N, N, n0, n1);
    });
  });
  return y;
}

// x (M, K) fp32, q (N, K) int8, scales (N,) fp32 -> (M, N) fp32
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x: contiguous (M, K) float32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % 32 == 0 && q.size(1) == K && q.scalar_type() == torch::kChar && q.is_contiguous(),
              "q: (N, K) int8");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    by_blocks(M, [&](int64_t m0, auto mb) {
      int8_rows<decltype(mb)::value>(xp + m0 * K, K, qp, sp, yp + m0 * N, N, n0, n1);
    });
  });
  return y;
}
"""
_CPP = None


def cpp_kernels():
    global _CPP
    if _CPP is None:
        from torch.utils.cpp_extension import load_inline
        _CPP = load_inline("genlab_quant_routes_kernels", cpp_sources=CPP_SOURCE,
                           functions=["int4_linear", "int8_linear"],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return _CPP


def pack_int4_cpp(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tinygemm quantization (same numbers) in the cpp kernel's layout: packed (N, K/2) uint8,
    per-32-block scales / mins (N, K/32) fp32 (a larger group repeats its scale over its 32-blocks)."""
    q, sz = int4_tinygemm(w, group)
    n, k = q.shape
    g = q.reshape(n, k // 32, 2, 16).to(torch.uint8)
    packed = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # (N, K / group)
    rep = group // 32
    return (packed, scale.repeat_interleave(rep, dim=1).contiguous(),
            (zero - 8 * scale).repeat_interleave(rep, dim=1).contiguous())


# --- the routes, as (prepare, call) pairs

def _flat(x):
    return x.reshape(-1, x.shape[-1])


class Route:
    """prepare(w fp32 (N, K)) -> handle; call(handle, x fp32 (M, K)) -> y fp32 (M, N)."""

    def __init__(self, name, prepare, call, *, compiled=False, note=""):
        self.name, self.prepare, self.call, self.compiled, self.note = name, prepare, call, compiled, note


def _compiled_linear():
    def linear(x, w):
        return F.linear(x, w)
    return torch.compile(linear, dynamic=False, fullgraph=True)


def _ao_weight(config):
    def prepare(w):
        from torchao.quantization import quantize_
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w.clone(), requires_grad=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(lin, config(w))
        return lin.weight  # a torchao tensor subclass (or the plain weight where the config skips the shape)
    return prepare


def build_routes(with_torchao: bool, with_compile: bool) -> list[Route]:
    def int4_prepare(group):
        def prepare(w):
            g = int4_group_for(w.shape[1], group)
            q, sz = int4_tinygemm(w, g)
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), g, sz
        return prepare

    def dyn4_prepare(w, group=32):
        packed, scale = int4_symmetric(w, group)
        n, k = w.shape
        return torch.ops.aten._dyn_quant_pack_4bit_weight(packed, scale, None, group, k, n), group, k, n

    routes = [
        Route("fp32", lambda w: w, lambda h, x: F.linear(x, h)),
        Route("bf16", lambda w: w.bfloat16(), lambda h, x: F.linear(x.bfloat16(), h).float()),
        Route("fp16", lambda w: w.half(), lambda h, x: F.linear(x.half(), h).float()),
        Route("fbgemm_fp16", lambda w: torch.ops.quantized.linear_prepack_fp16(w, None),
              lambda h, x: torch.ops.quantized.linear_dynamic_fp16(x, h)),
        Route("aten_int8", int8_per_channel, lambda h, x: torch._weight_int8pack_mm(x, h[0], h[1])),
        Route("fbgemm_int8", lambda w: fbgemm_prepack_int8(w, "x86"),
              lambda h, x: torch.ops.quantized.linear_dynamic(x, h, True)),
        Route("onednn_int8", lambda w: fbgemm_prepack_int8(w, "onednn"),
              lambda h, x: torch.ops.quantized.linear_dynamic(x, h, True)),
        Route("qnnpack_int8", lambda w: fbgemm_prepack_int8(w, "qnnpack"),
              lambda h, x: torch.ops.quantized.linear_dynamic(x, h, False)),
        Route("aten_int4_g32", int4_prepare(32),
              lambda h, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, h[0], h[1], h[2])),
        Route("aten_int4_g64", int4_prepare(64),
              lambda h, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, h[0], h[1], h[2])),
        Route("aten_int4_g128", int4_prepare(128),
              lambda h, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, h[0], h[1], h[2]),
              note="g64 where in=576 (576 is not a multiple of 128)"),
        Route("aten_dyn4_g32", dyn4_prepare, lambda h, x: torch.ops.aten._dyn_quant_matmul_4bit(x, *h)),
        Route("cpp_int8", lambda w: (cpp_kernels(), *int8_per_channel(w)),
              lambda h, x: h[0].int8_linear(x, h[1], h[2]),
              note="this file's AVX2 kernel (load_inline), int8 per-channel weight-only"),
        Route("cpp_int4_g32", lambda w: (cpp_kernels(), *pack_int4_cpp(w)),
              lambda h, x: h[0].int4_linear(x, *h[1:]),
              note="this file's AVX2 kernel (load_inline), tinygemm int4 g32 numerics"),
    ]
    if with_compile:
        routes.append(Route("fp32_compiled", lambda w: w, None, compiled=True))
    if with_torchao:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        ao = {
            "ao_int8wo": lambda w: Int8WeightOnlyConfig(),
            "ao_int8dyn": lambda w: Int8DynamicActivationInt8WeightConfig(),
            "ao_int4wo_g32": lambda w: PrototypeInt4WeightOnlyConfig(group_size=32),
        }
        for name, cfg in ao.items():
            routes.append(Route(name, _ao_weight(cfg), lambda h, x: F.linear(x, h)))
            if with_compile:
                routes.append(Route(name + "_compiled", _ao_weight(cfg), None, compiled=True))
    return routes


# --- helpers

def _nbytes(obj) -> int | None:
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) not in (torch.Tensor, nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(_nbytes(getattr(obj, n)) or 0 for n in names)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):  # ints and the kernel module in a handle take no weight memory
        parts = [_nbytes(o) for o in obj if isinstance(o, (torch.Tensor, tuple, list, torch.ScriptObject))]
        return None if any(p is None for p in parts) else sum(parts)
    return None  # a ScriptObject (FBGEMM / oneDNN / QNNPACK packed weights): measured by RSS instead


def _rss() -> int:
    """Resident bytes after handing freed heap memory back to the OS (so temporaries do not count)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_weights(path: str | None, seed: int = 0) -> tuple[dict[str, list[torch.Tensor]], str]:
    """name -> LAYERS weights (lm_head: one), real SmolLM2 weights if `path` holds the imported run."""
    if path and Path(path, "model.safetensors").is_file():
        import genlab
        model = genlab.load(path).model
        out = {n: [] for n in SHAPES}
        for block in model.model.layers:
            for n in SHAPES:
                if n != "lm_head":
                    part = block.self_attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
                    out[n].append(getattr(part, n).weight.detach().contiguous())
        out["lm_head"] = [model.lm_head.weight.detach().contiguous()]
        return out, f"SmolLM2-135M weights from {path}"
    g = torch.Generator().manual_seed(seed)
    out = {n: [torch.randn(*s, generator=g) * 0.02 for _ in range(1 if n == "lm_head" else LAYERS)]
           for n, s in SHAPES.items()}
    return out, "random N(0, 0.02) weights (no imported SmolLM2 run found)"


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# --- the layouts: each kernel vs its own dequant

def check_layouts(weights) -> dict:
    """Each quantized kernel against x @ dequant(W).T on the same quantized weights: proves the layouts."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in ("q_proj", "k_proj", "down_proj"):
        w = weights[name][len(weights[name]) // 2]
        x = torch.randn(8, w.shape[1], generator=g)
        q, s = int8_per_channel(w)
        ref = x @ (q.float() * s[:, None]).t()
        y = torch._weight_int8pack_mm(x, q, s)
        out[f"aten_int8/{name}"] = float((y - ref).abs().max() / ref.abs().max())
        for group in (32, 64, 128):
            gr = int4_group_for(w.shape[1], group)
            qi, sz = int4_tinygemm(w, gr)
            ref = x @ int4_dequant(qi, sz, gr).t()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gr, sz)
            out[f"aten_int4_g{gr}/{name}"] = float((y - ref).abs().max() / ref.abs().max())
    return out


# --- the timing worker (one thread count)

def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    inductor_config.cpp.threads = args.threads  # inductor bakes the OpenMP thread count into its kernels
    torch._dynamo.config.recompile_limit = 1000
    torch._dynamo.config.accumulated_recompile_limit = 100000
    torch.manual_seed(0)
    weights, source = load_weights(args.weights)
    names = list(SHAPES)
    if args.quick:
        weights = {n: ws[:4] for n, ws in weights.items()}
    layers = len(weights["q_proj"])
    routes = build_routes(not args.no_torchao, not args.no_compile)
    if args.routes:
        keep = set(args.routes.split(","))
        routes = [r for r in routes if r.name in keep or r.name == "fp32"]

    handles, memory, errors, prep_s = {}, {}, {}, {}
    for r in routes:
        t0, rss0 = time.perf_counter(), _rss()
        try:
            handles[r.name] = {n: [r.prepare(w) for w in ws] for n, ws in weights.items()}
        except Exception as e:  # noqa: BLE001 -- a route this build cannot run is recorded, not fatal
            errors[r.name] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        prep_s[r.name] = round(time.perf_counter() - t0, 2)
        sizes = [_nbytes(h) for hs in handles[r.name].values() for h in hs]
        if r.name == "fp32":
            sizes = [w.untyped_storage().nbytes() for ws in weights.values() for w in ws]
        memory[r.name] = ({"bytes": sum(sizes), "how": "tensor sizes"} if all(s is not None for s in sizes)
                          else {"bytes": _rss() - rss0, "how": "RSS growth, heap trimmed (approx.)"})
        if r.compiled:
            fn = _compiled_linear()
            r.call = lambda h, x, fn=fn: fn(x, h)
    routes = [r for r in routes if r.name in handles]

    timings, compile_s, load = {}, {}, {"start": loadavg()}
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (HIDDEN, INTER)}

        def step(r, xs=xs, m=m, first=False):
            per = {}
            for n in names:
                hs, x = handles[r.name][n], xs[SHAPES[n][1]]
                if first and r.compiled:  # the first call of a shape compiles it: time that alone
                    t0 = time.perf_counter()
                    r.call(hs[0], x)
                    spent = round(time.perf_counter() - t0, 2)
                    compile_s.setdefault(r.name, {}).setdefault(f"M{m}", {})[n] = spent
                t0 = time.perf_counter()
                for h in hs:
                    r.call(h, x)
                per[n] = time.perf_counter() - t0
            return per

        samples = {r.name: [] for r in routes}
        slow = set()
        for r in list(routes):  # warm-up (and compile) round, untimed
            t0 = time.perf_counter()
            try:
                step(r, first=True)
            except Exception as e:  # noqa: BLE001 -- recorded as the route's error
                errors[r.name] = f"M={m}: {type(e).__name__}: {str(e)[:300]}"
                routes.remove(r)
                continue
            if time.perf_counter() - t0 > SLOW_STEP_S:
                slow.add(r.name)
        rounds = 2 if args.quick else args.rounds
        for i in range(rounds):
            order = routes[:]
            random.Random(i + 100 * m).shuffle(order)
            for r in order:
                if r.name in slow and i >= args.slow_rounds:
                    continue
                samples[r.name].append(step(r))
        res = {}
        for r in routes:
            s = samples[r.name]
            res[r.name] = {
                "us_per_call": {n: round(statistics.median(p[n] for p in s) / len(weights[n]) * 1e6, 1)
                                for n in names},
                "step_ms": round(statistics.median(sum(p.values()) for p in s) * 1e3, 2),
                "us_per_call_min": {n: round(min(p[n] for p in s) / len(weights[n]) * 1e6, 1) for n in names},
                "step_ms_min": round(min(sum(p.values()) for p in s) * 1e3, 2),
                "rounds": len(s),
            }
        base = res["fp32"]["step_ms"]
        for r in routes:
            res[r.name]["speedup_vs_fp32"] = round(base / res[r.name]["step_ms"], 3)
        timings[f"M{m}"] = res
        load[f"M{m}"] = loadavg()
        print(f"[threads={args.threads}] M={m} done, load {load[f'M{m}']}", file=sys.stderr, flush=True)

    # correctness against fp32 on the middle layer's weights (lm_head: its only copy); after the timings so
    # that the compiled routes' first calls above are the ones that compile
    g = torch.Generator().manual_seed(2)
    xs_check = {k: torch.randn(8, k, generator=g) for k in (HIDDEN, INTER)}
    accuracy = {}
    for r in routes:
        acc = {}
        for n in names:
            i = min(layers // 2, len(weights[n]) - 1)
            x = xs_check[SHAPES[n][1]]
            ref = F.linear(x, weights[n][i])
            try:
                y = r.call(handles[r.name][n][i], x)
                acc[n] = {"max_abs_rel": float((y - ref).abs().max() / ref.abs().max()),
                          "rms_rel": float((y - ref).norm() / ref.norm())}
            except Exception as e:  # noqa: BLE001 -- recorded as the route's error
                errors[r.name] = f"{n}: {type(e).__name__}: {str(e)[:300]}"
                break
        accuracy[r.name] = acc
    # the same on N(0, 0.02) weights: the imported SmolLM2 comes from a Q4_1 GGUF (int4 g32 with a min), so
    # its layer weights are exactly representable by int4 g32 and flatter every int4 g32 route
    accuracy_random = {}
    if not source.startswith("random"):
        for r in routes:
            acc = {}
            for n in names:
                w = torch.randn(*SHAPES[n], generator=g) * 0.02
                x = xs_check[SHAPES[n][1]]
                ref = F.linear(x, w)
                y = r.call(r.prepare(w), x)
                acc[n] = {"max_abs_rel": float((y - ref).abs().max() / ref.abs().max()),
                          "rms_rel": float((y - ref).norm() / ref.norm())}
            accuracy_random[r.name] = acc

    return {"threads": args.threads, "weights": source, "layers_timed": layers, "loadavg": load,
            "timings": timings,
            "accuracy": accuracy, "accuracy_random_weights": accuracy_random, "memory": memory,
            "compile_s": compile_s, "prepare_s": prep_s, "errors": errors,
            "layout_check": check_layouts(weights), "notes": {r.name: r.note for r in routes if r.note}}


# --- whole-model modules (sketches for adapt/quantize.py)

class _QLinear(nn.Module):
    decode_ready = True  # llama's one-token decode path may call forward directly on (B, C)

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = self.mm(_flat(x).contiguous()).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class FbgemmInt8Linear(_QLinear):
    """int8 per-channel weights, dynamic uint8 activations (per tensor, 7-bit), FBGEMM. `per_row` quantizes
    each row on its own (what a batch-1 decode sees) at the price of one call per row."""

    def __init__(self, lin, per_row=False):
        super().__init__(lin)
        self.packed, self.per_row = fbgemm_prepack_int8(lin.weight.detach().float()), per_row

    def mm(self, x):
        if self.per_row and x.shape[0] > 1:
            return torch.cat([torch.ops.quantized.linear_dynamic(r, self.packed, True) for r in x.split(1)])
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class FbgemmFp16Linear(_QLinear):
    def __init__(self, lin):
        super().__init__(lin)
        self.packed = torch.ops.quantized.linear_prepack_fp16(lin.weight.detach().float(), None)

    def mm(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class AtenInt8Linear(_QLinear):
    def __init__(self, lin):
        super().__init__(lin)
        q, s = int8_per_channel(lin.weight.detach().float())
        self.register_buffer("q", q)
        self.register_buffer("s", s)

    def mm(self, x):
        return torch._weight_int8pack_mm(x, self.q, self.s)


class AtenInt4Linear(_QLinear):
    def __init__(self, lin, group):
        super().__init__(lin)
        self.group = int4_group_for(lin.in_features, group)
        q, sz = int4_tinygemm(lin.weight.detach().float(), self.group)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("sz", sz)

    def mm(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.sz)


class DequantLinear(_QLinear):
    """fp32 math on dequantized weights: a weight-only kernel's numbers (to ~1e-6), fast for prefill."""

    def __init__(self, lin, kind):
        super().__init__(lin)
        w = lin.weight.detach().float()
        if kind == "int8":
            q, s = int8_per_channel(w)
            w = q.float() * s[:, None]
        else:
            group = int4_group_for(lin.in_features, int(kind.split("g")[1]))
            q, sz = int4_tinygemm(w, group)
            w = int4_dequant(q, sz, group)
        self.register_buffer("w", w)

    def mm(self, x):
        return F.linear(x, self.w)


class CppInt8Linear(_QLinear):
    """int8 per-channel weight-only with this file's AVX2 kernel for up to `max_rows` rows; more rows
    (prefill) multiply by the dequantized weight with MKL (same numbers)."""

    max_rows = 32

    def __init__(self, lin):
        super().__init__(lin)
        self.kernels = cpp_kernels()
        q, s = int8_per_channel(lin.weight.detach().float())
        self.register_buffer("q", q)
        self.register_buffer("s", s)

    def mm(self, x):
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.q.float() * self.s[:, None])
        return self.kernels.int8_linear(x, self.q, self.s)


class CppInt4Linear(_QLinear):
    max_rows = 32

    def __init__(self, lin, group=32):
        super().__init__(lin)
        self.kernels = cpp_kernels()
        self.group = int4_group_for(lin.in_features, group)
        packed, scales, mins = pack_int4_cpp(lin.weight.detach().float(), self.group)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    def mm(self, x):
        if x.shape[0] > self.max_rows:
            n, k = self.packed.shape[0], self.packed.shape[1] * 2
            lo, hi = self.packed & 15, self.packed >> 4
            q = torch.stack([lo.view(n, k // 32, 16), hi.view(n, k // 32, 16)], dim=2)
            q = q.reshape(n, k // 32, 32).float()
            w = (q * self.scales[..., None] + self.mins[..., None]).reshape(n, k)
            return F.linear(x, w)
        return self.kernels.int4_linear(x, self.packed, self.scales, self.mins)


class CastLinear(_QLinear):
    def __init__(self, lin, dtype):
        super().__init__(lin)
        self.register_buffer("w", lin.weight.detach().to(dtype))

    def mm(self, x):
        return F.linear(x.to(self.w.dtype), self.w).float()


def swap_linears(model, make, head=None):
    for block in model.model.layers:
        for part, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                            (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(part, n, make(getattr(part, n)))
    model.lm_head = (head or make)(model.lm_head)  # the embedding keeps its own fp32 table
    return model


def _variant(make, what, ppl=True, gen=True, head=None):
    return {"make": make, "head": head, "what": what, "ppl": ppl, "gen": gen}


def _deq(kind):
    return lambda lin: DequantLinear(lin, kind)


# The aten int8 / int4 kernels take minutes for a 1024-token window on AVX2, so their perplexity is measured
# on the dequantized weights (int8_weight_only, int4_g*): the kernels match those to ~1e-6 (layout_check).
# `_head8`: layers in int4, lm_head in int8 (the imported lm_head is not a Q4_1 tensor and suffers most).
MODEL_VARIANTS = {
    "fp32": _variant(None, "nn.Linear"),
    "bf16": _variant(lambda lin: CastLinear(lin, torch.bfloat16), "F.linear on bf16"),
    "fbgemm_fp16": _variant(FbgemmFp16Linear, "quantized::linear_dynamic_fp16"),
    "fbgemm_int8": _variant(FbgemmInt8Linear, "quantized::linear_dynamic (one activation scale per call)"),
    "fbgemm_int8_per_row": _variant(lambda lin: FbgemmInt8Linear(lin, per_row=True),
                                    "quantized::linear_dynamic, one activation scale per token (decode)",
                                    gen=False),
    "int8_weight_only": _variant(_deq("int8"), "int8 per-channel weights, exact activations "
                                 "(= aten_int8 / ao_int8wo / cpp_int8 numerics)", gen=False),
    "aten_int8": _variant(AtenInt8Linear, "torch._weight_int8pack_mm", ppl=False),
    "cpp_int8": _variant(CppInt8Linear, "this file's AVX2 int8 weight-only kernel (prefill: dequantized)"),
    "int4_g32": _variant(_deq("int4_g32"), "tinygemm int4 g32 numerics, lm_head too", gen=False),
    "int4_g64": _variant(_deq("int4_g64"), "tinygemm int4 g64 numerics, lm_head too", gen=False),
    "int4_g128": _variant(_deq("int4_g128"), "tinygemm int4 g128 numerics (g64 where in=576), lm_head too",
                          gen=False),
    "int4_g32_head8": _variant(_deq("int4_g32"), "int4 g32 layers, int8 lm_head", gen=False,
                               head=_deq("int8")),
    "int4_g64_head8": _variant(_deq("int4_g64"), "int4 g64 layers, int8 lm_head", gen=False,
                               head=_deq("int8")),
    "int4_g128_head8": _variant(_deq("int4_g128"), "int4 g128 layers (g64 where in=576), int8 lm_head",
                                gen=False, head=_deq("int8")),
    "aten_int4_g32": _variant(lambda lin: AtenInt4Linear(lin, 32), "aten._weight_int4pack_mm_for_cpu g32",
                              ppl=False),
    "cpp_int4_g32": _variant(lambda lin: CppInt4Linear(lin, 32),
                             "this file's AVX2 int4 g32 kernel, lm_head too (prefill: dequantized weight)"),
    "cpp_int4_g32_head8": _variant(lambda lin: CppInt4Linear(lin, 32),
                                   "the AVX2 int4 g32 kernel, int8 lm_head with the AVX2 int8 kernel",
                                   head=CppInt8Linear),
}


def model_worker(args) -> dict:
    import genlab
    from genlab.sampling.text import generate_ids

    torch.set_num_threads(args.threads[0])  # perplexity; generation runs at every count in args.threads
    run = genlab.load(args.weights)
    tok = run.tokenizer
    text = genlab.load_dataset("shakespeare").val[-16000:]
    ids = tok.encode(text)
    win = 1024
    n_win = 1 if args.quick else min(4, (len(ids) - 1) // win)
    prompt = ids[:32]
    batch_prompts = [ids[i * 200: i * 200 + 32] for i in range(8)]
    new = 8 if args.quick else 64
    out, load0 = {}, loadavg()
    with torch.inference_mode():  # fp32 greedy tokens, what every variant's generation is compared with
        ref_tokens = generate_ids(run.model, [prompt], max_new_tokens=new, temperature=0)[0]
    variants = [v for v in MODEL_VARIANTS if not args.model_variants or v in args.model_variants.split(",")]
    for name in variants:
        v = MODEL_VARIANTS[name]
        model = genlab.load(args.weights).model if name != "fp32" else run.model
        t0 = time.perf_counter()
        if v["make"] is not None:
            swap_linears(model, v["make"], v["head"])
        res = {"what": v["what"], "swap_s": round(time.perf_counter() - t0, 2)}
        if v["ppl"]:
            nll, count = 0.0, 0
            t0 = time.perf_counter()
            with torch.inference_mode():
                for w in range(n_win):
                    chunk = torch.tensor(ids[w * win: (w + 1) * win + 1])
                    logits = model(chunk[None, :-1])[0].float()
                    nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
                    count += win
            res["ppl"] = round(math.exp(nll / count), 4)
            res["ppl_tokens"] = count
            res["ppl_s"] = round(time.perf_counter() - t0, 1)
        for threads in args.threads if v["gen"] else ():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                generate_ids(model, [prompt], max_new_tokens=4, temperature=0)  # warm-up
                for b, prompts in ((1, [prompt]), (8, batch_prompts)):
                    if b == 8 and name.startswith("aten_int4"):
                        continue  # minutes per run; the per-Linear table already says it
                    times = []
                    for _ in range(1 if name.startswith("aten_") or args.quick else 3):
                        t0 = time.perf_counter()
                        toks = generate_ids(model, prompts, max_new_tokens=new, temperature=0)
                        times.append(time.perf_counter() - t0)
                    res[f"tok_s_B{b}_threads{threads}"] = round(b * new / statistics.median(times), 2)
                    if b == 1 and name != "fp32":
                        same = sum(a == c for a, c in zip(toks[0], ref_tokens, strict=False))
                        res["greedy_match_fp32"] = f"{same}/{new}"
        torch.set_num_threads(args.threads[0])
        res["loadavg"] = loadavg()
        out[name] = res
        print(f"[model] {name}: {res}", file=sys.stderr, flush=True)
        del model
    return {"threads": args.threads, "windows": n_win, "window": win, "loadavg_start": load0,
            "text": "last 16k characters of genlab.load_dataset('shakespeare').val", "new_tokens": new,
            "variants": out}


# --- driver

def _subprocess(extra: list[str], args) -> dict:
    with tempfile.TemporaryDirectory(prefix="quant_routes_") as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"), PYTHONWARNINGS="ignore")
        cmd = [sys.executable, __file__, *extra, "--_out", str(out), "--weights", args.weights or ""]
        if args.quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        sys.stderr.write("".join(l + "\n" for l in proc.stderr.splitlines()
                                 if l.startswith("[") and ("done" in l or "[model]" in l)))
        if proc.returncode != 0:
            raise SystemExit(f"worker {extra} failed:\n{proc.stderr[-4000:]}")
        res = json.loads(out.read_text())
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, nargs="*", default=[2, 1])
    p.add_argument("--rows", type=int, nargs="*", default=[1, 8])
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per route (fast routes)")
    p.add_argument("--slow-rounds", type=int, default=3, help="timed rounds, routes slower than 0.3 s a step")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="an imported SmolLM2 run (else random weights)")
    p.add_argument("--routes", default="", help="comma-separated subset (fp32 always runs)")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--model-only", action="store_true")
    p.add_argument("--model-variants", default="")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--update", action="store_true", help="keep the other parts of an existing --out file")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_model", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker or args._model:
        args.threads = args.threads[0] if args._worker else args.threads
        res = model_worker(args) if args._model else worker(args)
        Path(args._out).write_text(json.dumps(res))
        return

    from genlab.core.checkpoint import atomic_write_json

    try:
        import torchao
        ao_version = torchao.__version__
    except Exception:  # noqa: BLE001 -- torchao missing or broken: its routes are skipped
        ao_version, args.no_torchao = None, True
    flags = Path("/proc/cpuinfo").read_text()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    flags = sorted(f for f in wanted if f" {f}" in flags)
    result = {
        "benchmark": "quant_routes",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "flags": flags,
                    "torch": torch.__version__, "torchao": ao_version,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "quantized_engines": torch.backends.quantized.supported_engines},
        "method": ("per route, a whole model's weights (30 x 7 projections + lm_head); each round times one "
                   "decode step's projections per kind, routes in shuffled order; medians over rounds; "
                   "us_per_call = group time / 30; the CPU is shared, so numbers are noisy (see loadavg)"),
        "loadavg_start": loadavg(),
        "runs": {},
    }
    if args.update and Path(args.out).is_file():  # a partial rerun replaces only what it measures
        old = json.loads(Path(args.out).read_text())
        result = {**old, **{k: v for k, v in result.items() if k != "runs"}, "runs": old.get("runs", {})}
    if not args.model_only:
        for t in args.threads:
            extra = ["--_worker", "--threads", str(t), "--rows", *map(str, args.rows),
                     "--rounds", str(args.rounds), "--slow-rounds", str(args.slow_rounds)]
            extra += ["--no-torchao"] * args.no_torchao + ["--no-compile"] * args.no_compile
            extra += ["--routes", args.routes] if args.routes else []
            result["runs"][f"threads{t}"] = _subprocess(extra, args)
            atomic_write_json(args.out, result)
    if not args.no_model and args.weights and Path(args.weights, "model.safetensors").is_file():
        extra = ["--_model", "--threads", *map(str, args.threads)]
        extra += ["--model-variants", args.model_variants] if args.model_variants else []
        model = _subprocess(extra, args)
        if args.update and "model" in result:  # variants measured before and not now are kept
            model["variants"] = {**result["model"]["variants"], **model["variants"]}
        base = model["variants"].get("fp32", {}).get("ppl")
        for r in model["variants"].values():
            if base and "ppl" in r:
                r["ppl_vs_fp32_pct"] = round((r["ppl"] / base - 1) * 100, 3)
        result["model"] = model
    result["loadavg_end"] = loadavg()
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
