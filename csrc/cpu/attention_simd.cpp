// SIMD primitives of the CPU attention kernels (AVX-512 and AVX2 versions, chosen once at run time) and the
// pieces every attention kernel shares: the score tile, sequence bookkeeping and input checks.
// GCC 12 warns inside its own avx512fintrin.h (intrinsics that start from a deliberately undefined vector,
// here the masked loads' zero-masking); the warning is attributed to the header, so it is silenced first.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdlib>

#include "cpu/attention.h"
#include "cpu/cpu_features.h"

namespace flashgen::cpu::attn {
namespace {

// exp(x) for x in float32: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial (Cephes expf
// coefficients, ~1 ulp), then scaled by 2^n. Inputs below -87 (incl. -inf) give 0; NaN stays NaN.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpLo = -87.f, kExpHi = 88.f;

// ---------------------------------------------------------------- AVX-512
// 16 values of B at p as float32: a 16-bit KV cache is read in place, each value converted exactly as it is
// loaded, so a product over it has the bits of the same product over the values converted first.
FLASHGEN_AVX512 inline __m512 load16_float(const float* p) { return _mm512_loadu_ps(p); }
FLASHGEN_AVX512 inline __m512 load16_float(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FLASHGEN_AVX512 inline __m512 load16_float(const at::BFloat16* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

template <int R, int NV, typename T>
FLASHGEN_AVX512 inline void tile512(int kk, const float* a, int64_t ar, int64_t ac, const T* b, int64_t ldb,
                                    float* c, int64_t ldc, bool acc) {
  __m512 x[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) x[r][v] = acc ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int p = 0; p < kk; ++p) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load16_float(b + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * ar + p * ac]);
      for (int v = 0; v < NV; ++v) x[r][v] = _mm512_fmadd_ps(av, bv[v], x[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, x[r][v]);
}

template <int R, typename T>
FLASHGEN_AVX512 inline void rows512(int nv, int kk, const float* a, int64_t ar, int64_t ac, const T* b,
                                    int64_t ldb, float* c, int64_t ldc, bool acc) {
  switch (nv) {
    case 4: tile512<R, 4>(kk, a, ar, ac, b, ldb, c, ldc, acc); break;
    case 3: tile512<R, 3>(kk, a, ar, ac, b, ldb, c, ldc, acc); break;
    case 2: tile512<R, 2>(kk, a, ar, ac, b, ldb, c, ldc, acc); break;
    default: tile512<R, 1>(kk, a, ar, ac, b, ldb, c, ldc, acc); break;
  }
}

template <typename T>
FLASHGEN_AVX512 void gemm512(int m, int n, int kk, const float* a, int64_t ar, int64_t ac, const T* b,
                             int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int j = 0; j < n; j += 64) {
    const int nv = std::min(4, (n - j) / 16);
    int i = 0;
    for (; i + 4 <= m; i += 4) rows512<4>(nv, kk, a + i * ar, ar, ac, b + j, ldb, c + i * ldc + j, ldc, acc);
    // the rows left over as one tile, as in gemm256
    const float* ai = a + i * ar;
    float* ci = c + i * ldc + j;
    if (m - i == 3) rows512<3>(nv, kk, ai, ar, ac, b + j, ldb, ci, ldc, acc);
    if (m - i == 2) rows512<2>(nv, kk, ai, ar, ac, b + j, ldb, ci, ldc, acc);
    if (m - i == 1) rows512<1>(nv, kk, ai, ar, ac, b + j, ldb, ci, ldc, acc);
  }
}

FLASHGEN_AVX512 float row_max512(const float* x, int n) {
  __m512 m = _mm512_set1_ps(kNegInf);
  for (int i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  return _mm512_reduce_max_ps(m);
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for a 16 x 16 block: pairs, then quads (unpack within 128-bit
// lanes), then the four lanes of four quad vectors (shuffle_f32x4 twice).
FLASHGEN_AVX512 void transpose16_512(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + j], lane L: column 4L + j of rows i .. i + 3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), x1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 y1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_ps(dst + j * ld_dst, _mm512_shuffle_f32x4(x0, y0, 0x88));
    _mm512_storeu_ps(dst + (4 + j) * ld_dst, _mm512_shuffle_f32x4(x1, y1, 0x88));
    _mm512_storeu_ps(dst + (8 + j) * ld_dst, _mm512_shuffle_f32x4(x0, y0, 0xDD));
    _mm512_storeu_ps(dst + (12 + j) * ld_dst, _mm512_shuffle_f32x4(x1, y1, 0xDD));
  }
}

// exp(v) lane by lane (see the constants above).
FLASHGEN_AVX512 inline __m512 exp512(__m512 v) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(v, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
  v = _mm512_min_ps(_mm512_set1_ps(kExpHi), _mm512_max_ps(_mm512_set1_ps(kExpLo), v));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int p = 1; p < 6; ++p) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[p]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(_knot_mask16(tiny), _mm512_scalef_ps(y, k));
}

FLASHGEN_AVX512 float exp_sum512(float* x, int n, float shift) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift);
  for (int i = 0; i < n; i += 16) {
    const __m512 y = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    _mm512_storeu_ps(x + i, y);
    sum = _mm512_add_ps(sum, y);
  }
  return _mm512_reduce_add_ps(sum);
}

