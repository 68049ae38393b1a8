"""Triton rotary embedding: flashgen::rotary on CUDA (math in kernels/rotary.py).

One program per (token, head): it loads the token's cos / sin halves and the head's two halves of x, writes
the rotated halves, and copies the D - R columns past the rotary dim. backward (a constexpr) swaps in the
transposed rotation.
"""
import torch
import triton
import triton.language as tl

NUM_WARPS = 1


@triton.jit
def _rotary(X, Cos, Sin, Y, seqlen, heads, D, R, cos_batch_stride, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_P: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    h = R // 2
    row = (token // seqlen) * cos_batch_stride + token % seqlen
    X += (token * heads + head) * D
    Y += (token * heads + head) * D
    Cos += row * R
    Sin += row * R
    i = tl.arange(0, BLOCK_H)
    m = i < h
    a = tl.load(X + i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(X + h + i, mask=m, other=0.0).to(tl.float32)
    c_lo = tl.load(Cos + i, mask=m, other=0.0).to(tl.float32)
    c_hi = tl.load(Cos + h + i, mask=m, other=0.0).to(tl.float32)
    s_lo = tl.load(Sin + i, mask=m, other=0.0).to(tl.float32)
    s_hi = tl.load(Sin + h + i, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y_lo = a * c_lo + b * s_hi
        y_hi = b * c_hi - a * s_lo
    else:
        y_lo = a * c_lo - b * s_lo
        y_hi = b * c_hi + a * s_hi
    tl.store(Y + i, y_lo.to(Y.dtype.element_ty), mask=m)
    tl.store(Y + h + i, y_hi.to(Y.dtype.element_ty), mask=m)
    p = R + tl.arange(0, BLOCK_P)
    tl.store(Y + p, tl.load(X + p, mask=p < D), mask=p < D)


def rotary(x, cos, sin, backward):
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1] != x.shape[1]:
        raise ValueError(f"rotary: x must be (B, S, H, D) and cos, sin (B or 1, S, R), got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype or cos.device != x.device:
        raise ValueError(f"rotary: cos and sin must have x's dtype {x.dtype} and device {x.device}")
    b, s, heads, d = x.shape
    r = cos.shape[-1]
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _rotary[(b * s, heads)](x, cos, sin, y, s, heads, d, r, s if cos.shape[0] == b and b > 1 else 0,
                                BACKWARD=bool(backward), BLOCK_H=triton.next_power_of_2(max(r // 2, 1)),
                                BLOCK_P=triton.next_power_of_2(max(d - r, 1)), num_warps=NUM_WARPS)
    return y


KERNELS = {"rotary": rotary}


def aot_specs():
    """Head dim 128 fully rotated (the common case) and 64 of 96 (partial rotary), both directions, bf16 / fp32."""
    specs = []
    for dtype in ("bf16", "fp32"):
        p = f"*{dtype}"
        for block_h, block_p in ((64, 1), (32, 32)):
            for backward in (False, True):
                specs.append({
                    "name": f"_rotary[{dtype},h={block_h},p={block_p},{'bwd' if backward else 'fwd'}]",
                    "fn": _rotary,
                    "signature": {"X": p, "Cos": p, "Sin": p, "Y": p, "seqlen": "i32", "heads": "i32", "D": "i32",
                                  "R": "i32", "cos_batch_stride": "i32", "BACKWARD": "constexpr",
                                  "BLOCK_H": "constexpr", "BLOCK_P": "constexpr"},
                    "constexprs": {"BACKWARD": backward, "BLOCK_H": block_h, "BLOCK_P": block_p},
                    "attrs": {(i,): [["tt.divisibility", 16]] for i in range(4)}, "num_warps": NUM_WARPS,
                    "num_stages": 1})
    return specs
