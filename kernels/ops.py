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


def _define(schema, fallback):
    """Declare `flashgen::<schema>` with `fallback` (the reference) as the kernel for devices without one."""
    name = schema.split("(")[0]
    lib.define(schema)
    lib.impl(name, fallback, "CompositeExplicitAutograd")
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


def _stats_like(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


def _h_like(x, residual):
    return torch.empty_like(x) if residual is not None else x.new_empty(0)


@torch.library.register_fake(RMS_NORM_FWD)
def _(x, weight, residual, eps, weight_offset):
    return torch.empty_like(x), _h_like(x, residual), _stats_like(x)


@torch.library.register_fake(RMS_NORM_BWD)
def _(dy, dh, h, weight, rstd, weight_offset):
    return torch.empty_like(h), torch.empty_like(weight) if weight is not None else h.new_empty(0)


@torch.library.register_fake(LAYER_NORM_FWD)
def _(x, weight, bias, residual, eps):
    return torch.empty_like(x), _h_like(x, residual), _stats_like(x), _stats_like(x)


@torch.library.register_fake(LAYER_NORM_BWD)
def _(dy, dh, h, weight, mean, rstd, has_bias):
    dw = torch.empty_like(weight) if weight is not None else h.new_empty(0)
    db_dtype = weight.dtype if weight is not None else h.dtype
    db = h.new_empty(h.shape[-1:], dtype=db_dtype) if has_bias else h.new_empty(0)
    return torch.empty_like(h), dw, db


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


# ---------------------------------------------------------------- attention
# (issue 3) flash_attn_fwd / flash_attn_bwd / flash_attn_kvcache


# ---------------------------------------------------------------- quantized matmuls
# (issue 4) int4_linear / int8_linear / int8_linear_dynamic