FLASHGEN_AVX512 void silu512(const float* g, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
    __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    if (up) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, up + i));
    _mm512_mask_storeu_ps(out + i, m, y);
  }
}

FLASHGEN_AVX512 void sigmoid512(const float* g, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 one = _mm512_set1_ps(1.f);
    _mm512_mask_storeu_ps(out + i, m, _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
  }
}

// ---------------------------------------------------------------- AVX2 (the build baseline)
template <int R, typename T>
inline void tile256(int kk, const float* a, int64_t ar, int64_t ac, const T* b, int64_t ldb, float* c,
                    int64_t ldc, bool acc) {
  __m256 x[R][2];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) x[r][v] = acc ? _mm256_loadu_ps(c + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int p = 0; p < kk; ++p) {
    const __m256 b0 = load8_float(b + p * ldb), b1 = load8_float(b + p * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * ar + p * ac);
      x[r][0] = _mm256_fmadd_ps(av, b0, x[r][0]);
      x[r][1] = _mm256_fmadd_ps(av, b1, x[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, x[r][v]);
}

// One row of C against V vectors (8 V <= 64 columns) of B: each p reads V * 32 bytes of B in address order.
template <int V, typename T>
inline void row256(int kk, const float* a, int64_t ac, const T* b, int64_t ldb, float* c, bool acc) {
  __m256 x[V];
  for (int v = 0; v < V; ++v) x[v] = acc ? _mm256_loadu_ps(c + 8 * v) : _mm256_setzero_ps();
  for (int p = 0; p < kk; ++p) {
    const __m256 av = _mm256_broadcast_ss(a + p * ac);
    for (int v = 0; v < V; ++v) x[v] = _mm256_fmadd_ps(av, load8_float(b + p * ldb + 8 * v), x[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(c + 8 * v, x[v]);
}

template <typename T>
inline void row256(int vecs, int kk, const float* a, int64_t ac, const T* b, int64_t ldb, float* c, bool acc) {
  switch (vecs) {
    case 8: row256<8, T>(kk, a, ac, b, ldb, c, acc); break;
    case 6: row256<6, T>(kk, a, ac, b, ldb, c, acc); break;
    case 4: row256<4, T>(kk, a, ac, b, ldb, c, acc); break;
    default: row256<2, T>(kk, a, ac, b, ldb, c, acc); break;
  }
}

template <typename T>
void gemm256(int m, int n, int kk, const float* a, int64_t ar, int64_t ac, const T* b, int64_t ldb, float* c,
             int64_t ldc, bool acc) {
  // Up to 4 rows (a decode step's GQA group) go one at a time against 64 columns, and so do the rows left over
  // past the 4-row tiles: 8 sums in flight hide the FMA latency, and B is read row by row in address order (as
  // gemm512 reads it), which lets the hardware stream a KV cache block from DRAM where 16 columns at a time read
  // one line in four. (One core, 16 sequences at 160 keys, caches cycled past the L3: 9 / 3 heads 600-750 ->
  // 390-470 us, 32 / 8 heads 1.64-1.78 -> 1.10-1.18 ms; in cache unchanged.) Every output is still one FMA chain
  // over p, whatever the tiling.
  const int full = m <= 4 ? 0 : m / 4 * 4;
  for (int j = 0; j < n; j += 16)
    for (int i = 0; i < full; i += 4) tile256<4, T>(kk, a + i * ar, ar, ac, b + j, ldb, c + i * ldc + j, ldc, acc);
  for (int i = full; i < m; ++i)
    for (int j = 0; j < n; j += 64)
      row256(std::min(n - j, 64) / 8, kk, a + i * ar, ac, b + j, ldb, c + i * ldc + j, acc);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

float row_max256(const float* x, int n) {
  __m256 m = _mm256_set1_ps(kNegInf);
  for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// 8 x 8 transposes (pairs, quads, then 128-bit halves), four of them for a 16 x 16 block.
void transpose8_256(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // r[i + j], half h: column 4h + j of rows i .. i + 3
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ld_dst, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(dst + (4 + j) * ld_dst, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}

void transpose16_256(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 16; j += 8) transpose8_256(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
}

inline __m256 exp256(__m256 v) {
  const __m256 tiny = _mm256_cmp_ps(v, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
  v = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(_mm256_set1_ps(kExpLo), v));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), v);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int p = 1; p < 6; ++p) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[p]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

float exp_sum256(float* x, int n, float shift) {
  __m256 sum = _mm256_setzero_ps();
  const __m256 sh = _mm256_set1_ps(shift);
  for (int i = 0; i < n; i += 8) {
    const __m256 y = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, y);
    sum = _mm256_add_ps(sum, y);
  }
  return hsum256(sum);
}

void silu256(const float* g, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    __m256 y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    if (up) y = _mm256_mul_ps(y, _mm256_loadu_ps(up + i));
    _mm256_storeu_ps(out + i, y);
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * (up ? up[i] : 1.f);
}

void sigmoid256(const float* g, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(out + i, _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x)))));
  }
  for (; i < n; ++i) out[i] = 1.f / (1.f + std::exp(-g[i]));
}

}  // namespace

