"""Shared checks of attention kernels (Triton under the interpreter, Triton and CUDA C++ on a GPU).

The FlashAttention rule: against the float64 reference, a kernel's max error is at most twice the max error of
the same attention written in eager PyTorch at the kernel's precision, plus a small floor.
"""
import math

import torch

from flashgen.kernels import reference


def randn(*shape, dtype, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def eager_attention(q, k, v, scale, causal, window, softcap):
    """Plain attention in the inputs' dtype (scores, P and P @ V rounded to it; softmax in float32): the
    precision baseline of the FlashAttention rule. One dense batch (B, S, H, D); returns out and lse."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = reference.attention_mask(q.shape[1], k.shape[1], causal, *window, device=q.device)
    s = s.float().masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return (p @ vh).transpose(1, 2), lse


def eager_grads(q, k, v, dout, scale, causal, window, softcap):
    """eager_attention's out, lse and (dq, dk, dv) by autograd, all at the inputs' precision."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = eager_attention(*leaves, scale, causal, window, softcap)
    out.backward(dout)
    return out.detach(), lse, [t.grad for t in leaves]


def assert_fa_rule(name, got, ref, baseline, given=0.0):
    """max|got - ref| <= 2 max|baseline - ref| + floor + given (floor: one epsilon of got's dtype at the larger
    of 1 and max|ref|; four for float32, where eager's own error is a few epsilons and a split-K merge adds one or
    two roundings; given: the error the kernel's inputs bring, see assert_grads), with ref in float64; no NaN
    anywhere."""
    assert not got.isnan().any(), f"{name}: NaN (unwritten or invalid elements)"
    err = (got.double() - ref).abs().max().item()
    base = (baseline.double() - ref).abs().max().item()
    eps = torch.finfo(got.dtype).eps * (4 if got.dtype == torch.float32 else 1)
    floor = eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * base + floor + given, f"{name}: error {err:.3g} vs eager {base:.3g}"


def assert_grads(grads, ref_grads, base_grads, lse, ref_lse):
    """The rule for (dq, dk, dv) from a backward given the forward's float32 lse. It recomputes P = exp(S - lse),
    so an lse off by e scales that row's P, and so its share of every gradient, by about 1 - e; eager autograd
    never rounds an lse. The allowance is max|lse - ref_lse| (held to the rule by assert_lse) times max|ref|: in
    float32 it is the size of eager's own error (one failing case's dk came to 0.6 of its bound when the backward was
    given the float64 lse rounded to float32), in 16-bit it is negligible.
    """
    e = lse_err(lse, ref_lse)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_fa_rule(name, g, r, b, given=e * r.abs().max().item())


def lse_err(baseline, ref):
    finite = ~torch.isinf(ref)
    return (baseline.double() - ref)[finite].abs().max().item() if finite.any() else 0.0


def assert_lse(got, ref, baseline):
    """Rows that attend nothing are -inf in both; the others within 2x the eager error (+ a float32 floor)."""
    empty = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), empty) and (got[empty] < 0).all(), "lse: -inf rows differ"
    err = (got.double() - ref)[~empty].abs().max().item() if (~empty).any() else 0.0
    base = lse_err(baseline, ref)
    assert err <= 2 * base + 1e-5, f"lse: error {err:.3g} vs eager {base:.3g}"


def key_major(cache):
    """A copy of a (blocks or batch, tokens, kv_heads, head_dim) cache whose memory is (.., kv_heads, head_dim,
    tokens), as the engine's CPU cache holds its keys."""
    return cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def paged_cache(batch, capacity, block_size, kv_heads, head_dim, dtype, device="cpu", keys_key_major=False):
    """k/v caches with spare blocks and a random block table (blocks scattered, not 0..n)."""
    per_seq = math.ceil(capacity / block_size)
    num_blocks = batch * per_seq + 3
    k_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, device=device)[: batch * per_seq].view(batch, per_seq).int()
    return key_major(k_cache) if keys_key_major else k_cache, v_cache, block_table


def cached(cache, b, length, block_table):
    """The first `length` tokens of sequence b of a contiguous or paged cache, as (length, kv_heads, D)."""
    if block_table is None:
        return cache[b, :length]
    return cache[reference.cache_positions(block_table, b, length, cache.shape[1])]


def kvcache_baseline(q, k_cache, v_cache, lengths, block_table, scale, window, softcap):
    """eager_attention of each decode/chunked-prefill row over its cache (after the append): out, lse."""
    outs = [eager_attention(q[b:b + 1], cached(k_cache, b, n, block_table)[None],
                            cached(v_cache, b, n, block_table)[None], scale, True, window, softcap)
            for b, n in enumerate(lengths)]
    return torch.cat([o for o, _ in outs]), torch.cat([l for _, l in outs])


# (cached lengths, new rows per sequence, heads, kv_heads, head_dim, block_size, window, softcap, dtype)
VARLEN_DECODE = [
    ([0, 37, 300], [19, 1, 1], 4, 2, 64, 16, (-1, -1), 0.0, torch.float32),
    ([5, 0], [3, 40], 6, 1, 40, 32, (8, -1), 5.0, torch.float16),
    ([700, 2], [1, 0], 4, 4, 96, 16, (-1, -1), 0.0, torch.bfloat16),
]


def check_varlen_kvcache(fn, lens, new, heads, kv_heads, head_dim, block_size, window, softcap, dtype, poisoned,
                         device="cpu", keys_key_major=False):
    """fn (a flash_attn_varlen_kvcache kernel) on packed prefill chunks and decodes over a paged cache, plus two
    trailing rows past the last sequence: the in-place append exact, out and lse by the FlashAttention rule."""
    batch, total = len(lens), sum(new)
    k_cache, v_cache, block_table = paged_cache(batch, max(a + b for a, b in zip(lens, new)) + 5, block_size,
                                                kv_heads, head_dim, dtype, device, keys_key_major)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = randn(total + 2, heads, head_dim, dtype=dtype, device=device)  # two trailing rows past the last sequence
    k, v = (randn(total + 2, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    opts = (head_dim ** -0.5, True, *window, softcap)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    ref_out, ref_lse = reference.flash_attn_varlen_kvcache(q.double(), ref_k, ref_v, k.double(), v.double(), cu,
                                                           cache_seqlens, block_table, *opts)
    with poisoned():
        out, lse = fn(q, k_cache, v_cache, k, v, cu, cache_seqlens, block_table, *opts)
    assert torch.equal(k_cache.double(), ref_k) and torch.equal(v_cache.double(), ref_v), "in-place append"
    outs, lses = [], []
    for b in range(batch):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        n = lens[b] + new[b]
        o, l_ = eager_attention(q[rows][None], cached(k_cache, b, n, block_table)[None],
                                cached(v_cache, b, n, block_table)[None], opts[0], True, window, softcap)
        outs.append(o[0])
        lses.append(l_[0])
    base_out = torch.cat(outs + [torch.zeros_like(q[total:])])
    base_lse = torch.cat(lses + [torch.full((heads, 2), float("-inf"), device=device)], 1)
    assert_fa_rule("out", out, ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)
