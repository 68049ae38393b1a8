"""Rotary position embedding (rotate-half form, as Llama / Hugging Face) as one differentiable op, flashgen::rotary.

With h = R / 2 for the rotary dim R (R = head_dim, or less for partial rotary):
    y[:h]  = x[:h] cos[:h] - x[h:R] sin[:h]
    y[h:R] = x[h:R] cos[h:R] + x[:h] sin[h:R],      y[R:] = x[R:]
and the backward is the transposed rotation of dy. One pass in float32 (eager PyTorch makes rotate_half, two
products and a sum, and saves them); cos and sin take no gradient. Kernels: C++ on CPU, Triton on NVIDIA GPUs,
the PyTorch reference elsewhere.
"""
import torch

from . import ops  # noqa: F401  (declares torch.ops.flashgen.rotary)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def apply_rotary(x, cos, sin):
    """x (batch, seqlen, heads, head_dim); cos, sin (batch or 1, seqlen, rotary_dim) with rotary_dim even and
    <= head_dim, x's dtype and device. Returns the rotated x (contiguous, x's dtype)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES or x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be a float32 / float16 / bfloat16 (batch, seqlen, heads, head_dim) "
                         f"tensor, got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    b, s, _, d = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s or t.shape[2] % 2 or not 0 < t.shape[2] <= d:
            raise ValueError(f"apply_rotary: {name} must be ({b} or 1, {s}, rotary_dim) with rotary_dim even and "
                             f"<= {d}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"apply_rotary: {name} must have x's dtype {x.dtype} and device {x.device}, got "
                            f"{t.dtype} on {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: cos and sin differ in shape: {tuple(cos.shape)} and {tuple(sin.shape)}")
    return torch.ops.flashgen.rotary(x.contiguous(), cos.contiguous(), sin.contiguous(), False)
