"""Plain PyTorch reference of every flashgen op.

These are the oracle in tests (called on float64 inputs) and the fallback kernel on devices that have no
flashgen kernel. Statistics are computed in float32 at least, outputs returned in the input dtype.
"""
import torch

from . import ggml


def _stat_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- activations
def silu_mul_fwd(gate, up):
    """y = silu(gate) * up = gate * sigmoid(gate) * up (SwiGLU's gating), in float32 at least."""
    f = _stat_dtype(gate)
    g = gate.to(f)
    return (g * torch.sigmoid(g) * up.to(f)).to(gate.dtype).contiguous()


def silu_mul_bwd(dy, gate, up):
    """With s = sigmoid(gate): dup = dy * gate * s;  dgate = dy * up * s * (1 + gate * (1 - s))."""
    f = _stat_dtype(gate)
    g, u, d = gate.to(f), up.to(f), dy.to(f)
    s = torch.sigmoid(g)
    return ((d * u * s * (1 + g * (1 - s))).to(gate.dtype).contiguous(), (d * g * s).to(up.dtype).contiguous())


# ---------------------------------------------------------------- rotary embedding
def rotary(x, cos, sin, backward):
    """Rotate-half rotary embedding of x (B, S, H, D) by cos, sin (B or 1, S, R), R <= D even, h = R / 2:
    y[:h] = x[:h] cos[:h] - x[h:R] sin[:h],  y[h:R] = x[h:R] cos[h:R] + x[:h] sin[h:R],  y[R:] = x[R:].
    backward: the transpose, dx from dy: dx[:h] = dy[:h] cos[:h] + dy[h:R] sin[h:R],
    dx[h:R] = dy[h:R] cos[h:R] - dy[:h] sin[:h]."""
    f = _stat_dtype(x)
    r = cos.shape[-1]
    h = r // 2
    xf, c, s = x.to(f), cos.to(f)[:, :, None], sin.to(f)[:, :, None]
    x1, x2 = xf[..., :h], xf[..., h:r]
    if backward:
        y1, y2 = x1 * c[..., :h] + x2 * s[..., h:], x2 * c[..., h:] - x1 * s[..., :h]
    else:
        y1, y2 = x1 * c[..., :h] - x2 * s[..., :h], x2 * c[..., h:] + x1 * s[..., h:]
    return torch.cat([y1, y2, xf[..., r:]], -1).to(x.dtype).contiguous()


# ---------------------------------------------------------------- fused linear cross-entropy
def _logits(hidden, weight, bias):
    f = _stat_dtype(hidden)
    z = hidden.to(f) @ weight.to(f).T
    return z + bias.to(f) if bias is not None else z


def linear_cross_entropy_fwd(hidden, weight, bias, target, ignore_index):
    """Per row n with z = hidden @ weight.T + bias: lse_n = logsumexp(z_n), loss_n = lse_n - z_n[target_n]
    (0 where target_n == ignore_index). Both float32 (float64 for float64 hidden), shape (N,)."""
    z = _logits(hidden, weight, bias)
    lse = torch.logsumexp(z, -1)
    valid = target != ignore_index
    picked = z.gather(-1, torch.where(valid, target, 0)[:, None]).squeeze(-1)
    return torch.where(valid, lse - picked, 0).contiguous(), lse.contiguous()


def linear_cross_entropy_bwd(dloss, hidden, weight, bias, target, lse, ignore_index):
    """With g_n = dloss_n (0 for ignored rows) and dz = g (softmax(z) - onehot(target)):
    dhidden = dz @ weight, dweight = dz.T @ hidden, dbias = sum_rows(dz) (empty without a bias)."""
    z = _logits(hidden, weight, bias)
    valid = target != ignore_index
    g = torch.where(valid, dloss.to(z.dtype), 0)[:, None]
    dz = torch.exp(z - lse.to(z.dtype)[:, None]) * g
    dz.scatter_add_(-1, torch.where(valid, target, 0)[:, None], -g)
    dbias = dz.sum(0).to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return ((dz @ weight.to(z.dtype)).to(hidden.dtype).contiguous(), (dz.T @ hidden.to(z.dtype)).to(weight.dtype),
            dbias)


