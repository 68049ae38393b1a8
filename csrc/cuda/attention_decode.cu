// Paged split-K decode attention (flash-decoding) for one query token per sequence.
//
// flashgen_cuda::flash_attn_kvcache has the schema of flashgen::flash_attn_kvcache (kernels/ops.py) and
// supports seqlen_q == 1 (decode), which is the latency-critical serving path; chunked prefill (seqlen_q > 1)
// is refused here and served by the Triton kernel.
//
// Math, for q head h of sequence b with cache length L (after appending the new tokens), query position
// pos = L - 1 and kv head h / group:
//   x_j = scale * q . k_j;  s_j = softcap * tanh(x_j / softcap) if softcap > 0 else x_j
//   attended keys: j in [max(0, pos - window_left), L)   (window_right and causal do not bind at pos = L - 1)
//   lse = log sum_j exp(s_j);  out = sum_j exp(s_j - lse) v_j;  no key: out = 0, lse = -inf.
// Work split: grid (splits, heads / G, batch). A block (4 warps) takes G q heads sharing one kv head and one
// contiguous range of keys; each warp runs an online softmax over every 4th group of UNROLL keys (lane i holds
// element pairs i, i + 32, ... of q, k, v and the accumulator; scores are warp-reduced), then the warps are merged
// through shared memory. With one split the block writes out/lse directly; otherwise it writes a normalized fp32
// partial output and its lse, and merge_splits_kernel combines them: lse = log sum_s exp(lse_s),
// out = sum_s exp(lse_s - lse) out_s.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

namespace flashgen_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;  // keys in flight per warp: their loads are issued before any is used
constexpr int kMaxSplits = 64;

