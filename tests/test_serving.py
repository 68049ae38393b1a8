"""The serving engine: block manager, scheduler, packed forward and batch invariance.

Batch invariance: on the CPU a request's tokens and logprobs are bitwise the same whether it runs alone or
beside others, joins mid-way, is prefilled in chunks, or is preempted and recomputed. That needs every kernel
row to be independent of the rows beside it (linears, attention splits and tiles), checked here first.
"""
import random
from types import SimpleNamespace

import pytest
import torch

from flashgen.engine.block_manager import BlockManager
from flashgen.engine.engine import Engine
from flashgen.engine.llm import LLM
from flashgen.engine.loader import load_model
from flashgen.engine.sampling import SamplingParams
from flashgen.kernels import ggml, ggml_linear, int4_linear, int8_linear, int8_linear_dynamic
from flashgen.kernels.qlinear import quantize_int4, quantize_int8
from test_ggml_quant import random_weight
from test_llm import ScriptedModel, tokenizer  # noqa: F401  (pytest fixture)
from tiny_models import ARCHITECTURES, tiny_models  # noqa: F401

ROWS = [1, 2, 3, 5, 17, 64, 65, 130]  # row counts of every tile and chunk path


# ---------------------------------------------------------------- kernels: a row does not depend on M
def _linears():
    w = torch.randn(97, 256)
    cases = [("int4", lambda x, q=quantize_int4(w, 32): int4_linear(x, q)),
             ("int8", lambda x, q=quantize_int8(w): int8_linear(x, q)),
             ("int8_dynamic", lambda x, q=quantize_int8(w): int8_linear_dynamic(x, q))]
    for name in sorted(t.name for t in ggml.BLOCK_TYPES.values() if t.cpu_kernel):
        cases.append((name, lambda x, q=random_weight(name, 33, 512, seed=1): ggml_linear(x, q)))
    return cases


@pytest.mark.parametrize("name,linear", _linears(), ids=lambda c: c if isinstance(c, str) else "")
def test_linear_rows_do_not_depend_on_the_row_count(name, linear):
    k = 512 if name.startswith(("Q", "IQ")) else 256
    x = torch.randn(max(ROWS), k)
    full = linear(x)
    for m in ROWS:
        assert torch.equal(linear(x[:m]), full[:m]), f"{name}: rows differ with {m} rows"


# ---------------------------------------------------------------- block manager
def _seq(tokens, prompt=None):
    return SimpleNamespace(token_ids=list(tokens), num_prompt_tokens=prompt or len(tokens), num_computed=0,
                           num_cached_prompt=0, block_table=[], block_hashes=[])


def _compute(bm, seq, upto):
    assert bm.can_grow(seq, upto)
    bm.grow(seq, upto)
    seq.num_computed = upto
    bm.commit(seq)


