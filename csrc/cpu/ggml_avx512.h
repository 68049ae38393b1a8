// AVX-512 helpers shared by the VNNI and AMX kernels over the GGML tiles of ggml.h (ggml_kernels.cpp,
// ggml_amx.cpp): unpacking a tile-block's codes, its scales and mins, and the float work of a super-block.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/cpu_features.h"
#include "cpu/ggml.h"
#include "cpu/quant.h"

namespace flashgen::cpu::quant::ggml {

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
FLASHGEN_AVX512_VNNI inline __m512i iq4_lut() {
  alignas(64) uint8_t bytes[64];
  for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>(kIq4Values[i % 16] + kLutZero);
  return _mm512_load_si512(bytes);
}

// Sub-block j's scales of the tile's 16 rows as int32 (1 where the type has none).
template <int KI>
FLASHGEN_AVX512_VNNI inline __m512i sub_scale(const uint8_t* p, int j) {
  constexpr Kind kd = kKinds[KI];
  if constexpr (!kd.scales) return _mm512_set1_epi32(1);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kd.sc_offset() + j * kTileRows));
  if constexpr (kd.nibble_scales) return _mm512_and_si512(_mm512_cvtepu8_epi32(raw), _mm512_set1_epi32(0xF));
  return _mm512_cvtepi8_epi32(raw);
}

// Sub-block j's mins of the tile's 16 rows as floats (1 where the type's min is a float per block).
template <int KI>
FLASHGEN_AVX512_VNNI inline __m512 sub_min(const uint8_t* p, int j) {
  constexpr Kind kd = kKinds[KI];
  if constexpr (!kd.mn_plane()) return _mm512_set1_ps(1.f);
  if constexpr (kd.nibble_scales)
    return _mm512_cvtepi32_ps(_mm512_srli_epi32(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kd.sc_offset() + j * kTileRows))), 4));
  return uint8x16(p + kd.mn_offset() + j * kTileRows);
}

// The float work of a super-block, shared by the VNNI and AMX kernels and the AVX2 one's finish_half: with the
// bracket I = sum_j sc_j (dot_j - zero is_j) exact in int32 and the min term M = sum_j mn_j is_j (exact in float32:
// |M| < 2^24), acc = fma(d d_a, I, acc) - dmin d_a M.
template <int KI>
FLASHGEN_AVX512_VNNI inline __m512 finish512(__m512 acc, __m512i bracket, __m512 d, __m512 dmin, float da, __m512 m) {
  acc = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(da)), _mm512_cvtepi32_ps(bracket), acc);
  if constexpr (kKinds[KI].mins) acc = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(da)), m, acc);
  return acc;
}

// y (m, n) = x W^T by the AMX kernel (ggml_amx.cpp), for a type that has one; returns false for the others.
bool amx_gemm(int64_t type, const QuantActs& x, int64_t m, const uint8_t* w, int64_t n, int64_t k, float* out);

}  // namespace flashgen::cpu::quant::ggml
