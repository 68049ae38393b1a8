"""Triton kernels of the quantized matmuls (issue 4): int4 / int8 weight-only linear, W8A8, dequantize, prepack.

Math (canonical formats, see kernels/quant.py):
- int4: w[n, k] = s[n, k // g] * q[n, k] + m[n, k // g], codes q in [0, 15], g in {32, 64, 128};
  qweight byte (n, j) = q[n, 2j] | q[n, 2j + 1] << 4.
- int8: w[n, k] = s[n] * q[n, k] (scales (N, 1), per output channel) or s[n, k // 32] * q[n, k] (scales
  (N, K // 32), blocks of 32).
- linear: out[m, n] = sum_k x[m, k] w[n, k] + bias[n], accumulated in float32, returned in x's dtype.
- W8A8 (int8_linear_dynamic): each row of x is quantized symmetrically as reference.quantize_rows_int8 does,
  amax = max_k |x[m, k]|, xq[m, k] = round_half_even(x[m, k] * (127 / amax)) in [-127, 127] (0 for a row of
  zeros), a[m] = amax / 127; the integer products are summed in int32 and scaled once:
  out[m, n] = a[m] s[n] sum_k xq q (per channel) or a[m] sum_b s[n, b] sum_{k in block b} xq q (blocks of 32).

CUDA layout (what *_prepack returns on CUDA): the canonical tensors themselves, contiguous, with scales and
offsets in float32 (canonical float16 ones are converted, exactly). Row n of qweight is one contiguous run of
K/2 (int4) or K (int8) bytes: a (BLOCK_N, BLOCK_K) weight tile of the GEMM is BLOCK_N coalesced runs, and the
CUDA C++ GEMV (csrc/cuda/quant_gemv.cu) streams a row per warp with 16-byte loads. The float32 scales and
offsets give the dequantized values of the reference.

Kernels:
- `_qmm_kernel`: one tiled kernel for every format. A program owns a (BLOCK_M, BLOCK_N) output tile, loads
  the weight codes of a (BLOCK_N, BLOCK_K) tile, dequantizes them in registers into x's dtype and multiplies
  with tl.dot, accumulating in float32 (W8A8: int8 x int8 -> int32). BLOCK_K divides the group size, so a
  tile holds one group per row and needs one scale (and offset) per row. M > 16 (prefill) runs autotuned
  tiles; M <= 16 (decode) runs 16-row tiles with split-K: each program covers a slice of K and writes
  float32 partial sums that `_splitk_reduce_kernel` adds (with the bias), so a GPU fills up even when the
  output has few tiles.
- `_quantize_rows_kernel`: the per-token activation quantization of W8A8.
- `_dequant_kernel`: the dequantized weight (N, K), same tile loader as the GEMM.
"""
import os

import torch
import triton
import triton.language as tl

from ..quant import INT4_GROUP_SIZES, SCALE_DTYPES

INT8_BLOCK = 32
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SMALL_M = 16  # M up to this runs the split-K path
CUDA_GEMV_MAX_M = 8  # M up to this may route to the CUDA C++ GEMV (FLASHGEN_CUDA_BACKEND=cuda)
# 1.5 * 2**23: in float32, (v + magic) - magic rounds |v| < 2**22 to the nearest integer, ties to even
_ROUND_MAGIC = tl.constexpr(12582912.0)


