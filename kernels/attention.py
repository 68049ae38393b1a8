"""FlashAttention-style attention: the public functions over flashgen::flash_attn_{fwd,bwd,kvcache}.

The argument names and defaults follow FlashAttention (flash_attn_func, flash_attn_varlen_func,
flash_attn_with_kvcache), so code written for it switches with no surprises; the options after q, k, v are
keyword-only, so a positional call written for FlashAttention's order fails loudly instead of mixing them up.

Math (per sequence, per q head h and its kv head h // (heads / kv_heads)):
    s_ij = scale * q_i . k_j                      (softcap > 0: s_ij = softcap * tanh(s_ij / softcap))
    lse_i = log sum_{j allowed} exp(s_ij),   out_i = sum_{j allowed} exp(s_ij - lse_i) v_j
Query i of a sequence with lengths (seqlen_q, seqlen_k) sits at key position p_i = i + seqlen_k - seqlen_q
(aligned bottom-right) and attends key j iff p_i - window_left <= j <= p_i + window_right (a negative window
side is unbounded); causal=True means window_right = 0. With seqlen_q = 2, seqlen_k = 5, causal:
    1 1 1 1 0
    1 1 1 1 1
and with seqlen_q = 5, seqlen_k = 2, causal (the first rows attend nothing):
    0 0
    0 0
    0 0
    1 0
    1 1
A row that attends no key gives out = 0 and lse = -inf. No gradient flows through lse.

Kernels: CPU C++ (float32, bfloat16, float16; computed in float32), Triton / CUDA C++ on NVIDIA GPUs, and the
PyTorch reference elsewhere. Head dims 8..256.
"""
import torch

from . import ops  # noqa: F401  (declares torch.ops.flashgen.flash_attn_*)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 8


def _check(cond, msg):
    """Raise ValueError(msg()) unless cond; msg is a lambda so the message is only formatted on failure
    (these checks run on every decode step)."""
    if not cond:
        raise ValueError(msg())


def _check_same(named):
    """Every tensor in `named` ({name: tensor}) is float16/bfloat16/float32 with one dtype and one device."""
    (n0, t0), *rest = named.items()
    _check(t0.dtype in _DTYPES, lambda: f"{n0} must be float16, bfloat16 or float32, got {t0.dtype}")
    for n, t in rest:
        _check(t.dtype == t0.dtype, lambda: f"{n} has dtype {t.dtype} but {n0} has {t0.dtype}: they must match")
        _check(t.device == t0.device,
               lambda: f"{n} is on device {t.device} but {n0} is on {t0.device}: they must match")


