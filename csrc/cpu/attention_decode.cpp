// flashgen::flash_attn_kvcache on CPU: decode and chunked prefill over a contiguous or paged KV cache.
//
// New k/v tokens are first written into the cache in place. Then, per (sequence, kv head), the queries of
// all q heads sharing that kv head are packed as the rows of one tile (query i, head-in-group j): with one
// decode token and GQA 3:1 that is 3 rows reading the cache once. Long caches are cut into num_splits key
// ranges processed in parallel (flash-decoding); each split keeps its running max m_s, sum l_s and
// unnormalized output o_s, merged in a fixed order: M = max m_s, l = sum l_s e^(m_s - M),
// out = sum o_s e^(m_s - M) / l, lse = M + log l.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/attention.h"
#include "cpu/parallel.h"

namespace flashgen::cpu::attn {
namespace {

// Rows of cache sequence b, kv head h: contiguous (batch_cache, seqlen_cache, kv_heads, d) or paged
// (num_blocks, block_size, kv_heads, d) through the block table row of b.
template <typename T>
Rows<T> cache_rows(const at::Tensor& cache, const int32_t* table, int64_t b, int64_t h) {
  T* base = cache.data_ptr<T>() + h * cache.stride(2);
  if (table) return Rows<T>{base, cache.stride(1), table, cache.size(1), cache.stride(0)};
  return Rows<T>{base + b * cache.stride(0), cache.stride(1)};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 4, "flash_attn_kvcache: q must be (batch, seqlen_q, heads, head_dim), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "flash_attn_kvcache: k_cache and v_cache must be 4-D with one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  for (const auto* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "flash_attn_kvcache: the caches must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu() && t->stride(3) == 1,
                "flash_attn_kvcache: k_cache / v_cache must be CPU tensors with a contiguous last dimension");
  }
  TORCH_CHECK(q.device().is_cpu(), "flash_attn_kvcache: q must be a CPU tensor");
  const int64_t d = q.size(3);
  TORCH_CHECK(d >= 1 && d <= 256, "flash_attn_kvcache: head_dim must be in [1, 256], got ", d);
  TORCH_CHECK(k_cache.size(3) == d, "flash_attn_kvcache: cache head_dim ", k_cache.size(3), " differs from q's ", d);
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0, "flash_attn_kvcache: q heads (", q.size(2),
              ") must be a multiple of the cache's kv heads (", k_cache.size(2), ")");
  TORCH_CHECK(k.has_value() == v.has_value(), "flash_attn_kvcache: give both k and v (new tokens) or neither");
  if (k) {
    for (const auto* t : {&*k, &*v}) {
      TORCH_CHECK(t->dim() == 4 && t->size(0) == q.size(0) && t->size(2) == k_cache.size(2) && t->size(3) == d,
                  "flash_attn_kvcache: k / v must be (batch=", q.size(0), ", seqlen_new, kv_heads=",
                  k_cache.size(2), ", head_dim=", d, "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                  "flash_attn_kvcache: k / v must be CPU tensors of q's dtype");
    }
    TORCH_CHECK(k->sizes() == v->sizes(), "flash_attn_kvcache: k and v must have one shape");
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == q.size(0) && cache_seqlens.device().is_cpu(),
              "flash_attn_kvcache: cache_seqlens must be int32 (batch=", q.size(0), ",) on the CPU, got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  if (block_table) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                    block_table->size(0) == q.size(0) && block_table->device().is_cpu(),
                "flash_attn_kvcache: block_table must be int32 (batch=", q.size(0), ", max_blocks) on the CPU, got ",
                block_table->scalar_type(), " ", block_table->sizes());
  } else {
    TORCH_CHECK(k_cache.size(0) >= q.size(0), "flash_attn_kvcache: the contiguous cache holds ", k_cache.size(0),
                " sequences but q has batch ", q.size(0));
  }
}

