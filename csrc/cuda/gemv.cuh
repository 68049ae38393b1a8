// Shared by the weight-only GEMVs of decode (quant_gemv.cu, ggml_gemv.cu): activation loads and stores, and the
// host-side checks of x, bias and the prepacked weights. One warp owns one output feature; the M (<= kMaxRows)
// rows of x are re-read by every warp through the read-only cache.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flashgen_gemv {

constexpr int kMaxRows = 8;       // activation rows per launch (decode batch)
constexpr int kWarpsPerBlock = 4;  // one output feature per warp
constexpr int kChunk = 16;         // bytes per 16-byte load
constexpr int kUnroll = 2;         // weight chunks loaded ahead per lane

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float* f) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 p;
    if constexpr (std::is_same_v<T, at::Half>) {
      p = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    } else {
      p = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
    }
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return at::Half(__float2half_rn(v));
  } else {
    return at::BFloat16(__float2bfloat16_rn(v));
  }
}

// fn(c, chunk) for each 16-byte chunk c of `row` this lane owns (c = lane, lane + 32, ... < chunks): kUnroll
// chunks are loaded (streaming, past L1) before any is used, so more bytes are in flight per SM.
template <typename F>
__device__ __forceinline__ void for_each_chunk(const uint8_t* __restrict__ row, int chunks, int lane, F&& fn) {
  for (int c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
      v[u] = c < chunks ? __ldcs(reinterpret_cast<const uint4*>(row) + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      fn(c, v[u]);
    }
  }
}

// acc[m] += sum_j x[m, k0 + j] w[j] for the M rows of x (row stride K), kCodes weights w (a multiple of 8).
template <typename T, int kCodes>
__device__ __forceinline__ void accumulate_rows(const T* __restrict__ x, int M, int K, int k0, const float* w,
                                                float* acc) {
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < M) {
      const uint4* xr = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + k0);
#pragma unroll
      for (int j = 0; j < kCodes / 8; ++j) {
        float xf[8];
        to_float8<T>(__ldg(xr + j), xf);
#pragma unroll
        for (int t = 0; t < 8; ++t) acc[m] = fmaf(xf[t], w[8 * j + t], acc[m]);
      }
    }
  }
}

// out[m, n] = scale * (the warp's sum of acc[m]) + bias[n], in T, written by lane 0.
template <typename T>
__device__ __forceinline__ void store_rows(const float* acc, int M, int N, int n, float scale,
                                           const float* __restrict__ bias, T* __restrict__ out) {
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < M) {
      float v = acc[m];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
      if (threadIdx.x % 32 == 0) {
        v *= scale;
        if (bias != nullptr) v += bias[n];
        out[static_cast<int64_t>(m) * N + n] = from_float<T>(v);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ host side
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                         const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), " (the device of x), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the prepacked CUDA layout)");
}

inline void check_qweight(const at::Tensor& qweight, at::ScalarType dtype, at::IntArrayRef shape,
                          const at::Tensor& x) {
  check_tensor(qweight, "qweight", dtype, shape, x);
  TORCH_CHECK(aligned16(qweight),
              "qweight must be 16-byte aligned (16-byte loads): a fresh tensor, not an offset view");
}

struct Rows {
  at::Tensor x;  // (M, K) contiguous
  int64_t m;
  int64_t k;
};

inline Rows check_x(const at::Tensor& x, int64_t out_features) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float16 or bfloat16 (the CUDA GEMV; float32 runs on the Triton kernels), got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have shape (..., in_features)");
  TORCH_CHECK(out_features > 0 && out_features <= INT32_MAX, "out_features must be positive, got ", out_features);
  const int64_t k = x.size(-1);
  TORCH_CHECK(k > 0 && k % 16 == 0 && k <= INT32_MAX,
              "in_features (x.size(-1)) must be a positive multiple of 16 for the CUDA GEMV, got ", k);
  const int64_t m = k ? x.numel() / k : 0;
  TORCH_CHECK(m <= kMaxRows, "the CUDA GEMV takes at most ", kMaxRows, " rows of x (x.numel() / in_features), got ",
              m);
  at::Tensor x2 = x.reshape({m, k}).contiguous();
  if (!aligned16(x2)) x2 = x2.clone();  // an offset view: a fresh allocation is aligned for 16-byte loads
  return {x2, m, k};
}

inline at::Tensor bias_f32(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->device() == x.device(), "bias must be on ", x.device(), ", got ", bias->device());
  TORCH_CHECK(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == n,
              "bias must be a floating tensor of shape (", n, "), got ", bias->scalar_type(), " ", bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

}  // namespace flashgen_gemv
