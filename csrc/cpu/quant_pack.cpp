// flashgen::int4_prepack / int8_prepack (canonical -> the CPU layout of quant.h) and int4_dequantize /
// int8_dequantize (CPU layout -> dense W (out_features, in_features)) for CPU tensors.
// Dequantization is exact in float32: w = fma(s, q, m) (one rounding, as the reference) and w = s * q, with
// float16 scales and offsets converted to float32 first (exact); other dtypes are rounded once from float32.
// Prepacking keeps the scales' dtype (float32 or float16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>

#include "cpu/quant.h"

namespace flashgen::cpu::quant {
namespace {

void check_canonical(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t rows,
                     int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must have shape (", rows,
              ", ", cols, "), got ", t.sizes());
}

// Position of feature k's code inside an int4 tile-block (byte, and whether it is the high nibble).
inline int64_t int4_byte(int64_t r, int64_t kk) { return (kk / 8) * 64 + r * 4 + kk % 4; }
inline bool int4_high(int64_t kk) { return kk % 8 >= 4; }
inline int64_t int8_byte(int64_t r, int64_t kk) { return (kk / 4) * 64 + r * 4 + kk % 4; }

// canonical (N, G) per-row values -> (T, G, 16), zero past N
at::Tensor tile_rows(const at::Tensor& v) {
  const int64_t n = v.size(0), g = v.size(1);
  at::Tensor out = at::zeros({tiles(n) * kTileRows, g}, v.options());
  out.narrow(0, 0, n).copy_(v);
  return out.view({tiles(n), kTileRows, g}).transpose(1, 2).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_prepack_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                                                                const at::Tensor& offsets, int64_t group_size) {
  const char* op = "flashgen::int4_prepack";
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, op,
              ": group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be (out_features, in_features / 2) uint8, got ", qweight.sizes());
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  TORCH_CHECK(n > 0 && k > 0 && k % group_size == 0, op, ": in_features ", k, " must be a positive multiple of group_size ",
              group_size);
  check_canonical(qweight, op, "qweight", at::kByte, n, k / 2);
  check_scale_dtypes(op, scales, &offsets);
  check_canonical(scales, op, "scales", scales.scalar_type(), n, k / group_size);
  check_canonical(offsets, op, "offsets", scales.scalar_type(), n, k / group_size);
  const at::Tensor q = qweight.contiguous();
  const int64_t kb = k / kBlock;
  at::Tensor out = at::zeros({tiles(n), kb, kInt4TileBytes}, q.options());
  const uint8_t* src = q.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      uint8_t* tile = dst + (row / kTileRows) * kb * kInt4TileBytes;
      for (int64_t kk = 0; kk < k; ++kk) {
        const uint8_t code = (src[row * (k / 2) + kk / 2] >> (4 * (kk % 2))) & 0xF;
        const int64_t kin = kk % kBlock;
        tile[(kk / kBlock) * kInt4TileBytes + int4_byte(row % kTileRows, kin)] |= code << (int4_high(kin) ? 4 : 0);
      }
    }
  });
  return {out, tile_rows(scales), tile_rows(offsets)};
}

std::tuple<at::Tensor, at::Tensor> int8_prepack_cpu(const at::Tensor& qweight, const at::Tensor& scales) {
  const char* op = "flashgen::int8_prepack";
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) > 0, op,
              ": qweight must be a non-empty (out_features, in_features) int8 tensor, got ", qweight.sizes());
  const int64_t n = qweight.size(0), k = qweight.size(1), kb = blocks(k);
  check_canonical(qweight, op, "qweight", at::kChar, n, k);
  TORCH_CHECK(scales.dim() == 2 && (scales.size(1) == 1 || (k % kBlock == 0 && scales.size(1) == kb)), op,
              ": scales must be (out_features, 1) per channel or (out_features, in_features / 32) per block of 32, got ",
              scales.sizes(), " for in_features ", k);
  check_scale_dtypes(op, scales);
  check_canonical(scales, op, "scales", scales.scalar_type(), n, scales.size(1));
  const at::Tensor q = qweight.contiguous();
  at::Tensor out = at::zeros({tiles(n), kb, kInt8TileBytes}, q.options());
  const int8_t* src = q.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t r = row % kTileRows;
      for (int64_t b = 0; b < kb; ++b) {
        int8_t* block = dst + ((row / kTileRows) * kb + b) * kInt8TileBytes;
        int32_t sum = 0;
        for (int64_t kk = 0; kk < kBlock && b * kBlock + kk < k; ++kk) {
          const int8_t w = src[row * k + b * kBlock + kk];
          block[int8_byte(r, kk)] = w;
          sum += w;
        }
        std::memcpy(block + kInt8CodeBytes + 4 * r, &sum, 4);
      }
    }
  });
  return {out, tile_rows(scales)};
}

