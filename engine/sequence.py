"""One sequence of a request: its tokens, how many are in the KV cache, its blocks, sampler and text.

token_ids is the prompt followed by the sampled tokens. num_computed of them have their keys and values in
the cache; the scheduler picks how many of the rest go in the next step (all remaining ones of a decode:
one). The last sampled token is only fed to the model on the step after it was drawn.
"""
import itertools
from enum import Enum

import torch

from .sampling import Sampler
from .stream import TextStream


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = itertools.count()

    def __init__(self, request_id, index, prompt_ids, params, tokenizer, eos_token_ids, vocab_size, device,
                 parent=None, constraint=None):
        self.seq_id = next(Sequence._ids)
        self.request_id, self.index = request_id, index
        self.parent = parent  # sample 0 of the request, for samples 1..n-1
        self.params = params
        self.constraint = constraint  # limits the tokens that may come next (engine/structured.py), or None
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed = 0
        self.num_cached_prompt = 0  # prompt tokens found in the prefix cache (the last time it started)
        self.block_table, self.block_hashes = [], []
        self.status = Status.WAITING
        self.finish_reason = None
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.text = TextStream(tokenizer, params.stop_list)
        self.sampler = Sampler(params, [prompt_ids], vocab_size, device, params.logprobs is not None)
        self.logprobs = [] if params.logprobs is not None else None
        self.top_logprobs = [] if params.logprobs else None
        self.arrival = self.seq_id  # scheduling order; kept when preempted
        self.first_token_time = None

    @property
    def num_tokens(self):
        return len(self.token_ids)

    @property
    def output_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self):
        return self.status == Status.FINISHED

    def append(self, token, logprob=None, top=None):
        """Add a sampled token; returns the text it completes. Sets finish_reason when the sequence ends."""
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top)
        if token in self.eos_token_ids:
            self.finish_reason = "eos"
            return self.text.finish()
        piece = self.text.add(token)
        complete = self.constraint is not None and self.constraint.accept(token)
        if self.text.stopped or complete:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            piece += self.text.finish()
        return piece

    def sample(self, logits):
        """The next token from this sequence's logits (1, V): (token, logprob or None, top logprobs or None).
        Log-probabilities are the model's own, before penalties and constraints."""
        allowed = logits if self.constraint is None else self.constraint.mask(logits)
        tokens, lp = self.sampler(allowed, raw_logits=logits)
        token = int(tokens[0])
        top = None
        if self.params.logprobs:
            values, ids = torch.log_softmax(logits[0].float(), -1).topk(self.params.logprobs)
            top = dict(zip(ids.tolist(), values.tolist()))
        return token, (float(lp[0]) if lp is not None else None), top
