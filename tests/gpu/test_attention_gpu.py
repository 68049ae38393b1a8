"""Attention on a real GPU: the Triton forward / backward / decode kernels (the CUDA kernels of the
flashgen::flash_attn_* ops) and the CUDA C++ paged decode kernel (flashgen_cuda::flash_attn_kvcache), checked
against the float64 reference with the FlashAttention rule (tests/attention_checks.py).

Run this folder in its own pytest process: the interpreter tests set TRITON_INTERPRET=1 for their process, and
Triton kernels imported under it would run interpreted here instead of compiled.
"""
import contextlib
import os

import pytest
import torch

from attention_checks import (VARLEN_DECODE, assert_fa_rule, assert_grads, assert_lse, check_varlen_kvcache,
                              eager_grads, kvcache_baseline, paged_cache, randn)
from flashgen import kernels  # noqa: F401  (registers the Triton kernels for CUDA)
from flashgen.kernels import _backend, reference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="TRITON_INTERPRET=1 in this process: run tests/gpu in its own pytest run")
DEV = "cuda"
ops = torch.ops.flashgen


def has_cuda_decode():
    return _backend.C_cuda is not None and hasattr(torch.ops.flashgen_cuda, "flash_attn_kvcache")


def test_triton_kernels_are_registered_for_cuda():
    for op in ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_kvcache", "flash_attn_varlen_kvcache"):
        assert _backend.has_kernel(op, "CUDA"), op


# (dtype, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
PREFILL = [
    (torch.float16, 2, 1, 1025, 8, 1, 40, True, (-1, -1), 0.0),
    (torch.bfloat16, 2, 97, 97, 8, 8, 64, False, (-1, -1), 0.0),
    (torch.float16, 1, 200, 1025, 4, 2, 80, True, (-1, -1), 0.0),
    (torch.bfloat16, 1, 1025, 200, 8, 1, 96, True, (-1, -1), 0.0),
    (torch.float16, 2, 128, 128, 4, 2, 128, False, (32, 16), 0.0),
    (torch.bfloat16, 1, 17, 97, 4, 4, 256, True, (-1, -1), 30.0),
    (torch.float32, 1, 200, 200, 4, 2, 64, True, (64, -1), 0.0),
    (torch.float16, 1, 1025, 1025, 2, 2, 8, False, (-1, -1), 5.0),
]


@pytest.mark.parametrize("dtype,batch,sq,sk,heads,kv_heads,head_dim,causal,window,softcap", PREFILL)
def test_forward_backward(dtype, batch, sq, sk, heads, kv_heads, head_dim, causal, window, softcap):
    q = randn(batch, sq, heads, head_dim, dtype=dtype, device=DEV)
    k = randn(batch, sk, kv_heads, head_dim, dtype=dtype, device=DEV)
    v = randn(batch, sk, kv_heads, head_dim, dtype=dtype, device=DEV)
    dout = randn(batch, sq, heads, head_dim, dtype=dtype, device=DEV)
    scale = head_dim ** -0.5
    opts = (scale, causal, *window, softcap)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ops.flash_attn_fwd(*leaves, None, None, sq, sk, *opts)  # autograd runs flash_attn_bwd
    out.backward(dout)
    grads = [t.grad for t in leaves]
    d = [t.double() for t in (q, k, v)]
    ref_out, ref_lse = reference.flash_attn_fwd(*d, None, None, sq, sk, *opts)
    ref_grads = reference.flash_attn_bwd(dout.double(), *d, ref_out, ref_lse, None, None, sq, sk, *opts)
    base_out, base_lse, base_grads = eager_grads(q, k, v, dout, scale, causal, window, softcap)
    assert_fa_rule("out", out.detach(), ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)
    assert_grads(grads, ref_grads, base_grads, lse, ref_lse)


