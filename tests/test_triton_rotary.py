"""Triton rotary kernel (kernels/triton/rotary.py) under TRITON_INTERPRET=1 on CPU tensors, against the float64
reference, both directions, partial rotary and per-batch / shared tables."""
from triton_interp import poisoned  # isort: skip  (sets TRITON_INTERPRET before triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402

from flashgen.kernels import reference  # noqa: E402
from flashgen.kernels.triton import rotary as tri  # noqa: E402
from test_norm import DTYPES, assert_close  # noqa: E402
from test_rotary import cos_sin  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("shape,r,shared", [((1, 1, 1, 8), 8, False), ((2, 9, 3, 40), 40, False),
                                            ((2, 5, 2, 96), 64, True)], ids=str)
def test_matches_float64(dtype, backward, shape, r, shared):
    x = torch.randn(shape, dtype=dtype)
    cos, sin = cos_sin(1 if shared else shape[0], shape[1], r, dtype, duplicated=False)
    with poisoned():
        y = tri.rotary(x, cos, sin, backward)
    y64 = reference.rotary(x.double(), cos.double(), sin.double(), backward)
    assert_close(y, y64, reference.rotary(x, cos, sin, backward), "y", dtype)
