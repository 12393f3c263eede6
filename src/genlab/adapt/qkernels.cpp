// Weight-only quantized matrix products for decoding on a CPU: y (M, N) = x (M, K) . dequant(W) (N, K)^T.
// At M = 1..8 (one new token per sequence) these products read the whole weight for a few rows of x: the
// time is the bytes read, so int8 (1 byte per weight) and int4 (half a byte) beat fp32 (4 bytes) by what they
// save. Each 8-wide block of a weight row is loaded once, widened to floats, and used for all M rows of x.
// AVX2 + FMA; rows of W are shared out between threads with at::parallel_for (built with -fopenmp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Both kernels work on blocks of R = 4 weight rows and 2 rows of x at a time: 8 independent accumulators keep
// the FMA units busy (one accumulator would wait on its own latency), and the 4 rows' bytes, loaded once per
// 8 columns, serve both rows of x. R and the number of x rows are template constants, so the accumulators stay
// in registers; the last N % 4 weight rows and an odd last row of x take the narrower instances.
template <int R, int MB, typename Widen>
static inline void tile(const float* xp, float* yp, int64_t m0, int64_t n0, int64_t K, int64_t N, Widen& widen,
                        const float* row_scale) {
  __m256 acc[MB][R];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 a[MB];
    for (int i = 0; i < MB; ++i) a[i] = _mm256_loadu_ps(xp + (m0 + i) * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 w = widen(n0 + r, k);
      for (int i = 0; i < MB; ++i) acc[i][r] = _mm256_fmadd_ps(a[i], w, acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r)
      yp[(m0 + i) * N + n0 + r] = hsum(acc[i][r]) * (row_scale ? row_scale[n0 + r] : 1.0f);
}

// One row of x against 4 weight rows, with the accumulators written out: the generic tile at MB = 1 kept them on
// the stack (a store and reload per step), which halved the speed of the most common case, decoding one token.
template <typename Widen>
static inline void tile_4x1(const float* xp, float* yp, int64_t m0, int64_t n0, int64_t K, int64_t N,
                            Widen& widen, const float* row_scale) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  const float* x = xp + m0 * K;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 a = _mm256_loadu_ps(x + k);
    c0 = _mm256_fmadd_ps(a, widen(n0, k), c0);
    c1 = _mm256_fmadd_ps(a, widen(n0 + 1, k), c1);
    c2 = _mm256_fmadd_ps(a, widen(n0 + 2, k), c2);
    c3 = _mm256_fmadd_ps(a, widen(n0 + 3, k), c3);
  }
  float* y = yp + m0 * N + n0;
  y[0] = hsum(c0) * (row_scale ? row_scale[n0] : 1.0f);
  y[1] = hsum(c1) * (row_scale ? row_scale[n0 + 1] : 1.0f);
  y[2] = hsum(c2) * (row_scale ? row_scale[n0 + 2] : 1.0f);
  y[3] = hsum(c3) * (row_scale ? row_scale[n0 + 3] : 1.0f);
}

template <typename Widen>
static void blocked_mm(const float* xp, float* yp, int64_t M, int64_t K, int64_t N, Widen widen,
                       const float* row_scale) {
  const int64_t full = N / 4;
  at::parallel_for(0, full + (N % 4 ? 1 : 0), 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const bool two = m0 + 1 < M;
        if (b < full) {
          if (two) tile<4, 2>(xp, yp, m0, n0, K, N, widen, row_scale);
          else tile_4x1(xp, yp, m0, n0, K, N, widen, row_scale);
        } else {
          for (int64_t n = n0; n < N; ++n) {
            if (two) tile<1, 2>(xp, yp, m0, n, K, N, widen, row_scale);
            else tile<1, 1>(xp, yp, m0, n, K, N, widen, row_scale);
          }
        }
      }
    }
  });
}

// W int8 (N, K), one scale per row: w = q * s.
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  TORCH_CHECK(x.dtype() == torch::kFloat && q.dtype() == torch::kInt8 && s.dtype() == torch::kFloat);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % 8 == 0 && s.numel() == N && q.is_contiguous() && s.is_contiguous());
  auto y = torch::empty({M, N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  auto widen = [&](int64_t n, int64_t k) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp + n * K + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  };
  blocked_mm(x.data_ptr<float>(), y.data_ptr<float>(), M, K, N, widen, s.data_ptr<float>());
  return y;
}

// W int4 (N, K / 2 bytes, the even column in the low nibble), groups of G columns: w = (q - 8) * s + z.
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor s, torch::Tensor z, int64_t G) {
  TORCH_CHECK(x.dtype() == torch::kFloat && p.dtype() == torch::kUInt8 && s.dtype() == torch::kFloat);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = p.size(0), ng = K / G;
  TORCH_CHECK(p.size(1) * 2 == K && G % 8 == 0 && K % G == 0 && s.size(0) == N && s.size(1) == ng);
  TORCH_CHECK(p.is_contiguous() && s.is_contiguous() && z.is_contiguous() && z.sizes() == s.sizes());
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const __m128i low = _mm_set1_epi8(0x0F);
  auto widen = [&](int64_t n, int64_t k) {
    int32_t four;
    std::memcpy(&four, pp + n * (K / 2) + k / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(four);
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    const int64_t g = n * ng + k / G;
    return _mm256_fmadd_ps(qf, _mm256_set1_ps(sp[g]), _mm256_set1_ps(zp[g] - 8.0f * sp[g]));  // q s + (z - 8 s)
  };
  blocked_mm(x.data_ptr<float>(), y.data_ptr<float>(), M, K, N, widen, nullptr);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_mm", &int8_mm, "x @ (q * s)^T, int8 weights, one scale per row");
  m.def("int4_mm", &int4_mm, "x @ ((q - 8) * s + z)^T, int4 weights in groups");
}