# ---------------------------------------------------------------- norms
def rms_norm_fwd(x, weight, residual, eps, weight_offset):
    """h = x + residual (when given); y = h / sqrt(mean(h^2) + eps) * w', w' = 1 + w if weight_offset else w.

    Returns (y, h or an empty tensor when there is no residual, rstd float32 of shape x.shape[:-1]).
    """
    h = x + residual if residual is not None else x
    hf = h.to(_stat_dtype(x))
    rstd = torch.rsqrt(hf.square().mean(-1) + eps)
    y = hf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * (weight.to(hf.dtype) + 1 if weight_offset else weight.to(hf.dtype))
    h_out = h.contiguous() if residual is not None else x.new_empty(0)  # x + residual: a new tensor
    return y.to(x.dtype).contiguous(), h_out, rstd.to(_stat_dtype(x)).contiguous()


def rms_norm_bwd(dy, dh, h, weight, rstd, weight_offset):
    """With n = h * rstd and w' the effective weight:
    dh_total = rstd * (g - n * mean(g * n)) + dh, where g = dy * w';  dweight = sum_rows(dy * n).
    """
    f = _stat_dtype(h)
    hf, dyf, r = h.to(f), dy.to(f), rstd.to(f).unsqueeze(-1)
    n = hf * r
    g = dyf
    if weight is not None:
        g = dyf * (weight.to(f) + 1 if weight_offset else weight.to(f))
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(f)
    dw = (dyf * n).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    return dx.to(h.dtype).contiguous(), dw


def layer_norm_fwd(x, weight, bias, residual, eps):
    """h = x + residual (when given); y = (h - mean(h)) / sqrt(var(h) + eps) * w + b (biased variance).

    Returns (y, h or empty, mean float32, rstd float32), the statistics of shape x.shape[:-1].
    """
    h = x + residual if residual is not None else x
    hf = h.to(_stat_dtype(x))
    mean = hf.mean(-1)
    xc = hf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    if bias is not None:
        y = y + bias.to(hf.dtype)
    h_out = h.contiguous() if residual is not None else x.new_empty(0)  # x + residual: a new tensor
    return y.to(x.dtype).contiguous(), h_out, mean.contiguous(), rstd.contiguous()


def layer_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias):
    """With n = (h - mean) * rstd and g = dy * w:
    dh_total = rstd * (g - mean(g) - n * mean(g * n)) + dh;  dweight = sum_rows(dy * n);  dbias = sum_rows(dy).
    """
    f = _stat_dtype(h)
    hf, dyf, r = h.to(f), dy.to(f), rstd.to(f).unsqueeze(-1)
    n = (hf - mean.to(f).unsqueeze(-1)) * r
    g = dyf * weight.to(f) if weight is not None else dyf
    dx = r * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(f)
    rows = dyf.reshape(-1, h.shape[-1])
    dw = (dyf * n).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    db = rows.sum(0).to(weight.dtype if weight is not None else h.dtype) if has_bias else h.new_empty(0)
    return dx.to(h.dtype).contiguous(), dw, db


# ---------------------------------------------------------------- attention
def attention_mask(sq, sk, causal, window_left, window_right, device=None):
    """Bool (sq, sk): may query i attend key j? Query i sits at key position i + sk - sq (bottom-right);
    it attends j iff j >= pos - window_left (when window_left >= 0) and j <= pos + window_right (when
    window_right >= 0); causal means window_right = 0."""
    pos = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk, device=device).unsqueeze(0)
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    right = 0 if causal else window_right
    if window_left >= 0:
        ok &= j >= pos - window_left
    if right >= 0:
        ok &= j <= pos + right
    return ok


def _heads_first(t, f, groups=1):
    """(s, heads, d) -> (heads * groups, s, d) in dtype f; each kv head repeated for its group of q heads."""
    return t.transpose(0, 1).to(f).repeat_interleave(groups, 0)


def _scores(qf, kf, softmax_scale, softcap):
    s = qf @ kf.transpose(-1, -2) * softmax_scale
    return softcap * torch.tanh(s / softcap) if softcap > 0 else s


