// Fused residual add + RMSNorm forward on CUDA: flashgen_cuda::rms_norm_fwd, with the schema and math of
// flashgen::rms_norm_fwd (kernels/ops.py, kernels/reference.py):
//   h = x + residual (rounded to x's dtype, written out) or x;  rstd = 1 / sqrt(mean(h^2) + eps);
//   y = h * rstd * (w + w_off)   (w_off = 1 for Gemma's weight offset).
// One thread block per row. Rows are read and written in 16-byte packs (8 halves / 4 floats) when the hidden
// size and every pointer allow it, element by element otherwise. Pass 1 forms h and sum(h^2); pass 2 re-reads
// h (from L2: a row is at most 256 KiB) and writes y, so registers stay bounded for any hidden size.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

namespace flashgen_cuda {
namespace {

constexpr int kMaxThreads = 512;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V elements of T moved as one load/store (16 bytes when V * sizeof(T) == 16).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Sum of `v` over the block; every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kMaxThreads / 32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

template <class T, int V, bool kResidual, bool kWeight>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ h,
                    T* __restrict__ y, const T* __restrict__ weight, float* __restrict__ rstd, int64_t n,
                    float eps, float w_off) {
  using P = Pack<T, V>;
  const int64_t row = blockIdx.x, packs = n / V;
  const P* xr = reinterpret_cast<const P*>(x + row * n);
  const P* rr = reinterpret_cast<const P*>(residual + row * n);
  P* hr = reinterpret_cast<P*>(h + row * n);
  P* yr = reinterpret_cast<P*>(y + row * n);
  const P* wr = reinterpret_cast<const P*>(weight);

  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    P a = xr[i];
    if constexpr (kResidual) {
      const P b = rr[i];
#pragma unroll
      for (int k = 0; k < V; ++k) a.v[k] = from_float<T>(to_float(a.v[k]) + to_float(b.v[k]));
      hr[i] = a;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) ss += to_float(a.v[k]) * to_float(a.v[k]);  // the rounded h, as the reference
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(n) + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  // Each thread reads back only the packs it wrote itself: no barrier needed.
  const P* src = kResidual ? hr : xr;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P a = src[i];
    P o;
    if constexpr (kWeight) {
      const P w = wr[i];
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(to_float(a.v[k]) * r * (to_float(w.v[k]) + w_off));
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(to_float(a.v[k]) * r);
    }
    yr[i] = o;
  }
}

template <class T, int V>
void launch(const at::Tensor& x, const at::Tensor& r, at::Tensor& h, at::Tensor& y, const at::Tensor& w,
            at::Tensor& rstd, int64_t rows, int64_t n, float eps, float w_off) {
  const int64_t packs = n / V;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (packs + 31) / 32 * 32));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto p = [](const at::Tensor& t) {
    return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
  };
  const auto q = [](at::Tensor& t) { return t.numel() ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr; };
  const auto go = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(p(x), p(r), q(h), q(y), p(w),
                                                                rstd.mutable_data_ptr<float>(), n, eps, w_off);
  };
  if (r.defined()) {
    w.defined() ? go(rms_norm_fwd_kernel<T, V, true, true>) : go(rms_norm_fwd_kernel<T, V, true, false>);
  } else {
    w.defined() ? go(rms_norm_fwd_kernel<T, V, false, true>) : go(rms_norm_fwd_kernel<T, V, false, false>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <class T>
void dispatch_pack(const at::Tensor& x, const at::Tensor& r, at::Tensor& h, at::Tensor& y, const at::Tensor& w,
                   at::Tensor& rstd, int64_t rows, int64_t n, float eps, float w_off) {
  constexpr int V = 16 / sizeof(T);
  if (n % V == 0 && aligned16(x) && aligned16(r) && aligned16(h) && aligned16(y) && aligned16(w)) {
    launch<T, V>(x, r, h, y, w, rstd, rows, n, eps, w_off);
  } else {
    launch<T, 1>(x, r, h, y, w, rstd, rows, n, eps, w_off);
  }
}

// An optional argument must match x's dtype and device and have `shape`; returns it contiguous (or undefined).
at::Tensor checked(const std::optional<at::Tensor>& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->device() == x.device(), "flashgen_cuda::rms_norm_fwd: ", name, " must be on ", x.device(),
              " like x, got ", t->device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "flashgen_cuda::rms_norm_fwd: ", name,
              " must have x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "flashgen_cuda::rms_norm_fwd: ", name, " must have shape ", shape, ", got ",
              t->sizes());
  return t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& residual, double eps,
                                                            bool weight_offset) {
  TORCH_CHECK(x_in.is_cuda(), "flashgen_cuda::rms_norm_fwd: x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) >= 1, "flashgen_cuda::rms_norm_fwd: x must have a non-empty last "
              "dimension, got shape ", x_in.sizes());
  TORCH_CHECK(eps > 0, "flashgen_cuda::rms_norm_fwd: eps must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(rows <= INT32_MAX, "flashgen_cuda::rms_norm_fwd: at most 2^31 - 1 rows, got ", rows);
  const at::Tensor w = checked(weight, x, {n}, "weight");
  const at::Tensor r = checked(residual, x, x.sizes(), "residual");
  at::Tensor y = at::empty_like(x), h = r.defined() ? at::empty_like(x) : x.new_empty({0});
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (rows == 0) return {y, h, rstd};
  const float e = static_cast<float>(eps), off = weight_offset ? 1.0f : 0.0f;
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_pack<float>(x, r, h, y, w, rstd, rows, n, e, off); break;
    case at::kHalf: dispatch_pack<__half>(x, r, h, y, w, rstd, rows, n, e, off); break;
    case at::kBFloat16: dispatch_pack<__nv_bfloat16>(x, r, h, y, w, rstd, rows, n, e, off); break;
    default: TORCH_CHECK(false, "flashgen_cuda::rms_norm_fwd: x must be float32, float16 or bfloat16, got ",
                         x.scalar_type());
  }
  return {y, h, rstd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashgen_cuda, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps, bool weight_offset)"
        " -> (Tensor y, Tensor h, Tensor rstd)");
}

TORCH_LIBRARY_IMPL(flashgen_cuda, CUDA, m) { m.impl("rms_norm_fwd", &rms_norm_fwd); }

}  // namespace flashgen_cuda