void check_dequant_args(const char* op, int64_t n, int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(n > 0 && k > 0, op, ": out_features (", n, ") and in_features (", k, ") must be positive");
  TORCH_CHECK(at::isFloatingType(dtype), op, ": dtype must be a floating type, got ", dtype);
}

// w (n, k) float32 from rows made by row(r, w + r * k), then converted to dtype.
template <class Row>
at::Tensor dequantize_rows(const at::Tensor& like, int64_t n, int64_t k, at::ScalarType dtype, Row&& row) {
  at::Tensor w = at::empty({n, k}, like.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(r, wp + r * k);
  });
  return w.to(dtype);
}

at::Tensor int4_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                               int64_t group_size, int64_t n, int64_t k, at::ScalarType dtype) {
  const char* op = "flashgen::int4_dequantize";
  check_dequant_args(op, n, k, dtype);
  check_int4_packed(op, qweight, scales, offsets, k, n, group_size);
  return dequantize_rows(qweight, n, k, dtype, [&](int64_t r, float* out) {
    int4_packed_row(qweight, scales, offsets, group_size, k, r, out);
  });
}

at::Tensor int8_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales, int64_t n, int64_t k,
                               at::ScalarType dtype) {
  const char* op = "flashgen::int8_dequantize";
  check_dequant_args(op, n, k, dtype);
  check_int8_packed(op, qweight, scales, k, n);
  return dequantize_rows(qweight, n, k, dtype, [&](int64_t r, float* out) { int8_packed_row(qweight, scales, k, r, out); });
}

}  // namespace

void int4_packed_row(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                     int64_t group_size, int64_t k, int64_t row, float* out) {
  const int64_t t = row / kTileRows, r = row % kTileRows, kb = k / kBlock, groups = k / group_size;
  const uint8_t* tile = qweight.data_ptr<uint8_t>() + t * kb * kInt4TileBytes;
  with_scale_type(scales, [&](auto type) {
    using S = decltype(type);
    const S* s = scales.data_ptr<S>() + t * groups * kTileRows + r;
    const S* m = offsets.data_ptr<S>() + t * groups * kTileRows + r;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t kin = kk % kBlock, g = kk / group_size;
      const uint8_t byte = tile[(kk / kBlock) * kInt4TileBytes + int4_byte(r, kin)];
      const float code = static_cast<float>(int4_high(kin) ? byte >> 4 : byte & 0xF);
      out[kk] = std::fma(static_cast<float>(s[g * kTileRows]), code, static_cast<float>(m[g * kTileRows]));
    }
  });
}

void int8_packed_row(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, int64_t row, float* out) {
  const int64_t t = row / kTileRows, r = row % kTileRows, kb = blocks(k), sblocks = scales.size(1);
  const int8_t* tile = qweight.data_ptr<int8_t>() + t * kb * kInt8TileBytes;
  with_scale_type(scales, [&](auto type) {
    using S = decltype(type);
    const S* s = scales.data_ptr<S>() + t * sblocks * kTileRows + r;
    for (int64_t kk = 0; kk < k; ++kk)
      out[kk] = static_cast<float>(s[(sblocks == 1 ? 0 : kk / kBlock) * kTileRows]) *
                static_cast<float>(tile[(kk / kBlock) * kInt8TileBytes + int8_byte(r, kk % kBlock)]);
  });
}

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("int4_prepack", &int4_prepack_cpu);
  m.impl("int8_prepack", &int8_prepack_cpu);
  m.impl("int4_dequantize", &int4_dequantize_cpu);
  m.impl("int8_dequantize", &int8_dequantize_cpu);
}

}  // namespace flashgen::cpu::quant
