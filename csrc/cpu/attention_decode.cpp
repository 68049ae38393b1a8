// flashgen::flash_attn_kvcache and flash_attn_varlen_kvcache on CPU: decode and chunked prefill over a
// contiguous or paged KV cache, for a dense batch or packed sequences of any lengths (one kernel: a dense batch
// is packed sequences of one length).
//
// New k/v tokens are first written into the cache in place. Then, per (sequence, kv head), the queries of
// all q heads sharing that kv head are packed as the rows of one tile (query i, head-in-group j): with one
// decode token and GQA 3:1 that is 3 rows reading the cache once. Long caches are cut into num_splits key
// ranges processed in parallel (flash-decoding); each split keeps its running max m_s, sum l_s and
// unnormalized output o_s, merged in a fixed order: M = max m_s, l = sum l_s e^(m_s - M),
// out = sum o_s e^(m_s - M) / l, lse = M + log l. The varlen op cuts at fixed key positions (kSplitKeys), so a
// query's result does not depend on its batch; the dense op picks the split count for the batch at hand.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>

#include "cpu/attention.h"
#include "cpu/parallel.h"

namespace flashgen::cpu::attn {
namespace {

// A cache's pointer and strides, read from the tensor once per call, not in the per-block loop.
template <typename T>
struct CacheView {
  T* data;
  int64_t seq_stride, tok_stride, head_stride, col_stride, block_size;
  explicit CacheView(const at::Tensor& c)
      : data(c.data_ptr<T>()), seq_stride(c.stride(0)), tok_stride(c.stride(1)), head_stride(c.stride(2)),
        col_stride(c.stride(3)), block_size(c.size(1)) {}

  // Rows of cache sequence b, kv head h: contiguous (batch_cache, seqlen_cache, kv_heads, d) or paged
  // (num_blocks, block_size, kv_heads, d) through the block table row of b.
  Rows<T> rows(const int32_t* table, int64_t b, int64_t h) const {
    T* base = data + h * head_stride;
    if (table) return Rows<T>{base, tok_stride, table, block_size, seq_stride, col_stride};
    return Rows<T>{base + b * seq_stride, tok_stride, nullptr, 1, 0, col_stride};
  }
};

// Dense q (batch, seqlen_q, heads, d) with k, v (batch, seqlen_new, kv_heads, d), or packed (varlen) q
// (tokens, heads, d) with k, v (tokens, kv_heads, d); `batch` sequences.
void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table, bool varlen,
                  int64_t batch) {
  const int64_t dims = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == dims, op, ": q must be ", varlen ? "(total_tokens, heads, head_dim)" :
              "(batch, seqlen_q, heads, head_dim)", ", got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must be 4-D with one shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  for (const auto* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": the caches must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, ": k_cache / v_cache must be CPU tensors");
  }
  // Keys may also lie key-major (stride 1 along the tokens of a block): a block of them is then already the
  // transposed tile the scores read.
  TORCH_CHECK(k_cache.stride(3) == 1 || k_cache.stride(1) == 1, op, ": k_cache must be contiguous in head_dim ",
              "(stride(3) == 1) or in its tokens (stride(1) == 1), got strides ", k_cache.strides());
  TORCH_CHECK(v_cache.stride(3) == 1, op, ": v_cache must be contiguous in head_dim (stride(3) == 1), got strides ",
              v_cache.strides());
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor");
  const int64_t d = q.size(-1), heads = q.size(-2);
  TORCH_CHECK(d >= 1 && d <= 256, op, ": head_dim must be in [1, 256], got ", d);
  TORCH_CHECK(k_cache.size(3) == d, op, ": cache head_dim ", k_cache.size(3), " differs from q's ", d);
  TORCH_CHECK(k_cache.size(2) > 0 && heads % k_cache.size(2) == 0, op, ": q heads (", heads,
              ") must be a multiple of the cache's kv heads (", k_cache.size(2), ")");
  TORCH_CHECK(k.has_value() == v.has_value(), op, ": give both k and v (new tokens) or neither");
  if (k) {
    for (const auto* t : {&*k, &*v}) {
      TORCH_CHECK(t->dim() == dims && t->size(0) == q.size(0) && t->size(-2) == k_cache.size(2) && t->size(-1) == d,
                  op, ": k / v must be (", varlen ? "total_tokens=" : "batch=", q.size(0), varlen ? "" : ", seqlen_new",
                  ", kv_heads=", k_cache.size(2), ", head_dim=", d, "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(), op,
                  ": k / v must be CPU tensors of q's dtype");
    }
    TORCH_CHECK(k->sizes() == v->sizes(), op, ": k and v must have one shape");
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch && cache_seqlens.device().is_cpu(),
              op, ": cache_seqlens must be int32 (batch=", batch, ",) on the CPU, got ", cache_seqlens.scalar_type(),
              " ", cache_seqlens.sizes());
  if (block_table) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                    block_table->size(0) == batch && block_table->device().is_cpu(),
                op, ": block_table must be int32 (batch=", batch, ", max_blocks) on the CPU, got ",
                block_table->scalar_type(), " ", block_table->sizes());
  } else {
    TORCH_CHECK(k_cache.size(0) >= batch, op, ": the contiguous cache holds ", k_cache.size(0),
                " sequences but q has batch ", batch);
  }
}

