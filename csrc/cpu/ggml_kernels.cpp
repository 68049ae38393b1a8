// GEMM kernels over the GGML tiles of ggml.h: int8 activations (per block of 32, quant.h) x GGML codes.
//
// Per super-block, tile row n and activation row r, with x' = d_a a the rounded activations and xs_j the sum of
// x' over sub-block j:
//   y[r, n] += d[n] * sum_j sc[n, j] * (d_a * dot_j(a, q[n]) - zero * xs_j) - dmin[n] * sum_j mn[n, j] * xs_j
// The integer dot products run on unsigned codes (vpdpbusd, or maddubs on AVX2, whose int16 pair sums are added
// in int16 for as many groups as the code width allows), the rest in float32 once per sub-block. A tile-block's codes are
// unpacked once per call into 8 vectors of 4 features x 16 rows and serve the call's R activation rows.
#include <immintrin.h>

#include "cpu/cpu_features.h"
#include "cpu/ggml.h"
#include "cpu/tile_driver.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace flashgen::cpu::quant::ggml {
namespace {

constexpr int kVnniRows = 4, kAvx2Rows = 4;

// Sum of the rounded activations over sub-block j of `sub` features (xsum holds one per 16).
inline float sub_sum(const QuantActs& x, int r, int64_t first16, int sub) {
  const float* s = x.xsum + r * x.xsum_stride + first16;
  return sub == 16 ? s[0] : s[0] + s[1];
}

// ---------------------------------------------------------------- AVX-512 VNNI
// Codes of a tile-block: q[g] holds features 4g .. 4g + 3 of the 16 rows.
template <int KI>
FLASHGEN_AVX512_VNNI inline void unpack512(const uint8_t* c, __m512i q[8]) {
  constexpr Kind kd = kKinds[KI];
  if constexpr (kd.lo_bits == 4) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int v = 0; v < 4; ++v) {
      const __m512i raw = _mm512_loadu_si512(c + v * 64);
      q[2 * v] = _mm512_and_si512(raw, m4), q[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    }
  } else {
    const __m512i m2 = _mm512_set1_epi8(0x03);
    for (int v = 0; v < 2; ++v) {
      const __m512i raw = _mm512_loadu_si512(c + v * 64);
      for (int s = 0; s < 4; ++s) q[4 * v + s] = _mm512_and_si512(_mm512_srli_epi16(raw, 2 * s), m2);
    }
  }
  if constexpr (kd.hi_bits == 1) {  // bit g of each byte -> bit lo_bits of group g's codes
    const __m512i h = _mm512_loadu_si512(c + kd.lo_bytes()), bit = _mm512_set1_epi8(1 << kd.lo_bits);
    for (int g = 0; g < 8; ++g) {
      const __m512i moved = g >= kd.lo_bits ? _mm512_srli_epi16(h, g - kd.lo_bits) : _mm512_slli_epi16(h, kd.lo_bits - g);
      q[g] = _mm512_or_si512(q[g], _mm512_and_si512(moved, bit));
    }
  } else if constexpr (kd.hi_bits == 2) {  // bits 2s, 2s + 1 -> bits 4, 5
    const __m512i bits = _mm512_set1_epi8(0x30);
    for (int v = 0; v < 2; ++v) {
      const __m512i h = _mm512_loadu_si512(c + kd.lo_bytes() + v * 64);
      const __m512i moved[4] = {_mm512_slli_epi16(h, 4), _mm512_slli_epi16(h, 2), h, _mm512_srli_epi16(h, 2)};
      for (int s = 0; s < 4; ++s) q[4 * v + s] = _mm512_or_si512(q[4 * v + s], _mm512_and_si512(moved[s], bits));
    }
  }
}

