// flashgen::int4_linear / int8_linear / int8_linear_dynamic for CPU tensors (weights prepacked, see quant.h).
//
// What they compute, y (..., N) = x (..., K) W^T + bias, with x taken to float32 first:
// - int4_linear, int8_linear (weight-only): x is quantized to int8 per block of 32 features like llama.cpp's
//   Q8_0 activations (d = max|x_b| / 127, a = round(x * 127 / max|x_b|)); the kernel computes the exact
//   integer products per block and scales them in float32, i.e. y = x' W^T with x' = d * a the rounded
//   activations (the int4 offset term m * sum(x' over the group) uses x' too, so the error scales with W,
//   not with W - m). The only error beyond float32 rounding is that of the activation rounding:
//   |y - x W^T| <= sum_k |W[n, k]| d_{b(k)} / 2.
// - int8_linear_dynamic (W8A8): x is quantized per row (d = max|x| / 127, the same float32 operations as
//   reference.quantize_rows_int8, so the codes are identical) and the row's products accumulate in int32;
//   with per-block weight scales each block's int32 sum is scaled and accumulated in float32.
// - half_linear (float16 / bfloat16 weights kept 16-bit): exact weights, float32 products, x unrounded.
// - ggml_linear (GGUF block types, ggml.h): x quantized per super-block of the type as llama.cpp does (256 for
//   the K-quants and IQ4_XS, like Q8_K; 32 otherwise), the codes' products exact (ggml_kernels.cpp), so the same
//   bound holds with d the scale of the super-block.
// The result is returned in x's dtype. Threads: OpenMP over output features (tiles of 16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "cpu/cpu_features.h"
#include "cpu/ggml.h"
#include "cpu/quant.h"

namespace flashgen::cpu::quant {

// FLASHGEN_QUANT_ISA=avx2 forces the AVX2 kernels on an AVX-512 machine, =vnni the AVX-512 ones on an AMX machine
// (tests cover every path).
static bool isa_forced(const char* name) {
  const char* isa = std::getenv("FLASHGEN_QUANT_ISA");
  return isa && std::strcmp(isa, name) == 0;
}
bool use_vnni() { return has_avx512_vnni() && !isa_forced("avx2"); }
bool use_amx() { return has_amx_int8() && !isa_forced("avx2") && !isa_forced("vnni"); }
bool use_avx512() { return has_avx512() && !isa_forced("avx2"); }

namespace {

// a = round(x * 127 / max|x|) (ties to even), d = max|x| / 127 over len values; returns sum(a). AVX2 (the
// build baseline) for whole vectors of 8 and AVX-512 with masked tails: the same float operations as the
// scalar tail, so the codes do not depend on the path. A NaN is ignored by the max, as std::max(amax, NaN) is.
inline int32_t quantize_span(const float* x, int64_t len, int8_t* a, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) vmax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), vmax);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  for (int64_t j = i; j < len; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i vsum = _mm256_setzero_si256();
  for (i = 0; i + 8 <= len; i += 8) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));  // |q| <= 127
    vsum = _mm256_add_epi32(vsum, q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(a + i), _mm_packs_epi16(q16, q16));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
  for (; i < len; ++i) {
    a[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
    sum += a[i];
  }
  *d = amax / 127.f;
  return sum;
}

FLASHGEN_AVX512 inline int32_t quantize_span512(const float* x, int64_t len, int8_t* a, float* d) {
  auto mask = [&](int64_t i) { return len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1); };
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(mask(i), x + i)), vmax);
  const float amax = _mm512_reduce_max_ps(vmax);
  const __m512 vinv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t i = 0; i < len; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), x + i), vinv));
    vsum = _mm512_add_epi32(vsum, q);
    _mm512_mask_cvtsepi32_storeu_epi8(a + i, mask(i), q);
  }
  *d = amax / 127.f;
  return _mm512_reduce_add_epi32(vsum);
}

// quantize_span over each block of `block` features of a row of k (the last block may be shorter): codes a,
// scales d and code sums per block.
void quantize_blocks(const float* x, int64_t k, int64_t block, int8_t* a, float* d, int32_t* sums) {
  for (int64_t b = 0; b * block < k; ++b)
    sums[b] = quantize_span(x + b * block, std::min(block, k - b * block), a + b * block, d + b);
}

FLASHGEN_AVX512 void quantize_blocks512(const float* x, int64_t k, int64_t block, int8_t* a, float* d,
                                        int32_t* sums) {
  for (int64_t b = 0; b * block < k; ++b)
    sums[b] = quantize_span512(x + b * block, std::min(block, k - b * block), a + b * block, d + b);
}

}  // namespace

