"""Logits processors and the token sampler, batched on tensors.

One decode step turns the model's float32 logits (B, V) into the next tokens (B,):

1. penalties, from the tokens seen so far in each sequence (all tensors, no host round trip):
   - repetition (CTRL / Hugging Face): for every token in the prompt or the output,
     l -> l / r if l > 0 else l * r;
   - presence and frequency (OpenAI), on output tokens only: l -> l - p * [count > 0] - f * count;
2. temperature: l -> l / T; T == 0 means greedy (argmax of the penalized logits);
3. truncation, each step renormalizing what the previous one kept (the Hugging Face order):
   top_k keeps the k largest; top_p keeps the smallest set of most likely tokens whose mass reaches p
   (the token that crosses p is kept); min_p keeps tokens with prob >= min_p * max prob;
4. a draw from softmax of what is left, by inverse CDF: one uniform u per row from the seeded
   torch.Generator, the token is the first whose cumulative probability exceeds u.

Truncation works on the top_k candidates only when top_k is set (a sort of k values instead of V).
"""
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How tokens are chosen, and when a sequence ends. Sampling defaults are llama.cpp's: temperature 0.8,
    top_k 40, top_p 0.95, min_p 0.05.

    seed: a seeded request draws the same tokens whatever runs beside it (each sequence has its own
    generator; sample i of n uses seed + i). max_tokens: new tokens at most. stop: a string or strings that
    end the text (not included). ignore_eos: keep going past end-of-sequence tokens. logprobs: None for none,
    0 for the sampled token's log-probability, k in 1..20 for the k most likely tokens' too. n: samples of the
    prompt (they share its cached blocks).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: str | list | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature >= 0, "a number >= 0 (0 means greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1] (0 disables it)"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1 disables it)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "a positive integer"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "None or an integer in [0, 20]"),
            ("n", isinstance(self.n, int) and self.n >= 1, "a positive integer"),
            ("seed", self.seed is None or isinstance(self.seed, int), "None or an integer"),
            ("stop", self.stop is None or isinstance(self.stop, str) or all(isinstance(x, str) for x in self.stop),
             "None, a string or a list of strings"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def stop_list(self):
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_penalties(logits, seen, output_counts, params: SamplingParams):
    """Penalized copy of `logits` (B, V); seen (B, V) bool: in the prompt or the output so far;
    output_counts (B, V) float: occurrences in the output."""
    logits = logits.clone()
    if params.repetition_penalty != 1:
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if params.presence_penalty != 0:
        logits -= params.presence_penalty * (output_counts > 0).to(logits.dtype)
    if params.frequency_penalty != 0:
        logits -= params.frequency_penalty * output_counts
    return logits


def truncated_probs(logits, params: SamplingParams):
    """Temperature and top_k/top_p/min_p truncation of logits (B, V).

    Returns (probs, ids): probs (B, C) of the C candidate tokens (zero where truncated), ids (B, C) their
    token ids, or None when the candidates are the whole vocabulary in order.
    """
    ids = None
    if 0 < params.top_k < logits.shape[-1]:
        # Temperature keeps the order, so the top k come first and only k values are scaled.
        logits, ids = logits.topk(params.top_k, dim=-1)  # sorted, largest first
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = (probs, None) if ids is not None else probs.sort(dim=-1, descending=True)
        # Mass strictly before each token: a token is kept while the tokens ahead of it hold < top_p.
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop = before >= params.top_p
        if order is not None:
            drop = drop.scatter(-1, order, drop)
        probs = probs.masked_fill(drop, 0)
        probs = probs / probs.sum(-1, keepdim=True)
    if params.min_p > 0:
        top = probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < params.min_p * top, 0)
    return probs, ids


def draw(probs, generator=None):
    """One index per row of probs (B, C) (unnormalized, >= 0), by inverse CDF of one uniform draw."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds u, so zero-probability tokens are never chosen.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


class Sampler:
    """Chooses the next token of each of B sequences and keeps the penalty state up to date.

    `prompts` (list of B token-id lists) seeds the repetition-penalty mask. Calling the sampler with
    logits (B, V) returns tokens (B,) (int64, on the logits' device) and, if `logprobs`, the log-probability
    of each chosen token under the model's unprocessed distribution, log_softmax(raw_logits) (raw_logits:
    the logits before a caller's own masking; default `logits`).
    """

    def __init__(self, params: SamplingParams, prompts, vocab_size: int, device="cpu", logprobs=False):
        self.params = params
        self.logprobs = logprobs
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.seen = self.output_counts = None
        if params.penalized:
            b = len(prompts)
            self.seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
            for i, ids in enumerate(prompts):
                self.seen[i, torch.tensor(ids, dtype=torch.long, device=device)] = True
            self.output_counts = torch.zeros(b, vocab_size, dtype=torch.float32, device=device)
            self._ones = torch.ones(b, 1, device=device)

    def __call__(self, logits, raw_logits=None):
        p = self.params
        processed = logits
        if p.penalized:
            processed = apply_penalties(logits, self.seen, self.output_counts, p)
        if p.greedy:
            tokens = processed.argmax(-1)
        else:
            probs, ids = truncated_probs(processed, p)
            tokens = draw(probs, self.generator)
            if ids is not None:
                tokens = ids.gather(-1, tokens[:, None]).squeeze(-1)
        if p.penalized:
            self.output_counts.scatter_add_(1, tokens[:, None], self._ones)
            self.seen.scatter_(1, tokens[:, None], True)
        if not self.logprobs:
            return tokens, None
        raw = logits if raw_logits is None else raw_logits
        lp = torch.log_softmax(raw.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, lp
