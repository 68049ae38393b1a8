"""Fused attention in Triton: FlashAttention-2 forward and backward, and split-K decode over a (paged) KV cache.

Math (per sequence, query i at key position pos_i = i + seqlen_k - seqlen_q, bottom-right aligned):
    x_ij = scale * q_i . k_j;   s_ij = softcap * tanh(x_ij / softcap) if softcap > 0 else x_ij
    key j is attended iff j < seqlen_k, j >= pos_i - window_left, j <= pos_i + window_right
    (a negative window side is unbounded; causal is window_right = 0)
    lse_i = log sum_j exp(s_ij);   out_i = sum_j exp(s_ij - lse_i) v_j      (no key: out_i = 0, lse_i = -inf)
Forward: online softmax over key tiles (running max m, running sum l, rescaled accumulator), in base 2.
Backward, with P = exp(S - lse), delta_i = sum_d dout_id * out_id:
    dV = P^T dout;  dP = dout V^T;  dS = P * (dP - delta);  dX = dS * (1 - tanh^2) with softcap, else dS
    dQ = scale * dX K;  dK = scale * dX^T Q.
dK/dV are computed by one program per (key tile, kv head) looping over every query tile and every q head of
its GQA group; dQ by one program per (query tile, head) looping over key tiles: each output element is written
by exactly one program in a fixed order, so the backward is deterministic (no atomics).
Decode (flash-decoding): one program per (split, batch x kv head, row tile); rows are the (query, q head) pairs
that share one kv head, so GQA reads each cache tile once. Each split writes its normalized partial output and
lse; a merge kernel combines splits: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation; softmax statistics are fp32.
float32 inputs are computed in full fp32 (input_precision="ieee", no tf32), matching eager float32 accuracy.
Head dims 8..256 are padded (masked) to the next power of two >= 16.
"""
import math
import os

import torch
import triton
import triton.language as tl

# A window side that is unbounded (-1 in the op) becomes this many positions: every mask test passes.
_UNBOUNDED = 1 << 30
_BLOCK_DS = (16, 32, 64, 128, 256)
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DELTA_BLOCK_M = 64
_MAX_SPLITS = 64  # the merge kernel reduces over at most this many splits in one tile


# ------------------------------------------------------------------------------------------------ shared pieces
@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 for large |x| (exp overflows to inf or to 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """Scores s (natural-log units) and t = tanh(x / softcap) (needed by the backward; 0 without softcap)."""
    x = qk * scale
    if SOFTCAP:
        t = _tanh(x / softcap)
        return softcap * t, t
    return x, x * 0.0


@triton.jit
def _row_bounds(pos, row_ok, seqlen_k, window_left, window_right):
    """First and last key each query row (at key position pos) attends; last < first when it attends none.
    Loop-invariant, so a tile's mask costs two compares per score."""
    first = pos - window_left
    last = tl.where(row_ok, tl.minimum(pos + window_right, seqlen_k - 1), -1)
    return first, last


@triton.jit
def _mask(first, last, offs_n):
    """(rows, keys) boolean from _row_bounds."""
    return (offs_n[None, :] >= first[:, None]) & (offs_n[None, :] <= last[:, None])


@triton.jit
def _key_range(pos_first, pos_last, seqlen_k, window_left, window_right, BLOCK_N: tl.constexpr):
    """[lo, hi) of key positions any query in [pos_first, pos_last] may attend; lo a multiple of BLOCK_N."""
    lo = tl.maximum(pos_first - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seqlen_k, tl.maximum(pos_last + window_right + 1, 0))
    return lo, hi


@triton.jit
def _softmax_step(q, k, v, acc, m_i, l_i, first, last, offs_n, scale, softcap, SOFTCAP: tl.constexpr,
                  PREC: tl.constexpr):
    """One online-softmax update of (acc, m, l) with a key tile k (N, D) and value tile v (N, D)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    s, _ = _scores(qk, scale, softcap, SOFTCAP)
    s = tl.where(_mask(first, last, offs_n), s * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has attended nothing yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _softmax_finish(acc, m_i, l_i):
    """Normalized output and natural-log lse; rows that attended no key give 0 and -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


@triton.jit
def _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k) of batch row b: from cu_seqlens when varlen, else dense."""
    if VARLEN:
        q_start = tl.load(cu_q + b)
        k_start = tl.load(cu_k + b)
        sq = tl.load(cu_q + b + 1) - q_start
        sk = tl.load(cu_k + b + 1) - k_start
        return q_start.to(tl.int64), k_start.to(tl.int64), sq, sk
    return b * 0, b * 0, seqlen_q, seqlen_k


@triton.jit
def _q_block(cu_q, cu_k, num_heads, group, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr):
    """The program's query block: batch row b, head h, its kv head hk, the sequence bounds, the block start m0
    and its row / feature offsets with their masks. 64-bit offsets stay scalar (base pointers); per-element
    tile offsets are 32-bit, which keeps registers low."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    q_start, k_start, sq, sk = _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN)
    m0 = tl.program_id(0) * BLOCK_M
    local_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = m0 + local_m < sq
    return b, h, h // group, q_start, k_start, sq, sk, m0, local_m, offs_d, d_ok, m_ok, m_ok[:, None] & d_ok[None, :]


