// flashgen::flash_attn_bwd on CPU: FlashAttention's backward, recomputing P from the saved lse.
//
// Per tile of queries x keys: S = scale Q K^T (softcapped, masked), P = exp(S - lse), dP = dO V^T,
// dS = P * (dP - delta) with delta = rowsum(dO * O) (times 1 - tanh^2 under softcap); then
// dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K.
// Deterministic without atomics: one pass owns dK, dV (tasks over key blocks, summing their query blocks and
// the q heads of a GQA group in a fixed order), a second pass owns dQ (tasks over query blocks). The price is
// computing S, P and dP twice.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/attention.h"

namespace flashgen::cpu::attn {
namespace {

// One query tile's inputs: qf (scaled q), dof, lse, delta and key positions, for `rows` rows.
struct QueryTile {
  int rows;
  std::vector<float> qf, dof, lse, delta;
  std::vector<int64_t> pos;

  explicit QueryTile(int ld)
      : rows(0), qf(kBlockQ * ld), dof(kBlockQ * ld), lse(kBlockQ), delta(kBlockQ), pos(kBlockQ) {}

  template <typename T>
  void load(const T* q, const T* dout, const float* lse_all, const float* delta_all, const Seq& s, const LseLayout& la,
            int64_t heads, int64_t h, int64_t q0, int d, int ld, float scale) {
    rows = int(std::min<int64_t>(kBlockQ, s.sq - q0));
    const int64_t off = (s.q_start * heads + h) * d;
    load_rows(Rows<T>{q + off, heads * d}, q0, rows, d, ld, qf.data(), scale);
    load_rows(Rows<T>{dout + off, heads * d}, q0, rows, d, ld, dof.data());
    for (int r = 0; r < rows; ++r) {
      lse[r] = lse_all[la.at(s, h, q0 + r)];
      delta[r] = delta_all[(s.q_start + q0 + r) * heads + h];
      pos[r] = q0 + r + s.sk - s.sq;
    }
  }
};

// P (in p) and dS (in ds), rows x kBlockK, for a query tile against keys k0 .. k0 + nk - 1 (kt, vt: d x kBlockK).
void grad_tile(const Simd& isa, const Options& opt, const QueryTile& qt, int d, int ld, const float* kt,
               const float* vt, int64_t k0, int nk, int64_t sk, float* p, float* ds, float* tanh_grad) {
  scores(isa, opt, qt.rows, qt.qf.data(), ld, kt, kBlockK, d, k0, nk, qt.pos.data(), sk, p, tanh_grad);
  for (int r = 0; r < qt.rows; ++r) {
    float* pr = p + int64_t(r) * kBlockK;
    if (qt.lse[r] == kNegInf) std::fill(pr, pr + kBlockK, 0.f);
    else isa.exp_sum(pr, kBlockK, qt.lse[r]);
  }
  isa.gemm(qt.rows, kBlockK, d, qt.dof.data(), ld, 1, vt, kBlockK, ds, kBlockK, false);
  for (int r = 0; r < qt.rows; ++r) {
    const int64_t o = int64_t(r) * kBlockK;
    for (int j = 0; j < kBlockK; ++j) ds[o + j] = p[o + j] * (ds[o + j] - qt.delta[r]);
    if (opt.softcap > 0)
      for (int j = 0; j < kBlockK; ++j) ds[o + j] *= tanh_grad[o + j];
  }
}

template <typename T>
void store_rows(const float* src, int rows, int ld, int d, float mul, T* dst, int64_t dst_stride) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) dst[r * dst_stride + c] = T(src[int64_t(r) * ld + c] * mul);
}

struct Inputs {
  at::Tensor dout, q, k, v, out, lse;
};