def _check_heads(q, k, v, kv_name="k"):
    d = q.shape[-1]
    _check(MIN_HEAD_DIM <= d <= MAX_HEAD_DIM, lambda: f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")
    _check(k.shape == v.shape,
           lambda: f"{kv_name} and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check(k.shape[-1] == d, lambda: f"{kv_name} head_dim {k.shape[-1]} differs from q head_dim {d}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    _check(kv_heads > 0 and heads % kv_heads == 0,
           lambda: f"q heads ({heads}) must be a multiple of {kv_name} heads ({kv_heads}) (GQA / MQA)")


def _options(q, softmax_scale, causal, window_size, softcap):
    _check(len(window_size) == 2, lambda: f"window_size must be (left, right), got {window_size}")
    _check(softcap >= 0, lambda: f"softcap must be >= 0 (0 disables it), got {softcap}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return scale, bool(causal), int(window_size[0]), int(window_size[1]), float(softcap)


def _eager():
    """Value checks that read tensor contents (host sync) run only outside torch.compile tracing and CUDA graph
    capture."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (torch.compiler.is_compiling() or capturing)


def flash_attn_func(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                    return_lse=False):
    """Attention over a batch of equal-length sequences, differentiable in q, k, v.

    Args:
        q: (batch, seqlen_q, heads, head_dim).
        k, v: (batch, seqlen_k, kv_heads, head_dim); heads must be a multiple of kv_heads (GQA / MQA).
        causal: mask keys after each query's position (aligned bottom-right when seqlen_q != seqlen_k).
        softmax_scale: default 1 / sqrt(head_dim).
        window_size: (left, right) sliding window; -1 is unbounded on that side.
        softcap: > 0 applies s = softcap * tanh(s / softcap) to the scaled scores.
        return_lse: also return the log-sum-exp of each row.
    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype, and with return_lse the lse, float32
        (batch, heads, seqlen_q).
    """
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
           lambda: f"q, k, v must be (batch, seqlen, heads, head_dim), got {q.dim()}-D, {k.dim()}-D and {v.dim()}-D")
    _check_same({"q": q, "k": k, "v": v})
    _check_heads(q, k, v)
    _check(k.shape[0] == q.shape[0], lambda: f"k batch {k.shape[0]} differs from q batch {q.shape[0]}")
    out, lse = torch.ops.flashgen.flash_attn_fwd(q, k, v, None, None, q.shape[1], k.shape[1],
                                                 *_options(q, softmax_scale, causal, window_size, softcap))
    return (out, lse) if return_lse else out


def _check_cu_seqlens(name, cu, total, batch=None):
    _check(isinstance(cu, torch.Tensor), lambda: f"{name} must be a tensor, got {type(cu).__name__}")
    _check(cu.dtype == torch.int32 and cu.dim() == 1 and cu.numel() >= 1,
           lambda: f"{name} must be a 1-D int32 tensor (batch + 1,), got {cu.dtype} of shape {tuple(cu.shape)}")
    if batch is not None:
        _check(cu.numel() == batch + 1, lambda: f"{name} has {cu.numel()} entries, cu_seqlens_q has {batch + 1}")
    if _eager():
        c = cu.cpu()
        _check(int(c[0]) == 0 and bool((c[1:] >= c[:-1]).all()) and int(c[-1]) <= total,
               lambda: f"{name} must start at 0, be non-decreasing and end at most at the {total} packed tokens")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           softmax_scale=None, window_size=(-1, -1), softcap=0.0, return_lse=False):
    """Attention over packed sequences of different lengths, differentiable in q, k, v.

    Args:
        q: (total_q, heads, head_dim), the batch's queries packed one sequence after the other.
        k, v: (total_k, kv_heads, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), cumulative lengths from 0: sequence b holds
            q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and k/v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (used by GPU kernels for their grid).
        causal, softmax_scale, window_size, softcap, return_lse: as in flash_attn_func, per sequence.
    Returns:
        out (total_q, heads, head_dim), and with return_lse the lse, float32 (heads, total_q).
    """
    _check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3,
           lambda: f"q, k, v must be (total_tokens, heads, head_dim), got {q.dim()}-D, {k.dim()}-D and {v.dim()}-D")
    _check_same({"q": q, "k": k, "v": v})
    _check_heads(q, k, v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.numel() - 1)
    _check(cu_seqlens_q.device == q.device and cu_seqlens_k.device == q.device,
           lambda: f"cu_seqlens_q / cu_seqlens_k must be on q's device {q.device}")
    out, lse = torch.ops.flashgen.flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                 int(max_seqlen_k),
                                                 *_options(q, softmax_scale, causal, window_size, softcap))
    return (out, lse) if return_lse else out


def _check_cache(q, k_cache, k, cache_seqlens, block_table, contents=True):
    """Shapes of a contiguous or paged cache and its block table; on GPUs (outside compile, unless contents is
    False) also the contents."""
    batch = q.shape[0]
    _check(cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (batch,),
           lambda: f"cache_seqlens must be int32 of shape ({batch},), got {cache_seqlens.dtype} "
                   f"{tuple(cache_seqlens.shape)}")
    _check(cache_seqlens.device == q.device, lambda: f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}")
    if k is not None:
        _check(k.dim() == 4 and k.shape[0] == batch and k.shape[2:] == k_cache.shape[2:],
               lambda: f"k must be (batch={batch}, seqlen_new, kv_heads={k_cache.shape[2]}, "
                       f"head_dim={k_cache.shape[3]}), got {tuple(k.shape)}")
    if block_table is None:
        _check(k_cache.shape[0] >= batch, lambda: f"k_cache holds {k_cache.shape[0]} sequences, q has batch {batch}")
    else:
        block_size = k_cache.shape[1]
        _check(block_size % 16 == 0, lambda: f"paged k_cache block_size must be a multiple of 16, got {block_size}")
        _check(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
               lambda: f"block_table must be int32 (batch={batch}, max_blocks), got {block_table.dtype} "
                       f"{tuple(block_table.shape)}")
        _check(block_table.device == q.device, lambda: f"block_table is on {block_table.device}, q on {q.device}")
    # The CPU kernel checks lengths and block indices itself (cheaply, in C++); GPU kernels don't.
    if contents and q.device.type != "cpu" and batch > 0 and _eager():
        check_cache_contents(k_cache, cache_seqlens, block_table, k.shape[1] if k is not None else 0)


def check_cache_contents(k_cache, cache_seqlens, block_table, n_new):
    """Every sequence's cache_seqlens + n_new tokens fit its cache, and the blocks it uses exist (a host sync)."""
    lens = cache_seqlens.cpu()
    block_size = k_cache.shape[1]
    capacity = block_size * block_table.shape[1] if block_table is not None else k_cache.shape[1]
    _check(int(lens.min()) >= 0, lambda: "cache_seqlens must be >= 0")
    _check(int(lens.max()) + n_new <= capacity,
           lambda: f"the cache is too small: cache_seqlens.max() = {int(lens.max())} plus {n_new} new tokens "
                   f"exceeds its capacity of {capacity} tokens per sequence")
    if block_table is not None:
        table = block_table.cpu()
        used = (lens + n_new + block_size - 1) // block_size
        bad = (torch.arange(table.shape[1]) < used.unsqueeze(1)) & ((table < 0) | (table >= k_cache.shape[0]))
        _check(not bool(bad.any()),
               lambda: f"block_table has entries outside [0, {k_cache.shape[0]}) (num_blocks) among the blocks in "
                       f"use, e.g. {table[bad][:4].tolist()}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                            causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0, num_splits=0,
                            return_lse=False):
    """Decode / chunked prefill against a KV cache (inference only: no gradient).

    When k, v are given they are first written into the cache in place, at positions
    cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of sequence b; each sequence then attends its first
    cache_seqlens[b] + seqlen_new cache tokens, the queries aligned bottom-right (the last query is the last
    token). cache_seqlens is not updated: the caller advances it.

    Args:
        q: (batch, seqlen_q, heads, head_dim).
        k_cache, v_cache: contiguous (batch_cache >= batch, seqlen_cache, kv_heads, head_dim), row b for sequence
            b; or, with block_table, paged (num_blocks, block_size, kv_heads, head_dim), block_size a multiple
            of 16. Any strides with head_dim contiguous; k_cache may instead be contiguous in its tokens
            (key-major, as the engine's CPU cache: the CPU and Triton kernels take it).
        k, v: optional new tokens (batch, seqlen_new, kv_heads, head_dim).
        cache_seqlens: int32 (batch,) (or an int for all) tokens already in the cache.
        block_table: int32 (batch, max_blocks): cache token t of sequence b lives in block block_table[b, t //
            block_size] at row t % block_size.
        causal, softmax_scale, window_size, softcap: as in flash_attn_func.
        num_splits: how many chunks a long cache is split into (each reduced separately and merged with their
            lse, flash-decoding); 0 lets the kernel choose.
        return_lse: also return the lse, float32 (batch, heads, seqlen_q).
    Returns:
        out (batch, seqlen_q, heads, head_dim) (and the lse with return_lse).
    """
    _check(q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4,
           lambda: f"q, k_cache, v_cache must be 4-D, got {q.dim()}-D, {k_cache.dim()}-D and {v_cache.dim()}-D")
    _check((k is None) == (v is None), lambda: "give both k and v (new tokens) or neither")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if k is not None:
        tensors.update(k=k, v=v)
        _check(k.shape == v.shape,
               lambda: f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_same(tensors)
    _check_heads(q, k_cache, v_cache, kv_name="k_cache")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_cache(q, k_cache, k, cache_seqlens, block_table)
    _check(num_splits >= 0, lambda: f"num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    out, lse = torch.ops.flashgen.flash_attn_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                                     *_options(q, softmax_scale, causal, window_size, softcap),
                                                     int(num_splits))
    return (out, lse) if return_lse else out


def flash_attn_varlen_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cu_seqlens_q, cache_seqlens, block_table,
                                   causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                                   return_lse=False):
    """Packed variable-length sequences against a paged KV cache (a serving step: prefill chunks and decodes
    in one call; inference only).

    Sequence b owns the query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1. When k, v are given, their same
    rows are first written into the cache in place at positions cache_seqlens[b] .. of sequence b, and the
    sequence attends its first cache_seqlens[b] + n_b cache tokens (n_b its number of rows), queries aligned
    bottom-right, so a prefill chunk is causal over the cached prefix and itself. cache_seqlens is not updated.
    On the CPU, long caches are split at fixed key positions, so a query's result depends only on its own
    sequence (bitwise the same whatever else is in the batch, and however the sequence was chunked).

    Args:
        q: (total_tokens, heads, head_dim).
        k_cache, v_cache: paged (num_blocks, block_size, kv_heads, head_dim), block_size a multiple of 16;
            strided as in flash_attn_with_kvcache.
        k, v: optional new tokens (total_tokens, kv_heads, head_dim), one per query row.
        cu_seqlens_q: int32 (batch + 1,), cu_seqlens_q[0] = 0, non-decreasing; rows past the last are ignored
            (out 0, lse -inf).
        cache_seqlens: int32 (batch,) tokens already in the cache.
        block_table: int32 (batch, max_blocks): cache token t of sequence b lives in block block_table[b, t //
            block_size] at row t % block_size.
        causal, softmax_scale, window_size, softcap: as in flash_attn_func.
        return_lse: also return the lse, float32 (heads, total_tokens).
    Returns:
        out (total_tokens, heads, head_dim) (and the lse with return_lse).
    """
    _check(q.dim() == 3 and k_cache.dim() == 4 and v_cache.dim() == 4,
           lambda: f"q must be 3-D (total_tokens, heads, head_dim) and k_cache, v_cache 4-D (num_blocks, "
                   f"block_size, kv_heads, head_dim), got {q.dim()}-D, {k_cache.dim()}-D and {v_cache.dim()}-D")
    _check((k is None) == (v is None), lambda: "give both k and v (new tokens) or neither")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if k is not None:
        tensors.update(k=k, v=v)
        _check(k.shape == v.shape and k.dim() == 3 and k.shape[0] == q.shape[0] and k.shape[1:] == k_cache.shape[2:],
               lambda: f"k and v must be (total_tokens={q.shape[0]}, kv_heads={k_cache.shape[2]}, "
                       f"head_dim={k_cache.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_same(tensors)
    _check_heads(q, k_cache, v_cache, kv_name="k_cache")
    _check(cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.dim() == 1 and cu_seqlens_q.shape[0] >= 1,
           lambda: f"cu_seqlens_q must be int32 (batch + 1,), got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    _check(cu_seqlens_q.device == q.device, lambda: f"cu_seqlens_q is on {cu_seqlens_q.device}, q on {q.device}")
    _check(block_table is not None, lambda: "block_table is required (the cache is paged)")
    _check_cache(q.new_empty(batch, 1, 1, 1), k_cache, None, cache_seqlens, block_table, contents=False)
    if q.device.type != "cpu" and batch > 0 and _eager():
        total = cache_seqlens if k is None else cache_seqlens + cu_seqlens_q.diff().to(torch.int32)
        check_cache_contents(k_cache, total, block_table, 0)
    out, lse = torch.ops.flashgen.flash_attn_varlen_kvcache(
        q, k_cache, v_cache, k, v, cu_seqlens_q, cache_seqlens, block_table,
        *_options(q, softmax_scale, causal, window_size, softcap))
    return (out, lse) if return_lse else out
