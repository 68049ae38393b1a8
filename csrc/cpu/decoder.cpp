// The forward of engine/model.py's Transformer over the paged KV cache as one C++ call (a serving step: packed
// prefill chunks and decode tokens of any number of sequences): torch.classes.flashgen.CpuDecoder.
//
// A batch-1 decode step runs ~10 small kernels per layer; from Python each costs microseconds of dispatch,
// argument checks and allocations, more than the kernels themselves on a small model. Here the same
// computation walks the layers over reused float32 buffers, one row per token, and calls the kernels of
// flashgen's CPU ops directly (quant.h, norm.h, attention.h): per layer
//   x = norm(h + r) (r <- h + r),  q, k, v = split(x Wqkv^T)  [q, k RMSNorm per head],  rope(q, k),
//   o = attention over the KV cache with k, v appended at cache_seqlens,  h = o Wo^T,
//   x = norm(h + r) (r <- h + r),  h = act(x Win^T [gate]) [* up] Wout^T,
// then logits = norm(h + r) Whead^T at the rows asked for. The weights and the cache are the model's own
// tensors (shared, not copied), checked once when the decoder is built. Every step works row by row or is a
// kernel whose row results do not depend on the other rows, so a token's logits are the same whatever else
// is in the step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "cpu/attention.h"
#include "cpu/ggml.h"
#include "cpu/norm.h"
#include "cpu/quant.h"

namespace flashgen::cpu {
namespace {

constexpr const char* kOp = "flashgen.CpuDecoder";

bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes().equals(shape),
              kOp, ": ", name, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
}

// y = x W^T + b over float32 rows; W float32 (out, in) or prepacked in a quantized format (kernels/quant.py's
// QuantFormat.cpu_linear: "int4", "int8", "int8_dynamic", "ggml" with its type), b float32. A linear may stack
// parts of different formats along its outputs (a fused projection whose checkpoint tensors differ in type,
// such as Q4_K q, k with a Q6_K v): each part computes its columns.
struct CpuLinear : torch::CustomClassHolder {
  enum Kind { kFloat, kHalf, kInt4, kInt8, kInt8Dynamic, kGgml };
  struct Part {
    Kind kind;
    int64_t out, param;  // param: int4 group size, GGML type
    std::vector<at::Tensor> w;  // float: {W}; int4: {qweight, scales, offsets}; int8: {qweight, scales}; ggml: {packed}
  };
  int64_t in, out = 0;
  std::vector<Part> parts;
  at::Tensor bias;

  CpuLinear(const std::string& kind, std::vector<at::Tensor> weight, std::optional<at::Tensor> b, int64_t in_features,
            int64_t out_features, int64_t param)
      : in(in_features) {
    add_part(kind, std::move(weight), out_features, param);
    if (b) {
      quant::check_bias(*b, out, "flashgen.CpuLinear");
      bias = b->to(at::kFloat).contiguous();
    }
  }

  // Appends `other`'s outputs after ours (other without bias, same in_features).
  void stack(const c10::intrusive_ptr<CpuLinear>& other) {
    const char* op = "flashgen.CpuLinear.stack";
    TORCH_CHECK(other->in == in, op, ": in_features differ (", in, " vs ", other->in, ")");
    TORCH_CHECK(!other->bias.defined() && !bias.defined(), op, ": stacked parts take no bias (set it on the stack)");
    for (const Part& p : other->parts) parts.push_back(p);
    out += other->out;
  }

  // Row `index` of W (in_features values): the token table lookup of a quantized embedding.
  void row(int64_t index, float* dst) const {
    TORCH_CHECK(parts.size() == 1 && index >= 0 && index < out, "flashgen.CpuLinear.row: row ", index,
                " of a single-part linear of ", out, " rows");
    const Part& p = parts[0];
    switch (p.kind) {
      case kInt4:
        return quant::int4_packed_row(p.w[0], p.w[1], p.w[2], p.param, in, index, dst);
      case kInt8:
      case kInt8Dynamic:
        return quant::int8_packed_row(p.w[0], p.w[1], in, index, dst);
      case kGgml:
        return quant::ggml::packed_row(p.w[0], p.param, in, index, dst);
      case kHalf: {
        at::Tensor row = at::from_blob(dst, {in});
        row.copy_(p.w[0][index]);
        return;
      }
      case kFloat:
        std::copy_n(p.w[0].data_ptr<float>() + index * in, in, dst);
    }
  }