// One sequence of a batch over the cache, in packed form: its queries are rows q_start .. q_start + sq - 1 of
// q (tokens, heads, d), its n_new new keys / values rows new_start .. of k, v (tokens, kv_heads, d), written at
// cache positions cached .. cached + n_new - 1; it attends len = cached + n_new keys, cut into splits key
// ranges of `chunk` keys (a multiple of kBlockK). lse(head, i) lies at lse_base + head * lse_head_stride + i.
struct CacheSeq {
  int64_t q_start, sq, new_start, n_new, cached, len, chunk, splits, lse_base;
  const int32_t* table;  // its block table row (paged cache), or null: row `index` of a contiguous cache
  int64_t index;
};

// Every sequence's attended length fits its cache, and every block it uses is a valid block index.
void check_lengths(const char* op, const std::vector<CacheSeq>& seqs, const at::Tensor& k_cache, int64_t max_blocks) {
  for (int64_t b = 0; b < int64_t(seqs.size()); ++b) {
    const CacheSeq& s = seqs[b];
    TORCH_CHECK(s.cached >= 0, op, ": cache_seqlens[", b, "] = ", s.cached, " is negative");
    if (!s.table) {
      TORCH_CHECK(s.len <= k_cache.size(1), op, ": sequence ", b, " needs ", s.len,
                  " cache tokens (cache_seqlens + new tokens) but the cache holds ", k_cache.size(1));
      continue;
    }
    const int64_t blocks = (s.len + k_cache.size(1) - 1) / k_cache.size(1);
    TORCH_CHECK(blocks <= max_blocks, op, ": sequence ", b, " needs ", blocks, " blocks but block_table has ",
                max_blocks, " columns");
    for (int64_t i = 0; i < blocks; ++i)
      TORCH_CHECK(s.table[i] >= 0 && s.table[i] < k_cache.size(0), op, ": block_table[", b, ", ", i, "] = ",
                  s.table[i], " is outside [0, ", k_cache.size(0), ") (num_blocks)");
  }
}

// Writes the new keys (or values) of sequence s for kv head h that fall at cache positions [from, to); src's
// tokens lie src_row elements apart.
template <typename T>
void write_new(const CacheView<T>& view, const T* src, int64_t src_row, int64_t d, const CacheSeq& s, int64_t h,
               int64_t from, int64_t to) {
  const Rows<T> dst = view.rows(s.table, s.index, h);
  for (int64_t t = std::max(from, s.cached); t < std::min(to, s.cached + s.n_new); ++t) {
    const T* row = src + (s.new_start + t - s.cached) * src_row + h * d;
    T* at = const_cast<T*>(dst.row(t));
    if (dst.col_stride == 1) {
      std::copy_n(row, d, at);
    } else {
      for (int64_t c = 0; c < d; ++c) at[c * dst.col_stride] = row[c];
    }
  }
}

