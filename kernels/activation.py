"""SwiGLU's gating, silu(gate) * up, as one differentiable op (flashgen::silu_mul_fwd / silu_mul_bwd).

    y = gate * sigmoid(gate) * up
    dup = dy * gate * s,   dgate = dy * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate)

One pass over the inputs instead of eager PyTorch's three (silu, multiply, and their saved intermediates):
the backward recomputes s from gate. Computed in float32; outputs in the inputs' dtype. Kernels: C++ on CPU,
Triton on NVIDIA GPUs, the PyTorch reference elsewhere (kernels/ops.py).
"""
import torch

from . import ops  # noqa: F401  (declares torch.ops.flashgen.silu_mul_*)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def silu_mul(gate, up):
    """silu(gate) * up for gate, up of one shape, dtype (float32 / float16 / bfloat16) and device."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"silu_mul: {name} must be a tensor, got {type(t).__name__}")
    if gate.dtype not in _DTYPES:
        raise TypeError(f"silu_mul: gate must be float32, float16 or bfloat16, got {gate.dtype}")
    if up.dtype != gate.dtype:
        raise TypeError(f"silu_mul: up has dtype {up.dtype} but gate has {gate.dtype}: they must match")
    if up.shape != gate.shape:
        raise ValueError(f"silu_mul: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"silu_mul: up is on {up.device} but gate is on {gate.device}: they must match")
    return torch.ops.flashgen.silu_mul_fwd(gate.contiguous(), up.contiguous())
