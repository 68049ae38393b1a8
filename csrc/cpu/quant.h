// CPU layouts and kernels of the quantized matmuls (flashgen::int4_* / int8_*).
//
// Prepacked layouts (built by int4_prepack / int8_prepack from the canonical formats of kernels/quant.py).
// Output rows are grouped in tiles of 16 (T = ceil(N / 16) tiles; rows past N are zero) and input features
// in blocks of 32 (Kb = ceil(K / 32); features past K are zero). One tile-block is what one kernel step
// streams: 16 rows x 32 features, laid out so that 4 consecutive features of one row form one 32-bit lane,
// i.e. one 512-bit vector holds 16 rows x 4 features and a broadcast 4-byte activation lines up with it
// (vpdpbusd with AVX-512 VNNI; maddubs + madd on AVX2, which takes each 256-bit half = 8 rows).
//
//   int4 qweight uint8 (T, K/32, 256):  byte v*64 + r*4 + j  (v < 4, r < 16, j < 4) holds
//        low nibble  q[16t + r, 32b + 8v + j],  high nibble  q[16t + r, 32b + 8v + 4 + j]
//   int4 scales, offsets (T, K/g, 16): [t, i, r] = canonical [16t + r, i]
//   int8 qweight int8 (T, Kb, 576): bytes v*64 + r*4 + j (v < 8) hold w[16t + r, 32b + 4v + j];
//        bytes 512 + 4r .. 512 + 4r + 3 hold int32 sum_j w[16t + r, 32b + j] (the VNNI kernel feeds
//        activations as unsigned a + 128 and subtracts 128 * that sum)
//   int8 scales (T, 1, 16) per channel or (T, Kb, 16) per block of 32.
// Scales and offsets keep the canonical dtype, float32 or float16 (GGUF's own, half the bytes to stream); the
// kernels convert each 16 (or 8) of them to float32 as they load them, which is exact.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace flashgen::cpu::quant {

constexpr int64_t kTileRows = 16;
constexpr int64_t kBlock = 32;
constexpr int64_t kInt4TileBytes = 256;
constexpr int64_t kInt8TileBytes = 576;
constexpr int64_t kInt8CodeBytes = 512;

inline int64_t tiles(int64_t n) { return (n + kTileRows - 1) / kTileRows; }
inline int64_t blocks(int64_t k) { return (k + kBlock - 1) / kBlock; }

// Activations quantized to int8 per block of 32 features (blocks past K zero-padded), or per GGML super-block:
// a (M, Kb*32) int8, d (M, K / block) float32 block scales (x ~= d * a); for int4 also xsum (M, K/g), the sum of
// d * a over each weight group (for the offset term m * sum x); for GGML types isum (M, K / sub), the integer
// sums of a over each sub-block (the zero and min terms), and the same sums as float32 in fsum (exact: |isum| <=
// 32 * 127), converted once per call rather than once per tile.
struct QuantActs {
  const int8_t* a;
  const float* d;
  const float* xsum;
  int64_t a_stride, d_stride, xsum_stride;
  const int16_t* isum = nullptr;
  const float* fsum = nullptr;
  int64_t isum_stride = 0;  // of isum and fsum
};

// Rows of float32 activations x (m, k) quantized into caller buffers a (m, Kb*32), d (m, d_cols) and, for
// group > 0, xsum (m, k / group). per_row: one scale per row (W8A8), copied to all d_cols; else one per block
// of `block` features (32, or a GGML super-block; group > 0 needs 32).
QuantActs quantize_acts_into(const float* x, int64_t m, int64_t k, int64_t block, int64_t d_cols, bool per_row,
                             int64_t group, int8_t* a, float* d, float* xsum);