# ---------------------------------------------------------------- kernels
@triton.jit
def _weight_codes(w_ptr, offs_n, k0, N, K, W4: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes q[offs_n, k0 : k0 + BLOCK_K] as a (BLOCK_N, BLOCK_K) tile; 0 for rows >= N and columns >= K."""
    rows = offs_n[:, None].to(tl.int64)
    if W4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + rows * (K // 2) + offs_b[None, :], mask=offs_n[:, None] < N, other=0)
        # byte j holds columns 2j (low nibble) and 2j + 1 (high nibble): join + reshape interleaves them back
        return tl.reshape(tl.join(b & 15, b >> 4), (offs_n.shape[0], BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rows * K + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                       other=0)


@triton.jit
def _group_param(p_ptr, offs_n, k0, N, K, G: tl.constexpr):
    """The per-group float32 parameter (scale or offset) of rows offs_n for the group holding column k0."""
    return tl.load(p_ptr + offs_n.to(tl.int64) * (K // G) + k0 // G, mask=offs_n < N, other=0.0)


@triton.jit
def _dequantize_tile(q, s_ptr, m_ptr, offs_n, k0, N, K, W4: tl.constexpr, G: tl.constexpr):
    """float32 weights of a code tile within one group per row: fma(q, s, m) (int4, rounded once as in the
    reference) or q * s (int8 blocks)."""
    s = _group_param(s_ptr, offs_n, k0, N, K, G)[:, None]
    if W4:
        return tl.fma(q.to(tl.float32), s, _group_param(m_ptr, offs_n, k0, N, K, G)[:, None])
    return q.to(tl.float32) * s


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile, in grouped order: GROUP_M consecutive row blocks run
    together and share each weight tile in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, pid_k, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """The float32 tile acc: with SPLIT, as split pid_k's partial sums into out[pid_k] (no bias); else plus
    the bias, in out's dtype."""
    mask_n = offs_n < N
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + out_offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qmm_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr,
                M, N, K, stride_xm, K_SPLIT, M_BUCKET,
                W4: tl.constexpr, G: tl.constexpr, A8: tl.constexpr, HAS_BIAS: tl.constexpr,
                SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x @ dequant(w).T (+ bias). G = 0: one scale per output channel, applied in the epilogue.

    A8: x holds int8 codes with per-row scales xs (W8A8). SPLIT: program axis 1 takes columns
    [pid_k * K_SPLIT, (pid_k + 1) * K_SPLIT) and the float32 partial sums go to out[pid_k] (no bias).
    M_BUCKET only keys the autotuner (a power of two near M) and is unused here.
    """
    tl.static_assert(G == 0 or G % BLOCK_K == 0, "BLOCK_K must divide the group size")
    pid_k = tl.program_id(1)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if (A8 and G == 0) else tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        q = _weight_codes(w_ptr, offs_n, k0, N, K, W4, BLOCK_K)
        if A8:
            part = tl.dot(x, tl.trans(q), out_dtype=tl.int32)
            if G == 0:
                acc += part
            else:
                acc += part.to(tl.float32) * _group_param(s_ptr, offs_n, k0, N, K, G)[None, :]
        else:
            if G == 0:
                # int8 codes are exact in every float type (via float32: no direct int -> bf16 in the interpreter)
                w = q.to(tl.float32).to(x.dtype)
            else:
                w = _dequantize_tile(q, s_ptr, m_ptr, offs_n, k0, N, K, W4, G).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    acc = acc.to(tl.float32)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if G == 0:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if A8:
        acc *= tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT_K,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = sum_s part[s, m, n] (+ bias[n]), cast to out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row) * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """amax = max|x[row]|; xq[row] = round_half_even(x[row] * (127 / amax)) (0 if amax = 0); xs[row] = amax / 127.

    The float32 operations of reference.quantize_rows_int8, each rounded once (IEEE divisions, launched without
    fp fusion so the product is not fused into the rounding add), so the codes are identical.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
    amax_row = tl.max(amax)
    inv = tl.where(amax_row > 0, tl.math.div_rn(127.0, tl.where(amax_row > 0, amax_row, 1.0)), 0.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32) * inv
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(xq_ptr + row * K + offs, v.to(tl.int8), mask=offs < K)
    tl.store(xs_ptr + row, tl.math.div_rn(amax_row, 127.0))


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, K,
                    W4: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = s * q[n, k] (+ m) with the scale (and offset) of (n, k)'s group or channel (G = 0)."""
    tl.static_assert(G == 0 or G % BLOCK_K == 0, "BLOCK_K must divide the group size")
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    q = _weight_codes(w_ptr, offs_n, k0, N, K, W4, BLOCK_K)
    if G == 0:
        w = q.to(tl.float32) * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    else:
        w = _dequantize_tile(q, s_ptr, m_ptr, offs_n, k0, N, K, W4, G)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------- tile configurations
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Prefill (M > 16): autotuned over these; configs whose BLOCK_K does not divide the group size are pruned.
GEMM_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 128, 4, 3),
    _cfg(128, 128, 32, 8, 4),
    _cfg(64, 128, 32, 4, 5),
    _cfg(32, 64, 32, 4, 4),
]
# float32 activations multiply in tf32x3 (three tf32 products, float32 accuracy) or tf32: their operands are
# twice as wide and the larger tiles above spill registers.
FP32_GEMM_CONFIGS = [
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 128, 32, 4, 4),
    _cfg(32, 64, 32, 4, 4),
]


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fits(config, g):
    return g == 0 or g % config.kwargs["BLOCK_K"] == 0


