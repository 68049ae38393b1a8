"""Fused RMSNorm / LayerNorm on the CPU kernels (csrc/cpu/norm.cpp) against the float64 reference.

Error rule (as FlashAttention's tests): the kernel's error against the float64 reference may be at most twice
the error of the reference run at the kernel's precision, plus a small floor.
"""
import pytest
import torch
from torch import nn

from flashgen.kernels import FusedLayerNorm, FusedRMSNorm, layer_norm, reference, rms_norm
from flashgen.kernels._backend import has_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 97), (2, 5, 4097)]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
OPS = ["rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"]


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """Both vector paths: the AVX2 one is forced with FLASHGEN_NO_AVX512 (read by the kernel on every call)."""
    if request.param == "avx2":
        monkeypatch.setenv("FLASHGEN_NO_AVX512", "1")
    return request.param


def test_cpu_kernels_are_registered():
    for op in OPS:
        assert has_kernel(op, "CPU"), f"flashgen::{op} has no CPU kernel: tests would only check the reference"


def assert_close(out, ref64, ref_lowp, name, dtype=None):
    """|out - ref64| <= 2 |ref_lowp - ref64| + floor, elementwise maxima; the floor is that of `dtype` (the
    input dtype; default out's) and scales with max |ref64|."""
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    floor = FLOOR[dtype or out.dtype] * (1 + ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x {ref_err:.3g} + {floor:.3g}"


def make(shape, dtype, requires_grad=True):
    return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)


def _forward(kind, impl, x, params, residual, eps, offset):
    if impl == "kernel":
        if kind == "rms":
            out = rms_norm(x, params[0], eps, residual=residual, weight_offset=offset)
        else:
            out = layer_norm(x, params[0], params[1], eps, residual=residual)
        return out if residual is not None else (out, x)
    if kind == "rms":
        y, h, _ = reference.rms_norm_fwd(x, params[0], residual, eps, offset)
    else:
        y, h, _, _ = reference.layer_norm_fwd(x, params[0], params[1], residual, eps)
    return y, (h if residual is not None else x)


def forward_and_grads(kind, impl, x, params, residual, gy, gh, eps=1e-5, offset=False, to=None):
    """y, h and the gradients of sum(y * gy) + sum(h * gh) for x, params and residual (inputs cast to `to`)."""
    cast = (lambda t: None if t is None else t.detach().to(to).requires_grad_()) if to else (lambda t: t)
    x, residual = cast(x), cast(residual)
    params = [cast(p) for p in params]
    y, h = _forward(kind, impl, x, params, residual, eps, offset)
    loss = (y.double() * gy).sum()
    if residual is not None:
        loss = loss + (h.double() * gh).sum()
    named = [("x", x), ("weight", params[0]), ("bias", params[1] if len(params) > 1 else None), ("residual", residual)]
    named = [(name, t) for name, t in named if t is not None]
    return (y, h), dict(zip([name for name, _ in named], torch.autograd.grad(loss, [t for _, t in named])))