  void set_bias(const at::Tensor& b) {
    quant::check_bias(b, out, "flashgen.CpuLinear.set_bias");
    bias = b.to(at::kFloat).contiguous();
  }

  void run(const float* x, int64_t m, float* y, quant::ActScratch& scratch) const {
    if (parts.size() == 1) {
      run_part(parts[0], x, m, y, scratch);
    } else {
      std::vector<float> tmp;
      int64_t col = 0;
      for (const Part& p : parts) {
        tmp.resize(m * p.out);
        run_part(p, x, m, tmp.data(), scratch);
        for (int64_t r = 0; r < m; ++r) std::copy_n(&tmp[r * p.out], p.out, y + r * out + col);
        col += p.out;
      }
    }
    if (bias.defined()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < out; ++j) y[r * out + j] += b[j];
    }
  }

 private:
  void add_part(const std::string& kind_name, std::vector<at::Tensor> w, int64_t n, int64_t param) {
    const char* op = "flashgen.CpuLinear";
    const Kind kind = kind_name == "float" ? kFloat : kind_name == "half" ? kHalf : kind_name == "int4" ? kInt4
                      : kind_name == "int8" ? kInt8 : kind_name == "int8_dynamic" ? kInt8Dynamic
                      : kind_name == "ggml" ? kGgml : Kind(-1);
    TORCH_CHECK(kind != Kind(-1), op, ": kind must be float, half, int4, int8, int8_dynamic or ggml, got ", kind_name);
    const size_t want = kind == kInt4 ? 3 : kind == kInt8 || kind == kInt8Dynamic ? 2 : 1;
    TORCH_CHECK(w.size() == want, op, ": kind ", kind_name, " takes ", want, " weight tensors, got ", w.size());
    if (kind == kFloat)
      check_f32(w[0], "a float linear's weight", {n, in});
    else if (kind == kHalf)
      quant::check_half(op, w[0], in, n);
    else if (kind == kInt4)
      quant::check_int4_packed(op, w[0], w[1], w[2], in, n, param);
    else if (kind == kGgml)
      quant::ggml::check_packed(op, w[0], param, in, n);
    else
      quant::check_int8_packed(op, w[0], w[1], in, n);
    parts.push_back({kind, n, param, std::move(w)});
    out += n;
  }

  void run_part(const Part& p, const float* x, int64_t m, float* y, quant::ActScratch& scratch) const {
    switch (p.kind) {
      case kInt4:
        return quant::int4_linear_rows(x, m, in, p.w[0], p.w[1], p.w[2], p.param, p.out, y, scratch);
      case kInt8:
      case kInt8Dynamic:
        return quant::int8_linear_rows(x, m, in, p.w[0], p.w[1], p.out, p.kind == kInt8Dynamic, y, scratch);
      case kGgml:
        return quant::ggml::linear_rows(x, m, in, p.w[0], p.param, p.out, y, scratch);
      case kHalf:  // its kernel sums each row on its own
        return quant::half_linear_rows(x, m, in, p.w[0], p.out, y);
      case kFloat:  // as kHalf's: not at::mm, whose summation order depends on the number of rows
        return quant::float_linear_rows(x, m, in, p.w[0], p.out, y);
    }
  }
};
using Linear = c10::intrusive_ptr<CpuLinear>;

// RMSNorm or LayerNorm (bias given) of rows of n features, with the residual add fused: r <- x + r, y = norm(r).
struct Norm {
  at::Tensor w, b;
  float eps = 0;

  Norm() = default;
  Norm(const at::Tensor& weight, const at::Tensor& bias, double eps, int64_t n, const char* name)
      : w(weight), b(given(bias) ? bias : at::Tensor()), eps(float(eps)) {
    check_f32(w, name, {n});
    if (b.defined()) check_f32(b, name, {n});
  }
  void operator()(const float* x, float* r, float* y, int64_t n) const {
    if (b.defined())
      layer_norm_row(x, r, r, y, w.data_ptr<float>(), b.data_ptr<float>(), eps, n);
    else
      rms_norm_row(x, r, r, y, w.data_ptr<float>(), eps, n);
  }
};

struct Layer {
  Norm attn_norm, mlp_norm;
  at::Tensor q_norm, k_norm;  // per-head RMSNorm weights (Qwen3) or undefined
  Linear qkv, o, w_in, w_out;
  at::Tensor k_cache, v_cache;  // this layer's (max_batch, max_seq_len, kv_heads, head_dim) views
};

enum Activation : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

