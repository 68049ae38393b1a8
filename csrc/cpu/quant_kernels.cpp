// Quantized GEMM kernels over the prepacked tiles of quant.h: int8 activations x int4 / int8 weights.
//
// One call of a tile kernel computes the 16-column slices of R output rows for one tile (int4 VNNI: one or two
// adjacent tiles, R <= 4; int8 VNNI: R <= 8; AVX2: R <= 4): for each block of 32 features it forms the integer
// dot products of the R activation rows with the tile's 16 weight rows (int32), then scales them into float32
// accumulators:
//   int4: y[r, n] = sum_groups s[n, i] * sum_{b in i} d[r, b] * dot_b(a[r], q[n]) + m[n, i] * xsum[r, i]
//   int8: y[r, n] = sum_b sw[n, b] * d[r, b] * dot_b(a[r], q[n])   (whole_row: sw[n] * d[r] * sum_b dot_b)
// The weights of a tile-block are unpacked once and reused by the R rows (the blocked GEMM for large M), and
// each broadcast activation by the tiles of the call. OpenMP threads (torch's thread count) share the tiles
// (output features) out, see run_tiles.
// Scales and offsets S are float or at::Half (F16C converts 16 or 8 of them at once, exactly).
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_features.h"
#include "cpu/quant.h"
#include "cpu/tile_driver.h"

