"""GGML K-quant linears on a real GPU: the Triton Q4_K / Q6_K kernels (the CUDA kernels of flashgen::ggml_*) against
the float64 product, dequantization bit for bit, and a GGUF model keeping them native on CUDA.

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
    assert {"Q4_K", "Q6_K"} <= set(native_types("cuda"))


@pytest.mark.parametrize("m", [1, 7, 16, 33, 300])
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
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
