"""Tokenizers: Hugging Face tokenizer.json, or rebuilt from a GGUF file's metadata; chat templates.

Both kinds end up as a `tokenizers.Tokenizer` (fast Rust BPE) wrapped in `Tokenizer`, which adds the special
token ids and renders the chat template the way transformers' `apply_chat_template` does (sandboxed Jinja2,
trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`).

Tokenizer files and chat templates come with the checkpoint: a malformed one is a CheckpointError or ConfigError
naming the file and the field, and a template that does not parse or raises is a ChatTemplateError.
"""
import json
import os
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from .config import REQUIRED, ConfigError, checked, lookup, one_line, read_json
from .gguf import CheckpointError

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
# What a chat template may build: a rendered prompt is a few thousand characters.
_MAX_TEMPLATE_ITEMS = 10**6
_MAX_TEMPLATE_INT_BITS = 4096


class ChatTemplateError(ValueError):
    """A chat template that does not parse, or raised while rendering."""


class Tokenizer:
    """encode / decode / chat template over a `tokenizers.Tokenizer`.

    The backend's post-processor adds BOS when the model wants it, so `encode(text)` matches the reference
    tokenizer for both HF and GGUF checkpoints.
    """

    def __init__(self, backend, *, bos_token=None, eos_token=None, chat_template=None, extra_eos=(), source="",
                 chat_template_source="chat_template"):
        self.backend = backend
        self.source = source  # the tokenizer's file, for error messages
        self.chat_template_source = chat_template_source  # "<file>: <field>" of the template
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

    def check_ids_below(self, vocab_size, what):
        """Refuse token ids the model has no embedding for: at or past `vocab_size` (`what`, for the message)."""
        top = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= vocab_size:
            raise CheckpointError(f"{self.source}: token ids go up to {top}, but {what} is {vocab_size}")

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
        try:
            template = _TemplateSandbox().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.chat_template_source} does not parse (line {e.lineno}: "
                                    f"{one_line(e.message)})") from None
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except Exception as e:  # the template is the checkpoint's code: whatever it raises is its error
            raise ChatTemplateError(f"{self.chat_template_source} failed: {type(e).__name__}: {one_line(e)}") from e


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat template environment, where `*` and `**` cannot build huge values: a checkpoint's
    template must not exhaust the memory ('x' * 10**10) or the CPU (10 ** 10 ** 10)."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                        ensure_ascii=ensure_ascii)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_TEMPLATE_ITEMS:
                    raise SecurityError(f"'*' would build {len(seq) * n} items (at most {_MAX_TEMPLATE_ITEMS})")
        elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            bits = right * abs(left).bit_length()
            if bits > _MAX_TEMPLATE_INT_BITS:
                raise SecurityError(f"'**' would build an integer of about {bits} bits")
        return super().call_binop(context, operator, left, right)


def _token_text(config, key, source):
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's fields
    return None if value is None else checked(value, "a string", key, source)


def _hf_chat_template(config, config_path, folder):
    """(template, "<file>: <field>" it came from) of tokenizer_config.json or chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
        if not named or len(named) < len(template):
            raise ConfigError(f"{config_path}: chat_template must be a string or a list of {{'name', 'template'}} "
                              f"objects")
        template = next((t["template"] for t in named if t.get("name") == "default"), named[0]["template"])
    if template is not None:
        return checked(template, "a string", "chat_template", config_path), f"{config_path}: chat_template"
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if not os.path.exists(jinja_path):
        return None, None
    with open(jinja_path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8"), f"{jinja_path}: chat_template"
    except UnicodeDecodeError as e:
        raise ConfigError(f"{jinja_path}: the chat_template is not UTF-8 text ({e})") from None


def load_hf_tokenizer(folder, extra_eos=()):
    """From tokenizer.json (+ tokenizer_config.json for special tokens and the chat template) in `folder`."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (flashgen reads fast tokenizers only)")
    try:
        backend = _Backend.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for any malformed file
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({one_line(e)})") from None
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = read_json(config_path) if os.path.exists(config_path) else {}
    template, template_source = _hf_chat_template(config, config_path, folder)
    bos, eos = _token_text(config, "bos_token", config_path), _token_text(config, "eos_token", config_path)
    if lookup(config, "add_bos_token", "true or false", config_path, False) and bos is not None:
        _ensure_bos(backend, bos)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=template, extra_eos=extra_eos,
                     source=path, chat_template_source=template_source)


