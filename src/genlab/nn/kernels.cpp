// CPU kernels for decoding one token per sequence: matrix products that read fp32, int8 or int4 weights, and a
// whole Llama layer in one call. And one for training: LoRA's dropout, its mask a hash (at the end).
//
// At M = 1..16 rows of x, y (M, N) = x (M, K) . W (N, K)^T reads the whole weight for a few rows: the time is the
// bytes read, so int8 (1 byte per weight) and int4 (~0.6) beat fp32 (4) by what they save, if the loop keeps up
// with memory. Each 8-wide block of a weight row is loaded once, widened to floats and used for every row of x;
// the rows 4 ahead are prefetched (without it the loop waited on memory at half the bandwidth). Rows of W are
// shared out between threads with at::parallel_for (built with -fopenmp). AVX2 + FMA. From 5 rows of x a layer's
// fp32 weight goes to BLAS instead (lin_apply): its packed GEMM is ~1.7x these tiles at 16 rows; the tiles keep the
// vocabulary head (N ~ 50k), where they are faster.
//
// llama_layer does a decoder layer's step, x += attn(norm(x)); x += mlp(norm(x)), in one call, so the ~30 small
// tensor ops per layer of the Python step (each a dispatch of several microseconds) cost nothing. Each row has its
// own position (continuous batching: sequences that joined at different times share the step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

static inline void prefetch_rows(const void* row, int64_t row_bytes, int64_t at) {
  for (int r = 0; r < 4; ++r) _mm_prefetch(static_cast<const char*>(row) + r * row_bytes + at, _MM_HINT_T0);
}

// ---- fp32 and int8 weights: 8 weights widened to floats, FMA into each row of x ----
// Tiles of R = 4 weight rows and MB (1 or 2) rows of x: 4-8 independent accumulators keep the FMA units busy,
// and the weights, loaded once per 8 columns, serve both rows of x. The one-row tile is written out: the generic
// form kept its accumulators on the stack, which halved the speed of the most common case, one token.
struct F32 {
  static constexpr int64_t width = 4, step = 16;  // bytes per weight, weights per 64-byte line
  const float* w; int64_t K;
  const void* row(int64_t n) const { return w + n * K; }
  int64_t row_bytes() const { return K * 4; }
  __m256 operator()(int64_t n, int64_t k) const { return _mm256_loadu_ps(w + n * K + k); }
};
struct I8 {
  static constexpr int64_t width = 1, step = 64;
  const int8_t* q; int64_t K;
  const void* row(int64_t n) const { return q + n * K; }
  int64_t row_bytes() const { return K; }
  __m256 operator()(int64_t n, int64_t k) const {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * K + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
};

template <typename Widen>
static inline void tile_4x1(const float* x, float* y, int64_t n0, int64_t K, const Widen& widen,
                            const float* row_scale) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  const void* ahead = widen.row(n0 + 4);
  const int64_t rb = widen.row_bytes();
  for (int64_t k = 0; k < K; k += 8) {
    if (k % Widen::step == 0) prefetch_rows(ahead, rb, k * Widen::width);
    const __m256 a = _mm256_loadu_ps(x + k);
    c0 = _mm256_fmadd_ps(a, widen(n0, k), c0);
    c1 = _mm256_fmadd_ps(a, widen(n0 + 1, k), c1);
    c2 = _mm256_fmadd_ps(a, widen(n0 + 2, k), c2);
    c3 = _mm256_fmadd_ps(a, widen(n0 + 3, k), c3);
  }
  const float one[4] = {1, 1, 1, 1};
  const float* s = row_scale ? row_scale + n0 : one;
  y[n0] = hsum(c0) * s[0];
  y[n0 + 1] = hsum(c1) * s[1];
  y[n0 + 2] = hsum(c2) * s[2];
  y[n0 + 3] = hsum(c3) * s[3];
}

