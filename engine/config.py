"""ModelConfig: the hyperparameters of one decoder, from a Hugging Face config.json or GGUF metadata.

One dataclass describes every supported architecture; the switches (norm kind, MLP kind, biases, q/k norm,
learned positions, sliding window) select the pieces of the single decoder in engine/model.py.

Checkpoint files are untrusted input: every value is checked for its type and range where it is read, and an
error names the file and the key (config.json `num_attention_heads`, GGUF `llama.attention.head_count`).
"""
import json
import math
from dataclasses import dataclass, field

# HF `architectures[0]` -> our architecture family.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
}
# GGUF `general.architecture` -> our family. llama.cpp writes Mistral models as "llama".
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                      "gpt2": "gpt2"}


class ConfigError(ValueError):
    """A checkpoint's configuration is unsupported or inconsistent."""


# Sizes above this overflow the int64 arithmetic of the kernels long before any real model gets there.
_MAX_SIZE = 2**40


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a value must be, in the words of the error message -> its test.
KINDS = {
    "a positive integer": lambda v: _is_int(v) and 0 < v <= _MAX_SIZE,
    "an integer >= 0": lambda v: _is_int(v) and 0 <= v <= _MAX_SIZE,
    "a number > 0": lambda v: _is_number(v) and v > 0,
    "a number >= 0": lambda v: _is_number(v) and v >= 0,
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "a list of numbers": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) for x in v),
    "an integer >= 0 or a list of them": lambda v: (KINDS["an integer >= 0"](v) or isinstance(v, list)
                                                    and all(KINDS["an integer >= 0"](x) for x in v)),
}
REQUIRED = object()


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(error):
    """An exception's message on one line (errors are printed as one line; some libraries' span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _error(source, message):
    return ConfigError(f"{source}: {message}" if source else message)


def checked(value, kind, what, source):
    """`value` if it is `kind` (a key of KINDS), else a ConfigError naming `source` and `what`."""
    if not KINDS[kind](value):
        raise _error(source, f"{what} must be {kind}, got {_short(value)}")
    return value


def lookup(mapping, key, kind, source, default=REQUIRED):
    """mapping[key], checked to be `kind`; a missing (or null) key gives `default`, or an error without one."""
    value = mapping.get(key)
    if value is None:
        if default is REQUIRED:
            raise _error(source, f"{key} is missing")
        return default
    return checked(value, kind, key, source)


def read_json(path):
    """The JSON object in the file `path`; anything else (not UTF-8, not JSON, not an object) is a ConfigError."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# ModelConfig field -> what it must be; the optional ones (derived when None) are checked when set.