def test_backward_is_deterministic():
    q = randn(2, 300, 8, 64, dtype=torch.bfloat16, device=DEV)
    k = randn(2, 500, 2, 64, dtype=torch.bfloat16, device=DEV)
    v = randn(2, 500, 2, 64, dtype=torch.bfloat16, device=DEV)
    dout = randn(2, 300, 8, 64, dtype=torch.bfloat16, device=DEV)
    opts = (None, None, 300, 500, 0.125, True, -1, -1, 0.0)
    out, lse = ops.flash_attn_fwd(q, k, v, *opts)
    first = ops.flash_attn_bwd(dout, q, k, v, out, lse, *opts)
    second = ops.flash_attn_bwd(dout, q, k, v, out, lse, *opts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_varlen():
    lens_q, lens_k = [1, 97, 200, 17], [1, 300, 200, 1025]
    heads, kv_heads, head_dim = 8, 2, 128
    cu_q = torch.tensor([0] + lens_q, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lens_k, device=DEV).cumsum(0).int()
    q = randn(sum(lens_q), heads, head_dim, dtype=torch.float16, device=DEV)
    k = randn(sum(lens_k), kv_heads, head_dim, dtype=torch.float16, device=DEV)
    v = randn(sum(lens_k), kv_heads, head_dim, dtype=torch.float16, device=DEV)
    dout = randn(sum(lens_q), heads, head_dim, dtype=torch.float16, device=DEV)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), head_dim ** -0.5, True, -1, -1, 0.0)
    out, lse = ops.flash_attn_fwd(q, k, v, *args)
    grads = ops.flash_attn_bwd(dout, q, k, v, out, lse, *args)
    d = [t.double() for t in (q, k, v)]
    ref_out, ref_lse = reference.flash_attn_fwd(*d, *args)
    ref_grads = reference.flash_attn_bwd(dout.double(), *d, ref_out, ref_lse, *args)
    per_seq = [eager_grads(q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]], v[None, cu_k[b]:cu_k[b + 1]],
                           dout[None, cu_q[b]:cu_q[b + 1]], args[4], True, (-1, -1), 0.0)
               for b in range(len(lens_q))]
    assert_fa_rule("out", out, ref_out, torch.cat([o[0] for o, _, _ in per_seq]))
    assert_lse(lse, ref_lse, torch.cat([l[0] for _, l, _ in per_seq], 1))
    assert_grads(grads, ref_grads, [torch.cat([gr[i][0] for _, _, gr in per_seq]) for i in range(3)], lse, ref_lse)


# (dtype, cache_seqlens, block_size (0: contiguous), seqlen_q, append, heads, kv_heads, head_dim, window, softcap,
#  num_splits)
DECODE = [
    (torch.float16, [1, 255, 4097], 16, 1, True, 8, 1, 64, (-1, -1), 0.0, 0),
    (torch.bfloat16, [4097, 1, 255], 256, 1, True, 32, 8, 128, (-1, -1), 0.0, 0),
    (torch.float16, [255, 4097], 256, 1, False, 16, 2, 80, (-1, -1), 0.0, 7),
    (torch.bfloat16, [1000, 3], 16, 1, True, 8, 8, 96, (100, -1), 0.0, 1),
    (torch.float16, [4097, 77], 0, 1, True, 8, 2, 256, (-1, -1), 20.0, 0),
    (torch.bfloat16, [300, 4097, 0], 16, 9, True, 8, 2, 40, (-1, -1), 0.0, 3),   # chunked prefill (Triton only)
]


def _decode_case(dtype, lens, block_size, sq, append, heads, kv_heads, head_dim):
    batch, capacity = len(lens), max(lens) + sq + 20
    if block_size:
        k_cache, v_cache, block_table = paged_cache(batch, capacity, block_size, kv_heads, head_dim, dtype, DEV)
    else:
        k_cache = randn(batch + 1, capacity, kv_heads, head_dim, dtype=dtype, device=DEV)
        v_cache = randn(batch + 1, capacity, kv_heads, head_dim, dtype=dtype, device=DEV)
        block_table = None
    q = randn(batch, sq, heads, head_dim, dtype=dtype, device=DEV)
    new = [randn(batch, sq, kv_heads, head_dim, dtype=dtype, device=DEV) if append else None for _ in range(2)]
    return q, k_cache, v_cache, new, torch.tensor(lens, dtype=torch.int32, device=DEV), block_table