// Every new key and value of the sequences `which` selects, (sequence, kv head) pairs shared out to the threads.
template <typename T, typename Which>
void append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
            const std::vector<CacheSeq>& seqs, Which&& which) {
  const int64_t kv_heads = k.size(1), d = k.size(2), n = int64_t(seqs.size());
  const CacheView<T> kc(k_cache), vc(v_cache);
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const CacheSeq& s = seqs[i / kv_heads];
      if (!which(s)) continue;
      write_new(kc, k.data_ptr<T>(), k.stride(0), d, s, i % kv_heads, s.cached, s.len);
      write_new(vc, v.data_ptr<T>(), v.stride(0), d, s, i % kv_heads, s.cached, s.len);
    }
  });
}

// (key, kv head) pairs worth a thread: one key block. A batch-1 decode of the default model (3 kv heads) then
// shares its heads out from 43 keys on, not 86 (tg128 from an empty cache, 2 threads, alternating builds: mean
// 170 -> 177 tok/s over 6 rounds, the rounds within this VM's noise; 1B Q4_0 unchanged at 43-44).
constexpr int64_t kMinKeysPerThread = kBlockK;

// Writes k, v (packed, or undefined) into the caches, then out (packed like q) and lse of every sequence.
void attend_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                  const at::Tensor& v, const std::vector<CacheSeq>& seqs, int64_t lse_head_stride, const Options& opt,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int d = int(q.size(2)), ld = int(round_up(d, kVec));
  const int64_t n_seqs = int64_t(seqs.size());

  // Tasks: (sequence, group of <= kBlockQ packed (query, head-in-group) rows, split, kv heads). A task walks its
  // key range block by block and attends each block with each of its kv heads in turn: the heads of a cache row
  // lie side by side, so the cache is read in address order (a decode step reads it once, from DRAM). Causal row
  // groups cost more the later they come: they are listed (and taken by the threads) first, so the last tasks
  // taken are short.
  struct Task {
    int64_t seq, r0, split, h0, h1;
  };
  std::vector<Task> tasks;
  // Partial results per (sequence, kv head, split, row): o (ld floats), m and l; part_base: a sequence's first.
  std::vector<int64_t> part_base(n_seqs + 1, 0), merge_base(n_seqs + 1, 0);
  int64_t task_keys = 1;
  for (int64_t b = 0; b < n_seqs; ++b) {
    const CacheSeq& s = seqs[b];
    const int64_t rows_total = s.sq * group;
    for (int64_t r0 = (rows_total - 1) / kBlockQ * kBlockQ; r0 >= 0 && rows_total; r0 -= kBlockQ)
      for (int64_t split = 0; split < s.splits; ++split) tasks.push_back({b, r0, split, 0, kv_heads});
    part_base[b + 1] = part_base[b] + kv_heads * s.splits * rows_total;
    merge_base[b + 1] = merge_base[b] + kv_heads * rows_total;
    task_keys = std::max(task_keys, std::min(s.len, s.chunk) * kv_heads);
  }
  // Fewer tasks than threads (one sequence decoding over a short cache): the kv heads are shared out too, as
  // long as each part keeps kMinKeysPerThread (key, kv head) pairs. Each (row, head) is computed the same either
  // way. (A batch-1 decode step of the default model at 160 keys: the attention of one layer took ~40 us on one
  // thread while the other waited.)
  const int64_t threads = at::get_num_threads();
  if (int64_t(tasks.size()) < threads) {
    const int64_t parts = std::min({kv_heads, (2 * threads + int64_t(tasks.size()) - 1) / int64_t(tasks.size()),
                                    std::max<int64_t>(1, task_keys / kMinKeysPerThread)});
    std::vector<Task> split_tasks;
    for (const Task& t : tasks)
      for (int64_t p = 0; p < parts; ++p)
        split_tasks.push_back({t.seq, t.r0, t.split, p * kv_heads / parts, (p + 1) * kv_heads / parts});
    tasks = std::move(split_tasks);
    task_keys = (task_keys + parts - 1) / parts;
  }
  const int64_t n_tasks = int64_t(tasks.size());
  std::vector<float> po(part_base[n_seqs] * ld), pm(part_base[n_seqs]), pl(part_base[n_seqs]);

  dispatch_float(q.scalar_type(), "flash_attn_kvcache", [&](auto zero) {
    using T = decltype(zero);
    // The new keys and values of a sequence of one row group (a decode step's) are written by the tasks that
    // read them, each those of its key range and kv heads, just before: the writes are shared out with the
    // tasks, and the lines they fill are read back from cache. Keys lie key-major on the CPU, so writing one
    // key fills d lines, each a DRAM miss: done up front on one thread, the writes of a 16-sequence decode step
    // of the default model took 6% of its time while the other thread waited. Longer chunks are written first.
    auto in_task = [&](const CacheSeq& s) { return s.sq >= 1 && s.sq * group <= kBlockQ; };
    if (k.defined() && !std::all_of(seqs.begin(), seqs.end(), in_task))
      append<T>(k_cache, v_cache, k, v, seqs, [&](const CacheSeq& s) { return !in_task(s); });
    const T* qp = q.data_ptr<T>();
    const T *kp = k.defined() ? k.data_ptr<T>() : nullptr, *vp = v.defined() ? v.data_ptr<T>() : nullptr;
    const CacheView<T> kc(k_cache), vc(v_cache);
    const Simd& isa = simd();
    // A task over a few key blocks is shorter than waking a second thread (short-context decode): give each
    // thread at least kMinKeysPerThread (key, kv head) pairs.
    const int64_t tasks_per_thread = (kMinKeysPerThread + task_keys - 1) / task_keys;
    in_turn((n_tasks + tasks_per_thread - 1) / tasks_per_thread, [&](auto take) {
      // Scratch left uninitialized: every element is written before it is read, except the key columns of a
      // partial block past its keys, whose scores the mask overwrites. Zeroing ~100 KB per call and layer cost a
      // batch-1 decode step of the default model ~1% of its samples (memset), with the second thread waiting.
      const auto qf = std::make_unique_for_overwrite<float[]>(kv_heads * kBlockQ * ld);
      const auto kt = std::make_unique_for_overwrite<float[]>(int64_t(d) * kBlockK);
      const auto vf = std::make_unique_for_overwrite<float[]>(kBlockK * ld);
      const auto s = std::make_unique_for_overwrite<float[]>(kBlockQ * kBlockK);
      std::vector<int64_t> pos(kBlockQ);
      for (int64_t t = take(); t < n_tasks; t = take()) {
        const auto [b, r0, split, h0, h1] = tasks[t];
        const CacheSeq& sq = seqs[b];
        const int64_t rows_total = sq.sq * group;
        const int rows = int(std::min<int64_t>(kBlockQ, rows_total - r0));
        for (int r = 0; r < rows; ++r) pos[r] = (r0 + r) / group + sq.len - sq.sq;
        auto part = [&](int64_t h) { return part_base[b] + (h * sq.splits + split) * rows_total + r0; };
        const int64_t k_end = std::min(sq.len, (split + 1) * sq.chunk);
        if (kp && in_task(sq))
          for (int64_t h = h0; h < h1; ++h) {
            write_new(kc, kp, k.stride(0), d, sq, h, split * sq.chunk, k_end);
            write_new(vc, vp, v.stride(0), d, sq, h, split * sq.chunk, k_end);
          }
        for (int64_t h = h0; h < h1; ++h) {
          for (int r = 0; r < rows; ++r) {
            const int64_t i = (r0 + r) / group, head = h * group + (r0 + r) % group;
            load_rows(Rows<T>{qp + (sq.q_start + i) * q.stride(0) + head * d, 0}, 0, 1, d, ld,
                      qf.get() + (h * kBlockQ + r) * ld, opt.scale);
          }
          std::fill(po.data() + part(h) * ld, po.data() + (part(h) + rows) * ld, 0.f);
          std::fill(pm.data() + part(h), pm.data() + part(h) + rows, kNegInf);
          std::fill(pl.data() + part(h), pl.data() + part(h) + rows, 0.f);
        }
        for (int64_t k0 = split * sq.chunk; k0 < k_end; k0 += kBlockK)
          for (int64_t h = h0; h < h1; ++h)
            attend(isa, opt, rows, qf.get() + h * kBlockQ * ld, ld, d, pos.data(), sq.len,
                   kc.rows(sq.table, sq.index, h), vc.rows(sq.table, sq.index, h), k0,
                   std::min(k_end, k0 + kBlockK), kt.get(), vf.get(), s.get(), po.data() + part(h) * ld,
                   pm.data() + part(h), pl.data() + part(h));
      }
    });
    // Merge the splits of each (sequence, kv head, row) in split order.
    T* op = out.data_ptr<T>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, merge_base[n_seqs], 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(ld);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = std::upper_bound(merge_base.begin(), merge_base.end(), t) - merge_base.begin() - 1;
        const CacheSeq& sq = seqs[b];
        const int64_t rows_total = sq.sq * group, h = (t - merge_base[b]) / rows_total;
        const int64_t r = (t - merge_base[b]) % rows_total;
        const int64_t i = r / group, head = h * group + r % group;
        const int64_t first = part_base[b] + h * sq.splits * rows_total + r;
        float big = kNegInf, l = 0.f;
        for (int64_t s = 0; s < sq.splits; ++s) big = std::max(big, pm[first + s * rows_total]);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < sq.splits && big != kNegInf; ++s) {
          const int64_t at = first + s * rows_total;
          const float w = std::exp(pm[at] - big);
          l += pl[at] * w;
          for (int c = 0; c < d; ++c) acc[c] += po[at * ld + c] * w;
        }
        finalize_row(acc.data(), big, l, d, op + ((sq.q_start + i) * heads + head) * d,
                     lp + sq.lse_base + head * lse_head_stride + i);
      }
    });
  });
}

