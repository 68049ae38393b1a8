// int4 / int8 weight-only GEMV for decode (M = 1..8 rows of activations): flashgen_cuda::int4_linear and
// flashgen_cuda::int8_linear, the same schemas (and the same CUDA weight layout) as flashgen::int4_linear /
// int8_linear. kernels/triton/quant.py routes small M here when FLASHGEN_CUDA_BACKEND=cuda.
//
// Math: out[m, n] = sum_k x[m, k] * w[n, k] + bias[n], float32 accumulation, output in x's dtype, with
//   int4: w[n, k] = fma(q[n, k], s[n, k / g], off[n, k / g])  (q in [0, 15], g in {32, 64, 128})
//   int8: w[n, k] = q[n, k] * s[n, k / 32]  (blocks of 32), or q[n, k] with s[n] applied to the row's sum.
// The same float32 values as the reference's dequantized weight.
//
// Layout (the canonical one, see kernels/triton/quant.py): qweight row n is K/2 (int4: code 2j in the low
// nibble of byte j) or K (int8) contiguous bytes. One warp owns one output feature n: lane l reads 16-byte
// chunks l, l + 32, ... of row n (a warp covers 512 contiguous bytes per step: coalesced, streamed past L1),
// dequantizes the 32 (int4) or 16 (int8) codes in registers and multiplies them with the M activation rows,
// which every warp re-reads through the read-only cache (x is small and stays in L1/L2). A chunk never
// straddles a group (its 32 / 16 codes start at a multiple of 32 / 16 and groups are multiples of 32), so it
// needs one scale. The M partial sums are reduced across the warp with shuffles.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv.cuh"

namespace {

using namespace flashgen_gemv;

// Dequantizes one 16-byte chunk into kCodes float32 weights.
//   INT4: 32 codes, w = fma(q, s, off). INT8 with blocks: 16 codes, w = q * s. INT8 per channel: w = q (the
//   channel scale multiplies the final sum).
template <bool INT4>
struct Chunk {
  static constexpr int kCodes = INT4 ? 32 : 16;
  static __device__ __forceinline__ void dequantize(const uint4& v, float s, float off, bool scaled, float* w) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
      if constexpr (INT4) {
        w[2 * i] = fmaf(static_cast<float>(byte & 0xFu), s, off);
        w[2 * i + 1] = fmaf(static_cast<float>(byte >> 4), s, off);
      } else {
        const float q = static_cast<float>(static_cast<int8_t>(byte));
        w[i] = scaled ? q * s : q;
      }
    }
  }
};

// group: int4 group size; int8: 32 for block scales, 0 for one scale per output channel.
template <typename T, bool INT4>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    qgemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const float* __restrict__ scales,
                 const float* __restrict__ offsets, const float* __restrict__ bias, T* __restrict__ out, int M, int N,
                 int K, int group) {
  using C = Chunk<INT4>;
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const int64_t row_bytes = INT4 ? K / 2 : K;
  const int chunks = static_cast<int>(row_bytes / kChunk);
  const uint8_t* wrow = qweight + n * row_bytes;
  const int groups = group ? K / group : 1;
  const float* srow = scales + static_cast<int64_t>(n) * groups;
  const float* orow = INT4 ? offsets + static_cast<int64_t>(n) * groups : nullptr;

  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;

  for_each_chunk(wrow, chunks, lane, [&](int c, const uint4& packed) {
    const int k0 = c * C::kCodes;
    const int gi = group ? k0 / group : 0;
    float w[C::kCodes];
    C::dequantize(packed, group ? __ldg(srow + gi) : 1.f, INT4 ? __ldg(orow + gi) : 0.f, group != 0, w);
    accumulate_rows<T, C::kCodes>(x, M, K, k0, w, acc);
  });
  store_rows<T>(acc, M, N, n, group ? 1.f : __ldg(scales + n), bias, out);
}

template <bool INT4>
at::Tensor launch(const Rows& r, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const at::Tensor* offsets, const at::Tensor& bias, int64_t n, int group) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  if (r.m == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* off_ptr = offsets ? offsets->data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(x.scalar_type(), "flashgen_cuda::qgemv",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       qgemv_kernel<at::Half, INT4><<<grid, block, 0, stream>>>(
                           r.x.data_ptr<at::Half>(), qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), off_ptr,
                           bias_ptr, out.data_ptr<at::Half>(), r.m, n, r.k, group);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       qgemv_kernel<at::BFloat16, INT4><<<grid, block, 0, stream>>>(
                           r.x.data_ptr<at::BFloat16>(), qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                           off_ptr, bias_ptr, out.data_ptr<at::BFloat16>(), r.m, n, r.k, group);
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_size, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
  const Rows r = check_x(x, out_features);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(r.k % group_size == 0, "in_features (", r.k, ") must be a multiple of group_size (", group_size, ")");
  check_qweight(qweight, at::kByte, {out_features, r.k / 2}, x);
  check_tensor(scales, "scales", at::kFloat, {out_features, r.k / group_size}, x);
  check_tensor(offsets, "offsets", at::kFloat, {out_features, r.k / group_size}, x);
  return launch<true>(r, x, qweight, scales, &offsets, bias_f32(bias, x, out_features), out_features,
                      static_cast<int>(group_size));
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       int64_t out_features, const std::optional<at::Tensor>& bias) {
  const Rows r = check_x(x, out_features);
  check_qweight(qweight, at::kChar, {out_features, r.k}, x);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out_features &&
                  (scales.size(1) == 1 || (r.k % 32 == 0 && scales.size(1) == r.k / 32)),
              "scales must have shape (", out_features, ", 1) (per channel) or (", out_features, ", ", r.k / 32,
              ") (blocks of 32), got ", scales.sizes());
  check_tensor(scales, "scales", at::kFloat, scales.sizes(), x);  // dtype, device, contiguity
  const int group = scales.size(1) == 1 ? 0 : 32;
  // the int8 chunk reads the byte-level codes: view them as uint8 (same bits)
  return launch<false>(r, x, qweight.view(at::kByte), scales, nullptr, bias_f32(bias, x, out_features),
                       out_features, group);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashgen_cuda, m) {
  m.def(
      "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, int out_features, "
      "Tensor? bias) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashgen_cuda, CUDA, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}
