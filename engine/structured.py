"""Structured output: JSON (any object, or one that validates against a JSON Schema) enforced token by token.

llguidance compiles the schema into a grammar over the tokenizer's vocabulary (it reads the same tokenizer
JSON that engine/tokenizer.py builds, for Hugging Face and GGUF checkpoints alike). Before each sample the
matcher gives the set of tokens that keep the text a prefix of some valid document; every other logit
becomes -inf. The matcher stops once the document is complete, which ends the sequence ("stop"), so an
output that was not cut by max_tokens always parses and validates.

    grammars = Grammars(tokenizer, vocab_size)
    constraint = grammars.json_schema({"type": "object", ...})   # a factory: one matcher per sample
    engine.add_request(prompt_ids, params, constraint=constraint)
"""
import json
import logging

import torch

log = logging.getLogger("flashgen")

# Compact JSON (no whitespace between tokens): a small model could otherwise pad with spaces forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A response format or schema that cannot be compiled into a grammar."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


class Grammars:
    """Compiles JSON Schemas against one tokenizer (built once: about 0.3 s for a 50k vocabulary)."""

    def __init__(self, tokenizer, vocab_size):
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                         eos_token=sorted(tokenizer.eos_token_ids) or None)
        self.eos_token_ids = sorted(tokenizer.eos_token_ids)

    def json_schema(self, schema):
        """A constraint factory for documents valid under `schema` (a dict); GrammarError if it does not
        compile."""
        llg = _llguidance()
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON Schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"the JSON Schema does not compile: {e}") from None
        error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"the JSON Schema does not compile: {messages[0]}")
        return lambda: JsonConstraint(llg.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size,
                                      self.eos_token_ids)

    def json_object(self):
        """A constraint factory for any JSON object."""
        return self.json_schema({"type": "object"})


class JsonConstraint:
    """One sample's matcher: `mask(logits)` before sampling, `accept(token)` after (True once complete)."""

    def __init__(self, matcher, vocab_size, eos_token_ids):
        self.matcher, self.vocab_size, self.eos_token_ids = matcher, vocab_size, eos_token_ids
        self.bitmask = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self):
        """Bool (V,): the tokens that may come next."""
        if self.matcher.is_error():
            # Cannot happen for tokens drawn from the mask; end the sequence rather than sample garbage.
            log.warning("structured output: %s; ending the sequence", self.matcher.get_error())
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed[self.eos_token_ids] = True
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        return ((self.bitmask[:, None] >> self._bits) & 1).flatten()[:self.vocab_size].bool()

    def mask(self, logits):
        """logits (1, V) with every token the grammar forbids at -inf."""
        return logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token):
        self.matcher.consume_token(int(token))
        return self.matcher.is_stopped()
