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


def assert_fa_rule(name, got, ref, baseline):
    """max|got - ref| <= 2 max|baseline - ref| + floor (one epsilon of got's dtype at the larger of 1 and
    max|ref|), with ref in float64; no NaN anywhere."""
    assert not got.isnan().any(), f"{name}: NaN (unwritten or invalid elements)"
    err = (got.double() - ref).abs().max().item()
    base = (baseline.double() - ref).abs().max().item()
    floor = torch.finfo(got.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} vs eager {base:.3g}"


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


def paged_cache(batch, capacity, block_size, kv_heads, head_dim, dtype, device="cpu"):
    """k/v caches with spare blocks and a random block table (blocks scattered, not 0..n)."""
    per_seq = math.ceil(capacity / block_size)
    num_blocks = batch * per_seq + 3
    k_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, device=device)[: batch * per_seq].view(batch, per_seq).int()
    return k_cache, v_cache, block_table


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
