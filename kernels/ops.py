"""Every flashgen op, declared once: schema, fake (meta) impl, reference fallback and autograd.

Backends register kernels for their dispatch key:
- CPU: C++ in csrc/cpu, `TORCH_LIBRARY_IMPL(flashgen, CPU, m)` (loaded by kernels/_backend.py).
- CUDA: Triton in kernels/triton (`torch.library.register_kernel(..., "cuda")`).
- any other device: the PyTorch reference in kernels/reference.py, registered here as the
  CompositeExplicitAutograd fallback.
The fake impls give torch.compile the output shapes, so `fullgraph=True` traces through every op.
"""
import torch

from . import reference

lib = torch.library.Library("flashgen", "DEF")
REFERENCE = {}  # op name -> its reference (the fallback kernel)


def _define(schema, fallback):
    """Declare `flashgen::<schema>` with `fallback` (the reference) as the kernel for devices without one."""
    name = schema.split("(")[0]
    lib.define(schema)
    lib.impl(name, fallback, "CompositeExplicitAutograd")
    REFERENCE[name] = fallback
    return f"flashgen::{name}"


# ---------------------------------------------------------------- norms
# Outputs never alias inputs (custom-op rule): with no residual, h is returned empty and the caller keeps x.
RMS_NORM_FWD = _define(
    "rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps, bool weight_offset)"
    " -> (Tensor y, Tensor h, Tensor rstd)",
    reference.rms_norm_fwd,
)
RMS_NORM_BWD = _define(
    "rms_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor rstd, bool weight_offset)"
    " -> (Tensor dx, Tensor dweight)",
    reference.rms_norm_bwd,
)
LAYER_NORM_FWD = _define(
    "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
    " -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)",
    reference.layer_norm_fwd,
)
LAYER_NORM_BWD = _define(
    "layer_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
    " -> (Tensor dx, Tensor dweight, Tensor dbias)",
    reference.layer_norm_bwd,
)


# Every kernel returns contiguous outputs (it reads non-contiguous inputs through a contiguous copy).
def _stats_like(x):
    # float32 statistics (float64 for float64 x: the reference, which is the fallback there).
    return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _h_like(x, residual):
    return x.new_empty(x.shape) if residual is not None else x.new_empty(0)


@torch.library.register_fake(RMS_NORM_FWD)
def _(x, weight, residual, eps, weight_offset):
    return x.new_empty(x.shape), _h_like(x, residual), _stats_like(x)


@torch.library.register_fake(RMS_NORM_BWD)
def _(dy, dh, h, weight, rstd, weight_offset):
    return h.new_empty(h.shape), weight.new_empty(weight.shape) if weight is not None else h.new_empty(0)


@torch.library.register_fake(LAYER_NORM_FWD)
def _(x, weight, bias, residual, eps):
    return x.new_empty(x.shape), _h_like(x, residual), _stats_like(x), _stats_like(x)


@torch.library.register_fake(LAYER_NORM_BWD)
def _(dy, dh, h, weight, mean, rstd, has_bias):
    dw = weight.new_empty(weight.shape) if weight is not None else h.new_empty(0)
    db_dtype = weight.dtype if weight is not None else h.dtype
    db = h.new_empty(h.shape[-1:], dtype=db_dtype) if has_bias else h.new_empty(0)
    return h.new_empty(h.shape), dw, db


def _norm_setup(ctx, x, weight, residual, output):
    # The backward needs h = x + residual, which the forward returned (or x itself without a residual).
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.save_for_backward(output[1] if residual is not None else x, weight, *output[2:])


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _eps, weight_offset = inputs
    _norm_setup(ctx, x, weight, residual, output)
    ctx.weight_offset = weight_offset


def _norm_inputs(ctx, dy, dh):
    h = ctx.saved_tensors[0]
    dy = dy if dy is not None else torch.zeros_like(h)
    return dy, (dh if ctx.has_residual else None)


