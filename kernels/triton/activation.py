"""Triton kernels of SwiGLU's gating: flashgen::silu_mul_fwd / silu_mul_bwd on CUDA (math in kernels/activation.py).

Elementwise over the flattened contiguous tensors, BLOCK elements per program, float32 inside; the backward
recomputes sigmoid(gate) rather than saving it.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _silu_mul_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DG + offs, (d * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (d * g * s).to(DU.dtype.element_ty), mask=mask)


def _check(name, gate, **others):
    if gate.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: gate must be float32, float16 or bfloat16, got {gate.dtype}")
    for arg, t in others.items():
        if t.shape != gate.shape or t.dtype != gate.dtype or t.device != gate.device:
            raise ValueError(f"{name}: {arg} must have gate's shape {tuple(gate.shape)}, dtype {gate.dtype} and "
                             f"device {gate.device}, got {tuple(t.shape)}, {t.dtype} on {t.device}")


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def silu_mul_fwd(gate, up):
    _check("silu_mul_fwd", gate, up=up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    if gate.numel():
        _silu_mul_fwd[_grid(gate.numel())](gate, up, y, gate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def silu_mul_bwd(dy, gate, up):
    _check("silu_mul_bwd", gate, up=up, dy=dy)
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        _silu_mul_bwd[_grid(gate.numel())](dy, gate, up, dgate, dup, gate.numel(), BLOCK=BLOCK,
                                           num_warps=NUM_WARPS)
    return dgate, dup


KERNELS = {"silu_mul_fwd": silu_mul_fwd, "silu_mul_bwd": silu_mul_bwd}


def aot_specs():
    """Both kernels in bfloat16 (fp16 compiles alike) and float32, with 16-byte aligned pointers."""
    specs = []
    for dtype in ("bf16", "fp32"):
        p = f"*{dtype}"
        for name, fn, ptrs in (("_silu_mul_fwd", _silu_mul_fwd, ("G", "U", "Y")),
                               ("_silu_mul_bwd", _silu_mul_bwd, ("DY", "G", "U", "DG", "DU"))):
            signature = {**{ptr: p for ptr in ptrs}, "n": "i64", "BLOCK": "constexpr"}
            specs.append({"name": f"{name}[{dtype}]", "fn": fn, "signature": signature,
                          "constexprs": {"BLOCK": BLOCK}, "num_warps": NUM_WARPS, "num_stages": 1,
                          "attrs": {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}})
    return specs
