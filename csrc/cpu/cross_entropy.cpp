// Fused linear cross-entropy for the CPU: flashgen::linear_cross_entropy_fwd / _bwd (math in
// kernels/cross_entropy.py and kernels/reference.py).
//
// The logits are formed one tile at a time: blocks of up to kRows rows by chunks of the vocabulary, at most
// kTileElems float32 in all, each z = h W_c^T + b_c one ATen GEMM into a buffer whose padding columns hold -inf.
// The forward folds each chunk into a running max and sum per row (the logsumexp, online); the backward, given
// that logsumexp, turns each tile into dz in place and writes its gradients directly: dW_c += dz^T h (a chunk's
// rows of dW, summed over row blocks only), dh += dz W_c (the row block's few MB). Tiling the vocabulary keeps
// every GEMM large (a tile of rows x all of a 49k vocabulary would hold only 42 rows, and dW, 100+ MB, would be
// read and written once per 42 rows). 16-bit inputs are widened to float32 once (weight) or per row block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention.h"

namespace flashgen::cpu {
namespace {

constexpr int64_t kRows = 1024;
constexpr int64_t kTileElems = int64_t(1) << 21;  // 8 MiB of float32 logits per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  at::Tensor h, w, b, target;  // h (N, H), w (V, H), b (V,) or undefined: float32; target int64 (N,)
  int64_t n, v, rows, cols;     // rows x cols: the tile (cols a multiple of kVec)
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
  p.rows = std::clamp<int64_t>(p.n, 1, kRows);
  p.cols = std::clamp<int64_t>(kTileElems / p.rows / attn::kVec * attn::kVec, attn::kVec,
                               attn::round_up(p.v, attn::kVec));
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

// One tile: rows r0 .. r0 + rows of the logits, vocabulary c0 .. c0 + width, padded to wp columns with -inf.
struct Tile {
  int64_t r0, rows, c0, width, wp;
  at::Tensor h;  // the row block of hidden, float32
  at::Tensor z;  // (rows, width): the tile's logits, then whatever row() left there
};

// For each tile: its logits, row(tile, r, z_r) for each of its rows over threads, then after(tile).
template <class Row, class After>
void over_tiles(const Problem& p, Row&& row, After&& after) {
  at::Tensor buf = at::empty({p.rows, p.cols}, p.w.options());
  for (int64_t r0 = 0; r0 < p.n; r0 += p.rows) {
    const int64_t rows = std::min(p.rows, p.n - r0);
    Tile tile{r0, rows, 0, 0, 0, p.h.narrow(0, r0, rows).to(at::kFloat), {}};
    for (tile.c0 = 0; tile.c0 < p.v; tile.c0 += p.cols) {
      tile.width = std::min(p.cols, p.v - tile.c0);
      tile.wp = attn::round_up(tile.width, attn::kVec);
      at::Tensor block = buf.narrow(0, 0, tile.rows);
      tile.z = block.narrow(1, 0, tile.width);
      const at::Tensor w = p.w.narrow(0, tile.c0, tile.width);
      if (p.b.defined()) {
        at::addmm_out(tile.z, p.b.narrow(0, tile.c0, tile.width), tile.h, w.t());
      } else {
        at::mm_out(tile.z, tile.h, w.t());
      }
      if (tile.wp > tile.width) block.narrow(1, tile.width, tile.wp - tile.width).fill_(kNegInf);
      float* z = buf.data_ptr<float>();
      at::parallel_for(0, tile.rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row(tile, r, z + r * p.cols);
      });
      after(tile);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& target, int64_t ignore_index) {
  const Problem p = check("linear_cross_entropy_fwd", hidden, weight, bias, target, ignore_index);
  at::Tensor loss = at::empty({p.n}, hidden.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.n}, hidden.options().dtype(at::kFloat));
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  float *loss_p = loss.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  // per row: running max, sum of exp(z - max), and the target's logit
  std::vector<float> max(p.n, kNegInf), sum(p.n, 0.f), picked(p.n, 0.f);
  const attn::Simd& isa = attn::simd();
  over_tiles(
      p,
      [&](const Tile& tile, int64_t r, float* zr) {
        const int64_t i = tile.r0 + r;
        if (t[i] >= tile.c0 && t[i] < tile.c0 + tile.width) picked[i] = zr[t[i] - tile.c0];
        const float m = std::max(max[i], isa.row_max(zr, int(tile.wp)));
        sum[i] = sum[i] * std::exp(max[i] - m) + isa.exp_sum(zr, int(tile.wp), m);
        max[i] = m;
      },
      [](const Tile&) {});
  for (int64_t i = 0; i < p.n; ++i) {
    lse_p[i] = max[i] + std::log(sum[i]);
    loss_p[i] = t[i] != p.ignore_index ? lse_p[i] - picked[i] : 0.f;
  }
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
  at::Tensor dh = at::empty_like(p.h, p.w.options(), at::MemoryFormat::Contiguous);
  at::Tensor dw = at::empty_like(p.w);
  at::Tensor db = p.b.defined() ? at::empty_like(p.b) : at::Tensor();
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  const float *g = dloss.const_data_ptr<float>(), *l = lse.const_data_ptr<float>();
  const attn::Simd& isa = attn::simd();
  over_tiles(
      p,
      [&](const Tile& tile, int64_t r, float* zr) {
        const int64_t i = tile.r0 + r;
        const bool valid = t[i] != p.ignore_index;
        const float gi = valid ? g[i] : 0.f;
        isa.exp_sum(zr, int(tile.wp), l[i]);  // softmax probabilities, in place
        for (int64_t c = 0; c < tile.width; ++c) zr[c] *= gi;
        if (valid && t[i] >= tile.c0 && t[i] < tile.c0 + tile.width) zr[t[i] - tile.c0] -= gi;
      },
      [&](const Tile& tile) {
        at::Tensor dh_rows = dh.narrow(0, tile.r0, tile.rows), dw_rows = dw.narrow(0, tile.c0, tile.width);
        const at::Tensor w = p.w.narrow(0, tile.c0, tile.width);
        // the first tile of a row block / of a vocabulary chunk writes, later ones accumulate
        if (tile.c0 == 0) {
          at::mm_out(dh_rows, tile.z, w);
        } else {
          dh_rows.addmm_(tile.z, w);
        }
        if (tile.r0 == 0) {
          at::mm_out(dw_rows, tile.z.t(), tile.h);
          if (db.defined()) db.narrow(0, tile.c0, tile.width).copy_(tile.z.sum(0));
        } else {
          dw_rows.addmm_(tile.z.t(), tile.h);
          if (db.defined()) db.narrow(0, tile.c0, tile.width).add_(tile.z.sum(0));
        }
      });
  return {dh.to(hidden.scalar_type()), dw.to(weight.scalar_type()),
          db.defined() ? db.to(weight.scalar_type()) : at::empty({0}, hidden.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
}

}  // namespace flashgen::cpu
