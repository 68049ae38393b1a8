"""The Triton GGML K-quant linears Q4_K, Q5_K, Q6_K (kernels/triton/ggml.py) under TRITON_INTERPRET=1: the CUDA
layout lossless and within 5% of the file's bytes, dequantization bit for bit against kernels/ggml.py, and the linear against
the float64 product for every row-count class, odd N, bias and poisoned outputs; other types fall back to the
reference."""
import triton_interp  # noqa: F401  (first: triton must be imported in interpreter mode)

import pytest
import torch
from test_ggml_quant import random_weight
from test_triton_quant import check_linear
from triton_interp import poisoned

from flashgen.kernels import ggml, reference
from flashgen.kernels.triton import ggml as tg

NATIVE = ["Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("name", NATIVE)
def test_layout_is_compact_and_dequantizes_bit_for_bit(name):
    w = random_weight(name, 33, 512, seed=int(torch.randint(0, 2 ** 31, ())))
    t = ggml.BLOCK_TYPES[name]
    packed = tg.ggml_prepack(w.qweight, t.type_id, 512)
    assert packed.shape == (33, ggml.cuda_row_bytes(t.type_id, 512))
    assert packed.shape[1] <= 1.05 * w.qweight.shape[1]
    with poisoned():
        got = tg.ggml_dequantize(packed, t.type_id, 33, 512, torch.float32)
    assert torch.equal(got, w.dequantize(torch.float32))


@pytest.mark.parametrize("m", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_the_float64_product(name, m, dtype):
    n, k = 37, 768
    w = random_weight(name, n, k, seed=int(torch.randint(0, 2 ** 31, ())))
    t = ggml.BLOCK_TYPES[name]
    packed = tg.ggml_prepack(w.qweight, t.type_id, k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    with poisoned():
        y = tg.ggml_linear(x, packed, t.type_id, n, bias)
    check_linear(y, x, w.dequantize(torch.float32), bias)


def test_other_types_run_their_reference():
    w = random_weight("Q3_K", 9, 256, seed=1)
    t = ggml.BLOCK_TYPES["Q3_K"]
    packed = tg.ggml_prepack(w.qweight, t.type_id, 256)
    assert torch.equal(packed, w.qweight)
    x = torch.randn(3, 256)
    assert torch.equal(tg.ggml_linear(x, packed, t.type_id, 9), reference.ggml_linear(x, w.qweight, t.type_id, 9, None))


def test_bad_inputs_are_named():
    w = random_weight("Q4_K", 4, 256, seed=2)
    packed = tg.ggml_prepack(w.qweight, 12, 256)
    with pytest.raises(ValueError, match="packed must be uint8 of shape"):
        tg.ggml_linear(torch.randn(2, 256), packed[:, :-1], 12, 4)
    with pytest.raises(ValueError, match="blocks must be"):
        tg.ggml_prepack(w.qweight[:, :-1], 12, 256)