def _rms_norm_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dy, dh = _norm_inputs(ctx, dy, dh)
    dx, dw = torch.ops.flashgen.rms_norm_bwd(dy, dh, h, weight, rstd, ctx.weight_offset)
    return dx, dw if ctx.has_weight else None, dx if ctx.has_residual else None, None, None


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, _eps = inputs
    _norm_setup(ctx, x, weight, residual, output)
    ctx.has_bias = bias is not None


def _layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dy, dh = _norm_inputs(ctx, dy, dh)
    dx, dw, db = torch.ops.flashgen.layer_norm_bwd(dy, dh, h, weight, mean, rstd, ctx.has_bias)
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None,
            dx if ctx.has_residual else None, None)


torch.library.register_autograd(RMS_NORM_FWD, _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd(LAYER_NORM_FWD, _layer_norm_backward, setup_context=_layer_norm_setup)


# ---------------------------------------------------------------- activations
SILU_MUL_FWD = _define("silu_mul_fwd(Tensor gate, Tensor up) -> Tensor", reference.silu_mul_fwd)
SILU_MUL_BWD = _define("silu_mul_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)",
                       reference.silu_mul_bwd)


@torch.library.register_fake(SILU_MUL_FWD)
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake(SILU_MUL_BWD)
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, dy):
    return torch.ops.flashgen.silu_mul_bwd(dy.contiguous(), *ctx.saved_tensors)


torch.library.register_autograd(SILU_MUL_FWD, _silu_mul_backward, setup_context=_silu_mul_setup)


# ---------------------------------------------------------------- rotary embedding
# One op for both directions: the backward is the same rotation transposed (cos and sin take no gradient).
ROTARY = _define("rotary(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor", reference.rotary)


@torch.library.register_fake(ROTARY)
def _(x, cos, sin, backward):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, backward = inputs
    ctx.backward = backward
    ctx.save_for_backward(cos, sin)


def _rotary_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.flashgen.rotary(dy.contiguous(), cos, sin, not ctx.backward), None, None, None


torch.library.register_autograd(ROTARY, _rotary_backward, setup_context=_rotary_setup)


# ---------------------------------------------------------------- fused linear cross-entropy
LINEAR_CE_FWD = _define(
    "linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index)"
    " -> (Tensor loss, Tensor lse)",
    reference.linear_cross_entropy_fwd,
)
LINEAR_CE_BWD = _define(
    "linear_cross_entropy_bwd(Tensor dloss, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor lse,"
    " int ignore_index) -> (Tensor dhidden, Tensor dweight, Tensor dbias)",
    reference.linear_cross_entropy_bwd,
)


@torch.library.register_fake(LINEAR_CE_FWD)
def _(hidden, weight, bias, target, ignore_index):
    return _stats_like(hidden), _stats_like(hidden)


@torch.library.register_fake(LINEAR_CE_BWD)
def _(dloss, hidden, weight, bias, target, lse, ignore_index):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0))


def _linear_ce_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index = inputs
    ctx.ignore_index, ctx.has_bias = ignore_index, bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, output[1])


