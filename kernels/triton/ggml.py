"""Triton kernels of the GGML K-quant linears Q4_K, Q5_K and Q6_K (the types of Q4_K_M and Q5_K_M files),
dequantizing in registers; every other GGML type runs its reference (dequantize, then matmul) on the GPU.

CUDA layout (what ggml_prepack returns on CUDA), one uint8 row of R bytes per output row n, K = 256 S:
- Q4_K: codes q (K/2 bytes, byte j = q[2j] | q[2j + 1] << 4 as int4's), sub-block scales sc (K/32 bytes),
  mins mn (K/32), then the float16 d and dmin of each super-block (2S bytes each): 148 S bytes, 2.8% above the
  file's 144 S. w[k] = (d sc_j) q[k] - (dmin mn_j), j = k / 32.
- Q5_K: as Q4_K with the 5th bits after the codes (K/8 bytes, bit t of byte j for k = 8j + t): 180 S bytes,
  2.3% above the file's 176 S. w[k] = (d sc_j) q[k] - (dmin mn_j).
- Q6_K: the low 4 bits of the codes (K/2 bytes, as above), their high 2 bits (K/4 bytes, bits 2t..2t+1 of byte
  j for k = 4j + t), int8 sub-block scales (K/16), float16 d (2S): 210 S bytes, the file's size.
  w[k] = (d sc_j) (q[k] - 32), j = k / 16.
The products are those of kernels/ggml.py in the same order (d sc is exact in float32), so the dequantized
values are the file's bit for bit. The GEMM is quant.py's: (BLOCK_M, BLOCK_N) tiles, tl.dot in x's dtype with
float32 accumulation, split-K for M <= 16; BLOCK_K divides 256, so a tile lies in one super-block.
With FLASHGEN_CUDA_BACKEND=cuda, decode-sized calls go to the CUDA C++ GEMV (csrc/cuda/ggml_gemv.cu) where its
rows are 16-byte aligned (K a multiple of 1024 for Q4_K, 2048 for Q6_K).
"""
import torch
import triton
import triton.language as tl

from .. import ggml, reference
from .quant import (FP32_GEMM_CONFIGS, GEMM_CONFIGS, _check_x, _dot_precision, _prune, _require, _rows,
                    _store_tile, _tile_offsets, _use_cuda_gemv, _weight_codes, run_gemm, small_m_config)

Q4_K, Q5_K, Q6_K = (ggml.BLOCK_TYPES[name].type_id for name in ("Q4_K", "Q5_K", "Q6_K"))
NATIVE = tuple(t.type_id for t in ggml.BLOCK_TYPES.values() if t.gpu_kernel)



