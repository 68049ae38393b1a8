"""Every architecture against transformers: a tiny random checkpoint saved with save_pretrained, loaded by us.

float32 logits within 1e-4 relative (max |ours - theirs| / max |theirs|) for a right-padded batch of prompts of
different lengths, 32 greedy tokens identical, and prefill + decode through the KV cache equal to the full
recompute.
"""
import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_models  # noqa: F401  (fixture)

from flashgen.engine.loader import load_model

LENGTHS = [19, 7, 1]
NEW_TOKENS = 32


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def right_padded(lengths, vocab=300):
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return ids, torch.tensor(lengths)


def reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pair(request, tiny_models):  # noqa: F811
    path = tiny_models[request.param]
    return load_model(path, max_batch_size=len(LENGTHS), max_seq_len=64), reference(path)


@torch.inference_mode()
def test_logits_match_transformers(pair):
    ours, theirs = pair
    ids, lengths = right_padded(LENGTHS)
    expected = theirs(ids).logits  # causal: the padding after a prompt cannot change its logits
    got = ours.model(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    for i, n in enumerate(LENGTHS):
        assert rel_err(got[i, :n], expected[i, :n]) < 1e-4
    last = ours.model.prefill(ids, lengths)
    assert last.shape == (len(LENGTHS), expected.shape[-1])
    for i, n in enumerate(LENGTHS):
        assert rel_err(last[i], expected[i, n - 1]) < 1e-4
    assert ours.model.cache_seqlens.tolist() == LENGTHS


@torch.inference_mode()
def test_greedy_tokens_and_cache_match(pair):
    ours, theirs = pair
    ids, lengths = right_padded(LENGTHS)
    model = ours.model
    logits = model.prefill(ids, lengths)
    steps = [logits]
    for _ in range(NEW_TOKENS - 1):
        steps.append(model.decode(steps[-1].argmax(-1)))
    tokens = torch.stack([s.argmax(-1) for s in steps], dim=1)  # (B, NEW_TOKENS)
    assert model.cache_seqlens.tolist() == [n + NEW_TOKENS - 1 for n in LENGTHS]
    for i, n in enumerate(LENGTHS):
        # transformers, greedy by full recompute of the growing sequence
        seq = ids[i:i + 1, :n]
        for _ in range(NEW_TOKENS):
            seq = torch.cat([seq, theirs(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert tokens[i].tolist() == seq[0, n:].tolist()
        # our cached logits at every step equal our own recompute of the whole sequence
        full = model(seq[:, :-1])[0, n - 1:]
        cached = torch.stack([s[i] for s in steps])
        assert rel_err(cached, full) < 1e-5


@torch.inference_mode()
def test_cache_memory_is_head_major(pair):
    """The cache memory is (layers, batch, kv_heads, max_seq_len, head_dim), so that one sequence's keys of one kv
    head lie contiguous, the keys (on the CPU) key-major, (.., head_dim, max_seq_len); the forward writes them
    through the op's (batch, seq, kv_heads, head_dim) views."""
    model = pair[0].model
    cache, c = model.cache, model.config
    cache.k_heads.zero_(), cache.v_heads.zero_()  # earlier tests left rows behind
    model.prefill(*right_padded(LENGTHS))
    k, v = cache.layer(1)
    assert k.shape == v.shape == (cache.max_batch_size, cache.max_seq_len, c.num_kv_heads, c.head_dim)
    n = LENGTHS[0]
    assert cache.key_major and cache.k_heads[1, 0, -1].shape == (c.head_dim, cache.max_seq_len)
    for mem in (cache.k_heads[1, 0, -1], cache.v_heads[1, 0, -1]):
        assert mem.is_contiguous()
    for rows in (cache.k_heads[1, 0, -1].t(), cache.v_heads[1, 0, -1]):  # (max_seq_len, head_dim)
        assert (rows[:n].abs().sum(-1) > 0).all() and not rows[n:].any()  # written: the prompt's n rows only
    assert torch.equal(k[0, :, -1], cache.k_heads[1, 0, -1].t()) and torch.equal(v[0, :, -1], cache.v_heads[1, 0, -1])


@torch.inference_mode()
def test_append_prefill_continues_the_cache(pair):
    """A chat's next turn: prefill(append=True) of the new tokens after a cached prefix (uneven per row) gives
    the logits of a prefill of the whole sequences, and the same cache contents for the steps after it."""
    model = pair[0].model
    first, first_len = right_padded([5, 9, 2])
    more, more_len = right_padded([4, 1, 6])
    whole = [torch.cat([first[i, :a], more[i, :b]]) for i, (a, b) in enumerate(zip([5, 9, 2], [4, 1, 6]))]
    whole_ids, whole_len = right_padded([len(w) for w in whole])
    for i, w in enumerate(whole):
        whole_ids[i, :len(w)] = w
    expected = model.prefill(whole_ids, whole_len)
    expected_next = model.decode(expected.argmax(-1))
    model.prefill(first, first_len)
    got = model.prefill(more, more_len, append=True)
    assert model.cache_seqlens.tolist() == whole_len.tolist()
    assert rel_err(got, expected) < 1e-5
    assert rel_err(model.decode(expected.argmax(-1)), expected_next) < 1e-5
    with pytest.raises(ValueError, match="continues the active batch"):
        model.prefill(more[:1], more_len[:1], append=True)


@torch.inference_mode()
def test_bfloat16_runs_close_to_float32(tiny_models):  # noqa: F811
    path = tiny_models["llama"]
    ids, lengths = right_padded(LENGTHS)
    f32 = load_model(path, max_batch_size=3, max_seq_len=32).model
    bf16 = load_model(path, dtype=torch.bfloat16, max_batch_size=3, max_seq_len=32).model
    assert bf16.tok_embeddings.weight.dtype == torch.bfloat16
    a, b = f32.prefill(ids, lengths), bf16.prefill(ids, lengths)
    assert b.dtype == torch.float32
    assert rel_err(b, a) < 5e-2
    a, b = f32.decode(a.argmax(-1)), bf16.decode(a.argmax(-1))
    assert rel_err(b, a) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_cuda_runs_the_same_code(tiny_models, arch):  # noqa: F811
    """The same model on CUDA (float32, then bfloat16 and int4 weights) follows the CPU float32 logits."""
    path = tiny_models[arch]
    ids, lengths = right_padded(LENGTHS)
    cpu = load_model(path, max_batch_size=3, max_seq_len=64).model
    expected = cpu.prefill(ids, lengths)
    expected_next = cpu.decode(expected.argmax(-1))
    for dtype, quant, tol in ((torch.float32, None, 1e-3), (torch.bfloat16, None, 5e-2), (torch.float32, "int4", 0.6)):
        gpu = load_model(path, device="cuda", dtype=dtype, quant=quant, max_batch_size=3, max_seq_len=64).model
        got = gpu.prefill(ids.cuda(), lengths.cuda())
        assert rel_err(got.cpu(), expected) < tol, (dtype, quant)
        assert rel_err(gpu.decode(expected.argmax(-1).cuda()).cpu(), expected_next) < tol, (dtype, quant)
