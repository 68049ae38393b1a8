"""Tokenizers: Hugging Face tokenizer.json, or rebuilt from a GGUF file's metadata; chat templates.

Both kinds end up as a `tokenizers.Tokenizer` (fast Rust BPE) wrapped in `Tokenizer`, which adds the special
token ids and renders the chat template the way transformers' `apply_chat_template` does (sandboxed Jinja2,
trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`).
"""
import json
import os
from datetime import datetime

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

# Token texts that end a turn in common chat formats: with the declared EOS they stop generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|end_of_text|>", "</s>",
               "<|eom_id|>")

# llama.cpp `tokenizer.ggml.pre` -> the pre-tokenizer regex its merges were learned with (None: GPT-2's own).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"), [_LLAMA3_SPLIT]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), [_QWEN2_SPLIT]),
    # StarCoder-family vocabularies (SmolLM among them) put every digit in its own piece first.
    **dict.fromkeys(("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    [r"\p{N}", _GPT2_SPLIT]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """encode / decode / chat template over a `tokenizers.Tokenizer`.

    The backend's post-processor adds BOS when the model wants it, so `encode(text)` matches the reference
    tokenizer for both HF and GGUF checkpoints.
    """

    def __init__(self, backend, *, bos_token=None, eos_token=None, chat_template=None, extra_eos=()):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.eos_token_ids = {i for i in [self.eos_token_id, *extra_eos] if i is not None}
        self.eos_token_ids |= {i for i in map(self.token_to_id, END_OF_TURN) if i is not None and self._special(i)}
        self.chat_template = chat_template

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return None if token is None else self.backend.token_to_id(token)

    def _special(self, token_id):
        added = self.backend.get_added_tokens_decoder().get(token_id)
        return added is not None and added.special

    def encode(self, text, add_special_tokens=True):
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """The prompt text for `messages` ([{"role", "content"}, ...]), rendered like transformers does."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or GGUF "
                             "'tokenizer.chat_template')")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kwargs)


def _compile_template(source):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def load_hf_tokenizer(folder, extra_eos=()):
    """From tokenizer.json (+ tokenizer_config.json for special tokens and the chat template) in `folder`."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (flashgen reads fast tokenizers only)")
    backend = _Backend.from_file(path)
    config = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    if config.get("add_bos_token") and bos is not None:
        _ensure_bos(backend, bos)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=template, extra_eos=extra_eos)


def _ensure_bos(backend, bos):
    """Make the post-processor add `bos` when the config asks for it and tokenizer.json does not do it."""
    bos_id = backend.token_to_id(bos)
    if bos_id is None or backend.encode("a").ids[:1] == [bos_id]:
        return
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])


def gguf_tokenizer(meta, source="model.gguf"):
    """Rebuild the tokenizer described by GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, meta.get("tokenizer.ggml.scores"), types,
                                     meta.get("tokenizer.ggml.add_space_prefix", True))
        add_bos_default = True
    else:
        raise ValueError(f"{source}: unsupported tokenizer.ggml.model {kind!r}; supported: ['gpt2', 'llama']")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
        _ensure_bos(backend, bos)
    eot = [meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=meta.get("tokenizer.chat_template"),
                     extra_eos=[i for i in eot if i is not None])


def _byte_level_bpe(tokens, merges, pre):
    """GPT-2-style byte-level BPE: tokens are spelled in GPT-2's byte alphabet, merges are "a b" strings."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _Backend(models.BPE(vocab, pairs, fuse_unk=False))
    splits = _PRE_SPLITS.get(pre)
    if splits is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece_bpe(tokens, scores, types, add_space_prefix):
    """SentencePiece BPE (Llama 1/2, Mistral): merges recovered from the scores, bytes as <0xXX> fallback.

    Every split of a token into two vocabulary pieces is a merge ranked by the token's score (higher first,
    then longer left and right pieces), the order SentencePiece applies them in; spaces become U+2581 and the
    first piece of a text gets one prepended (add_space_prefix)."""
    if scores is None:
        raise ValueError("a SentencePiece GGUF tokenizer needs tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:cut], token[cut:], score) for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    backend = _Backend(models.BPE(vocab, [(m[0], m[1]) for m in merges], unk_token=unk, fuse_unk=True,
                                  byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if add_space_prefix else "never")
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + strip)
    return backend