template <typename T> struct Pair;
template <> struct Pair<at::Half> {
  using type = __half2;
  static __device__ float2 load(const void* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
  static __device__ void store(void* p, float2 v) { *reinterpret_cast<__half2*>(p) = __float22half2_rn(v); }
};
template <> struct Pair<at::BFloat16> {
  using type = __nv_bfloat162;
  static __device__ float2 load(const void* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  static __device__ void store(void* p, float2 v) { *reinterpret_cast<__nv_bfloat162*>(p) = __float22bfloat162_rn(v); }
};

struct DecodeParams {
  const void* q;
  void* k_cache;
  void* v_cache;
  const int* cache_seqlens;
  const int* block_table;  // nullptr: contiguous cache indexed by batch row
  void* out;               // (B, 1, H, D) in the input dtype, written when num_splits == 1
  float* lse;              // (B, H, 1)
  float* out_part;         // (splits, B, H, D) fp32, when num_splits > 1
  float* lse_part;         // (splits, B, H)
  int64_t q_sb, q_sh;      // strides (elements) of q: batch, head
  int64_t k_sb, k_ss, k_sh, v_sb, v_ss, v_sh;  // cache strides: block (or batch row), row, kv head
  int64_t bt_sb;
  int batch, heads, group, head_dim, seqlen_new, page_size, capacity, num_blocks, num_splits;
  float scale, softcap;
  int window_left;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Element offset of cache row j of sequence b (both caches share the row layout's block/row split), or -1
// when the row lies outside the cache (a bad block table entry): such rows are skipped, never read.
__device__ __forceinline__ int64_t cache_row(const DecodeParams& p, int b, int j, int64_t s_b, int64_t s_s) {
  if (p.block_table == nullptr) return b * s_b + j * s_s;
  const int blk = p.block_table[b * p.bt_sb + j / p.page_size];
  if (blk < 0 || blk >= p.num_blocks) return -1;
  return blk * s_b + static_cast<int64_t>(j % p.page_size) * s_s;
}

// Length attended by sequence b: cached tokens plus the appended ones, clamped to the cache so that a
// too-short cache can never be read out of bounds (the public API rejects it with a message before this).
__device__ __forceinline__ int seq_len(const DecodeParams& p, int b) {
  return min(p.cache_seqlens[b] + p.seqlen_new, p.capacity);
}

// NP: element pairs per lane (head dims up to 64 * NP); G: q heads per block (all share one kv head).
template <typename T, int NP, int G>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(DecodeParams p) {
  using P2 = Pair<T>;
  const int split = blockIdx.x, b = blockIdx.z;
  const int h0 = blockIdx.y * G, hk = h0 / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int len = seq_len(p, b);
  const int lo = p.window_left >= 0 ? max(0, len - 1 - p.window_left) : 0;
  const int per_split = (len - lo + p.num_splits - 1) / p.num_splits;
  const int start = lo + split * per_split, end = min(len, start + per_split);

  float2 q[G][NP], acc[G][NP];
  float m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int d = 2 * (lane + 32 * i);
      float2 x = make_float2(0.f, 0.f);
      if (d < p.head_dim)
        x = P2::load(static_cast<const T*>(p.q) + b * p.q_sb + (h0 + g) * p.q_sh + d);
      q[g][i] = make_float2(x.x * p.scale, x.y * p.scale);
      acc[g][i] = make_float2(0.f, 0.f);
    }
  }

  const T* kc = static_cast<const T*>(p.k_cache) + hk * p.k_sh;
  const T* vc = static_cast<const T*>(p.v_cache) + hk * p.v_sh;
  for (int j0 = start + warp * kUnroll; j0 < end; j0 += kWarps * kUnroll) {
    float2 k[kUnroll][NP], v[kUnroll][NP];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      const int64_t kr = j < end ? cache_row(p, b, j, p.k_sb, p.k_ss) : -1;
      const int64_t vr = j < end ? cache_row(p, b, j, p.v_sb, p.v_ss) : -1;
      ok[u] = kr >= 0 && vr >= 0;
#pragma unroll
      for (int i = 0; i < NP; ++i) {
        const int d = 2 * (lane + 32 * i);
        const bool in = ok[u] && d < p.head_dim;
        k[u][i] = in ? P2::load(kc + kr + d) : make_float2(0.f, 0.f);
        v[u][i] = in ? P2::load(vc + vr + d) : make_float2(0.f, 0.f);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s[kUnroll];
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < NP; ++i) dot += q[g][i].x * k[u][i].x + q[g][i].y * k[u][i].y;
        dot = warp_sum(dot);
        if (p.softcap > 0.f) dot = p.softcap * tanhf(dot / p.softcap);
        s[u] = ok[u] ? dot : -INFINITY;
        m_new = fmaxf(m_new, s[u]);
      }
      if (m_new == -INFINITY) continue;  // no valid key in this group yet
      const float alpha = __expf(m[g] - m_new);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < NP; ++i) acc[g][i] = make_float2(acc[g][i].x * alpha, acc[g][i].y * alpha);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float e = __expf(s[u] - m_new);
        l[g] += e;
#pragma unroll
        for (int i = 0; i < NP; ++i) {
          acc[g][i].x += e * v[u][i].x;
          acc[g][i].y += e * v[u][i].y;
        }
      }
      m[g] = m_new;
    }
  }

  // Merge the warps: each rescales its accumulator to the block's running max and the sums are added.
  __shared__ float sm_m[kWarps][G], sm_l[kWarps][G];
  __shared__ float2 sm_acc[kWarps][G][NP * 32];
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < NP; ++i) sm_acc[warp][g][lane + 32 * i] = acc[g][i];
  __syncthreads();

  const bool direct = p.num_splits == 1;
  for (int e = threadIdx.x; e < G * NP * 32; e += kThreads) {
    const int g = e / (NP * 32), pi = e % (NP * 32), d = 2 * pi;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    float sum = 0.f;
    float2 o = make_float2(0.f, 0.f);
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = __expf(sm_m[w][g] - mx);  // exp(-inf) = 0 for warps that saw no key
        sum += sm_l[w][g] * f;
        o.x += sm_acc[w][g][pi].x * f;
        o.y += sm_acc[w][g][pi].y * f;
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    o = make_float2(o.x * inv, o.y * inv);
    const float lse = sum > 0.f ? mx + logf(sum) : -INFINITY;
    const int64_t row = static_cast<int64_t>(b) * p.heads + h0 + g;
    if (direct) {
      if (d < p.head_dim) P2::store(static_cast<T*>(p.out) + row * p.head_dim + d, o);
      if (pi == 0) p.lse[row] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(split) * p.batch * p.heads + row;
      if (d < p.head_dim) *reinterpret_cast<float2*>(p.out_part + prow * p.head_dim + d) = o;
      if (pi == 0) p.lse_part[prow] = lse;
    }
  }
}

// One block per (batch, head): out = sum_s exp(lse_s - lse) out_s with lse = log sum_s exp(lse_s).
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(DecodeParams p) {
  const int64_t row = blockIdx.x;  // b * heads + h
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads;
  __shared__ float w[kMaxSplits];
  __shared__ float total;
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_part[s * rows + row]);
    float sum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      w[s] = mx == -INFINITY ? 0.f : __expf(p.lse_part[s * rows + row] - mx);
      sum += w[s];
    }
    total = sum;
    p.lse[row] = sum > 0.f ? mx + logf(sum) : -INFINITY;
  }
  __syncthreads();
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < p.num_splits; ++s) o += w[s] * p.out_part[(s * rows + row) * p.head_dim + d];
    static_cast<T*>(p.out)[row * p.head_dim + d] = static_cast<T>(o * inv);
  }
}

