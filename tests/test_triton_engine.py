"""The engine's GPU code path, run here: use_backend("triton") sends every flashgen op of the Python layers to its
Triton kernel (Triton's interpreter on CPU tensors) or, where a family has none, to its reference, as a GPU
would. Greedy generation through it must equal the CPU engine's: the C++ step for float models; for quantized
ones the Python layers with QuantizedLinear in exact mode, since the Triton kernels keep activations in float
where the CPU kernels round them to int8. Prompts of different lengths go through the serving engine together,
so this covers the packed, paged attention."""
import triton_interp  # noqa: F401  (first: triton must be imported in interpreter mode)
import collections

import pytest
import torch
from greedy_checks import assert_same_greedy
from test_gguf_kquants import kquant_file  # noqa: F401  (a fixture: a tiny GGUF of K-quants, Q5_x and IQ4)
from tiny_models import ARCHITECTURES, tiny_models  # noqa: F401  (a fixture)

from flashgen.engine.llm import LLM
from flashgen.engine.loader import load_model
from flashgen.kernels import triton as triton_kernels
from flashgen.kernels import use_backend
from flashgen.kernels.qlinear import QuantizedLinear
from flashgen.kernels.quant import quantize_int4

PROMPTS = ["hello world, the", "a b c", "the quick brown fox jumps over the lazy dog and then runs far away"]
STEPS = 6


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of each Triton launch wrapper made inside use_backend("triton")."""
    calls = collections.Counter()
    table = triton_kernels.kernels()
    for name, fn in list(table.items()):
        def counted(*args, _name=name, _fn=fn, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(table, name, counted)
    return calls


def _greedy(llm):
    return llm.generate(PROMPTS, max_new_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=2)


def _exact(model):
    """The model's Python layers with float activations in every quantized linear (what the GPU kernels do)."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.exact = True
    model.cpp_step = False
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_float_model_greedy_equals_the_cpu_engine(tiny_models, arch, triton_calls):  # noqa: F811
    llm = LLM(tiny_models[arch], max_seq_len=64)
    want = _greedy(llm)
    assert llm.model._cpp_step, "the reference run should be the C++ step"
    with use_backend("triton"):
        got = _greedy(llm)
    assert_same_greedy(want, got)
    assert triton_calls["flash_attn_varlen_kvcache"] and (triton_calls["rms_norm_fwd"]
                                                          or triton_calls["layer_norm_fwd"])


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_model_greedy_equals_the_cpu_engine(tiny_models, arch, quant, triton_calls):  # noqa: F811
    llm = LLM(tiny_models[arch], quant=quant, max_seq_len=64)
    with use_backend("triton"):
        got = _greedy(llm)
    _exact(llm.model)
    assert_same_greedy(_greedy(llm), got)
    assert triton_calls[f"{quant}_linear"] and triton_calls[f"{quant}_prepack"]


def test_gguf_block_types_greedy_equal_the_cpu_engine(kquant_file, triton_calls):  # noqa: F811
    llm = LLM.from_loaded(load_model(kquant_file[0], max_seq_len=64))
    with use_backend("triton"):
        got = _greedy(llm)
    _exact(llm.model)
    assert_same_greedy(_greedy(llm), got)
    assert triton_calls["flash_attn_varlen_kvcache"] and triton_calls["ggml_linear"] and triton_calls["ggml_prepack"]


def test_backend_prepacks_apart_and_names_are_checked():
    w = quantize_int4(torch.randn(32, 64), group_size=32)
    cpu = w.packed()
    with use_backend("triton"):
        gpu = w.packed()
        assert w.packed() is gpu
    assert w.packed() is cpu and len(gpu[0].shape) != len(cpu[0].shape)
    with pytest.raises(ValueError, match="backend must be 'triton'"):
        with use_backend("cuda"):
            pass