QuantActs quantize_acts_into(const float* x, int64_t m, int64_t k, int64_t block, int64_t d_cols, bool per_row,
                             int64_t group, int8_t* a, float* d, float* xsum) {
  TORCH_CHECK(group == 0 || block == kBlock, "quantize_acts_into: weight groups need activation blocks of 32");
  const int64_t kb = blocks(k), groups = group > 0 ? k / group : 0;
  const bool wide = use_vnni();
  const auto quantize = wide ? quantize_span512 : quantize_span;
  const auto quantize_row = wide ? quantize_blocks512 : quantize_blocks;
  at::parallel_for(0, m, std::max<int64_t>(1, (int64_t{1} << 16) / k), [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> sums(kb);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * k;
      int8_t* ar = a + r * kb * kBlock;
      float* dr = d + r * d_cols;
      std::fill(ar + k, ar + kb * kBlock, int8_t{0});  // the kernels read whole blocks
      if (per_row) {
        quantize(xr, k, ar, dr);
        std::fill(dr + 1, dr + d_cols, dr[0]);
      } else {
        quantize_row(xr, k, block, ar, dr, sums.data());
      }
      // sum of the quantized activations over each weight group (see the file comment)
      for (int64_t i = 0; i < groups; ++i) {
        double s = 0;
        for (int64_t b = i * group / kBlock; b < (i + 1) * group / kBlock; ++b) s += static_cast<double>(dr[b]) * sums[b];
        xsum[r * groups + i] = static_cast<float>(s);
      }
    }
  });
  return {a, d, xsum, kb * kBlock, d_cols, std::max<int64_t>(groups, 1)};
}

namespace {

// Largest K whose whole-row int32 sum cannot overflow: |a w| <= 127 * 128 per product.
constexpr int64_t kMaxWholeRowK = (int64_t{1} << 31) / (127 * 128) - kBlock;

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_packed(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (prepacked by the CPU prepack op), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), op, ": ", name, " must have the CPU prepacked shape ", at::IntArrayRef(shape),
              ", got ", t.sizes(), " (was it prepacked for this device with the same in/out features?)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

at::Tensor finish(at::Tensor y, const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t n,
                  const char* op) {
  if (bias.has_value()) {
    check_bias(*bias, n, op);
    y.add_(bias->to(at::kFloat));
  }
  auto shape = x.sizes().vec();
  shape.back() = n;
  return y.view(shape).to(x.scalar_type());
}

at::Tensor flat_float(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous(); }

}  // namespace

void check_scale_dtypes(const char* op, const at::Tensor& scales, const at::Tensor* offsets) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf, op,
              ": scales must be float32 or float16, got ", scales.scalar_type());
  TORCH_CHECK(!offsets || offsets->scalar_type() == scales.scalar_type(), op,
              ": offsets must have the dtype of scales (", scales.scalar_type(), "), got ", offsets->scalar_type());
}

void check_int4_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                       int64_t k, int64_t n, int64_t group_size) {
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, op,
              ": group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(n > 0, op, ": out_features must be positive, got ", n);
  TORCH_CHECK(k > 0 && k % group_size == 0, op, ": in_features (", k, ") must be a positive multiple of group_size ",
              group_size);
  const int64_t groups = k / group_size;
  check_packed(qweight, op, "qweight", at::kByte, {tiles(n), k / kBlock, kInt4TileBytes});
  check_scale_dtypes(op, scales, &offsets);
  check_packed(scales, op, "scales", scales.scalar_type(), {tiles(n), groups, kTileRows});
  check_packed(offsets, op, "offsets", scales.scalar_type(), {tiles(n), groups, kTileRows});
}

int64_t check_int8_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scales, int64_t k, int64_t n) {
  const int64_t kb = blocks(k);
  TORCH_CHECK(n > 0 && k > 0, op, ": in_features (", k, ") and out_features (", n, ") must be positive");
  check_packed(qweight, op, "qweight", at::kChar, {tiles(n), kb, kInt8TileBytes});
  TORCH_CHECK(scales.dim() == 3 && (scales.size(1) == 1 || scales.size(1) == kb), op,
              ": scales must be (tiles, 1 or in_features/32, 16) as prepacked, got ", scales.sizes());
  const int64_t sblocks = scales.size(1);
  TORCH_CHECK(sblocks == 1 || k % kBlock == 0, op, ": per-block scales need in_features (", k,
              ") to be a multiple of 32");
  check_scale_dtypes(op, scales);
  check_packed(scales, op, "scales", scales.scalar_type(), {tiles(n), sblocks, kTileRows});
  return sblocks;
}

void check_bias(const at::Tensor& bias, int64_t n, const char* op) {
  TORCH_CHECK(bias.device().is_cpu() && bias.dim() == 1 && bias.size(0) == n && bias.is_floating_point(), op,
              ": bias must be a 1-D floating CPU tensor of out_features = ", n, " elements, got ", bias.sizes(), " ",
              bias.scalar_type(), " on ", bias.device());
}

void check_half(const char* op, const at::Tensor& w, int64_t k, int64_t n) {
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16) &&
                  w.is_contiguous() && w.dim() == 2 && w.size(0) == n && w.size(1) == k,
              op, ": weight must be a contiguous float16 or bfloat16 CPU tensor of shape (", n, ", ", k, "), got ",
              w.scalar_type(), " ", w.sizes(), " on ", w.device());
}