FLASHGEN_AVX512_VNNI inline __m512 int8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
FLASHGEN_AVX512_VNNI inline __m512 uint8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
FLASHGEN_AVX512_VNNI inline __m512 halfx16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The IQ4 table as unsigned bytes (value + 128) in every 128-bit lane, for vpshufb: its zero is then 128.
inline constexpr int kLutZero = 128;

template <int KI, int R>
FLASHGEN_AVX512_VNNI void tile_vnni(const QuantActs& x, const uint8_t* w, int64_t sbs, float* out, int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr int nb = kd.super / kBlock, halves = kBlock / kd.sub, gps = kd.sub / 4;
  constexpr int zero = kd.lut ? kLutZero : kd.zero;
  alignas(16) uint8_t lut_bytes[16];
  for (int i = 0; i < 16; ++i) lut_bytes[i] = static_cast<uint8_t>(kIq4Values[i] + kLutZero);
  const __m512i lut = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lut_bytes)));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < sbs; ++s) {
    const uint8_t* p = w + s * kd.tile_bytes();
    __m512 sacc[R], macc[R];
    for (int r = 0; r < R; ++r) sacc[r] = _mm512_setzero_ps(), macc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      __m512i q[8];
      unpack512<KI>(p + b * kd.code_bytes(), q);
      if constexpr (kd.lut)
        for (int g = 0; g < 8; ++g) q[g] = _mm512_shuffle_epi8(lut, q[g]);
      const int64_t blk = s * nb + b;
      for (int h = 0; h < halves; ++h) {
        const int j = b * halves + h;
        __m512 scf = _mm512_setzero_ps(), mnf = _mm512_setzero_ps();
        if constexpr (kd.nibble_scales) {
          const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kd.sc_offset() + j * kTileRows)));
          scf = _mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xF)));
          mnf = _mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4));
        } else {
          if constexpr (kd.scales) scf = int8x16(p + kd.sc_offset() + j * kTileRows);
          if constexpr (kd.mins) mnf = uint8x16(p + kd.mn_offset() + j * kTileRows);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* a = x.a + r * x.a_stride + blk * kBlock;
          __m512i id = _mm512_setzero_si512();
          for (int g = h * gps; g < (h + 1) * gps; ++g) id = _mm512_dpbusd_epi32(id, q[g], _mm512_set1_epi32(load4(a + 4 * g)));
          const float xs = sub_sum(x, r, blk * 2 + h, kd.sub);
          const __m512 da = _mm512_set1_ps(x.d[r * x.d_stride + blk]);
          const __m512 t = zero ? _mm512_fmsub_ps(_mm512_cvtepi32_ps(id), da, _mm512_set1_ps(zero * xs))
                                : _mm512_mul_ps(_mm512_cvtepi32_ps(id), da);
          sacc[r] = kd.scales ? _mm512_fmadd_ps(t, scf, sacc[r]) : _mm512_add_ps(t, sacc[r]);
          if constexpr (kd.mins) macc[r] = _mm512_fmadd_ps(mnf, _mm512_set1_ps(xs), macc[r]);
        }
      }
    }
    const __m512 d = halfx16(p + kd.d_offset());
    const __m512 dmin = kd.mins ? halfx16(p + kd.dmin_offset()) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(d, sacc[r], acc[r]);
      if constexpr (kd.mins) acc[r] = _mm512_fnmadd_ps(dmin, macc[r], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

// ---------------------------------------------------------------- AVX2 (each 256-bit half: 8 rows)
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <int KI>
inline void unpack256(const uint8_t* c, __m256i q[8]) {
  constexpr Kind kd = kKinds[KI];
  if constexpr (kd.lo_bits == 4) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int v = 0; v < 4; ++v) {
      const __m256i raw = load256(c + v * 64);
      q[2 * v] = _mm256_and_si256(raw, m4), q[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    }
  } else {
    const __m256i m2 = _mm256_set1_epi8(0x03);
    for (int v = 0; v < 2; ++v) {
      const __m256i raw = load256(c + v * 64);
      for (int s = 0; s < 4; ++s) q[4 * v + s] = _mm256_and_si256(_mm256_srli_epi16(raw, 2 * s), m2);
    }
  }
  if constexpr (kd.hi_bits == 1) {
    const __m256i h = load256(c + kd.lo_bytes()), bit = _mm256_set1_epi8(1 << kd.lo_bits);
    for (int g = 0; g < 8; ++g) {
      const __m256i moved = g >= kd.lo_bits ? _mm256_srli_epi16(h, g - kd.lo_bits) : _mm256_slli_epi16(h, kd.lo_bits - g);
      q[g] = _mm256_or_si256(q[g], _mm256_and_si256(moved, bit));
    }
  } else if constexpr (kd.hi_bits == 2) {
    const __m256i bits = _mm256_set1_epi8(0x30);
    for (int v = 0; v < 2; ++v) {
      const __m256i h = load256(c + kd.lo_bytes() + v * 64);
      const __m256i moved[4] = {_mm256_slli_epi16(h, 4), _mm256_slli_epi16(h, 2), h, _mm256_srli_epi16(h, 2)};
      for (int s = 0; s < 4; ++s) q[4 * v + s] = _mm256_or_si256(q[4 * v + s], _mm256_and_si256(moved[s], bits));
    }
  }
}