// Every sequence's attended length fits its cache, and every block it uses is a valid block index.
void check_lengths(const std::vector<int64_t>& lens, const at::Tensor& k_cache, const at::Tensor& table) {
  for (int64_t b = 0; b < int64_t(lens.size()); ++b) {
    if (!table.defined()) {
      TORCH_CHECK(lens[b] <= k_cache.size(1), "flash_attn_kvcache: sequence ", b, " needs ", lens[b],
                  " cache tokens (cache_seqlens + new tokens) but the cache holds ", k_cache.size(1));
      continue;
    }
    const int64_t blocks = (lens[b] + k_cache.size(1) - 1) / k_cache.size(1);
    TORCH_CHECK(blocks <= table.size(1), "flash_attn_kvcache: sequence ", b, " needs ", blocks,
                " blocks but block_table has ", table.size(1), " columns");
    const int32_t* row = table.data_ptr<int32_t>() + b * table.stride(0);
    for (int64_t i = 0; i < blocks; ++i)
      TORCH_CHECK(row[i] >= 0 && row[i] < k_cache.size(0), "flash_attn_kvcache: block_table[", b, ", ", i,
                  "] = ", row[i], " is outside [0, ", k_cache.size(0), ") (num_blocks)");
  }
}

template <typename T>
void append(const at::Tensor& cache, const at::Tensor& src, const int32_t* table, int64_t table_stride,
            const std::vector<int64_t>& start) {
  const int64_t batch = src.size(0), n = src.size(1), kv_heads = src.size(2), d = src.size(3);
  const T* sp = src.data_ptr<T>();
  // A decode step appends one row per head: too little to wake a thread for.
  at::parallel_for(0, batch * kv_heads, std::max<int64_t>(1, (int64_t{1} << 14) / (n * d + 1)), [&](int64_t begin,
                                                                                                   int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kv_heads, h = i % kv_heads;
      const Rows<T> dst = cache_rows<T>(cache, table ? table + b * table_stride : nullptr, b, h);
      for (int64_t t = 0; t < n; ++t)
        std::copy_n(sp + ((b * n + t) * kv_heads + h) * d, d, const_cast<T*>(dst.row(start[b] + t)));
    }
  });
}

constexpr int64_t kMinKeysPerThread = 4 * kBlockK;

