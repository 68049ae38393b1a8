"""Triton kernels of every GGML block type's linear (kernels/ggml.py), dequantizing in registers.

CUDA layout (what ggml_prepack returns on CUDA): one uint8 row of R bytes per output row n, made of whole-row
planes one after another, then the float16 fields of every block (in `half_fields` order, 2 bytes per block
each). Planes: "nibbles", the low 4 bits of the codes (K/2 bytes, byte j = q[2j] | q[2j + 1] << 4, int4's
layout); "bits", one more bit per code (K/8 bytes, bit t of byte j is column 8j + t); "crumbs", 2 bits per code
(K/4 bytes, bits 2t, 2t + 1 of byte j are column 4j + t); then one byte per sub-block j.

| type   | planes                                           | bytes per block (file) | w[k]                        |
| Q4_K   | nibbles, sc (K/32), mn (K/32); d, dmin           | 148 (144)  | (d sc_j) q - (dmin mn_j), j = k/32     |
| Q5_K   | nibbles, bits, sc, mn; d, dmin                   | 180 (176)  | as Q4_K with 5-bit codes               |
| Q6_K   | nibbles, crumbs, int8 sc (K/16); d               | 210 (210)  | (d sc_j) (q - 32), j = k/16            |
| Q2_K   | crumbs, sc | mn << 4 (K/16); d, dmin             | 84 (84)    | (d sc_j) q - (dmin mn_j), j = k/16     |
| Q3_K   | crumbs, bits, int8 sc - 32 (K/16); d             | 114 (110)  | (d (sc_j - 32)) (q - 4)                |
| IQ4_XS | nibbles, int8 ls - 32 (K/32); d                  | 138 (136)  | (d (ls_j - 32)) v[q], v = IQ4_VALUES   |
| Q5_0   | nibbles, bits; d                                 | 22 (22)    | d (q - 16)                             |
| Q5_1   | nibbles, bits; d, m                              | 24 (24)    | d q + m                                |
| IQ4_NL | nibbles; d                                       | 18 (18)    | d v[q]                                 |
| Q4_0   | nibbles; d                                       | 18 (18)    | d (q - 8)                              |
| Q4_1   | nibbles; d, m                                    | 20 (20)    | d q + m                                |

The products are kernels/ggml.py's in the same order (d sc is exact in float32) and the kernels are compiled
without fused multiply-adds, so the dequantized values are the file's bit for bit. The GEMM is quant.py's:
(BLOCK_M, BLOCK_N) tiles, tl.dot in x's dtype with float32 accumulation, split-K for M <= 16; BLOCK_K divides the
block, so a tile lies in one block (one d per row).
With FLASHGEN_CUDA_BACKEND=cuda, decode-sized Q4_K / Q6_K calls go to the CUDA C++ GEMV (csrc/cuda/ggml_gemv.cu)
where its rows are 16-byte aligned (K a multiple of 1024 for Q4_K, 2048 for Q6_K).
"""
import torch
import triton
import triton.language as tl

from .. import ggml
from .quant import (FP32_GEMM_CONFIGS, GEMM_CONFIGS, _check_x, _dot_precision, _fits, _prune, _require, _rows,
                    _store_tile, _tile_offsets, _use_cuda_gemv, _weight_codes, run_gemm, small_m_config)

Q4_K, Q6_K = ggml.BLOCK_TYPES["Q4_K"].type_id, ggml.BLOCK_TYPES["Q6_K"].type_id
# fmul + fadd fused into one fma would round once where the reference rounds twice
NO_FMA = {"enable_fp_fusion": False}


def _iq4_words():
    """IQ4_VALUES + 127 (0 .. 240) as bytes, four to an int32 word (two's complement)."""
    b = [v + 127 for v in ggml.IQ4_VALUES]
    words = [sum(b[4 * i + j] << (8 * j) for j in range(4)) for i in range(4)]
    return [tl.constexpr(w - (1 << 32) if w >= 1 << 31 else w) for w in words]


