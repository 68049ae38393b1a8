// Fused RMSNorm / LayerNorm (+ residual add, Gemma weight offset) for the CPU: flashgen::rms_norm_fwd/bwd
// and flashgen::layer_norm_fwd/bwd (schemas and math in kernels/ops.py and kernels/reference.py).
//
// float32/float16/bfloat16 in and out, float32 statistics. The row kernels (norm_rows.inc) are compiled
// twice, for AVX2 and for AVX-512, and picked at run time; OpenMP splits the rows over threads. dweight
// and dbias are summed per thread into private float32 rows, then reduced over threads column-parallel,
// so no two threads ever write the same element.
// GCC 12 warns inside its own avx512fintrin.h (intrinsics that start from a deliberately undefined vector);
// the warning is attributed to the header's lines, so it is silenced before any include.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/norm.h"


namespace flashgen::cpu {
namespace {

// Vectors of 8 floats (AVX2 + FMA + F16C: the build baseline, x86-64-v3).
struct Avx2 {
  static constexpr int W = 8;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float reduce(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static F keep(F v, int k) {
    if (k == W) return v;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane)));
  }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load(const at::BFloat16* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(at::Half* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store(at::BFloat16* p, F v) {
    // Round to nearest even on the upper 16 bits; NaN stays a (quiet) NaN.
    const __m256i i = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

namespace avx2 {
using V = Avx2;
#include "cpu/norm_rows.inc"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// Vectors of 16 floats; everything in this region is compiled for AVX-512 and only called when the CPU
// has it (has_avx512()).
struct Avx512 {
  static constexpr int W = 16;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static float reduce(F v) { return _mm512_reduce_add_ps(v); }
  static F keep(F v, int k) { return k == W ? v : _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << k) - 1), v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load(const at::BFloat16* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(at::Half* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store(at::BFloat16* p, F v) {
    const __m512i i = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

namespace avx512 {
using V = Avx512;
#include "cpu/norm_rows.inc"
}  // namespace avx512
#pragma GCC pop_options

// ------------------------------------------------------------------ input checks and dispatch

// Calls fn.template operator()<T>() with T the C++ type of `dtype` (float32, float16 or bfloat16).
template <class Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn.template operator()<float>();
    case at::kHalf: return fn.template operator()<at::Half>();
    case at::kBFloat16: return fn.template operator()<at::BFloat16>();
    default:
      TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16, got ", dtype);
  }
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have at least one dimension and a non-empty last "
              "(hidden) dimension, got shape ", x.sizes());
}

// An optional argument must match x's dtype and device and have `shape`; returns it contiguous (or undefined).
at::Tensor checked(const std::optional<at::Tensor>& t, const at::Tensor& x, at::IntArrayRef shape, const char* op,
                   const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ", t->device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t->sizes());
  return t->contiguous();
}

at::Tensor checked_stats(const at::Tensor& s, const at::Tensor& h, const char* op, const char* name) {
  const auto shape = h.sizes().slice(0, h.dim() - 1);
  TORCH_CHECK(s.device() == h.device() && s.scalar_type() == at::kFloat && s.sizes() == shape, op, ": ", name,
              " must be a float32 tensor of shape ", shape, " on ", h.device(), ", got ", s.scalar_type(), " ",
              s.sizes(), " on ", s.device());
  return s.contiguous();
}

template <class T>
const T* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }
template <class T>
T* mut_ptr(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; }

// FLASHGEN_NO_AVX512=1 forces the AVX2 path (read on every call so tests can check both paths).
bool use_avx512() { return has_avx512() && std::getenv("FLASHGEN_NO_AVX512") == nullptr; }

// Rows are split evenly over threads; small inputs run on one thread (a parallel region costs microseconds).
int threads_for(int64_t rows, int64_t n) {
  constexpr int64_t kMinWorkPerThread = 1 << 14;
  const int64_t by_work = std::max<int64_t>(1, rows * n / kMinWorkPerThread);
  return static_cast<int>(std::min<int64_t>({static_cast<int64_t>(omp_get_max_threads()), rows, by_work}));
}

template <class Body>
void parallel_rows(int64_t rows, int64_t n, Body body) {
  const int nt = std::max(1, threads_for(rows, n));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = rows * t / T, hi = rows * (t + 1) / T;
    body(t, T, lo, hi);
  }
}

// Per-thread float32 partial sums of `count` rows of n columns each, reduced into `out` (dtype T).
struct Partials {
  int64_t n;
  int threads;
  std::vector<float> buf;
  Partials(int64_t n, int threads, int count) : n(n), threads(threads), buf(size_t(n) * threads * count, 0.0f) {}
  float* row(int thread, int which) { return buf.data() + (int64_t(which) * threads + thread) * n; }
  template <class T>
  void reduce_into(int which, T* out) {
    const float* base = buf.data() + int64_t(which) * threads * n;
#pragma omp parallel for schedule(static) if (n * threads > (1 << 16))
    for (int64_t j = 0; j < n; ++j) {
      float s = 0.0f;
      for (int t = 0; t < threads; ++t) s += base[int64_t(t) * n + j];
      out[j] = static_cast<T>(s);
    }
  }
};

// ------------------------------------------------------------------ the four ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& residual, double eps,
                                                            bool weight_offset) {
  constexpr const char* op = "flashgen::rms_norm_fwd";
  check_input(x_in, op);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const at::Tensor w = checked(weight, x, {n}, op, "weight");
  const at::Tensor r = checked(residual, x, x.sizes(), op, "residual");
  at::Tensor y = at::empty_like(x), h = r.defined() ? at::empty_like(x) : x.new_empty({0});
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const float off = weight_offset ? 1.0f : 0.0f;
  dispatch_dtype(x.scalar_type(), op, [&]<class T>() {
    const auto kernel = use_avx512() ? avx512::rms_fwd_row<T> : avx2::rms_fwd_row<T>;
    const T *xp = ptr<T>(x), *rp = ptr<T>(r), *wp = ptr<T>(w);
    T *yp = mut_ptr<T>(y), *hp = r.defined() ? mut_ptr<T>(h) : nullptr;
    float* sp = rstd.mutable_data_ptr<float>();
    parallel_rows(rows, n, [&](int, int, int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t o = i * n;
        sp[i] = kernel(xp + o, rp ? rp + o : nullptr, hp ? hp + o : nullptr, yp + o, wp, off, float(eps), n);
      }
    });
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const std::optional<at::Tensor>& dh_in,
                                                const at::Tensor& h_in, const std::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd_in, bool weight_offset) {
  constexpr const char* op = "flashgen::rms_norm_bwd";
  check_input(h_in, op);
  const at::Tensor h = h_in.contiguous();
  const int64_t n = h.size(-1), rows = h.numel() / n;
  const at::Tensor dy = checked(dy_in, h, h.sizes(), op, "dy");
  const at::Tensor dh = checked(dh_in, h, h.sizes(), op, "dh");
  const at::Tensor w = checked(weight, h, {n}, op, "weight");
  const at::Tensor rstd = checked_stats(rstd_in, h, op, "rstd");
  at::Tensor dx = at::empty_like(h), dw = w.defined() ? at::empty_like(w) : h.new_empty({0});
  const float off = weight_offset ? 1.0f : 0.0f;
  dispatch_dtype(h.scalar_type(), op, [&]<class T>() {
    const auto kernel = use_avx512() ? avx512::rms_bwd_row<T> : avx2::rms_bwd_row<T>;
    const T *dyp = ptr<T>(dy), *dhp = ptr<T>(dh), *hp = ptr<T>(h), *wp = ptr<T>(w);
    const float* sp = rstd.data_ptr<float>();
    T* dxp = mut_ptr<T>(dx);
    Partials part(n, std::max(1, threads_for(rows, n)), w.defined() ? 1 : 0);
    parallel_rows(rows, n, [&](int t, int, int64_t lo, int64_t hi) {
      float* acc = w.defined() ? part.row(t, 0) : nullptr;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t o = i * n;
        kernel(dyp + o, dhp ? dhp + o : nullptr, hp + o, wp, off, sp[i], n, dxp + o, acc);
      }
    });
    if (w.defined()) part.reduce_into(0, mut_ptr<T>(dw));
  });
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  constexpr const char* op = "flashgen::layer_norm_fwd";
  check_input(x_in, op);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const at::Tensor w = checked(weight, x, {n}, op, "weight");
  const at::Tensor b = checked(bias, x, {n}, op, "bias");
  const at::Tensor r = checked(residual, x, x.sizes(), op, "residual");
  at::Tensor y = at::empty_like(x), h = r.defined() ? at::empty_like(x) : x.new_empty({0});
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = at::empty(stats_shape, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  dispatch_dtype(x.scalar_type(), op, [&]<class T>() {
    const auto kernel = use_avx512() ? avx512::ln_fwd_row<T> : avx2::ln_fwd_row<T>;
    const T *xp = ptr<T>(x), *rp = ptr<T>(r), *wp = ptr<T>(w), *bp = ptr<T>(b);
    T *yp = mut_ptr<T>(y), *hp = r.defined() ? mut_ptr<T>(h) : nullptr;
    float *mp = mean.mutable_data_ptr<float>(), *sp = rstd.mutable_data_ptr<float>();
    parallel_rows(rows, n, [&](int, int, int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t o = i * n;
        kernel(xp + o, rp ? rp + o : nullptr, hp ? hp + o : nullptr, yp + o, wp, bp, float(eps), n, mp + i, sp + i);
      }
    });
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dh_in, const at::Tensor& h_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean_in, const at::Tensor& rstd_in, bool has_bias) {
  constexpr const char* op = "flashgen::layer_norm_bwd";
  check_input(h_in, op);
  const at::Tensor h = h_in.contiguous();
  const int64_t n = h.size(-1), rows = h.numel() / n;
  const at::Tensor dy = checked(dy_in, h, h.sizes(), op, "dy");
  const at::Tensor dh = checked(dh_in, h, h.sizes(), op, "dh");
  const at::Tensor w = checked(weight, h, {n}, op, "weight");
  const at::Tensor mean = checked_stats(mean_in, h, op, "mean");
  const at::Tensor rstd = checked_stats(rstd_in, h, op, "rstd");
  at::Tensor dx = at::empty_like(h);
  at::Tensor dw = w.defined() ? at::empty_like(w) : h.new_empty({0});
  at::Tensor db = has_bias ? h.new_empty({n}) : h.new_empty({0});
  dispatch_dtype(h.scalar_type(), op, [&]<class T>() {
    const auto kernel = use_avx512() ? avx512::ln_bwd_row<T> : avx2::ln_bwd_row<T>;
    const T *dyp = ptr<T>(dy), *dhp = ptr<T>(dh), *hp = ptr<T>(h), *wp = ptr<T>(w);
    const float *mp = mean.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    T* dxp = mut_ptr<T>(dx);
    const int dw_slot = w.defined() ? 0 : -1, db_slot = has_bias ? dw_slot + 1 : -1;
    Partials part(n, std::max(1, threads_for(rows, n)), int(w.defined()) + int(has_bias));
    parallel_rows(rows, n, [&](int t, int, int64_t lo, int64_t hi) {
      float* dw_acc = dw_slot >= 0 ? part.row(t, dw_slot) : nullptr;
      float* db_acc = db_slot >= 0 ? part.row(t, db_slot) : nullptr;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t o = i * n;
        kernel(dyp + o, dhp ? dhp + o : nullptr, hp + o, wp, mp[i], sp[i], n, dxp + o, dw_acc, db_acc);
      }
    });
    if (dw_slot >= 0) part.reduce_into(dw_slot, mut_ptr<T>(dw));
    if (db_slot >= 0) part.reduce_into(db_slot, mut_ptr<T>(db));
  });
  return {dx, dw, db};
}

}  // namespace

float rms_norm_row(const float* x, const float* r, float* h, float* y, const float* w, float eps, int64_t n) {
  return (use_avx512() ? avx512::rms_fwd_row<float> : avx2::rms_fwd_row<float>)(x, r, h, y, w, 0.0f, eps, n);
}

void layer_norm_row(const float* x, const float* r, float* h, float* y, const float* w, const float* b, float eps,
                    int64_t n) {
  float mean, rstd;
  (use_avx512() ? avx512::ln_fwd_row<float> : avx2::ln_fwd_row<float>)(x, r, h, y, w, b, eps, n, &mean, &rstd);
}

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace flashgen::cpu