// Writes the new tokens k/v (B, S_new, Hkv, D) at cache positions cache_seqlens[b] + t; one block per (t, b).
template <typename T>
__global__ void append_kv_kernel(DecodeParams p, const T* k, const T* v, int64_t k_sb, int64_t k_ss, int64_t k_sh,
                                 int64_t v_sb, int64_t v_ss, int64_t v_sh, int kv_heads) {
  const int t = blockIdx.x, b = blockIdx.y;
  const int j = p.cache_seqlens[b] + t;
  if (j >= p.capacity) return;
  const int64_t kr = cache_row(p, b, j, p.k_sb, p.k_ss), vr = cache_row(p, b, j, p.v_sb, p.v_ss);
  if (kr < 0 || vr < 0) return;
  for (int e = threadIdx.x; e < kv_heads * p.head_dim; e += blockDim.x) {
    const int h = e / p.head_dim, d = e % p.head_dim;
    static_cast<T*>(p.k_cache)[kr + h * p.k_sh + d] = k[b * k_sb + t * k_ss + h * k_sh + d];
    static_cast<T*>(p.v_cache)[vr + h * p.v_sh + d] = v[b * v_sb + t * v_ss + h * v_sh + d];
  }
}

template <typename T, int NP>
void launch_split(const DecodeParams& p, int heads_per_block, cudaStream_t stream) {
  const dim3 grid(p.num_splits, p.heads / heads_per_block, p.batch);
  switch (heads_per_block) {
    case 8: decode_split_kernel<T, NP, 8><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: decode_split_kernel<T, NP, 4><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: decode_split_kernel<T, NP, 2><<<grid, kThreads, 0, stream>>>(p); break;
    default: decode_split_kernel<T, NP, 1><<<grid, kThreads, 0, stream>>>(p); break;
  }
}