def test_block_manager_refcounts_prefix_hits_and_lru_eviction():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = _seq(range(10))
    bm.start(a)
    assert a.num_computed == 0 and bm.hits == 0
    _compute(bm, a, 10)
    assert len(a.block_table) == 3 and bm.num_free == 3
    # b shares a's first two full blocks (8 tokens), then diverges.
    b = _seq([*range(8), 99, 98, 97])
    bm.start(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8 and b.num_cached_prompt == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    _compute(bm, b, 11)
    # Never the last token: a prompt of exactly two full blocks gets one from the cache.
    c = _seq(range(8))
    bm.start(c)
    assert c.num_computed == 4
    bm.release(c)
    bm.release(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.release(b)
    assert bm.num_free == 6 and all(blk.ref_count == 0 for blk in bm.blocks)
    # Freed full blocks stay findable until needed: a's third block (tokens 8-9) was never full.
    d = _seq(range(10))
    bm.start(d)
    assert d.num_computed == 8
    bm.release(d)
    # Taking all 6 blocks evicts the cached ones, least recently freed first, and forgets their hashes.
    e = _seq([50 + i for i in range(24)])
    _compute(bm, e, 24)
    assert bm.num_free == 0 and not bm.by_hash.keys() - {bm.blocks[i].hash for i in e.block_table}
    bm.release(e)
    f = _seq(range(10))
    bm.start(f)
    assert f.num_computed == 0, "evicted blocks must not be found"
    assert bm.num_free == 6


def test_block_manager_without_prefix_caching_never_shares():
    bm = BlockManager(num_blocks=4, block_size=4, prefix_caching=False)
    a, b = _seq(range(9)), _seq(range(9))
    for s in (a, b):
        bm.start(s)
        _compute(bm, s, 6)
    assert not set(a.block_table) & set(b.block_table) and bm.queries == 0


# ---------------------------------------------------------------- scheduler (on the scripted model)
def _engine(tokenizer, **options):
    model = ScriptedModel(tokenizer.vocab_size, tokenizer.eos_token_ids, max_seq_len=64, block_size=16)
    return Engine(model, tokenizer, tokenizer.eos_token_ids, **options), model


def _alone(tokenizer, prompt, params):
    engine, _ = _engine(tokenizer)
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    return engine.sequences(rid)[0].output_ids


def test_scheduler_budget_decodes_first_chunks_and_preemption(tokenizer):  # noqa: F811
    engine, model = _engine(tokenizer, max_num_seqs=3, max_num_batched_tokens=20, num_blocks=8)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [[random.Random(i).randrange(5, 200) for _ in range(n)] for i, n in enumerate([45, 7, 30, 12, 3])]
    rids = [engine.add_request(p, params) for p in prompts]
    schedule, steps = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: steps.append([(seq, n, seq.num_tokens - seq.num_computed)
                                                      for seq, n in schedule()]) or [x[:2] for x in steps[-1]]
    while engine.has_unfinished():
        engine.step()
        step = steps[-1]
        assert sum(n for _, n, _ in step) <= 20 and len(engine.scheduler.running) <= 3
        decodes = [left == 1 for _, _, left in step]
        assert decodes == sorted(decodes, reverse=True), "decodes come before prefill chunks"
        assert len(steps) < 500
    assert any(n < left for step in steps for _, n, left in step), "a prompt was chunked"
    assert engine.scheduler.num_preemptions > 0, "8 blocks of 16 for 5 sequences must preempt"
    for rid, prompt in zip(rids, prompts):
        assert engine.sequences(rid)[0].output_ids == _alone(tokenizer, prompt, params)
    assert engine.blocks.num_free == 8 and all(b.ref_count == 0 for b in engine.blocks.blocks)


def test_abort_frees_every_block(tokenizer):  # noqa: F811
    engine, _ = _engine(tokenizer, num_blocks=12)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    rids = [engine.add_request([7 + i] * (10 + 9 * i), params) for i in range(3)]
    engine.step()
    engine.step()
    engine.abort(rids[1])
    assert engine.sequences(rids[1])[0].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == 12
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], params, request_id=rids[0])
    with pytest.raises(ValueError, match="context holds 64"):
        engine.add_request([1] * 64, params)
    with pytest.raises(ValueError, match="must be in"):
        engine.add_request([tokenizer.vocab_size], params)
    with pytest.raises(ValueError, match="max_num_batched_tokens >= max_num_seqs"):
        _engine(tokenizer, max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="at least one sequence"):
        _engine(tokenizer, num_blocks=3)


def test_n_samples_share_the_prompt_blocks(tokenizer):  # noqa: F811
    engine, model = _engine(tokenizer)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=5, max_tokens=6, n=3)
    prompt = list(range(20, 60))  # 40 tokens: two full blocks of 16
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    outs = [s.output_ids for s in engine.sequences(rid)]
    assert len(set(map(tuple, outs))) > 1, "different seeds per sample"
    assert model.computed == 40 + 2 * (40 - 32) + 3 * 5, "samples 2 and 3 prefill only past the shared blocks"
    for i, out in enumerate(outs):
        alone = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=5 + i, max_tokens=6)
        assert out == _alone(tokenizer, prompt, alone)


