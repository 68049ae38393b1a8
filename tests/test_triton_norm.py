"""Triton norm kernels (kernels/triton/norm.py) under TRITON_INTERPRET=1 on CPU tensors, against the float64
reference, with the same error rule as tests/test_norm.py."""
from triton_interp import poisoned  # isort: skip  (sets TRITON_INTERPRET before triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402

from flashgen.kernels import reference  # noqa: E402
from flashgen.kernels.triton import norm as tri  # noqa: E402
from test_norm import DTYPES, assert_close  # noqa: E402

# (1, 1): one element; (9, 97): a masked chunk and several rows per backward program; 1500: two chunks of
# the 1024 config; 4100: two chunks of the 4096 config.
SHAPES = [(1, 1), (9, 97), (2, 1500), (2, 4100)]


def _inputs(shape, dtype, residual, weight, bias):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    return (x, torch.randn(n, dtype=dtype) if weight else None, torch.randn(n, dtype=dtype) if bias else None,
            torch.randn(shape, dtype=dtype) if residual else None)


def _poisoned(fn):
    with poisoned():
        return fn()


def _check_all(outs, refs64, refs_lowp, names, dtype):
    for out, r64, rlp, name in zip(outs, refs64, refs_lowp, names):
        if r64 is None or r64.numel() == 0:
            assert out.numel() == 0, name
            continue
        assert out.shape == r64.shape, name
        assert_close(out, r64, rlp, name, dtype)


def _up(t):
    return t.double() if t is not None else None


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rms", "rms_offset", "layer"])
def test_forward_and_backward(kind, dtype, shape):
    residual = shape[-1] != 97  # the plain path on one shape, the fused residual on the others
    x, w, b, r = _inputs(shape, dtype, residual, True, kind == "layer")
    dy, dh = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) if residual else None
    if kind == "layer":
        y, h, mean, rstd = _poisoned(lambda: tri.layer_norm_fwd(x, w, b, r, 1e-5))
        ref64 = reference.layer_norm_fwd(_up(x), _up(w), _up(b), _up(r), 1e-5)
        reflp = reference.layer_norm_fwd(x, w, b, r, 1e-5)
        _check_all([y, mean, rstd], [ref64[0], *ref64[2:]], [reflp[0], *reflp[2:]], ["y", "mean", "rstd"], dtype)
        hh = h if residual else x
        dx, dw, db = _poisoned(lambda: tri.layer_norm_bwd(dy, dh, hh, w, mean, rstd, True))
        g64 = reference.layer_norm_bwd(_up(dy), _up(dh), _up(hh), _up(w), _up(mean), _up(rstd), True)
        glp = reference.layer_norm_bwd(dy, dh, hh, w, mean, rstd, True)
        _check_all([dx, dw, db], g64, glp, ["dx", "dw", "db"], dtype)
    else:
        off = kind == "rms_offset"
        y, h, rstd = _poisoned(lambda: tri.rms_norm_fwd(x, w, r, 1e-6, off))
        ref64 = reference.rms_norm_fwd(_up(x), _up(w), _up(r), 1e-6, off)
        reflp = reference.rms_norm_fwd(x, w, r, 1e-6, off)
        _check_all([y, rstd], [ref64[0], ref64[2]], [reflp[0], reflp[2]], ["y", "rstd"], dtype)
        hh = h if residual else x
        dx, dw = _poisoned(lambda: tri.rms_norm_bwd(dy, dh, hh, w, rstd, off))
        g64 = reference.rms_norm_bwd(_up(dy), _up(dh), _up(hh), _up(w), _up(rstd), off)
        glp = reference.rms_norm_bwd(dy, dh, hh, w, rstd, off)
        _check_all([dx, dw], g64, glp, ["dx", "dw"], dtype)
    if residual:
        # The interpreter rounds float32 -> bfloat16 by truncation (GPUs round to nearest): allow 1 ulp there.
        torch.testing.assert_close(h, x + r, atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
    else:
        assert h.numel() == 0


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_without_weight_and_bias(kind):
    x, _, _, r = _inputs((5, 33), torch.float32, True, False, False)
    dy, dh = torch.randn(5, 33), torch.randn(5, 33)
    if kind == "rms":
        y, h, rstd = tri.rms_norm_fwd(x, None, r, 1e-6, False)
        torch.testing.assert_close(y, reference.rms_norm_fwd(x, None, r, 1e-6, False)[0])
        dx, dw = tri.rms_norm_bwd(dy, dh, h, None, rstd, False)
        torch.testing.assert_close(dx, reference.rms_norm_bwd(dy, dh, h, None, rstd, False)[0])
        assert dw.numel() == 0
    else:
        y, h, mean, rstd = tri.layer_norm_fwd(x, None, None, r, 1e-5)
        torch.testing.assert_close(y, reference.layer_norm_fwd(x, None, None, r, 1e-5)[0])
        dx, dw, db = tri.layer_norm_bwd(dy, dh, h, None, mean, rstd, True)
        ref = reference.layer_norm_bwd(dy, dh, h, None, mean, rstd, True)
        torch.testing.assert_close(dx, ref[0])
        torch.testing.assert_close(db, ref[2])
        assert dw.numel() == 0


def test_bad_input_is_refused():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        tri.rms_norm_fwd(x.double(), None, None, 1e-6, False)
    with pytest.raises(ValueError, match="weight must have x's dtype"):
        tri.layer_norm_fwd(x, torch.randn(8).half(), None, None, 1e-5)
    with pytest.raises(ValueError, match="eps must be > 0"):
        tri.rms_norm_fwd(x, None, None, 0.0, False)


def test_aot_specs_cover_every_config():
    specs = tri.aot_specs()
    for kernel in ("_norm_fwd", "_norm_bwd"):
        for block, warps in tri.CONFIGS:
            assert any(s["name"].startswith(kernel) and s["constexprs"]["BLOCK"] == block and s["num_warps"] == warps
                       for s in specs), (kernel, block)
