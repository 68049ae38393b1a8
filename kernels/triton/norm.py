"""Triton kernels of the fused norms: flashgen::rms_norm_fwd/bwd and flashgen::layer_norm_fwd/bwd on CUDA.

One forward and one backward kernel serve both norms (IS_RMS: the mean is taken as 0), one program per row
(forward) or per group of rows (backward). A row is walked in chunks of BLOCK columns, so any hidden size
(1 .. 65536) runs with bounded registers; the chunks after the first pass come from L2.

Forward, with h = x + residual (rounded to x's dtype, written out) or x:
    mean = sum(h) / N (LayerNorm; 0 for RMSNorm),  rstd = 1 / sqrt(sum((h - mean)^2) / N + eps),
    y = (h - mean) * rstd * (w + w_off) + b.
Backward, with n = (h - mean) * rstd and g = dy * (w + w_off):
    dx = rstd * (g - mean(g) - n * mean(g * n)) + dh   (mean(g) dropped for RMSNorm),
    dw = sum_rows(dy * n),  db = sum_rows(dy).
Each backward program sums dw/db of its rows into its own float32 row of a (programs, N) buffer; the host
sums the buffer over programs, so no two programs write the same element.
"""
import os

import torch
import triton
import triton.language as tl

# (BLOCK, num_warps): the first whose BLOCK covers the row, else the last (the kernels loop over chunks).
CONFIGS = [(1024, 4), (4096, 8)]


