// The AMX int8 kernel over the GGML tiles of ggml.h, for prompts (ggml_kernels.cpp chooses it). Its integers
// and float operations are the other kernels' (ggml_kernels.cpp), so its results are their bits.

// GCC 12 warns inside its own avx512fintrin.h (intrinsics that start from a deliberately undefined vector); the
// warning is attributed to the header, so it is silenced first.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/ggml.h"
#include "cpu/ggml_avx512.h"
#include "cpu/tile_driver.h"

namespace flashgen::cpu::quant::ggml {
namespace {

// A super-block's bracket I = sum_j sc_j (dot_j(a, q) - zero is_j) in a few tile products over the whole super-
// block, not one per sub-block: each tile product must be stored to memory to be read, and that store costs as
// much as the product. The scales are split into digits of `bits` bits, sc = sum_t digit_t 2^(t bits) (the top
// digit signed), and digit plane t holds (q - zero) times its sub-block's digit t, which fits int8 (AmxDigits);
// tdpbssd sums a (q - zero) digit_t over the super-block into C_t, and I = sum_t C_t 2^(t bits), exact. The float
// work on I is then finish512's, so a row's result is the same bits whichever kernel ran it. A call makes its
// tile's digit planes once, into a buffer of the thread, for all its rows (up to kRowChunk); the thread's tile
// state is set at each call, as other code (oneDNN) may have set its own.
// Measured (2048 x 8192, 512 rows, 2 threads, GMAC/s, VNNI -> AMX): Q4_K 268 -> 459, Q6_K 126 -> 311, Q5_K 228 ->
// 327, Q3_K 121 -> 485, Q2_K 110 -> 472, Q5_0 229 -> 379, Q5_1 215 -> 290, Q4_0 306 -> 332 (1536 x 576: 175 -> 204);
// Q4_1 lost (327 -> 297, 1536 x 576: 177 -> 167) and stays on tile32_vnni. A product per sub-block, each stored and
// scaled as the VNNI kernel did then, gave Q4_K 330 and Q6_K 203.
struct AmxDigits {
  int bits, count;  // count 0: no AMX kernel
};
template <int KI>
constexpr AmxDigits amx_digits() {
  constexpr Kind kd = kKinds[KI];
  if (kd.lut) return {0, 0};  // table values reach 127: no digit but 1 fits (IQ4_XS; IQ4_NL goes to tile32_vnni)
  if (kd.type == kQ4_1) return {0, 0};  // slower than tile32_vnni (measured above)
  if (!kd.scales) return {0, 1};
  switch (kd.type) {  // |q - zero| x the largest digit <= 127
    case kQ2_K: return {4, 1};  // 3 x 15, scales 0 .. 15
    case kQ3_K: return {4, 2};  // 4 x 15, scales -32 .. 31
    case kQ4_K: return {3, 2};  // 15 x 7, scales 0 .. 63
    case kQ5_K: return {2, 3};  // 31 x 3, scales 0 .. 63
    case kQ6_K: return {2, 4};  // 32 x 3, scales -128 .. 127
    default: return {0, 0};
  }
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0 the activations (A), 1 a digit plane (B), 2 + t the sums of digit t (C_t). The tile instructions
// name their tiles in the instruction itself, hence a switch on t (folded away in the unrolled loops over t).
FLASHGEN_AMX_INT8 inline void sums_zero(int t) {
  switch (t) {
    case 0: _tile_zero(2); break;
    case 1: _tile_zero(3); break;
    case 2: _tile_zero(4); break;
    default: _tile_zero(5);
  }
}
FLASHGEN_AMX_INT8 inline void sums_add(int t, const void* plane) {
  _tile_loadd(1, plane, 64);
  switch (t) {
    case 0: _tile_dpbssd(2, 0, 1); break;
    case 1: _tile_dpbssd(3, 0, 1); break;
    case 2: _tile_dpbssd(4, 0, 1); break;
    default: _tile_dpbssd(5, 0, 1);
  }
}
FLASHGEN_AMX_INT8 inline void sums_store(int t, int32_t* c) {
  switch (t) {
    case 0: _tile_stored(2, c, 64); break;
    case 1: _tile_stored(3, c, 64); break;
    case 2: _tile_stored(4, c, 64); break;
    default: _tile_stored(5, c, 64);
  }
}

// Signed bytes v times one small signed factor per 32-bit lane (held in both of its 16-bit halves); the products
// fit a byte.
FLASHGEN_AVX512_VNNI inline __m512i times_digit(__m512i v, __m512i digit) {
  const __m512i even = _mm512_mullo_epi16(_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), digit);
  const __m512i odd = _mm512_mullo_epi16(_mm512_srai_epi16(v, 8), digit);
  return _mm512_mask_blend_epi8(__mmask64(0xAAAAAAAAAAAAAAAAull), even, _mm512_slli_epi16(odd, 8));
}

// Digit t of sub-block j's scales of the tile's 16 rows, in both 16-bit halves of each row's lane.
template <int KI>
FLASHGEN_AVX512_VNNI inline __m512i scale_digit(const uint8_t* p, int j, int t) {
  constexpr AmxDigits dg = amx_digits<KI>();
  __m512i digit = _mm512_srai_epi32(sub_scale<KI>(p, j), t * dg.bits);
  if (t + 1 < dg.count) digit = _mm512_and_si512(digit, _mm512_set1_epi32((1 << dg.bits) - 1));
  return _mm512_or_si512(_mm512_and_si512(digit, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(digit, 16));
}

template <int KI>
FLASHGEN_AMX_INT8 void tile_amx(const QuantActs& x, int rows, const uint8_t* w, int64_t sbs, float* out, int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr AmxDigits dg = amx_digits<KI>();
  constexpr int nb = kd.super / kBlock, halves = kBlock / kd.sub, gps = kd.sub / 4, subs = kd.super / kd.sub;
  constexpr int step = kd.super < 64 ? kd.super : 64;  // features per tile product
  struct alignas(64) Line {
    uint8_t bytes[64];
  };
  thread_local std::vector<Line> planes;
  const int64_t lines = sbs * nb * 8;  // per digit plane: 4 features x 16 rows per line
  if (planes.size() < static_cast<size_t>(lines * dg.count)) planes.resize(lines * dg.count);
  for (int64_t blk = 0; blk < sbs * nb; ++blk) {
    const uint8_t* p = w + blk / nb * kd.tile_bytes();
    __m512i q[8];
    unpack512<KI>(p + blk % nb * kd.code_bytes(), q);
    for (int h = 0; h < halves; ++h) {  // the groups of sub-block j
      const int j = static_cast<int>(blk % nb * halves + h);
      __m512i digit[4];
      for (int t = 0; t < dg.count; ++t) digit[t] = kd.scales ? scale_digit<KI>(p, j, t) : _mm512_setzero_si512();
      for (int g = h * gps; g < (h + 1) * gps; ++g) {
        const __m512i v = _mm512_sub_epi8(q[g], _mm512_set1_epi8(static_cast<char>(kd.zero)));
        for (int t = 0; t < dg.count; ++t)
          _mm512_store_si512(planes.data() + t * lines + blk * 8 + g, kd.scales ? times_digit(v, digit[t]) : v);
      }
    }
  }
  alignas(64) int32_t c[4][kTileRows * kTileRows];
  __m512 acc[kTileRows];
  int configured = 0;  // activation rows of the loaded tile configuration (loading one costs ~10% of a call)
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    const int rg = std::min<int>(kTileRows, rows - r0);
    const QuantActs xr = offset(x, r0);
    if (rg != configured) {
      TileConfig cfg;
      cfg.rows[0] = rg, cfg.colsb[0] = step;
      cfg.rows[1] = step / 4, cfg.colsb[1] = 64;
      for (int t = 0; t < dg.count; ++t) cfg.rows[2 + t] = rg, cfg.colsb[2 + t] = 64;
      _tile_loadconfig(&cfg);
      configured = rg;
    }
    for (int r = 0; r < rg; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < sbs; ++s) {
      for (int t = 0; t < dg.count; ++t) sums_zero(t);
      for (int u = 0; u < kd.super / step; ++u) {
        _tile_loadd(0, xr.a + s * kd.super + u * step, xr.a_stride);
        const int64_t line = (s * nb + u * step / kBlock) * 8;
        for (int t = 0; t < dg.count; ++t) sums_add(t, planes.data() + t * lines + line);
      }
      for (int t = 0; t < dg.count; ++t) sums_store(t, c[t]);
      const uint8_t* p = w + s * kd.tile_bytes();
      const __m512 d = halfx16(p + kd.d_offset());
      const __m512 dmin = kd.mins ? halfx16(p + kd.dmin_offset()) : _mm512_setzero_ps();
      __m512 mnf[subs];
      for (int j = 0; j < subs; ++j) mnf[j] = sub_min<KI>(p, j);
      for (int r = 0; r < rg; ++r) {
        __m512i bracket = _mm512_load_si512(c[0] + r * kTileRows);
        for (int t = 1; t < dg.count; ++t)
          bracket = _mm512_add_epi32(bracket, _mm512_slli_epi32(_mm512_load_si512(c[t] + r * kTileRows), t * dg.bits));
        __m512 m = _mm512_setzero_ps();
        if constexpr (kd.mins)
          for (int j = 0; j < subs; ++j) m = _mm512_fmadd_ps(mnf[j], _mm512_set1_ps(xr.fsum[r * xr.isum_stride + s * subs + j]), m);
        acc[r] = finish512<KI>(acc[r], bracket, d, dmin, xr.d[r * xr.d_stride + s], m);
      }
    }
    for (int r = 0; r < rg; ++r) _mm512_storeu_ps(out + (r0 + r) * ldo, acc[r]);
  }
}

}  // namespace

bool amx_gemm(int64_t type, const QuantActs& x, int64_t m, const uint8_t* w, int64_t n, int64_t k, float* out) {
  bool done = false;
  with_kind(type, [&](auto KI) {
    constexpr Kind kd = kKinds[KI()];
    if constexpr (amx_digits<KI()>().count > 0) {
      const int64_t sbs = k / kd.super, stride = sbs * kd.tile_bytes();
      run_tiles<kRowChunk, 1>(x, m, n, k / kBlock, out, [&](int64_t t, auto, const QuantActs& xr, int rows, float* dst,
                                                            int64_t ldo) {
        tile_amx<KI()>(xr, rows, w + t * stride, sbs, dst, ldo);
      });
      done = true;
    }
  });
  return done;
}

}  // namespace flashgen::cpu::quant::ggml
