// y = x W^T for float32 rows x (m, k) and a weight W (n, k) kept float16 or bfloat16 (quant.h half_linear_rows),
// or float32 (float_linear_rows).
//
// Every weight is widened exactly to float32 as it is loaded (F16C's vcvtph2ps; a bfloat16 is the top half of a
// float32; a float32 as it is) and multiplied by x in float32, so the products are those of the float32 copy of
// W. Each output is summed lane-wise over k (L lanes: 16 for AVX-512, 8 for AVX2; a zero-padded step for the
// k % L tail), then across the lanes in a fixed order: the same operations whatever m, the thread count or the
// row's place in the step, so a row's result does not depend on the rows beside it (batch invariance). float32
// weights come here rather than to at::mm, whose BLAS picks its kernels, and so its summation order, by the
// number of rows and the CPU (rows padded to a multiple of 4 kept a row's result fixed on an AVX2 machine, not
// on an AVX-512 one).
//
// One kernel call takes R activation rows x C weight rows (AVX-512: 4 x 4 accumulators, AVX2: 4 x 2): the C
// widened weight vectors serve R rows, each activation vector C weights (a prompt runs at the FMA units' peak).
// A decode step (m = 1) streams W at the memory's pace; for a prompt, rows go in chunks of kRowChunk whose
// activations stay in L2 while W streams past. (vdpbf16ps would double a prompt's throughput on bfloat16
// weights, but only by rounding the activations to bfloat16.)
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_features.h"
#include "cpu/quant.h"
#include "cpu/tile_driver.h"

// GCC 12 reports the AVX-512 intrinsics' internal undefined vectors as (maybe-)uninitialized (false positives).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace flashgen::cpu::quant {
namespace {

struct Avx2 {
  static constexpr int L = 8, R = 4, C = 2;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F widen(const uint16_t* p, bool bf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
  }
  static F widen(const float* p, bool) { return load(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F v) {
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
  }
};

namespace avx2 {
using I = Avx2;
#include "cpu/half_rows.inc"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// Everything in this region is compiled for AVX-512 and only called when the CPU has it.
struct Avx512 {
  static constexpr int L = 16, R = 4, C = 4;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F widen(const uint16_t* p, bool bf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
  }
  static F widen(const float* p, bool) { return load(p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F v) { return Avx2::sum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
};

namespace avx512 {
using I = Avx512;
#include "cpu/half_rows.inc"
}  // namespace avx512
#pragma GCC pop_options

}  // namespace

void half_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& w, int64_t n, float* y) {
  if (m == 0) return;
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  (use_avx512() ? avx512::gemm<uint16_t> : avx2::gemm<uint16_t>)(x, m, k, wp, bf16, n, y);
}

void float_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& w, int64_t n, float* y) {
  if (m == 0) return;
  (use_avx512() ? avx512::gemm<float> : avx2::gemm<float>)(x, m, k, w.data_ptr<float>(), false, n, y);
}

}  // namespace flashgen::cpu::quant