def _linear_ce_backward(ctx, dloss, _dlse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    if dloss is None:
        dloss = torch.zeros_like(lse)
    dh, dw, db = torch.ops.flashgen.linear_cross_entropy_bwd(dloss.contiguous(), hidden, weight, bias, target, lse,
                                                              ctx.ignore_index)
    return dh, dw, db if ctx.has_bias else None, None, None


torch.library.register_autograd(LINEAR_CE_FWD, _linear_ce_backward, setup_context=_linear_ce_setup)


# ---------------------------------------------------------------- attention
# Schemas fixed with the GPU engineers (see kernels/attention.py for the meaning of every argument).
FLASH_ATTN_FWD = _define(
    "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q,"
    " int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap)"
    " -> (Tensor out, Tensor lse)",
    reference.flash_attn_fwd,
)
FLASH_ATTN_BWD = _define(
    "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q,"
    " Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal,"
    " int window_left, int window_right, float softcap) -> (Tensor dq, Tensor dk, Tensor dv)",
    reference.flash_attn_bwd,
)
FLASH_ATTN_KVCACHE = _define(
    "flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v,"
    " Tensor cache_seqlens, Tensor? block_table, float softmax_scale, bool causal, int window_left,"
    " int window_right, float softcap, int num_splits) -> (Tensor out, Tensor lse)",
    reference.flash_attn_kvcache,
)
FLASH_ATTN_VARLEN_KVCACHE = _define(
    "flash_attn_varlen_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v,"
    " Tensor cu_seqlens_q, Tensor cache_seqlens, Tensor block_table, float softmax_scale, bool causal,"
    " int window_left, int window_right, float softcap) -> (Tensor out, Tensor lse)",
    reference.flash_attn_varlen_kvcache,
)


def _lse_like(q, varlen):
    """float32 (float64 for float64 q): dense q (B, S, H, D) -> (B, H, S); varlen q (T, H, D) -> (H, T)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(shape, dtype=dtype)


@torch.library.register_fake(FLASH_ATTN_FWD)
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap):
    return q.new_empty(q.shape), _lse_like(q, cu_seqlens_q is not None)


@torch.library.register_fake(FLASH_ATTN_BWD)
def _(dout, q, k, v, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake(FLASH_ATTN_KVCACHE)
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, *args):
    return q.new_empty(q.shape), _lse_like(q, False)


@torch.library.register_fake(FLASH_ATTN_VARLEN_KVCACHE)
def _(q, k_cache, v_cache, k, v, cu_seqlens_q, *args):
    return q.new_empty(q.shape), _lse_like(q, True)


def _attn_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens_q, cu_seqlens_k)
    ctx.options = options


def _attn_backward(ctx, dout, _dlse):
    # lse is a by-product for the caller (as in FlashAttention): no gradient flows through it.
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dout = dout if dout is not None else torch.zeros_like(out)
    dq, dk, dv = torch.ops.flashgen.flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                   *ctx.options)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd(FLASH_ATTN_FWD, _attn_backward, setup_context=_attn_setup)


# ---------------------------------------------------------------- quantized matmuls
# Canonical formats (kernels/quant.py): int4 qweight uint8 (N, K//2) two codes per byte (low nibble first),
# scales/offsets float32 or float16 (N, K//g), w = s*q + m; int8 qweight int8 (N, K), scales float32 or float16
# (N, 1) or (N, K//32), w = s*q. `*_prepack` turns them into the layout the kernels of their device stream best;
# the other ops take those prepacked tensors. Fake impls can't see a backend's packed layout, so the linears and
# dequantizes take out_features / in_features, and a backend whose prepacked shapes or dtypes differ from the
# canonical ones registers a shape function in PACKED_SHAPES (looked up by op and device type in the prepack fakes).
INT4_PREPACK = _define(
    "int4_prepack(Tensor qweight, Tensor scales, Tensor offsets, int group_size)"
    " -> (Tensor qweight, Tensor scales, Tensor offsets)",
    reference.int4_prepack,
)
INT4_LINEAR = _define(
    "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, int out_features,"
    " Tensor? bias) -> Tensor",
    reference.int4_linear,
)
INT4_DEQUANTIZE = _define(
    "int4_dequantize(Tensor qweight, Tensor scales, Tensor offsets, int group_size, int out_features,"
    " int in_features, ScalarType dtype) -> Tensor",
    reference.int4_dequantize,
)
INT8_PREPACK = _define("int8_prepack(Tensor qweight, Tensor scales) -> (Tensor qweight, Tensor scales)",
                       reference.int8_prepack)
INT8_LINEAR = _define(
    "int8_linear(Tensor x, Tensor qweight, Tensor scales, int out_features, Tensor? bias) -> Tensor",
    reference.int8_linear,
)
INT8_LINEAR_DYNAMIC = _define(
    "int8_linear_dynamic(Tensor x, Tensor qweight, Tensor scales, int out_features, Tensor? bias) -> Tensor",
    reference.int8_linear_dynamic,
)
INT8_DEQUANTIZE = _define(
    "int8_dequantize(Tensor qweight, Tensor scales, int out_features, int in_features, ScalarType dtype)"
    " -> Tensor",
    reference.int8_dequantize,
)

# float16 / bfloat16 weights kept 16-bit under float32 activations (half the bytes of a float32 copy).
HALF_LINEAR = _define("half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", reference.half_linear)

# GGML block types (kernels/ggml.py): `blocks` uint8 (N, K / block * block_bytes), the file's own bytes.
GGML_PREPACK = _define("ggml_prepack(Tensor blocks, int ggml_type, int in_features) -> Tensor", reference.ggml_prepack)
GGML_LINEAR = _define(
    "ggml_linear(Tensor x, Tensor packed, int ggml_type, int out_features, Tensor? bias) -> Tensor",
    reference.ggml_linear,
)
GGML_DEQUANTIZE = _define(
    "ggml_dequantize(Tensor packed, int ggml_type, int out_features, int in_features, ScalarType dtype) -> Tensor",
    reference.ggml_dequantize,
)

def _cpu_tiles(n):
    return (n + 15) // 16


def _cpu_int4_packed_shapes(qweight, scales, offsets, group_size):
    # csrc/cpu/quant_pack.cpp: 16-row tiles, 256 bytes per tile per 32 input features; scales and offsets per
    # tile in the canonical scales' dtype.
    n, k = qweight.shape[0], qweight.shape[1] * 2
    t = _cpu_tiles(n)
    return [((t, k // 32, 256), torch.uint8), ((t, k // group_size, 16), scales.dtype),
            ((t, k // group_size, 16), scales.dtype)]


def _cpu_int8_packed_shapes(qweight, scales):
    # csrc/cpu/quant_pack.cpp: 16-row tiles, 512 code bytes + 16 int32 row sums per tile per 32 input features.
    n, k = qweight.shape
    t, kb = _cpu_tiles(n), (k + 31) // 32
    return [((t, kb, 576), torch.int8), ((t, 1 if scales.shape[1] == 1 else kb, 16), scales.dtype)]


def _cpu_ggml_packed_shapes(blocks, ggml_type, in_features):
    # csrc/cpu/ggml.h: 16-row tiles, one record per tile per super-block (its size is the C++ layout's).
    from . import _backend, ggml

    t = ggml.block_type(ggml_type)
    return [((_cpu_tiles(blocks.shape[0]), in_features // t.block, _backend.C.ggml_tile_bytes(t.type_id)), torch.uint8)]

def _cuda_ggml_packed_shapes(blocks, ggml_type, in_features):
    from . import ggml

    return [((blocks.shape[0], ggml.cuda_row_bytes(ggml_type, in_features)), torch.uint8)]


def _cuda_packed_shapes(qweight, *params):
    # kernels/triton/quant.py: the canonical tensors, with float32 scales (and offsets).
    return [(qweight.shape, qweight.dtype)] + [(p.shape, torch.float32) for p in params if isinstance(p, torch.Tensor)]


PACKED_SHAPES = {
    (INT4_PREPACK, "cpu"): _cpu_int4_packed_shapes,
    (INT8_PREPACK, "cpu"): _cpu_int8_packed_shapes,
    (GGML_PREPACK, "cpu"): _cpu_ggml_packed_shapes,
    (INT4_PREPACK, "cuda"): _cuda_packed_shapes,
    (INT8_PREPACK, "cuda"): _cuda_packed_shapes,
    (GGML_PREPACK, "cuda"): _cuda_ggml_packed_shapes,
}


def _packed_fake(op, first, *args):
    shapes = PACKED_SHAPES.get((op, first.device.type))
    if shapes is None:  # canonical layout (the reference prepack returns copies)
        return tuple(torch.empty_like(t) for t in (first,) + args[: 2 if op == INT4_PREPACK else 1])
    return tuple(first.new_empty(shape, dtype=dtype) for shape, dtype in shapes(first, *args))


@torch.library.register_fake(INT4_PREPACK)
def _(qweight, scales, offsets, group_size):
    return _packed_fake(INT4_PREPACK, qweight, scales, offsets, group_size)


@torch.library.register_fake(INT8_PREPACK)
def _(qweight, scales):
    return _packed_fake(INT8_PREPACK, qweight, scales)


@torch.library.register_fake(GGML_PREPACK)
def _(blocks, ggml_type, in_features):
    shapes = PACKED_SHAPES.get((GGML_PREPACK, blocks.device.type))
    if shapes is None:
        return torch.empty_like(blocks)
    ((shape, dtype),) = shapes(blocks, ggml_type, in_features)
    return blocks.new_empty(shape, dtype=dtype)

def _linear_fake(x, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake(INT4_LINEAR)
def _(x, qweight, scales, offsets, group_size, out_features, bias):
    return _linear_fake(x, out_features)


@torch.library.register_fake(INT8_LINEAR)
def _(x, qweight, scales, out_features, bias):
    return _linear_fake(x, out_features)


@torch.library.register_fake(INT8_LINEAR_DYNAMIC)
def _(x, qweight, scales, out_features, bias):
    return _linear_fake(x, out_features)


@torch.library.register_fake(HALF_LINEAR)
def _(x, weight, bias):
    return _linear_fake(x, weight.shape[0])

@torch.library.register_fake(GGML_LINEAR)
def _(x, packed, ggml_type, out_features, bias):
    return _linear_fake(x, out_features)

@torch.library.register_fake(INT4_DEQUANTIZE)
def _(qweight, scales, offsets, group_size, out_features, in_features, dtype):
    return qweight.new_empty((out_features, in_features), dtype=dtype)


@torch.library.register_fake(INT8_DEQUANTIZE)
def _(qweight, scales, out_features, in_features, dtype):
    return qweight.new_empty((out_features, in_features), dtype=dtype)


@torch.library.register_fake(GGML_DEQUANTIZE)
def _(packed, ggml_type, out_features, in_features, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)

# Backward of y = x W^T + b with W frozen: dx = dy W (W dequantized by the same device's op), db = sum dy.
# int8_linear_dynamic passes the gradient straight through its activation rounding.
def _qlinear_setup(ctx, inputs, output):
    x, weights, bias = inputs[0], inputs[1:-2], inputs[-1]
    ctx.consts = [None if isinstance(t, torch.Tensor) else t for t in weights]  # group_size stays a Python int
    ctx.out_features, ctx.in_features, ctx.has_bias = inputs[-2], x.shape[-1], bias is not None
    ctx.save_for_backward(*(t for t in weights if isinstance(t, torch.Tensor)))


def _qlinear_backward(dequantize, n_args):
    def backward(ctx, dy):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if c is None else c for c in ctx.consts]
        w = dequantize(*args, ctx.out_features, ctx.in_features, dy.dtype)
        dx = dy @ w
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return (dx,) + (None,) * n_args + (db,)

    return backward


torch.library.register_autograd(
    INT4_LINEAR, _qlinear_backward(torch.ops.flashgen.int4_dequantize.default, 5), setup_context=_qlinear_setup)
for _op in (INT8_LINEAR, INT8_LINEAR_DYNAMIC):
    torch.library.register_autograd(
        _op, _qlinear_backward(torch.ops.flashgen.int8_dequantize.default, 3), setup_context=_qlinear_setup)
torch.library.register_autograd(
    GGML_LINEAR, _qlinear_backward(torch.ops.flashgen.ggml_dequantize.default, 3), setup_context=_qlinear_setup)


def _half_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(weight)


def _half_backward(ctx, dy):
    (weight,) = ctx.saved_tensors
    db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
    return dy @ weight.to(dy.dtype), None, db


torch.library.register_autograd(HALF_LINEAR, _half_backward, setup_context=_half_setup)