template <typename T>
void launch(const DecodeParams& p, int heads_per_block, cudaStream_t stream) {
  if (p.head_dim <= 64) launch_split<T, 1>(p, heads_per_block, stream);
  else if (p.head_dim <= 128) launch_split<T, 2>(p, heads_per_block, stream);
  else launch_split<T, 4>(p, heads_per_block, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    merge_splits_kernel<T><<<p.batch * p.heads, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run(const DecodeParams& p, const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
         int heads_per_block, cudaStream_t stream) {
  if (p.seqlen_new > 0) {
    append_kv_kernel<T><<<dim3(p.seqlen_new, p.batch), kThreads, 0, stream>>>(
        p, k->data_ptr<T>(), v->data_ptr<T>(), k->stride(0), k->stride(1), k->stride(2), v->stride(0),
        v->stride(1), v->stride(2), k->size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch<T>(p, heads_per_block, stream);
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "flash_attn_kvcache: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "flash_attn_kvcache: ", name, " is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.dim() == dim, "flash_attn_kvcache: ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
}

void check_attn_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_tensor(t, name, q, 4);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flash_attn_kvcache: ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(t.stride(3) == 1, "flash_attn_kvcache: ", name, " must be contiguous in head_dim (stride 1)");
  TORCH_CHECK(t.size(3) == q.size(3), "flash_attn_kvcache: ", name, " has head_dim ", t.size(3), ", q has ",
              q.size(3));
  // Element pairs are loaded as one 4-byte word: rows must start 4-byte aligned.
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(t.stride(i) % 2 == 0 || t.size(i) == 1, "flash_attn_kvcache: ", name,
                " needs even strides (element pairs are loaded together), got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0, "flash_attn_kvcache: ", name,
              " must start at a 4-byte aligned address (an even element offset)");
}

int heuristic_splits(int blocks, int capacity, int device) {
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  // Fill the GPU about twice over, but give each split at least 256 keys of the cache.
  const int by_occupancy = (2 * sms + blocks - 1) / blocks;
  const int by_length = (capacity + 255) / 256;
  return std::max(1, std::min({by_occupancy, by_length, kMaxSplits}));
}

std::tuple<at::Tensor, at::Tensor> flash_attn_kvcache(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap, int64_t num_splits) {
  (void)causal;  // with one query at the last position, causal and window_right mask nothing
  (void)window_right;
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, "flash_attn_kvcache: q must be a CUDA tensor (batch, 1, heads, head_dim),"
              " got shape ", q.sizes(), " on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "flash_attn_kvcache (CUDA C++): q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(1) == 1, "flash_attn_kvcache (CUDA C++) decodes one query per sequence, got seqlen_q ",
              q.size(1), "; use the Triton kernel (FLASHGEN_CUDA_BACKEND unset) for chunked prefill");
  const int64_t batch = q.size(0), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(head_dim >= 2 && head_dim <= 256 && head_dim % 2 == 0,
              "flash_attn_kvcache (CUDA C++): head_dim must be even and in [2, 256], got ", head_dim);
  TORCH_CHECK(q.stride(3) == 1 && q.stride(0) % 2 == 0 && q.stride(2) % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 4 == 0,
              "flash_attn_kvcache: q must be contiguous in head_dim, with even strides and a 4-byte aligned start, "
              "got strides ", q.strides());
  check_attn_tensor(k_cache, "k_cache", q);
  check_attn_tensor(v_cache, "v_cache", q);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "flash_attn_kvcache: k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " must have the same shape");
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "flash_attn_kvcache: heads (", heads,
              ") must be a multiple of kv_heads (", kv_heads, ")");
  check_tensor(cache_seqlens, "cache_seqlens", q, 1);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.size(0) == batch &&
                  cache_seqlens.is_contiguous(),
              "flash_attn_kvcache: cache_seqlens must be contiguous int32 of shape (", batch, "), got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  TORCH_CHECK(k.has_value() == v.has_value(), "flash_attn_kvcache: give both k and v, or neither");
  int64_t seqlen_new = 0;
  if (k.has_value()) {
    check_attn_tensor(*k, "k", q);
    check_attn_tensor(*v, "v", q);
    TORCH_CHECK(k->size(0) == batch && k->size(2) == kv_heads && k->sizes() == v->sizes(),
                "flash_attn_kvcache: k and v must have shape (", batch, ", seqlen_new, ", kv_heads, ", ", head_dim,
                "), got ", k->sizes(), " and ", v->sizes());
    seqlen_new = k->size(1);
  }
  const bool paged = block_table.has_value();
  int64_t capacity;
  if (paged) {
    check_tensor(*block_table, "block_table", q, 2);
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->size(0) == batch &&
                    block_table->stride(1) == 1,
                "flash_attn_kvcache: block_table must be int32 (", batch, ", max_blocks) with unit column stride, got ",
                block_table->scalar_type(), " ", block_table->sizes());
    capacity = block_table->size(1) * k_cache.size(1);
  } else {
    TORCH_CHECK(k_cache.size(0) >= batch, "flash_attn_kvcache: contiguous k_cache has ", k_cache.size(0),
                " batch rows, fewer than batch ", batch);
    capacity = k_cache.size(1);
  }
  TORCH_CHECK(capacity < (int64_t{1} << 31), "flash_attn_kvcache: cache capacity ", capacity,
              " tokens per sequence exceeds int32");
  TORCH_CHECK(num_splits >= 0, "flash_attn_kvcache: num_splits must be >= 0 (0 = heuristic), got ", num_splits);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t group = heads / kv_heads;
  const int heads_per_block = group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;

  DecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.block_table = paged ? block_table->data_ptr<int>() : nullptr;
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(2);
  p.k_sb = k_cache.stride(0);
  p.k_ss = k_cache.stride(1);
  p.k_sh = k_cache.stride(2);
  p.v_sb = v_cache.stride(0);
  p.v_ss = v_cache.stride(1);
  p.v_sh = v_cache.stride(2);
  p.bt_sb = paged ? block_table->stride(0) : 0;
  p.batch = batch;
  p.heads = heads;
  p.group = group;
  p.head_dim = head_dim;
  p.seqlen_new = seqlen_new;
  p.page_size = k_cache.size(1);
  p.capacity = capacity;
  p.num_blocks = k_cache.size(0);
  p.scale = softmax_scale;
  p.softcap = softcap;
  p.window_left = window_left;
  const int blocks = batch * (heads / heads_per_block);
  p.num_splits = num_splits > 0 ? std::min<int64_t>(num_splits, kMaxSplits)
                                 : heuristic_splits(blocks, capacity, q.get_device());

  auto out = at::empty({batch, 1, heads, head_dim}, q.options());
  auto lse = at::empty({batch, heads, 1}, q.options().dtype(at::kFloat));
  at::Tensor out_part, lse_part;
  if (p.num_splits > 1) {
    out_part = at::empty({p.num_splits, batch, heads, head_dim}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.num_splits, batch, heads}, q.options().dtype(at::kFloat));
    p.out_part = out_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (batch == 0 || heads == 0) return {out, lse};

  if (q.scalar_type() == at::kHalf)
    run<at::Half>(p, k, v, heads_per_block, stream);
  else
    run<at::BFloat16>(p, k, v, heads_per_block, stream);
  return {out, lse};
}

}  // namespace
}  // namespace flashgen_cuda

TORCH_LIBRARY_FRAGMENT(flashgen_cuda, m) {
  m.def(
      "flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v,"
      " Tensor cache_seqlens, Tensor? block_table, float softmax_scale, bool causal, int window_left,"
      " int window_right, float softcap, int num_splits) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(flashgen_cuda, CUDA, m) { m.impl("flash_attn_kvcache", &flashgen_cuda::flash_attn_kvcache); }
