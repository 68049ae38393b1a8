"""The engine on a real GPU: greedy generation of the tiny models (six architectures, float / int4 / int8) and of
the default model equal to the CPU engine's, with and without CUDA-graph decode, and the graphs really
captured and replayed.

Run this folder in its own pytest process (see test_attention_gpu.py): `make gpu-check`.
"""
import collections
import os

import pytest
import torch
from greedy_checks import assert_same_greedy
from tiny_models import ARCHITECTURES, tiny_models  # noqa: F401  (a fixture)

from flashgen.engine.cuda_graphs import DecodeGraphs
from flashgen.engine.llm import LLM, default_model_path

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="TRITON_INTERPRET=1 in this process: run tests/gpu in its own pytest run")
PROMPTS = ["hello world, the", "a b c", "the quick brown fox jumps over the lazy dog and then runs far away"]


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 when comparing with the CPU
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _generate(llm, steps=24):
    return llm.generate(PROMPTS, max_new_tokens=steps, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture
def replays(monkeypatch):
    """Bucket sizes of the decode steps replayed from graphs."""
    sizes = collections.Counter()
    step = DecodeGraphs._step
    monkeypatch.setattr(DecodeGraphs, "_step", lambda self, size: sizes.update([size]) or step(self, size))
    return sizes


@pytest.mark.parametrize("quant", [None, "int4", "int8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_greedy_equal_the_cpu_engine(tiny_models, arch, quant, replays):  # noqa: F811
    cpu = LLM(tiny_models[arch], quant=quant, device="cpu", max_seq_len=96)
    for m in cpu.model.modules():  # the GPU kernels keep activations in float: compare with that
        if hasattr(m, "exact"):
            m.exact = True
    cpu.model.cpp_step = False
    want = _generate(cpu)
    eager = LLM(tiny_models[arch], quant=quant, device="cuda", dtype="float32", max_seq_len=96, cuda_graphs=False)
    assert_same_greedy(want, _generate(eager))
    graphed = LLM(tiny_models[arch], quant=quant, device="cuda", dtype="float32", max_seq_len=96)
    assert graphed.engine.runner.graphs is not None and graphed.engine.runner.graphs.capture
    assert_same_greedy(want, _generate(graphed))
    assert replays[4] >= 20 and graphed.engine.runner.graphs.graphs, "decode steps did not replay graphs"


def test_default_model_greedy_on_gpu_equals_cpu(replays):
    path = default_model_path()
    prompt = "Explain in two sentences why the sky is blue."
    cpu = LLM(path, device="cpu").generate(prompt, max_new_tokens=32, temperature=0, logprobs=2)
    gpu = LLM(path, device="cuda", dtype="float32").generate(prompt, max_new_tokens=32, temperature=0, logprobs=2)
    # The CPU kernels round activations to int8 per block, the GPU ones do not: a near tie may part them; the
    # first tokens must agree.
    assert gpu.token_ids[:8] == cpu.token_ids[:8]
    assert replays[1] >= 8
    bf16 = LLM(path, device="cuda")
    assert bf16.model.cache.dtype == torch.bfloat16 and bf16.engine.runner.graphs is not None
    out = bf16.generate(prompt, max_new_tokens=16, temperature=0)
    assert out.token_ids[:4] == cpu.token_ids[:4]