const Simd& simd() {
  static const Simd avx512{gemm512<float>, gemm512<at::Half>, gemm512<at::BFloat16>, row_max512, exp_sum512,
                           transpose16_512, silu512, sigmoid512},
      avx2{gemm256<float>, gemm256<at::Half>, gemm256<at::BFloat16>, row_max256, exp_sum256, transpose16_256,
           silu256, sigmoid256};
  // FLASHGEN_NO_AVX512=1 forces the AVX2 path (so tests on an AVX-512 machine cover both).
  static const bool use_avx512 = has_avx512() && !std::getenv("FLASHGEN_NO_AVX512");
  return use_avx512 ? avx512 : avx2;
}

template <typename K>
void scores(const Simd& isa, const Options& opt, int rows, const float* qf, int ldq, const K* kt, int64_t ldk,
            int d, int64_t k0, int nk, const int64_t* row_pos, int64_t sk, float* s, float* tanh_grad) {
  // a sequence's last key block is partial (a decode step's often holds a few keys): its columns past the
  // last kVec of keys are left to the mask
  isa.product(rows, int(round_up(nk, kVec)), d, qf, ldq, 1, kt, ldk, s, kBlockK, false);
  if (opt.softcap > 0) {
    const float inv = 1.f / opt.softcap;
    for (int i = 0; i < rows * kBlockK; ++i) {
      const float t = std::tanh(s[i] * inv);
      s[i] = opt.softcap * t;
      if (tanh_grad) tanh_grad[i] = 1.f - t * t;
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* sr = s + int64_t(r) * kBlockK;
    const int64_t lo = opt.lo(row_pos[r]) - k0, hi = std::min<int64_t>(opt.hi(row_pos[r], sk) - k0, nk - 1);
    const int first = int(std::clamp<int64_t>(lo, 0, kBlockK)), last = int(std::clamp<int64_t>(hi + 1, first, kBlockK));
    std::fill(sr, sr + first, kNegInf);
    std::fill(sr + last, sr + kBlockK, kNegInf);
  }
}
template void scores(const Simd&, const Options&, int, const float*, int, const float*, int64_t, int, int64_t, int,
                     const int64_t*, int64_t, float*, float*);
template void scores(const Simd&, const Options&, int, const float*, int, const at::Half*, int64_t, int, int64_t,
                     int, const int64_t*, int64_t, float*, float*);
template void scores(const Simd&, const Options&, int, const float*, int, const at::BFloat16*, int64_t, int, int64_t,
                     int, const int64_t*, int64_t, float*, float*);

std::vector<Seq> sequences(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                           const std::optional<at::Tensor>& cu_k) {
  std::vector<Seq> seqs;
  if (!cu_q) {
    const int64_t sq = q.size(1), sk = k.size(1);
    for (int64_t b = 0; b < q.size(0); ++b) seqs.push_back({b * sq, sq, b * sk, sk});
    return seqs;
  }
  for (const auto* cu : {&*cu_q, &*cu_k}) {
    TORCH_CHECK(cu->dim() == 1 && cu->scalar_type() == at::kInt && cu->device().is_cpu() && cu->numel() >= 1,
                "cu_seqlens_q / cu_seqlens_k must be 1-D int32 CPU tensors (batch + 1,), got ", cu->scalar_type(),
                " of shape ", cu->sizes(), " on ", cu->device());
  }
  TORCH_CHECK(cu_q->numel() == cu_k->numel(), "cu_seqlens_q has ", cu_q->numel(), " entries but cu_seqlens_k has ",
              cu_k->numel());
  const auto cq = cu_q->contiguous(), ck = cu_k->contiguous();
  const int32_t *a = cq.data_ptr<int32_t>(), *b = ck.data_ptr<int32_t>();
  TORCH_CHECK(a[0] == 0 && b[0] == 0, "cu_seqlens_q and cu_seqlens_k must start at 0");
  for (int64_t i = 0; i + 1 < cq.numel(); ++i) {
    TORCH_CHECK(a[i + 1] >= a[i] && b[i + 1] >= b[i], "cu_seqlens_q / cu_seqlens_k must be non-decreasing");
    seqs.push_back({a[i], a[i + 1] - a[i], b[i], b[i + 1] - b[i]});
  }
  TORCH_CHECK(a[cq.numel() - 1] <= q.size(0), "cu_seqlens_q ends at ", a[cq.numel() - 1], " but q has only ",
              q.size(0), " tokens");
  TORCH_CHECK(b[ck.numel() - 1] <= k.size(0), "cu_seqlens_k ends at ", b[ck.numel() - 1], " but k has only ",
              k.size(0), " tokens");
  return seqs;
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen) {
  const int64_t dims = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.dim() == dims, op, ": q, k, v must be ",
              varlen ? "(total_tokens, heads, head_dim) with cu_seqlens" : "(batch, seqlen, heads, head_dim)",
              ", got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": expected CPU tensors");
  const int64_t d = q.size(-1);
  TORCH_CHECK(d >= 1 && d <= 256, op, ": head_dim must be in [1, 256], got ", d);
  TORCH_CHECK(k.size(-1) == d, op, ": k head_dim ", k.size(-1), " differs from q head_dim ", d);
  TORCH_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0, op, ": q heads (", q.size(-2),
              ") must be a multiple of kv heads (", k.size(-2), ")");
  if (!varlen) TORCH_CHECK(q.size(0) == k.size(0), op, ": q batch ", q.size(0), " differs from k batch ", k.size(0));
}

}  // namespace flashgen::cpu::attn