def _run_decode(fn, case, opts, splits):
    """fn on a fresh copy of the caches; checks the in-place append and the FlashAttention rule."""
    q, k_cache, v_cache, new, cache_seqlens, block_table = case
    kc, vc = k_cache.clone(), v_cache.clone()
    ref_k, ref_v = k_cache.double(), v_cache.double()
    ref_new = [None if t is None else t.double() for t in new]
    ref_out, ref_lse = reference.flash_attn_kvcache(q.double(), ref_k, ref_v, *ref_new, cache_seqlens, block_table,
                                                    *opts, splits)
    out, lse = fn(q, kc, vc, *new, cache_seqlens, block_table, *opts, splits)
    torch.cuda.synchronize()
    assert torch.equal(kc.double(), ref_k) and torch.equal(vc.double(), ref_v), "in-place append"
    lengths = [n + (q.shape[1] if new[0] is not None else 0) for n in cache_seqlens.tolist()]
    base_out, base_lse = kvcache_baseline(q, kc, vc, lengths, block_table, opts[0], opts[2:4], opts[4])
    assert_fa_rule("out", out, ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)
    return out, lse


@pytest.mark.parametrize("dtype,lens,block_size,sq,append,heads,kv_heads,head_dim,window,softcap,splits", DECODE)
def test_kvcache_triton(dtype, lens, block_size, sq, append, heads, kv_heads, head_dim, window, softcap, splits,
                        monkeypatch):
    monkeypatch.delenv("FLASHGEN_CUDA_BACKEND", raising=False)
    case = _decode_case(dtype, lens, block_size, sq, append, heads, kv_heads, head_dim)
    _run_decode(ops.flash_attn_kvcache, case, (head_dim ** -0.5, True, *window, softcap), splits)


@pytest.mark.skipif(not has_cuda_decode(), reason="flashgen._C_cuda (CUDA C++ kernels) not built")
@pytest.mark.parametrize("dtype,lens,block_size,sq,append,heads,kv_heads,head_dim,window,softcap,splits",
                         [c for c in DECODE if c[3] == 1])
def test_kvcache_cuda_cpp(dtype, lens, block_size, sq, append, heads, kv_heads, head_dim, window, softcap, splits,
                          monkeypatch):
    case = _decode_case(dtype, lens, block_size, sq, append, heads, kv_heads, head_dim)
    opts = (head_dim ** -0.5, True, *window, softcap)
    direct, _ = _run_decode(torch.ops.flashgen_cuda.flash_attn_kvcache, case, opts, splits)
    # The Triton registration routes decode to the CUDA C++ kernel when asked: the same bits come out.
    monkeypatch.setenv("FLASHGEN_CUDA_BACKEND", "cuda")
    routed, _ = _run_decode(ops.flash_attn_kvcache, case, opts, splits)
    assert torch.equal(direct, routed)
    monkeypatch.delenv("FLASHGEN_CUDA_BACKEND")
    triton_out, _ = _run_decode(ops.flash_attn_kvcache, case, opts, splits)
    assert (triton_out.float() - direct.float()).abs().max().item() < 0.05


@pytest.mark.skipif(not has_cuda_decode(), reason="flashgen._C_cuda (CUDA C++ kernels) not built")
def test_cuda_cpp_decode_rejects_bad_input():
    q, k_cache, v_cache, new, cache_seqlens, block_table = _decode_case(torch.float16, [5, 9], 16, 1, True, 4, 2, 64)
    op = torch.ops.flashgen_cuda.flash_attn_kvcache
    opts = (0.125, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="one query per sequence"):
        op(q.expand(2, 3, 4, 64), k_cache, v_cache, None, None, cache_seqlens, block_table, *opts)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(q.float(), k_cache.float(), v_cache.float(), None, None, cache_seqlens, block_table, *opts)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        op(q[:, :, :3], k_cache, v_cache, None, None, cache_seqlens, block_table, *opts)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        op(q, k_cache, v_cache, None, None, cache_seqlens.long(), block_table, *opts)
    with pytest.raises(RuntimeError, match="block_table"):
        op(q, k_cache, v_cache, None, None, cache_seqlens, block_table.cpu(), *opts)


@pytest.mark.parametrize("lens,new,heads,kv_heads,head_dim,block_size,window,softcap,dtype", VARLEN_DECODE)
def test_varlen_kvcache(lens, new, heads, kv_heads, head_dim, block_size, window, softcap, dtype):
    """flashgen::flash_attn_varlen_kvcache on the GPU (the Triton kernel the op dispatches to for CUDA)."""
    check_varlen_kvcache(torch.ops.flashgen.flash_attn_varlen_kvcache, lens, new, heads, kv_heads, head_dim,
                         block_size, window, softcap, dtype, contextlib.nullcontext, device=DEV)
