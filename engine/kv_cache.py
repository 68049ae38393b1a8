"""Paged KV cache: per layer, num_blocks blocks of block_size tokens, preallocated and written in place.

A sequence's cache token t lives in block block_table[b, t // block_size] at row t % block_size; the engine's
block manager (engine/block_manager.py) hands blocks out, so sequences of any lengths share one pool and a
prompt prefix can be shared by several sequences. The attention op (flash_attn_varlen_with_kvcache) writes
the new keys and values of layer l into k[l], v[l] and reads each sequence's first cache_seqlens[b] + new
tokens through its block table row.

The memory is head-major within a block, (layers, num_blocks, kv_heads, block_size, head_dim), and k, v are
strided views of it in the op's (num_blocks, block_size, kv_heads, head_dim) order: the keys of one (block,
kv head) lie contiguous, so a decode step streams them in order (on the CPU, a decode step at 2000 tokens of
context takes 8-10% less time than over rows that interleave the heads). Every backend of the op takes the
cache's strides. On the CPU the keys are moreover key-major within a block, (layers, num_blocks, kv_heads,
head_dim, block_size): a block of keys is then the transposed tile the score product reads, in place, where
token-major keys were transposed again at every step (14% of a 16-sequence decode step of the default model).

For the static-batch API of Transformer.prefill / decode, row b of `block_table` owns its own contiguous range
of blocks (max_seq_len tokens) and `seqlens` holds each row's length.
"""
import torch
from torch import nn

BLOCK_SIZE = 64


def blocks_for(tokens, block_size=BLOCK_SIZE):
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


class KVCache(nn.Module):
    """num_blocks blocks (default: max_batch_size sequences of max_seq_len tokens); the static batch has
    max_batch_size rows, fewer if the blocks hold fewer whole sequences."""

    def __init__(self, num_layers, max_batch_size, max_seq_len, kv_heads, head_dim, dtype, device,
                 num_blocks=None, block_size=BLOCK_SIZE):
        super().__init__()
        per_seq = blocks_for(max_seq_len, block_size)
        num_blocks = max_batch_size * per_seq if num_blocks is None else num_blocks
        if num_blocks < per_seq:
            raise ValueError(f"the KV cache needs at least {per_seq} blocks of {block_size} tokens for one sequence "
                             f"of max_seq_len {max_seq_len}, got {num_blocks}")
        self.block_size, self.max_seq_len = block_size, max_seq_len
        self.max_batch_size = min(max_batch_size, num_blocks // per_seq)
        shape = (num_layers, num_blocks, kv_heads, block_size, head_dim)
        self.key_major = torch.device(device).type == "cpu"
        k_shape = (num_layers, num_blocks, kv_heads, head_dim, block_size) if self.key_major else shape
        self.register_buffer("k_heads", torch.zeros(k_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_heads", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The static batch: row b owns blocks b * per_seq .. (b + 1) * per_seq - 1.
        rows = self.max_batch_size
        table = torch.arange(rows * per_seq, dtype=torch.int32, device=device).view(rows, per_seq)
        self.register_buffer("block_table", table, persistent=False)
        self.register_buffer("seqlens", torch.zeros(rows, dtype=torch.int32, device=device), persistent=False)

    @property
    def k(self):
        """(layers, num_blocks, block_size, kv_heads, head_dim) view of the keys."""
        return self.k_heads.permute(0, 1, 4, 2, 3) if self.key_major else self.k_heads.transpose(2, 3)

    @property
    def v(self):
        """(layers, num_blocks, block_size, kv_heads, head_dim) view of the values."""
        return self.v_heads.transpose(2, 3)

    @property
    def num_blocks(self):
        return self.k_heads.shape[1]

    @property
    def dtype(self):
        return self.k_heads.dtype

    def layer(self, index):
        """The (k, v) blocks of one layer: (num_blocks, block_size, kv_heads, head_dim) views."""
        return self.k[index], self.v[index]

    @staticmethod
    def bytes_per_block(num_layers, kv_heads, head_dim, dtype, block_size=BLOCK_SIZE):
        """Bytes of one block over all layers, keys and values."""
        return 2 * num_layers * kv_heads * block_size * head_dim * torch.empty(0, dtype=dtype).element_size()