def _ensure_bos(backend, bos):
    """Make the post-processor add `bos` when the config asks for it and tokenizer.json does not do it."""
    bos_id = backend.token_to_id(bos)
    if bos_id is None or backend.encode("a").ids[:1] == [bos_id]:
        return
    # Templates as lists of pieces: a token's text may hold spaces, which the string form splits on.
    backend.post_processor = processors.TemplateProcessing(single=[bos, "$A"], pair=[bos, "$A", bos, "$B"],
                                                           special_tokens=[(bos, bos_id)])


def gguf_tokenizer(meta, source="model.gguf"):
    """Rebuild the tokenizer described by GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""

    def get(key, kind, default=REQUIRED):
        return lookup(meta, f"tokenizer.ggml.{key}", kind, source, default)

    if meta.get("tokenizer.ggml.tokens") is None:
        raise ValueError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
    kind = get("model", "a string", None)
    tokens = get("tokens", "a list of strings")
    if not tokens:
        raise ConfigError(f"{source}: tokenizer.ggml.tokens is empty")
    types = get("token_type", "a list of integers", None) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ConfigError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, get("merges", "a list of strings", []), get("pre", "a string", None),
                                  source)
        add_bos_default = False
    elif kind == "llama":
        scores = get("scores", "a list of numbers")
        if len(scores) != len(tokens):
            raise ConfigError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        backend = _sentencepiece_bpe(tokens, scores, types, get("add_space_prefix", "true or false", True), source)
        add_bos_default = True
    else:
        raise ValueError(f"{source}: unsupported tokenizer.ggml.model {kind!r}; supported: ['gpt2', 'llama']")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
        index = get(key, "an integer >= 0", None)
        return tokens[index] if index is not None and index < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if get("add_bos_token", "true or false", add_bos_default) and bos is not None:
        _ensure_bos(backend, bos)
    eot = [get("eot_token_id", "an integer >= 0", None), get("eom_token_id", "an integer >= 0", None)]
    return Tokenizer(backend, bos_token=bos, eos_token=eos,
                     chat_template=lookup(meta, "tokenizer.chat_template", "a string", source, None),
                     extra_eos=[i for i in eot if i is not None], source=source,
                     chat_template_source=f"{source}: tokenizer.chat_template")


def _bpe(source, fields, vocab, merges, **options):
    try:
        return models.BPE(vocab, merges, **options)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of tokens not in the vocabulary
        raise CheckpointError(f"{source}: {fields} do not make a BPE vocabulary ({one_line(e)})") from None


def _byte_level_bpe(tokens, merges, pre, source):
    """GPT-2-style byte-level BPE: tokens are spelled in GPT-2's byte alphabet, merges are "a b" strings."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((i for i, p in enumerate(pairs) if len(p) != 2), None)
    if bad is not None:
        raise ConfigError(f"{source}: tokenizer.ggml.merges[{bad}] is {merges[bad]!r}, not two tokens separated "
                          f"by a space")
    backend = _Backend(_bpe(source, "tokenizer.ggml.tokens and tokenizer.ggml.merges", vocab, pairs,
                            fuse_unk=False))
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


def _sentencepiece_bpe(tokens, scores, types, add_space_prefix, source):
    """SentencePiece BPE (Llama 1/2, Mistral): merges recovered from the scores, bytes as <0xXX> fallback.

    Every split of a token into two vocabulary pieces is a merge ranked by the token's score (higher first,
    then longer left and right pieces), the order SentencePiece applies them in; spaces become U+2581 and the
    first piece of a text gets one prepended (add_space_prefix)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:cut], token[cut:], score) for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    backend = _Backend(_bpe(source, "tokenizer.ggml.tokens", vocab, [(m[0], m[1]) for m in merges], unk_token=unk,
                            fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if add_space_prefix else "never")
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + strip)
    return backend
