"""silu_mul (SwiGLU's gating) on the CPU kernel: against the float64 reference by the eager-error rule, odd
sizes and strided inputs, gradients, opcheck, torch.compile, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from flashgen.kernels import reference, silu_mul
from test_norm import DTYPES, assert_close

SHAPES = [(1,), (7, 97), (3, 5, 1025), (4099,)]  # a tail under one SIMD vector, chunks of 4096 and a remainder


def _eager(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_float64(dtype, shape):
    gate = (3 * torch.randn(shape, dtype=dtype)).requires_grad_()
    up = torch.randn(shape, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, dtype=dtype)
    y = silu_mul(gate, up)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = _eager(g64, u64)
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    g_lp, u_lp = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y_lp = _eager(g_lp, u_lp)
    dg_lp, du_lp = torch.autograd.grad(y_lp, (g_lp, u_lp), dy)
    assert y.dtype == dg.dtype == du.dtype == dtype
    assert_close(y, y64, y_lp, "y", dtype)
    assert_close(dg, dg64, dg_lp, "dgate", dtype)
    assert_close(du, du64, du_lp, "dup", dtype)
    # the reference module agrees with eager float64 too
    assert_close(reference.silu_mul_fwd(g64.detach(), u64.detach()), y64, y_lp, "reference", dtype)


def test_strided_halves_and_extremes():
    both = torch.randn(6, 2 * 37)
    both[0, :5] = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0])
    gate, up = both.chunk(2, dim=-1)  # non-contiguous, as Phi-3's fused gate_up projection gives them
    torch.testing.assert_close(silu_mul(gate, up), _eager(gate.double(), up.double()).float(), rtol=2e-6,
                               atol=1e-6)
    assert torch.isfinite(torch.autograd.grad(silu_mul(gate.requires_grad_(), up).sum(), gate)[0]).all()


@pytest.mark.parametrize("op", ["silu_mul_fwd", "silu_mul_bwd"])
def test_opcheck(op):
    g, u, d = (torch.randn(3, 33, requires_grad=op == "silu_mul_fwd") for _ in range(3))
    args = (g, u) if op == "silu_mul_fwd" else (d, g.detach(), u.detach())
    torch.library.opcheck(getattr(torch.ops.flashgen, op).default, args)


def test_torch_compile_fullgraph():
    def mlp(x, wg, wu):
        return silu_mul(x @ wg, x @ wu).sum()

    args = [torch.randn(5, 24, requires_grad=True), torch.randn(24, 40, requires_grad=True),
            torch.randn(24, 40, requires_grad=True)]
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    for got, want in zip(torch.autograd.grad(compiled(*args), args), torch.autograd.grad(mlp(*args), args)):
        torch.testing.assert_close(got, want)


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        silu_mul(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="up has dtype"):
        silu_mul(x, x.half())
    with pytest.raises(TypeError, match="gate must be float32"):
        silu_mul(x.long(), x.long())
    with pytest.raises(TypeError, match="up must be a tensor"):
        silu_mul(x, 3.0)
    with pytest.raises(RuntimeError, match="up must have gate's shape"):
        torch.ops.flashgen.silu_mul_fwd(x, torch.randn(8, 4))