def _attn_seq(q, k, v, softmax_scale, causal, window_left, window_right, softcap):
    """One sequence: q (sq, H, D), k/v (sk, Hkv, D) -> out (sq, H, D), lse (H, sq).

    s = scale * q.k (softcapped: softcap * tanh(s / softcap)), masked; lse = log sum_j exp(s_j);
    out = sum_j exp(s_j - lse) v_j. Rows that attend no key: out = 0, lse = -inf."""
    f = _stat_dtype(q)
    g = q.shape[1] // k.shape[1]
    qf, kf, vf = _heads_first(q, f), _heads_first(k, f, g), _heads_first(v, f, g)
    mask = attention_mask(q.shape[0], k.shape[0], causal, window_left, window_right, q.device)
    s = _scores(qf, kf, softmax_scale, softcap).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - lse.unsqueeze(-1)), 0)
    return (p @ vf).transpose(0, 1).to(q.dtype), lse


def _attn_seq_bwd(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap):
    """One sequence. With P = exp(S - lse) recomputed, dV = P^T dO, dP = dO V^T, delta = rowsum(dO * O),
    dS = P * (dP - delta) (times 1 - tanh^2 with softcap), dQ = scale dS K, dK = scale dS^T Q;
    dK, dV summed over the q heads that share a kv head."""
    f = _stat_dtype(q)
    hkv, g = k.shape[1], q.shape[1] // k.shape[1]
    qf, kf, vf = _heads_first(q, f), _heads_first(k, f, g), _heads_first(v, f, g)
    dof, of = _heads_first(dout, f), _heads_first(out, f)
    mask = attention_mask(q.shape[0], k.shape[0], causal, window_left, window_right, q.device)
    s = _scores(qf, kf, softmax_scale, softcap)
    p = torch.where(mask, torch.exp(s - lse.to(f).unsqueeze(-1)), 0)
    dv = p.transpose(-1, -2) @ dof
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))
    if softcap > 0:
        ds = ds * (1 - (s / softcap) ** 2)
    dq = ds @ kf * softmax_scale
    dk = ds.transpose(-1, -2) @ qf * softmax_scale

    def per_kv_head(t):  # (H, sk, D) -> (sk, Hkv, D)
        return t.view(hkv, g, *t.shape[1:]).sum(1).transpose(0, 1)

    return dq.transpose(0, 1).to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def _sequences(t, cu_seqlens):
    """The sequences of a dense (B, S, ...) or varlen (total, ...) tensor, as a list of (S_b, ...) views."""
    if cu_seqlens is None:
        return list(t.unbind(0))
    cu = cu_seqlens.tolist()
    return [t[cu[b]:cu[b + 1]] for b in range(len(cu) - 1)]


def flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   window_left, window_right, softcap):
    """Attention per sequence (see _attn_seq). Dense q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out like q,
    lse (B, H, Sq); varlen (cu_seqlens given) q (Tq, H, D), k/v (Tk, Hkv, D) -> out like q, lse (H, Tq)."""
    opts = (softmax_scale, causal, window_left, window_right, softcap)
    res = [_attn_seq(qs, ks, vs, *opts) for qs, ks, vs in
           zip(_sequences(q, cu_seqlens_q), _sequences(k, cu_seqlens_k), _sequences(v, cu_seqlens_k))]
    lse_dtype = _stat_dtype(q)
    if cu_seqlens_q is None:
        if not res:
            return q.new_empty(q.shape), q.new_empty((0, q.shape[2], q.shape[1]), dtype=lse_dtype)
        return torch.stack([o for o, _ in res]), torch.stack([l for _, l in res]).to(lse_dtype)
    # Tokens after the last sequence (cu_seqlens_q[-1] < total) attend nothing.
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype)
    for (o, l), o_view, l_view in zip(res, _sequences(out, cu_seqlens_q),
                                      _sequences(lse.transpose(0, 1), cu_seqlens_q)):
        o_view.copy_(o)
        l_view.copy_(l.transpose(0, 1))
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, causal, window_left, window_right, softcap):
    """Gradients of flash_attn_fwd's out for q, k, v (see _attn_seq_bwd); lse as flash_attn_fwd returned it."""
    opts = (softmax_scale, causal, window_left, window_right, softcap)
    if cu_seqlens_q is None:
        lses = lse.unbind(0)
    else:
        lses = [l.transpose(0, 1) for l in _sequences(lse.transpose(0, 1), cu_seqlens_q)]
    seqs_q = [_sequences(t, cu_seqlens_q) for t in (dout, q, out)]
    seqs_k = [_sequences(t, cu_seqlens_k) for t in (k, v)]
    # zeros: varlen tokens outside every sequence get zero gradients
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    grads = [_attn_seq_bwd(do_, q_, k_, v_, o_, l_, *opts)
             for do_, q_, o_, k_, v_, l_ in zip(*seqs_q, *seqs_k, lses)]
    for (g_q, g_k, g_v), tq, tk, tv in zip(grads, _sequences(dq, cu_seqlens_q), _sequences(dk, cu_seqlens_k),
                                           _sequences(dv, cu_seqlens_k)):
        tq.copy_(g_q)
        tk.copy_(g_k)
        tv.copy_(g_v)
    return dq, dk, dv