@triton.jit
def _kv_plan(K, V, b, hk, k_start, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, m0, local_m,
             offs_d, m_ok, sq, sk, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a query block reads of K and V: the kv head's base pointers, the offsets of a key tile, each row's
    attended key range [first, last] and the key blocks [lo, hi) that any row attends (bottom-right causal)."""
    local_n = tl.arange(0, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vs
    k_tile = local_n[:, None] * stride_ks + offs_d[None, :]
    v_tile = local_n[:, None] * stride_vs + offs_d[None, :]
    first, last = _row_bounds(m0 + local_m + sk - sq, m_ok, sk, window_left, window_right)
    lo, hi = _key_range(m0 + sk - sq, tl.minimum(m0 + BLOCK_M, sq) - 1 + sk - sq,
                        sk, window_left, window_right, BLOCK_N)
    return local_n, k_base, v_base, k_tile, v_tile, first, last, lo, hi


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, cu_q, cu_k,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                num_heads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    b, h, hk, q_start, k_start, sq, sk, m0, local_m, offs_d, d_ok, m_ok, q_mask = _q_block(
        cu_q, cu_k, num_heads, group, seqlen_q, seqlen_k, BLOCK_M, BLOCK_D, HEAD_DIM, VARLEN)
    if m0 >= sq:
        return
    q = tl.load(Q + (b * stride_qb + (q_start + m0) * stride_qs + h * stride_qh)
                + local_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    local_n, k_base, v_base, k_tile, v_tile, first, last, lo, hi = _kv_plan(
        K, V, b, hk, k_start, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, m0, local_m, offs_d,
        m_ok, sq, sk, window_left, window_right, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        kv_mask = (offs_n < sk)[:, None] & d_ok[None, :]
        n0 = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + n0 * stride_ks + k_tile, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n0 * stride_vs + v_tile, mask=kv_mask, other=0.0)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, first, last, offs_n, scale, softcap, SOFTCAP, PREC)
    out, lse = _softmax_finish(acc, m_i, l_i)
    tl.store(Out + (b * stride_ob + (q_start + m0) * stride_os + h * stride_oh)
             + local_m[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + (b * stride_lb + h * stride_lh + q_start + m0) + local_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _bwd_delta_kernel(Out, DOut, Delta, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                      stride_lb, stride_lh, num_heads, seqlen_q,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dout * out), fp32, laid out like lse. Rows are flattened (varlen or dense alike)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    m0 = (pid_m * BLOCK_M).to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = m0 + local_m < seqlen_q
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + (b * stride_ob + m0 * stride_os + h * stride_oh) + local_m[:, None] * stride_os
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + (b * stride_db + m0 * stride_ds + h * stride_dh) + local_m[:, None] * stride_ds
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b * stride_lb + h * stride_lh + m0) + local_m, delta, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, cu_q, cu_k,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     stride_lb, stride_lh,
                     num_kv_heads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_kv_heads).to(tl.int64)
    hk = bh % num_kv_heads
    q_start, k_start, sq, sk = _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return
    local_n = tl.arange(0, BLOCK_N)
    local_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + local_n
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < sk)[:, None] & d_ok[None, :]
    row0 = k_start + n0
    k = tl.load(K + (b * stride_kb + row0 * stride_ks + hk * stride_kh) + local_n[:, None] * stride_ks
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (b * stride_vb + row0 * stride_vs + hk * stride_vh) + local_n[:, None] * stride_vs
                + offs_d[None, :], mask=kv_mask, other=0.0)
    q_tile = local_m[:, None] * stride_qs + offs_d[None, :]
    do_tile = local_m[:, None] * stride_ds + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Queries that can see this key tile: j >= pos_i - window_left and j <= pos_i + window_right.
    shift = sk - sq
    m_lo = tl.maximum(n0 - window_right - shift, 0)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    m_hi = tl.minimum(sq, tl.maximum(tl.minimum(n0 + BLOCK_N, sk) - 1 + window_left - shift + 1, 0))
    # One flat loop over (q head of the group, query tile): nested loops make ptxas spill.
    m_tiles = tl.cdiv(tl.maximum(m_hi - m_lo, 0), BLOCK_M)
    for it in range(group * m_tiles):
        h = hk * group + it // m_tiles
        start_m = m_lo + (it % m_tiles) * BLOCK_M
        offs_m = start_m + local_m
        m_ok = offs_m < sq
        m0 = tl.cast(start_m, tl.int64) + q_start
        q = tl.load(Q + (b * stride_qb + m0 * stride_qs + h * stride_qh) + q_tile, mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        do = tl.load(DOut + (b * stride_db + m0 * stride_ds + h * stride_dh) + do_tile,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(Lse + (b * stride_lb + h * stride_lh + m0) + local_m, mask=m_ok, other=0.0)
        delta = tl.load(Delta + (b * stride_lb + h * stride_lh + m0) + local_m, mask=m_ok, other=0.0)
        # Transposed tiles (keys x queries), so dK and dV accumulate with plain dots.
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)
        sT, tT = _scores(qkT, scale, softcap, SOFTCAP)
        first, last = _row_bounds(offs_m + shift, m_ok, sk, window_left, window_right)
        maskT = (offs_n[:, None] >= first[None, :]) & (offs_n[:, None] <= last[None, :])
        # s - lse before the log2(e) scaling: where P matters both are near the row's maximum, so the difference
        # is nearly exact and only its small value is rounded (a float32 dK case: 1.5 -> 1.15 of the then bound).
        pT = tl.where(maskT, tl.exp2((sT - lse[None, :]) * 1.4426950408889634), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    tl.store(DK + (b * stride_dkb + row0 * stride_dks + hk * stride_dkh) + local_n[:, None] * stride_dks
             + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (b * stride_dvb + row0 * stride_dvs + hk * stride_dvh) + local_n[:, None] * stride_dvs
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, cu_q, cu_k,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
                   num_heads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    b, h, hk, q_start, k_start, sq, sk, m0, local_m, offs_d, d_ok, m_ok, q_mask = _q_block(
        cu_q, cu_k, num_heads, group, seqlen_q, seqlen_k, BLOCK_M, BLOCK_D, HEAD_DIM, VARLEN)
    if m0 >= sq:
        return
    row0 = q_start + m0
    q = tl.load(Q + (b * stride_qb + row0 * stride_qs + h * stride_qh) + local_m[:, None] * stride_qs
                + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DOut + (b * stride_db + row0 * stride_ds + h * stride_dh) + local_m[:, None] * stride_ds
                 + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(Lse + (b * stride_lb + h * stride_lh + row0) + local_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + (b * stride_lb + h * stride_lh + row0) + local_m, mask=m_ok, other=0.0)
    local_n, k_base, v_base, k_tile, v_tile, first, last, lo, hi = _kv_plan(
        K, V, b, hk, k_start, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, m0, local_m, offs_d,
        m_ok, sq, sk, window_left, window_right, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        kv_mask = (offs_n < sk)[:, None] & d_ok[None, :]
        n0 = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + n0 * stride_ks + k_tile, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n0 * stride_vs + v_tile, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s, t = _scores(qk, scale, softcap, SOFTCAP)
        p = tl.where(_mask(first, last, offs_n), tl.exp2((s - lse[:, None]) * 1.4426950408889634), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    tl.store(DQ + (b * stride_dqb + row0 * stride_dqs + h * stride_dqh) + local_m[:, None] * stride_dqs
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------------ decode
@triton.jit
def _decode_kernel(Q, KC, VC, Out, Lse, BlockTable, CacheSeqlens, cu_q,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_osplit, stride_ob, stride_os, stride_oh,
                   stride_lsplit, stride_lb, stride_lh, stride_bt,
                   num_kv_heads, group, seqlen_q, seqlen_new, page_size, scale, softcap, window_left, window_right,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
    """Dense: q (B, seqlen_q, H, D), seqlen_new new tokens per sequence. VARLEN: packed q (tokens, H, D) with
    the batch strides 0, sequence b owning rows cu_q[b] .. cu_q[b + 1] - 1 (seqlen_q is then the longest, and
    seqlen_new 1 if each row brought its own new token, else 0)."""
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (bh // num_kv_heads).to(tl.int64)
    hk = bh % num_kv_heads
    q0 = 0
    if VARLEN:
        q0 = tl.load(cu_q + b)
        seqlen_q = tl.load(cu_q + b + 1) - q0
        seqlen_new = seqlen_new * seqlen_q
        q0 = q0.to(tl.int64)
    sk = tl.load(CacheSeqlens + b) + seqlen_new
    # Row r of the tile is query r // group of q head hk * group + r % group: one kv head's whole GQA group.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // group
    h = hk * group + rows % group
    r_ok = t < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + (q0 + t[:, None]) * stride_qs + h[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)

    first, last = _row_bounds(t + sk - seqlen_q, r_ok, sk, window_left, window_right)
    t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, seqlen_q - 1)
    lo, hi = _key_range(pid_m * BLOCK_M // group + sk - seqlen_q, t_last + sk - seqlen_q,
                        sk, window_left, window_right, BLOCK_N)
    # This split's share of the key tiles, intersected with the rows' window.
    tiles = tl.cdiv(sk, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    lo = tl.maximum(lo, split * per_split * BLOCK_N)
    hi = tl.minimum(hi, (split + 1) * per_split * BLOCK_N)

    local_n = tl.arange(0, BLOCK_N)
    # stride_kd: 1, or a key-major cache's (the CPU engine's; Triton's interpreter runs on it)
    k_tile = local_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_tile = local_n[:, None] * stride_vs + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        if PAGED:
            # BLOCK_N divides the block size, so a key tile lies in one cache block.
            blk = tl.load(BlockTable + b * stride_bt + start_n // page_size).to(tl.int64)
            row = tl.cast(start_n % page_size, tl.int64)
        else:
            blk = b
            row = tl.cast(start_n, tl.int64)
        kv_mask = (offs_n < sk)[:, None] & d_ok[None, :]
        k = tl.load(KC + (blk * stride_kb + row * stride_ks + hk * stride_kh) + k_tile, mask=kv_mask, other=0.0)
        v = tl.load(VC + (blk * stride_vb + row * stride_vs + hk * stride_vh) + v_tile, mask=kv_mask, other=0.0)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, first, last, offs_n, scale, softcap, SOFTCAP, PREC)
    out, lse = _softmax_finish(acc, m_i, l_i)
    o_base = Out + split.to(tl.int64) * stride_osplit + b * stride_ob
    tl.store(o_base + (q0 + t[:, None]) * stride_os + h[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + split.to(tl.int64) * stride_lsplit + b * stride_lb + h * stride_lh + q0 + t, lse, mask=r_ok)


@triton.jit
def _decode_merge_kernel(OutPart, LsePart, Out, Lse, num_splits,
                         stride_psplit, stride_pb, stride_ps, stride_ph, stride_lsplit, stride_lb, stride_lh,
                         stride_ob, stride_os, stride_oh, stride_fb, stride_fh,
                         seqlen_q, num_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (batch, query, head): combine the splits' normalized outputs by their lse."""
    row = tl.program_id(0)
    h = row % num_heads
    t = (row // num_heads) % seqlen_q
    b = (row // (num_heads * seqlen_q)).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LsePart + offs_s * stride_lsplit + b * stride_lb + h * stride_lh + t, mask=s_ok,
                    other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    o = tl.load(OutPart + offs_s[:, None] * stride_psplit + b * stride_pb + t * stride_ps + h * stride_ph
                + offs_d[None, :], mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(Out + b * stride_ob + t * stride_os + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(Lse + b * stride_fb + h * stride_fh + t, lse)


# ------------------------------------------------------------------------------------------------ configs
def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim tile width (for decode BLOCK_M is the
# largest row tile). Each is the largest tile among a few candidates that compiles for sm_80 and sm_90 with no
# register spills and shared memory within limits, with the 16-divisible strides the JIT sees for usual shapes
# (benchmarks/gpu_static.py re-checks them through aot_specs()). float32 uses fp32 FMA dots, hence its own table.
_CONFIGS = {
    torch.float16: {
        "fwd": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 2), 128: (128, 64, 8, 2),
                256: (64, 64, 8, 2)},
        "dkdv": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2),
                 256: (16, 32, 8, 2)},
        "dq": {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2), 128: (128, 64, 8, 2),
               256: (64, 32, 8, 2)},
        "decode": {16: (64, 64, 8, 2), 32: (64, 32, 8, 2), 64: (64, 64, 8, 2), 128: (64, 64, 8, 2),
                   256: (64, 32, 8, 2)},
    },
    torch.float32: {
        "fwd": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 2)},
        "dkdv": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2),
                 256: (16, 16, 8, 2)},
        "dq": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 2)},
        "decode": {16: (32, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2),
                   256: (16, 16, 8, 1)},
    },
}
_CONFIGS[torch.bfloat16] = _CONFIGS[torch.float16]


