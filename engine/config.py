"""ModelConfig: the hyperparameters of one decoder, from a Hugging Face config.json or GGUF metadata.

One dataclass describes every supported architecture; the switches (norm kind, MLP kind, biases, q/k norm,
learned positions, sliding window) select the pieces of the single decoder in engine/model.py.
"""
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
            raise ConfigError(f"{self.source}: unsupported architecture {self.arch!r}; supported: {supported}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self._check(self.hidden_size % self.num_heads == 0,
                        f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            self._check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        self._check(self.num_heads % self.num_kv_heads == 0,
                    f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self._check(self.rotary_dim % 2 == 0 and self.rotary_dim <= self.head_dim,
                    f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        self._check(self.norm in ("rms", "layer"), f"norm must be 'rms' or 'layer', got {self.norm!r}")
        self._check(self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        self._check(self.activation in ("silu", "gelu", "gelu_tanh"), f"unsupported activation {self.activation!r}")
        self._check(self.sliding_window is None or self.sliding_window > 0,
                    f"sliding_window must be positive, got {self.sliding_window}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            self._check(kind in ("default", "llama3"), f"unsupported rope scaling {kind!r} (supported: llama3)")
            if kind == "default":
                self.rope_scaling = None

    def _check(self, ok, message):
        if not ok:
            raise ConfigError(f"{self.source}: {message}" if self.source else message)

    @property
    def q_size(self):
        return self.num_heads * self.head_dim

    @property
    def kv_size(self):
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json"):
        """From a parsed Hugging Face config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        names = cfg.get("architectures") or []
        arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), None)
        if arch is None and not names and cfg.get("model_type") in HF_ARCHITECTURES.values():
            arch = cfg["model_type"]  # a config without `architectures`: its model_type names the family
        if arch is None:
            raise ConfigError(f"{source}: unsupported architecture {names or cfg.get('model_type')!r}; "
                              f"supported: {sorted(HF_ARCHITECTURES)}")
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        common = dict(arch=arch, tie_word_embeddings=cfg.get("tie_word_embeddings", arch == "gpt2"),
                      bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos, source=source)
        if arch == "gpt2":
            hidden = cfg["n_embd"]
            return cls(vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["n_layer"],
                       num_heads=cfg["n_head"], intermediate_size=cfg.get("n_inner") or 4 * hidden, norm="layer",
                       norm_eps=cfg.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                       activation=_activation(cfg.get("activation_function", "gelu_new"), source),
                       learned_positions=True, max_position_embeddings=cfg["n_positions"], qkv_bias=True,
                       o_bias=True, mlp_bias=True, **common)
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads"), head_dim=head_dim,
                   intermediate_size=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   activation=_activation(cfg.get("hidden_act", "silu"), source), rope_theta=float(theta),
                   rope_scaling=rope or None, rotary_dim=int(head_dim * partial) // 2 * 2,
                   max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                   qkv_bias=cfg.get("attention_bias", arch == "qwen2"), o_bias=cfg.get("attention_bias", False),
                   mlp_bias=cfg.get("mlp_bias", False), qk_norm=arch == "qwen3", sliding_window=window, **common)

    @classmethod
    def from_gguf(cls, meta: dict, has_output: bool, source: str = "model.gguf"):
        """From GGUF metadata (llama.cpp key names). `has_output`: the file holds an `output.weight` tensor."""
        gguf_arch = meta.get("general.architecture")
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported GGUF architecture {gguf_arch!r}; "
                              f"supported: {sorted(GGUF_ARCHITECTURES)}")
        arch = GGUF_ARCHITECTURES[gguf_arch]

        def get(key, default=None):
            return meta.get(f"{gguf_arch}.{key}", default)

        def need(key):
            if f"{gguf_arch}.{key}" not in meta:
                raise ConfigError(f"{source}: metadata key {gguf_arch}.{key} is missing")
            return meta[f"{gguf_arch}.{key}"]

        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        heads = need("attention.head_count")
        hidden = need("embedding_length")
        head_dim = get("attention.key_length") or hidden // heads
        eos = meta.get("tokenizer.ggml.eos_token_id")
        common = dict(arch=arch, vocab_size=vocab, hidden_size=hidden, num_layers=need("block_count"),
                      num_heads=heads, intermediate_size=need("feed_forward_length"),
                      max_position_embeddings=get("context_length", 2048), tie_word_embeddings=not has_output,
                      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                      eos_token_ids=[] if eos is None else [eos], source=source)
        if arch == "gpt2":
            return cls(norm="layer", norm_eps=need("attention.layer_norm_epsilon"), mlp="gelu",
                       activation="gelu_tanh", learned_positions=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                       **common)
        if get("rope.scaling.type") not in (None, "none"):
            raise ConfigError(f"{source}: unsupported rope scaling {get('rope.scaling.type')!r}")
        return cls(num_kv_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
                   norm_eps=need("attention.layer_norm_rms_epsilon"), rope_theta=float(get("rope.freq_base", 1e4)),
                   rotary_dim=get("rope.dimension_count", head_dim),
                   qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", sliding_window=get("attention.sliding_window"),
                   **common)


def _activation(name, source):
    kinds = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_fast": "gelu_tanh"}
    if name not in kinds:
        raise ConfigError(f"{source}: unsupported activation {name!r}; supported: {sorted(kinds)}")
    return kinds[name]
