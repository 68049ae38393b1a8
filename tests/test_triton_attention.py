"""Triton attention kernels (kernels/triton/attention.py) under TRITON_INTERPRET=1 on CPU tensors.

Checked against the float64 reference with the FlashAttention rule: the kernel's max error is at most twice the
max error of the same attention written in eager PyTorch at the kernel's precision, plus a small floor.
"""
from triton_interp import poisoned  # isort: skip  (sets TRITON_INTERPRET before triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402

from attention_checks import (VARLEN_DECODE, assert_fa_rule, assert_grads, assert_lse, check_varlen_kvcache,  # noqa: E402
                              eager_grads, kvcache_baseline, paged_cache, randn)
from flashgen.kernels import reference  # noqa: E402
from flashgen.kernels.triton import attention as tri  # noqa: E402


# ------------------------------------------------------------------------------------------------ prefill
# (dtype, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
PREFILL = [
    (torch.float16, 2, 1, 97, 4, 1, 40, True, (-1, -1), 0.0),        # MQA, one query
    (torch.bfloat16, 1, 97, 97, 4, 2, 64, False, (-1, -1), 0.0),
    (torch.float16, 1, 130, 67, 2, 2, 96, True, (-1, -1), 0.0),      # sq > sk: leading rows attend nothing
    (torch.float32, 2, 33, 130, 2, 1, 64, False, (16, 0), 0.0),
    (torch.float16, 1, 65, 65, 4, 4, 40, False, (8, 8), 5.0),
    (torch.bfloat16, 2, 17, 45, 6, 2, 96, True, (-1, -1), 30.0),
    (torch.float16, 1, 31, 50, 2, 1, 8, True, (3, -1), 0.0),         # head dim padded 8 -> 16
    (torch.bfloat16, 1, 20, 20, 2, 2, 256, False, (-1, 4), 0.0),
]


def _dense_case(dtype, batch, sq, sk, heads, kv_heads, head_dim):
    q = randn(batch, sq, heads, head_dim, dtype=dtype)
    k = randn(batch, sk, kv_heads, head_dim, dtype=dtype)
    v = randn(batch, sk, kv_heads, head_dim, dtype=dtype)
    return q, k, v, randn(batch, sq, heads, head_dim, dtype=dtype)


@pytest.mark.parametrize("dtype,batch,sq,sk,heads,kv_heads,head_dim,causal,window,softcap", PREFILL)
def test_forward_backward(dtype, batch, sq, sk, heads, kv_heads, head_dim, causal, window, softcap):
    q, k, v, dout = _dense_case(dtype, batch, sq, sk, heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    opts = (scale, causal, *window, softcap)
    with poisoned():
        out, lse = tri.flash_attn_fwd(q, k, v, None, None, sq, sk, *opts)
        grads = tri.flash_attn_bwd(dout, q, k, v, out, lse, None, None, sq, sk, *opts)
    d = [t.double() for t in (q, k, v)]
    ref_out, ref_lse = reference.flash_attn_fwd(*d, None, None, sq, sk, *opts)
    ref_grads = reference.flash_attn_bwd(dout.double(), *d, ref_out, ref_lse, None, None, sq, sk, *opts)
    base_out, base_lse, base_grads = eager_grads(q, k, v, dout, scale, causal, window, softcap)
    assert_fa_rule("out", out, ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)
    assert_grads(grads, ref_grads, base_grads, lse, ref_lse)


def test_backward_is_deterministic():
    q, k, v, dout = _dense_case(torch.float16, 1, 70, 90, 4, 1, 40)
    opts = (40 ** -0.5, True, -1, -1, 0.0)
    out, lse = tri.flash_attn_fwd(q, k, v, None, None, 70, 90, *opts)
    first = tri.flash_attn_bwd(dout, q, k, v, out, lse, None, None, 70, 90, *opts)
    second = tri.flash_attn_bwd(dout, q, k, v, out, lse, None, None, 70, 90, *opts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,causal,window,softcap", [
    (torch.float16, True, (-1, -1), 0.0),
    (torch.bfloat16, False, (9, 2), 10.0),
])
def test_varlen(dtype, causal, window, softcap):
    lens_q, lens_k = [1, 45, 17, 30], [7, 45, 1, 66]
    heads, kv_heads, head_dim = 4, 2, 64
    cu_q = torch.tensor([0] + lens_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lens_k).cumsum(0).int()
    q = randn(sum(lens_q), heads, head_dim, dtype=dtype)
    k = randn(sum(lens_k), kv_heads, head_dim, dtype=dtype)
    v = randn(sum(lens_k), kv_heads, head_dim, dtype=dtype)
    dout = randn(sum(lens_q), heads, head_dim, dtype=dtype)
    opts = (head_dim ** -0.5, causal, *window, softcap)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), *opts)
    with poisoned():
        out, lse = tri.flash_attn_fwd(q, k, v, *args)
        grads = tri.flash_attn_bwd(dout, q, k, v, out, lse, *args)
    d = [t.double() for t in (q, k, v)]
    ref_out, ref_lse = reference.flash_attn_fwd(*d, *args)
    ref_grads = reference.flash_attn_bwd(dout.double(), *d, ref_out, ref_lse, *args)
    # The eager baseline, sequence by sequence, packed back like the kernel's outputs.
    per_seq = []
    for b in range(len(lens_q)):
        sq_, sk_ = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        per_seq.append(eager_grads(q[None, sq_], k[None, sk_], v[None, sk_], dout[None, sq_],
                                    opts[0], causal, window, softcap))
    base_out = torch.cat([o[0] for o, _, _ in per_seq])
    base_lse = torch.cat([l[0] for _, l, _ in per_seq], 1)
    assert_fa_rule("out", out, ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)
    base_dq = torch.cat([g[0][0] for _, _, g in per_seq])
    base_dk = torch.cat([g[1][0] for _, _, g in per_seq])
    base_dv = torch.cat([g[2][0] for _, _, g in per_seq])
    assert_grads(grads, ref_grads, (base_dq, base_dk, base_dv), lse, ref_lse)


