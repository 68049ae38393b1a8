"""The C++ forward (engine/cpu_decoder.py, csrc/cpu/decoder.cpp: prefill, appended turns, decode steps) against
the model's Python layers.

Both compute the same layers with the same kernels, so float32 models agree to float rounding. With int4 /
int8 weights the activations are rounded to int8 inside the linears, and a last-bit difference upstream can
move one rounding: the bound there is looser, and greedy tokens must still agree.
"""
import os
import subprocess
import sys

import pytest
import torch

from flashgen.engine.loader import load_model
from tiny_models import ARCHITECTURES, tiny_models  # noqa: F401

QUANTS = [None, "int4", "int8"]


def _load(tiny_models, arch, quant, batch=1, kv_cache_dtype=None):
    return load_model(tiny_models[arch], quant=quant, max_seq_len=48, max_batch_size=batch,
                      kv_cache_dtype=kv_cache_dtype).model


def _decode_run(model, prompts, lengths, steps, cpp):
    model.cpp_step = cpp
    model._cpp_step = None
    logits = [model.prefill(prompts, lengths)]
    for tokens in steps[:4]:
        logits.append(model.decode(tokens))
    logits.append(model.prefill(steps[4:7].T, torch.tensor([3, 2]), append=True))  # a next turn, uneven
    for tokens in steps[7:]:
        logits.append(model.decode(tokens))
    if cpp:
        assert model._cpp_step, "the C++ step was not used"
    return torch.stack(logits), model.cache_seqlens.clone()


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_step_matches_python_layers(tiny_models, arch, quant):
    model = _load(tiny_models, arch, quant, batch=2)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (2, 11))
    lengths = torch.tensor([11, 4])  # uneven: the second sequence decodes at other positions
    steps = torch.randint(0, vocab, (9, 2))
    ours, lens = _decode_run(model, prompts, lengths, steps, cpp=True)
    ref, ref_lens = _decode_run(model, prompts, lengths, steps, cpp=False)
    assert torch.equal(lens, ref_lens) and lens.tolist() == [11 + 4 + 3 + 2, 4 + 4 + 2 + 2]
    tol = 2e-5 if quant is None else 3e-2
    torch.testing.assert_close(ours, ref, atol=tol * ref.abs().max().item(), rtol=0)
    if quant is None:
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_step_with_a_16_bit_cache_matches_python_layers(tiny_models, arch, kv_dtype):
    """A float32 model over a 16-bit KV cache: both paths round q, k, v to the cache's dtype before attention, so
    a last-bit difference upstream can move one rounding (a relative 2^-9 or 2^-12 of that value), and the moves
    add up over layers and steps. The bound is the FlashAttention rule: against the same model over a float32
    cache, the C++ step's error is at most twice the Python layers' own, plus a small floor."""
    model = _load(tiny_models, arch, None, batch=2, kv_cache_dtype=kv_dtype)
    assert model.cache.k.dtype == kv_dtype
    vocab = model.config.vocab_size
    prompts, lengths, steps = torch.randint(0, vocab, (2, 11)), torch.tensor([11, 4]), torch.randint(0, vocab, (9, 2))
    ours, _ = _decode_run(model, prompts, lengths, steps, cpp=True)
    ref, _ = _decode_run(model, prompts, lengths, steps, cpp=False)
    exact, _ = _decode_run(_load(tiny_models, arch, None, batch=2), prompts, lengths, steps, cpp=False)
    ref_err, our_err = (ref - exact).abs().max().item(), (ours - exact).abs().max().item()
    assert our_err <= 2 * ref_err + 1e-4 * exact.abs().max().item(), (our_err, ref_err)


def test_avx2_path_in_a_subprocess():
    """FLASHGEN_NO_AVX512=1 (read once per process) makes the step's vector kernels take their AVX2 path, and
    FLASHGEN_QUANT_ISA=avx2 the int4 / int8 linears' (on an AVX-512 VNNI machine they would take VNNI)."""
    code = (
        "import sys, tempfile; sys.path.insert(0, %r); import test_cpu_decoder as t, tiny_models as m\n"
        "models = m.TinyModels(tempfile.mkdtemp())\n"
        "t.test_step_matches_python_layers(models, 'phi3', None)\n"
        "t.test_step_matches_python_layers(models, 'llama', 'int4')\n"
        "t.test_step_matches_python_layers(models, 'qwen2', 'int8'); print('ok')\n" % os.path.dirname(__file__)
    )
    env = {**os.environ, "FLASHGEN_NO_AVX512": "1", "FLASHGEN_QUANT_ISA": "avx2"}
    # run from tests/: from the repository root, transformers would take the kernels/ folder for its `kernels`
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(__file__), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_step_is_used_for_cpu_float32_only(tiny_models):
    model = _load(tiny_models, "llama", None)
    model.reset(1)
    model.prefill(torch.tensor([[3, 4]]), torch.tensor([2]))
    model.decode(torch.tensor([5]))
    assert model._cpp_step
    model.to(torch.bfloat16)
    model.setup_cache(1, 16)
    model.reset(1)
    model.prefill(torch.tensor([[3, 4]]), torch.tensor([2]))
    model.decode(torch.tensor([5]))
    assert model._cpp_step is False  # bfloat16 runs the Python layers


def test_step_errors(tiny_models):
    model = _load(tiny_models, "qwen2", "int4")
    model.reset(1)
    model.prefill(torch.tensor([[3, 4]]), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        model.decode(torch.tensor([model.config.vocab_size]))
    model.cache.seqlens[0] = model.cache.max_seq_len
    with pytest.raises(ValueError, match="the cache is full"):
        model.decode(torch.tensor([5]))
    step, one = model._cpp_step, torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs 2 blocks but block_table has 1"):
        step(torch.tensor([5]), one, torch.tensor([64], dtype=torch.int32), model.cache.block_table[:1, :1],
             torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"logit_rows\[0\] = 1 is outside"):
        step(torch.tensor([5]), one, torch.tensor([0], dtype=torch.int32), model.cache.block_table[:1],
             torch.tensor([1]))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must run from 0 to the number of tokens"):
        step(torch.tensor([5, 6]), one, torch.tensor([0], dtype=torch.int32), model.cache.block_table[:1],
             torch.tensor([0]))
    with pytest.raises(RuntimeError, match="kind must be float, half, int4"):
        torch.classes.flashgen.CpuLinear("int3", [torch.zeros(2, 2)], None, 2, 2, 0)
    with pytest.raises(RuntimeError, match="float32 CPU tensor of shape"):
        torch.classes.flashgen.CpuLinear("float", [torch.zeros(2, 3)], None, 2, 2, 0)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.classes.flashgen.CpuLinear("int4", [torch.zeros(1), torch.zeros(1), torch.zeros(1)], None, 64, 16, 48)
    with pytest.raises(RuntimeError, match="GGML type 8 has no CPU kernel"):  # Q8_0 runs the int8 kernels
        torch.classes.flashgen.CpuLinear("ggml", [torch.zeros(1, dtype=torch.uint8)], None, 256, 16, 8)