inline __m256 int8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 uint8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 halfx8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// maddubs lanes of a run of groups summed in int16: each lane adds 2 products of at most max_code * 127.
constexpr int run16(const Kind& kd, int gps) {
  const int max_code = kd.lut ? 127 : (1 << (kd.lo_bits + kd.hi_bits)) - 1;
  int run = 1;
  while (run * 2 <= gps && run * 2 * 2 * max_code * 127 <= 32767) run *= 2;
  return run;
}

template <int KI, int R>
void tile_avx2(const QuantActs& x, const uint8_t* w, int64_t sbs, float* out, int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr int nb = kd.super / kBlock, halves = kBlock / kd.sub, gps = kd.sub / 4, run = run16(kd, gps);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
  for (int rh = 0; rh < 2; ++rh) {  // rows 0-7, then 8-15 of the tile
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < sbs; ++s) {
      const uint8_t* p = w + s * kd.tile_bytes();
      __m256 sacc[R], macc[R];
      for (int r = 0; r < R; ++r) sacc[r] = _mm256_setzero_ps(), macc[r] = _mm256_setzero_ps();
      for (int b = 0; b < nb; ++b) {
        __m256i q[8], qs[8];  // qs: for the IQ4 table's signed values v, |v| in q and sign(v) in qs (maddubs
                              // multiplies unsigned by signed bytes)
        unpack256<KI>(p + b * kd.code_bytes() + rh * 32, q);
        if constexpr (kd.lut)
          for (int g = 0; g < 8; ++g) qs[g] = _mm256_shuffle_epi8(lut, q[g]), q[g] = _mm256_abs_epi8(qs[g]);
        const int64_t blk = s * nb + b;
        for (int h = 0; h < halves; ++h) {
          const int j = b * halves + h;
          __m256 scf = _mm256_setzero_ps(), mnf = _mm256_setzero_ps();
          if constexpr (kd.nibble_scales) {
            const __m256i raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + kd.sc_offset() + j * kTileRows + rh * 8)));
            scf = _mm256_cvtepi32_ps(_mm256_and_si256(raw, _mm256_set1_epi32(0xF)));
            mnf = _mm256_cvtepi32_ps(_mm256_srli_epi32(raw, 4));
          } else {
            if constexpr (kd.scales) scf = int8x8(p + kd.sc_offset() + j * kTileRows + rh * 8);
            if constexpr (kd.mins) mnf = uint8x8(p + kd.mn_offset() + j * kTileRows + rh * 8);
          }
          for (int r = 0; r < R; ++r) {
            const int8_t* a = x.a + r * x.a_stride + blk * kBlock;
            // int16 pair sums of up to `run` maddubs stay exact (kRun16), then widen to int32 once per run
            __m256i id = _mm256_setzero_si256();
            for (int g0 = h * gps; g0 < (h + 1) * gps; g0 += run) {
              __m256i s16 = _mm256_setzero_si256();
              for (int g = g0; g < g0 + run; ++g) {
                __m256i av = _mm256_set1_epi32(load4(a + 4 * g));
                if constexpr (kd.lut) av = _mm256_sign_epi8(av, qs[g]);
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(q[g], av));
              }
              id = _mm256_add_epi32(id, _mm256_madd_epi16(s16, ones));
            }
            const float xs = sub_sum(x, r, blk * 2 + h, kd.sub);
            const __m256 da = _mm256_set1_ps(x.d[r * x.d_stride + blk]);
            const __m256 t = kd.zero ? _mm256_fmsub_ps(_mm256_cvtepi32_ps(id), da, _mm256_set1_ps(kd.zero * xs))
                                     : _mm256_mul_ps(_mm256_cvtepi32_ps(id), da);
            sacc[r] = kd.scales ? _mm256_fmadd_ps(t, scf, sacc[r]) : _mm256_add_ps(t, sacc[r]);
            if constexpr (kd.mins) macc[r] = _mm256_fmadd_ps(mnf, _mm256_set1_ps(xs), macc[r]);
          }
        }
      }
      const __m256 d = halfx8(p + kd.d_offset() + rh * 16);
      const __m256 dmin = kd.mins ? halfx8(p + kd.dmin_offset() + rh * 16) : _mm256_setzero_ps();
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(d, sacc[r], acc[r]);
        if constexpr (kd.mins) acc[r] = _mm256_fnmadd_ps(dmin, macc[r], acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + rh * 8, acc[r]);
  }
}

}  // namespace

