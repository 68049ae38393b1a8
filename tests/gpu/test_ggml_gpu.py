"""GGML linears on a real GPU: the Triton kernels of every block type (the CUDA kernels of flashgen::ggml_*) against
the float64 product, dequantization bit for bit, the CUDA C++ Q4_K / Q6_K GEMV, and GGUF types native on CUDA.

Run this folder in its own pytest process (see test_attention_gpu.py)."""
import os

import pytest
import torch
from test_ggml_quant import random_weight

from flashgen import kernels  # noqa: F401  (registers the Triton kernels for CUDA)
from flashgen.engine.gguf import native_types
from flashgen.kernels import _backend, ggml

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="TRITON_INTERPRET=1 in this process: run tests/gpu in its own pytest run")


def test_kernels_are_registered_and_native_on_cuda():
    for op in ("ggml_prepack", "ggml_linear", "ggml_dequantize"):
        assert _backend.has_kernel(op, "CUDA"), op
    assert set(ggml.BLOCK_TYPES) <= set(native_types("cuda"))


@pytest.mark.parametrize("m", [1, 7, 16, 33, 300])
@pytest.mark.parametrize("name", list(ggml.BLOCK_TYPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_matches_the_float64_product(name, m, dtype):
    n, k = 4097, 2048
    w = random_weight(name, n, k, seed=int(torch.randint(0, 2 ** 31, ()))).to("cuda")
    t = ggml.BLOCK_TYPES[name]
    packed = torch.ops.flashgen.ggml_prepack(w.qweight, t.type_id, k)
    assert torch.equal(torch.ops.flashgen.ggml_dequantize(packed, t.type_id, n, k, torch.float32),
                       w.dequantize(torch.float32))
    x = torch.randn(m, k, device="cuda").to(dtype)
    y = torch.ops.flashgen.ggml_linear(x, packed, t.type_id, n, None)
    w32 = w.dequantize(torch.float32)
    ref = x.double() @ w32.double().t()
    eager = (x @ w32.to(dtype).t()).double()
    floor = torch.finfo(dtype).eps * ref.abs().max()
    assert (y.double() - ref).abs().max() <= 2 * (eager - ref).abs().max() + floor


@pytest.mark.parametrize("k", [4096, 1280])  # 1280: a Q4_K row of 740 bytes, not 16-byte aligned: Triton
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gemv_matches_the_float64_product(name, k, dtype, monkeypatch):
    assert _backend.C_cuda is not None and hasattr(torch.ops.flashgen_cuda, "ggml_linear"), "CUDA GEMV not built"
    n = 4097
    w = random_weight(name, n, k, seed=int(torch.randint(0, 2 ** 31, ()))).to("cuda")
    t = ggml.BLOCK_TYPES[name]
    packed = torch.ops.flashgen.ggml_prepack(w.qweight, t.type_id, k)
    bias = torch.randn(n, device="cuda")
    w32 = w.dequantize(torch.float32)
    monkeypatch.setenv("FLASHGEN_CUDA_BACKEND", "cuda")
    for m in range(1, 9):
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = torch.ops.flashgen.ggml_linear(x, packed, t.type_id, n, bias)
        ref = x.double() @ w32.double().t() + bias.double()
        eager = (x @ w32.to(dtype).t() + bias.to(dtype)).double()
        floor = torch.finfo(dtype).eps * ref.abs().max()
        assert (y.double() - ref).abs().max() <= 2 * (eager - ref).abs().max() + floor, m
    if packed.shape[1] % 16 == 0:
        direct = torch.ops.flashgen_cuda.ggml_linear(x, packed, t.type_id, n, bias)
        assert torch.equal(direct, y)
