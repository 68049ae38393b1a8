"""Quantized matmuls on a real GPU: the CUDA C++ GEMV (csrc/cuda/quant_gemv.cu, flashgen_cuda::*) and the
compiled Triton kernels (kernels/triton/quant.py, the CUDA kernels of flashgen::*) against the float64 reference.

Rule for the weight-only linears: max error <= 2 x the error of eager F.linear at the activation dtype (with
the dequantized weight rounded to it) + one unit in the last place of the largest output. W8A8: the float64
product of the reference's quantized activations and weights, to output rounding.
"""
import pytest
import torch
import torch.nn.functional as F

from flashgen.kernels import _backend, reference
from flashgen.kernels.triton import quant as tq

DEVICE = "cuda"
N = 4099  # odd: a partial tile and a partial block of warps


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.delenv("FLASHGEN_CUDA_BACKEND", raising=False)


def int4_weight(n, k, g):
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    scales = torch.rand(n, k // g, device=DEVICE) * 0.02 + 0.001
    offsets = -8 * scales + torch.randn(n, k // g, device=DEVICE) * 0.002
    return torch.ops.flashgen.int4_prepack(qweight, scales, offsets, g)


def int8_weight(n, k, blocked):
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scales = torch.rand(n, k // 32 if blocked else 1, device=DEVICE) * 0.01 + 0.001
    return torch.ops.flashgen.int8_prepack(qweight, scales)


def maybe_bias(m, dtype):
    return torch.randn(N, device=DEVICE).to(dtype) if m % 2 else None


def check_linear(out, x, w, bias):
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    assert not out.isnan().any()
    ref = x.double() @ w.double().t() + (bias.double() if bias is not None else 0)
    eager_err = (F.linear(x, w.to(x.dtype), bias).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    floor = torch.finfo(x.dtype).eps * ref.abs().max().item()
    assert err <= 2 * eager_err + floor, f"max error {err:.3g} > 2 x eager {eager_err:.3g} + {floor:.3g}"


def int4_w(qweight, scales, offsets, g):
    return reference.int4_dequantize(qweight, scales, offsets, g, N, qweight.shape[1] * 2, torch.float32)


def int8_w(qweight, scales):
    return reference.int8_dequantize(qweight, scales, *qweight.shape, torch.float32)


def test_kernels_are_registered():
    assert _backend.C_cuda is not None, "flashgen._C_cuda is not built"
    for op in ("int4_linear", "int8_linear", "int8_linear_dynamic", "int4_dequantize", "int8_dequantize",
               "int4_prepack", "int8_prepack"):
        assert _backend.has_kernel(op, "CUDA"), op
    assert hasattr(torch.ops.flashgen_cuda, "int4_linear") and hasattr(torch.ops.flashgen_cuda, "int8_linear")


# ------------------------------------------------------------------------------------------------ CUDA C++ GEMV
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", tq.INT4_GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_cuda_int4_gemv(m, g, dtype):
    k = 9 * g
    qweight, scales, offsets = int4_weight(N, k, g)
    x, bias = torch.randn(m, k, device=DEVICE).to(dtype), maybe_bias(m, dtype)
    w = int4_w(qweight, scales, offsets, g)
    cuda = torch.ops.flashgen_cuda.int4_linear(x, qweight, scales, offsets, g, N, bias)
    triton = torch.ops.flashgen.int4_linear(x, qweight, scales, offsets, g, N, bias)
    check_linear(cuda, x, w, bias)
    check_linear(triton, x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocked", [False, True], ids=["channel", "block32"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_cuda_int8_gemv(m, blocked, dtype):
    k = 1120 if blocked else 1104  # per channel: a multiple of 16, not of 32
    qweight, scales = int8_weight(N, k, blocked)
    x, bias = torch.randn(m, k, device=DEVICE).to(dtype), maybe_bias(m, dtype)
    w = int8_w(qweight, scales)
    check_linear(torch.ops.flashgen_cuda.int8_linear(x, qweight, scales, N, bias), x, w, bias)
    check_linear(torch.ops.flashgen.int8_linear(x, qweight, scales, N, bias), x, w, bias)


def test_cuda_backend_routes_decode(monkeypatch):
    g, k = 64, 512
    qweight, scales, offsets = int4_weight(N, k, g)
    x = torch.randn(2, 1, k, device=DEVICE, dtype=torch.float16)
    monkeypatch.setenv("FLASHGEN_CUDA_BACKEND", "cuda")
    routed = torch.ops.flashgen.int4_linear(x, qweight, scales, offsets, g, N, None)
    direct = torch.ops.flashgen_cuda.int4_linear(x, qweight, scales, offsets, g, N, None)
    assert routed.shape == (2, 1, N) and torch.equal(routed, direct)


def test_cuda_gemv_bad_inputs():
    qweight, scales, offsets = int4_weight(N, 128, 32)
    x = torch.randn(1, 128, device=DEVICE, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.flashgen_cuda.int4_linear(x.float(), qweight, scales, offsets, 32, N, None)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        torch.ops.flashgen_cuda.int4_linear(x.expand(9, 128), qweight, scales, offsets, 32, N, None)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.flashgen_cuda.int4_linear(x, qweight, scales, offsets, 48, N, None)
    with pytest.raises(RuntimeError, match="offsets must have shape"):
        torch.ops.flashgen_cuda.int4_linear(x, qweight, scales, offsets[:, :1], 32, N, None)
    with pytest.raises(RuntimeError, match="qweight must be"):
        torch.ops.flashgen_cuda.int8_linear(x, qweight, scales[:, :1], N, None)


# ------------------------------------------------------------------------------------------------ Triton, compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 67, 512])
def test_triton_linears(m, dtype):
    for g in tq.INT4_GROUP_SIZES:
        k = 9 * g
        qweight, scales, offsets = int4_weight(N, k, g)
        x, bias = torch.randn(m, k, device=DEVICE).to(dtype), maybe_bias(m, dtype)
        out = torch.ops.flashgen.int4_linear(x, qweight, scales, offsets, g, N, bias)
        check_linear(out, x, int4_w(qweight, scales, offsets, g), bias)
    for blocked in (False, True):
        k = 288 if blocked else 1100
        qweight, scales = int8_weight(N, k, blocked)
        x, bias = torch.randn(m, k, device=DEVICE).to(dtype), maybe_bias(m, dtype)
        check_linear(torch.ops.flashgen.int8_linear(x, qweight, scales, N, bias), x, int8_w(qweight, scales), bias)
        out = torch.ops.flashgen.int8_linear_dynamic(x, qweight, scales, N, bias)
        ref = reference.int8_linear_dynamic(x.double(), qweight, scales, N, None if bias is None else bias.double())
        tol = torch.finfo(dtype).eps * ref.abs() + 1e-6 * ref.abs().max()
        assert ((out.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_dequantize(dtype):
    g, k = 64, 192
    qweight, scales, offsets = int4_weight(N, k, g)
    w = torch.ops.flashgen.int4_dequantize(qweight, scales, offsets, g, N, k, dtype)
    # the reference rounds fma(q, s, m) once, as the GPU does
    assert torch.equal(w, reference.int4_dequantize(qweight, scales, offsets, g, N, k, dtype))
    qweight, scales = int8_weight(N, k, True)
    w = torch.ops.flashgen.int8_dequantize(qweight, scales, N, k, dtype)
    assert torch.equal(w, reference.int8_dequantize(qweight, scales, N, k, dtype))


def test_triton_quantize_rows_matches_reference():
    x = torch.randn(33, 1000, device=DEVICE, dtype=torch.bfloat16) * 4
    x[3] = 0
    xq, xs = tq.quantize_rows(x)
    codes, scale = reference.quantize_rows_int8(x)
    assert torch.equal(xq, codes) and torch.equal(xs, scale[:, 0])