# ---------------------------------------------------------------- the real model
@pytest.mark.parametrize("quant", [None, "int4", "int8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_cpp_forward_matches_python_layers(tiny_models, arch, quant):  # noqa: F811
    """One packed step of a prefill chunk over a cached prefix, a whole prompt and two decodes."""
    model = load_model(tiny_models[arch], quant=quant, max_seq_len=128).model
    model.setup_cache(4, 128)
    vocab, table = model.config.vocab_size, model.cache.block_table
    prefix = torch.randint(0, vocab, (70,))
    cu0 = torch.tensor([0, 70], dtype=torch.int32)
    model.forward_packed(prefix, cu0, torch.tensor([0], dtype=torch.int32), table[:1], torch.tensor([69]))
    for b in (2, 3):  # the decoding sequences hold 9 and 100 tokens
        n = 9 if b == 2 else 100
        model.forward_packed(prefix[:n] if n <= 70 else torch.cat([prefix, prefix[:30]]),
                             torch.tensor([0, n], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                             table[b:b + 1], torch.tensor([n - 1]))
    tokens = torch.randint(0, vocab, (33 + 21 + 2,))
    cu = torch.tensor([0, 33, 54, 55, 56], dtype=torch.int32)
    cached = torch.tensor([70, 0, 9, 100], dtype=torch.int32)
    rows = torch.tensor([32, 53, 54, 55, 10])
    out = {}
    for cpp in (True, False):
        model.cpp_step, model._cpp_step = cpp, None
        out[cpp] = model.forward_packed(tokens, cu, cached, table, rows)
        assert bool(model._cpp_step) == cpp, "the C++ step was (not) used"
    ref = out[False]
    tol = 2e-5 if quant is None else 3e-2
    torch.testing.assert_close(out[True], ref, atol=tol * ref.abs().max().item(), rtol=0)


def _schedule(n, seed):
    rnd = random.Random(seed)
    reqs = []
    for i in range(n):
        length = rnd.choice([1, 5, 17, 63, 64, 65, 130, 200])
        greedy = rnd.random() < 0.4
        params = SamplingParams(temperature=0 if greedy else rnd.choice([0.7, 1.0]), top_k=rnd.choice([0, 20]),
                                top_p=rnd.choice([1.0, 0.9]), min_p=0.0, seed=rnd.randrange(100),
                                repetition_penalty=rnd.choice([1.0, 1.1]), max_tokens=rnd.randrange(3, 14),
                                ignore_eos=True, logprobs=rnd.choice([None, 0, 3]))
        reqs.append(([rnd.randrange(3, 300) for _ in range(length)], params, rnd.randrange(0, 12)))
    return reqs


@pytest.mark.parametrize("quant", [None, "int4", "int8"])
def test_batch_invariance_random_arrivals(tiny_models, quant):  # noqa: F811
    """A dozen requests arriving at random steps, mixed lengths, sampling params and seeds, in a pool small
    enough to preempt and a token budget that chunks prompts: each equals itself run alone, bit for bit."""
    llm = LLM(tiny_models["llama"], device="cpu", quant=quant, max_seq_len=256, num_blocks=14,
              max_num_batched_tokens=96, max_num_seqs=8)
    engine = llm.engine
    reqs = _schedule(12, seed=3)
    rids, step = {}, 0
    while len(rids) < len(reqs) or engine.has_unfinished():
        for i, (prompt, params, at) in enumerate(reqs):
            if at == step and i not in rids:
                rids[i] = engine.add_request(prompt, params)
        engine.step()
        step += 1
    assert engine.scheduler.num_preemptions > 0
    batched = {i: engine.sequences(rid)[0] for i, rid in rids.items()}
    for i, (prompt, params, _) in enumerate(reqs):
        rid = engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
        alone = engine.sequences(rid)[0]
        assert alone.output_ids == batched[i].output_ids, f"request {i}: tokens differ"
        assert alone.logprobs == batched[i].logprobs and alone.top_logprobs == batched[i].top_logprobs
    assert engine.blocks.num_free == 14
