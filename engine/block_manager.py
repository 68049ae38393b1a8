"""KV cache blocks: who holds which, and which full blocks hold which tokens (the prefix cache).

A block holds block_size consecutive tokens of one or more sequences (several once a prefix is shared). A
full block is known by its hash, chained over the blocks before it: hash((parent hash, its tokens)), so one
hash names a whole prefix. When a sequence starts, its leading full blocks whose hashes are known are taken
as they are (reference counted) and only the rest of its tokens are computed. A block no sequence holds
any more keeps its contents and hash while it waits, least recently freed first, to be handed out again:
until then a later prompt with the same prefix still finds it.
"""
from collections import OrderedDict


def _hash(parent, tokens):
    return hash((parent, tuple(tokens)))


class Block:
    __slots__ = ("id", "ref_count", "hash", "tokens")

    def __init__(self, block_id):
        self.id, self.ref_count, self.hash, self.tokens = block_id, 0, None, None


class BlockManager:
    """num_blocks blocks of block_size tokens. Sequences (engine/sequence.py) keep their blocks in
    seq.block_table, the hashes of their full blocks in seq.block_hashes and their computed-token count in
    seq.num_computed; this class changes all three."""

    def __init__(self, num_blocks, block_size, prefix_caching=True):
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = list(range(num_blocks - 1, -1, -1))  # never used or without a hash; pop() takes the lowest
        self.cached = OrderedDict()  # block id -> None: free blocks with a hash, least recently freed first
        self.by_hash = {}  # hash -> block id
        self.queries = self.hits = 0  # prefix cache: blocks looked up and found, over all sequences

    @property
    def num_free(self):
        return len(self.free) + len(self.cached)

    def blocks_needed(self, seq, num_tokens):
        """New blocks seq needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def start(self, seq):
        """Give a sequence with no blocks the cached blocks of its longest known prefix (full blocks only, and
        never its last token, whose logits are needed); seq.num_computed becomes the tokens they hold."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.prefix_caching:
            return
        tokens, bs, parent = seq.token_ids, self.block_size, None
        for i in range((len(tokens) - 1) // bs):
            part = tokens[i * bs:(i + 1) * bs]
            h = _hash(parent, part)
            self.queries += 1
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != part:
                break
            self.hits += 1
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs
        seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt_tokens)

    def can_grow(self, seq, num_tokens):
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq, num_tokens):
        """Blocks for seq to hold num_tokens tokens (check can_grow first)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            if self.free:
                block_id = self.free.pop()
            else:  # the least recently freed cached block: its prefix is forgotten
                block_id, _ = self.cached.popitem(last=False)
                block = self.blocks[block_id]
                del self.by_hash[block.hash]
                block.hash = block.tokens = None
            self._take(block_id)
            seq.block_table.append(block_id)

    def commit(self, seq):
        """Register the blocks that seq's computed tokens have filled, so later prompts can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            part = seq.token_ids[i * bs:(i + 1) * bs]
            h = _hash(seq.block_hashes[-1] if seq.block_hashes else None, part)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            # If another block already holds these tokens, this one stays private (freed without a hash).
            if h not in self.by_hash:
                block.hash, block.tokens = h, part
                self.by_hash[h] = block.id

    def release(self, seq):
        """Give back all of seq's blocks; seq.num_computed returns to 0."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached[block_id] = None
                else:
                    self.free.append(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed = 0

    def _take(self, block_id):
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.cached.pop(block_id, None)
        block.ref_count += 1