// out (M, N) float32 = activations x packed weights, by the AVX-512 VNNI kernel or the AVX2 one; S, the type of
// the scales and offsets, is float or at::Half (instantiated in quant_kernels.cpp).
// blocks_per_group: int4 g/32. int8: scale_blocks is the Kb of the packed scales (1 = per channel), and
// whole_row says the activation scale is one per row (W8A8): the kernel then accumulates the whole row in int32;
// with vnni, x's codes hold a + 128 (each byte's sign bit flipped), the unsigned operand of VNNI's products.
template <class S>
void int4_gemm(const QuantActs& x, int64_t m, const uint8_t* w, const S* scales, const S* offsets, int64_t n,
               int64_t kb, int64_t blocks_per_group, float* out, bool vnni);
template <class S>
void int8_gemm(const QuantActs& x, int64_t m, const int8_t* w, const S* scales, int64_t scale_blocks, int64_t n,
               int64_t kb, bool whole_row, float* out, bool vnni);
bool use_vnni();  // AVX-512 VNNI present and not disabled by FLASHGEN_QUANT_ISA=avx2
bool use_amx();  // AMX int8 present and not disabled by FLASHGEN_QUANT_ISA=avx2 or vnni
bool use_avx512();  // AVX-512 present and not disabled so

// Input checks shared by the ops and the decoder step (TORCH_CHECK with `op` in the message); k, n are the
// in / out features. check_int8_packed returns the scale blocks (1 = per channel).
// check_scale_dtypes: scales float32 or float16 and, when given, offsets of the same dtype.
void check_scale_dtypes(const char* op, const at::Tensor& scales, const at::Tensor* offsets = nullptr);
void check_int4_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                       int64_t k, int64_t n, int64_t group_size);
int64_t check_int8_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scales, int64_t k, int64_t n);
void check_bias(const at::Tensor& bias, int64_t n, const char* op);

// f(S{}) with S the C++ type of checked scales: float (float32) or at::Half (float16).
template <class F>
void with_scale_type(const at::Tensor& scales, F&& f) {
  if (scales.scalar_type() == at::kHalf)
    f(at::Half{});
  else
    f(float{});
}

// Buffers for the quantized activations, grown on demand and reused across calls.
class ActScratch {
 public:
  int8_t* a(int64_t m, int64_t k) { return grow(a_, m * blocks(k) * kBlock); }
  float* d(int64_t count) { return grow(d_, count); }
  float* xsum(int64_t count) { return grow(xsum_, count); }
  float* fsum(int64_t count) { return grow(fsum_, count); }
  int16_t* isum(int64_t count) { return grow(isum_, count); }

 private:
  template <class T>
  static T* grow(std::vector<T>& v, int64_t count) {
    if (int64_t(v.size()) < count) v.resize(count);
    return v.data();
  }
  std::vector<int8_t> a_;
  std::vector<float> d_, xsum_, fsum_;
  std::vector<int16_t> isum_;
};

// Row `row` of a checked prepacked weight as k float32 values, exactly as the dequantize ops give it (they are
// made of these rows); also the lookup of a quantized token table.
void int4_packed_row(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                     int64_t group_size, int64_t k, int64_t row, float* out);
void int8_packed_row(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, int64_t row, float* out);

// y (m, n) float32 = x (m, k) W^T for checked prepacked weights (no bias), with float32 rows x.
void int4_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& offsets, int64_t group_size, int64_t n, float* y, ActScratch& scratch);
void int8_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& qweight, const at::Tensor& scales,
                      int64_t n, bool dynamic, float* y, ActScratch& scratch);
// y (m, n) float32 = x (m, k) W^T for a float16 / bfloat16 W (n, k) kept 16-bit (checked by check_half): exact
// weights, float32 products, each row's sums independent of the other rows (half_kernels.cpp).
void half_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& w, int64_t n, float* y);
// The same for a contiguous float32 W (n, k).
void float_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& w, int64_t n, float* y);
void check_half(const char* op, const at::Tensor& w, int64_t k, int64_t n);

}  // namespace flashgen::cpu::quant
