// Fused linear cross-entropy for the CPU: flashgen::linear_cross_entropy_fwd / _bwd (math in
// kernels/cross_entropy.py and kernels/reference.py).
//
// Rows go in chunks of at most kChunkElems / V rows: a chunk's logits z = h W^T + b are one float32 GEMM
// (ATen's, into a buffer padded to a multiple of 16 columns with -inf), each row's softmax runs on the SIMD
// exp over threads, and the backward turns the same buffer into dz in place before two more GEMMs
// (dh = dz W, dW += dz^T h). 16-bit inputs are widened to float32 once (weight) or per chunk (hidden).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/attention.h"

namespace flashgen::cpu {
namespace {

constexpr int64_t kChunkElems = int64_t(1) << 21;  // 8 MiB of float32 logits per chunk
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  at::Tensor h, w, b, target;  // h (N, H), w (V, H), b (V,) or undefined: float32; target int64 (N,)
  int64_t n, v, vp, chunk;
  int64_t ignore_index;
};

Problem check(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& target, int64_t ignore_index) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && target.device().is_cpu(), op,
              ": hidden, weight and target must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be (tokens, hidden), got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op, ": weight must be (vocab, ", hidden.size(1),
              "), got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": the vocabulary is empty");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but hidden has ", hidden.scalar_type());
  attn::dispatch_float(hidden.scalar_type(), op, [](auto) {});
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == hidden.size(0), op,
              ": target must be int64 (", hidden.size(0), ",), got ", target.scalar_type(), " ", target.sizes());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == hidden.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                op, ": bias must be a CPU tensor (", weight.size(0), ",) of hidden's dtype, got ", bias->sizes());
  }
  Problem p;
  p.n = hidden.size(0);
  p.v = weight.size(0);
  p.vp = attn::round_up(p.v, attn::kVec);
  p.chunk = std::clamp<int64_t>(kChunkElems / p.vp, 1, std::max<int64_t>(p.n, 1));
  p.ignore_index = ignore_index;
  p.h = hidden.contiguous();
  p.w = weight.to(at::kFloat).contiguous();
  if (bias) p.b = bias->to(at::kFloat);
  p.target = target.contiguous();
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < p.n; ++i)
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < p.v), op, ": target[", i, "] = ", t[i],
                " is not a class in [0, ", p.v, ") nor ignore_index ", ignore_index);
  return p;
}

// z (rows, vp) = h[r0 : r0 + rows] W^T + b, columns v .. vp - 1 set to -inf.
void logits(const Problem& p, int64_t r0, int64_t rows, at::Tensor& buf) {
  at::Tensor z = buf.narrow(0, 0, rows).narrow(1, 0, p.v);
  at::Tensor h = p.h.narrow(0, r0, rows).to(at::kFloat);
  if (p.b.defined()) {
    at::addmm_out(z, p.b, h, p.w.t());
  } else {
    at::mm_out(z, h, p.w.t());
  }
  if (p.vp > p.v) buf.narrow(0, 0, rows).narrow(1, p.v, p.vp - p.v).fill_(kNegInf);
}

// For each chunk of rows: its logits into buf, row(i, z_i) for each of its rows over threads, then
// after(r0, rows) with the chunk's (rows, vp) buffer as row() left it.
template <class Row, class After>
void over_chunks(const Problem& p, at::Tensor& buf, Row&& row, After&& after) {
  for (int64_t r0 = 0; r0 < p.n; r0 += p.chunk) {
    const int64_t rows = std::min(p.chunk, p.n - r0);
    logits(p, r0, rows, buf);
    float* z = buf.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(r0 + r, z + r * p.vp);
    });
    after(r0, rows);
  }
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& target, int64_t ignore_index) {
  const Problem p = check("linear_cross_entropy_fwd", hidden, weight, bias, target, ignore_index);
  at::Tensor loss = at::empty({p.n}, hidden.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.n}, hidden.options().dtype(at::kFloat));
  at::Tensor buf = at::empty({p.chunk, p.vp}, hidden.options().dtype(at::kFloat));
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  float *loss_p = loss.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  const attn::Simd& isa = attn::simd();
  over_chunks(
      p, buf,
      [&](int64_t i, float* zr) {
        const bool valid = t[i] != p.ignore_index;
        const float picked = valid ? zr[t[i]] : 0.f;
        const float m = isa.row_max(zr, int(p.vp));
        const float l = m + std::log(isa.exp_sum(zr, int(p.vp), m));
        lse_p[i] = l;
        loss_p[i] = valid ? l - picked : 0.f;
      },
      [](int64_t, int64_t) {});
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd(
    const at::Tensor& dloss_in, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse_in, int64_t ignore_index) {
  const Problem p = check("linear_cross_entropy_bwd", hidden, weight, bias, target, ignore_index);
  TORCH_CHECK(dloss_in.dim() == 1 && dloss_in.size(0) == p.n && lse_in.dim() == 1 && lse_in.size(0) == p.n,
              "linear_cross_entropy_bwd: dloss and lse must be (", p.n, ",), got ", dloss_in.sizes(), " and ",
              lse_in.sizes());
  const at::Tensor dloss = dloss_in.to(at::kFloat).contiguous(), lse = lse_in.to(at::kFloat).contiguous();
  at::Tensor dh = at::empty_like(p.h, at::MemoryFormat::Contiguous);
  at::Tensor dw = at::zeros_like(p.w);
  at::Tensor db = p.b.defined() ? at::zeros_like(p.b) : at::Tensor();
  at::Tensor buf = at::empty({p.chunk, p.vp}, hidden.options().dtype(at::kFloat));
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  const float *g = dloss.const_data_ptr<float>(), *l = lse.const_data_ptr<float>();
  const attn::Simd& isa = attn::simd();
  over_chunks(
      p, buf,
      [&](int64_t i, float* zr) {
        const bool valid = t[i] != p.ignore_index;
        const float gi = valid ? g[i] : 0.f;
        isa.exp_sum(zr, int(p.vp), l[i]);  // softmax probabilities, in place
        for (int64_t c = 0; c < p.v; ++c) zr[c] *= gi;
        if (valid) zr[t[i]] -= gi;
      },
      [&](int64_t r0, int64_t rows) {
        at::Tensor dz = buf.narrow(0, 0, rows).narrow(1, 0, p.v);
        dh.narrow(0, r0, rows).copy_(at::mm(dz, p.w));
        dw.addmm_(dz.t(), p.h.narrow(0, r0, rows).to(at::kFloat));
        if (db.defined()) db.add_(dz.sum(0));
      });
  return {dh, dw.to(weight.scalar_type()), db.defined() ? db.to(weight.scalar_type()) : at::empty({0}, hidden.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
}

}  // namespace flashgen::cpu
