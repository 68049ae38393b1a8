// GGML block formats on the CPU (flashgen::ggml_prepack / ggml_linear / ggml_dequantize): what each type's
// weights mean, and the tiled layout the kernels stream.
//
// Every supported type is, per super-block of S weights of one row (S = 256 for K-quants, 32 otherwise),
//   w[i] = d * sc[j] * (v(q[i]) - zero) - dmin * mn[j]        (j = i / sub, the sub-block of `sub` weights)
// with unsigned codes q of lo_bits + hi_bits bits, v(q) = q (or kIq4Values[q] for IQ4_NL / IQ4_XS), int8
// sub-block scales sc (1 where the type has none), uint8 sub-block mins mn (types with mins), and float16 d,
// dmin per super-block. Q4_1's and Q5_1's float min per block of 32 is dmin = -m with mn = 1. kernels/ggml.py holds the
// same definitions (the reference dequantizers).
//
// Prepacked layout: uint8 (T, K / S, kind.tile_bytes) with T = ceil(N / 16) tiles of 16 output rows (rows past
// N are zero). One (tile, super-block) holds, in order:
//   codes, per block b of 32 features: the lo plane, then the hi plane (if any), where for feature f = 4g + j
//   (group g < 8, j < 4) of row r:
//     lo4 (256 bytes): byte (g / 2) * 64 + r * 4 + j, nibble g % 2          (the int4 layout of quant.h)
//     lo2 (128 bytes): byte (g / 4) * 64 + r * 4 + j, bits 2 (g % 4) .. +1
//     hi1 (64 bytes):  byte r * 4 + j, bit g
//     hi2 (128 bytes): byte (g / 4) * 64 + r * 4 + j, bits 2 (g % 4) .. +1
//   so a 64-byte vector holds 4 features x 16 rows, lined up with a broadcast 4-byte activation (vpdpbusd);
//   sc int8 (S / sub, 16) if the type has sub-block scales; mn uint8 (S / sub, 16) if it has mins (Q2_K: one
//   byte sc | mn << 4 per sub-block, as in its file; none for Q4_1 / Q5_1, whose mn is 1); d float16 (16); dmin
//   float16 (16) if it has mins.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "cpu/quant.h"

namespace flashgen::cpu::quant::ggml {

// GGML type ids (ggml.h's enum ggml_type, gguf-py's GGMLQuantizationType)
enum Type : int64_t {
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23
};

// IQ4_NL / IQ4_XS: the 4-bit codes index this table of values (kvalues_iq4nl)
inline constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

struct Kind {
  int64_t type, super, block_bytes;  // weights and file bytes per super-block
  int lo_bits, hi_bits, sub, zero;
  bool scales, mins;
  bool lut = false;            // codes are indices into kIq4Values (w = d sc kIq4Values[q])
  bool nibble_scales = false;  // Q2_K: scale | min << 4 in one byte per sub-block (the file's own packing)

  constexpr int64_t lo_bytes() const { return lo_bits == 4 ? 256 : 128; }
  constexpr int64_t hi_bytes() const { return hi_bits * 64; }
  constexpr int64_t code_bytes() const { return lo_bytes() + hi_bytes(); }  // per block of 32, per tile
  constexpr int64_t subs() const { return super / sub; }
  // mins of their own bytes; a float min per block (Q4_1, Q5_1) has mn = 1, not stored
  constexpr bool mn_plane() const { return mins && super != kBlock; }
  constexpr int64_t sc_offset() const { return super / kBlock * code_bytes(); }
  constexpr int64_t mn_offset() const { return nibble_scales ? sc_offset() : sc_offset() + (scales ? subs() * kTileRows : 0); }
  constexpr int64_t d_offset() const { return mn_offset() + (mn_plane() ? subs() * kTileRows : 0); }
  constexpr int64_t dmin_offset() const { return d_offset() + 2 * kTileRows; }
  constexpr int64_t tile_bytes() const { return d_offset() + (mins ? 4 : 2) * kTileRows; }
};

// Q4_1's and Q5_1's min is a float per block (w = d q + m): the mins machinery with dmin = -m and mn = 1.
inline constexpr Kind kKinds[] = {
    {kQ4_0, 32, 18, 4, 0, 32, 8, false, false},      {kQ4_1, 32, 20, 4, 0, 32, 0, false, true},
    {kQ5_0, 32, 22, 4, 1, 32, 16, false, false},     {kQ5_1, 32, 24, 4, 1, 32, 0, false, true},
    {kQ2_K, 256, 84, 2, 0, 16, 0, true, true, false, true},
    {kQ3_K, 256, 110, 2, 1, 16, 4, true, false},     {kQ4_K, 256, 144, 4, 0, 32, 0, true, true},
    {kQ5_K, 256, 176, 4, 1, 32, 0, true, true},      {kQ6_K, 256, 210, 4, 2, 16, 32, true, false},
    {kIQ4_NL, 32, 18, 4, 0, 32, 0, false, false, true}, {kIQ4_XS, 256, 136, 4, 0, 32, 0, true, false, true},
};

// The kind of a GGML type id; TORCH_CHECK names `op` when the type has no CPU kernel.
const Kind& kind_of(int64_t type, const char* op);

// f(std::integral_constant<int, index into kKinds>) for the kind of `type` (the kernels are compiled per kind).
template <class F>
void with_kind(int64_t type, F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((kKinds[I].type == type ? (f(std::integral_constant<int, I>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, sizeof(kKinds) / sizeof(Kind)>{});
}

// Checks of a packed weight shared by the ops and the decoder step.
void check_packed(const char* op, const at::Tensor& packed, int64_t type, int64_t k, int64_t n);

// Row `row` of a checked packed weight as k float32 values (as ggml_dequantize gives them).
void packed_row(const at::Tensor& packed, int64_t type, int64_t k, int64_t row, float* out);

// y (m, n) float32 = x (m, k) W^T for a checked packed weight (no bias).
void linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& packed, int64_t type, int64_t n, float* y,
                 ActScratch& scratch);

}  // namespace flashgen::cpu::quant::ggml