# ------------------------------------------------------------------------------------------------ decode
# (dtype, cache_seqlens, block_size (0: contiguous cache), seqlen_q, append new k/v, heads, kv_heads, head_dim,
#  window, softcap, num_splits)
DECODE = [
    (torch.float16, [1, 255, 90], 16, 1, True, 8, 2, 64, (-1, -1), 0.0, 3),
    (torch.bfloat16, [255, 1, 40], 256, 1, False, 4, 4, 96, (-1, -1), 0.0, 2),
    (torch.float16, [300, 3], 16, 1, True, 4, 1, 40, (-1, -1), 0.0, 0),        # heuristic splits
    (torch.float16, [60, 97], 0, 1, True, 4, 2, 64, (20, -1), 0.0, 4),         # contiguous cache, window
    (torch.bfloat16, [0, 77, 120], 16, 5, True, 4, 2, 40, (-1, -1), 15.0, 3),  # chunked prefill, softcap
    (torch.float32, [100, 33], 256, 3, False, 2, 1, 96, (-1, -1), 0.0, 1),
]


@pytest.mark.parametrize("dtype,lens,block_size,sq,append,heads,kv_heads,head_dim,window,softcap,splits", DECODE)
def test_kvcache(dtype, lens, block_size, sq, append, heads, kv_heads, head_dim, window, softcap, splits,
                 monkeypatch):
    chosen = []
    num_splits = tri._num_splits
    monkeypatch.setattr(tri, "_num_splits", lambda *a: chosen.append(num_splits(*a)) or chosen[-1])
    batch = len(lens)
    capacity = max(lens) + sq + 7
    if block_size:
        k_cache, v_cache, block_table = paged_cache(batch, capacity, block_size, kv_heads, head_dim, dtype)
    else:
        k_cache = randn(batch + 1, capacity, kv_heads, head_dim, dtype=dtype)
        v_cache = randn(batch + 1, capacity, kv_heads, head_dim, dtype=dtype)
        block_table = None
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    q = randn(batch, sq, heads, head_dim, dtype=dtype)
    k = randn(batch, sq, kv_heads, head_dim, dtype=dtype) if append else None
    v = randn(batch, sq, kv_heads, head_dim, dtype=dtype) if append else None
    opts = (head_dim ** -0.5, True, *window, softcap)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    new = [None if t is None else t.double() for t in (k, v)]
    ref_out, ref_lse = reference.flash_attn_kvcache(q.double(), ref_k, ref_v, *new, cache_seqlens, block_table,
                                                    *opts, splits)
    with poisoned():
        out, lse = tri.flash_attn_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, *opts, splits)
    assert torch.equal(k_cache.double(), ref_k) and torch.equal(v_cache.double(), ref_v), "in-place append"
    assert (chosen[0] > 1) == (splits != 1), f"split-K must really split (asked {splits}, ran {chosen[0]})"
    lengths = [n + (sq if append else 0) for n in lens]
    base_out, base_lse = kvcache_baseline(q, k_cache, v_cache, lengths, block_table, opts[0], window, softcap)
    assert_fa_rule("out", out, ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)


def test_aot_specs_cover_every_argument():
    specs = tri.aot_specs()
    assert len({s["name"] for s in specs}) == len(specs)
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names), s["name"]
        assert all(s["signature"][c] == "constexpr" for c in s["constexprs"]), s["name"]


@pytest.mark.parametrize("splits,keys_key_major", [(None, False), (3, False), (None, True)])
@pytest.mark.parametrize("lens,new,heads,kv_heads,head_dim,block_size,window,softcap,dtype", VARLEN_DECODE)
def test_varlen_kvcache(lens, new, heads, kv_heads, head_dim, block_size, window, softcap, dtype, splits,
                        keys_key_major, monkeypatch):
    """Packed prefill chunks and decodes over a paged cache (flash_attn_varlen_kvcache), one launch (and the
    merge of split-K partials when forced); keys also key-major, as the engine's CPU cache holds them."""
    if splits:
        monkeypatch.setattr(tri, "_num_splits", lambda *a: splits)
    check_varlen_kvcache(tri.flash_attn_varlen_kvcache, lens, new, heads, kv_heads, head_dim, block_size, window,
                         softcap, dtype, poisoned, keys_key_major=keys_key_major)