template <typename T>
void backward(const Inputs& in, const std::vector<Seq>& seqs, const LseLayout& la, const Options& opt, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv) {
  const int64_t heads = in.q.size(-2), kv_heads = in.k.size(-2), group = heads / kv_heads;
  const int d = int(in.q.size(-1)), ld = int(round_up(d, kVec));
  const T *qp = in.q.data_ptr<T>(), *kp = in.k.data_ptr<T>(), *vp = in.v.data_ptr<T>(), *dop = in.dout.data_ptr<T>(),
          *op = in.out.data_ptr<T>();
  const float* lp = in.lse.data_ptr<float>();
  const Simd& isa = simd();

  // delta = rowsum(dO * O) per (query token, head).
  const int64_t q_rows = in.q.numel() / d;
  std::vector<float> delta(q_rows);
  at::parallel_for(0, q_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float acc = 0.f;
      for (int c = 0; c < d; ++c) acc += float(dop[i * d + c]) * float(op[i * d + c]);
      delta[i] = acc;
    }
  });

  struct Task {
    int64_t seq, head, start;
  };
  std::vector<Task> k_tasks, q_tasks;
  for (int64_t b = 0; b < int64_t(seqs.size()); ++b) {
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t k0 = 0; k0 < seqs[b].sk; k0 += kBlockK) k_tasks.push_back({b, h, k0});
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t q0 = 0; q0 < seqs[b].sq; q0 += kBlockQ) q_tasks.push_back({b, h, q0});
  }

  // Pass 1: dK, dV of one key block of one kv head, summed over its query heads and query blocks.
  T *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  at::parallel_for(0, int64_t(k_tasks.size()), 1, [&](int64_t begin, int64_t end) {
    QueryTile qt(ld);
    std::vector<float> kt(int64_t(d) * kBlockK), vt(kt.size()), p(kBlockQ * kBlockK), ds(p.size()), tg(p.size()),
        dk_acc(kBlockK * ld), dv_acc(kBlockK * ld);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, h, k0] = k_tasks[t];
      const Seq& s = seqs[b];
      const int nk = int(std::min<int64_t>(kBlockK, s.sk - k0));
      const int64_t kv_off = (s.k_start * kv_heads + h) * d;
      load_cols(Rows<T>{kp + kv_off, kv_heads * d}, k0, nk, d, kt.data());
      load_cols(Rows<T>{vp + kv_off, kv_heads * d}, k0, nk, d, vt.data());
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t head = h * group; head < (h + 1) * group; ++head) {
        for (int64_t q0 = 0; q0 < s.sq; q0 += kBlockQ) {
          const int rows = int(std::min<int64_t>(kBlockQ, s.sq - q0));
          int64_t first_pos = q0 + s.sk - s.sq, last_pos = first_pos + rows - 1;
          // Rows' key ranges grow with the position: the block is skipped unless some row reaches [k0, k0 + nk).
          if (opt.hi(last_pos, s.sk) < k0 || opt.lo(first_pos) >= k0 + nk) continue;
          qt.load(qp, dop, lp, delta.data(), s, la, heads, head, q0, d, ld, opt.scale);
          grad_tile(isa, opt, qt, d, ld, kt.data(), vt.data(), k0, nk, s.sk, p.data(), ds.data(), tg.data());
          isa.gemm(nk, ld, rows, p.data(), 1, kBlockK, qt.dof.data(), ld, dv_acc.data(), ld, true);
          isa.gemm(nk, ld, rows, ds.data(), 1, kBlockK, qt.qf.data(), ld, dk_acc.data(), ld, true);
        }
      }
      store_rows(dk_acc.data(), nk, ld, d, 1.f, dkp + kv_off + k0 * kv_heads * d, kv_heads * d);
      store_rows(dv_acc.data(), nk, ld, d, 1.f, dvp + kv_off + k0 * kv_heads * d, kv_heads * d);
    }
  });

  // Pass 2: dQ of one query block of one head, summed over key blocks.
  T* dqp = dq.data_ptr<T>();
  at::parallel_for(0, int64_t(q_tasks.size()), 1, [&](int64_t begin, int64_t end) {
    QueryTile qt(ld);
    std::vector<float> kt(int64_t(d) * kBlockK), vt(kt.size()), kf(kBlockK * ld), p(kBlockQ * kBlockK), ds(p.size()),
        tg(p.size()), dq_acc(kBlockQ * ld);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, head, q0] = q_tasks[t];
      const Seq& s = seqs[b];
      qt.load(qp, dop, lp, delta.data(), s, la, heads, head, q0, d, ld, opt.scale);
      std::fill(dq_acc.begin(), dq_acc.end(), 0.f);
      const int64_t kv_off = (s.k_start * kv_heads + head / group) * d;
      const Rows<T> krows{kp + kv_off, kv_heads * d}, vrows{vp + kv_off, kv_heads * d};
      const auto [kb, ke] = key_span(opt, qt.rows, qt.pos.data(), s.sk, 0, s.sk);
      for (int64_t k0 = kb; k0 < ke; k0 += kBlockK) {
        const int nk = int(std::min<int64_t>(kBlockK, ke - k0));
        load_cols(krows, k0, nk, d, kt.data());
        load_cols(vrows, k0, nk, d, vt.data());
        load_rows(krows, k0, nk, d, ld, kf.data());
        grad_tile(isa, opt, qt, d, ld, kt.data(), vt.data(), k0, nk, s.sk, p.data(), ds.data(), tg.data());
        isa.gemm(qt.rows, ld, nk, ds.data(), kBlockK, 1, kf.data(), ld, dq_acc.data(), ld, true);
      }
      store_rows(dq_acc.data(), qt.rows, ld, d, opt.scale, dqp + ((s.q_start + q0) * heads + head) * d, heads * d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t,
    int64_t, double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(),
              "flash_attn_bwd: give both cu_seqlens_q and cu_seqlens_k or neither");
  const bool varlen = cu_q.has_value();
  check_qkv("flash_attn_bwd", q, k, v, varlen);
  for (const auto* t : {&dout, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "flash_attn_bwd: dout and out must be CPU tensors shaped and typed like q ", q.sizes(), " ",
                q.scalar_type(), ", got ", t->sizes(), " ", t->scalar_type());
  }
  const auto lse_shape = varlen ? std::vector<int64_t>{q.size(1), q.size(0)}
                                : std::vector<int64_t>{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(lse_shape) && lse.device().is_cpu(),
              "flash_attn_bwd: lse must be float32 of shape ", at::IntArrayRef(lse_shape), ", got ",
              lse.scalar_type(), " ", lse.sizes());
  const Inputs in{dout.contiguous(), q.contiguous(), k.contiguous(),
                  v.contiguous(), out.contiguous(), lse.contiguous()};
  const std::vector<Seq> seqs = sequences(in.q, in.k, cu_q, cu_k);
  // Tokens outside every sequence (a varlen batch may not cover the whole tensor) get zero gradients.
  at::Tensor dq = at::zeros_like(in.q), dk = at::zeros_like(in.k), dv = at::zeros_like(in.v);
  const Options opt(softmax_scale, causal, window_left, window_right, softcap);
  dispatch_float(q.scalar_type(), "flash_attn_bwd",
                 [&](auto zero) { backward<decltype(zero)>(in, seqs, LseLayout(in.q, varlen), opt, dq, dk, dv); });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) { m.impl("flash_attn_bwd", &flash_attn_bwd); }

}  // namespace flashgen::cpu::attn