int64_t pick_splits(int64_t num_splits, int64_t tasks, int64_t max_len) {
  // Enough tasks to keep every thread busy (4 per thread), but each split at least 4 key blocks.
  const int64_t by_threads = (4 * at::get_num_threads() + tasks - 1) / std::max<int64_t>(tasks, 1);
  const int64_t want = num_splits > 0 ? num_splits : by_threads;
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(1, (max_len + 4 * kBlockK - 1) / (4 * kBlockK)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_kvcache(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
                                                      const std::optional<at::Tensor>& v,
                                                      const at::Tensor& cache_seqlens,
                                                      const std::optional<at::Tensor>& block_table,
                                                      double softmax_scale, bool causal, int64_t window_left,
                                                      int64_t window_right, double softcap, int64_t num_splits) {
  check_inputs(q_in, k_cache, v_cache, k, v, cache_seqlens, block_table);
  const at::Tensor q = q_in.contiguous();
  const int64_t batch = q.size(0), sq = q.size(1), heads = q.size(2), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, n_new = k ? k->size(1) : 0;
  const int d = int(q.size(3)), ld = int(round_up(d, kVec));
  const at::Tensor table = block_table ? block_table->contiguous() : at::Tensor();
  const int32_t* tp = table.defined() ? table.data_ptr<int32_t>() : nullptr;
  const int64_t table_stride = table.defined() ? table.stride(0) : 0;

  std::vector<int64_t> start(batch), len(batch);
  const at::Tensor seqlens = cache_seqlens.contiguous();
  for (int64_t b = 0; b < batch; ++b) {
    start[b] = seqlens.data_ptr<int32_t>()[b];
    TORCH_CHECK(start[b] >= 0, "flash_attn_kvcache: cache_seqlens[", b, "] = ", start[b], " is negative");
    len[b] = start[b] + n_new;
  }
  check_lengths(len, k_cache, table);

  // Tasks: (sequence, group of <= kBlockQ packed rows, split). A task walks its key range block by block and
  // attends each block with every kv head in turn: the heads of a cache row lie side by side, so the cache is
  // read in address order (a decode step reads it once, from DRAM).
  const int64_t rows_total = sq * group, row_groups = (rows_total + kBlockQ - 1) / kBlockQ;
  const int64_t max_len = batch ? *std::max_element(len.begin(), len.end()) : 0;
  const int64_t splits = pick_splits(num_splits, batch * row_groups, max_len);
  const int64_t n_tasks = batch * row_groups * splits;
  // Partial results per (sequence, kv head, split): rows_total rows of o (ld floats), m and l.
  std::vector<float> po(batch * kv_heads * splits * rows_total * ld), pm(batch * kv_heads * splits * rows_total),
      pl(pm.size());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({batch, heads, sq}, q.options().dtype(at::kFloat));
  const Options opt(softmax_scale, causal, window_left, window_right, softcap);

  dispatch_float(q.scalar_type(), "flash_attn_kvcache", [&](auto zero) {
    using T = decltype(zero);
    if (k) {
      append<T>(k_cache, k->contiguous(), tp, table_stride, start);
      append<T>(v_cache, v->contiguous(), tp, table_stride, start);
    }
    const T* qp = q.data_ptr<T>();
    const Simd& isa = simd();
    // A task over a few key blocks is shorter than waking a second thread (short-context decode): give each
    // thread at least kMinKeysPerThread (key, kv head) pairs.
    const int64_t task_keys = std::max<int64_t>(1, (max_len + splits - 1) / splits) * kv_heads;
    const int64_t tasks_per_thread = (kMinKeysPerThread + task_keys - 1) / task_keys;
    in_turn((n_tasks + tasks_per_thread - 1) / tasks_per_thread, [&](auto take) {
      std::vector<float> qf(kv_heads * kBlockQ * ld), kt(int64_t(d) * kBlockK), vf(kBlockK * ld),
          s(kBlockQ * kBlockK);
      std::vector<int64_t> pos(kBlockQ);
      for (int64_t t = take(); t < n_tasks; t = take()) {
        // Causal row groups cost more the later they come: the threads take the costliest first, so the last
        // tasks taken are short.
        const int64_t split = t % splits, rg = row_groups - 1 - t / splits % row_groups, b = t / splits / row_groups;
        const int64_t r0 = rg * kBlockQ;
        const int rows = int(std::min<int64_t>(kBlockQ, rows_total - r0));
        for (int r = 0; r < rows; ++r) pos[r] = (r0 + r) / group + len[b] - sq;
        auto part = [&](int64_t h) { return ((b * kv_heads + h) * splits + split) * rows_total + r0; };
        for (int64_t h = 0; h < kv_heads; ++h) {
          for (int r = 0; r < rows; ++r) {
            const int64_t i = (r0 + r) / group, head = h * group + (r0 + r) % group;
            load_rows(Rows<T>{qp + ((b * sq + i) * heads + head) * d, 0}, 0, 1, d, ld,
                      qf.data() + (h * kBlockQ + r) * ld, opt.scale);
          }
          std::fill(po.data() + part(h) * ld, po.data() + (part(h) + rows) * ld, 0.f);
          std::fill(pm.data() + part(h), pm.data() + part(h) + rows, kNegInf);
          std::fill(pl.data() + part(h), pl.data() + part(h) + rows, 0.f);
        }
        const int64_t chunk = round_up((len[b] + splits - 1) / splits, kBlockK);
        const int64_t k_end = std::min(len[b], (split + 1) * chunk);
        const int32_t* row_table = tp ? tp + b * table_stride : nullptr;
        for (int64_t k0 = split * chunk; k0 < k_end; k0 += kBlockK)
          for (int64_t h = 0; h < kv_heads; ++h)
            attend(isa, opt, rows, qf.data() + h * kBlockQ * ld, ld, d, pos.data(), len[b],
                   cache_rows<T>(k_cache, row_table, b, h), cache_rows<T>(v_cache, row_table, b, h), k0,
                   std::min(k_end, k0 + kBlockK), kt.data(), vf.data(), s.data(), po.data() + part(h) * ld,
                   pm.data() + part(h), pl.data() + part(h));
      }
    });
    T* op = out.data_ptr<T>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, batch * kv_heads * rows_total, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(ld);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / rows_total, r = t % rows_total, b = bh / kv_heads;
        const int64_t i = r / group, head = bh % kv_heads * group + r % group;
        const int64_t first = bh * splits * rows_total + r;
        float big = kNegInf, l = 0.f;
        for (int64_t s = 0; s < splits; ++s) big = std::max(big, pm[first + s * rows_total]);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < splits && big != kNegInf; ++s) {
          const int64_t at = first + s * rows_total;
          const float w = std::exp(pm[at] - big);
          l += pl[at] * w;
          for (int c = 0; c < d; ++c) acc[c] += po[at * ld + c] * w;
        }
        finalize_row(acc.data(), big, l, d, op + ((b * sq + i) * heads + head) * d, lp + (b * heads + head) * sq + i);
      }
    });
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(flashgen, CPU, m) { m.impl("flash_attn_kvcache", &flash_attn_kvcache); }

}  // namespace flashgen::cpu::attn
