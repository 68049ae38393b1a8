// Rotary position embedding for the CPU: flashgen::rotary (math in kernels/rotary.py and kernels/reference.py).
//
// x (B, S, H, D) contiguous, cos / sin (B or 1, S, R): each (b, s) token reads its cos / sin row once, widened
// to float32, and rotates its H heads; the rows are shared out over torch's threads. backward applies the
// transposed rotation (dy -> dx) with the same loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/attention.h"

namespace flashgen::cpu {
namespace {

template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* y, int64_t tokens, int64_t seqlen, bool per_batch,
            int64_t heads, int64_t d, int64_t r, bool backward) {
  const int64_t h = r / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(r), s(r);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = per_batch ? t : t % seqlen;
      for (int64_t i = 0; i < r; ++i) c[i] = float(cos[row * r + i]), s[i] = float(sin[row * r + i]);
      // backward: dx[:h] = dy[:h] c[:h] + dy[h:] s[h:], dx[h:] = dy[h:] c[h:] - dy[:h] s[:h]
      const float* s_lo = backward ? s.data() + h : s.data();
      const float* s_hi = backward ? s.data() : s.data() + h;
      const float sign = backward ? 1.f : -1.f;
      for (int64_t hd = 0; hd < heads; ++hd) {
        const T* xi = x + (t * heads + hd) * d;
        T* yi = y + (t * heads + hd) * d;
        for (int64_t i = 0; i < h; ++i) {
          const float a = float(xi[i]), b = float(xi[i + h]);
          yi[i] = T(a * c[i] + sign * b * s_lo[i]);
          yi[i + h] = T(b * c[i + h] - sign * a * s_hi[i]);
        }
        for (int64_t i = r; i < d; ++i) yi[i] = xi[i];
      }
    }
  });
}

at::Tensor rotary(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  TORCH_CHECK(x_in.device().is_cpu() && cos_in.device().is_cpu() && sin_in.device().is_cpu(),
              "rotary: x, cos and sin must be CPU tensors");
  TORCH_CHECK(x_in.dim() == 4, "rotary: x must be (batch, seqlen, heads, head_dim), got ", x_in.sizes());
  const int64_t batch = x_in.size(0), seqlen = x_in.size(1), heads = x_in.size(2), d = x_in.size(3);
  TORCH_CHECK(cos_in.dim() == 3 && cos_in.sizes() == sin_in.sizes() && (cos_in.size(0) == 1 || cos_in.size(0) == batch) &&
                  cos_in.size(1) == seqlen && cos_in.size(2) % 2 == 0 && cos_in.size(2) > 0 && cos_in.size(2) <= d,
              "rotary: cos and sin must both be (", batch, " or 1, ", seqlen, ", rotary_dim) with rotary_dim even and <= ",
              d, ", got ", cos_in.sizes(), " and ", sin_in.sizes());
  TORCH_CHECK(cos_in.scalar_type() == x_in.scalar_type() && sin_in.scalar_type() == x_in.scalar_type(),
              "rotary: cos and sin must have x's dtype ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  attn::dispatch_float(x.scalar_type(), "rotary", [&](auto t) {
    using T = decltype(t);
    rotate(x.const_data_ptr<T>(), cos.const_data_ptr<T>(), sin.const_data_ptr<T>(), y.data_ptr<T>(), batch * seqlen,
           seqlen, cos.size(0) == batch && batch > 1, heads, d, cos.size(2), backward);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) { m.impl("rotary", &rotary); }

}  // namespace flashgen::cpu