_FIELD_KINDS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "rotary_dim", "max_position_embeddings", "sliding_window"),
                    "a positive integer"),
    "norm_eps": "a number >= 0", "rope_theta": "a number > 0", "partial_rotary_factor": "a number > 0",
    **dict.fromkeys(("learned_positions", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "tie_word_embeddings"),
                    "true or false"),
    "rope_scaling": "an object", "bos_token_id": "an integer >= 0", "eos_token_ids": "a list of integers",
}
_OPTIONAL = ("num_kv_heads", "head_dim", "intermediate_size", "rotary_dim", "sliding_window", "rope_scaling",
             "bos_token_id")


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # "swiglu": down(act(gate) * up) | "gelu": down(act(up))
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rotary_dim: int | None = None  # partial rotary: the first rotary_dim features of each head rotate
    partial_rotary_factor: float = 1.0  # rotary_dim, when not given, is this fraction of head_dim (rounded even)
    learned_positions: bool = False  # GPT-2: absolute position embeddings, no rope
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # a query attends the last `sliding_window` keys (itself included)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    source: str = ""  # the file this came from, for error messages

    def __post_init__(self):
        supported = sorted(set(HF_ARCHITECTURES.values()))
        if self.arch not in supported:
            raise _error(self.source, f"unsupported architecture {_short(self.arch)}; supported: {supported}")
        self._check_kinds()  # before the derivations compute with them
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self._check(self.hidden_size % self.num_heads == 0,
                        f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.rotary_dim is None:
            self._check(self.partial_rotary_factor <= 1,
                        f"partial_rotary_factor must be at most 1, got {self.partial_rotary_factor}")
            self.rotary_dim = int(self.head_dim * self.partial_rotary_factor) // 2 * 2
        self._check_kinds()
        self._check(self.num_heads % self.num_kv_heads == 0,
                    f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self._check(self.rotary_dim % 2 == 0 and self.rotary_dim <= self.head_dim,
                    f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        self._check(self.norm in ("rms", "layer"), f"norm must be 'rms' or 'layer', got {_short(self.norm)}")
        self._check(self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {_short(self.mlp)}")
        self._check(self.activation in ("silu", "gelu", "gelu_tanh"),
                    f"unsupported activation {_short(self.activation)}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_kinds(self):
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                checked(value, kind, name, self.source)

    def _check_rope_scaling(self):
        scaling = self.rope_scaling
        kind = scaling.get("rope_type", scaling.get("type"))
        self._check(kind in ("default", "llama3"),
                    f"unsupported rope scaling (rope_scaling rope_type {_short(kind)}; supported: llama3)")
        if kind == "default":
            self.rope_scaling = None
            return
        where = f"{self.source}: rope_scaling" if self.source else "rope_scaling"
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            lookup(scaling, key, "a number > 0", where)
        lookup(scaling, "original_max_position_embeddings", "a positive integer", where, None)
        self._check(scaling["high_freq_factor"] > scaling["low_freq_factor"],
                    f"rope_scaling high_freq_factor {scaling['high_freq_factor']} must be above low_freq_factor "
                    f"{scaling['low_freq_factor']}")

    def _check(self, ok, message):
        if not ok:
            raise _error(self.source, message)

    @property
    def q_size(self):
        return self.num_heads * self.head_dim

    @property
    def kv_size(self):
        return self.num_kv_heads * self.head_dim

    @property
    def weight_count(self):
        """The number of weights of a model of this config, biases and norms aside."""
        h = self.hidden_size
        attention = h * 2 * (self.q_size + self.kv_size)
        mlp = h * self.intermediate_size * (3 if self.mlp == "swiglu" else 2)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        positions = self.max_position_embeddings * h if self.learned_positions else 0
        return embeddings + positions + self.num_layers * (attention + mlp)

    def check_size(self, n_bytes, weights):
        """Refuse sizes that `n_bytes` of weights (in the file(s) `weights`) cannot hold, before the model, its rope
        table or its layers are built from them."""
        n = self.weight_count
        if n > 8 * n_bytes:  # a weight takes at least one bit in every GGUF block type and safetensors dtype
            raise _error(self.source, f"the config implies {n:,} weights (vocab_size {self.vocab_size}, hidden_size "
                                      f"{self.hidden_size}, num_layers {self.num_layers}, intermediate_size "
                                      f"{self.intermediate_size}, num_heads {self.num_heads} x head_dim "
                                      f"{self.head_dim}), more than the {n_bytes:,} bytes of {weights} can hold")

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json"):
        """From a parsed Hugging Face config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(cfg, dict):
            raise _error(source, f"expected a JSON object, got {type(cfg).__name__}")

        def get(key, kind, default=REQUIRED):
            return lookup(cfg, key, kind, source, default)

        names = get("architectures", "a list of strings", [])
        arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), None)
        model_type = cfg.get("model_type")
        if arch is None and not names and model_type in HF_ARCHITECTURES.values():
            arch = model_type  # a config without `architectures`: its model_type names the family
        if arch is None:
            raise _error(source, f"unsupported architecture {_short(names or model_type)}; "
                                 f"supported: {sorted(HF_ARCHITECTURES)}")
        eos = get("eos_token_id", "an integer >= 0 or a list of them", [])
        common = dict(arch=arch, tie_word_embeddings=get("tie_word_embeddings", "true or false", arch == "gpt2"),
                      bos_token_id=get("bos_token_id", "an integer >= 0", None),
                      eos_token_ids=[eos] if isinstance(eos, int) else eos, source=source)
        if arch == "gpt2":
            hidden = get("n_embd", "a positive integer")
            return cls(vocab_size=get("vocab_size", "a positive integer"), hidden_size=hidden,
                       num_layers=get("n_layer", "a positive integer"), num_heads=get("n_head", "a positive integer"),
                       intermediate_size=get("n_inner", "a positive integer", None) or 4 * hidden, norm="layer",
                       norm_eps=get("layer_norm_epsilon", "a number >= 0", 1e-5), mlp="gelu",
                       activation=_activation(get("activation_function", "a string", "gelu_new"), source),
                       learned_positions=True, max_position_embeddings=get("n_positions", "a positive integer"),
                       qkv_bias=True, o_bias=True, mlp_bias=True, **common)
        rope = dict(get("rope_parameters", "an object", None) or get("rope_scaling", "an object", None) or {})

        def rope_value(key, kind, default):  # transformers 5 moved these into rope_parameters
            value = rope.pop(key, None)
            return get(key, kind, default) if value is None else checked(value, kind, key, source)

        theta = rope_value("rope_theta", "a number > 0", 10000.0)
        partial = rope_value("partial_rotary_factor", "a number > 0", 1.0)
        window = get("sliding_window", "a positive integer", None)
        if arch in ("qwen2", "qwen3") and not get("use_sliding_window", "true or false", False):
            window = None
        attention_bias = get("attention_bias", "true or false", None)
        return cls(vocab_size=get("vocab_size", "a positive integer"),
                   hidden_size=get("hidden_size", "a positive integer"),
                   num_layers=get("num_hidden_layers", "a positive integer"),
                   num_heads=get("num_attention_heads", "a positive integer"),
                   num_kv_heads=get("num_key_value_heads", "a positive integer", None),
                   head_dim=get("head_dim", "a positive integer", None),
                   intermediate_size=get("intermediate_size", "a positive integer"),
                   norm_eps=get("rms_norm_eps", "a number >= 0", 1e-6),
                   activation=_activation(get("hidden_act", "a string", "silu"), source), rope_theta=float(theta),
                   rope_scaling=rope or None, partial_rotary_factor=partial,
                   max_position_embeddings=get("max_position_embeddings", "a positive integer", 2048),
                   qkv_bias=arch == "qwen2" if attention_bias is None else attention_bias,
                   o_bias=bool(attention_bias), mlp_bias=get("mlp_bias", "true or false", False),
                   qk_norm=arch == "qwen3", sliding_window=window, **common)

    @classmethod
    def from_gguf(cls, meta: dict, has_output: bool, source: str = "model.gguf"):
        """From GGUF metadata (llama.cpp key names). `has_output`: the file holds an `output.weight` tensor."""
        gguf_arch = meta.get("general.architecture")
        if not isinstance(gguf_arch, str) or gguf_arch not in GGUF_ARCHITECTURES:
            raise _error(source, f"unsupported GGUF architecture (general.architecture) {_short(gguf_arch)}; "
                                 f"supported: {sorted(GGUF_ARCHITECTURES)}")
        arch = GGUF_ARCHITECTURES[gguf_arch]

        def get(key, kind, default=REQUIRED):
            return lookup(meta, f"{gguf_arch}.{key}", kind, source, default)

        tokens = meta.get("tokenizer.ggml.tokens")
        tokens = tokens if isinstance(tokens, list) else []
        heads = get("attention.head_count", "a positive integer")
        eos = lookup(meta, "tokenizer.ggml.eos_token_id", "an integer >= 0", source, None)
        common = dict(arch=arch, hidden_size=get("embedding_length", "a positive integer"),
                      vocab_size=get("vocab_size", "a positive integer", None) or len(tokens),
                      num_layers=get("block_count", "a positive integer"), num_heads=heads,
                      intermediate_size=get("feed_forward_length", "a positive integer"),
                      max_position_embeddings=get("context_length", "a positive integer", 2048),
                      tie_word_embeddings=not has_output,
                      bos_token_id=lookup(meta, "tokenizer.ggml.bos_token_id", "an integer >= 0", source, None),
                      eos_token_ids=[] if eos is None else [eos], source=source)
        if arch == "gpt2":
            return cls(norm="layer", norm_eps=get("attention.layer_norm_epsilon", "a number >= 0"), mlp="gelu",
                       activation="gelu_tanh", learned_positions=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                       **common)
        scaling = get("rope.scaling.type", "a string", None)
        if scaling not in (None, "none"):
            raise _error(source, f"unsupported rope scaling {scaling!r} ({gguf_arch}.rope.scaling.type)")
        return cls(num_kv_heads=get("attention.head_count_kv", "a positive integer", heads),
                   head_dim=get("attention.key_length", "a positive integer", None),
                   norm_eps=get("attention.layer_norm_rms_epsilon", "a number >= 0"),
                   rope_theta=float(get("rope.freq_base", "a number > 0", 1e4)),
                   rotary_dim=get("rope.dimension_count", "a positive integer", None),
                   qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                   sliding_window=get("attention.sliding_window", "a positive integer", None), **common)


def _activation(name, source):
    kinds = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_fast": "gelu_tanh"}
    if name not in kinds:
        raise ConfigError(f"{source}: unsupported activation {name!r}; supported: {sorted(kinds)}")
    return kinds[name]
