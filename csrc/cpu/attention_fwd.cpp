// flashgen::flash_attn_fwd on CPU: blocked online-softmax attention (FlashAttention's forward).
//
// One task = (sequence, q head, block of kBlockQ queries), run in parallel. For each key block the task
// computes S = Q K^T (softcapped, masked), the new row max m' = max(m, rowmax S), P = exp(S - m'), and
// rescales its running sum and output by exp(m - m') before adding rowsum P and P V. Memory per task is a
// few tiles, never seqlen_q x seqlen_k; the output is O / l and lse = m + log l.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "cpu/attention.h"

namespace flashgen::cpu::attn {

template <typename T>
void attend(const Simd& isa, const Options& opt, int rows, const float* qf, int ldq, int d, const int64_t* row_pos,
            int64_t sk, const Rows<T>& k, const Rows<T>& v, int64_t k_begin, int64_t k_end, float* kt, float* vf,
            float* s, float* o, float* m, float* l) {
  const auto [kb, ke] = key_span(opt, rows, row_pos, sk, k_begin, k_end);
  // A 16-bit cache read in place is converted at every read of it: only where the products read it once (up to
  // 4 rows, a decode step's GQA group); more rows convert it once into the scratch tiles.
  const bool in_place = std::is_same_v<T, float> || rows <= 4;
  for (int64_t k0 = kb; k0 < ke; k0 += kBlockK) {
    const int nk = int(std::min<int64_t>(kBlockK, ke - k0)), cols = int(round_up(nk, kVec));
    // keys stored key-major in a page that holds the block's cols columns: read in place, already transposed
    // (the columns past nk are the page's other keys, which the mask overwrites)
    if (in_place && k.tok_stride == 1 && k.col_stride != 1 && k.table && k0 % k.block_size + cols <= k.block_size) {
      scores(isa, opt, rows, qf, ldq, k.row(k0), k.col_stride, d, k0, nk, row_pos, sk, s);
    } else {
      load_cols(k, k0, nk, d, kt);
      scores(isa, opt, rows, qf, ldq, kt, kBlockK, d, k0, nk, row_pos, sk, s);
    }
    for (int r = 0; r < rows; ++r) {
      float* sr = s + int64_t(r) * kBlockK;
      const float m_new = std::max(m[r], isa.row_max(sr, cols));
      if (m_new == kNegInf) {  // nothing attended yet: P row = 0
        std::fill(sr, sr + kBlockK, 0.f);
        continue;
      }
      const float alpha = std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + isa.exp_sum(sr, cols, m_new);  // columns from cols on are masked: exp gives 0
      m[r] = m_new;
      if (alpha != 1.f)
        for (float *x = o + int64_t(r) * ldq, *e = x + ldq; x < e; ++x) *x *= alpha;
    }
    // rows of exactly ldq values, evenly strided (no page boundary breaks the stride): read in place
    if (in_place && d == ldq && v.evenly_strided(k0, nk)) {
      isa.product(rows, ldq, nk, s, kBlockK, 1, v.row(k0), v.tok_stride, o, ldq, true);
      continue;
    }
    load_rows(v, k0, nk, d, ldq, vf);
    isa.gemm(rows, ldq, nk, s, kBlockK, 1, vf, ldq, o, ldq, true);
  }
}

template void attend<float>(const Simd&, const Options&, int, const float*, int, int, const int64_t*, int64_t,
                            const Rows<float>&, const Rows<float>&, int64_t, int64_t, float*, float*, float*,
                            float*, float*, float*);
template void attend<at::BFloat16>(const Simd&, const Options&, int, const float*, int, int, const int64_t*,
                                   int64_t, const Rows<at::BFloat16>&, const Rows<at::BFloat16>&, int64_t, int64_t,
                                   float*, float*, float*, float*, float*, float*);
template void attend<at::Half>(const Simd&, const Options&, int, const float*, int, int, const int64_t*, int64_t,
                               const Rows<at::Half>&, const Rows<at::Half>&, int64_t, int64_t, float*, float*,
                               float*, float*, float*, float*);

namespace {

struct Task {
  int64_t seq, head, q0;
};

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const std::optional<at::Tensor>& cu_q,
                                                  const std::optional<at::Tensor>& cu_k, int64_t, int64_t,
                                                  double softmax_scale, bool causal, int64_t window_left,
                                                  int64_t window_right, double softcap) {
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(),
              "flash_attn_fwd: give both cu_seqlens_q and cu_seqlens_k or neither");
  const bool varlen = cu_q.has_value();
  check_qkv("flash_attn_fwd", q_in, k_in, v_in, varlen);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const std::vector<Seq> seqs = sequences(q, k, cu_q, cu_k);
  const int64_t heads = q.size(-2), kv_heads = k.size(-2), group = heads / kv_heads;
  const int d = int(q.size(-1)), ld = int(round_up(d, kVec));
  // Varlen tokens after the last sequence (cu_seqlens_q[-1] < total) attend nothing: out 0, lse -inf.
  at::Tensor out = varlen ? at::zeros_like(q) : at::empty_like(q);
  at::Tensor lse = varlen ? at::full({heads, q.size(0)}, kNegInf, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), heads, q.size(1)}, q.options().dtype(at::kFloat));
  const LseLayout lse_at(q, varlen);
  const Options opt(softmax_scale, causal, window_left, window_right, softcap);

  std::vector<Task> tasks;
  for (int64_t b = 0; b < int64_t(seqs.size()); ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t q0 = 0; q0 < seqs[b].sq; q0 += kBlockQ) tasks.push_back({b, h, q0});

  dispatch_float(q.scalar_type(), "flash_attn_fwd", [&](auto zero) {
    using T = decltype(zero);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    float* lp = lse.data_ptr<float>();
    const Simd& isa = simd();
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(kBlockQ * ld), o(kBlockQ * ld), kt(int64_t(d) * kBlockK), vf(kBlockK * ld),
          s(kBlockQ * kBlockK), m(kBlockQ), l(kBlockQ);
      std::vector<int64_t> pos(kBlockQ);
      for (int64_t t = begin; t < end; ++t) {
        const auto [b, h, q0] = tasks[t];
        const Seq& sq = seqs[b];
        const int rows = int(std::min<int64_t>(kBlockQ, sq.sq - q0));
        load_rows(Rows<T>{qp + (sq.q_start * heads + h) * d, heads * d}, q0, rows, d, ld, qf.data(), opt.scale);
        for (int r = 0; r < rows; ++r) pos[r] = q0 + r + sq.sk - sq.sq;
        std::fill(o.begin(), o.end(), 0.f);
        std::fill(m.begin(), m.end(), kNegInf);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t kv_off = (sq.k_start * kv_heads + h / group) * d;
        attend(isa, opt, rows, qf.data(), ld, d, pos.data(), sq.sk, Rows<T>{kp + kv_off, kv_heads * d},
               Rows<T>{vp + kv_off, kv_heads * d}, 0, sq.sk, kt.data(), vf.data(), s.data(), o.data(), m.data(),
               l.data());
        for (int r = 0; r < rows; ++r)
          finalize_row(o.data() + int64_t(r) * ld, m[r], l[r], d, op + ((sq.q_start + q0 + r) * heads + h) * d,
                       lp + lse_at.at(sq, h, q0 + r));
      }
    });
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) { m.impl("flash_attn_fwd", &flash_attn_fwd); }

}  // namespace flashgen::cpu::attn