struct CpuDecoder : torch::CustomClassHolder {
  int64_t hidden, heads, kv_heads, head_dim, rotary_dim, intermediate, vocab, window_left, activation;
  bool gated;
  double eps, scale;
  at::Tensor tok_emb, pos_emb, inv_freq, k_cache, v_cache;
  std::vector<Layer> layers;
  Norm final_norm;
  Linear head, token_table;  // token_table: a quantized embedding (then tok_emb is empty)
  // float32 scratch, resized to the rows (B x T tokens): h, r, x (rows, hidden), qkv (rows, q + 2 kv), mlp
  // (rows, w_in out), act (rows, intermediate), rope (rows, rotary_dim)
  std::vector<float> h, r, x, qkv, mlp, act, rope;
  std::vector<int64_t> positions;  // of each row
  quant::ActScratch acts;

  // dims: hidden, heads, kv_heads, head_dim, rotary_dim (0: learned positions), intermediate, vocab,
  // window_left (-1: none), gated (0 / 1), activation (0 silu, 1 gelu, 2 gelu tanh); floats: eps, softmax scale.
  // k_cache, v_cache (layers, num_blocks, block_size, kv_heads, head_dim) float32, bfloat16 or float16 (strided
  // views, as the engine's head-major blocks, keys key-major; a 16-bit cache takes q, k, v rounded to it).
  CpuDecoder(c10::Dict<std::string, int64_t> dims, c10::Dict<std::string, double> floats, at::Tensor tok_emb,
             at::Tensor pos_emb, at::Tensor inv_freq, at::Tensor k_cache, at::Tensor v_cache)
      : tok_emb(std::move(tok_emb)), pos_emb(std::move(pos_emb)), inv_freq(std::move(inv_freq)),
        k_cache(std::move(k_cache)), v_cache(std::move(v_cache)) {
    auto dim = [&](const char* key) {
      TORCH_CHECK(dims.contains(key), kOp, ": dims needs the key '", key, "'");
      return dims.at(key);
    };
    hidden = dim("hidden"), heads = dim("heads"), kv_heads = dim("kv_heads"), head_dim = dim("head_dim");
    rotary_dim = dim("rotary_dim"), intermediate = dim("intermediate"), vocab = dim("vocab");
    window_left = dim("window_left"), gated = dim("gated") != 0, activation = dim("activation");
    TORCH_CHECK(floats.contains("eps") && floats.contains("scale"), kOp, ": floats needs 'eps' and 'scale'");
    eps = floats.at("eps"), scale = floats.at("scale");
    TORCH_CHECK(hidden > 0 && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && vocab > 0 &&
                    intermediate > 0,
                kOp, ": bad dims (hidden, heads a multiple of kv_heads, head_dim, intermediate, vocab > 0)");
    TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= head_dim, kOp, ": rotary_dim must be even and <= head_dim");
    TORCH_CHECK(activation >= kSilu && activation <= kGeluTanh, kOp, ": activation must be 0, 1 or 2");
    if (given(this->tok_emb)) check_f32(this->tok_emb, "tok_emb", {vocab, hidden});
    if (given(this->pos_emb)) check_f32(this->pos_emb, "pos_emb", {this->pos_emb.size(0), hidden});
    TORCH_CHECK(given(this->pos_emb) != (rotary_dim > 0), kOp, ": give either learned positions or rotary_dim > 0");
    if (rotary_dim) check_f32(this->inv_freq, "inv_freq", {rotary_dim / 2});
    const auto& kc = this->k_cache;
    TORCH_CHECK(kc.dim() == 5 && kc.size(3) == kv_heads && kc.size(4) == head_dim, kOp,
                ": k_cache must be (layers, max_batch, max_seq_len, kv_heads, head_dim), got ", kc.sizes());
    for (const at::Tensor* c : {&this->k_cache, &this->v_cache})
      TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == kc.scalar_type() && c->sizes().equals(kc.sizes()) &&
                      (c->stride(4) == 1 || (c == &kc && c->stride(2) == 1)) &&
                      (c->scalar_type() == at::kFloat || c->scalar_type() == at::kBFloat16 ||
                       c->scalar_type() == at::kHalf),
                  kOp, ": k_cache and v_cache must be float32, bfloat16 or float16 CPU tensors of one shape and ",
                  "dtype, contiguous in head_dim (keys: or in block_size; any other strides), got ", c->scalar_type(),
                  " ", c->sizes(), " strides ", c->strides(), " on ", c->device());
  }

  void add_layer(at::Tensor attn_w, at::Tensor attn_b, at::Tensor mlp_w, at::Tensor mlp_b, at::Tensor q_norm,
                 at::Tensor k_norm, Linear qkv, Linear o, Linear w_in, Linear w_out) {
    const int64_t l = int64_t(layers.size());
    TORCH_CHECK(l < k_cache.size(0), kOp, ": the cache holds ", k_cache.size(0), " layers");
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    auto linear = [&](const Linear& lin, int64_t in, int64_t out, const char* name) {
      TORCH_CHECK(lin->in == in && lin->out == out, kOp, ": layer ", l, " ", name, " must be ", in, " -> ", out,
                  ", got ", lin->in, " -> ", lin->out);
    };
    linear(qkv, hidden, q_size + 2 * kv_size, "qkv");
    linear(o, q_size, hidden, "o");
    linear(w_in, hidden, intermediate * (gated ? 2 : 1), "w_in");
    linear(w_out, intermediate, hidden, "w_out");
    Layer layer{Norm(attn_w, attn_b, eps, hidden, "attn_norm"), Norm(mlp_w, mlp_b, eps, hidden, "mlp_norm"),
                at::Tensor(), at::Tensor(), qkv, o, w_in, w_out, k_cache[l], v_cache[l]};
    TORCH_CHECK(given(q_norm) == given(k_norm), kOp, ": give both q_norm and k_norm or neither");
    if (given(q_norm)) {
      check_f32(q_norm, "q_norm", {head_dim});
      check_f32(k_norm, "k_norm", {head_dim});
      layer.q_norm = q_norm, layer.k_norm = k_norm;
    }
    layers.push_back(std::move(layer));
  }

  // A quantized token table instead of tok_emb: row i of `table` (vocab -> hidden as a linear's W) is token i.
  void set_token_table(Linear table) {
    TORCH_CHECK(table->out == vocab && table->in == hidden && table->parts.size() == 1, kOp,
                ": the token table must be one ", vocab, " x ", hidden, " weight");
    token_table = std::move(table);
  }

  void set_head(at::Tensor norm_w, at::Tensor norm_b, Linear output) {
    TORCH_CHECK(output->in == hidden && output->out == vocab, kOp, ": the output head must be ", hidden, " -> ",
                vocab);
    final_norm = Norm(norm_w, norm_b, eps, hidden, "norm");
    head = std::move(output);
  }

  // One step over packed sequences: tokens int64 (N,), sequence b's being tokens cu_seqlens_q[b] ..
  // cu_seqlens_q[b + 1] - 1 (int32 (B + 1,)) at positions cache_seqlens[b] .. (int32 (B,)) of its cache blocks
  // block_table[b] (int32 (B, max_blocks)); all are written to the cache, whose lengths the caller advances.
  // Returns the logits float32 (R, vocab) of the token rows logit_rows (int64 (R,)).
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& cu_seqlens_q, const at::Tensor& cache_seqlens,
                     const at::Tensor& block_table, const at::Tensor& logit_rows) {
    TORCH_CHECK(head && int64_t(layers.size()) == k_cache.size(0), kOp, ": add all ", k_cache.size(0),
                " layers and the head before forward()");
    TORCH_CHECK(given(tok_emb) || token_table, kOp, ": give tok_emb or set_token_table before forward()");
    TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1, kOp,
                ": tokens must be a 1-D (total_tokens,) int64 CPU tensor, got ", tokens.scalar_type(), " ",
                tokens.sizes());
    TORCH_CHECK(cu_seqlens_q.device().is_cpu() && cu_seqlens_q.scalar_type() == at::kInt &&
                    cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1,
                kOp, ": cu_seqlens_q must be an int32 (batch + 1,) CPU tensor, got ", cu_seqlens_q.scalar_type(),
                " ", cu_seqlens_q.sizes());
    const int64_t b = cu_seqlens_q.size(0) - 1, rows = tokens.size(0);
    TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.scalar_type() == at::kInt &&
                    cache_seqlens.sizes().equals({b}),
                kOp, ": cache_seqlens must be an int32 (", b, ",) CPU tensor, got ", cache_seqlens.scalar_type(),
                " ", cache_seqlens.sizes());
    TORCH_CHECK(logit_rows.device().is_cpu() && logit_rows.scalar_type() == at::kLong && logit_rows.dim() == 1,
                kOp, ": logit_rows must be a 1-D int64 CPU tensor, got ", logit_rows.scalar_type(), " ",
                logit_rows.sizes());
    const at::Tensor tok = tokens.contiguous(), cu = cu_seqlens_q.contiguous(), lens = cache_seqlens.contiguous();
    const at::Tensor out_rows = logit_rows.contiguous();
    const int64_t* tp = tok.data_ptr<int64_t>();
    const int32_t *cp = cu.data_ptr<int32_t>(), *lp = lens.data_ptr<int32_t>();
    TORCH_CHECK(cp[0] == 0 && cp[b] == rows, kOp, ": cu_seqlens_q must run from 0 to the number of tokens (",
                rows, "), got ", cp[0], " .. ", cp[b]);
    positions.resize(rows);
    for (int64_t i = 0; i < b; ++i) {
      TORCH_CHECK(cp[i + 1] >= cp[i], kOp, ": cu_seqlens_q must be non-decreasing, got ", cp[i], " then ",
                  cp[i + 1]);
      TORCH_CHECK(lp[i] >= 0, kOp, ": cache_seqlens[", i, "] = ", lp[i], " is negative");
      const int64_t end = int64_t(lp[i]) + cp[i + 1] - cp[i];
      TORCH_CHECK(!given(pos_emb) || end <= pos_emb.size(0), kOp, ": positions up to ", end - 1,
                  " exceed the model's ", pos_emb.size(0), " learned positions");
      for (int64_t j = cp[i]; j < cp[i + 1]; ++j) positions[j] = lp[i] + j - cp[i];
    }
    for (int64_t j = 0; j < rows; ++j)
      TORCH_CHECK(tp[j] >= 0 && tp[j] < vocab, kOp, ": token ", tp[j], " is outside the vocabulary [0, ", vocab,
                  ")");
    const int64_t n_out = out_rows.size(0);
    const int64_t* op = out_rows.data_ptr<int64_t>();
    for (int64_t j = 0; j < n_out; ++j)
      TORCH_CHECK(op[j] >= 0 && op[j] < rows, kOp, ": logit_rows[", j, "] = ", op[j], " is outside [0, ", rows,
                  ")");
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_w = q_size + 2 * kv_size;
    const int64_t mlp_w = intermediate * (gated ? 2 : 1);
    for (auto* v : {&h, &r, &x}) v->resize(std::max(rows, n_out) * hidden);
    qkv.resize(rows * qkv_w), mlp.resize(rows * mlp_w);
    act.resize(rows * intermediate);

    embed(tp, rows);
    for (const Layer& layer : layers) {
      norm_rows(layer.attn_norm, rows);
      layer.qkv->run(x.data(), rows, qkv.data(), acts);
      if (layer.q_norm.defined()) qk_norm(layer, rows, qkv_w);
      if (rotary_dim) rotate(rows, qkv_w);
      // q, k, v: column ranges of the qkv rows, which a 16-bit cache takes rounded to it (one conversion of the
      // rows, not one per part: three strided copies were 4% of a 16-sequence decode step, the other thread idle)
      const at::Tensor rows_qkv = at::from_blob(qkv.data(), {rows, qkv_w}).to(layer.k_cache.scalar_type());
      auto part = [&](int64_t first, int64_t n_heads) {
        return rows_qkv.narrow(1, first, n_heads * head_dim).unflatten(1, {n_heads, head_dim});
      };
      const at::Tensor o = std::get<0>(attn::flash_attn_varlen_kvcache(
          part(0, heads), layer.k_cache, layer.v_cache, part(q_size, kv_heads), part(q_size + kv_size, kv_heads), cu,
          lens, block_table, scale, true, window_left, 0, 0.0)).to(at::kFloat);
      layer.o->run(o.data_ptr<float>(), rows, h.data(), acts);
      norm_rows(layer.mlp_norm, rows);
      layer.w_in->run(x.data(), rows, mlp.data(), acts);
      activate(rows, mlp_w);
      layer.w_out->run(act.data(), rows, h.data(), acts);
    }
    // Only the rows asked for go on to the head (gathered first: a row may be asked for twice).
    std::vector<float> hg(n_out * hidden), rg(n_out * hidden);
    for (int64_t j = 0; j < n_out; ++j) {
      std::copy_n(&h[op[j] * hidden], hidden, &hg[j * hidden]);
      std::copy_n(&r[op[j] * hidden], hidden, &rg[j * hidden]);
    }
    std::copy(hg.begin(), hg.end(), h.begin());
    std::copy(rg.begin(), rg.end(), r.begin());
    norm_rows(final_norm, n_out);
    at::Tensor logits = at::empty({n_out, vocab}, at::TensorOptions().dtype(at::kFloat));
    if (n_out) head->run(x.data(), n_out, logits.data_ptr<float>(), acts);
    return logits;
  }

 private:
  // fn(r0, r1) over row ranges, on several threads once there are enough rows of `width` floats.
  template <class Fn>
  static void over_rows(int64_t rows, int64_t width, Fn&& fn) {
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(width, 1)), fn);
  }

  // x = norm(h + r) and r <- h + r for each row.
  void norm_rows(const Norm& norm, int64_t rows) {
    over_rows(rows, hidden, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) norm(&h[i * hidden], &r[i * hidden], &x[i * hidden], hidden);
    });
  }

  // h = token embedding (+ learned position), r = 0 so that the first fused norm's r <- h + r is h itself.
  // With rope, the (cos, sin) of each token's angles pos * inv_freq go to `rope`.
  void embed(const int64_t* tp, int64_t rows) {
    const float* te = token_table ? nullptr : tok_emb.data_ptr<float>();
    const float* f = rotary_dim ? inv_freq.data_ptr<float>() : nullptr;
    const int64_t half = rotary_dim / 2;
    rope.resize(rows * 2 * half);
    over_rows(rows, hidden, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t p = positions[i];
        float* hi = &h[i * hidden];
        if (token_table)
          token_table->row(tp[i], hi);
        else
          std::copy_n(te + tp[i] * hidden, hidden, hi);
        std::fill_n(&r[i * hidden], hidden, 0.f);
        if (given(pos_emb)) {
          const float* pe = pos_emb.data_ptr<float>() + p * hidden;
          for (int64_t j = 0; j < hidden; ++j) hi[j] += pe[j];
        }
        for (int64_t j = 0; j < half; ++j) {
          const float angle = float(p) * f[j];
          rope[i * 2 * half + j] = std::cos(angle);
          rope[i * 2 * half + half + j] = std::sin(angle);
        }
      }
    });
  }

  void qk_norm(const Layer& layer, int64_t rows, int64_t qkv_w) {
    over_rows(rows, qkv_w, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
          float* p = &qkv[i * qkv_w + hd * head_dim];
          const at::Tensor& w = hd < heads ? layer.q_norm : layer.k_norm;
          rms_norm_row(p, nullptr, nullptr, p, w.data_ptr<float>(), float(eps), head_dim);
        }
    });
  }

  // The first rotary_dim features of each q and k head, halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
  void rotate(int64_t rows, int64_t qkv_w) {
    const int64_t half = rotary_dim / 2;
    over_rows(rows, qkv_w, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const float *c = &rope[i * 2 * half], *s = c + half;
        for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
          float* p = &qkv[i * qkv_w + hd * head_dim];
          for (int64_t j = 0; j < half; ++j) {
            const float x1 = p[j], x2 = p[j + half];
            p[j] = x1 * c[j] - x2 * s[j];
            p[j + half] = x2 * c[j] + x1 * s[j];
          }
        }
      }
    });
  }

  // act = a(gate) [* up] with gate, up the two halves of each w_in row (gated) or the whole row.
  void activate(int64_t rows, int64_t mlp_w) {
    const int64_t n = intermediate;
    if (activation == kSilu) {
      over_rows(rows, mlp_w, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i)
          attn::simd().silu(&mlp[i * mlp_w], gated ? &mlp[i * mlp_w + n] : nullptr, &act[i * n], n);
      });
      return;
    }
    const at::Tensor in = at::from_blob(mlp.data(), {rows, mlp_w});
    at::Tensor out = at::from_blob(act.data(), {rows, n});
    at::gelu_out(out, in.narrow(1, 0, n), activation == kGeluTanh ? "tanh" : "none");
    if (gated) out.mul_(in.narrow(1, n, n));
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashgen, m) {
  m.class_<CpuLinear>("CpuLinear")
      .def(torch::init<std::string, std::vector<at::Tensor>, std::optional<at::Tensor>, int64_t, int64_t, int64_t>())
      .def("stack", &CpuLinear::stack)
      .def("set_bias", &CpuLinear::set_bias);
  m.class_<CpuDecoder>("CpuDecoder")
      .def(torch::init<c10::Dict<std::string, int64_t>, c10::Dict<std::string, double>, at::Tensor, at::Tensor,
                       at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &CpuDecoder::add_layer)
      .def("set_head", &CpuDecoder::set_head)
      .def("set_token_table", &CpuDecoder::set_token_table)
      .def("forward", &CpuDecoder::forward);
}

}  // namespace flashgen::cpu
