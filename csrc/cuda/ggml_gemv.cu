// Q4_K / Q6_K weight-only GEMV for decode (M = 1..8 rows of activations): flashgen_cuda::ggml_linear, the
// schema of flashgen::ggml_linear over the same CUDA layout (kernels/triton/ggml.py routes small M here when
// FLASHGEN_CUDA_BACKEND=cuda and a row of the layout is a multiple of 16 bytes).
//
// Layout (kernels/triton/ggml.py), per output row of K = 256 S values, R bytes:
//   Q4_K: codes (K/2, int4 order) | sc (K/32) | mn (K/32) | d (S float16) | dmin (S float16);
//         w[k] = (d sc_j) q[k] - dmin mn_j with j = k / 32.
//   Q6_K: low 4 bits (K/2, int4 order) | high 2 bits (K/4: bits 2t..2t+1 of byte j for k = 4j + t) |
//         sc (K/16, int8) | d (S float16);  w[k] = (d sc_j) (q[k] - 32) with j = k / 16.
// The float32 products of the reference, in its order: the file's values bit for bit.
//
// One warp owns one output feature: lane l reads 16-byte chunks l, l + 32, ... of the row's codes (32 codes, one
// Q4_K sub-block or two Q6_K ones, all in one super-block), with their high bits (Q6_K: the 8 bytes beside
// them), and multiplies them with the M activation rows (gemv.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv.cuh"

namespace {

using namespace flashgen_gemv;

constexpr int kQ4K = 12, kQ6K = 14;

__device__ __forceinline__ float half_at(const uint8_t* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

template <int TYPE>
__device__ __forceinline__ void dequantize(const uint8_t* __restrict__ row, int K, int c, const uint4& v,
                                           float* w) {
  const int k0 = 32 * c, super = k0 / 256;
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  if constexpr (TYPE == kQ4K) {
    const float s = half_at(row + K / 2 + K / 16 + 2 * super) * static_cast<float>(__ldg(row + K / 2 + c));
    const float mn = half_at(row + K / 2 + K / 16 + K / 128 + 2 * super) *
                     static_cast<float>(__ldg(row + K / 2 + K / 32 + c));
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
      w[2 * i] = s * static_cast<float>(byte & 0xFu) - mn;
      w[2 * i + 1] = s * static_cast<float>(byte >> 4) - mn;
    }
  } else {
    const uint2 hw = __ldg(reinterpret_cast<const uint2*>(row + K / 2) + c);
    const uint64_t hi = static_cast<uint64_t>(hw.x) | (static_cast<uint64_t>(hw.y) << 32);
    const float d = half_at(row + 3 * K / 4 + K / 16 + 2 * super);
    const int8_t* sc = reinterpret_cast<const int8_t*>(row + 3 * K / 4) + 2 * c;
    const float s0 = d * static_cast<float>(sc[0]), s1 = d * static_cast<float>(sc[1]);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
      const int q0 = static_cast<int>((byte & 0xFu) | (((hi >> (4 * i)) & 3u) << 4));
      const int q1 = static_cast<int>((byte >> 4) | (((hi >> (4 * i + 2)) & 3u) << 4));
      const float s = i < 8 ? s0 : s1;
      w[2 * i] = s * static_cast<float>(q0 - 32);
      w[2 * i + 1] = s * static_cast<float>(q1 - 32);
    }
  }
}

template <typename T, int TYPE>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    kq_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const float* __restrict__ bias,
                   T* __restrict__ out, int M, int N, int K, int64_t R) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const uint8_t* row = packed + n * R;
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;
  for_each_chunk(row, K / 32, lane, [&](int c, const uint4& codes) {
    float w[32];
    dequantize<TYPE>(row, K, c, codes, w);
    accumulate_rows<T, 32>(x, M, K, 32 * c, w, acc);
  });
  store_rows<T>(acc, M, N, n, 1.f, bias, out);
}

template <int TYPE>
void launch(const Rows& r, const at::Tensor& packed, const at::Tensor& bias, at::Tensor& out, int64_t n) {
  const dim3 grid(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(kWarpsPerBlock * 32);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(r.x.scalar_type(), "flashgen_cuda::ggml_linear",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       kq_gemv_kernel<at::Half, TYPE><<<grid, block, 0, stream>>>(
                           r.x.data_ptr<at::Half>(), packed.data_ptr<uint8_t>(), bias_ptr, out.data_ptr<at::Half>(),
                           r.m, n, r.k, packed.size(1));
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       kq_gemv_kernel<at::BFloat16, TYPE><<<grid, block, 0, stream>>>(
                           r.x.data_ptr<at::BFloat16>(), packed.data_ptr<uint8_t>(), bias_ptr,
                           out.data_ptr<at::BFloat16>(), r.m, n, r.k, packed.size(1));
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ggml_linear(const at::Tensor& x, const at::Tensor& packed, int64_t ggml_type, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(ggml_type == kQ4K || ggml_type == kQ6K, "ggml_type must be Q4_K (12) or Q6_K (14) for the CUDA GEMV, "
              "got ", ggml_type);
  const Rows r = check_x(x, out_features);
  TORCH_CHECK(r.k % 256 == 0, "in_features (", r.k, ") must be a multiple of the super-block of 256");
  const int64_t row_bytes = (ggml_type == kQ4K ? 148 : 210) * (r.k / 256);
  TORCH_CHECK(row_bytes % 16 == 0, "a row of the CUDA layout (", row_bytes, " bytes) must be a multiple of 16 for "
              "the CUDA GEMV's 16-byte loads (in_features a multiple of ", ggml_type == kQ4K ? 1024 : 2048, ")");
  check_qweight(packed, at::kByte, {out_features, row_bytes}, x);
  const at::Tensor b = bias_f32(bias, x, out_features);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  if (r.m == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  if (ggml_type == kQ4K) {
    launch<kQ4K>(r, packed, b, out, out_features);
  } else {
    launch<kQ6K>(r, packed, b, out, out_features);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashgen_cuda, m) {
  m.def("ggml_linear(Tensor x, Tensor packed, int ggml_type, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashgen_cuda, CUDA, m) { m.impl("ggml_linear", &ggml_linear); }