template <int R, int MB, typename Widen>
static inline void tile(const float* x, float* y, int64_t n0, int64_t K, int64_t N, const Widen& widen,
                        const float* row_scale) {
  __m256 acc[MB][R];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  const void* ahead = widen.row(n0 + R);
  const int64_t rb = widen.row_bytes();
  for (int64_t k = 0; k < K; k += 8) {
    if (R == 4 && k % Widen::step == 0) prefetch_rows(ahead, rb, k * Widen::width);
    __m256 a[MB];
    for (int i = 0; i < MB; ++i) a[i] = _mm256_loadu_ps(x + i * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 w = widen(n0 + r, k);
      for (int i = 0; i < MB; ++i) acc[i][r] = _mm256_fmadd_ps(a[i], w, acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) y[i * N + n0 + r] = hsum(acc[i][r]) * (row_scale ? row_scale[n0 + r] : 1.0f);
}

template <typename Widen>
static void blocked_mm(const float* x, float* y, int64_t M, int64_t K, int64_t N, const Widen& widen,
                       const float* row_scale) {
  const int64_t full = N / 4;
  at::parallel_for(0, full + (N % 4 ? 1 : 0), 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      for (int64_t m = 0; m < M; m += 2) {
        const bool two = m + 1 < M;
        const float* xm = x + m * K;
        float* ym = y + m * N;
        if (b < full) {
          if (two) tile<4, 2>(xm, ym, n0, K, N, widen, row_scale);
          else tile_4x1(xm, ym, n0, K, widen, row_scale);
        } else {
          for (int64_t n = n0; n < N; ++n) {
            if (two) tile<1, 2>(xm, ym, n, K, N, widen, row_scale);
            else tile<1, 1>(xm, ym, n, K, N, widen, row_scale);
          }
        }
      }
    }
  });
}

// ---- int4 weights: (N, K / 2) bytes, the even column in the low nibble, w = (q - 8) s + z per group of G ----
// Per group, sum_k x_k w_k = s sum_k x_k q_k + (z - 8 s) sum_k x_k: the second sum is the same for every weight
// row, so it is computed once per row of x, and the inner loop only widens nibbles and multiplies. 16 bytes hold
// 32 columns, the low nibbles the even ones and the high nibbles the odd ones: x is reordered the same way once
// (x_perm), so the nibbles need no interleaving.
// R weight rows against MB rows of x at a time: each 16-byte block of a row is widened once for all MB rows of
// x, and the R x MB independent accumulator chains hide the FMA latency (one row alone waited on its own sums).
template <int R, int MB>
static inline void int4_tile(const float* x, const float* xs, float* y, int64_t n0, int64_t K, int64_t N,
                             int64_t G, const uint8_t* p, const float* s, const float* z, bool fetch) {
  const int64_t ng = K / G, rb = K / 2;
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc[MB][R];
  float offs[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps(), offs[m][r] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    __m256 d[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) d[m][r] = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if (fetch && k % 128 == 0) prefetch_rows(p + (n0 + R) * rb, rb, k / 2);
      for (int r = 0; r < R; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (n0 + r) * rb + k / 2));
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                     w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                     w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                     w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int m = 0; m < MB; ++m) {
          const float* xk = x + m * K + k;
          d[m][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), d[m][r]);
          d[m][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), d[m][r]);
          d[m][r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xk + 16), d[m][r]);
          d[m][r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xk + 24), d[m][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float sg = s[(n0 + r) * ng + g], cg = z[(n0 + r) * ng + g] - 8.f * sg;
      for (int m = 0; m < MB; ++m) {
        acc[m][r] = _mm256_fmadd_ps(d[m][r], _mm256_set1_ps(sg), acc[m][r]);
        offs[m][r] += cg * xs[m * ng + g];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = hsum(acc[m][r]) + offs[m][r];
}

static void int4_rows(const float* xperm, const float* xsum, float* y, int64_t M, int64_t K, int64_t N,
                      const uint8_t* p, const float* s, const float* z, int64_t G) {
  const int64_t ng = K / G, full = N / 4;
  at::parallel_for(0, full + (N % 4 ? 1 : 0), 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m = 0; m < M; m += 2) {
        const bool two = m + 1 < M;
        const float *xm = xperm + m * K, *xs = xsum + m * ng;
        float* ym = y + m * N;
        if (b < full) {
          if (two) int4_tile<4, 2>(xm, xs, ym, b * 4, K, N, G, p, s, z, m == 0);
          else int4_tile<4, 1>(xm, xs, ym, b * 4, K, N, G, p, s, z, m == 0);
        } else {
          for (int64_t n = b * 4; n < N; ++n) {
            if (two) int4_tile<1, 2>(xm, xs, ym, n, K, N, G, p, s, z, false);
            else int4_tile<1, 1>(xm, xs, ym, n, K, N, G, p, s, z, false);
          }
        }
      }
  });
}

