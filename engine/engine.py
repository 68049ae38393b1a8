"""The serving engine: requests in, one step at a time, new tokens and text out (continuous batching).

    engine = Engine(model, tokenizer, eos_token_ids)
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():          # StepOutput per sequence that advanced
            print(out.request_id, out.text, out.finish_reason)

Each step the scheduler (engine/scheduler.py) picks the running decodes and prefill chunks within a token
budget, the model runner (engine/model_runner.py) runs them as one packed forward over the paged KV cache,
and each sequence samples from its own logits with its own parameters and generator
(engine/sequence.py). Requests join and leave between steps; a request's tokens do not depend on what
runs beside it (the CPU kernels are batch-invariant, see tests/test_serving.py).
"""
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass

import psutil
import torch

from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache, blocks_for
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("flashgen")

# The default KV cache takes at most this share of the memory available when the engine starts.
DEFAULT_KV_SHARE = 0.3


@dataclass
class StepOutput:
    """What one step did to one sequence (sample `index` of request `request_id`)."""

    request_id: str
    index: int
    new_token_ids: list
    text: str
    finish_reason: str | None  # "eos", "stop", "length", "abort" or None while running
    logprob: float | None = None  # of the new token, when the request asked for logprobs
    top_logprobs: dict | None = None  # {token id: logprob} of the most likely tokens, when asked


class Engine:
    """model: a Transformer (engine/model.py) with its cache set up (max_seq_len: the context per sequence).
    KV memory: num_blocks blocks, or kv_cache_memory GiB, or by default enough for max_num_seqs full-length
    sequences within DEFAULT_KV_SHARE of the available memory. cuda_graphs (default: on a CUDA device): decode
    steps replay CUDA graphs (engine/cuda_graphs.py; off a GPU the same static-buffer step runs uncaptured).
    kv_cache_dtype: of the cache blocks (default: the model's cache's)."""

    def __init__(self, model, tokenizer, eos_token_ids=(), device="cpu", max_num_seqs=16,
                 max_num_batched_tokens=512, kv_cache_memory=None, num_blocks=None, prefix_caching=True,
                 cuda_graphs=None, kv_cache_dtype=None):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.eos_token_ids = set(eos_token_ids)
        c, cache = model.config, model.cache
        self.max_seq_len, dtype, block_size = cache.max_seq_len, kv_cache_dtype or cache.dtype, cache.block_size
        per_block = KVCache.bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, dtype, block_size)
        per_seq = blocks_for(self.max_seq_len, block_size)
        if num_blocks is None:
            if kv_cache_memory is not None:
                if kv_cache_memory <= 0:
                    raise ValueError(f"kv_cache_memory must be a positive number of GiB, got {kv_cache_memory}")
                num_blocks = int(kv_cache_memory * 2 ** 30 // per_block)
            else:
                available = int(psutil.virtual_memory().available * DEFAULT_KV_SHARE // per_block)
                num_blocks = max(per_seq, min(max_num_seqs * per_seq, available))
        if num_blocks < per_seq:
            raise ValueError(f"the KV cache must hold at least one sequence of max_seq_len {self.max_seq_len}: "
                             f"{per_seq} blocks ({per_seq * per_block / 2**30:.3f} GiB), got {num_blocks}")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        # With graphs, one more block: the scratch block of the padding rows, never handed out.
        model.setup_cache(1, self.max_seq_len, dtype, num_blocks=num_blocks + bool(cuda_graphs))
        log.info("KV cache: %d blocks of %d tokens, %.2f GiB", num_blocks, block_size,
                 num_blocks * per_block / 2 ** 30)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        graphs = DecodeGraphs(model, max_num_seqs, num_blocks, capture=self.device.type == "cuda") \
            if cuda_graphs else None
        self.runner = ModelRunner(model, device, graphs)
        self.requests = {}  # request id -> its sequences
        self._ids = itertools.count()
        self.num_prompt_tokens = self.num_generated_tokens = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids, params, request_id=None, constraint=None):
        """Queue a request; returns its id. max_tokens is clamped to what the context leaves. constraint: a
        callable giving each sample its own constraint on the tokens it may produce (engine/structured.py)."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty (no tokens): give some text")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_seq_len} "
                             f"(prompt plus new tokens); shorten it or raise max_seq_len")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got one of {min(prompt_ids)} / "
                             f"{max(prompt_ids)}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        # The last sampled token is never fed back, so a sequence may reach max_seq_len + 1 tokens.
        params = dataclasses.replace(params, max_tokens=min(params.max_tokens, self.max_seq_len + 1 - len(prompt_ids)))
        seqs = []
        for i in range(params.n):
            p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            seqs.append(Sequence(request_id, i, prompt_ids, p, self.tokenizer, self.eos_token_ids, vocab, self.device,
                                 parent=seqs[0] if seqs else None,
                                 constraint=constraint() if constraint is not None else None))
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.num_prompt_tokens += len(prompt_ids) * params.n
        return request_id

    def abort(self, request_id):
        """Stop a request now; its blocks go back to the pool. Unknown or finished ids are ignored."""
        for seq in self.requests.get(str(request_id), []):
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def sequences(self, request_id):
        """The sequences (samples) of a request, with their tokens, text and finish reasons."""
        return self.requests[str(request_id)]

    def release(self, request_id):
        """Forget a finished request (its results are no longer needed)."""
        self.abort(request_id)
        self.requests.pop(str(request_id), None)

    def has_unfinished(self):
        return self.scheduler.has_unfinished()

    @property
    def prefix_cache_stats(self):
        """(blocks looked up, blocks found) in the prefix cache so far."""
        return self.blocks.queries, self.blocks.hits

    # ------------------------------------------------------------------ stepping
    def step(self):
        """Run one step; returns a StepOutput for every sequence that sampled a token in it."""
        step = self.scheduler.schedule()
        if not step:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler found nothing to run: the KV cache is too small for the waiting "
                                   "sequence")
            return []
        seqs, logits = self.runner.run(step)
        for seq, n in step:
            seq.num_computed += n
            self.blocks.commit(seq)
        outputs = []
        now = time.perf_counter()
        for seq, token, lp, top in zip(seqs, *self._sample(seqs, logits)):
            piece = seq.append(token, lp, top)
            self.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            outputs.append(StepOutput(seq.request_id, seq.index, [token], piece, seq.finish_reason, lp, top))
        return outputs

    def run(self):
        """Step until every request has finished, yielding each step's outputs (the streaming API)."""
        while self.has_unfinished():
            yield self.step()

    def _sample(self, seqs, logits):
        """Tokens, logprobs and top logprobs for each sequence. Greedy sequences without penalties or logprobs
        take one argmax over their rows; the others sample from their own row with their own state."""
        tokens, lps, tops = [0] * len(seqs), [None] * len(seqs), [None] * len(seqs)
        plain = [i for i, s in enumerate(seqs)
                 if s.params.greedy and not s.params.penalized and s.params.logprobs is None and s.constraint is None]
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]
            # numpy's argmax (the first maximum, as torch's) runs 5x faster than torch's on the CPU: 16 rows of
            # 49152 logits 0.10 against 0.52 ms, which was 3-5% of a 16-sequence decode step of the default model
            best = rows.numpy().argmax(-1) if rows.is_cpu else rows.argmax(-1)
            for i, t in zip(plain, best.tolist()):
                tokens[i] = t
        others = set(range(len(seqs))) - set(plain)
        for i in sorted(others):
            tokens[i], lps[i], tops[i] = seqs[i].sample(logits[i:i + 1])
        return tokens, lps, tops