template <int KI>
void gemm(const QuantActs& x, int64_t m, const uint8_t* w, int64_t n, int64_t k, float* out, bool vnni) {
  constexpr Kind kd = kKinds[KI];
  const int64_t sbs = k / kd.super, stride = sbs * kd.tile_bytes();
  if (vnni)
    run_tiles<kVnniRows, 1>(x, m, n, k / kBlock, out, [&](int64_t t, auto, const QuantActs& xr, auto R, float* dst,
                                                          int64_t ldo) { tile_vnni<KI, R()>(xr, w + t * stride, sbs, dst, ldo); });
  else
    run_tiles<kAvx2Rows, 1>(x, m, n, k / kBlock, out, [&](int64_t t, auto, const QuantActs& xr, auto R, float* dst,
                                                          int64_t ldo) { tile_avx2<KI, R()>(xr, w + t * stride, sbs, dst, ldo); });
}

void linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& packed, int64_t type, int64_t n, float* y,
                 ActScratch& scratch) {
  if (m == 0) return;
  const int64_t kb = k / kBlock, k16 = k / 16;
  QuantActs acts = quantize_acts_into(x, m, k, kb, false, 0, scratch.a(m, k), scratch.d(m * kb), nullptr);
  float* xs = scratch.xsum(m * k16);
  for (int64_t r = 0; r < m; ++r)  // sums of x' = d a per 16 features (the zero and min terms)
    for (int64_t i = 0; i < k16; ++i) {
      const int8_t* a = acts.a + r * acts.a_stride + i * 16;
      int32_t sum = 0;
      for (int e = 0; e < 16; ++e) sum += a[e];
      xs[r * k16 + i] = acts.d[r * acts.d_stride + i / 2] * static_cast<float>(sum);
    }
  acts.xsum = xs, acts.xsum_stride = k16;
  with_kind(type, [&](auto KI) { gemm<KI()>(acts, m, packed.data_ptr<uint8_t>(), n, k, y, use_vnni()); });
}

}  // namespace flashgen::cpu::quant::ggml