def _prune(configs, named_args, **kwargs):
    allowed = FP32_GEMM_CONFIGS if named_args["x_ptr"].dtype == torch.float32 else GEMM_CONFIGS
    valid = [c for c in configs if c in allowed and _fits(c, kwargs.get("G", 0))]  # (K-quants: no G)
    if _interpreting():
        # No GPU to time configs on: run the smallest tile (the tests sweep every config explicitly).
        return [min(valid, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return valid


_qmm_autotuned = triton.autotune(configs=GEMM_CONFIGS + FP32_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "G"],
                                 prune_configs_by={"early_config_prune": _prune})(_qmm_kernel)


def small_m_config(g, act_dtype):
    """The split-K tile for M <= 16: 16 rows (the smallest tl.dot), 64 columns, BLOCK_K within a group."""
    block_k = min(g or 128, 32 if act_dtype == torch.float32 else 128)
    return _cfg(16, 64, block_k, 4, 3, group_m=1)


def _dot_precision(act_dtype):
    if act_dtype != torch.float32:
        return "ieee"  # unused: 16-bit and int8 operands multiply exactly
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: an H100's count, so the split-K path is exercised as on a GPU


def _split_k(n_tiles, k_tiles, device):
    """Slices of K so that about two programs per SM run, each over at least 4 K tiles."""
    want = triton.cdiv(2 * _num_sms(device), n_tiles)
    return max(1, min(want, k_tiles // 4))


# ---------------------------------------------------------------- launchers
def _matmul(x2, xs, qweight, scales, offsets, bias, n, w4, g, out_dtype, config=None):
    """out (M, N) = x2 @ dequant(qweight).T (+ bias); x2 (M, K) with unit column stride. `config` forces a tile."""
    m, k = x2.shape
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    a8 = xs is not None
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    common = dict(W4=w4, G=g, A8=a8, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2.dtype))
    weights = (xs if a8 else x2, qweight, scales, offsets if offsets is not None else scales)
    return run_gemm(_qmm_kernel, _qmm_autotuned, x2, weights, (), bias, out, common, small_m_config(g, x2.dtype),
                    config)


def run_gemm(kernel, autotuned, x2, weights, extra, bias, out, common, small_config, config=None):
    """Launch a quantized GEMM kernel of arguments (x, *weights, bias, out, M, N, K, *extra, stride_xm, K_SPLIT,
    M_BUCKET): autotuned for M > 16 unless `config` forces a tile; else the split-K tile `small_config` (or
    `config`), its partial sums added by _splitk_reduce_kernel. Returns out (M, N)."""
    (m, k), n = x2.shape, out.shape[1]
    b_arg = bias if bias is not None else out
    if config is None and m > SMALL_M:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)  # noqa: E731
        autotuned[grid](x2, *weights, b_arg, out, m, n, k, *extra, x2.stride(0), k, triton.next_power_of_2(m),
                        SPLIT=False, **common)
        return out
    config = config or small_config
    bm, bn, bk = (config.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    n_tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_tiles = triton.cdiv(k, bk)
    split = _split_k(n_tiles, k_tiles, x2.device) if m <= SMALL_M else 1
    k_split = triton.cdiv(k_tiles, split) * bk
    split = triton.cdiv(k, k_split)
    dst = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else out
    kernel[(n_tiles, split)](x2, *weights, b_arg, dst, m, n, k, *extra, x2.stride(0), k_split,
                             triton.next_power_of_2(m), SPLIT=split > 1, **common, **config.all_kwargs())
    if split > 1:
        block_n = 128
        _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](dst, b_arg, out, m, n, split,
                                                            HAS_BIAS=bias is not None, BLOCK_N=block_n)
    return out


def _rows(x, k):
    """x (..., K) as (M, K) with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_rows(x2):
    """Per-token symmetric int8 quantization of x2 (M, K): (xq int8 (M, K), a float32 (M,)), see module doc."""
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m > 0:
        _quantize_rows_kernel[(m,)](x2, xq, xs, k, x2.stride(0), BLOCK_K=min(1024, triton.next_power_of_2(max(k, 1))),
                                    enable_fp_fusion=False)
    return xq, xs


# ---------------------------------------------------------------- input checks
def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _check_same_device(*named):
    device = named[0][1].device
    for name, t in named:
        _require(t.device == device, f"{name} is on {t.device}, expected {device} (the device of {named[0][0]})")


def _dtype_names(dtypes):
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


# The prepacks take the canonical scales (float32 or float16); the other ops the prepacked float32 ones.
PACKED_SCALE_DTYPES = (torch.float32,)


def _check_int4(qweight, scales, offsets, group_size, n, k, scale_dtypes=PACKED_SCALE_DTYPES):
    _require(group_size in INT4_GROUP_SIZES, f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    _require(k > 0 and k % group_size == 0,
             f"in_features ({k}) must be a positive multiple of group_size ({group_size})")
    _require(qweight.dtype == torch.uint8 and tuple(qweight.shape) == (n, k // 2),
             f"qweight must be uint8 of shape ({n}, {k // 2}), got {qweight.dtype} {tuple(qweight.shape)}")
    for name, t in (("scales", scales), ("offsets", offsets)):
        _require(t.dtype in scale_dtypes and tuple(t.shape) == (n, k // group_size),
                 f"{name} must be {_dtype_names(scale_dtypes)} of shape ({n}, {k // group_size}), got {t.dtype} "
                 f"{tuple(t.shape)}")
    _require(offsets.dtype == scales.dtype,
             f"offsets must have the dtype of scales ({scales.dtype}), got {offsets.dtype}")
    _check_same_device(("qweight", qweight), ("scales", scales), ("offsets", offsets))


def _int8_group(qweight, scales, n, k, scale_dtypes=PACKED_SCALE_DTYPES):
    """Checks the int8 weight; returns its group size for the kernels (0 = per output channel, else 32)."""
    _require(qweight.dtype == torch.int8 and tuple(qweight.shape) == (n, k),
             f"qweight must be int8 of shape ({n}, {k}), got {qweight.dtype} {tuple(qweight.shape)}")
    blocked = k % INT8_BLOCK == 0 and k // INT8_BLOCK > 1 and tuple(scales.shape) == (n, k // INT8_BLOCK)
    _require(scales.dtype in scale_dtypes and (tuple(scales.shape) == (n, 1) or blocked),
             f"scales must be {_dtype_names(scale_dtypes)} of shape ({n}, 1) (per channel) or ({n}, {k}/{INT8_BLOCK}) "
             f"(blocks of {INT8_BLOCK}), got {scales.dtype} {tuple(scales.shape)}")
    _check_same_device(("qweight", qweight), ("scales", scales))
    return INT8_BLOCK if blocked else 0


def _check_x(x, qweight, bias, n):
    _require(x.dtype in ACT_DTYPES, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _require(x.dim() >= 1, "x must have at least one dimension (..., in_features)")
    _check_same_device(("x", x), ("qweight", qweight))
    if bias is not None:
        _require(tuple(bias.shape) == (n,) and bias.is_floating_point(),
                 f"bias must be a floating tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
        _check_same_device(("x", x), ("bias", bias))


def _int4_in_features(qweight):
    return qweight.shape[-1] * 2


# ---------------------------------------------------------------- ops (CUDA kernels of flashgen::*)
def int4_prepack(qweight, scales, offsets, group_size):
    """CUDA layout = canonical layout (module doc): contiguous copies, float32 scales and offsets, checked."""
    _require(qweight.dim() == 2, f"qweight must be 2-D (N, K/2), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], _int4_in_features(qweight)
    _check_int4(qweight, scales, offsets, group_size, n, k, SCALE_DTYPES)
    return qweight.clone(memory_format=torch.contiguous_format), _packed_param(scales), _packed_param(offsets)


def int8_prepack(qweight, scales):
    """CUDA layout = canonical layout (module doc): contiguous copies, float32 scales, checked."""
    _require(qweight.dim() == 2, f"qweight must be 2-D (N, K), got shape {tuple(qweight.shape)}")
    _int8_group(qweight, scales, *qweight.shape, SCALE_DTYPES)
    return qweight.clone(memory_format=torch.contiguous_format), _packed_param(scales)


def _packed_param(t):
    """A contiguous float32 copy (never an alias of the input: custom-op outputs are fresh tensors)."""
    return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _use_cuda_gemv(x, qweight):
    """FLASHGEN_CUDA_BACKEND=cuda routes decode-sized calls the CUDA C++ GEMV takes (16-bit x, at most 8 rows,
    K a multiple of 16, qweight 16-byte aligned) to it; everything else stays on Triton."""
    k = x.shape[-1]
    return (os.environ.get("FLASHGEN_CUDA_BACKEND") == "cuda" and x.is_cuda and x.dtype != torch.float32
            and k % 16 == 0 and x.numel() <= CUDA_GEMV_MAX_M * k and qweight.data_ptr() % 16 == 0)


def int4_linear(x, qweight, scales, offsets, group_size, out_features, bias=None):
    k = x.shape[-1]
    _check_x(x, qweight, bias, out_features)
    _check_int4(qweight, scales, offsets, group_size, out_features, k)
    if _use_cuda_gemv(x, qweight):
        return torch.ops.flashgen_cuda.int4_linear(x, qweight, scales, offsets, group_size, out_features, bias)
    out = _matmul(_rows(x, k), None, qweight.contiguous(), scales.contiguous(), offsets.contiguous(), bias,
                  out_features, True, group_size, x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


def int8_linear(x, qweight, scales, out_features, bias=None):
    k = x.shape[-1]
    _check_x(x, qweight, bias, out_features)
    g = _int8_group(qweight, scales, out_features, k)
    if _use_cuda_gemv(x, qweight):
        return torch.ops.flashgen_cuda.int8_linear(x, qweight, scales, out_features, bias)
    out = _matmul(_rows(x, k), None, qweight.contiguous(), scales.contiguous(), None, bias, out_features, False, g,
                  x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


def int8_linear_dynamic(x, qweight, scales, out_features, bias=None):
    k = x.shape[-1]
    _check_x(x, qweight, bias, out_features)
    g = _int8_group(qweight, scales, out_features, k)
    xq, xs = quantize_rows(_rows(x, k))
    out = _matmul(xq, xs, qweight.contiguous(), scales.contiguous(), None, bias, out_features, False, g, x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


def _dequantize(qweight, scales, offsets, n, k, w4, g, dtype):
    _require(dtype in ACT_DTYPES, f"dtype must be float16, bfloat16 or float32, got {dtype}")
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    block_n, block_k = 32, min(g, 64) if g else 64
    if n and k:
        _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            qweight.contiguous(), scales.contiguous(), (offsets if offsets is not None else scales).contiguous(),
            out, n, k, W4=w4, G=g, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int4_dequantize(qweight, scales, offsets, group_size, out_features, in_features, dtype):
    _check_int4(qweight, scales, offsets, group_size, out_features, in_features)
    return _dequantize(qweight, scales, offsets, out_features, in_features, True, group_size, dtype)


def int8_dequantize(qweight, scales, out_features, in_features, dtype):
    g = _int8_group(qweight, scales, out_features, in_features)
    return _dequantize(qweight, scales, None, out_features, in_features, False, g, dtype)


KERNELS = {fn.__name__: fn for fn in (int4_prepack, int4_linear, int4_dequantize, int8_prepack, int8_linear,
                                      int8_linear_dynamic, int8_dequantize)}


# ---------------------------------------------------------------- static check (benchmarks/gpu_static.py)
_DIV16_INTS = ("K", "stride_xm", "K_SPLIT")


def _div16_attrs(signature):
    """ASTSource attrs of the specialization a GPU launch compiles in the usual case: torch's allocations are
    16-byte aligned and K (a multiple of the group size, or a model dimension) and the row stride are multiples
    of 16. Without them the compiler can't vectorize or pipeline the loads, so the check would judge a variant
    no real launch builds."""
    return {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items())
            if ty.startswith("*") or arg in _DIV16_INTS}


def aot_specs():
    """Every kernel variant: each GEMM config for each weight format, the split-K tiles, and the small kernels.

    Each spec carries "attrs" (see _div16_attrs) for ASTSource(..., attrs=spec["attrs"]).
    """
    specs = []

    def add(name, fn, signature, constexprs, num_warps=4, num_stages=3):
        specs.append({"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
                      "num_warps": num_warps, "num_stages": num_stages, "attrs": _div16_attrs(signature)})

    def qmm(act, wdt, w4, g, a8, split, cfg, precision="ieee"):
        sig = {"x_ptr": f"*{act}", "xs_ptr": "*fp32", "w_ptr": f"*{wdt}", "s_ptr": "*fp32", "m_ptr": "*fp32",
               "bias_ptr": "*fp16", "out_ptr": "*fp32" if split else "*fp16", "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "i32", "K_SPLIT": "i32", "M_BUCKET": "i32"}
        const = dict(W4=w4, G=g, A8=a8, HAS_BIAS=True, SPLIT=split, DOT_PRECISION=precision, **cfg.kwargs)
        sig.update({key: "constexpr" for key in const})
        fmt = f"{'w4' if w4 else 'w8'}{'a8' if a8 else act}_g{g}"
        tile = "x".join(str(cfg.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        add(f"qmm_{fmt}_{tile}_w{cfg.num_warps}s{cfg.num_stages}{'_splitk' if split else ''}", _qmm_kernel,
            sig, const, cfg.num_warps, cfg.num_stages)

    # (activation, weight codes, int4, group size, W8A8); bf16 compiles like fp16, other int4 groups like these
    formats = [("fp16", "u8", True, 128, False), ("bf16", "u8", True, 32, False), ("fp32", "u8", True, 64, False),
               ("fp16", "i8", False, 0, False), ("fp16", "i8", False, 32, False), ("fp32", "i8", False, 0, False),
               ("i8", "i8", False, 0, True), ("i8", "i8", False, 32, True)]
    for act, wdt, w4, g, a8 in formats:
        fp32 = act == "fp32"
        precision = "tf32x3" if fp32 else "ieee"  # tf32x3 is the heavier of the two float32 modes
        for cfg in FP32_GEMM_CONFIGS if fp32 else GEMM_CONFIGS:
            if _fits(cfg, g):
                qmm(act, wdt, w4, g, a8, False, cfg, precision)
        qmm(act, wdt, w4, g, a8, True, small_m_config(g, torch.float32 if fp32 else torch.float16), precision)
    add("splitk_reduce", _splitk_reduce_kernel,
        {"part_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "SPLIT_K": "i32",
         "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr"}, {"HAS_BIAS": True, "BLOCK_N": 128})
    add("quantize_rows", _quantize_rows_kernel,
        {"x_ptr": "*bf16", "xq_ptr": "*i8", "xs_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "BLOCK_K": "constexpr"},
        {"BLOCK_K": 1024})
    for wdt, w4, g in (("u8", True, 32), ("u8", True, 128), ("i8", False, 0), ("i8", False, 32)):
        add(f"dequant_{'w4' if w4 else 'w8'}_g{g}", _dequant_kernel,
            {"w_ptr": f"*{wdt}", "s_ptr": "*fp32", "m_ptr": "*fp32", "out_ptr": "*fp16", "N": "i32", "K": "i32",
             "W4": "constexpr", "G": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"W4": w4, "G": g, "BLOCK_N": 32, "BLOCK_K": min(g, 64) if g else 64})
    return specs
