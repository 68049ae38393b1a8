"""Triton silu_mul kernels (kernels/triton/activation.py) under TRITON_INTERPRET=1 on CPU tensors, against the
float64 reference with the rule of tests/test_activation.py."""
from triton_interp import poisoned  # isort: skip  (sets TRITON_INTERPRET before triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashgen.kernels.triton import activation as tri  # noqa: E402
from test_norm import DTYPES, assert_close  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 97), (2, 1100)], ids=str)
def test_matches_float64(dtype, shape):
    gate, up, dy = 3 * torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    with poisoned():
        y = tri.silu_mul_fwd(gate, up)
        dg, du = tri.silu_mul_bwd(dy, gate, up)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    g_lp, u_lp = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y_lp = F.silu(g_lp) * u_lp
    dg_lp, du_lp = torch.autograd.grad(y_lp, (g_lp, u_lp), dy)
    assert_close(y, y64, y_lp, "y", dtype)
    assert_close(dg, dg64, dg_lp, "dgate", dtype)
    assert_close(du, du64, du_lp, "dup", dtype)


def test_bad_inputs():
    with pytest.raises(ValueError, match="up must have gate's shape"):
        tri.silu_mul_fwd(torch.randn(3), torch.randn(4))
