"""Static KV cache: preallocated (layers, batch, max_seq_len, kv_heads, head_dim) buffers, written in place.

The attention op (flash_attn_with_kvcache) writes the new keys and values of layer l into k[l], v[l] at rows
seqlens[b] .. and reads the first seqlens[b] + new tokens of each sequence; the model advances `seqlens` once
per forward, after the last layer.
"""
import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, num_layers, max_batch_size, max_seq_len, kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (num_layers, max_batch_size, max_seq_len, kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(max_batch_size, dtype=torch.int32, device=device),
                             persistent=False)

    @property
    def max_batch_size(self):
        return self.k.shape[1]

    @property
    def max_seq_len(self):
        return self.k.shape[2]

    def layer(self, index):
        """The (k, v) buffers of one layer: (max_batch_size, max_seq_len, kv_heads, head_dim) views."""
        return self.k[index], self.v[index]