int64_t pick_splits(int64_t num_splits, int64_t tasks, int64_t max_len) {
  // Enough tasks to keep every thread busy (4 per thread), but each split at least 4 key blocks.
  const int64_t by_threads = (4 * at::get_num_threads() + tasks - 1) / std::max<int64_t>(tasks, 1);
  const int64_t want = num_splits > 0 ? num_splits : by_threads;
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(1, (max_len + 4 * kBlockK - 1) / (4 * kBlockK)));
}

// Packed (tokens, heads, d) q, k or v as the kernel reads them: each token's heads dense, the tokens at any stride
// (the decoder step's q, k, v are column ranges of one (tokens, qkv) buffer), else a contiguous copy.
at::Tensor dense_rows(const at::Tensor& t) {
  return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous();
}

const int32_t* table_row(const at::Tensor& table, int64_t b) {
  return table.defined() ? table.data_ptr<int32_t>() + b * table.stride(0) : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_kvcache(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
                                                      const std::optional<at::Tensor>& v,
                                                      const at::Tensor& cache_seqlens,
                                                      const std::optional<at::Tensor>& block_table,
                                                      double softmax_scale, bool causal, int64_t window_left,
                                                      int64_t window_right, double softcap, int64_t num_splits) {
  check_inputs("flash_attn_kvcache", q_in, k_cache, v_cache, k, v, cache_seqlens, block_table, false, q_in.size(0));
  const at::Tensor q = q_in.contiguous();
  const int64_t batch = q.size(0), sq = q.size(1), heads = q.size(2), kv_heads = k_cache.size(2);
  const int64_t n_new = k ? k->size(1) : 0;
  const at::Tensor table = block_table ? block_table->contiguous() : at::Tensor();
  const at::Tensor seqlens = cache_seqlens.contiguous();
  std::vector<CacheSeq> seqs(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t cached = seqlens.data_ptr<int32_t>()[b];
    seqs[b] = {b * sq, sq, b * n_new, n_new, cached, cached + n_new, 0, 1, b * heads * sq, table_row(table, b), b};
  }
  check_lengths("flash_attn_kvcache", seqs, k_cache, table.defined() ? table.size(1) : 0);
  // The split count follows the batch's longest sequence and the thread count: the fastest split for a
  // batch (flash_attn_varlen_kvcache fixes it by position instead).
  int64_t max_len = 0;
  for (const CacheSeq& s : seqs) max_len = std::max(max_len, s.len);
  const int64_t row_groups = (sq * (heads / kv_heads) + kBlockQ - 1) / kBlockQ;
  const int64_t splits = pick_splits(num_splits, batch * row_groups, max_len);
  for (CacheSeq& s : seqs) s.splits = splits, s.chunk = round_up((s.len + splits - 1) / splits, kBlockK);

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({batch, heads, sq}, q.options().dtype(at::kFloat));
  auto packed = [&](const std::optional<at::Tensor>& t) { return t ? t->contiguous().flatten(0, 1) : at::Tensor(); };
  at::Tensor out_rows = out.view({batch * sq, heads, q.size(3)});
  attend_cache(q.view({batch * sq, heads, q.size(3)}), k_cache, v_cache, packed(k), packed(v), seqs, sq,
               Options(softmax_scale, causal, window_left, window_right, softcap), out_rows, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_kvcache(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cu_seqlens_q, const at::Tensor& cache_seqlens,
    const at::Tensor& block_table, double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap) {
  const char* op = "flash_attn_varlen_kvcache";
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1 &&
                  cu_seqlens_q.device().is_cpu(),
              op, ": cu_seqlens_q must be an int32 (batch + 1,) CPU tensor, got ", cu_seqlens_q.scalar_type(), " ",
              cu_seqlens_q.sizes());
  const int64_t batch = cu_seqlens_q.size(0) - 1, total = q_in.size(0);
  check_inputs(op, q_in, k_cache, v_cache, k, v, cache_seqlens, block_table, true, batch);
  const at::Tensor q = dense_rows(q_in), table = block_table.contiguous(), cu = cu_seqlens_q.contiguous();
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const int32_t *cp = cu.data_ptr<int32_t>(), *lp = seqlens.data_ptr<int32_t>();
  TORCH_CHECK(cp[0] == 0, op, ": cu_seqlens_q[0] must be 0, got ", cp[0]);
  std::vector<CacheSeq> seqs(batch);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cp[b + 1] >= cp[b] && cp[b + 1] <= total, op, ": cu_seqlens_q must be non-decreasing and at most ",
                "the number of tokens (", total, "), got cu_seqlens_q[", b, ":", b + 2, "] = ", cp[b], ", ", cp[b + 1]);
    const int64_t n = cp[b + 1] - cp[b], cached = lp[b], len = cached + (k ? n : 0);
    // Splits at fixed key positions: a query's arithmetic depends on its own position only, never on its
    // batch-mates or on how its sequence was chunked (batch invariance).
    const int64_t splits = std::max<int64_t>(1, (len + kSplitKeys - 1) / kSplitKeys);
    seqs[b] = {cp[b], n, cp[b], k ? n : 0, cached, len, kSplitKeys, splits, cp[b], table_row(table, b), b};
  }
  check_lengths(op, seqs, k_cache, table.size(1));
  // Tokens after the last sequence (cu_seqlens_q[-1] < total) attend nothing: out 0, lse -inf.
  at::Tensor out = at::zeros(q.sizes(), q.options());  // contiguous, whatever q's token stride
  at::Tensor lse = at::full({q.size(1), total}, kNegInf, q.options().dtype(at::kFloat));
  attend_cache(q, k_cache, v_cache, k ? dense_rows(*k) : at::Tensor(), v ? dense_rows(*v) : at::Tensor(), seqs,
               total, Options(softmax_scale, causal, window_left, window_right, softcap), out, lse);
  return {out, lse};
}

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("flash_attn_kvcache", &flash_attn_kvcache);
  m.impl("flash_attn_varlen_kvcache", &flash_attn_varlen_kvcache);
}

}  // namespace flashgen::cpu::attn
