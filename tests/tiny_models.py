"""Tiny random Hugging Face checkpoints, built offline, for engine tests.

Each supported architecture gets a 2-layer model from a hand-written config (no download), saved with
`save_pretrained` next to a tiny byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a
chat template). Use the session fixture:

    from tiny_models import tiny_models  # noqa: F401  (pytest fixture)

    def test_x(tiny_models):
        path = tiny_models["llama"]          # built on first use, then cached for the session
"""
import json
import os

import pytest
import torch

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "def main():\n    print('hello')\n    return 0\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 12345, 3.14159; café naïve 東京 😀",
    "In the beginning was the word, and the word was with the model.",
]

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False, initializer_range=0.1)

# architecture -> (transformers class name, config overrides)
CONFIGS = {
    "llama": ("LlamaForCausalLM", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=32),
                                       rope_theta=10000.0, rms_norm_eps=1e-5)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=7, head_dim=16)),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
    # intermediate 84: the vector kernels' tails (not a multiple of 16 or 8) on a gated MLP
    "phi3": ("Phi3ForCausalLM", dict(num_key_value_heads=4, pad_token_id=0, intermediate_size=84)),
    "gpt2": ("GPT2LMHeadModel", dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.1)),
}
ARCHITECTURES = tuple(CONFIGS)


def save_tokenizer(path):
    """Train a byte-level BPE of at most VOCAB_SIZE tokens on a fixed corpus and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHAT_TEMPLATE,
              "model_max_length": 256, "add_bos_token": False}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def make_model(arch, seed=0):
    """A random float32 transformers model of `arch` (a key of CONFIGS), in eval mode."""
    import transformers

    class_name, overrides = CONFIGS[arch]
    cls = getattr(transformers, class_name)
    kwargs = overrides if arch == "gpt2" else {**_COMMON, **overrides}
    config = cls.config_class(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
        # Random norm weights, so a swapped or missing norm weight shows in the logits.
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name):
                p.data.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.data.normal_(0, 0.1)
    return model.float().eval()


def save_tiny_model(arch, path, seed=0):
    """Save a tiny random `arch` checkpoint with its tokenizer into `path`; returns path."""
    os.makedirs(path, exist_ok=True)
    make_model(arch, seed).save_pretrained(path)
    save_tokenizer(path)
    return str(path)


class TinyModels:
    """Lazily built, cached checkpoint folders, one per architecture."""

    def __init__(self, root):
        self.root = root
        self._paths = {}

    def __getitem__(self, arch):
        if arch not in self._paths:
            self._paths[arch] = save_tiny_model(arch, os.path.join(self.root, arch))
        return self._paths[arch]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return TinyModels(str(tmp_path_factory.mktemp("tiny_models")))
