"""Triton quantized-matmul kernels (kernels/triton/quant.py) under TRITON_INTERPRET=1 on CPU tensors.

Weight-only linears are checked against the float64 product with the reference's dequantized weight: the kernel's
max error is at most twice that of the same product in eager PyTorch at the activation dtype (weight rounded to
it, as the kernel's tensor-core operands are), plus a floor of one unit in the last place of the largest output.
W8A8 is checked against the float64 product of the reference's quantized activations and the weights, and its
activation codes against the reference's bit for bit.
"""
import inspect

from triton_interp import poisoned  # isort: skip  (sets TRITON_INTERPRET before triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from flashgen.kernels import reference  # noqa: E402
from flashgen.kernels.triton import quant as tq  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MS = (1, 3, 16, 67)
N = 67  # odd: a partial column tile


# ------------------------------------------------------------------------------------------------ inputs
def int4_weight(n, k, g):
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = torch.rand(n, k // g) * 0.02 + 0.001
    offsets = -8 * scales + torch.randn(n, k // g) * 0.002
    return qweight, scales, offsets


def int8_weight(n, k, blocked):
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // 32 if blocked else 1) * 0.01 + 0.001
    return qweight, scales


def int8_k(m, blocked):
    """9 K tiles for split-K at small M; per channel, K not a multiple of any tile (a masked tail)."""
    if m <= tq.SMALL_M:
        return 288 if blocked else 1100
    return 96 if blocked else 300


def activations(m, k, dtype, lead=()):
    return torch.randn(*lead, m, k).to(dtype)


def maybe_bias(m, dtype):
    return torch.randn(N).to(dtype) if m % 2 else None  # odd M with a bias, even M without


# ------------------------------------------------------------------------------------------------ checks
def _ulp(dtype, magnitude):
    return torch.finfo(dtype).eps * magnitude


def check_linear(out, x, w, bias):
    """out vs float64 x @ w.T + bias, w the dequantized weight (float32 values)."""
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref = x.double() @ w.double().t() + (bias.double() if bias is not None else 0)
    eager = F.linear(x, w.to(x.dtype), bias)
    eager_err = (eager.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    floor = _ulp(x.dtype, ref.abs().max().item())
    assert err <= 2 * eager_err + floor, f"max error {err:.3g} > 2 x eager {eager_err:.3g} + {floor:.3g}"


def check_w8a8(out, x, qweight, scales, bias):
    ref = reference.int8_linear_dynamic(x.double(), qweight, scales, qweight.shape[0],
                                        bias.double() if bias is not None else None)
    assert out.dtype == x.dtype and out.shape == ref.shape and not out.isnan().any()
    err = (out.double() - ref).abs()
    # int32 sums are exact; the float32 epilogue adds a few ulp, then the output rounds to x's dtype
    tol = _ulp(x.dtype, ref.abs()) + 1e-6 * ref.abs().max()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"


def int4_dequantized(qweight, scales, offsets, g):
    return reference.int4_dequantize(qweight, scales, offsets, g, qweight.shape[0], qweight.shape[1] * 2,
                                     torch.float32)


def int8_dequantized(qweight, scales):
    return reference.int8_dequantize(qweight, scales, *qweight.shape, torch.float32)


# ------------------------------------------------------------------------------------------------ int4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", tq.INT4_GROUP_SIZES)
@pytest.mark.parametrize("m", MS)
def test_int4_linear(m, g, dtype):
    k = 9 * g if m <= tq.SMALL_M else 3 * g  # 9 K tiles: split-K splits them unevenly
    qweight, scales, offsets = int4_weight(N, k, g)
    x, bias = activations(m, k, dtype), maybe_bias(m, dtype)
    with poisoned():
        out = tq.int4_linear(x, qweight, scales, offsets, g, N, bias)
    check_linear(out, x, int4_dequantized(qweight, scales, offsets, g), bias)


# ------------------------------------------------------------------------------------------------ int8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocked", [False, True], ids=["channel", "block32"])
@pytest.mark.parametrize("m", MS)
def test_int8_linear(m, blocked, dtype):
    k = int8_k(m, blocked)
    qweight, scales = int8_weight(N, k, blocked)
    x, bias = activations(m, k, dtype), maybe_bias(m, dtype)
    with poisoned():
        out = tq.int8_linear(x, qweight, scales, N, bias)
    check_linear(out, x, int8_dequantized(qweight, scales), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocked", [False, True], ids=["channel", "block32"])
@pytest.mark.parametrize("m", MS)
def test_int8_linear_dynamic(m, blocked, dtype):
    k = int8_k(m, blocked)
    qweight, scales = int8_weight(N, k, blocked)
    x, bias = activations(m, k, dtype), maybe_bias(m, dtype)
    with poisoned():
        out = tq.int8_linear_dynamic(x, qweight, scales, N, bias)
    check_w8a8(out, x, qweight, scales, bias)


def test_prefill_m512():
    """A prefill-sized M on the largest tile of 32 columns of K (the interpreter's autotuner takes the smallest)."""
    m, g, dtype = 512, 32, torch.float16
    config = max((c for c in tq.GEMM_CONFIGS if c.kwargs["BLOCK_K"] == g), key=lambda c: c.kwargs["BLOCK_M"])
    qweight, scales, offsets = int4_weight(N, 4 * g, g)
    x, bias = activations(m, 4 * g, dtype), torch.randn(N).to(dtype)
    with poisoned():
        out = tq._matmul(x, None, qweight, scales, offsets, bias, N, True, g, dtype, config)
    check_linear(out, x, int4_dequantized(qweight, scales, offsets, g), bias)
    qweight, scales = int8_weight(N, 4 * g, True)
    xq, xs = reference.quantize_rows_int8(x)  # the kernel's codes are checked in test_quantize_rows_*
    with poisoned():
        out = tq._matmul(xq, xs[:, 0], qweight, scales, None, bias, N, False, g, dtype, config)
    check_w8a8(out, x, qweight, scales, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_matches_reference(dtype):
    x = activations(7, 200, dtype) * 5
    x[2] = 0  # amax = 0: codes 0, scale 0
    x[4] = torch.arange(200) * 0.5  # many exact halves after scaling
    x[5, :3] = torch.tensor([1e-3, -2e-3, 0.0])
    xq, xs = tq.quantize_rows(x)
    codes, scale = reference.quantize_rows_int8(x)
    assert torch.equal(xq, codes)
    assert torch.equal(xs, scale[:, 0])


# ------------------------------------------------------------------------------------------------ every tile
def _config_id(c):
    return "x".join(str(c.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f"w{c.num_warps}"


@pytest.mark.parametrize("config", tq.GEMM_CONFIGS, ids=_config_id)
def test_every_gemm_config(config):
    """Each autotune config (the interpreter's autotuner runs only one) on int4, int8 and W8A8."""
    m, g = 67, config.kwargs["BLOCK_K"]
    bk, k = g, 2 * g
    qweight, scales, offsets = int4_weight(N, k, g)
    x, bias = activations(m, k, torch.float16), maybe_bias(m, torch.float16)
    with poisoned():
        out = tq._matmul(x, None, qweight, scales, offsets, bias, N, True, g, x.dtype, config)
    check_linear(out, x, int4_dequantized(qweight, scales, offsets, g), bias)
    qweight, scales = int8_weight(N, k, bk == 32)
    with poisoned():
        out = tq._matmul(x, None, qweight, scales, None, bias, N, False, 32 if bk == 32 else 0, x.dtype, config)
    check_linear(out, x, int8_dequantized(qweight, scales), bias)
    xq, xs = reference.quantize_rows_int8(x)
    with poisoned():
        out = tq._matmul(xq, xs[:, 0], qweight, scales, None, bias, N, False, 32 if bk == 32 else 0, x.dtype,
                         config)
    check_w8a8(out, x, qweight, scales, bias)


@pytest.mark.parametrize("config", tq.FP32_GEMM_CONFIGS, ids=_config_id)
def test_every_fp32_gemm_config(config):
    m, g = 67, 64
    qweight, scales, offsets = int4_weight(N, 3 * g, g)
    x, bias = activations(m, 3 * g, torch.float32), maybe_bias(m, torch.float32)
    with poisoned():
        out = tq._matmul(x, None, qweight, scales, offsets, bias, N, True, g, x.dtype, config)
    check_linear(out, x, int4_dequantized(qweight, scales, offsets, g), bias)


# ------------------------------------------------------------------------------------------------ dequantize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", tq.INT4_GROUP_SIZES)
def test_int4_dequantize(g, dtype):
    qweight, scales, offsets = int4_weight(N, 3 * g, g)
    with poisoned():
        w = tq.int4_dequantize(qweight, scales, offsets, g, N, 3 * g, dtype)
    ref = reference.int4_dequantize(qweight, scales, offsets, g, N, 3 * g, torch.float64)
    assert w.dtype == dtype and w.shape == (N, 3 * g)
    # the reference rounds s*q+m once (a fused multiply-add); a kernel may round the product first
    torch.testing.assert_close(w.double(), ref, rtol=torch.finfo(dtype).eps, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocked", [False, True], ids=["channel", "block32"])
def test_int8_dequantize(blocked, dtype):
    k = 96 if blocked else 97
    qweight, scales = int8_weight(N, k, blocked)
    with poisoned():
        w = tq.int8_dequantize(qweight, scales, N, k, dtype)
    ref = reference.int8_dequantize(qweight, scales, N, k, torch.float32)
    if dtype == torch.bfloat16:  # the interpreter converts float32 -> bfloat16 by truncation (GPUs round)
        torch.testing.assert_close(w.float(), ref, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(w, ref.to(dtype))  # s * q rounded once: exact


# ------------------------------------------------------------------------------------------------ shapes, API
def test_leading_dims_and_strided_x():
    g, k = 32, 64
    qweight, scales, offsets = int4_weight(N, k, g)
    x = activations(5, 2 * k, torch.float16, lead=(2,))[..., ::2]  # (2, 5, K), column stride 2
    out = tq.int4_linear(x, qweight, scales, offsets, g, N, None)
    assert out.shape == (2, 5, N)
    check_linear(out, x.contiguous(), int4_dequantized(qweight, scales, offsets, g), None)


def test_empty_batch():
    qweight, scales = int8_weight(N, 64, False)
    assert tq.int8_linear(torch.empty(0, 64), qweight, scales, N, None).shape == (0, N)
    assert tq.int8_linear_dynamic(torch.empty(3, 0, 64), qweight, scales, N, None).shape == (3, 0, N)


def test_prepack_is_canonical_copy():
    qweight, scales, offsets = int4_weight(N, 64, 32)
    packed = tq.int4_prepack(qweight, scales, offsets, 32)
    for got, src in zip(packed, (qweight, scales, offsets)):
        assert torch.equal(got, src) and got.data_ptr() != src.data_ptr() and got.is_contiguous()
    qweight, scales = int8_weight(N, 64, True)
    for got, src in zip(tq.int8_prepack(qweight, scales), (qweight, scales)):
        assert torch.equal(got, src) and got.data_ptr() != src.data_ptr()


def test_prepack_turns_float16_scales_into_float32():
    """Canonical float16 scales (GGUF's) are prepacked into the float32 the CUDA kernels take, the same values,
    and the CUDA fakes say float32 too."""
    qweight, scales, offsets = int4_weight(N, 64, 32)
    s16, m16 = scales.half(), offsets.half()
    packed = tq.int4_prepack(qweight, s16, m16, 32)
    for got, src in zip(packed, (qweight, s16, m16)):
        assert got.dtype == (src.dtype if src is qweight else torch.float32) and torch.equal(got, src.to(got.dtype))
    q8, s8 = int8_weight(N, 64, True)
    got = tq.int8_prepack(q8, s8.half())[1]
    assert got.dtype == torch.float32 and torch.equal(got, s8.half().float())
    x = activations(3, 64, torch.float16)
    with poisoned():
        out = tq.int4_linear(x, *packed, 32, N, None)
    check_linear(out, x, int4_dequantized(qweight, s16, m16, 32), None)
    with FakeTensorMode():
        fake = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (qweight, s16, m16, q8)]
        assert [t.dtype for t in torch.ops.flashgen.int4_prepack(*fake[:3], 32)] == [torch.uint8] + [torch.float32] * 2
        assert [t.dtype for t in torch.ops.flashgen.int8_prepack(fake[3], fake[1])] == [torch.int8, torch.float32]
    with pytest.raises(ValueError, match="offsets must have the dtype of scales"):
        tq.int4_prepack(qweight, s16, offsets, 32)
    with pytest.raises(ValueError, match="scales must be float32 or float16 of shape"):
        tq.int8_prepack(q8, s8.bfloat16())
    with pytest.raises(ValueError, match="scales must be float32 of shape"):  # canonical float16: not prepacked
        tq.int4_linear(x, qweight, s16, m16, 32, N, None)


def test_wrappers_match_op_schemas():
    """register() makes each family's wrapper the CUDA kernel of the op of its name: same arguments, same order."""
    from flashgen.kernels.triton import kernels

    assert set(tq.KERNELS) <= set(kernels())
    for name, fn in kernels().items():
        schema = getattr(torch.ops.flashgen, name).default._schema
        assert [a.name for a in schema.arguments] == list(inspect.signature(fn).parameters), name


@pytest.mark.parametrize("case, message", [
    (dict(group_size=48), "group_size"),
    (dict(k=96, group_size=64), "multiple of group_size"),
    (dict(qweight_dtype=torch.int8), "qweight must be uint8"),
    (dict(scales_shape=(N, 1)), "scales must be float32"),
    (dict(x_dtype=torch.float64), "x must be float16"),
    (dict(bias_shape=(N + 1,)), "bias must be"),
])
def test_int4_bad_inputs(case, message):
    g, k = case.get("group_size", 32), case.get("k", 64)
    qweight, scales, offsets = int4_weight(N, 64, 32)
    qweight = qweight.to(case.get("qweight_dtype", torch.uint8))
    scales = torch.rand(case["scales_shape"]) if "scales_shape" in case else scales
    x = torch.randn(3, k, dtype=case.get("x_dtype", torch.float16))
    bias = torch.randn(case["bias_shape"]) if "bias_shape" in case else None
    with pytest.raises(ValueError, match=message):
        tq.int4_linear(x, qweight, scales, offsets, g, N, bias)


def test_int8_bad_inputs():
    qweight, scales = int8_weight(N, 96, True)
    with pytest.raises(ValueError, match="scales must be float32 of shape"):
        tq.int8_linear(torch.randn(2, 96), qweight, scales[:, :2], N, None)
    with pytest.raises(ValueError, match="qweight must be int8"):
        tq.int8_linear_dynamic(torch.randn(2, 95), qweight, scales, N, None)
    with pytest.raises(ValueError, match="dtype must be"):
        tq.int8_dequantize(qweight, scales, N, 96, torch.int32)
