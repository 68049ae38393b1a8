"""Norms on a CUDA GPU: the CUDA C++ RMSNorm forward (flashgen_cuda::rms_norm_fwd), the Triton kernels and the
float64 reference agree (skipped without a GPU by tests/conftest.py)."""
import pytest
import torch

from flashgen.kernels import FusedLayerNorm, FusedRMSNorm, layer_norm, reference, rms_norm
from flashgen.kernels._backend import has_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 1), (3, 97), (2, 5, 4097), (4, 4096), (2, 65536)]


def assert_close(out, ref64, ref_lowp, name):
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    floor = FLOOR[out.dtype] * (1 + ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x {ref_err:.3g} + {floor:.3g}"


def test_cuda_kernels_are_registered():
    import flashgen._C_cuda  # noqa: F401

    for op in ("rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"):
        assert has_kernel(op, "CUDA"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flashgen_cuda::rms_norm_fwd", "CUDA")


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rms_norm_fwd_matches_triton_and_reference(dtype, shape, residual, offset, monkeypatch):
    x = torch.randn(shape, dtype=dtype, device="cuda")
    r = torch.randn_like(x) if residual else None
    w = torch.randn(shape[-1], dtype=dtype, device="cuda")
    monkeypatch.setenv("FLASHGEN_CUDA_BACKEND", "cuda")
    y_cu, h_cu, rstd_cu = torch.ops.flashgen.rms_norm_fwd(x, w, r, 1e-6, offset)  # routed to CUDA C++
    monkeypatch.delenv("FLASHGEN_CUDA_BACKEND")
    y_tr, h_tr, rstd_tr = torch.ops.flashgen.rms_norm_fwd(x, w, r, 1e-6, offset)  # Triton
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    y64, _, rstd64 = reference.rms_norm_fwd(up(x), up(w), up(r), 1e-6, offset)
    ylp, _, _ = reference.rms_norm_fwd(x, w, r, 1e-6, offset)
    assert_close(y_cu, y64, ylp, "cuda y")
    assert_close(y_tr, y64, ylp, "triton y")
    torch.testing.assert_close(rstd_cu, rstd_tr, rtol=1e-5, atol=0)
    if residual:
        assert torch.equal(h_cu, x + r) and torch.equal(h_tr, x + r)
    else:
        assert h_cu.numel() == 0 and h_tr.numel() == 0


def test_cuda_rms_norm_unaligned_and_strided_inputs():
    # Odd hidden size and an offset view take the element-by-element path; a transposed x is made contiguous.
    base = torch.randn(3 * 97 + 1, dtype=torch.bfloat16, device="cuda")
    x = base[1:].view(3, 97)
    w = torch.randn(97, dtype=torch.bfloat16, device="cuda")
    y = torch.ops.flashgen_cuda.rms_norm_fwd(x, w, None, 1e-6, False)[0]
    torch.testing.assert_close(y, reference.rms_norm_fwd(x, w, None, 1e-6, False)[0], atol=2e-2, rtol=2e-2)
    xt = torch.randn(64, 8, dtype=torch.float16, device="cuda").t()
    y = torch.ops.flashgen_cuda.rms_norm_fwd(xt, None, None, 1e-6, False)[0]
    torch.testing.assert_close(y, reference.rms_norm_fwd(xt, None, None, 1e-6, False)[0], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backward_and_layer_norm_on_gpu(dtype):
    shape = (3, 5, 1500)
    x = torch.randn(shape, dtype=dtype, device="cuda", requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(shape[-1], dtype=dtype, device="cuda", requires_grad=True)
    b = torch.randn_like(w, requires_grad=True)
    for fn, params in ((lambda: rms_norm(x, w, 1e-6, residual=r), [w]),
                       (lambda: layer_norm(x, w, b, 1e-5, residual=r), [w, b])):
        y, h = fn()
        loss = (y.double() * 1.5).sum() + h.double().sum()
        grads = torch.autograd.grad(loss, [x, r, *params])
        x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
        p64 = [p.detach().double().requires_grad_() for p in params]
        if len(params) == 1:
            y64, h64, _ = reference.rms_norm_fwd(x64, p64[0], r64, 1e-6, False)
        else:
            y64, h64, _, _ = reference.layer_norm_fwd(x64, p64[0], p64[1], r64, 1e-5)
        g64 = torch.autograd.grad((y64 * 1.5).sum() + h64.sum(), [x64, r64, *p64])
        for g, e in zip(grads, g64):
            torch.testing.assert_close(g.double(), e, atol=FLOOR[dtype] * (1 + e.abs().max().item()) * 4, rtol=0)


def test_modules_on_gpu():
    x = torch.randn(4, 64, device="cuda")
    for ref, mod in ((torch.nn.RMSNorm(64), FusedRMSNorm(64)), (torch.nn.LayerNorm(64), FusedLayerNorm(64))):
        ref, mod = ref.cuda(), mod.cuda()
        mod.load_state_dict(ref.state_dict())
        torch.testing.assert_close(mod(x), ref(x))