static void int4_mm_raw(const float* x, float* y, int64_t M, int64_t K, int64_t N, const uint8_t* p,
                        const float* s, const float* z, int64_t G) {
  const int64_t ng = K / G;
  std::vector<float> xperm(M * K), xsum(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32)
      for (int i = 0; i < 16; ++i) {
        xperm[m * K + k + i] = x[m * K + k + 2 * i];
        xperm[m * K + k + 16 + i] = x[m * K + k + 2 * i + 1];
      }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * ng + k / G] += x[m * K + k];
  int4_rows(xperm.data(), xsum.data(), y, M, K, N, p, s, z, G);
}

// ---- one Linear layer of any of the three kinds, as the layer step sees it ----
struct Lin {
  int64_t kind = 0, G = 0, N = 0, K = 0;  // kind 0: fp32 W (N, K); 1: int8 q (N, K) and row scales; 2: int4
  const float* w = nullptr;
  const int8_t* q8 = nullptr;
  const uint8_t* q4 = nullptr;
  const float* s = nullptr;
  const float* z = nullptr;
};

static Lin make_lin(int64_t kind, const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c,
                    int64_t G) {
  TORCH_CHECK(a.is_contiguous() && a.dim() == 2, "weights must be contiguous matrices");
  Lin L;
  L.kind = kind;
  L.G = G;
  L.N = a.size(0);
  if (kind == 0) {
    TORCH_CHECK(a.dtype() == torch::kFloat);
    L.K = a.size(1);
    L.w = a.data_ptr<float>();
  } else if (kind == 1) {
    TORCH_CHECK(a.dtype() == torch::kInt8 && b.dtype() == torch::kFloat && b.numel() == L.N);
    L.K = a.size(1);
    L.q8 = a.data_ptr<int8_t>();
    L.s = b.data_ptr<float>();
  } else {
    TORCH_CHECK(kind == 2 && a.dtype() == torch::kUInt8 && G % 32 == 0);
    L.K = a.size(1) * 2;
    TORCH_CHECK(L.K % G == 0 && b.is_contiguous() && c.is_contiguous() && b.numel() == L.N * (L.K / G) &&
                c.numel() == b.numel());
    L.q4 = a.data_ptr<uint8_t>();
    L.s = b.data_ptr<float>();
    L.z = c.data_ptr<float>();
  }
  TORCH_CHECK(L.K % 8 == 0, "the kernels need inputs in multiples of 8");
  return L;
}

static void lin_apply(const Lin& L, const float* x, float* y, int64_t M) {
  if (L.kind == 0 && M > 4 && L.N <= 8192) {  // many rows of x, a layer's weight: BLAS's packed GEMM is faster
    const auto f = torch::TensorOptions().dtype(torch::kFloat);
    auto out = torch::from_blob(y, {M, L.N}, f);
    at::mm_out(out, torch::from_blob(const_cast<float*>(x), {M, L.K}, f),
               torch::from_blob(const_cast<float*>(L.w), {L.N, L.K}, f).t());
  } else if (L.kind == 0) blocked_mm(x, y, M, L.K, L.N, F32{L.w, L.K}, nullptr);
  else if (L.kind == 1) blocked_mm(x, y, M, L.K, L.N, I8{L.q8, L.K}, L.s);
  else int4_mm_raw(x, y, M, L.K, L.N, L.q4, L.s, L.z, L.G);
}

torch::Tensor linear(torch::Tensor x, int64_t kind, torch::Tensor a, torch::Tensor b, torch::Tensor c, int64_t G) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2, "x must be a float (M, K) matrix");
  x = x.contiguous();
  const Lin L = make_lin(kind, a, b, c, G);
  TORCH_CHECK(x.size(1) == L.K, "x has ", x.size(1), " columns, the weight ", L.K);
  auto y = torch::empty({x.size(0), L.N}, x.options());
  lin_apply(L, x.data_ptr<float>(), y.data_ptr<float>(), x.size(0));
  return y;
}

// ---- a Llama decoder layer, one new token per row ----
// RMSNorm (Zhang & Sennrich 2019, eq. 4), rotary embeddings in the rotate-half layout (Su et al. 2021, eq. 34),
// grouped-query attention over the cache (Ainslie et al. 2023), SwiGLU (Shazeer 2020, eq. 6): llama.py's math.
static void rmsnorm(const float* x, const float* w, float* out, int64_t M, int64_t C, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += xm[c] * xm[c];
    const float r = 1.f / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) out[m * C + c] = xm[c] * r * w[c];
  }
}