# ---------------------------------------------------------------- kernels
@triton.jit
def _half(ptr, mask):
    """The little-endian float16 at byte pointers ptr, as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _per_sub(values, scale, offset, SUB: tl.constexpr):
    """values (BLOCK_N, BLOCK_K) float32 times scale (BLOCK_N, BLOCK_K / SUB), one per sub-block of SUB
    columns, minus offset (the same shape) when given."""
    v = tl.reshape(values, (values.shape[0], values.shape[1] // SUB, SUB)) * scale[:, :, None]
    if offset is not None:
        v = v - offset[:, :, None]
    return tl.reshape(v, (values.shape[0], values.shape[1]))


@triton.jit
def _kq_tile(w_ptr, offs_n, k0, N, K, R, TYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 weights w[offs_n, k0 : k0 + BLOCK_K] (a tile within one super-block); 0 for rows >= N."""
    rows = w_ptr + offs_n[:, None].to(tl.int64) * R
    mask = offs_n[:, None] < N
    # The low 4 bits: the int4 layout, read through int4's loader with a row stride of R bytes (= 2R codes).
    q = _weight_codes(w_ptr, offs_n, k0, N, 2 * R, True, BLOCK_K).to(tl.int32)
    s0 = k0 // 256
    if TYPE == 12 or TYPE == 13:  # Q4_K, Q5_K
        at = K // 2
        if TYPE == 13:
            hb = tl.load(rows + at + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :], mask=mask, other=0)
            hb = hb.to(tl.int32)
            # bit t of byte j is column 8j + t: three joins interleave them back (the last join varies fastest)
            even = tl.join(tl.join(hb & 1, (hb >> 4) & 1), tl.join((hb >> 2) & 1, (hb >> 6) & 1))
            odd = tl.join(tl.join((hb >> 1) & 1, (hb >> 5) & 1), tl.join((hb >> 3) & 1, (hb >> 7) & 1))
            q = q | (tl.reshape(tl.join(even, odd), (offs_n.shape[0], BLOCK_K)) << 4)
            at += K // 8
        subs = (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :]
        sc = tl.load(rows + at + subs, mask=mask, other=0).to(tl.float32)
        mn = tl.load(rows + at + K // 32 + subs, mask=mask, other=0).to(tl.float32)
        d = _half(rows + at + K // 16 + 2 * s0, mask)
        dmin = _half(rows + at + K // 16 + K // 128 + 2 * s0, mask)
        return _per_sub(q.to(tl.float32), d * sc, dmin * mn, 32)
    else:  # Q6_K
        hb = tl.load(rows + K // 2 + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :], mask=mask, other=0)
        hb = hb.to(tl.int32)
        # byte j holds the high bits of columns 4j + t at bits 2t; join + reshape interleaves them back
        hi = tl.reshape(tl.join(tl.join(hb & 3, (hb >> 4) & 3), tl.join((hb >> 2) & 3, hb >> 6)),
                        (offs_n.shape[0], BLOCK_K))
        subs = (k0 // 16 + tl.arange(0, BLOCK_K // 16))[None, :]
        sc = tl.load(rows + 3 * K // 4 + subs, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        d = _half(rows + 3 * K // 4 + K // 16 + 2 * s0, mask)
        return _per_sub(((q | (hi << 4)) - 32).to(tl.float32), d * sc, None, 16)


@triton.jit
def _kq_mm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, R, stride_xm, K_SPLIT, M_BUCKET,
                  TYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x @ dequant(w).T (+ bias); SPLIT and the grouped order as quant.py's _qmm_kernel."""
    tl.static_assert(256 % BLOCK_K == 0, "BLOCK_K must divide the super-block of 256")
    pid_k = tl.program_id(1)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _kq_tile(w_ptr, offs_n, k0, N, K, R, TYPE, BLOCK_K).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def _kq_dequant_kernel(w_ptr, out_ptr, N, K, R, TYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _kq_tile(w_ptr, offs_n, k0, N, K, R, TYPE, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=offs_n[:, None] < N)


_kq_mm_autotuned = triton.autotune(configs=GEMM_CONFIGS + FP32_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "TYPE"],
                                   prune_configs_by={"early_config_prune": _prune})(_kq_mm_kernel)


# ---------------------------------------------------------------- launchers
def _matmul(x2, packed, ggml_type, n, bias, config=None):
    out = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    if out.numel() == 0:
        return out
    common = dict(TYPE=ggml_type, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2.dtype))
    return run_gemm(_kq_mm_kernel, _kq_mm_autotuned, x2, (packed,), (packed.shape[1],), bias, out, common,
                    small_m_config(256, x2.dtype), config)


def _check_packed(packed, ggml_type, n, k):
    t = ggml.block_type(ggml_type)
    _require(k > 0 and k % t.block == 0,
             f"in_features ({k}) must be a positive multiple of {t.name}'s block {t.block}")
    r = ggml.cuda_row_bytes(t.type_id, k)
    _require(packed.dtype == torch.uint8 and tuple(packed.shape) == (n, r),
             f"packed must be uint8 of shape ({n}, {r}) (the CUDA layout of {t.name}), got {packed.dtype} "
             f"{tuple(packed.shape)}")


# ---------------------------------------------------------------- ops (CUDA kernels of flashgen::*)
def ggml_prepack(blocks, ggml_type, in_features):
    """The CUDA layout (module doc) of Q4_K / Q6_K blocks (N, K / 256 * block_bytes); other types' blocks as
    they are (a contiguous copy)."""
    t = ggml.block_type(ggml_type)
    _require(blocks.dim() == 2 and blocks.dtype == torch.uint8, f"blocks must be 2-D uint8, got {blocks.dtype} "
             f"{tuple(blocks.shape)}")
    n, k = blocks.shape[0], in_features
    _require(k % t.block == 0 and blocks.shape[1] == t.row_bytes(k),
             f"blocks must be ({n}, {t.row_bytes(k)}) for {t.name} rows of {k} values, got {tuple(blocks.shape)}")
    if t.type_id not in NATIVE:
        return blocks.clone(memory_format=torch.contiguous_format)
    b = blocks.reshape(-1, t.block_bytes)
    if t.type_id in (Q4_K, Q5_K):
        q, sc, mn = (ggml.q4_k_codes if t.type_id == Q4_K else ggml.q5_k_codes)(b)
        halves = (b[:, 0:2], b[:, 2:4])
        low = q & 15
        rest = [sc.to(torch.uint8).reshape(n, -1), mn.to(torch.uint8).reshape(n, -1)]
        if t.type_id == Q5_K:
            bits = (q >> 4).reshape(n, k // 8, 8) << torch.arange(8, device=q.device)
            rest.insert(0, bits.sum(-1).to(torch.uint8))
    else:
        q = ggml.q6_k_codes(b)
        halves = (b[:, 208:210],)
        low = q & 15
        hi = (q >> 4).reshape(n, k // 4, 4)
        rest = [(hi[..., 0] | hi[..., 1] << 2 | hi[..., 2] << 4 | hi[..., 3] << 6).to(torch.uint8),
                b[:, 192:208].reshape(n, -1)]
    low = low.reshape(n, k).to(torch.uint8)
    codes = low[:, 0::2] | (low[:, 1::2] << 4)
    return torch.cat([codes, *rest, *(h.reshape(n, -1) for h in halves)], dim=1).contiguous()


def ggml_linear(x, packed, ggml_type, out_features, bias=None):
    k = x.shape[-1]
    _check_x(x, packed, bias, out_features)
    _check_packed(packed, ggml_type, out_features, k)
    if ggml_type not in NATIVE:
        return reference.ggml_linear(x, packed, ggml_type, out_features, bias)
    if ggml_type in (Q4_K, Q6_K) and _use_cuda_gemv(x, packed) and packed.shape[1] % 16 == 0:  # aligned rows
        return torch.ops.flashgen_cuda.ggml_linear(x, packed, ggml_type, out_features, bias)
    out = _matmul(_rows(x, k), packed.contiguous(), ggml_type, out_features, bias)
    return out.reshape(*x.shape[:-1], out_features)


def ggml_dequantize(packed, ggml_type, out_features, in_features, dtype):
    _check_packed(packed, ggml_type, out_features, in_features)
    if ggml_type not in NATIVE:
        return reference.ggml_dequantize(packed, ggml_type, out_features, in_features, dtype)
    out = torch.empty((out_features, in_features), dtype=dtype, device=packed.device)
    block_n, block_k = 32, 64
    if out_features:
        _kq_dequant_kernel[(triton.cdiv(out_features, block_n), in_features // block_k)](
            packed, out, out_features, in_features, packed.shape[1], TYPE=ggml_type, BLOCK_N=block_n,
            BLOCK_K=block_k)
    return out


KERNELS = {"ggml_prepack": ggml_prepack, "ggml_linear": ggml_linear, "ggml_dequantize": ggml_dequantize}


# ---------------------------------------------------------------- static check (benchmarks/gpu_static.py)
def aot_specs():
    """Both types: each GEMM config (bf16 compiles like fp16), the split-K tile, fp32 with tf32x3, dequantize."""
    specs = []
    ints = ("K", "R", "stride_xm", "K_SPLIT")

    def add(name, fn, signature, constexprs, num_warps=4, num_stages=3):
        attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items())
                 if ty.startswith("*") or arg in ints}
        specs.append({"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
                      "num_warps": num_warps, "num_stages": num_stages, "attrs": attrs})

    for type_id in NATIVE:
        kind = ggml.block_type(type_id).name
        for act, configs, precision in (("fp16", GEMM_CONFIGS, "ieee"), ("fp32", FP32_GEMM_CONFIGS, "tf32x3")):
            small = small_m_config(256, torch.float32 if act == "fp32" else torch.float16)
            for cfg, split in [(c, False) for c in configs] + [(small, True)]:
                sig = {"x_ptr": f"*{act}", "w_ptr": "*u8", "bias_ptr": "*fp16", "out_ptr": "*fp32" if split else
                       f"*{act}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_xm": "i32",
                       "K_SPLIT": "i32", "M_BUCKET": "i32"}
                const = dict(TYPE=type_id, HAS_BIAS=True, SPLIT=split, DOT_PRECISION=precision, **cfg.kwargs)
                sig.update({key: "constexpr" for key in const})
                tile = "x".join(str(cfg.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                add(f"kq_mm_{kind}_{act}_{tile}_w{cfg.num_warps}s{cfg.num_stages}{'_splitk' if split else ''}",
                    _kq_mm_kernel, sig, const, cfg.num_warps, cfg.num_stages)
        add(f"kq_dequant_{kind}", _kq_dequant_kernel,
            {"w_ptr": "*u8", "out_ptr": "*fp16", "N": "i32", "K": "i32", "R": "i32", "TYPE": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}, {"TYPE": type_id, "BLOCK_N": 32, "BLOCK_K": 64})
    return specs
