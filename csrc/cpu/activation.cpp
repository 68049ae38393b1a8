// SwiGLU's gating for the CPU: flashgen::silu_mul_fwd / silu_mul_bwd (math in kernels/reference.py).
//
//   y = g * s * u,  s = sigmoid(g);   du = dy * g * s,   dg = dy * u * s * (1 + g * (1 - s)).
//
// Elementwise over contiguous tensors, in chunks of kChunk elements handed out in turn to torch's threads;
// 16-bit inputs are widened to float32 per chunk, computed on the SIMD exp (AVX-512 or AVX2) and rounded once.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/attention.h"
#include "cpu/parallel.h"

namespace flashgen::cpu {
namespace {

using attn::convert_row;
using attn::dispatch_float;
using attn::simd;

constexpr int64_t kChunk = 4096;

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": ", a_name, " and ", b_name, " must be CPU tensors");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", b_name, " must have ", a_name, "'s shape ", a.sizes(), ", got ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(), " but ", a_name,
              " has ", a.scalar_type(), ": they must match");
}

// src as float32: itself, or widened into scratch (16-bit).
template <typename T>
const float* as_float(const T* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    convert_row(src, int(n), 1.f, scratch);
    return scratch;
  }
}

// Where float32 results for dst go: dst itself, or scratch that `store` rounds into dst (16-bit).
template <typename T>
float* out_float(T* dst, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return scratch;
  }
}

template <typename T>
void store(const float* src, int64_t n, T* dst) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
  }
}

// body(begin, n, scratch) for every chunk of `total` elements; scratch holds `buffers` float arrays of kChunk.
template <class Body>
void chunks(int64_t total, int buffers, Body&& body) {
  const int64_t n_chunks = (total + kChunk - 1) / kChunk;
  in_turn(n_chunks, [&](auto take) {
    std::vector<float> scratch(size_t(buffers) * kChunk);
    for (int64_t c = take(); c < n_chunks; c = take()) {
      const int64_t begin = c * kChunk;
      body(begin, std::min(kChunk, total - begin), scratch.data());
    }
  });
}

at::Tensor silu_mul_fwd(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_pair("silu_mul_fwd", gate_in, "gate", up_in, "up");
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor y = at::empty_like(gate, at::MemoryFormat::Contiguous);
  dispatch_float(gate.scalar_type(), "silu_mul_fwd", [&](auto t) {
    using T = decltype(t);
    const T *g = gate.const_data_ptr<T>(), *u = up.const_data_ptr<T>();
    T* out = y.data_ptr<T>();
    chunks(gate.numel(), 3, [&](int64_t i, int64_t n, float* s) {
      float* yf = out_float(out + i, s + 2 * kChunk);
      simd().silu(as_float(g + i, n, s), as_float(u + i, n, s + kChunk), yf, n);
      store(yf, n, out + i);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_bwd(const at::Tensor& dy_in, const at::Tensor& gate_in,
                                                const at::Tensor& up_in) {
  check_pair("silu_mul_bwd", gate_in, "gate", up_in, "up");
  check_pair("silu_mul_bwd", gate_in, "gate", dy_in, "dy");
  const at::Tensor dy = dy_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor dgate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor dup = at::empty_like(up, at::MemoryFormat::Contiguous);
  dispatch_float(gate.scalar_type(), "silu_mul_bwd", [&](auto t) {
    using T = decltype(t);
    const T *d = dy.const_data_ptr<T>(), *g = gate.const_data_ptr<T>(), *u = up.const_data_ptr<T>();
    T *dg = dgate.data_ptr<T>(), *du = dup.data_ptr<T>();
    chunks(gate.numel(), 5, [&](int64_t i, int64_t n, float* s) {
      const float *__restrict df = as_float(d + i, n, s), *__restrict gf = as_float(g + i, n, s + kChunk),
                               *__restrict uf = as_float(u + i, n, s + 2 * kChunk);
      float *__restrict dgf = out_float(dg + i, s + 3 * kChunk), *__restrict duf = out_float(du + i, s + 4 * kChunk);
      simd().sigmoid(gf, dgf, n);  // s, in dgate's place until the loop reads it
      for (int64_t j = 0; j < n; ++j) {
        const float sj = dgf[j], gj = gf[j], dj = df[j];
        dgf[j] = dj * uf[j] * sj * (1.f + gj * (1.f - sj));
        duf[j] = dj * gj * sj;
      }
      store(dgf, n, dg + i);
      store(duf, n, du + i);
    });
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
}

}  // namespace flashgen::cpu