def check_against_reference(kind, shape, dtype, residual=True, weight=True, bias=True, offset=False, eps=1e-5):
    n = shape[-1]
    x = make(shape, dtype)
    r = make(shape, dtype) if residual else None
    w = make((n,), dtype) if weight else None
    params = [w] if kind == "rms" else [w, make((n,), dtype) if bias else None]
    gy, gh = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    (y, h), g = forward_and_grads(kind, "kernel", x, params, r, gy, gh, eps, offset)
    (y64, h64), g64 = forward_and_grads(kind, "ref", x, params, r, gy, gh, eps, offset, to=torch.float64)
    (ylp, hlp), glp = forward_and_grads(kind, "ref", x, params, r, gy, gh, eps, offset, to=dtype)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, y64, ylp, "y")
    if residual:
        assert torch.equal(h, x.detach() + r.detach()), "h must be x + residual rounded to x's dtype"
    assert g.keys() == g64.keys()
    for name in g:
        assert g[name].dtype == dtype, name
        assert_close(g[name], g64[name], glp[name], f"d{name}")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype, shape, residual, isa):
    check_against_reference("rms", shape, dtype, residual=residual)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm(dtype, shape, residual, isa):
    check_against_reference("layer", shape, dtype, residual=residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_weight_offset_and_no_weight(dtype, isa):
    check_against_reference("rms", (4, 37), dtype, offset=True)
    check_against_reference("rms", (4, 37), dtype, weight=False)
    check_against_reference("rms", (2, 33), dtype, weight=False, residual=False, eps=1e-2)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_params(weight, bias, isa):
    check_against_reference("layer", (5, 51), torch.bfloat16, weight=weight, bias=bias)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_hidden_65536(kind):
    check_against_reference(kind, (3, 65536), torch.bfloat16)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_many_rows_reduce_weight_grad_over_threads(kind):
    # Enough rows that every thread owns some: dweight/dbias are summed per thread, then reduced.
    check_against_reference(kind, (1031, 67), torch.float32)


def test_outputs_are_fully_written():
    # The C++ kernels allocate outputs with at::empty: free NaN-filled blocks of the same sizes first, so the
    # allocator likely hands them back and an unwritten element shows as NaN.
    shape = (7, 999)
    for dtype in (torch.float16, torch.float32):
        for _ in range(4):
            torch.full(shape, float("nan"), dtype=dtype)  # allocated and freed at once
    x, r = make(shape, torch.float16, False), make(shape, torch.float16, False)
    w, b = make(999, torch.float16, False), make(999, torch.float16, False)
    outs = torch.ops.flashgen.rms_norm_fwd(x, w, r, 1e-6, False) + torch.ops.flashgen.layer_norm_fwd(x, w, b, r, 1e-5)
    for out in outs:
        assert torch.isfinite(out).all()


def test_non_contiguous_inputs():
    x = make((97, 6), torch.float32).t()  # (6, 97), last dim strided
    r = make((6, 194), torch.float32)[:, ::2]
    w = make((194,), torch.float32)[::2]
    b = make((97,), torch.float32)
    assert not (x.is_contiguous() or r.is_contiguous() or w.is_contiguous())
    y, h = rms_norm(x, w, 1e-6, residual=r)
    y_ref, h_ref, _ = reference.rms_norm_fwd(x.detach().double(), w.detach().double(), r.detach().double(), 1e-6, False)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-6, rtol=1e-6)
    # The ops themselves accept strided inputs too (a backward's dy is often an expanded tensor).
    y2, _, _, _ = torch.ops.flashgen.layer_norm_fwd(x, w, b, None, 1e-5)
    torch.testing.assert_close(y2, reference.layer_norm_fwd(x, w, b, None, 1e-5)[0], atol=1e-5, rtol=1e-5)
    # y.sum() hands the backward an expanded (stride 0) dy.
    gx, gw = torch.autograd.grad(rms_norm(x, w).sum(), [x, w])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    gx64, gw64 = torch.autograd.grad(reference.rms_norm_fwd(x64, w64, None, 1e-6, False)[0].sum(), [x64, w64])
    torch.testing.assert_close(gx.double(), gx64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw.double(), gw64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fn", ["rms", "layer"])
def test_bad_inputs(fn):
    x, w = torch.randn(4, 8), torch.randn(8)

    def call(x=x, w=w, eps=1e-5, residual=None):
        return rms_norm(x, w, eps, residual) if fn == "rms" else layer_norm(x, w, None, eps, residual)

    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        call(x=x.double())
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        call(x=x.to(torch.int32))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        call(w=torch.randn(7))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        call(w=w.half())
    with pytest.raises(ValueError, match="weight must be on x's device"):
        call(w=torch.randn(8, device="meta"))
    for eps in [0.0, -1e-6, float("nan")]:
        with pytest.raises(ValueError, match="eps must be a number > 0"):
            call(eps=eps)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        call(residual=torch.randn(4, 1))
    with pytest.raises(ValueError, match="non-empty last"):
        call(x=torch.randn(4, 0), w=torch.randn(0))


def test_bad_inputs_reaching_the_cpu_kernel():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="rms_norm_fwd: weight must have shape"):
        torch.ops.flashgen.rms_norm_fwd(x, torch.randn(9), None, 1e-6, False)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: residual must have x's dtype"):
        torch.ops.flashgen.layer_norm_fwd(x, None, None, x.half(), 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        torch.ops.flashgen.rms_norm_fwd(x.double(), None, None, 1e-6, False)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        torch.ops.flashgen.layer_norm_fwd(x, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="rstd must be a float32 tensor of shape"):
        torch.ops.flashgen.rms_norm_bwd(x, None, x, None, torch.ones(5), False)


def _opcheck_samples():
    x, r, w, b = torch.randn(3, 33), torch.randn(3, 33), torch.randn(33), torch.randn(33)
    grad = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    y, h, rstd = torch.ops.flashgen.rms_norm_fwd(x, w, r, 1e-6, True)
    _, hl, mean, rstd_l = torch.ops.flashgen.layer_norm_fwd(x, w, b, r, 1e-5)
    return {
        "rms_norm_fwd": [(*grad(x, w, r), 1e-6, True), (*grad(x), None, None, 1e-6, False)],
        "rms_norm_bwd": [(y, torch.randn_like(h), h, w, rstd, True), (y, None, x, None, rstd, False)],
        "layer_norm_fwd": [(*grad(x, w, b, r), 1e-5), (*grad(x), None, None, None, 1e-5)],
        "layer_norm_bwd": [(y, torch.randn_like(hl), hl, w, mean, rstd_l, True),
                           (y, None, hl, None, mean, rstd_l, False)],
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for args in _opcheck_samples()[op]:
        torch.library.opcheck(getattr(torch.ops.flashgen, op).default, args)


def test_torch_compile_fullgraph_forward_and_backward():
    def block(x, r, w, lw, lb):
        y, h = rms_norm(x, w, 1e-6, residual=r)
        z, h2 = layer_norm(y * 2, lw, lb, 1e-5, residual=h)
        return (z * h2).sum()

    args = [make((2, 3, 40), torch.float32) for _ in range(2)] + [make(40, torch.float32) for _ in range(3)]
    # aot_eager traces fake impls + autograd exactly as inductor does, without minutes of C++ codegen on CI.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(block(*args), args)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_rms_norm_module_is_drop_in(dtype):
    ref = nn.RMSNorm(48, dtype=dtype)
    nn.init.normal_(ref.weight)
    mod = FusedRMSNorm(48, dtype=dtype)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 48, dtype=dtype)
    torch.testing.assert_close(mod(x), ref(x))
    r = torch.randn_like(x)
    y, h = mod(x, r)
    torch.testing.assert_close(h, x + r, atol=0, rtol=0)
    torch.testing.assert_close(y, ref(x + r))
    ref.load_state_dict(mod.state_dict())  # and back


def test_fused_norm_modules_constructor_variants():
    x = torch.randn(3, 4, 6)
    for ref, mod in [(nn.RMSNorm([4, 6], eps=1e-3), FusedRMSNorm([4, 6], eps=1e-3)),
                     (nn.RMSNorm(6, elementwise_affine=False), FusedRMSNorm(6, elementwise_affine=False)),
                     (nn.LayerNorm([4, 6]), FusedLayerNorm([4, 6])),
                     (nn.LayerNorm(6, bias=False), FusedLayerNorm(6, bias=False)),
                     (nn.LayerNorm(6, elementwise_affine=False), FusedLayerNorm(6, elementwise_affine=False))]:
        for p in ref.parameters():
            nn.init.normal_(p)
        assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
        mod.load_state_dict(ref.state_dict())
        torch.testing.assert_close(mod(x), ref(x), msg=repr(mod))
    gemma = FusedRMSNorm(6, weight_offset=True)
    assert torch.equal(gemma.weight, torch.zeros(6))
    torch.testing.assert_close(gemma(x), nn.RMSNorm(6)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_layer_norm_module_is_drop_in(dtype):
    ref = nn.LayerNorm(40, dtype=dtype)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    mod = FusedLayerNorm(40, dtype=dtype)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(5, 40, dtype=dtype, requires_grad=True)
    torch.testing.assert_close(mod(x), ref(x))
    g_mod = torch.autograd.grad(mod(x).square().sum(), [x, mod.weight, mod.bias])
    g_ref = torch.autograd.grad(ref(x).square().sum(), [x, ref.weight, ref.bias])
    for a, b in zip(g_mod, g_ref):
        torch.testing.assert_close(a, b, atol=2e-2 if dtype == torch.float16 else 1e-4, rtol=1e-2)
