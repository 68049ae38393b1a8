"""Decode steps replayed from CUDA graphs: a decode step is hundreds of small kernels (about 15 per layer), and
launched one by one from Python their launch cost exceeds their work.

For each batch-size bucket one graph of Transformer.forward_decode is captured over static buffers: tokens
(B,), cache_seqlens (B,), block_table (B, W) with W the blocks of a max_seq_len sequence, and the logits it
writes. A step of b decodes fills the first b rows and replays the smallest bucket >= b; the rows past b are
padding of length 0 on the scratch block (a KV block the block manager never hands out), so they write and
read only there. A bucket is captured on its first use, after a warm-up run (which prepacks the weights and
compiles the kernels); all graphs share one memory pool. Prefill and mixed steps run eagerly.

Without capture (off a GPU) the same static-buffer step runs directly: the CPU tests check the bucketing and
padding with it.
"""
import torch

from .kv_cache import blocks_for

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model, max_num_seqs, scratch_block, capture=True):
        self.model, self.scratch, self.capture = model, scratch_block, capture
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]
        cache = model.cache
        width, size, device = blocks_for(cache.max_seq_len, cache.block_size), self.buckets[-1], cache.k_heads.device
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.seqlens = torch.zeros(size, dtype=torch.int32, device=device)
        self.table = torch.full((size, width), scratch_block, dtype=torch.int32, device=device)
        self.graphs, self.pool = {}, None  # bucket -> (graph, its logits buffer); the shared memory pool

    @property
    def max_batch(self):
        return self.buckets[-1]

    def run(self, tokens, seqlens, table):
        """tokens, seqlens: lists of b ints (each sequence's next token and its cached length); table: int32
        (b, w) block table rows, w <= W. Returns logits float32 (b, V)."""
        b, w = table.shape
        size = next(x for x in self.buckets if x >= b)
        self.tokens[:b].copy_(torch.tensor(tokens, dtype=torch.long))
        self.seqlens[:b].copy_(torch.tensor(seqlens, dtype=torch.int32))
        self.seqlens[b:size] = 0
        self.table[:b, :w].copy_(table)
        self.table[:b, w:] = self.scratch
        self.table[b:size] = self.scratch
        return self._step(size)[:b].clone()  # the buffer is the next replay's output

    def _step(self, size):
        args = self.tokens[:size], self.seqlens[:size], self.table[:size]
        if not self.capture:
            return self.model.forward_decode(*args)
        if size not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.model.forward_decode(*args)  # writes the same k, v the replay writes again
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.model.forward_decode(*args)
            self.pool = graph.pool()
            self.graphs[size] = graph, logits
        graph, logits = self.graphs[size]
        graph.replay()
        return logits