// GCC 12 reports the AVX-512 intrinsics' internal undefined vectors as maybe-uninitialized (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace flashgen::cpu::quant {
namespace {

// Activation rows per tile step: the weights unpacked once serve that many rows (register budgets: 16 ymm
// for AVX2, 32 zmm for AVX-512). The int4 VNNI step takes two tiles x 4 rows (measured: 7-9% faster prefill
// than one tile x 8 rows, as the broadcasts halve; 2 x 6 or 3 x 3 were slower).
constexpr int kAvx2Rows = 4, kVnniRows = 8, kVnniTiles = 2, kInt4VnniRows = kVnniRows / kVnniTiles;

// ---------------------------------------------------------------- AVX-512 VNNI
// 16 scales (or offsets) as float32
FLASHGEN_AVX512_VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FLASHGEN_AVX512_VNNI inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// C tiles side by side share each broadcast activation (C = 2 halves the broadcasts per dot product). With one
// block per group (OneBlock) the block scale folds into one multiply: acc += i * (s * d) + m * xsum.
template <int R, int C, bool OneBlock, class S>
FLASHGEN_AVX512_VNNI void int4_tile_vnni(const QuantActs& x, const uint8_t* w, int64_t w_stride, const S* sc,
                                         const S* of, int64_t s_stride, int64_t kb, int64_t bpg, float* out,
                                         int64_t ldo) {
  if constexpr (OneBlock) bpg = 1;  // a constant: one loop over the blocks
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[C][R], gacc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < kb / bpg; ++gi) {
    __m512 s[C], m[C];
    for (int c = 0; c < C; ++c) {
      s[c] = load16(sc + c * s_stride + gi * kTileRows), m[c] = load16(of + c * s_stride + gi * kTileRows);
      for (int r = 0; r < R; ++r) gacc[c][r] = _mm512_setzero_ps();
    }
    for (int64_t b = gi * bpg; b < (gi + 1) * bpg; ++b) {
      __m512i iacc[C][R];
      for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) iacc[c][r] = _mm512_setzero_si512();
      for (int v = 0; v < 4; ++v) {
        __m512i lo[C], hi[C];
        for (int c = 0; c < C; ++c) {
          const __m512i q = _mm512_loadu_si512(w + c * w_stride + b * kInt4TileBytes + v * 64);
          lo[c] = _mm512_and_si512(q, low), hi[c] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* a = x.a + r * x.a_stride + b * kBlock + v * 8;
          const __m512i a0 = _mm512_set1_epi32(load4(a)), a1 = _mm512_set1_epi32(load4(a + 4));
          for (int c = 0; c < C; ++c) {
            iacc[c][r] = _mm512_dpbusd_epi32(iacc[c][r], lo[c], a0);
            iacc[c][r] = _mm512_dpbusd_epi32(iacc[c][r], hi[c], a1);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_set1_ps(x.d[r * x.d_stride + b]);
        for (int c = 0; c < C; ++c) {
          if constexpr (OneBlock)
            acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[c][r]), _mm512_mul_ps(s[c], d), acc[c][r]);
          else
            gacc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[c][r]), d, gacc[c][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(x.xsum[r * x.xsum_stride + gi]);
      for (int c = 0; c < C; ++c) {
        if constexpr (!OneBlock) acc[c][r] = _mm512_fmadd_ps(gacc[c][r], s[c], acc[c][r]);
        acc[c][r] = _mm512_fmadd_ps(m[c], xs, acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + c * kTileRows, acc[c][r]);
}

// VNNI multiplies unsigned by signed bytes: the activations come in as a + 128 (int8_gemm's contract) and the
// block's precomputed weight row sums take the 128 * sum(w) back out. (Flipped here, in the inner loop, the sign
// bits cost one more vector operation per product: the default model's Q8_0 head at 16 rows ran at 150 GMAC/s.)
template <int R, class S>
FLASHGEN_AVX512_VNNI void int8_tile_vnni(const QuantActs& x, const int8_t* w, const S* sc, int64_t sblocks,
                                         int64_t kb, bool whole_row, float* out, int64_t ldo) {
  __m512 acc[R];
  __m512i iacc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), iacc[r] = _mm512_setzero_si512();
  for (int64_t b = 0; b < kb; ++b) {
    const int8_t* wb = w + b * kInt8TileBytes;
    for (int v = 0; v < 8; ++v) {
      const __m512i q = _mm512_loadu_si512(wb + v * 64);
      for (int r = 0; r < R; ++r) {
        iacc[r] = _mm512_dpbusd_epi32(iacc[r], _mm512_set1_epi32(load4(x.a + r * x.a_stride + b * kBlock + v * 4)), q);
      }
    }
    const __m512i bias128 = _mm512_slli_epi32(_mm512_loadu_si512(wb + kInt8CodeBytes), 7);
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_sub_epi32(iacc[r], bias128);
    if (!whole_row) {
      const __m512 s = load16(sc + (sblocks == 1 ? 0 : b) * kTileRows);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_mul_ps(s, _mm512_set1_ps(x.d[r * x.d_stride + b])),
                                 acc[r]);
        iacc[r] = _mm512_setzero_si512();
      }
    }
  }
  if (whole_row) {
    const __m512 s = load16(sc);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_mul_ps(s, _mm512_set1_ps(x.d[r * x.d_stride])));
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

// ---------------------------------------------------------------- AVX2 (each 256-bit half: 8 rows)
inline __m256i bcast4(const int8_t* p) { return _mm256_set1_epi32(load4(p)); }

// 8 scales (or offsets) as float32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// With one block per group (OneBlock) the group accumulator goes: the same products (i d) s, rounded as with it,
// so results do not change. Both halves of the tile go in one pass, as in int8_tile_avx2 (one core, 2048 x 1024 in
// cache, groups of 32, 1 / 5 / 16 rows: 14 / 54 / 67 -> 32 / 58 / 78 GMAC/s).
template <int R, bool OneBlock, class S>
void int4_tile_avx2(const QuantActs& x, const uint8_t* w, const S* sc, const S* of, int64_t kb, int64_t bpg,
                    float* out, int64_t ldo) {
  if constexpr (OneBlock) bpg = 1;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < kb / bpg; ++gi) {
    __m256 gacc[2][R];
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < R; ++r) gacc[h][r] = _mm256_setzero_ps();
    for (int64_t b = gi * bpg; b < (gi + 1) * bpg; ++b) {
      const uint8_t* wb = w + b * kInt4TileBytes;
      // |15 * 127 * 2| per maddubs lane, 8 of them summed: 30480 < 32767, so int16 partial sums are exact.
      __m256i s16[2][R];
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < R; ++r) s16[h][r] = _mm256_setzero_si256();
      for (int v = 0; v < 4; ++v) {
        prefetch_part<kInt4TileBytes, 4>(wb, v);
        __m256i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + v * 64 + h * 32));
          lo[h] = _mm256_and_si256(q, low), hi[h] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* a = x.a + r * x.a_stride + b * kBlock + v * 8;
          const __m256i a0 = bcast4(a), a1 = bcast4(a + 4);
          for (int h = 0; h < 2; ++h) {
            s16[h][r] = _mm256_add_epi16(s16[h][r], _mm256_maddubs_epi16(lo[h], a0));
            s16[h][r] = _mm256_add_epi16(s16[h][r], _mm256_maddubs_epi16(hi[h], a1));
          }
        }
      }
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < R; ++r) {
          const __m256 i = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[h][r], ones));
          const __m256 d = _mm256_set1_ps(x.d[r * x.d_stride + b]);
          if constexpr (OneBlock)
            acc[h][r] = _mm256_fmadd_ps(_mm256_mul_ps(i, d), load8(sc + b * kTileRows + h * 8), acc[h][r]);
          else
            gacc[h][r] = _mm256_fmadd_ps(i, d, gacc[h][r]);
        }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = load8(sc + gi * kTileRows + h * 8);
      const __m256 m = load8(of + gi * kTileRows + h * 8);
      for (int r = 0; r < R; ++r) {
        if constexpr (!OneBlock) acc[h][r] = _mm256_fmadd_ps(gacc[h][r], s, acc[h][r]);
        acc[h][r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.xsum[r * x.xsum_stride + gi]), acc[h][r]);
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + h * 8, acc[h][r]);
}