@triton.jit
def _norm_fwd(X, R, H, Y, W, B, Mean, Rstd, N, eps, w_off, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    if HAS_RESIDUAL:
        R += row * N
        H += row * N
        Src = H
    else:
        Src = X
    # Pass 1: h = x + r written out; sum(h) (LayerNorm) or sum(h^2) (RMSNorm).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = h + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
            h_low = h.to(H.dtype.element_ty)
            tl.store(H + cols, h_low, mask=mask)
            h = h_low.to(tl.float32)  # the statistics use the rounded h, as the reference does
        if IS_RMS:
            acc += h * h
        else:
            acc += h
    if HAS_RESIDUAL:
        tl.debug_barrier()  # h written by every thread before any thread reads it back
    if IS_RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) / N
    else:
        mean = tl.sum(acc, axis=0) / N
        # Pass 2 (LayerNorm): the centred sum keeps the variance exact.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            d = tl.where(mask, tl.load(Src + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        var = tl.sum(acc, axis=0) / N
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)
    # Last pass: y.
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        y = (tl.load(Src + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_WEIGHT:
            y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + w_off)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(DY, DH, H, W, Mean, Rstd, DX, DWPart, DBPart, rows, N, w_off, rows_per_program,
              IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DW: tl.constexpr,
              HAS_DB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    DWPart += pid.to(tl.int64) * N
    DBPart += pid.to(tl.int64) * N
    for row in range(first, last):
        off = tl.cast(row, tl.int64) * N
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(Mean + row)
        # Pass 1: mean(g) and mean(g * n). Masked lanes have dy = 0, so g = 0 there.
        acc_g = tl.zeros([BLOCK], dtype=tl.float32)
        acc_gn = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            n = (tl.load(H + off + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            g = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = g * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + w_off)
            acc_g += g
            acc_gn += g * n
        if IS_RMS:
            c1 = 0.0
        else:
            c1 = tl.sum(acc_g, axis=0) / N
        c2 = tl.sum(acc_gn, axis=0) / N
        # Pass 2: dx, and this program's dw / db partial sums.
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            n = (tl.load(H + off + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy
            if HAS_WEIGHT:
                g = g * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + w_off)
            dx = rstd * (g - c1 - n * c2)
            if HAS_DH:
                dx += tl.load(DH + off + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                tl.store(DWPart + cols, tl.load(DWPart + cols, mask=mask, other=0.0) + dy * n, mask=mask)
            if HAS_DB:
                tl.store(DBPart + cols, tl.load(DBPart + cols, mask=mask, other=0.0) + dy, mask=mask)


# ------------------------------------------------------------------ launch wrappers

def _config(n):
    return next(((b, w) for b, w in CONFIGS if b >= n), CONFIGS[-1])


def _backward_programs(device, rows):
    """Enough programs to fill the GPU (a few per SM); under the interpreter, a handful."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


def _check(name, x, **others):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for arg, t in others.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: {arg} must have x's dtype {x.dtype} and device {x.device}, "
                             f"got {t.dtype} on {t.device}")


def _contig(t):
    return t.contiguous() if t is not None else None


def _fwd(x, weight, bias, residual, eps, is_rms, w_off):
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    x, weight, bias, residual = (_contig(t) for t in (x, weight, bias, residual))
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block, warps = _config(n)
    if rows:
        _norm_fwd[(rows,)](x, residual if residual is not None else x, h if residual is not None else y, y,
                           weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
                           n, float(eps), float(w_off), IS_RMS=is_rms, HAS_RESIDUAL=residual is not None,
                           HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block,
                           num_warps=warps)
    return y, h, mean, rstd


def _bwd(dy, dh, h, weight, mean, rstd, is_rms, w_off, has_bias):
    dy, dh, h, weight, mean, rstd = (_contig(t) for t in (dy, dh, h, weight, mean, rstd))
    n = h.shape[-1]
    rows = h.numel() // n
    dx = torch.empty_like(h)
    programs = _backward_programs(h.device, rows)
    has_dw = weight is not None
    dw_part = torch.zeros((programs, n) if has_dw else (1,), dtype=torch.float32, device=h.device)
    db_part = torch.zeros((programs, n) if has_bias else (1,), dtype=torch.float32, device=h.device)
    block, warps = _config(n)
    if rows:
        _norm_bwd[(programs,)](dy, dh if dh is not None else dy, h, weight if has_dw else h, mean, rstd, dx,
                               dw_part, db_part, rows, n, float(w_off), triton.cdiv(rows, programs),
                               IS_RMS=is_rms, HAS_DH=dh is not None, HAS_WEIGHT=has_dw, HAS_DW=has_dw,
                               HAS_DB=has_bias, BLOCK=block, num_warps=warps)
    out_dtype = weight.dtype if has_dw else h.dtype
    dw = dw_part.sum(0).to(out_dtype) if has_dw else h.new_empty(0)
    db = db_part.sum(0).to(out_dtype) if has_bias else h.new_empty(0)
    return dx, dw, db


def rms_norm_fwd(x, weight, residual, eps, weight_offset):
    if os.environ.get("FLASHGEN_CUDA_BACKEND") == "cuda" and x.is_cuda:
        return torch.ops.flashgen_cuda.rms_norm_fwd(x, weight, residual, eps, weight_offset)
    _check("rms_norm_fwd", x, weight=weight, residual=residual)
    y, h, _, rstd = _fwd(x, weight, None, residual, eps, True, 1.0 if weight_offset else 0.0)
    return y, h, rstd


def rms_norm_bwd(dy, dh, h, weight, rstd, weight_offset):
    _check("rms_norm_bwd", h, dy=dy, dh=dh, weight=weight)
    dx, dw, _ = _bwd(dy, dh, h, weight, rstd, rstd, True, 1.0 if weight_offset else 0.0, False)
    return dx, dw


def layer_norm_fwd(x, weight, bias, residual, eps):
    _check("layer_norm_fwd", x, weight=weight, bias=bias, residual=residual)
    return _fwd(x, weight, bias, residual, eps, False, 0.0)


def layer_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias):
    _check("layer_norm_bwd", h, dy=dy, dh=dh, weight=weight)
    return _bwd(dy, dh, h, weight, mean, rstd, False, 0.0, has_bias)


KERNELS = {fn.__name__: fn for fn in (rms_norm_fwd, rms_norm_bwd, layer_norm_fwd, layer_norm_bwd)}


def aot_specs():
    """Every (BLOCK, num_warps) config of both kernels, for both norms, in bfloat16 (fp16 compiles to the same
    code) and float32, with every optional input present (the most registers)."""
    specs = []
    for dtype in ("bf16", "fp32"):
        p = f"*{dtype}"
        for is_rms in (True, False):
            for block, warps in CONFIGS:
                norm = "rms" if is_rms else "layer"
                specs.append({
                    "name": f"_norm_fwd[{norm},{dtype},BLOCK={block}]", "fn": _norm_fwd,
                    "signature": {"X": p, "R": p, "H": p, "Y": p, "W": p, "B": p, "Mean": "*fp32", "Rstd": "*fp32",
                                  "N": "i32", "eps": "fp32", "w_off": "fp32", "IS_RMS": "constexpr",
                                  "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                                  "BLOCK": "constexpr"},
                    "constexprs": {"IS_RMS": is_rms, "HAS_RESIDUAL": True, "HAS_WEIGHT": True,
                                   "HAS_BIAS": not is_rms, "BLOCK": block},
                    "num_warps": warps, "num_stages": 1,
                })
                specs.append({
                    "name": f"_norm_bwd[{norm},{dtype},BLOCK={block}]", "fn": _norm_bwd,
                    "signature": {"DY": p, "DH": p, "H": p, "W": p, "Mean": "*fp32", "Rstd": "*fp32", "DX": p,
                                  "DWPart": "*fp32", "DBPart": "*fp32", "rows": "i32", "N": "i32", "w_off": "fp32",
                                  "rows_per_program": "i32", "IS_RMS": "constexpr", "HAS_DH": "constexpr",
                                  "HAS_WEIGHT": "constexpr", "HAS_DW": "constexpr", "HAS_DB": "constexpr",
                                  "BLOCK": "constexpr"},
                    "constexprs": {"IS_RMS": is_rms, "HAS_DH": True, "HAS_WEIGHT": True, "HAS_DW": True,
                                   "HAS_DB": not is_rms, "BLOCK": block},
                    "num_warps": warps, "num_stages": 1,
                })
    return specs
