"""flashgen::flash_attn_varlen_kvcache (packed sequences over a paged KV cache) on the CPU.

Against the float64 reference by the FlashAttention rule (outputs poisoned, unused cache slots NaN), and the
properties the serving engine relies on, bitwise: a sequence's result is the same alone or in any batch, with
its blocks anywhere in the pool, and whether its tokens came in one chunk, several, or one at a time.
"""
import pytest
import torch
from torch.library import opcheck

from flashgen.kernels import _backend, flash_attn_varlen_with_kvcache
from flashgen.kernels import reference as ref

from attention_checks import key_major
from test_attention import BF16, F16, F32, _poison_empty, _rand, assert_flash_rule  # noqa: F401

OP = torch.ops.flashgen.flash_attn_varlen_kvcache


def test_cpu_kernel_is_registered():
    assert _backend.has_kernel("flash_attn_varlen_kvcache", "CPU")


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _pool(cached, new, hkv, d, block_size, dtype, shuffle=True, spare=3):
    """A NaN-filled block pool holding `cached[b]` random tokens of each sequence, room for `new[b]` more,
    blocks handed out in a random order (or in order), a few spare blocks never used."""
    need = [-(-(c + n) // block_size) for c, n in zip(cached, new)]
    total = sum(need) + spare
    order = torch.randperm(total) if shuffle else torch.arange(total)
    table = torch.zeros(len(cached), max(need + [1]) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = order[used:used + n]
        used += n
    kc = torch.full((total, block_size, hkv, d), float("nan"), dtype=dtype)
    vc = kc.clone()
    for b, c in enumerate(cached):
        where = ref.cache_positions(table, b, c, block_size)
        kc[where], vc[where] = _rand(c, hkv, d, dtype=dtype), _rand(c, hkv, d, dtype=dtype)
    return kc, vc, table


# (cached tokens per sequence, new tokens per sequence, heads, kv_heads, head_dim, block_size, dtype, causal,
#  window, softcap)
CASES = [
    ([0, 5, 300], [7, 1, 1], 4, 2, 64, 64, F32, True, (-1, -1), 0.0),
    ([1, 0, 1030], [1, 97, 1], 9, 3, 40, 16, BF16, True, (-1, -1), 0.0),
    ([255, 17], [33, 0], 8, 1, 80, 64, F16, True, (100, -1), 0.0),
    ([600], [300], 4, 4, 96, 64, F32, True, (-1, -1), 30.0),
    ([3, 64, 0], [1, 64, 1025], 6, 2, 64, 32, BF16, True, (-1, -1), 0.0),
    ([10, 40], [5, 3], 2, 1, 128, 16, F32, False, (-1, -1), 0.0),
    # decode rows of GQA groups up to 4 read a 16-bit cache in place (the chunk of 5 converts it first)
    ([130, 61, 0], [1, 1, 5], 6, 2, 96, 64, F16, True, (-1, -1), 0.0),
    ([200, 63], [2, 1], 8, 4, 64, 64, BF16, True, (-1, -1), 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}+{c[1]}-h{c[2]}/{c[3]}-d{c[4]}-bs{c[5]}")
def test_matches_reference(case):
    cached, new, h, hkv, d, bs, dtype, causal, window, softcap = case
    kc, vc, table = _pool(cached, new, hkv, d, bs, dtype)
    n = sum(new)
    q, k, v = _rand(n, h, d, dtype=dtype), _rand(n, hkv, d, dtype=dtype), _rand(n, hkv, d, dtype=dtype)
    cu, lens = _cu(new), torch.tensor(cached, dtype=torch.int32)
    opts = (d ** -0.5, causal, *window, softcap)

    def run(fn, cast):
        c = [cast(t) for t in (q, kc, vc, k, v)]
        return fn(c[0], c[1], c[2], c[3], c[4], cu, lens, table, *opts), c[1], c[2]

    got, kc_got, vc_got = run(OP, lambda t: t.clone())
    low, _, _ = run(ref.flash_attn_varlen_kvcache, lambda t: t.clone())
    exact, kc_ref, vc_ref = run(ref.flash_attn_varlen_kvcache, lambda t: t.double())
    for name, g, lo, e in zip(("out", "lse"), got, low, exact):
        assert_flash_rule(name, g, lo, e)
    # The new tokens were written in place, exactly, and nothing else changed.
    torch.testing.assert_close(kc_got.double(), kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc_got.double(), vc_ref, rtol=0, atol=0, equal_nan=True)
    # Key-major keys (the engine's CPU cache): the same results bit for bit, the same append.
    km, kc_km, _ = run(OP, lambda t: key_major(t) if t is kc else t.clone())
    for g, k_ in zip(got, km):
        assert torch.equal(g, k_)
    torch.testing.assert_close(kc_km.double(), kc_ref, rtol=0, atol=0, equal_nan=True)
    # q, k, v as column ranges of one (tokens, qkv) buffer, as the C++ decoder step passes them: read in place
    packed = torch.cat([t.flatten(1) for t in (q, k, v)], 1)
    parts = packed.split([h * d, hkv * d, hkv * d], 1)
    strided = OP(parts[0].unflatten(1, (h, d)), kc.clone(), vc.clone(), parts[1].unflatten(1, (hkv, d)),
                 parts[2].unflatten(1, (hkv, d)), cu, lens, table, *opts)
    assert parts[0].unflatten(1, (h, d)).stride(0) == packed.shape[1]
    for g, st in zip(got, strided):
        assert torch.equal(g, st)


def _step(q, kc, vc, k, v, new, cached, table, window=(-1, -1)):
    return OP(q, kc, vc, k, v, _cu(new), torch.tensor(cached, dtype=torch.int32), table, 0.125, True, *window, 0.0)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("dtype,window", [(F32, (-1, -1)), (BF16, (70, -1))])
def test_bitwise_batch_invariant(dtype, window, threads):
    """Each sequence alone (its blocks in another order) equals its rows of the batch, bit for bit, whatever the
    thread count: alone, a decode token over a short cache (200 keys, one split) has its kv heads shared out over
    the threads; in the batch it does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_batch_invariant(dtype, window)
    finally:
        torch.set_num_threads(before)


def _check_batch_invariant(dtype, window):
    cached, new, h, hkv, d = [0, 700, 5, 1300, 200], [97, 1, 1, 40, 1], 8, 4, 64
    kc, vc, table = _pool(cached, new, hkv, d, 64, dtype)
    n = sum(new)
    q, k, v = _rand(n, h, d, dtype=dtype), _rand(n, hkv, d, dtype=dtype), _rand(n, hkv, d, dtype=dtype)
    out, lse = _step(q, kc.clone(), vc.clone(), k, v, new, cached, table, window)
    cu = _cu(new).tolist()
    for b in range(len(new)):
        rows = slice(cu[b], cu[b + 1])
        one_k, one_v, one_table = _pool([cached[b]], [new[b]], hkv, d, 64, dtype)
        # the same cached keys, now in this sequence's own (differently ordered) blocks
        src = ref.cache_positions(table, b, cached[b], 64)
        dst = ref.cache_positions(one_table, 0, cached[b], 64)
        one_k[dst], one_v[dst] = kc[src], vc[src]
        o1, l1 = _step(q[rows], one_k, one_v, k[rows], v[rows], [new[b]], [cached[b]], one_table, window)
        assert torch.equal(o1, out[rows]) and torch.equal(l1, lse[:, rows]), f"sequence {b} differs alone"


def test_chunks_and_single_tokens_equal_one_prefill():
    """A 300-token prompt in one call, in chunks of 128 / 100 / 72, and one token at a time: the same bits."""
    h, hkv, d, n = 4, 2, 64, 300
    q, k, v = _rand(n, h, d, dtype=F32), _rand(n, hkv, d, dtype=F32), _rand(n, hkv, d, dtype=F32)
    kc, vc, table = _pool([0], [n], hkv, d, 64, F32)
    whole, whole_lse = _step(q, kc.clone(), vc.clone(), k, v, [n], [0], table)
    for chunks in ([128, 100, 72], [1] * n):
        kcc, vcc = kc.clone(), vc.clone()
        outs, lses, start = [], [], 0
        for c in chunks:
            rows = slice(start, start + c)
            o, lse = _step(q[rows], kcc, vcc, k[rows], v[rows], [c], [start], table)
            outs.append(o)
            lses.append(lse)
            start += c
        assert torch.equal(torch.cat(outs), whole) and torch.equal(torch.cat(lses, 1), whole_lse)


def test_without_new_tokens_and_trailing_rows():
    """k, v absent: queries attend the cache as it is. Rows past cu_seqlens_q[-1] give 0 and lse -inf."""
    kc, vc, table = _pool([50, 20], [0, 0], 2, 64, 16, F32)
    q = _rand(5, 4, 64, dtype=F32)
    out, lse = OP(q, kc, vc, None, None, _cu([2, 1]), torch.tensor([50, 20], dtype=torch.int32), table, 0.125, True,
                  -1, -1, 0.0)
    exact = ref.flash_attn_varlen_kvcache(q.double(), kc.double(), vc.double(), None, None, _cu([2, 1]),
                                          torch.tensor([50, 20], dtype=torch.int32), table, 0.125, True, -1, -1, 0.0)
    torch.testing.assert_close(out.double(), exact[0], rtol=0, atol=1e-5)
    assert torch.equal(out[3:], torch.zeros_like(out[3:])) and torch.isneginf(lse[:, 3:]).all()


def test_public_function_and_opcheck():
    kc, vc, table = _pool([5, 30], [2, 3], 2, 16, 16, F32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    q, k, v = _rand(5, 4, 16, dtype=F32), _rand(5, 2, 16, dtype=F32), _rand(5, 2, 16, dtype=F32)
    lens = torch.tensor([5, 30], dtype=torch.int32)
    out, lse = flash_attn_varlen_with_kvcache(q, kc.clone(), vc.clone(), k, v, cu_seqlens_q=_cu([2, 3]),
                                              cache_seqlens=lens, block_table=table, return_lse=True)
    want = OP(q, kc.clone(), vc.clone(), k, v, _cu([2, 3]), lens, table, 0.25, True, -1, -1, 0.0)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    opcheck(OP.default, (q, kc, vc, k, v, _cu([2, 3]), lens, table, 0.25, True, -1, -1, 0.0))


def _bad(**change):
    kc, vc, table = _pool([5, 30], [2, 3], 2, 64, 16, F32)
    args = dict(q=torch.randn(5, 4, 64), k_cache=kc, v_cache=vc, k=torch.randn(5, 2, 64), v=torch.randn(5, 2, 64),
                cu_seqlens_q=_cu([2, 3]), cache_seqlens=torch.tensor([5, 30], dtype=torch.int32), block_table=table)
    args.update(change)
    q, kc, vc, k, v = (args.pop(n) for n in ("q", "k_cache", "v_cache", "k", "v"))
    return lambda: flash_attn_varlen_with_kvcache(q, kc, vc, k, v, **args)


@pytest.mark.parametrize("make,error,match", [
    (_bad(q=torch.randn(1, 5, 4, 64)), ValueError, "q must be 3-D"),
    (_bad(k=torch.randn(4, 2, 64), v=torch.randn(4, 2, 64)), ValueError, "total_tokens=5"),
    (_bad(cu_seqlens_q=_cu([2, 3]).long()), ValueError, "cu_seqlens_q must be int32"),
    (_bad(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32)), RuntimeError, "non-decreasing"),
    (_bad(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)), RuntimeError, r"cu_seqlens_q\[0\] must be 0"),
    (_bad(block_table=None), ValueError, "block_table is required"),
    (_bad(cache_seqlens=torch.tensor([5], dtype=torch.int32)), ValueError, "cache_seqlens must be int32 of shape"),
    (_bad(cache_seqlens=torch.tensor([5, 70], dtype=torch.int32)), RuntimeError, "needs 5 blocks but block_table"),
    (_bad(k=torch.randn(5, 2, 64).to(BF16), v=torch.randn(5, 2, 64).to(BF16)), ValueError, "dtype"),
])
def test_bad_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