static inline void rope(float* t, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = t[i], b = t[i + half];
    t[i] = a * cos[i] - b * sin[i];
    t[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Row m of x is the token at position pos[m] of cache row m (rows at their own positions: continuous batching;
// the generate loop passes the same position for every row); cos and sin are the whole (T_max, D) tables.
void llama_layer(torch::Tensor x, torch::Tensor w_in, torch::Tensor w_post, std::vector<torch::Tensor> w,
                 std::vector<int64_t> kinds, std::vector<int64_t> groups, torch::Tensor kv, torch::Tensor pos,
                 torch::Tensor cos, torch::Tensor sin, double eps, int64_t H, int64_t Hkv) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && kv.dtype() == torch::kFloat && kv.is_contiguous());
  TORCH_CHECK(w.size() == 21 && kinds.size() == 7 && groups.size() == 7, "7 projections, 3 tensors each");
  std::vector<Lin> L;
  for (int i = 0; i < 7; ++i) L.push_back(make_lin(kinds[i], w[3 * i], w[3 * i + 1], w[3 * i + 2], groups[i]));
  const int64_t M = x.size(0), C = x.size(1), B = kv.size(1), T = kv.size(3), D = kv.size(4), I = L[4].N;
  TORCH_CHECK(M <= B && kv.size(2) == Hkv && H * D == L[0].N && Hkv * D == L[1].N && H % Hkv == 0);
  TORCH_CHECK(pos.dtype() == torch::kLong && pos.is_contiguous() && pos.numel() == M, "one int64 position per row");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == D && sin.sizes() == cos.sizes());
  const int64_t* ps = pos.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(ps[m] >= 0 && ps[m] < T && ps[m] < cos.size(0), "position ", ps[m], " is past the cache");
  const float fe = static_cast<float>(eps);
  float* xp = x.data_ptr<float>();
  float* cache = kv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  std::vector<float> h(M * C), q(M * H * D), k(M * Hkv * D), v(M * Hkv * D), att(M * H * D), g(M * I), u(M * I),
      out(M * C);

  rmsnorm(xp, w_in.data_ptr<float>(), h.data(), M, C, fe);
  lin_apply(L[0], h.data(), q.data(), M);
  lin_apply(L[1], h.data(), k.data(), M);
  lin_apply(L[2], h.data(), v.data(), M);
  for (int64_t i = 0; i < M * H; ++i) rope(q.data() + i * D, cp + ps[i / H] * D, sp + ps[i / H] * D, D);
  for (int64_t i = 0; i < M * Hkv; ++i) {  // the cache holds keys after rotation
    const int64_t b = i / Hkv, j = i % Hkv, p = ps[b];
    rope(k.data() + i * D, cp + p * D, sp + p * D, D);
    std::memcpy(cache + (((0 * B + b) * Hkv + j) * T + p) * D, k.data() + i * D, D * 4);
    std::memcpy(cache + (((1 * B + b) * Hkv + j) * T + p) * D, v.data() + i * D, D * 4);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, M * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc(T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, j = (i % H) / (H / Hkv), p = ps[b];  // the key/value head this query head shares
      const float* kb = cache + ((0 * B + b) * Hkv + j) * T * D;
      const float* vb = cache + ((1 * B + b) * Hkv + j) * T * D;
      const float* qi = q.data() + i * D;
      float mx = -INFINITY, sum = 0.f;
      for (int64_t t = 0; t <= p; ++t) mx = std::max(mx, sc[t] = dot(qi, kb + t * D, D) * scale);
      for (int64_t t = 0; t <= p; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
      float* o = att.data() + i * D;
      std::fill(o, o + D, 0.f);
      for (int64_t t = 0; t <= p; ++t) {
        const float a = sc[t] / sum;
        for (int64_t d = 0; d < D; ++d) o[d] += a * vb[t * D + d];
      }
    }
  });
  lin_apply(L[3], att.data(), out.data(), M);
  for (int64_t i = 0; i < M * C; ++i) xp[i] += out[i];

  rmsnorm(xp, w_post.data_ptr<float>(), h.data(), M, C, fe);
  lin_apply(L[4], h.data(), g.data(), M);
  lin_apply(L[5], h.data(), u.data(), M);
  for (int64_t i = 0; i < M * I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];  // silu(gate) * up
  lin_apply(L[6], g.data(), out.data(), M);
  for (int64_t i = 0; i < M * C; ++i) xp[i] += out[i];
}