_IQ4_W0, _IQ4_W1, _IQ4_W2, _IQ4_W3 = _iq4_words()


# ---------------------------------------------------------------- kernels
@triton.jit
def _half(ptr, mask):
    """The little-endian float16 at byte pointers ptr, as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _bits(rows, at, k0, mask, BLOCK_K: tl.constexpr):
    """The bits plane at byte `at` of each row, columns k0 .. k0 + BLOCK_K, as int32 (BLOCK_N, BLOCK_K)."""
    b = tl.load(rows + at + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :], mask=mask, other=0).to(tl.int32)
    # joins stack on a new last axis, so the last join varies fastest: this order puts bit t at column 8j + t
    even = tl.join(tl.join(b & 1, (b >> 4) & 1), tl.join((b >> 2) & 1, (b >> 6) & 1))
    odd = tl.join(tl.join((b >> 1) & 1, (b >> 5) & 1), tl.join((b >> 3) & 1, (b >> 7) & 1))
    return tl.reshape(tl.join(even, odd), (b.shape[0], BLOCK_K))


@triton.jit
def _crumbs(rows, at, k0, mask, BLOCK_K: tl.constexpr):
    """The crumbs plane at byte `at` of each row, columns k0 .. k0 + BLOCK_K, as int32 (BLOCK_N, BLOCK_K)."""
    b = tl.load(rows + at + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :], mask=mask, other=0).to(tl.int32)
    return tl.reshape(tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6)), (b.shape[0], BLOCK_K))


@triton.jit
def _sub_bytes(rows, at, k0, mask, SUB: tl.constexpr, BLOCK_K: tl.constexpr):
    """The bytes of the sub-blocks of SUB columns in k0 .. k0 + BLOCK_K, as int32 (BLOCK_N, BLOCK_K / SUB)."""
    return tl.load(rows + at + (k0 // SUB + tl.arange(0, BLOCK_K // SUB))[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def _iq4_value(q):
    """IQ4_VALUES[q] as float32, from the table in four words picked by bit tests: a gather, or selects on
    q == c (which the compiler turns into a local-memory table), spill."""
    odd = (q & 4) != 0
    word = tl.where((q & 8) != 0, tl.where(odd, _IQ4_W3, _IQ4_W2), tl.where(odd, _IQ4_W1, _IQ4_W0))
    return (((word >> ((q & 3) * 8)) & 255) - 127).to(tl.float32)


@triton.jit
def _per_sub(values, scale, offset, SUB: tl.constexpr):
    """values (BLOCK_N, BLOCK_K) float32 times scale (BLOCK_N, BLOCK_K / SUB), one per sub-block of SUB
    columns, minus offset (the same shape) when given."""
    v = tl.reshape(values, (values.shape[0], values.shape[1] // SUB, SUB)) * scale[:, :, None]
    if offset is not None:
        v = v - offset[:, :, None]
    return tl.reshape(v, (values.shape[0], values.shape[1]))


@triton.jit
def _ggml_tile(w_ptr, offs_n, k0, N, K, R, TYPE: tl.constexpr, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 weights w[offs_n, k0 : k0 + BLOCK_K] (a tile within one block of G); 0 for rows >= N."""
    rows = w_ptr + offs_n[:, None].to(tl.int64) * R
    mask = offs_n[:, None] < N
    block = k0 // G
    if TYPE == 10 or TYPE == 11:  # Q2_K, Q3_K: 2-bit codes (and a 3rd bit)
        q = _crumbs(rows, 0, k0, mask, BLOCK_K)
        at = K // 4
        if TYPE == 11:
            q = q | (_bits(rows, at, k0, mask, BLOCK_K) << 2)
            at += K // 8
    else:
        # the nibbles: int4's layout, read through int4's loader with a row stride of R bytes (= 2R codes)
        q = _weight_codes(w_ptr, offs_n, k0, N, 2 * R, True, BLOCK_K).to(tl.int32)
        at = K // 2
        if TYPE == 13 or TYPE == 6 or TYPE == 7:  # Q5_K, Q5_0, Q5_1: a 5th bit
            q = q | (_bits(rows, at, k0, mask, BLOCK_K) << 4)
            at += K // 8
        if TYPE == 14:  # Q6_K: two more bits
            q = q | (_crumbs(rows, at, k0, mask, BLOCK_K) << 4)
            at += K // 4
    if TYPE == 12 or TYPE == 13 or TYPE == 10:  # Q4_K, Q5_K, Q2_K: w = (d sc) q - dmin mn
        if TYPE == 10:
            s = _sub_bytes(rows, at, k0, mask, 16, BLOCK_K)
            sc, mn = s & 15, s >> 4
            at += K // 16
        else:
            sc = _sub_bytes(rows, at, k0, mask, 32, BLOCK_K)
            mn = _sub_bytes(rows, at + K // 32, k0, mask, 32, BLOCK_K)
            at += K // 16
        d = _half(rows + at + 2 * block, mask)
        dmin = _half(rows + at + 2 * (K // G) + 2 * block, mask)
        return _per_sub(q.to(tl.float32), d * sc.to(tl.float32), dmin * mn.to(tl.float32), 16 if TYPE == 10 else 32)
    elif TYPE == 14 or TYPE == 11:  # Q6_K, Q3_K: w = (d sc) (q - offset), int8 sc per 16
        sc = _sub_bytes(rows, at, k0, mask, 16, BLOCK_K).to(tl.int8).to(tl.float32)
        d = _half(rows + at + K // 16 + 2 * block, mask)
        return _per_sub((q - (32 if TYPE == 14 else 4)).to(tl.float32), d * sc, None, 16)
    elif TYPE == 23:  # IQ4_XS: w = (d ls) v[q], int8 ls per 32
        ls = _sub_bytes(rows, at, k0, mask, 32, BLOCK_K).to(tl.int8).to(tl.float32)
        d = _half(rows + at + K // 32 + 2 * block, mask)
        return _per_sub(_iq4_value(q), d * ls, None, 32)
    else:  # blocks of 32 with one d: Q5_0 / Q4_0 d (q - 16 / 8), Q5_1 / Q4_1 d q + m, IQ4_NL d v[q]
        d = _half(rows + at + 2 * block, mask)
        if TYPE == 20:
            return _per_sub(_iq4_value(q), d, None, BLOCK_K)
        elif TYPE == 6 or TYPE == 2:
            return _per_sub((q - (16 if TYPE == 6 else 8)).to(tl.float32), d, None, BLOCK_K)
        else:
            m = _half(rows + at + 2 * (K // G) + 2 * block, mask)
            return _per_sub(q.to(tl.float32), d, -m, BLOCK_K)  # - (-m) adds m exactly


@triton.jit
def _ggml_mm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, R, stride_xm, K_SPLIT, M_BUCKET,
                    TYPE: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """out = x @ dequant(w).T (+ bias); SPLIT and the grouped order as quant.py's _qmm_kernel."""
    tl.static_assert(G % BLOCK_K == 0, "BLOCK_K must divide the block")
    pid_k = tl.program_id(1)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _ggml_tile(w_ptr, offs_n, k0, N, K, R, TYPE, G, BLOCK_K).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def _ggml_dequant_kernel(w_ptr, out_ptr, N, K, R, TYPE: tl.constexpr, G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _ggml_tile(w_ptr, offs_n, k0, N, K, R, TYPE, G, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=offs_n[:, None] < N)


def tile_fits(config, t):
    """Whether a GEMM config's tile suits block type t: BLOCK_K divides the block, and for IQ4_XS is at most 32
    (its table lookups on wider tiles spill registers on sm_80)."""
    return _fits(config, t.block) and (t.name != "IQ4_XS" or config.kwargs["BLOCK_K"] <= 32)


def _prune_tiles(configs, named_args, **kwargs):
    t = ggml.block_type(kwargs["TYPE"])
    return _prune([c for c in configs if tile_fits(c, t)], named_args, **kwargs)


_ggml_mm_autotuned = triton.autotune(configs=GEMM_CONFIGS + FP32_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "TYPE"],
                                     prune_configs_by={"early_config_prune": _prune_tiles})(_ggml_mm_kernel)


# ---------------------------------------------------------------- launchers
def _matmul(x2, packed, t, n, bias, config=None):
    out = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    if out.numel() == 0:
        return out
    common = dict(TYPE=t.type_id, G=t.block, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2.dtype),
                  **NO_FMA)
    return run_gemm(_ggml_mm_kernel, _ggml_mm_autotuned, x2, (packed,), (packed.shape[1],),
                    bias, out, common, small_m_config(t.block, x2.dtype), config)


def _check_packed(packed, ggml_type, n, k):
    t = ggml.block_type(ggml_type)
    _require(k > 0 and k % t.block == 0,
             f"in_features ({k}) must be a positive multiple of {t.name}'s block {t.block}")
    r = ggml.cuda_row_bytes(t.type_id, k)
    _require(packed.dtype == torch.uint8 and tuple(packed.shape) == (n, r),
             f"packed must be uint8 of shape ({n}, {r}) (the CUDA layout of {t.name}), got {packed.dtype} "
             f"{tuple(packed.shape)}")
    return t


def _nibbles_plane(q):
    q = q & 15
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _bits_plane(bits):
    return ((bits & 1).reshape(bits.shape[0], -1, 8) << torch.arange(8, device=bits.device)).sum(-1)


def _crumbs_plane(crumbs):
    return ((crumbs & 3).reshape(crumbs.shape[0], -1, 4) << (2 * torch.arange(4, device=crumbs.device))).sum(-1)


def _planes(t, b):
    """The planes (module doc) of blocks b (B, block_bytes), each (B, bytes per block) of integers."""
    name = t.name
    if name in ("Q4_K", "Q5_K"):
        q, sc, mn = (ggml.q4_k_codes if name == "Q4_K" else ggml.q5_k_codes)(b)
        return [_nibbles_plane(q)] + ([_bits_plane(q >> 4)] if name == "Q5_K" else []) + [sc, mn]
    if name == "Q6_K":
        q = ggml.q6_k_codes(b)
        return [_nibbles_plane(q), _crumbs_plane(q >> 4), b[:, 192:208]]
    if name == "Q2_K":
        return [_crumbs_plane(ggml.q2_k_codes(b)[0]), b[:, 0:16]]  # the file's scale bytes are sc | mn << 4
    if name == "Q3_K":
        q, sc = ggml.q3_k_codes(b)
        return [_crumbs_plane(q), _bits_plane(q >> 2), (sc - 32).to(torch.int8).view(torch.uint8)]
    if name == "IQ4_XS":
        q, ls = ggml.iq4_xs_codes(b)
        return [_nibbles_plane(q), (ls - 32).to(torch.int8).view(torch.uint8)]
    if name == "IQ4_NL":
        return [_nibbles_plane(ggml.iq4_nl_codes(b))]
    if name in ("Q4_0", "Q4_1"):
        return [_nibbles_plane(ggml.q4_0_codes(b))]
    q = ggml.q5_0_codes(b)  # Q5_0, Q5_1
    return [_nibbles_plane(q), _bits_plane(q >> 4)]


# ---------------------------------------------------------------- ops (CUDA kernels of flashgen::*)
def ggml_prepack(blocks, ggml_type, in_features):
    """The CUDA layout (module doc) of GGML blocks (N, K / block * block_bytes)."""
    t = ggml.block_type(ggml_type)
    _require(blocks.dim() == 2 and blocks.dtype == torch.uint8, f"blocks must be 2-D uint8, got {blocks.dtype} "
             f"{tuple(blocks.shape)}")
    n, k = blocks.shape[0], in_features
    _require(k % t.block == 0 and blocks.shape[1] == t.row_bytes(k),
             f"blocks must be ({n}, {t.row_bytes(k)}) for {t.name} rows of {k} values, got {tuple(blocks.shape)}")
    b = blocks.reshape(-1, t.block_bytes)
    halves = [b[:, at:at + 2] for at in t.half_fields]
    # each plane is built per block, then laid out along the whole row
    return torch.cat([p.to(torch.uint8).reshape(n, -1) for p in _planes(t, b) + halves], dim=1).contiguous()


def ggml_linear(x, packed, ggml_type, out_features, bias=None):
    k = x.shape[-1]
    _check_x(x, packed, bias, out_features)
    t = _check_packed(packed, ggml_type, out_features, k)
    if ggml_type in (Q4_K, Q6_K) and _use_cuda_gemv(x, packed) and packed.shape[1] % 16 == 0:  # aligned rows
        return torch.ops.flashgen_cuda.ggml_linear(x, packed, ggml_type, out_features, bias)
    out = _matmul(_rows(x, k), packed.contiguous(), t, out_features, bias)
    return out.reshape(*x.shape[:-1], out_features)


DEQUANT_BLOCK_N = 32


def ggml_dequantize(packed, ggml_type, out_features, in_features, dtype):
    t = _check_packed(packed, ggml_type, out_features, in_features)
    out = torch.empty((out_features, in_features), dtype=dtype, device=packed.device)
    block_k = min(64, t.block)
    if out_features:
        _ggml_dequant_kernel[(triton.cdiv(out_features, DEQUANT_BLOCK_N), in_features // block_k)](
            packed, out, out_features, in_features, packed.shape[1], TYPE=ggml_type,
            G=t.block, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=block_k, **NO_FMA)
    return out


KERNELS = {"ggml_prepack": ggml_prepack, "ggml_linear": ggml_linear, "ggml_dequantize": ggml_dequantize}


# ---------------------------------------------------------------- static check (benchmarks/gpu_static.py)
def aot_specs():
    """Every type: each GEMM config whose BLOCK_K divides its block (bf16 compiles like fp16), the split-K tile,
    fp32 with tf32x3, dequantize; all without fused multiply-adds, as launched."""
    specs = []
    ints = ("K", "R", "stride_xm", "K_SPLIT")

    def add(name, fn, signature, constexprs, num_warps=4, num_stages=3):
        attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items())
                 if ty.startswith("*") or arg in ints}
        specs.append({"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
                      "num_warps": num_warps, "num_stages": num_stages, "attrs": attrs, "options": NO_FMA})

    for t in ggml.BLOCK_TYPES.values():
        for act, configs, precision in (("fp16", GEMM_CONFIGS, "ieee"), ("fp32", FP32_GEMM_CONFIGS, "tf32x3")):
            small = small_m_config(t.block, torch.float32 if act == "fp32" else torch.float16)
            for cfg, split in [(c, False) for c in configs if tile_fits(c, t)] + [(small, True)]:
                sig = {"x_ptr": f"*{act}", "w_ptr": "*u8", "bias_ptr": "*fp16",
                       "out_ptr": "*fp32" if split else f"*{act}", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                       "stride_xm": "i32", "K_SPLIT": "i32", "M_BUCKET": "i32"}
                const = dict(TYPE=t.type_id, G=t.block, HAS_BIAS=True, SPLIT=split, DOT_PRECISION=precision,
                             **cfg.kwargs)
                sig.update({key: "constexpr" for key in const})
                tile = "x".join(str(cfg.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                add(f"ggml_mm_{t.name}_{act}_{tile}_w{cfg.num_warps}s{cfg.num_stages}{'_splitk' if split else ''}",
                    _ggml_mm_kernel, sig, const, cfg.num_warps, cfg.num_stages)
        add(f"ggml_dequant_{t.name}", _ggml_dequant_kernel,
            {"w_ptr": "*u8", "out_ptr": "*fp16", "N": "i32", "K": "i32", "R": "i32",
             "TYPE": "constexpr", "G": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"TYPE": t.type_id, "G": t.block, "BLOCK_N": DEQUANT_BLOCK_N, "BLOCK_K": min(64, t.block)})
    return specs