def _config(kernel, block_d, dtype):
    return _CONFIGS[dtype][kernel][block_d]


def _decode_block_m(rows, cap):
    return max(16, min(cap, triton.next_power_of_2(rows)))


# ------------------------------------------------------------------------------------------------ wrappers
def _windows(causal, window_left, window_right):
    if causal:
        window_right = 0
    return (window_left if window_left >= 0 else _UNBOUNDED), (window_right if window_right >= 0 else _UNBOUNDED)


def _shape_info(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(varlen, batch, heads, kv heads, head dim, max_seqlen_q, max_seqlen_k) of dense or varlen inputs."""
    if cu_seqlens_q is not None:
        return True, cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1], q.shape[2], max_seqlen_q, max_seqlen_k
    return False, q.shape[0], q.shape[2], k.shape[2], q.shape[3], q.shape[1], k.shape[1]


def _bsh(t, varlen):
    """(batch, seq, head) strides; packed varlen tensors have no batch stride (rows come from cu_seqlens)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _contig(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   window_left, window_right, softcap):
    q, k, v = _contig(q, k, v)
    varlen, batch, heads, kv_heads, head_dim, sq, sk = _shape_info(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty_like(q)
    lse_shape = (heads, q.shape[0]) if varlen else (batch, heads, sq)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    wl, wr = _windows(causal, window_left, window_right)
    block_d = _block_d(head_dim)
    block_m, block_n, warps, stages = _config("fwd", block_d, q.dtype)
    if batch * heads * sq == 0:
        return out, lse.fill_(float("-inf"))
    _fwd_kernel[(triton.cdiv(sq, block_m), batch * heads)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen), *_lse_strides(lse, varlen),
        heads, heads // kv_heads, sq, sk, softmax_scale, softcap, wl, wr,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, VARLEN=varlen,
        SOFTCAP=softcap > 0, PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, causal, window_left, window_right, softcap):
    dout, q, k, v, out = _contig(dout, q, k, v, out)
    varlen, batch, heads, kv_heads, head_dim, sq, sk = _shape_info(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if batch * heads * head_dim == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    wl, wr = _windows(causal, window_left, window_right)
    block_d = _block_d(head_dim)
    group = heads // kv_heads
    rows = q.shape[0] if varlen else sq
    _bwd_delta_kernel[(triton.cdiv(rows, _DELTA_BLOCK_M), (1 if varlen else batch) * heads)](
        out, dout, delta, *_bsh(out, varlen), *_bsh(dout, varlen), *_lse_strides(lse, varlen), heads, rows,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, VARLEN=varlen, SOFTCAP=softcap > 0, PREC=_prec(q.dtype))
    block_m, block_n, warps, stages = _config("dkdv", block_d, q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(sk, block_n), batch * kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
        *_bsh(dk, varlen), *_bsh(dv, varlen), *_lse_strides(lse, varlen),
        kv_heads, group, sq, sk, softmax_scale, softcap, wl, wr,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    block_m, block_n, warps, stages = _config("dq", block_d, q.dtype)
    _bwd_dq_kernel[(triton.cdiv(sq, block_m), batch * heads)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen), *_bsh(dq, varlen),
        *_lse_strides(lse, varlen), heads, group, sq, sk, softmax_scale, softcap, wl, wr,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


def _num_splits(requested, programs, capacity, block_n, device):
    """Splits of the cache per (batch, kv head, row tile): the request, or enough programs to fill the GPU twice
    while keeping >= 4 key tiles per split. Uses the cache capacity, not cache_seqlens, so it never syncs."""
    tiles = triton.cdiv(max(capacity, 1), block_n)
    if requested > 0:
        return max(1, min(requested, tiles, _MAX_SPLITS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(tiles, 4), _MAX_SPLITS))


def append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table):
    """Write k/v (B, S_new, Hkv, D) into the cache at positions cache_seqlens[b] + t, in place, without a host
    sync. Paged: token position p lives in block block_table[b, p // block_size] at row p % block_size."""
    batch, s_new = k.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(s_new, device=k.device)
    if block_table is not None:
        page = k_cache.shape[1]
        blocks, rows = torch.gather(block_table.long(), 1, pos // page), pos % page
    else:
        blocks, rows = torch.arange(batch, device=k.device)[:, None].expand(batch, s_new), pos
    k_cache[blocks, rows] = k.to(k_cache.dtype)
    v_cache[blocks, rows] = v.to(v_cache.dtype)


def _cuda_decode_supports(q):
    """The CUDA C++ decode kernel (csrc/cuda/attention_decode.cu) takes one fp16/bf16 query of even head_dim per
    sequence; everything else (chunked prefill, float32) stays on Triton."""
    if not hasattr(torch.ops.flashgen_cuda, "flash_attn_kvcache"):
        raise RuntimeError("FLASHGEN_CUDA_BACKEND=cuda but the CUDA C++ kernels (flashgen._C_cuda) are not built")
    return q.shape[1] == 1 and q.dtype in (torch.float16, torch.bfloat16) and q.shape[3] % 2 == 0


def flash_attn_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal,
                       window_left, window_right, softcap, num_splits):
    if os.environ.get("FLASHGEN_CUDA_BACKEND") == "cuda" and _cuda_decode_supports(q):
        return torch.ops.flashgen_cuda.flash_attn_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                                          softmax_scale, causal, window_left, window_right,
                                                          softcap, num_splits)
    if v_cache.stride(-1) != 1:
        raise ValueError("flash_attn_kvcache: v_cache must be contiguous in head_dim (stride 1)")
    if k is not None:
        append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table)
    (q,) = _contig(q)
    batch, seqlen_q, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    block_d = _block_d(head_dim)
    max_block_m, block_n, warps, stages = _config("decode", block_d, q.dtype)
    if paged:
        if k_cache.shape[1] % 16:
            raise ValueError(f"flash_attn_kvcache: a paged cache needs block_size a multiple of 16, got "
                             f"{k_cache.shape[1]}")
        block_n = math.gcd(block_n, k_cache.shape[1])  # a key tile never straddles two cache blocks
    block_m = _decode_block_m(seqlen_q * group, max_block_m)
    m_tiles = triton.cdiv(seqlen_q * group, block_m)
    splits = _num_splits(num_splits, batch * kv_heads * m_tiles, capacity, block_n, q.device)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if splits == 1:
        # One split is the final answer: write it straight into out and lse.
        out_p, lse_p, split_strides = out, lse, (0, 0)
    else:
        out_p = torch.empty((splits,) + tuple(q.shape), dtype=torch.float32, device=q.device)
        lse_p = torch.empty((splits, batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        split_strides = (out_p.stride(0), lse_p.stride(0))
    wl, wr = _windows(causal, window_left, window_right)
    p_strides = out_p.stride()[-4:-1]
    _decode_kernel[(splits, batch * kv_heads, m_tiles)](
        q, k_cache, v_cache, out_p, lse_p, block_table, cache_seqlens, cache_seqlens,
        *_bsh(q, False), *_bsh(k_cache, False), k_cache.stride(3), *_bsh(v_cache, False), split_strides[0], *p_strides,
        split_strides[1], *lse_p.stride()[-3:-1], block_table.stride(0) if paged else 0,
        kv_heads, group, seqlen_q, k.shape[1] if k is not None else 0, k_cache.shape[1] if paged else 0,
        softmax_scale, softcap, wl, wr,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged, SOFTCAP=softcap > 0,
        PREC=_prec(q.dtype), VARLEN=False, num_warps=warps, num_stages=stages)
    if splits > 1:
        _decode_merge_kernel[(batch * seqlen_q * heads,)](
            out_p, lse_p, out, lse, splits, out_p.stride(0), *p_strides, *lse_p.stride()[:3],
            *out.stride()[:3], *lse.stride()[:2], seqlen_q, heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits))
    return out, lse


def flash_attn_varlen_kvcache(q, k_cache, v_cache, k, v, cu_seqlens_q, cache_seqlens, block_table, softmax_scale,
                              causal, window_left, window_right, softcap):
    """Packed sequences over a paged cache: the decode kernel with VARLEN, one program row per (sequence, kv
    head, row tile up to the longest sequence's rows; reading that length is the one host sync)."""
    if v_cache.stride(-1) != 1:
        raise ValueError("flash_attn_varlen_kvcache: v_cache must be contiguous in head_dim (stride 1)")
    if k_cache.shape[1] % 16:
        raise ValueError(f"flash_attn_varlen_kvcache: block_size must be a multiple of 16, got {k_cache.shape[1]}")
    (q,) = _contig(q)
    total, heads, head_dim = q.shape
    batch, kv_heads = cu_seqlens_q.shape[0] - 1, k_cache.shape[2]
    group = heads // kv_heads
    counts = cu_seqlens_q.diff()
    if k is not None:
        # Row i of sequence b goes to cache position cache_seqlens[b] + i - cu_seqlens_q[b].
        seq = torch.repeat_interleave(torch.arange(batch, device=q.device), counts,
                                      output_size=int(cu_seqlens_q[-1]))
        pos = cache_seqlens.long()[seq] + torch.arange(seq.shape[0], device=q.device) - cu_seqlens_q.long()[seq]
        page = k_cache.shape[1]
        blocks, rows = block_table.long()[seq, pos // page], pos % page
        k_cache[blocks, rows] = k[:seq.shape[0]].to(k_cache.dtype)
        v_cache[blocks, rows] = v[:seq.shape[0]].to(v_cache.dtype)
    out = torch.zeros_like(q)
    lse = torch.full((heads, total), float("-inf"), dtype=torch.float32, device=q.device)
    max_q = int(counts.max()) if batch else 0
    if max_q == 0 or out.numel() == 0:
        return out, lse
    block_d = _block_d(head_dim)
    max_block_m, block_n, warps, stages = _config("decode", block_d, q.dtype)
    block_n = math.gcd(block_n, k_cache.shape[1])
    block_m = _decode_block_m(max_q * group, max_block_m)
    m_tiles = triton.cdiv(max_q * group, block_m)
    capacity = block_table.shape[1] * k_cache.shape[1]
    splits = _num_splits(0, batch * kv_heads * m_tiles, capacity, block_n, q.device)
    if splits == 1:
        out_p, lse_p, split_strides = out, lse, (0, 0)
    else:
        out_p = torch.zeros((splits,) + tuple(q.shape), dtype=torch.float32, device=q.device)
        lse_p = torch.full((splits, heads, total), float("-inf"), dtype=torch.float32, device=q.device)
        split_strides = (out_p.stride(0), lse_p.stride(0))
    wl, wr = _windows(causal, window_left, window_right)
    _decode_kernel[(splits, batch * kv_heads, m_tiles)](
        q, k_cache, v_cache, out_p, lse_p, block_table, cache_seqlens, cu_seqlens_q,
        0, *q.stride()[:2], *_bsh(k_cache, False), k_cache.stride(3), *_bsh(v_cache, False), split_strides[0], 0,
        *out_p.stride()[-3:-1], split_strides[1], 0, lse_p.stride(-2), block_table.stride(0),
        kv_heads, group, max_q, int(k is not None), k_cache.shape[1], softmax_scale, softcap, wl, wr,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PAGED=True, SOFTCAP=softcap > 0,
        PREC=_prec(q.dtype), VARLEN=True, num_warps=warps, num_stages=stages)
    if splits > 1:
        # The merge sees the packed rows as one sequence of `total` queries.
        _decode_merge_kernel[(total * heads,)](
            out_p, lse_p, out, lse, splits, out_p.stride(0), 0, *out_p.stride()[1:3], lse_p.stride(0), 0,
            lse_p.stride(1), 0, *out.stride()[:2], 0, lse.stride(0), total, heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits))
    return out, lse


# ------------------------------------------------------------------------------------------------ hooks
KERNELS = {fn.__name__: fn for fn in (flash_attn_fwd, flash_attn_bwd, flash_attn_kvcache, flash_attn_varlen_kvcache)}


_FLOAT_ARGS = {"scale", "softcap"}
_INT_PTRS = {"cu_q", "cu_k", "BlockTable", "CacheSeqlens"}
_F32_PTRS = {"Lse", "Delta", "LsePart", "OutPart"}


def _spec(name, fn, dtype, constexprs, num_warps, num_stages):
    """A gpu_static spec: pointers typed by role, strides and sizes i32, scale/softcap fp32; "attrs" marks the
    pointers and strides 16-divisible, as the JIT specializes them for usual shapes (head_dim a multiple of 8)."""
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _FLOAT_ARGS:
            signature[arg] = "fp32"
        elif arg[0].isupper() or arg in _INT_PTRS:
            signature[arg] = "*i32" if arg in _INT_PTRS else "*fp32" if arg in _F32_PTRS else f"*{dtype}"
        else:
            signature[arg] = "i32"
        if signature[arg].startswith("*") or arg.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "num_warps": num_warps, "num_stages": num_stages}


