"""silu_mul, the fused linear cross-entropy and rotary on a real GPU (the Triton kernels registered for CUDA)
against the float64 reference, by the eager-error rule of the CPU tests."""
import pytest
import torch
import torch.nn.functional as F

from flashgen.kernels import linear_cross_entropy, silu_mul

DEVICE = "cuda"


def _close(out, ref64, low, floor):
    err = (out.double() - ref64).abs().max().item()
    assert err <= 2 * (low.double() - ref64).abs().max().item() + floor * (1 + ref64.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul(dtype):
    gate = (3 * torch.randn(7, 4099, device=DEVICE)).to(dtype).requires_grad_()
    up = torch.randn(7, 4099, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(7, 4099, device=DEVICE).to(dtype)
    y = silu_mul(gate, up)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    g_lp, u_lp = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y_lp = F.silu(g_lp) * u_lp
    dg_lp, du_lp = torch.autograd.grad(y_lp, (g_lp, u_lp), dy)
    floor = torch.finfo(dtype).eps
    for out, ref, low in ((y, y64, y_lp), (dg, dg64, dg_lp), (du, du64, du_lp)):
        _close(out, ref, low, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy(dtype):
    h = torch.randn(1025, 96, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(50000, 96, device=DEVICE) / 10).to(dtype).requires_grad_()
    t = torch.randint(0, 50000, (1025,), device=DEVICE)
    t[::5] = -100
    loss = linear_cross_entropy(h, w, t)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, t)
    dh64, dw64 = torch.autograd.grad(ref, (h64, w64))
    h_lp, w_lp = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    low = F.cross_entropy((h_lp @ w_lp.T).float(), t)
    dh_lp, dw_lp = torch.autograd.grad(low, (h_lp, w_lp))
    floor = torch.finfo(dtype).eps
    _close(loss, ref, low, 1e-6)
    _close(dh, dh64, dh_lp, floor)
    _close(dw, dw64, dw_lp, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary(dtype):
    from flashgen.kernels import apply_rotary, reference

    x = torch.randn(2, 97, 5, 96, device=DEVICE).to(dtype).requires_grad_()
    pos = torch.arange(97, device=DEVICE, dtype=torch.float64)[None, :, None]
    emb = pos * 10000.0 ** (-torch.arange(0, 64, 2, device=DEVICE, dtype=torch.float64) / 64)
    emb = torch.cat([emb, emb], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dy = torch.randn_like(x)
    y = apply_rotary(x, cos, sin)
    dx, = torch.autograd.grad(y, x, dy)
    floor = torch.finfo(dtype).eps
    y64 = reference.rotary(x.detach().double(), cos.double(), sin.double(), False)
    dx64 = reference.rotary(dy.double(), cos.double(), sin.double(), True)
    _close(y, y64, reference.rotary(x.detach(), cos, sin, False), floor)
    _close(dx, dx64, reference.rotary(dy, cos, sin, True), floor)
