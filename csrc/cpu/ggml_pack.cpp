// flashgen::ggml_prepack (GGUF block bytes -> the tiled layout of ggml.h) and ggml_dequantize (tiled layout ->
// dense W) for CPU tensors. Each type's block is decoded once, at load, into codes, sub-block scales and mins
// (ggml-common.h's block structs; kernels/ggml.py has the same in PyTorch); dequantizing computes
// (d * sc) * (q - zero) - dmin * mn in float32, the operations and order of gguf-py's dequantizers, so the
// values are the file's, bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/ggml.h"

namespace flashgen::cpu::quant::ggml {

const Kind& kind_of(int64_t type, const char* op) {
  for (const Kind& k : kKinds)
    if (k.type == type) return k;
  TORCH_CHECK(false, op, ": GGML type ", type,
              " has no CPU kernel (supported: Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)");
}

namespace {

// One super-block of one row, decoded.
struct Decoded {
  uint8_t q[256];
  int8_t sc[16];
  uint8_t mn[16];
  uint16_t d, dmin;  // float16 bits
};

uint16_t half_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// K-quant 6-bit scale and min j of the 12-byte packing of Q4_K / Q5_K (get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* s, int8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = static_cast<int8_t>(s[j] & 63), *mn = s[j + 4] & 63;
  } else {
    *sc = static_cast<int8_t>((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void decode(int64_t type, const uint8_t* b, Decoded& o) {
  switch (type) {
    case kQ5_0:
    case kQ5_1: {  // d, (m), qh[4], qs[16]: element j < 16 low nibble of qs[j] + bit j of qh; j + 16 high nibble
      const int off = type == kQ5_0 ? 2 : 4;
      uint32_t qh;
      std::memcpy(&qh, b + off, 4);
      for (int j = 0; j < 16; ++j) {
        o.q[j] = (b[off + 4 + j] & 0xF) | (((qh >> j) & 1) << 4);
        o.q[j + 16] = (b[off + 4 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      o.sc[0] = 1, o.d = half_at(b);
      if (type == kQ5_1) o.mn[0] = 1, o.dmin = half_at(b + 2) ^ 0x8000;  // dmin = -m (a sign flip, exact)
      return;
    }
    case kQ2_K: {  // scales[16] (scale | min << 4), qs[64], d, dmin: value 128 n + 32 j + l in bits 2j of qs[32 n + l]
      for (int i = 0; i < 16; ++i) o.sc[i] = static_cast<int8_t>(b[i] & 0xF), o.mn[i] = b[i] >> 4;
      for (int n = 0; n < 2; ++n)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l) o.q[n * 128 + j * 32 + l] = (b[16 + n * 32 + l] >> (2 * j)) & 3;
      o.d = half_at(b + 80), o.dmin = half_at(b + 82);
      return;
    }
    case kQ4_0:
    case kQ4_1:
    case kIQ4_NL: {  // d, (m), qs[16] (value j low nibble, j + 16 high)
      const int off = type == kQ4_1 ? 4 : 2;
      for (int j = 0; j < 16; ++j) o.q[j] = b[off + j] & 0xF, o.q[j + 16] = b[off + j] >> 4;
      o.sc[0] = 1, o.d = half_at(b);
      if (type == kQ4_1) o.mn[0] = 1, o.dmin = half_at(b + 2) ^ 0x8000;
      return;
    }
    case kIQ4_XS: {  // d, scales_h (u16), scales_l[4], qs[128]: 8 sub-blocks of 32, scale ls - 32 of 6 bits
      const uint16_t sh = half_at(b + 2);
      for (int i = 0; i < 8; ++i) {
        o.sc[i] = static_cast<int8_t>((((b[4 + i / 2] >> (4 * (i % 2))) & 0xF) | (((sh >> (2 * i)) & 3) << 4)) - 32);
        for (int j = 0; j < 16; ++j) o.q[32 * i + j] = b[8 + 16 * i + j] & 0xF, o.q[32 * i + 16 + j] = b[8 + 16 * i + j] >> 4;
      }
      o.d = half_at(b);
      return;
    }
    case kQ3_K: {  // hmask[32], qs[64], scales[12], d
      const uint8_t *hm = b, *qs = b + 32, *s = b + 96;
      for (int i = 0; i < 16; ++i)
        o.sc[i] = static_cast<int8_t>((((s[i % 8] >> (4 * (i / 8))) & 0xF) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32);
      for (int n = 0; n < 2; ++n)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l)
            o.q[n * 128 + j * 32 + l] = ((qs[n * 32 + l] >> (2 * j)) & 3) | (((hm[l] >> (n * 4 + j)) & 1) << 2);
      o.d = half_at(b + 108);
      return;
    }
    case kQ4_K:
    case kQ5_K: {  // d, dmin, scales[12], (qh[32]), qs[128]
      const bool five = type == kQ5_K;
      const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
      for (int j = 0; j < 8; ++j) scale_min_k4(j, b + 4, o.sc + j, o.mn + j);
      for (int i = 0; i < 4; ++i)
        for (int h = 0; h < 2; ++h)
          for (int l = 0; l < 32; ++l)
            o.q[i * 64 + h * 32 + l] = ((qs[i * 32 + l] >> (4 * h)) & 0xF) |
                                       (five ? ((qh[l] >> (2 * i + h)) & 1) << 4 : 0);
      o.d = half_at(b), o.dmin = half_at(b + 2);
      return;
    }
    case kQ6_K: {  // ql[128], qh[64], scales int8[16], d
      const uint8_t *ql = b, *qh = b + 128;
      std::memcpy(o.sc, b + 192, 16);
      for (int n = 0; n < 2; ++n)
        for (int t = 0; t < 4; ++t)
          for (int l = 0; l < 32; ++l)
            o.q[n * 128 + t * 32 + l] = ((ql[n * 64 + (t % 2) * 32 + l] >> (4 * (t / 2))) & 0xF) |
                                        (((qh[n * 32 + l] >> (2 * t)) & 3) << 4);
      o.d = half_at(b + 208);
      return;
    }
  }
}

// Byte and bit of feature f (< 32) of tile row r in a plane with `bits` bits per code (4 or 2 lo, 1 or 2 hi).
inline int64_t plane_byte(int bits, int64_t r, int64_t f) {
  const int64_t g = f / 4, j = f % 4;
  return bits == 1 ? r * 4 + j : (g / (8 / bits)) * 64 + r * 4 + j;
}
inline int plane_shift(int bits, int64_t f) { return bits == 1 ? f / 4 : bits * ((f / 4) % (8 / bits)); }

// Row r's codes into the planes of each block of 32 (the byte formulas of plane_byte / plane_shift, written out
// byte by byte: prepacking a 1B-parameter file must take seconds).
void put_row(const Kind& kd, const Decoded& o, int64_t r, uint8_t* tile) {
  for (int64_t b = 0; b < kd.super / kBlock; ++b) {
    const uint8_t* c = o.q + b * kBlock;
    uint8_t *lo = tile + b * kd.code_bytes() + r * 4, *hi = lo + kd.lo_bytes();
    for (int j = 0; j < 4; ++j) {
      if (kd.lo_bits == 4) {
        for (int v = 0; v < 4; ++v) lo[v * 64 + j] = (c[8 * v + j] & 0xF) | (c[8 * v + 4 + j] & 0xF) << 4;
      } else {
        for (int v = 0; v < 2; ++v) {
          uint8_t byte = 0;
          for (int s = 0; s < 4; ++s) byte |= (c[4 * (4 * v + s) + j] & 3) << (2 * s);
          lo[v * 64 + j] = byte;
        }
      }
      if (kd.hi_bits == 1) {
        uint8_t byte = 0;
        for (int g = 0; g < 8; ++g) byte |= ((c[4 * g + j] >> kd.lo_bits) & 1) << g;
        hi[j] = byte;
      } else if (kd.hi_bits == 2) {
        for (int v = 0; v < 2; ++v) {
          uint8_t byte = 0;
          for (int s = 0; s < 4; ++s) byte |= ((c[4 * (4 * v + s) + j] >> kd.lo_bits) & 3) << (2 * s);
          hi[v * 64 + j] = byte;
        }
      }
    }
  }
  for (int64_t j = 0; j < kd.subs(); ++j) {
    uint8_t* at = tile + kd.sc_offset() + j * kTileRows + r;
    if (kd.nibble_scales) {
      *at = static_cast<uint8_t>(o.sc[j]) | o.mn[j] << 4;
      continue;
    }
    if (kd.scales) *at = static_cast<uint8_t>(o.sc[j]);
    if (kd.mn_plane()) tile[kd.mn_offset() + j * kTileRows + r] = o.mn[j];
  }
  std::memcpy(tile + kd.d_offset() + 2 * r, &o.d, 2);
  if (kd.mins) std::memcpy(tile + kd.dmin_offset() + 2 * r, &o.dmin, 2);
}

Decoded get_row(const Kind& kd, const uint8_t* tile, int64_t r) {
  Decoded o{};
  for (int64_t f = 0; f < kd.super; ++f) {
    const uint8_t* blk = tile + (f / kBlock) * kd.code_bytes();
    const int64_t fb = f % kBlock;
    const uint8_t lo = (blk[plane_byte(kd.lo_bits, r, fb)] >> plane_shift(kd.lo_bits, fb)) & ((1 << kd.lo_bits) - 1);
    const uint8_t hi = kd.hi_bits ? (blk[kd.lo_bytes() + plane_byte(kd.hi_bits, r, fb)] >> plane_shift(kd.hi_bits, fb)) &
                                        ((1 << kd.hi_bits) - 1)
                                  : 0;
    o.q[f] = lo | (hi << kd.lo_bits);
  }
  for (int64_t j = 0; j < kd.subs(); ++j) {
    const uint8_t sc = kd.scales ? tile[kd.sc_offset() + j * kTileRows + r] : 1;
    o.sc[j] = static_cast<int8_t>(kd.nibble_scales ? sc & 0xF : sc);
    o.mn[j] = !kd.mins ? 0 : !kd.mn_plane() ? 1 : kd.nibble_scales ? sc >> 4 : tile[kd.mn_offset() + j * kTileRows + r];
  }
  std::memcpy(&o.d, tile + kd.d_offset() + 2 * r, 2);
  if (kd.mins) std::memcpy(&o.dmin, tile + kd.dmin_offset() + 2 * r, 2);
  return o;
}

float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

at::Tensor ggml_prepack_cpu(const at::Tensor& blocks, int64_t type, int64_t k) {
  const char* op = "flashgen::ggml_prepack";
  const Kind& kd = kind_of(type, op);
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2, op,
              ": blocks must be a 2-D uint8 CPU tensor (out_features, bytes per row), got ", blocks.scalar_type(), " ",
              blocks.sizes(), " on ", blocks.device());
  TORCH_CHECK(k > 0 && k % kd.super == 0, op, ": in_features (", k, ") must be a positive multiple of the block size ",
              kd.super);
  const int64_t n = blocks.size(0), sbs = k / kd.super;
  TORCH_CHECK(n > 0 && blocks.size(1) == sbs * kd.block_bytes, op, ": blocks must have shape (out_features, ",
              sbs * kd.block_bytes, ") for in_features ", k, ", got ", blocks.sizes());
  const at::Tensor src = blocks.contiguous();
  at::Tensor out = at::zeros({tiles(n), sbs, kd.tile_bytes()}, src.options());  // rows past n stay zero
  const uint8_t* sp = src.data_ptr<uint8_t>();
  uint8_t* dp = out.data_ptr<uint8_t>();
  at::parallel_for(0, tiles(n), 1, [&](int64_t t0, int64_t t1) {
    Decoded o;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t row = t * kTileRows; row < std::min(n, (t + 1) * kTileRows); ++row)
        for (int64_t s = 0; s < sbs; ++s) {
          decode(type, sp + (row * sbs + s) * kd.block_bytes, o);
          put_row(kd, o, row % kTileRows, dp + (t * sbs + s) * kd.tile_bytes());
        }
  });
  return out;
}

at::Tensor ggml_dequantize_cpu(const at::Tensor& packed, int64_t type, int64_t n, int64_t k, at::ScalarType dtype) {
  const char* op = "flashgen::ggml_dequantize";
  TORCH_CHECK(at::isFloatingType(dtype), op, ": dtype must be a floating type, got ", dtype);
  check_packed(op, packed, type, k, n);
  at::Tensor w = at::empty({n, k}, packed.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) packed_row(packed, type, k, r, wp + r * k);
  });
  return w.to(dtype);
}

}  // namespace

void packed_row(const at::Tensor& packed, int64_t type, int64_t k, int64_t row, float* out) {
  const Kind& kd = kind_of(type, "ggml::packed_row");
  const int64_t sbs = k / kd.super;
  const uint8_t* tiles_p = packed.data_ptr<uint8_t>() + (row / kTileRows) * sbs * kd.tile_bytes();
  for (int64_t s = 0; s < sbs; ++s) {
    const Decoded o = get_row(kd, tiles_p + s * kd.tile_bytes(), row % kTileRows);
    const float d = half_to_float(o.d), dmin = kd.mins ? half_to_float(o.dmin) : 0.f;
    float* y = out + s * kd.super;
    for (int64_t f = 0; f < kd.super; ++f) {
      const int64_t j = f / kd.sub;
      const int code = kd.lut ? kIq4Values[o.q[f]] : int(o.q[f]) - kd.zero;
      const float v = (d * static_cast<float>(o.sc[j])) * static_cast<float>(code);
      y[f] = kd.mins ? v - dmin * static_cast<float>(o.mn[j]) : v;
    }
  }
}

void check_packed(const char* op, const at::Tensor& packed, int64_t type, int64_t k, int64_t n) {
  const Kind& kd = kind_of(type, op);
  TORCH_CHECK(n > 0, op, ": out_features must be positive, got ", n);
  TORCH_CHECK(k > 0 && k % kd.super == 0, op, ": in_features (", k, ") must be a positive multiple of the block size ",
              kd.super);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous(), op,
              ": packed must be a contiguous uint8 CPU tensor (from the CPU ggml_prepack), got ", packed.scalar_type(),
              " on ", packed.device());
  TORCH_CHECK(packed.sizes().equals({tiles(n), k / kd.super, kd.tile_bytes()}), op,
              ": packed must have the CPU prepacked shape (", tiles(n), ", ", k / kd.super, ", ", kd.tile_bytes(),
              "), got ", packed.sizes(), " (was it prepacked for this device with the same in/out features?)");
}

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("ggml_prepack", &ggml_prepack_cpu);
  m.impl("ggml_dequantize", &ggml_dequantize_cpu);
}

}  // namespace flashgen::cpu::quant::ggml
