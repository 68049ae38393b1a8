// Shared pieces of the CPU attention kernels (forward, backward, decode over a KV cache).
//
// Every kernel works on tiles of at most kBlockQ query rows x kBlockK keys in float32 scratch buffers:
// inputs (float32, bfloat16 or float16) are converted tile by tile, so no kernel ever holds a
// seqlen_q x seqlen_k matrix. Row widths are padded to a multiple of kVec floats so the SIMD primitives
// (AVX-512 or AVX2, chosen at run time) never need a tail.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace flashgen::cpu::attn {

constexpr int kBlockQ = 64;
constexpr int kBlockK = 64;
constexpr int kVec = 16;
// Keys per split of flash_attn_varlen_kvcache: a split starts at a fixed position (a multiple of kBlockK).
constexpr int64_t kSplitKeys = 4 * kBlockK;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// SIMD primitives over float32; n (columns) is a multiple of kVec except for silu.
struct Simd {
  // C[m x n] = (accumulate ? C : 0) + A[m x kk] B[kk x n], with A(i, p) = a[i * a_row + p * a_col] (so A may
  // be a transposed view) and B, C row-major with leading dimensions ldb, ldc.
  void (*gemm)(int m, int n, int kk, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate);
  // gemm over B in float16 / bfloat16 (a 16-bit KV cache read in place), each value converted as it is loaded:
  // the bits of gemm over B converted to float32 first
  void (*gemm_f16)(int m, int n, int kk, const float* a, int64_t a_row, int64_t a_col, const at::Half* b,
                   int64_t ldb, float* c, int64_t ldc, bool accumulate);
  void (*gemm_bf16)(int m, int n, int kk, const float* a, int64_t a_row, int64_t a_col, const at::BFloat16* b,
                    int64_t ldb, float* c, int64_t ldc, bool accumulate);
  float (*row_max)(const float* x, int n);
  // x = exp(x - shift) in place (exp(-inf) = 0); returns the sum of the new x.
  float (*exp_sum)(float* x, int n, float shift);
  // dst[c * ld_dst + r] = src[r * ld_src + c] for r, c < 16.
  void (*transpose16)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst);
  // out = g * sigmoid(g) (* up where given) over any n; the decoder's SwiGLU, on the exp above.
  void (*silu)(const float* g, const float* up, float* out, int64_t n);
  // out = sigmoid(g) = 1 / (1 + exp(-g)) over any n.
  void (*sigmoid)(const float* g, float* out, int64_t n);

  // gemm, gemm_f16 or gemm_bf16, by B's element type
  template <typename T>
  void product(int m, int n, int kk, const float* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, float* c,
               int64_t ldc, bool accumulate) const {
    if constexpr (std::is_same_v<T, float>) gemm(m, n, kk, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    else if constexpr (std::is_same_v<T, at::Half>) gemm_f16(m, n, kk, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    else gemm_bf16(m, n, kk, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
};
const Simd& simd();  // AVX-512 when the CPU has it, AVX2 otherwise

// The attention options. A query at key position pos (bottom-right: i + seqlen_k - seqlen_q) attends keys
// lo(pos) .. hi(pos, seqlen_k) inclusive (empty when hi < lo).
struct Options {
  float scale;
  float softcap;  // 0 = off
  int64_t window_left, window_right;  // causal already folded into window_right = 0

  Options(double softmax_scale, bool causal, int64_t wl, int64_t wr, double cap)
      : scale(float(softmax_scale)), softcap(float(cap)), window_left(wl), window_right(causal ? 0 : wr) {}
  int64_t lo(int64_t pos) const { return window_left >= 0 ? std::max<int64_t>(0, pos - window_left) : 0; }
  int64_t hi(int64_t pos, int64_t sk) const {
    return window_right >= 0 ? std::min(sk - 1, pos + window_right) : sk - 1;
  }
};

// Where the rows of one (sequence, head) live: token t -> base + t * tok_stride, or through a paged
// block table: base + table[t / block_size] * block_stride + (t % block_size) * tok_stride; feature c of a
// row at c * col_stride from it (1, or a key-major cache's: its keys are the contiguous dimension).
template <typename T>
struct Rows {
  const T* base;
  int64_t tok_stride;
  const int32_t* table = nullptr;
  int64_t block_size = 1, block_stride = 0, col_stride = 1;

  const T* row(int64_t t) const {
    return table ? base + int64_t(table[t / block_size]) * block_stride + (t % block_size) * tok_stride
                 : base + t * tok_stride;
  }
  // Rows t0 .. t0 + n - 1 lie at one stride from row(t0), i.e. no page boundary among them breaks it.
  bool evenly_strided(int64_t t0, int64_t n) const {
    if (!table) return true;
    for (int64_t t = (t0 / block_size + 1) * block_size; t < t0 + n; t += block_size)
      if (row(t) != row(t0) + (t - t0) * tok_stride) return false;
    return true;
  }
};

// 8 values at p as float32 (AVX2 + F16C, the build baseline): bfloat16 is the high half of a float32, float16
// converts exactly.
inline __m256 load8_float(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_float(const at::BFloat16* p) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
inline __m256 load8_float(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// d values of s as float32 times mul into o, 8 at a time.
template <typename T>
void convert_row(const T* s, int d, float mul, float* o) {
  int c = 0;
  for (; c + 8 <= d; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(load8_float(s + c), _mm256_set1_ps(mul)));
  for (; c < d; ++c) o[c] = float(s[c]) * mul;
}

// n rows t0.. of src into dst (n x ld), each multiplied by mul and zero-padded from d to ld.
template <typename T>
void load_rows(const Rows<T>& src, int64_t t0, int n, int d, int ld, float* dst, float mul = 1.f) {
  for (int r = 0; r < n; ++r) {
    float* o = dst + int64_t(r) * ld;
    convert_row(src.row(t0 + r), d, mul, o);
    std::fill(o + d, o + ld, 0.f);
  }
}

// n rows t0.. of src transposed into dst (d x kBlockK): dst[c * kBlockK + r] = src[t0 + r][c]. Rows that lie
// evenly strided in memory (Rows::evenly_strided) go 16 x 16 through SIMD transposes (16-bit rows converted
// to float32 first). A key-major src (tok_stride 1) is already transposed: each feature's keys are copied
// (converted) as they lie, page by page.
template <typename T>
void load_cols(const Rows<T>& src, int64_t t0, int n, int d, float* dst) {
  if (src.tok_stride == 1 && src.col_stride != 1) {
    for (int r = 0; r < n;) {
      const int64_t t = t0 + r;
      const int run = int(std::min<int64_t>(n - r, src.table ? src.block_size - t % src.block_size : n - r));
      const T* first = src.row(t);
      for (int c = 0; c < d; ++c) convert_row(first + c * src.col_stride, run, 1.f, dst + int64_t(c) * kBlockK + r);
      r += run;
    }
    return;
  }
  int r0 = 0;
  const Simd& isa = simd();
  alignas(64) float block[16 * 16];
  for (; r0 + 16 <= n; r0 += 16) {
    if (!src.evenly_strided(t0 + r0, 16)) break;
    const T* first = src.row(t0 + r0);
    int c = 0;
    for (; c + 16 <= d; c += 16) {
      if constexpr (std::is_same_v<T, float>) {
        isa.transpose16(first + c, src.tok_stride, dst + c * kBlockK + r0, kBlockK);
      } else {
        for (int r = 0; r < 16; ++r) convert_row(first + r * src.tok_stride + c, 16, 1.f, block + 16 * r);
        isa.transpose16(block, 16, dst + c * kBlockK + r0, kBlockK);
      }
    }
    for (; c < d; ++c)
      for (int r = 0; r < 16; ++r) dst[int64_t(c) * kBlockK + r0 + r] = float(first[r * src.tok_stride + c]);
  }
  for (int r = r0; r < n; ++r) {
    const T* s = src.row(t0 + r);
    for (int c = 0; c < d; ++c) dst[int64_t(c) * kBlockK + r] = float(s[c]);
  }
}

// S (rows x kBlockK) = scores of qf (rows x ldq, already scaled by softmax_scale) against the keys
// k0 .. k0 + nk - 1 held transposed in kt (d x ldk, its first round_up(nk, kVec) columns read; float32, or a
// 16-bit cache's page read in place): softcapped, and
// -inf outside each row's key range (row_pos[r] is row r's key position, sk the sequence's number of keys). If
// tanh_grad is given it receives 1 - tanh^2 of the softcap (for the backward).
template <typename K>
void scores(const Simd& isa, const Options& opt, int rows, const float* qf, int ldq, const K* kt, int64_t ldk,
            int d, int64_t k0, int nk, const int64_t* row_pos, int64_t sk, float* s, float* tanh_grad = nullptr);

// Online softmax of `rows` query rows (qf: rows x ldq, scaled) over keys [k_begin, k_end) of one sequence
// with sk keys: updates the running max m, sum l and the unnormalized output o (rows x ldq). Key blocks
// that no row can attend are skipped. Scratch: kt (d x kBlockK), vf (kBlockK x ldq), s (rows x kBlockK).
template <typename T>
void attend(const Simd& isa, const Options& opt, int rows, const float* qf, int ldq, int d, const int64_t* row_pos,
            int64_t sk, const Rows<T>& k, const Rows<T>& v, int64_t k_begin, int64_t k_end, float* kt, float* vf,
            float* s, float* o, float* m, float* l);

// The key range [begin, end) that any of the rows can attend, clipped to [k_begin, k_end). begin stays
// k_begin plus a multiple of kBlockK, so a row meets its keys in the same blocks whatever rows share its tile
// (the blocks the others add are masked out for it and change nothing).
inline std::pair<int64_t, int64_t> key_span(const Options& opt, int rows, const int64_t* row_pos, int64_t sk,
                                            int64_t k_begin, int64_t k_end) {
  int64_t lo = k_end, hi = k_begin - 1;
  for (int r = 0; r < rows; ++r) {
    int64_t a = opt.lo(row_pos[r]), b = opt.hi(row_pos[r], sk);
    if (a <= b) lo = std::min(lo, a), hi = std::max(hi, b);
  }
  const int64_t begin = std::max(lo, k_begin);
  return {k_begin + (begin - k_begin) / kBlockK * kBlockK, std::min(hi + 1, k_end)};
}

// out = o / l and lse = m + log l for one row; a row that attended no key (l = 0) gives 0 and -inf.
template <typename T>
void finalize_row(const float* o, float m, float l, int d, T* out, float* lse) {
  const float inv = l > 0 ? 1.f / l : 0.f;
  for (int c = 0; c < d; ++c) out[c] = T(o[c] * inv);
  *lse = l > 0 ? m + std::log(l) : kNegInf;
}

// Runs f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor; anything else is refused.
template <typename F>
void dispatch_float(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16 tensors, got ", st);
  }
}

// The sequences of a dense (cu_seqlens absent) or varlen batch: sequence b has tokens
// q_start .. q_start + sq - 1 of the packed q (tokens, heads, d) and k_start .. k_start + sk - 1 of k, v.
struct Seq {
  int64_t q_start, sq, k_start, sk;
};
// Index of lse(sequence, head h, query i): dense lse is (batch, heads, seqlen_q), varlen (heads, total_q).
struct LseLayout {
  int64_t token_mul, head_stride;
  LseLayout(const at::Tensor& q, bool varlen)
      : token_mul(varlen ? 1 : q.size(2)), head_stride(varlen ? q.size(0) : q.size(1)) {}
  int64_t at(const Seq& s, int64_t h, int64_t i) const { return s.q_start * token_mul + h * head_stride + i; }
};
std::vector<Seq> sequences(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                           const std::optional<at::Tensor>& cu_k);

// Common input checks of the prefill ops (shapes, dtypes, devices, head dims, GQA).
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen);

// flashgen::flash_attn_kvcache on CPU (attention_decode.cpp): checks its inputs, writes k / v into the caches
// at cache_seqlens, returns (out, lse). Called directly by the decoder step.
std::tuple<at::Tensor, at::Tensor> flash_attn_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
                                                      const std::optional<at::Tensor>& v,
                                                      const at::Tensor& cache_seqlens,
                                                      const std::optional<at::Tensor>& block_table,
                                                      double softmax_scale, bool causal, int64_t window_left,
                                                      int64_t window_right, double softcap, int64_t num_splits);
// flashgen::flash_attn_varlen_kvcache on CPU, likewise: packed q (tokens, heads, d), k, v (tokens, kv_heads, d).
std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_kvcache(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cu_seqlens_q, const at::Tensor& cache_seqlens,
    const at::Tensor& block_table, double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap);

}  // namespace flashgen::cpu::attn