def cache_positions(block_table, b, length, block_size):
    """(rows, offsets) addressing tokens 0..length-1 of sequence b in a paged cache (num_blocks, block_size, ...)."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[b].long()[pos // block_size], pos % block_size


def flash_attn_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal,
                       window_left, window_right, softcap, num_splits):
    """Decode / chunked prefill over a KV cache. For each sequence b: L = cache_seqlens[b]; new k/v (when given)
    are written in place at cache positions L .. L + S_new - 1, then q[b] attends the first L + S_new cache
    tokens (bottom-right aligned). Contiguous cache (B_cache, S_cache, Hkv, D) indexed by b, or paged
    (num_blocks, block_size, Hkv, D) through block_table. Returns out like q and lse (B, H, Sq)."""
    opts = (softmax_scale, causal, window_left, window_right, softcap)
    n_new = k.shape[1] if k is not None else 0
    outs, lses = [], []
    for b, start in enumerate(cache_seqlens.tolist()):
        length = start + n_new
        if block_table is None:
            where, new = (b, slice(0, length)), (b, slice(start, length))
        else:
            where = cache_positions(block_table, b, length, k_cache.shape[1])
            new = tuple(w[start:] for w in where)
        if k is not None:
            k_cache[new] = k[b]
            v_cache[new] = v[b]
        o, lse = _attn_seq(q[b], k_cache[where], v_cache[where], *opts)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_empty(q.shape), q.new_empty((0, q.shape[2], q.shape[1]), dtype=_stat_dtype(q))
    return torch.stack(outs), torch.stack(lses).to(_stat_dtype(q))


def flash_attn_varlen_kvcache(q, k_cache, v_cache, k, v, cu_seqlens_q, cache_seqlens, block_table, softmax_scale,
                              causal, window_left, window_right, softcap):
    """Packed sequences over a paged cache: sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q
    (tokens, H, D) and, when given, of k, v (tokens, Hkv, D), written at cache positions cache_seqlens[b] ..;
    its queries then attend the first cache_seqlens[b] + n_b cache tokens (n_b = its rows when k is given,
    else 0), bottom-right aligned. Returns out like q (rows past the last sequence 0) and lse (H, tokens)
    (-inf there)."""
    opts = (softmax_scale, causal, window_left, window_right, softcap)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_stat_dtype(q), device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, start in enumerate(cache_seqlens.tolist()):
        rows = slice(cu[b], cu[b + 1])
        length = start + (cu[b + 1] - cu[b] if k is not None else 0)
        where = cache_positions(block_table, b, length, k_cache.shape[1])
        if k is not None:
            new = tuple(w[start:] for w in where)
            k_cache[new] = k[rows]
            v_cache[new] = v[rows]
        out[rows], lse[:, rows] = _attn_seq(q[rows], k_cache[where], v_cache[where], *opts)
    return out, lse


# ---------------------------------------------------------------- quantized matmuls
# Canonical layouts (the reference prepack keeps them): see kernels/quant.py. Scales and offsets (float32 or
# float16) are converted to float64 before any arithmetic, so float16 ones give exactly what float32 ones of
# the same values give.
def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def int4_unpack(qweight):
    """uint8 (N, K//2) -> codes uint8 (N, K): byte j holds code 2j in its low nibble and code 2j+1 in its high."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def int4_prepack(qweight, scales, offsets, group_size):
    """The canonical tensors themselves (copies: outputs never alias inputs)."""
    return qweight.clone(), scales.clone(), offsets.clone()


def int4_dequantize(qweight, scales, offsets, group_size, out_features, in_features, dtype):
    """w[n, k] = scales[n, k//g] * q[n, k] + offsets[n, k//g] as float32 values: computed exactly (float64),
    rounded once to float32 (a fused multiply-add), then converted to dtype."""
    q = int4_unpack(qweight).to(torch.float64)
    s = scales.to(torch.float64).repeat_interleave(group_size, dim=1)
    m = offsets.to(torch.float64).repeat_interleave(group_size, dim=1)
    return (s * q + m).to(torch.float32).to(dtype)


def _linear(x, w, bias):
    f = _compute_dtype(x)
    y = x.to(f) @ w.to(f).t()
    if bias is not None:
        y = y + bias.to(f)
    return y.to(x.dtype)


def int4_linear(x, qweight, scales, offsets, group_size, out_features, bias):
    """y = x @ W^T + bias with W the dequantized int4 weight (N, K); computed in float32 (float64 for float64 x)."""
    w = int4_dequantize(qweight, scales, offsets, group_size, out_features, x.shape[-1], _compute_dtype(x))
    return _linear(x, w, bias)


def half_linear(x, weight, bias):
    """y = x @ W^T + bias for a float16 / bfloat16 W kept 16-bit: W widened exactly, in float32 (float64 for float64
    x)."""
    return _linear(x, weight, bias)


def ggml_prepack(blocks, ggml_type, in_features):
    """The GGML blocks themselves (a copy)."""
    return blocks.clone()


def ggml_dequantize(packed, ggml_type, out_features, in_features, dtype):
    """The float32 values of the blocks (kernels/ggml.py, the file's values bit for bit), converted to dtype."""
    return ggml.dequantize_rows(packed, ggml_type, in_features).to(dtype)


def ggml_linear(x, packed, ggml_type, out_features, bias):
    """y = x @ W^T + bias with W the dequantized GGML blocks (N, K); in float32 (float64 for float64 x)."""
    return _linear(x, ggml_dequantize(packed, ggml_type, out_features, x.shape[-1], _compute_dtype(x)), bias)


def int8_prepack(qweight, scales):
    """The canonical tensors themselves (copies)."""
    return qweight.clone(), scales.clone()


def int8_dequantize(qweight, scales, out_features, in_features, dtype):
    """w[n, k] = scales[n, k // (K // scales.shape[1])] * q[n, k] (per channel, or per block of 32) as float32
    values (the product rounded once), converted to dtype."""
    block = in_features // scales.shape[1]
    w = qweight.to(torch.float64) * scales.to(torch.float64).repeat_interleave(block, dim=1)
    return w.to(torch.float32).to(dtype)


def int8_linear(x, qweight, scales, out_features, bias):
    """y = x @ W^T + bias with W the dequantized int8 weight; float32 (float64 for float64 x)."""
    w = int8_dequantize(qweight, scales, out_features, x.shape[-1], _compute_dtype(x))
    return _linear(x, w, bias)


def quantize_rows_int8(x):
    """Symmetric per-row int8: amax = max|x| (float32), a = round_half_even(x * (127 / amax)) (0 where amax = 0),
    scale = amax / 127. Returns (a int8 (..., K), scale float32 (..., 1)). The float32 operations are exactly
    the ones the kernels do, so their codes are identical."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(-1, keepdim=True)
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: a true float32 division (no reciprocal shortcut)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    a = torch.round(xf * inv).clamp(-127, 127).to(torch.int8)
    return a, amax / c127


def int8_linear_dynamic(x, qweight, scales, out_features, bias):
    """W8A8: y[m, n] = sx[m] * sum_b sw[n, b] * (sum_{k in b} a[m, k] q[n, k]) + bias[n], with a, sx from
    quantize_rows_int8(x) and b the weight's scale blocks (one block for per-channel scales). The integer
    sums are exact (int32 in the kernels, exact float64 here); the result is returned in x's dtype."""
    a, sx = quantize_rows_int8(x)
    k = x.shape[-1]
    blocks = scales.shape[1]
    a64 = a.to(torch.float64).reshape(*a.shape[:-1], blocks, k // blocks)
    q64 = qweight.to(torch.float64).reshape(qweight.shape[0], blocks, k // blocks)
    acc = torch.einsum("...bk,nbk->...nb", a64, q64)  # integers below 2^53: exact
    y = sx.to(torch.float64) * (acc * scales.to(torch.float64)).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
