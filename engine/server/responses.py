"""Response bodies: the engine's per-step outputs as OpenAI completion / chat completion objects and chunks.

One request body becomes one engine request per prompt, each with n samples; choice `index` is
prompt index * n + sample index, as in OpenAI's API. `Choices` accumulates what the steps produced, so the
same object builds the stream's chunks and the final non-streaming body; usage counts every prompt once and
every generated token (an end-of-sequence token included).
"""
from . import protocol as P


class _Choice:
    __slots__ = ("text", "finish_reason", "tokens", "logprobs", "top", "offsets")

    def __init__(self):
        self.text, self.finish_reason = "", None
        self.tokens, self.logprobs, self.top, self.offsets = [], [], [], []


class Choices:
    def __init__(self, tokenizer, chat, params, num_prompts, response_id, model, created):
        self.tokenizer, self.chat = tokenizer, chat
        self.n, self.logprobs = params.n, params.logprobs
        self.head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}
        self.choices = [_Choice() for _ in range(num_prompts * params.n)]
        self.prompt_tokens, self.cached_tokens, self.output_tokens = [0] * num_prompts, [0] * num_prompts, 0

    # ------------------------------------------------------------------ accumulating
    def add(self, prompt_index, outputs, finished):
        """Record one step's outputs of one prompt; returns the stream chunk they make."""
        chunk = []
        for out in outputs:
            index = prompt_index * self.n + out.index
            c = self.choices[index]
            start = len(c.logprobs)
            if self.logprobs is not None:
                for token in out.new_token_ids:
                    c.offsets.append(len(c.text))
                    c.tokens.append(token)
                c.logprobs.append(out.logprob)
                c.top.append(out.top_logprobs or {})
            c.text += out.text
            c.finish_reason = P.finish_reason(out.finish_reason)
            if out.text or out.finish_reason or self.logprobs is not None:
                chunk.append(self._chunk_choice(index, out.text, c, start))
        if finished is not None:
            self.prompt_tokens[prompt_index] = finished.num_prompt_tokens
            self.cached_tokens[prompt_index] = finished.num_cached_tokens
            self.output_tokens += sum(finished.num_output_tokens)
        return {**self.head, "choices": chunk}

    def _chunk_choice(self, index, text, c, start):
        logprobs = self._logprobs(c, start) if self.logprobs is not None else None
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": c.finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    # ------------------------------------------------------------------ bodies
    def role_chunk(self, include_usage):
        chunk = {**self.head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}
                                          for i in range(len(self.choices))]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self):
        return P.usage(sum(self.prompt_tokens), self.output_tokens, sum(self.cached_tokens))

    def usage_chunk(self):
        return {**self.head, "choices": [], "usage": self.usage()}

    def response(self):
        """The non-streaming body."""
        choices = []
        for i, c in enumerate(self.choices):
            logprobs = self._logprobs(c, 0) if self.logprobs is not None else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}

    def _logprobs(self, c, start):
        """Logprobs of c's tokens from `start` on: chat's {"content": [...]}, or completions' parallel lists."""
        decode = lambda t: self.tokenizer.decode([t])  # noqa: E731
        tokens = [decode(t) for t in c.tokens[start:]]
        tops = [[(decode(t), lp) for t, lp in top.items()] for top in c.top[start:]]
        if self.chat:
            return {"content": [
                {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                for tok, lp, top in zip(tokens, c.logprobs[start:], tops)]}
        return {"tokens": tokens, "token_logprobs": c.logprobs[start:],
                "top_logprobs": [dict(top) for top in tops] if self.logprobs else None,
                "text_offset": c.offsets[start:]}
