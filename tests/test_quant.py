"""int4 / int8 quantized matmuls: quantizers, the CPU kernels (AVX-512 VNNI and AVX2 paths), the reference,
autograd, torch.compile, QuantizedLinear / quantize_model and input checks.

CPU weight-only kernels quantize the activations to int8 per block of 32 (csrc/cpu/quant_linear.cpp), so
they are checked twice against float64 products with the dequantized weight W:
- tightly against x' W^T, x' the rounded activations (same float32 operations as the kernel): float32 error;
- against x W^T within the documented bound sum_k |W[n, k]| d_b / 2 (d_b = max|x_b| / 127).
W8A8 is checked against the float64 product of the quantized activations and weights (reference).
Weights with float16 scales (and offsets) must give bit for bit what float32 ones of the same values give.
"""
import pytest
import torch

import flashgen.kernels as K
from flashgen.kernels import _backend, reference
from flashgen.kernels.qlinear import QuantizedLinear, quantize_model
from flashgen.kernels.quant import QuantizedWeight

OPS = ["int4_prepack", "int4_linear", "int4_dequantize", "int8_prepack", "int8_linear", "int8_linear_dynamic",
       "int8_dequantize"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MS = [1, 2, 3, 4, 5, 6, 7, 16, 67, 512]  # every row count of the 8-row AVX-512 tile step
F32_REL = 1e-5  # float32 accumulation error, relative to sum |x_k W_nk|


# The kernels take float32 activations (other dtypes are converted before either ISA path), so the AVX2 path
# runs with float32 only.
ISA_DTYPES = [("vnni", d) for d in DTYPES] + [("avx2", torch.float32)]


@pytest.fixture
def isa(request, monkeypatch):
    if request.param == "avx2":
        monkeypatch.setenv("FLASHGEN_QUANT_ISA", "avx2")
    elif not _backend.C.cpu_features()["avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    return request.param


def test_cpu_kernels_are_registered():
    for op in OPS:
        assert _backend.has_kernel(op, "CPU"), op
        assert _backend.has_kernel(op, "CompositeExplicitAutograd"), op


def rounded_acts(x):
    """x (M, K) float -> (x' = d * a float64, d per block repeated over K): the kernel's per-32 quantization."""
    m, k = x.shape
    kb = (k + 31) // 32
    xb = torch.nn.functional.pad(x.float(), (0, kb * 32 - k)).reshape(m, kb, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    c127 = torch.full_like(amax, 127.0)
    a = torch.round(xb * torch.where(amax > 0, c127 / amax, torch.zeros_like(amax)))
    d = amax / c127
    xq = (a.double() * d.double()).reshape(m, -1)[:, :k]
    return xq, d.double().expand(m, kb, 32).reshape(m, -1)[:, :k]


def out_tol(y_ref, dtype):
    """Rounding of the result to the output dtype."""
    return y_ref.abs() * (0 if dtype == torch.float32 else torch.finfo(dtype).eps)


def check_weight_only(y, x, w):
    """y (M, N) from a weight-only CPU kernel; x (M, K); w (N, K) float64 dequantized weight."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]).double()
    assert y.dtype == x.dtype and torch.isfinite(y2).all()
    xq, d = rounded_acts(x2)
    exact_q = xq @ w.t()
    tol = F32_REL * (xq.abs() @ w.abs().t()) + out_tol(exact_q, x.dtype) + 1e-30
    assert ((y2 - exact_q).abs() <= tol).all(), ((y2 - exact_q).abs() / tol).max()
    exact = x2.double() @ w.t()
    bound = (d / 2) @ w.abs().t() + tol
    assert ((y2 - exact).abs() <= bound).all()


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("isa,dtype", ISA_DTYPES, indirect=["isa"])
def test_int4_linear(isa, m, group_size, dtype):
    n, k = 37, group_size * 3  # odd N (tile tail), K a multiple of the group
    qw = K.quantize_int4(torch.randn(n, k), group_size, symmetric=m % 2 == 1)
    x = torch.randn(m, k).to(dtype)
    check_weight_only(K.int4_linear(x, qw), x, qw.dequantize(torch.float64))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block_size,k", [(None, 101), (None, 96), (32, 160)])
@pytest.mark.parametrize("isa,dtype", ISA_DTYPES, indirect=["isa"])
def test_int8_linear(isa, m, block_size, k, dtype):
    n = 19
    qw = K.quantize_int8(torch.randn(n, k), block_size)
    x = torch.randn(2, m, k).to(dtype)  # leading dims flattened
    y = K.int8_linear(x, qw)
    assert y.shape == (2, m, n)
    check_weight_only(y, x, qw.dequantize(torch.float64))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block_size,k", [(None, 101), (32, 160)])
@pytest.mark.parametrize("isa,dtype", ISA_DTYPES, indirect=["isa"])
def test_int8_linear_dynamic(isa, m, block_size, k, dtype):
    n = 21
    qw = K.quantize_int8(torch.randn(n, k) * 0.1, block_size)
    x = torch.randn(m, k).to(dtype) * 3
    bias = torch.randn(n)
    y = K.int8_linear_dynamic(x, qw, bias)
    exact = reference.int8_linear_dynamic(x.double(), *qw.tensors(), n, bias.double())  # exact integer sums
    a, sx = reference.quantize_rows_int8(x)
    mag = (a.double().abs() * sx.double()) @ qw.dequantize(torch.float64).abs().t() + bias.double().abs()
    tol = F32_REL * mag + out_tol(exact, dtype)
    assert y.dtype == dtype and ((y.double() - exact).abs() <= tol).all()


def test_w8a8_reference_is_integer_product():
    q = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    s = torch.rand(5, 2)
    x = torch.randn(3, 64)
    a, sx = reference.quantize_rows_int8(x)
    assert a.abs().max() <= 127 and (a.abs().amax(-1) == 127).all()
    expect = sum(sx.double() * (a[:, b * 32:(b + 1) * 32].double() @ q[:, b * 32:(b + 1) * 32].double().t())
                 * s[:, b].double() for b in range(2))
    torch.testing.assert_close(reference.int8_linear_dynamic(x, q, s, 5, None), expect.float())


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, None), (8, 32)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_dequantize_op_is_exact(bits, group, dtype):
    n, k = 23, 256
    w = torch.randn(n, k)
    qw = K.quantize_int4(w, group) if bits == 4 else K.quantize_int8(w, group)
    if bits == 4:
        got = torch.ops.flashgen.int4_dequantize(*qw.packed(), group, n, k, dtype)
    else:
        got = torch.ops.flashgen.int8_dequantize(*qw.packed(), n, k, dtype)
    assert got.dtype == dtype and torch.equal(got, qw.dequantize(dtype))


# ---------------------------------------------------------------- float16 scales (GGUF's own)
def with_scale_dtype(qw, dtype):
    """qw with its scales (and offsets) converted to dtype."""
    conv = [t.to(dtype) if t is not None else None for t in (qw.scales, qw.offsets)]
    return QuantizedWeight(qw.format, qw.qweight, *conv, group_size=qw.group_size, shape=qw.shape, dtype=qw.dtype)


def fp16_pair(bits, group, n, k):
    """A weight with float16 scales (and offsets) and the same weight with those values in float32."""
    qw = K.quantize_int4(torch.randn(n, k), group) if bits == 4 else K.quantize_int8(torch.randn(n, k), group)
    half = with_scale_dtype(qw, torch.float16)
    return half, with_scale_dtype(half, torch.float32)


@pytest.mark.parametrize("bits,group,k", [(4, 32, 96), (4, 64, 192), (4, 128, 384), (8, None, 101), (8, 32, 160)])
@pytest.mark.parametrize("isa", ["vnni", "avx2"], indirect=True)
def test_float16_scales_match_float32(isa, bits, group, k):
    n = 37  # odd: a partial tile
    half, full = fp16_pair(bits, group, n, k)
    packed = half.packed()
    assert all(t.dtype == torch.float16 for t in packed[1:])
    assert [t.shape for t in packed] == [t.shape for t in full.packed()]
    assert torch.equal(half.dequantize(), full.dequantize())
    if bits == 4:
        assert torch.equal(torch.ops.flashgen.int4_dequantize(*packed, group, n, k, torch.float32),
                           full.dequantize(torch.float32))
        linears = [K.int4_linear]
    else:
        assert torch.equal(torch.ops.flashgen.int8_dequantize(*packed, n, k, torch.float32),
                           full.dequantize(torch.float32))
        linears = [K.int8_linear, K.int8_linear_dynamic]
    for m in (1, 3, 67):
        x = torch.randn(m, k)
        for linear in linears:
            assert torch.equal(linear(x, half), linear(x, full)), linear.__name__
        check_weight_only(linears[0](x, half), x, full.dequantize(torch.float64))  # weight-only


def test_reference_fallback_matches_float64():
    # the CompositeExplicitAutograd fallback (devices without a kernel) on the canonical tensors
    qw = K.quantize_int4(torch.randn(10, 64), 32)
    x = torch.randn(4, 64)
    y = reference.int4_linear(x, *qw.tensors(), 32, 10, None)
    exact = x.double() @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    q8 = K.quantize_int8(torch.randn(10, 64), 32)
    torch.testing.assert_close(reference.int8_linear(x, *q8.tensors(), 10, None).double(),
                               x.double() @ q8.dequantize(torch.float64).t(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- quantizers
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_int4_error_bound(group_size, symmetric):
    n, k = 9, 384
    w = torch.randn(n, k) * torch.rand(n, 1)
    w[0, :group_size] = 0.5  # a constant group: s = 0, exact
    qw = K.quantize_int4(w, group_size, symmetric)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (n, k // 2)
    err = (w.double() - qw.dequantize(torch.float64)).abs().reshape(n, k // group_size, group_size)
    s = qw.scales.double().abs().unsqueeze(-1)
    assert (err <= s / 2 * (1 + 1e-5) + 1e-7).all()
    assert err[0, 0].max() == 0
    assert qw.dequantize().dtype == torch.float32


@pytest.mark.parametrize("block_size", [None, 32])
def test_quantize_int8_error_bound(block_size):
    n, k = 7, 256
    w = torch.randn(n, k).bfloat16()
    qw = K.quantize_int8(w, block_size)
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (n, 1 if block_size is None else k // 32)
    assert qw.dequantize().dtype == torch.bfloat16
    err = (w.double() - qw.dequantize(torch.float64)).abs().reshape(n, qw.scales.shape[1], -1)
    assert (err <= qw.scales.double().unsqueeze(-1) / 2 * (1 + 1e-5)).all()


def test_quantized_weight_save_load_and_to(tmp_path):
    q4, q8 = K.quantize_int4(torch.randn(6, 64), 64), K.quantize_int8(torch.randn(6, 40).half())
    for qw in (q4, q8, with_scale_dtype(q4, torch.float16), with_scale_dtype(q8, torch.float16)):
        path = str(tmp_path / "w.safetensors")
        qw.save(path)
        back = QuantizedWeight.load(path)
        assert (back.format, back.shape, back.group_size, back.dtype) == (qw.format, qw.shape, qw.group_size, qw.dtype)
        assert [t.dtype for t in back.tensors()] == [t.dtype for t in qw.tensors()]
        assert torch.equal(back.dequantize(), qw.dequantize())
        moved = qw.to("meta")
        assert moved.device.type == "meta" and moved.shape == qw.shape


# ---------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("kind", ["int4", "int8", "int8_dynamic"])
def test_grad_wrt_x_and_bias(kind):
    n, k = 13, 64
    w = torch.randn(n, k)
    qw = K.quantize_int4(w, 32) if kind == "int4" else K.quantize_int8(w)
    fn = {"int4": K.int4_linear, "int8": K.int8_linear, "int8_dynamic": K.int8_linear_dynamic}[kind]
    x = torch.randn(2, 3, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    dy = torch.randn(2, 3, n)
    fn(x, qw, bias).backward(dy)
    wd = qw.dequantize(torch.float64)
    torch.testing.assert_close(x.grad.double(), dy.double() @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, dy.sum((0, 1)))


def _op_samples(scale_dtype):
    n, k = 19, 128
    x = torch.randn(3, k, requires_grad=True)
    bias = torch.randn(n)
    q4 = with_scale_dtype(K.quantize_int4(torch.randn(n, k), 64), scale_dtype)
    q8 = with_scale_dtype(K.quantize_int8(torch.randn(n, k), 32), scale_dtype)
    f = torch.ops.flashgen
    return [
        (f.int4_prepack.default, (*q4.tensors(), 64)),
        (f.int8_prepack.default, q8.tensors()),
        (f.int4_linear.default, (x, *q4.packed(), 64, n, bias)),
        (f.int4_dequantize.default, (*q4.packed(), 64, n, k, torch.bfloat16)),
        (f.int8_linear.default, (x, *q8.packed(), n, None)),
        (f.int8_linear_dynamic.default, (x, *q8.packed(), n, bias)),
        (f.int8_dequantize.default, (*q8.packed(), n, k, torch.float32)),
    ]


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_opcheck(index, scale_dtype):
    op, args = _op_samples(scale_dtype)[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    n, k = 24, 128
    layers = [QuantizedLinear.from_linear(torch.nn.Linear(k, n), mode, group_size=64)
              for mode in ("int4", "int8", "int8_dynamic")]
    x = torch.randn(5, k)
    for layer in layers:
        layer(x)  # prepack outside the graph

    def f(x):
        return tuple(layer(x) for layer in layers)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# ---------------------------------------------------------------- modules
def test_quantize_model_and_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40),
                                torch.nn.Linear(40, 8))
    x = torch.randn(4, 64)
    quantize_model(model, "int4", group_size=32, skip=["2"])
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[3], torch.nn.Linear)  # 40 % 32: kept float
    assert isinstance(model[2], torch.nn.Linear)  # skipped by name
    y = model(x)
    fresh = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40),
                                               torch.nn.Linear(40, 8)), "int4", group_size=32, skip=["2"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), y)
    model.to(torch.bfloat16)
    assert model[0].weight.scales.dtype == torch.float32 and model[0].bias.dtype == torch.bfloat16
    assert model(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic", "int4"])
def test_quantized_linear_is_a_drop_in(mode):
    lin = torch.nn.Linear(128, 33)
    q = QuantizedLinear.from_linear(lin, mode, group_size=128)
    x = torch.randn(2, 5, 128)
    y = q(x)
    assert y.shape == (2, 5, 33)
    ref = x.double() @ q.weight.dequantize(torch.float64).t() + lin.bias.double()
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 0.02, rel


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    w = torch.randn(16, 96)
    with pytest.raises(ValueError, match="group_size"):
        K.quantize_int4(w, 16)
    with pytest.raises(ValueError, match="multiple of group_size"):
        K.quantize_int4(w, 64)
    with pytest.raises(ValueError, match="block_size"):
        K.quantize_int8(w, 64)
    with pytest.raises(ValueError, match="2-D"):
        K.quantize_int8(torch.randn(4))
    qw = K.quantize_int4(w, 32)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        K.int4_linear(torch.randn(2, 96), w)
    with pytest.raises(ValueError, match="expected a int4 QuantizedWeight, got format int8"):
        K.int4_linear(torch.randn(2, 96), K.quantize_int8(w))
    f = torch.ops.flashgen
    with pytest.raises(RuntimeError, match="same in/out features"):
        K.int4_linear(torch.randn(2, 64), qw)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        K.int4_linear(torch.randn(2, 80), qw)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        K.int4_linear(torch.randn(2, 96).double(), qw)
    with pytest.raises(RuntimeError, match="prepacked"):
        f.int4_linear(torch.randn(2, 96), *qw.tensors(), 32, 16, None)  # canonical, not prepacked
    with pytest.raises(RuntimeError, match="group_size"):
        f.int4_linear(torch.randn(2, 96), *qw.packed(), 48, 16, None)
    with pytest.raises(RuntimeError, match="bias"):
        K.int4_linear(torch.randn(2, 96), qw, torch.randn(15))
    with pytest.raises(RuntimeError, match="group_size"):
        f.int4_prepack(*qw.tensors(), 16)
    with pytest.raises(RuntimeError, match="scales"):
        f.int4_prepack(qw.qweight, qw.scales.double(), qw.offsets, 32)
    q8 = K.quantize_int8(w)
    with pytest.raises(RuntimeError, match="qweight"):
        f.int8_linear(torch.randn(2, 128), *q8.packed(), 16, None)
    with pytest.raises(RuntimeError, match="scales"):
        f.int8_prepack(q8.qweight, torch.ones(16, 5))
    with pytest.raises(TypeError, match="offsets must be a tensor"):
        QuantizedWeight("int4", qw.qweight, qw.scales, None, group_size=32)
    with pytest.raises(ValueError, match="offsets must be None"):
        QuantizedWeight("int8", q8.qweight, q8.scales, q8.scales, group_size=None)


def test_bad_scale_dtypes():
    qw = K.quantize_int4(torch.randn(16, 64), 32)
    q8 = K.quantize_int8(torch.randn(16, 64))
    s16, m16 = qw.scales.half(), qw.offsets.half()
    with pytest.raises(TypeError, match="offsets must have the dtype of scales"):
        QuantizedWeight("int4", qw.qweight, s16, qw.offsets, group_size=32)
    with pytest.raises(TypeError, match="scales must be torch.float32 or torch.float16, got torch.bfloat16"):
        QuantizedWeight("int4", qw.qweight, qw.scales.bfloat16(), qw.offsets.bfloat16(), group_size=32)
    with pytest.raises(TypeError, match="scales must be torch.float32 or torch.float16, got torch.float64"):
        QuantizedWeight("int8", q8.qweight, q8.scales.double())
    f = torch.ops.flashgen
    with pytest.raises(RuntimeError, match="int4_prepack: offsets must have the dtype of scales"):
        f.int4_prepack(qw.qweight, s16, qw.offsets, 32)
    with pytest.raises(RuntimeError, match="int4_prepack: scales must be float32 or float16, got BFloat16"):
        f.int4_prepack(qw.qweight, qw.scales.bfloat16(), qw.offsets.bfloat16(), 32)
    with pytest.raises(RuntimeError, match="int8_prepack: scales must be float32 or float16, got BFloat16"):
        f.int8_prepack(q8.qweight, q8.scales.bfloat16())
    qweight, scales, offsets = with_scale_dtype(qw, torch.float16).packed()
    x = torch.randn(2, 64)
    for op, args in ((f.int4_linear, (x, qweight, scales, offsets.float(), 32, 16, None)),
                     (f.int4_dequantize, (qweight, scales, offsets.float(), 32, 16, 64, torch.float32))):
        with pytest.raises(RuntimeError, match="offsets must have the dtype of scales"):
            op(*args)
    q8w, q8s = q8.packed()
    for op, args in ((f.int8_linear, (x, q8w, q8s.bfloat16(), 16, None)),
                     (f.int8_linear_dynamic, (x, q8w, q8s.bfloat16(), 16, None)),
                     (f.int8_dequantize, (q8w, q8s.bfloat16(), 16, 64, torch.float32)),
                     (f.int4_linear, (x, qweight, scales.bfloat16(), offsets.bfloat16(), 32, 16, None))):
        with pytest.raises(RuntimeError, match="scales must be float32 or float16, got BFloat16"):
            op(*args)