def aot_specs():
    """Every kernel variant the wrappers launch: each head-dim tile width, for float16 (bfloat16 compiles to the
    same tiles) and float32, with the heaviest flags (varlen + softcap; paged decode at its smallest and largest
    row tile)."""
    specs = []
    for torch_dtype in (torch.float16, torch.float32):
        dt = _DTYPES[torch_dtype]
        for bd in _BLOCK_DS:
            flags = dict(HEAD_DIM=bd, BLOCK_D=bd, SOFTCAP=True, PREC=_prec(torch_dtype))
            for kernel, fn in (("fwd", _fwd_kernel), ("dkdv", _bwd_dkdv_kernel), ("dq", _bwd_dq_kernel)):
                bm, bn, w, s = _config(kernel, bd, torch_dtype)
                specs.append(_spec(f"attn_{kernel}_{dt}_d{bd}", fn, dt,
                                   dict(flags, BLOCK_M=bm, BLOCK_N=bn, VARLEN=True), w, s))
            max_bm, bn, w, s = _config("decode", bd, torch_dtype)
            for bm in sorted({16, max_bm}):
                # head_dim-contiguous keys, as a GPU cache holds them (the JIT specializes a stride of 1 too)
                specs.append(_spec(f"attn_decode_{dt}_d{bd}_m{bm}", _decode_kernel, dt,
                                   dict(flags, BLOCK_M=bm, BLOCK_N=bn, PAGED=True, VARLEN=True, stride_kd=1), w, s))
            specs.append(_spec(f"attn_bwd_delta_{dt}_d{bd}", _bwd_delta_kernel, dt,
                               dict(HEAD_DIM=bd, BLOCK_D=bd, BLOCK_M=_DELTA_BLOCK_M), 4, 1))
            specs.append(_spec(f"attn_decode_merge_{dt}_d{bd}", _decode_merge_kernel, dt,
                               dict(HEAD_DIM=bd, BLOCK_D=bd, BLOCK_S=_MAX_SPLITS), 4, 1))
    return specs
