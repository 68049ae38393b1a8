"""The decoder: one pre-norm transformer, switched by ModelConfig, on flashgen ops.

Per layer (residual stream r, fused "add + norm" so the residual add costs no extra pass):
    x, r = norm_attn(h, r)          r <- r + h, x = norm(r)
    h = wo(attention(rope(q), rope(k), v))      q, k, v = split(wqkv(x))  [q/k RMSNorm first for Qwen3]
    x, r = norm_mlp(h, r)
    h = w_out(act(gate) * up)   with gate, up = split(w_in(x))   (SwiGLU)
      | w_out(gelu(w_in(x)))                                     (GPT-2)
logits = output(norm(r + h)); the output head may share the embedding matrix (tied).

Rotary embedding (HF "rotate_half" layout): for the first rotary_dim features of a head split in halves
(x1, x2) and angle a_i = pos * inv_freq_i: (x1 cos a - x2 sin a, x2 cos a + x1 sin a). Llama 3 scaling
rescales inv_freq once (`rope_inv_freq`). GPT-2 adds learned position embeddings instead.

Attention: flash_attn_func for a full recompute (`forward`); over the paged KV cache, `forward_packed` runs
any mix of prefill chunks and decode tokens as packed variable-length sequences (flash_attn_varlen_with_kvcache,
which writes the new k, v into the cache in place). `prefill` and `decode` are the static-batch API over it.
Linears are nn.Linear (float) or QuantizedLinear (int4 / int8 / GGML); the loader decides which.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from flashgen.kernels import flash_attn_func, flash_attn_varlen_with_kvcache, flash_attn_with_kvcache
from flashgen.kernels._backend import active_backend
from flashgen.kernels.norm import layer_norm, rms_norm

from . import cpu_decoder
from .config import ModelConfig
from .kv_cache import KVCache


def rope_inv_freq(config: ModelConfig):
    """inv_freq_i = theta^(-2i / rotary_dim), i < rotary_dim / 2, with Llama 3 frequency scaling if configured:
    wavelengths 2 pi / inv_freq above original_context / low_freq_factor are divided by `factor`, those below
    original_context / high_freq_factor are kept, and the ones between interpolate smoothly."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos, sin (B, T, 1, rotary_dim) float32 from `rope_tables`. With x1, x2 the two halves of
    the first rotary_dim features: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), i.e. x * cos + swap(x) * sin
    where sin carries the minus sign on its first half. Few ops, because decode calls this once per layer."""
    r = cos.shape[-1]
    xr = x[..., :r].float()
    rotated = torch.addcmul(xr * cos, xr.unflatten(-1, (2, r // 2)).flip(-2).flatten(-2), sin).to(x.dtype)
    return torch.cat((rotated, x[..., r:]), dim=-1) if r < x.shape[-1] else rotated


def rope_tables(angles):
    """cos and sign-folded sin tables for apply_rope from angles (B, T, rotary_dim / 2)."""
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1).unsqueeze(2), torch.cat((-sin, sin), -1).unsqueeze(2)


class Norm(nn.Module):
    """RMSNorm or LayerNorm with an optional fused residual add: forward(x, residual) -> (norm(x + r), x + r)."""

    def __init__(self, dim, eps, kind="rms", bias=False):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False) if bias else None

    def forward(self, x, residual=None):
        if self.kind == "rms":
            out = rms_norm(x, self.weight, self.eps, residual)
        else:
            out = layer_norm(x, self.weight, self.bias, self.eps, residual)
        return out if residual is not None else (out, x)


def _embedding(num, dim):
    # An uninitialized table (the loader fills it): random init of a large one costs seconds, even on meta.
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim)).requires_grad_(False)


def _linear(in_features, out_features, bias):
    return nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wqkv = _linear(c.hidden_size, c.q_size + 2 * c.kv_size, c.qkv_bias)
        self.wo = _linear(c.q_size, c.hidden_size, c.o_bias)
        self.q_norm = Norm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = Norm(c.head_dim, c.norm_eps) if c.qk_norm else None
        # A query attends itself and the previous sliding_window - 1 keys.
        self.window = (c.sliding_window - 1, 0) if c.sliding_window else (-1, -1)

    def forward(self, x, rope, cache=None, packed=None):
        """x (B, T, hidden); with a cache `packed` = (cu_seqlens_q, cache_seqlens, block_table): B = 1 (packed
        sequences), or cu_seqlens_q None and T = 1 (one new token per sequence)."""
        b, t, _ = x.shape
        c = self.c
        q, k, v = self.wqkv(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        if rope is not None:
            # q and k rotate together: one set of ops per layer instead of two.
            qk = apply_rope(torch.cat((q, k), dim=2), *rope)
            q, k = qk.split([c.num_heads, c.num_kv_heads], dim=2)
        if cache is None:
            o = flash_attn_func(q, k, v, causal=True, window_size=self.window)
        else:
            # A cache narrower than the model (kv_cache_dtype) takes q, k, v in its own dtype, as the op needs.
            dt = cache[0].dtype
            cu_seqlens_q, cache_seqlens, block_table = packed
            if cu_seqlens_q is None:  # one token per sequence (B, 1): the decode op, no host sync
                o = flash_attn_with_kvcache(q.to(dt), cache[0], cache[1], k.to(dt), v.to(dt),
                                            cache_seqlens=cache_seqlens, block_table=block_table, causal=True,
                                            window_size=self.window)
            else:
                o = flash_attn_varlen_with_kvcache(q[0].to(dt), cache[0], cache[1], k[0].to(dt), v[0].to(dt),
                                                   cu_seqlens_q=cu_seqlens_q, cache_seqlens=cache_seqlens,
                                                   block_table=block_table, causal=True, window_size=self.window)
            o = o.to(x.dtype)
        return self.wo(o.reshape(b, t, c.q_size))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gated = c.mlp == "swiglu"
        self.w_in = _linear(c.hidden_size, c.intermediate_size * (2 if self.gated else 1), c.mlp_bias)
        self.w_out = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[c.activation]

    def forward(self, x):
        h = self.w_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(self.act(gate) * up)
        return self.w_out(self.act(h))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        bias = c.norm == "layer"
        self.attn_norm = Norm(c.hidden_size, c.norm_eps, c.norm, bias)
        self.attn = Attention(c)
        self.mlp_norm = Norm(c.hidden_size, c.norm_eps, c.norm, bias)
        self.mlp = MLP(c)

    def forward(self, h, residual, rope, cache=None, packed=None):
        x, residual = self.attn_norm(h, residual)
        h = self.attn(x, rope, cache, packed)
        x, residual = self.mlp_norm(h, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    """Decoder over a paged KV cache. See ENGINE_API: setup_cache, reset, prefill, decode, forward_packed,
    forward.

    On the CPU, `forward_packed` (and so prefill and decode) runs the C++ forward of engine/cpu_decoder.py when
    the model fits it (cpp_step = False, or a flashgen.kernels.use_backend block, forces the Python layers). It
    is built on first use after setup_cache, over the weights present then: call setup_cache again after
    replacing layers.
    """

    cpp_step = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.tok_embeddings = _embedding(c.vocab_size, c.hidden_size)
        self.pos_embeddings = _embedding(c.max_position_embeddings, c.hidden_size) if c.learned_positions else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = Norm(c.hidden_size, c.norm_eps, c.norm, c.norm == "layer")
        self.output = _linear(c.hidden_size, c.vocab_size, False)
        self.register_buffer("inv_freq", None if c.learned_positions else rope_inv_freq(c), persistent=False)
        self.cache = None
        self.batch_size = 0
        self._cpp_step = None

    # ------------------------------------------------------------ cache
    def setup_cache(self, max_batch_size, max_seq_len, dtype=None, num_blocks=None):
        """Preallocate the paged KV cache: `num_blocks` blocks of kv_cache.BLOCK_SIZE tokens (default: enough for
        `max_batch_size` sequences of `max_seq_len` tokens, the static batch of prefill / decode). A sequence
        holds at most max_seq_len tokens. dtype: of the cache (default: the previous cache's, else the model's);
        a 16-bit cache under a float32 model halves its memory, and attention then runs on q, k, v rounded to
        it."""
        c = self.config
        if c.learned_positions and max_seq_len > c.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {c.max_position_embeddings} "
                             f"learned positions")
        weight = self.tok_embeddings.weight
        dtype = dtype or (self.cache.dtype if self.cache is not None else weight.dtype)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the KV cache dtype must be float32, bfloat16 or float16, got {dtype}")
        self.cache = None  # the old buffers go before the new ones are allocated
        self._cpp_step = None
        self.cache = KVCache(c.num_layers, max_batch_size, max_seq_len, c.num_kv_heads, c.head_dim, dtype,
                             weight.device, num_blocks)
        self.batch_size = 0

    def reset(self, batch_size=None):
        """Empty the static batch (all lengths 0) and make `batch_size` (default: all rows) the active batch."""
        self._need_cache()
        self.cache.seqlens.zero_()
        self.batch_size = self.cache.max_batch_size if batch_size is None else batch_size

    @property
    def cache_seqlens(self):
        """int32 (B,): tokens held in the cache for each active sequence."""
        self._need_cache()
        return self.cache.seqlens[:self.batch_size]

    def _need_cache(self):
        if self.cache is None:
            raise RuntimeError("no KV cache: call model.setup_cache(max_batch_size, max_seq_len) first")

    # ------------------------------------------------------------ forward passes
    def _embed(self, input_ids, positions):
        h = self.tok_embeddings(input_ids)
        if self.pos_embeddings is not None:
            return h + self.pos_embeddings(positions), None
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, rotary_dim / 2)
        return h, rope_tables(angles)

    def _logits(self, h, residual):
        return self.output(self.norm(h, residual)[0]).float()

    def forward(self, input_ids):
        """Full recompute without the cache: input_ids (B, T) -> logits float32 (B, T, V)."""
        b, t = input_ids.shape
        self._check_positions(t)
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        h, rope = self._embed(input_ids, positions)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, rope)
        return self._logits(h, residual)

    @torch.inference_mode()
    def forward_packed(self, tokens, cu_seqlens_q, cache_seqlens, block_table, logit_rows):
        """One step over packed variable-length sequences: sequence b's new tokens are
        tokens[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] (int64), at positions cache_seqlens[b] .. of its cache
        (blocks block_table[b], int32 (B, max_blocks); cu_seqlens_q, cache_seqlens int32). Their k, v are written
        to the cache; cache_seqlens is not advanced (the caller owns the lengths). Returns logits float32
        (R, V) of the token rows logit_rows (int64 (R,)); no other row goes through the output head."""
        self._need_cache()
        step = self._cpp(tokens)
        if step:
            return step(tokens, cu_seqlens_q, cache_seqlens, block_table, logit_rows)
        counts = cu_seqlens_q.diff().long()
        starts = torch.repeat_interleave(cache_seqlens.long() - cu_seqlens_q[:-1].long(), counts)
        positions = starts + torch.arange(tokens.shape[0], device=tokens.device)
        h, rope = self._embed(tokens.unsqueeze(0), positions.unsqueeze(0))
        residual, packed = None, (cu_seqlens_q, cache_seqlens, block_table)
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, self.cache.layer(i), packed)
        return self._logits(h[:, logit_rows], residual[:, logit_rows]).squeeze(0)

    @torch.inference_mode()
    def forward_decode(self, tokens, cache_seqlens, block_table):
        """One new token per sequence: tokens int64 (B,) at positions cache_seqlens (int32 (B,)) of the
        sequences' blocks block_table (int32 (B, max_blocks)) -> logits float32 (B, V). Its k, v are written to
        the cache; cache_seqlens is not advanced. No host sync and no shape that depends on values: a CUDA graph
        captures it (engine/cuda_graphs.py). Always the Python layers."""
        self._need_cache()
        h, rope = self._embed(tokens.unsqueeze(1), cache_seqlens.long().unsqueeze(1))
        residual, packed = None, (None, cache_seqlens, block_table)
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, self.cache.layer(i), packed)
        return self._logits(h[:, 0], residual[:, 0])

    @torch.inference_mode()
    def prefill(self, input_ids, lengths, append=False):
        """Right-padded prompts input_ids (B, T) of `lengths` (B,) -> logits float32 (B, V) at each last prompt
        token. Fills static rows 0..B-1 from position 0 and the cache lengths become `lengths`; with append=True
        the tokens continue the active batch's cached sequences instead (a chat's next turn): they go in at
        positions cache_seqlens.. and the lengths grow by `lengths`. Padding is never written to the cache."""
        self._need_cache()
        b, t = input_ids.shape
        if append and b != self.batch_size:
            raise ValueError(f"append=True continues the active batch of {self.batch_size}, got {b} prompts")
        if b > self.cache.max_batch_size:
            raise ValueError(f"batch {b} exceeds the cache's max_batch_size {self.cache.max_batch_size}")
        lengths = torch.as_tensor(lengths, device=input_ids.device).reshape(b)
        if b and not (1 <= int(lengths.min()) and int(lengths.max()) <= t):
            raise ValueError(f"lengths must be in [1, {t}] (the padded prompt length), got {lengths.tolist()}")
        if not append:
            self.reset(b)
        seqlens = self.cache.seqlens[:b]
        end = int((seqlens + lengths.to(seqlens.dtype)).max()) if b else 0
        if end > self.cache.max_seq_len:
            raise ValueError(f"{int(seqlens.max())} cached + {t} new tokens exceed the cache's max_seq_len "
                             f"{self.cache.max_seq_len}")
        self._check_positions(end)
        keep = torch.arange(t, device=input_ids.device) < lengths.unsqueeze(1)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=input_ids.device)
        cu[1:] = lengths.cumsum(0)
        logits = self.forward_packed(input_ids[keep].long(), cu, seqlens, self.cache.block_table[:b],
                                     cu[1:].long() - 1)
        seqlens.add_(lengths.to(seqlens.dtype))
        return logits

    @torch.inference_mode()
    def decode(self, tokens):
        """One new token per active sequence, tokens (B,), at position cache_seqlens -> logits float32 (B, V)."""
        self._need_cache()
        b = tokens.shape[0]
        if b != self.batch_size:
            raise ValueError(f"decode got {b} tokens but the active batch (from prefill / reset) is {self.batch_size}")
        seqlens = self.cache.seqlens[:b]
        if b and int(seqlens.max()) >= self.cache.max_seq_len:
            raise ValueError(f"the cache is full: a sequence holds max_seq_len {self.cache.max_seq_len} tokens")
        self._check_positions(int(seqlens.max()) + 1 if b else 0)
        rows = torch.arange(b + 1, dtype=torch.int32, device=tokens.device)
        logits = self.forward_packed(tokens.reshape(b).long(), rows, seqlens, self.cache.block_table[:b],
                                     rows[:-1].long())
        seqlens.add_(1)
        return logits

    def _cpp(self, tokens):
        """The C++ forward (engine/cpu_decoder.py) if it applies to this model and these (CPU) tokens, else None."""
        if not (self.cpp_step and tokens.is_cpu) or active_backend():
            return None
        if self._cpp_step is None:
            self._cpp_step = cpu_decoder.build(self) or False
        return self._cpp_step or None

    def _apply(self, fn, recurse=True):
        self._cpp_step = None  # the step holds the old tensors
        return super()._apply(fn, recurse)

    def _check_positions(self, t):
        if self.pos_embeddings is not None and t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed the model's {self.config.max_position_embeddings} learned positions")