void int4_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& offsets, int64_t group_size, int64_t n, float* y, ActScratch& scratch) {
  if (m == 0) return;
  const QuantActs acts = quantize_acts_into(x, m, k, kBlock, blocks(k), false, group_size, scratch.a(m, k),
                                            scratch.d(m * blocks(k)), scratch.xsum(m * (k / group_size)));
  with_scale_type(scales, [&](auto type) {
    using S = decltype(type);
    int4_gemm(acts, m, qweight.data_ptr<uint8_t>(), scales.data_ptr<S>(), offsets.data_ptr<S>(), n, blocks(k),
              group_size / kBlock, y, use_vnni());
  });
}

void int8_linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& qweight, const at::Tensor& scales,
                      int64_t n, bool dynamic, float* y, ActScratch& scratch) {
  if (m == 0) return;
  const int64_t kb = blocks(k), sblocks = scales.size(1);
  const bool whole_row = dynamic && sblocks == 1 && k <= kMaxWholeRowK;
  const int64_t d_cols = whole_row ? 1 : kb;
  int8_t* a = scratch.a(m, k);
  const QuantActs acts = quantize_acts_into(x, m, k, kBlock, d_cols, dynamic, 0, a, scratch.d(m * d_cols), nullptr);
  const bool vnni = use_vnni();
  if (vnni)  // the unsigned operand of VNNI's products: a + 128, made once here, not in the kernel's inner loop
    for (int64_t i = 0; i < m * kb * kBlock; ++i) a[i] = int8_t(uint8_t(a[i]) ^ 0x80u);
  with_scale_type(scales, [&](auto type) {
    using S = decltype(type);
    int8_gemm(acts, m, qweight.data_ptr<int8_t>(), scales.data_ptr<S>(), sblocks, n, kb, whole_row, y, vnni);
  });
}

namespace {

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& offsets, int64_t group_size, int64_t out_features,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "flashgen::int4_linear";
  check_x(x, op);
  check_int4_packed(op, qweight, scales, offsets, x.size(-1), out_features, group_size);
  const at::Tensor xf = flat_float(x);
  at::Tensor y = at::empty({xf.size(0), out_features}, xf.options());
  ActScratch scratch;
  int4_linear_rows(xf.data_ptr<float>(), xf.size(0), xf.size(1), qweight, scales, offsets, group_size, out_features,
                   y.data_ptr<float>(), scratch);
  return finish(y, x, bias, out_features, op);
}

at::Tensor int8_linear_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            int64_t out_features, const std::optional<at::Tensor>& bias, bool dynamic, const char* op) {
  check_x(x, op);
  check_int8_packed(op, qweight, scales, x.size(-1), out_features);
  const at::Tensor xf = flat_float(x);
  at::Tensor y = at::empty({xf.size(0), out_features}, xf.options());
  ActScratch scratch;
  int8_linear_rows(xf.data_ptr<float>(), xf.size(0), xf.size(1), qweight, scales, out_features, dynamic,
                   y.data_ptr<float>(), scratch);
  return finish(y, x, bias, out_features, op);
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           int64_t out_features, const std::optional<at::Tensor>& bias) {
  return int8_linear_impl(x, qweight, scales, out_features, bias, false, "flashgen::int8_linear");
}

at::Tensor int8_linear_dynamic_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   int64_t out_features, const std::optional<at::Tensor>& bias) {
  return int8_linear_impl(x, qweight, scales, out_features, bias, true, "flashgen::int8_linear_dynamic");
}

at::Tensor ggml_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t type, int64_t out_features,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "flashgen::ggml_linear";
  check_x(x, op);
  ggml::check_packed(op, packed, type, x.size(-1), out_features);
  const at::Tensor xf = flat_float(x);
  at::Tensor y = at::empty({xf.size(0), out_features}, xf.options());
  ActScratch scratch;
  ggml::linear_rows(xf.data_ptr<float>(), xf.size(0), xf.size(1), packed, type, out_features, y.data_ptr<float>(),
                    scratch);
  return finish(y, x, bias, out_features, op);
}

at::Tensor half_linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  const char* op = "flashgen::half_linear";
  check_x(x, op);
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", w.sizes());
  check_half(op, w, x.size(-1), w.size(0));
  const at::Tensor xf = flat_float(x);
  at::Tensor y = at::empty({xf.size(0), w.size(0)}, xf.options());
  half_linear_rows(xf.data_ptr<float>(), xf.size(0), xf.size(1), w, w.size(0), y.data_ptr<float>());
  return finish(y, x, bias, w.size(0), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(flashgen, CPU, m) {
  m.impl("half_linear", &half_linear_cpu);
  m.impl("ggml_linear", &ggml_linear_cpu);
  m.impl("int4_linear", &int4_linear_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_dynamic", &int8_linear_dynamic_cpu);
}

}  // namespace flashgen::cpu::quant
