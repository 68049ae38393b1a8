"""The Triton GGML linears (kernels/triton/ggml.py) of every block type under TRITON_INTERPRET=1: the CUDA layout
lossless and within 5% of the file's bytes, dequantization bit for bit against kernels/ggml.py, and the linear
against the float64 product for every row-count class and every tile config, odd N, bias and poisoned outputs."""
import triton_interp  # noqa: F401  (first: triton must be imported in interpreter mode)

import pytest
import torch
from test_ggml_quant import random_weight
from test_triton_quant import check_linear
from triton_interp import poisoned

from flashgen.kernels import ggml
from flashgen.kernels.triton import ggml as tg
from flashgen.kernels.triton.quant import FP32_GEMM_CONFIGS, GEMM_CONFIGS

TYPES = list(ggml.BLOCK_TYPES)


def _odd_k(t):
    """An in_features that is not a multiple of 64 (for the blocks of 32) or of 512."""
    return 25 * t.block if t.block == 32 else 3 * t.block


def _packed(name, n, k):
    w = random_weight(name, n, k, seed=int(torch.randint(0, 2 ** 31, ())))
    return w, tg.ggml_prepack(w.qweight, ggml.BLOCK_TYPES[name].type_id, k)


@pytest.mark.parametrize("name", TYPES)
def test_layout_is_compact_and_dequantizes_bit_for_bit(name):
    t = ggml.BLOCK_TYPES[name]
    k = _odd_k(t)
    w, packed = _packed(name, 33, k)
    assert packed.shape == (33, ggml.cuda_row_bytes(t.type_id, k))
    assert packed.shape[1] <= 1.05 * w.qweight.shape[1]
    with poisoned():
        got = tg.ggml_dequantize(packed, t.type_id, 33, k, torch.float32)
    assert torch.equal(got, w.dequantize(torch.float32))


@pytest.mark.parametrize("m", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_the_float64_product(name, m, dtype):
    t = ggml.BLOCK_TYPES[name]
    n, k = 37, _odd_k(t)
    w, packed = _packed(name, n, k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    with poisoned():
        y = tg.ggml_linear(x, packed, t.type_id, n, bias)
    check_linear(y, x, w.dequantize(torch.float32), bias)


@pytest.mark.parametrize("name", TYPES)
def test_every_tile_config_matches(name):
    """The autotuner picks among these on a GPU; the interpreter runs only the smallest, so each is forced here."""
    t = ggml.BLOCK_TYPES[name]
    n, k = 37, _odd_k(t)
    w, packed = _packed(name, n, k)
    w32 = w.dequantize(torch.float32)
    for dtype, configs in ((torch.bfloat16, GEMM_CONFIGS), (torch.float32, FP32_GEMM_CONFIGS)):
        x = torch.randn(40, k).to(dtype)
        fitting = [c for c in configs if tg.tile_fits(c, t)]
        assert fitting, f"no {dtype} tile fits {name}'s block"
        for config in fitting:
            with poisoned():
                y = tg._matmul(x, packed, t, n, None, config)
            check_linear(y, x, w32, None)


def test_bad_inputs_are_named():
    w, packed = _packed("Q4_K", 4, 256)
    with pytest.raises(ValueError, match="packed must be uint8 of shape"):
        tg.ggml_linear(torch.randn(2, 256), packed[:, :-1], 12, 4)
    with pytest.raises(ValueError, match="blocks must be"):
        tg.ggml_prepack(w.qweight[:, :-1], 12, 256)
    with pytest.raises(ValueError, match="in_features"):
        tg.ggml_linear(torch.randn(2, 240), packed, 12, 4)
