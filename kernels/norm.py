"""Fused RMSNorm and LayerNorm with an optional residual add: public functions and drop-in nn.Modules.

With a residual, one kernel pass computes h = x + residual and normalizes h, returning (norm(h), h): the
pre-norm decoder's `h = h + attn(...); y = norm(h)` without a separate add. Statistics are float32 for
float32/float16/bfloat16 inputs; the output has the input's dtype. Kernels: C++ on CPU, Triton (or CUDA C++)
on NVIDIA GPUs, the PyTorch reference elsewhere (see kernels/ops.py).
"""
import math
import numbers

import torch
from torch import nn

from . import ops  # noqa: F401  (declares the flashgen::* ops)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(fn, x, eps, residual, **params):
    """Raise a clear error for anything the kernels would refuse (or silently broadcast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    if not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{fn}: eps must be a number > 0, got {eps!r}")
    hidden = x.shape[-1]
    for name, p in params.items():
        if p is None:
            continue
        if p.shape != (hidden,):
            raise ValueError(f"{fn}: {name} must have shape ({hidden},) (x's last dimension), got {tuple(p.shape)}")
        _same_dtype_device(fn, name, p, x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _same_dtype_device(fn, "residual", residual, x)


def _same_dtype_device(fn, name, t, x):
    if t.dtype != x.dtype:
        raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")


def _contiguous(t):
    return t.contiguous() if t is not None else None


def rms_norm(x, weight, eps=1e-6, residual=None, weight_offset=False):
    """RMSNorm over the last dimension, optionally fused with a residual add.

    h = x + residual (or x);  y = h / sqrt(mean(h^2, -1) + eps) * w',  w' = 1 + weight if weight_offset
    (Gemma) else weight (no scaling when weight is None).

    x: (..., hidden), float32/float16/bfloat16; weight: (hidden,) or None, x's dtype; residual: like x.
    Returns y, or (y, h) when residual is given (h is what the next residual add needs).
    """
    _check("rms_norm", x, eps, residual, weight=weight)
    y, h, _ = torch.ops.flashgen.rms_norm_fwd(x.contiguous(), weight, _contiguous(residual), float(eps),
                                                  bool(weight_offset))
    return (y, h) if residual is not None else y


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dimension, optionally fused with a residual add.

    h = x + residual (or x);  y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias  (biased variance;
    weight and bias may be None).

    x: (..., hidden), float32/float16/bfloat16; weight, bias: (hidden,) or None, x's dtype; residual: like x.
    Returns y, or (y, h) when residual is given.
    """
    _check("layer_norm", x, eps, residual, weight=weight, bias=bias)
    y, h, _, _ = torch.ops.flashgen.layer_norm_fwd(x.contiguous(), weight, bias, _contiguous(residual),
                                                       float(eps))
    return (y, h) if residual is not None else y


def _flatten_normalized(module, x, residual, *params):
    """Normalizing over the last k dims equals normalizing the flattened last dim: reshape for the kernel.

    Parameters are cast to x's dtype (as torch.nn's norms accept float32 weights with bfloat16 inputs).
    """
    k = len(module.normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != tuple(module.normalized_shape):
        raise ValueError(f"{type(module).__name__}: expected input of shape (..., "
                         f"{', '.join(map(str, module.normalized_shape))}), got {tuple(x.shape)}")
    size = math.prod(module.normalized_shape)
    flat = lambda t: t.reshape(*t.shape[:t.dim() - k], size) if t is not None else None  # noqa: E731
    cast = lambda p: p.reshape(size).to(x.dtype) if p is not None else None  # noqa: E731
    return flat(x), flat(residual), [cast(p) for p in params]


def _unflatten(x, out):
    return tuple(t.reshape(x.shape) for t in out) if isinstance(out, tuple) else out.reshape(x.shape)


class FusedRMSNorm(nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (same arguments, parameter `weight`, state_dict) on the fused kernel.

    forward(x, residual=None) returns norm(x), or (norm(x + residual), x + residual) with a residual.
    `weight_offset=True` scales by (1 + weight) as Gemma does (weight then initialized to zeros).
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 weight_offset=False):
        self.weight_offset = weight_offset
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.zeros_(self.weight) if self.weight_offset else nn.init.ones_(self.weight)

    def forward(self, x, residual=None):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        xf, rf, (w,) = _flatten_normalized(self, x, residual, self.weight)
        return _unflatten(x, rms_norm(xf, w, eps, rf, self.weight_offset))

    def extra_repr(self):
        return super().extra_repr() + (", weight_offset=True" if self.weight_offset else "")


class FusedLayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters `weight`/`bias`, state_dict) on the fused kernel.

    forward(x, residual=None) returns norm(x), or (norm(x + residual), x + residual) with a residual.
    """

    def forward(self, x, residual=None):
        xf, rf, (w, b) = _flatten_normalized(self, x, residual, self.weight, self.bias)
        return _unflatten(x, layer_norm(xf, w, b, self.eps, rf))