// maddubs is unsigned x signed with int16 saturation: |w| x sign(a, w) keeps every pair sum within
// 2 * 128 * 127 = 32512, so it is exact for any int8 weight (and activations in [-127, 127]). Both halves of the
// tile go in one pass: each broadcast activation serves 16 rows, and the tile's weights are read in one sweep,
// each cache line whole while it is fresh (one core, 2048 x 1024 in cache, blocks of 32, 1 / 5 / 16 / 70 rows:
// 18 / 38 / 35 / 42 -> 26 / 47 / 53 / 48 GMAC/s).
template <int R, class S>
void int8_tile_avx2(const QuantActs& x, const int8_t* w, const S* sc, int64_t sblocks, int64_t kb, bool whole_row,
                    float* out, int64_t ldo) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2][R];
  __m256i iacc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_ps(), iacc[h][r] = _mm256_setzero_si256();
  for (int64_t b = 0; b < kb; ++b) {
    const int8_t* wb = w + b * kInt8TileBytes;
    for (int v = 0; v < 8; ++v) {
      prefetch_part<kInt8TileBytes, 8>(reinterpret_cast<const uint8_t*>(wb), v);
      __m256i q[2], aq[2];
      for (int h = 0; h < 2; ++h) {
        q[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + v * 64 + h * 32));
        aq[h] = _mm256_abs_epi8(q[h]);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i a = bcast4(x.a + r * x.a_stride + b * kBlock + v * 4);
        for (int h = 0; h < 2; ++h) {
          const __m256i p16 = _mm256_maddubs_epi16(aq[h], _mm256_sign_epi8(a, q[h]));
          iacc[h][r] = _mm256_add_epi32(iacc[h][r], _mm256_madd_epi16(p16, ones));
        }
      }
    }
    if (!whole_row)
      for (int h = 0; h < 2; ++h) {
        const __m256 s = load8(sc + (sblocks == 1 ? 0 : b) * kTileRows + h * 8);
        for (int r = 0; r < R; ++r) {
          acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[h][r]),
                                      _mm256_mul_ps(s, _mm256_set1_ps(x.d[r * x.d_stride + b])), acc[h][r]);
          iacc[h][r] = _mm256_setzero_si256();
        }
      }
  }
  for (int h = 0; h < 2; ++h) {
    if (whole_row) {
      const __m256 s = load8(sc + h * 8);
      for (int r = 0; r < R; ++r)
        acc[h][r] = _mm256_mul_ps(_mm256_cvtepi32_ps(iacc[h][r]),
                                  _mm256_mul_ps(s, _mm256_set1_ps(x.d[r * x.d_stride])));
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + h * 8, acc[h][r]);
  }
}

}  // namespace