// LoRA's dropout for training (nn/lora.py). The keep-mask comes from a counter-based hash, not a generator:
// element i of a call with key (k0, k1) is kept iff mix(mix(i + k0) ^ k1) >= p * 2^32, mix being a 32-bit integer
// hash ("lowbias32", C. Wellons 2018), as counter-based generators do (Salmon et al. 2011, Philox). The key is
// drawn from torch's generator, so torch.manual_seed repeats a run. The backward recomputes the mask from the key
// instead of keeping it, and forms the low-rank term gh @ A row by row, never as an (N, in) tensor.
static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

static inline uint32_t cut_of(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout p=", p, " must be in [0, 1)");
  return static_cast<uint32_t>(std::min(std::llround(p * 4294967296.0), 4294967295LL));
}

// xd = x where kept, else 0 (the caller folds 1 / (1 - p) into A).
torch::Tensor lora_dropout(torch::Tensor x, int64_t key, double p) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(), "contiguous fp32 on a CPU");
  TORCH_CHECK(x.numel() < (int64_t{1} << 32), "at most 2^32 elements per call");
  const uint32_t cut = cut_of(p), k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (x.numel() + 4095) / 4096, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {  // blocks of 4096 with a 32-bit counter: the loop vectorizes
      const int64_t n = std::min<int64_t>(4096, x.numel() - c * 4096);
      const uint32_t base = static_cast<uint32_t>(c * 4096);
      const float* xc = xp + c * 4096;
      float* oc = op + c * 4096;
      for (uint32_t j = 0; j < n; ++j) oc[j] = mix32(mix32(base + j + k0) ^ k1) >= cut ? xc[j] : 0.f;
    }
  });
  return out;
}

// gx (N, K) += keep * (gh (N, r) @ a (r, K)), the mask of lora_dropout(x, key, p) for x of gx's shape.
void lora_dropout_backward(torch::Tensor gx, torch::Tensor gh, torch::Tensor a, int64_t key, double p) {
  for (const auto* t : {&gx, &gh, &a})
    TORCH_CHECK(t->dtype() == torch::kFloat && t->is_contiguous() && t->device().is_cpu(), "contiguous fp32 on a CPU");
  const int64_t N = gx.size(0), K = gx.size(1), R = a.size(0);
  TORCH_CHECK(gx.dim() == 2 && gh.dim() == 2 && a.dim() == 2 && gh.size(0) == N && gh.size(1) == R && a.size(1) == K,
              "gx (N, K), gh (N, r) and a (r, K); got ", gx.sizes(), ", ", gh.sizes(), ", ", a.sizes());
  TORCH_CHECK(gx.numel() < (int64_t{1} << 32), "at most 2^32 elements per call");
  const uint32_t cut = cut_of(p), k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  float* g = gx.data_ptr<float>();
  const float *hp = gh.data_ptr<float>(), *ap = a.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> t(K);
    for (int64_t n = r0; n < r1; ++n) {
      std::fill(t.begin(), t.end(), 0.f);
      for (int64_t q = 0; q < R; ++q) {
        const float c = hp[n * R + q];
        const float* aq = ap + q * K;
        for (int64_t j = 0; j < K; ++j) t[j] += c * aq[j];
      }
      float* gn = g + n * K;
      const uint32_t base = static_cast<uint32_t>(n * K);
      for (int64_t j = 0; j < K; ++j)
        gn[j] += mix32(mix32(base + static_cast<uint32_t>(j) + k0) ^ k1) >= cut ? t[j] : 0.f;
    }
  });
}

// The quantized layers' entry points (x @ dequantized(W)^T), kept by name for adapt/quantize.py.
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  return linear(x, 1, q, s, torch::Tensor(), 0);
}
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor s, torch::Tensor z, int64_t G) {
  return linear(x, 2, p, s, z, G);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as PyTorch's own ops: a server's other threads (HTTP, streaming) run during a decode step.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "x @ W^T for W fp32 (kind 0), int8 + row scales (1) or int4 groups (2)", nogil);
  m.def("int8_mm", &int8_mm, "x @ (q * s)^T, int8 weights, one scale per row", nogil);
  m.def("int4_mm", &int4_mm, "x @ ((q - 8) * s + z)^T, int4 weights in groups", nogil);
  m.def("llama_layer", &llama_layer, "one Llama decoder layer for one new token per row, x updated in place", nogil);
  m.def("lora_dropout", &lora_dropout, "x where a hash of (index, key) keeps it, else 0", nogil);
  m.def("lora_dropout_backward", &lora_dropout_backward, "gx += keep * (gh @ a), the same mask", nogil);
}