template <class S>
void int4_gemm(const QuantActs& x, int64_t m, const uint8_t* w, const S* scales, const S* offsets, int64_t n,
               int64_t kb, int64_t bpg, float* out, bool vnni) {
  const int64_t w_stride = kb * kInt4TileBytes, s_stride = kb / bpg * kTileRows;
  auto run = [&](auto one_block) {
    if (!vnni) {
      run_tiles<kAvx2Rows, 1>(x, m, n, kb, out, [&](int64_t t, auto, const QuantActs& xr, auto R, float* dst,
                                                    int64_t ldo) {
        int4_tile_avx2<R(), one_block()>(xr, w + t * w_stride, scales + t * s_stride, offsets + t * s_stride, kb,
                                         bpg, dst, ldo);
      });
      return;
    }
    run_tiles<kInt4VnniRows, kVnniTiles>(x, m, n, kb, out, [&](int64_t t, auto NT, const QuantActs& xr, auto R,
                                                               float* dst, int64_t ldo) {
      int4_tile_vnni<R(), NT(), one_block()>(xr, w + t * w_stride, w_stride, scales + t * s_stride,
                                             offsets + t * s_stride, s_stride, kb, bpg, dst, ldo);
    });
  };
  if (bpg == 1)
    run(std::true_type{});
  else
    run(std::false_type{});
}

template <class S>
void int8_gemm(const QuantActs& x, int64_t m, const int8_t* w, const S* scales, int64_t sblocks, int64_t n,
               int64_t kb, bool whole_row, float* out, bool vnni) {
  auto tile = [&](auto isa_rows, auto kernel) {
    run_tiles<decltype(isa_rows)::value, 1>(x, m, n, kb, out, [&](int64_t t, auto, const QuantActs& xr, auto R,
                                                                  float* dst, int64_t ldo) {
      kernel(R, xr, w + t * kb * kInt8TileBytes, scales + t * sblocks * kTileRows, dst, ldo);
    });
  };
  if (vnni)
    tile(std::integral_constant<int, kVnniRows>{},
         [&](auto R, const QuantActs& xr, const int8_t* wt, const S* st, float* dst, int64_t ldo) {
           int8_tile_vnni<R()>(xr, wt, st, sblocks, kb, whole_row, dst, ldo);
         });
  else
    tile(std::integral_constant<int, kAvx2Rows>{},
         [&](auto R, const QuantActs& xr, const int8_t* wt, const S* st, float* dst, int64_t ldo) {
           int8_tile_avx2<R()>(xr, wt, st, sblocks, kb, whole_row, dst, ldo);
         });
}

#define FLASHGEN_QUANT_GEMMS(S)                                                                                     \
  template void int4_gemm<S>(const QuantActs&, int64_t, const uint8_t*, const S*, const S*, int64_t, int64_t,       \
                             int64_t, float*, bool);                                                                \
  template void int8_gemm<S>(const QuantActs&, int64_t, const int8_t*, const S*, int64_t, int64_t, int64_t, bool,   \
                             float*, bool);
FLASHGEN_QUANT_GEMMS(float)
FLASHGEN_QUANT_GEMMS(at::Half)
#undef FLASHGEN_QUANT_GEMMS

}  // namespace flashgen::cpu::quant
