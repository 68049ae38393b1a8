"""apply_rotary on the CPU kernel: against the rotate-half formula of Hugging Face in float64 (by the eager-error
rule), partial rotary, per-batch and shared cos / sin, gradients, opcheck, torch.compile, bad inputs."""
import pytest
import torch

from flashgen.kernels import apply_rotary, reference
from test_norm import DTYPES, assert_close


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager(x, cos, sin):
    """Hugging Face's apply_rotary_pos_emb on (B, S, H, D), with the partial-rotary split of Phi-3."""
    r = cos.shape[-1]
    c, s = cos[:, :, None], sin[:, :, None]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * c + rotate_half(rot) * s, rest], -1)


def cos_sin(batch, seqlen, r, dtype, duplicated=True):
    pos = torch.arange(seqlen, dtype=torch.float64)[None, :, None] + torch.randint(0, 50, (batch, 1, 1))
    freqs = pos * (10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r))
    emb = torch.cat([freqs, freqs if duplicated else freqs * 1.7], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r,shared", [((1, 1, 1, 8), 8, False), ((2, 97, 3, 40), 40, False),
                                            ((3, 13, 4, 96), 64, True), ((2, 5, 2, 80), 32, False)], ids=str)
def test_matches_float64(dtype, shape, r, shared):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    cos, sin = cos_sin(1 if shared else shape[0], shape[1], r, dtype)
    dy = torch.randn(shape, dtype=dtype)
    y = apply_rotary(x, cos, sin)
    dx, = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = eager(x64, cos.double(), sin.double())
    dx64, = torch.autograd.grad(y64, x64, dy.double())
    x_lp = x.detach().clone().requires_grad_()
    y_lp = eager(x_lp, cos, sin)
    dx_lp, = torch.autograd.grad(y_lp, x_lp, dy)
    assert y.dtype == dx.dtype == dtype
    assert_close(y, y64, y_lp, "y", dtype)
    assert_close(dx, dx64, dx_lp, "dx", dtype)


def test_halves_of_cos_and_sin_may_differ():
    """The kernel reads both halves of cos / sin, so the backward is exact for any tables, not only duplicated."""
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = cos_sin(2, 7, 16, torch.float64, duplicated=False)
    y = torch.ops.flashgen.rotary(x.float(), cos.float(), sin.float(), False)
    torch.testing.assert_close(y.double(), reference.rotary(x.detach(), cos, sin, False), rtol=1e-6, atol=1e-6)
    torch.autograd.gradcheck(lambda t: reference.rotary(t, cos, sin, False), (x,))
    dy = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    want, = torch.autograd.grad(reference.rotary(x, cos, sin, False), x, dy)
    got = torch.ops.flashgen.rotary(dy.float(), cos.float(), sin.float(), True)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_opcheck():
    cos, sin = cos_sin(2, 9, 24, torch.float32)
    for backward in (False, True):
        torch.library.opcheck(torch.ops.flashgen.rotary.default,
                              (torch.randn(2, 9, 3, 32, requires_grad=True), cos, sin, backward))


def test_torch_compile_fullgraph():
    cos, sin = cos_sin(1, 11, 16, torch.float32)

    def f(x, w):
        return apply_rotary((x @ w).view(2, 11, 2, 16), cos, sin).square().sum()

    x, w = torch.randn(2, 11, 8), torch.randn(8, 32, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x, w), w)[0], torch.autograd.grad(f(x, w), w)[0])


def test_bad_inputs():
    x = torch.randn(2, 5, 3, 16)
    cos, sin = cos_sin(2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rotary(x, cos[:, :4], sin)
    with pytest.raises(ValueError, match="rotary_dim even"):
        apply_rotary(x, cos[..., :15], sin[..., :15])
    with pytest.raises(TypeError, match="cos must have x's dtype"):
        apply_rotary(x, cos.double(), sin)
    with pytest.raises(ValueError, match="x must be"):
        apply_rotary(x[0], cos, sin)
    with pytest.raises(RuntimeError, match="rotary: cos and sin must both be"):
        torch.ops.flashgen.rotary(x, cos, sin[..., :8], False)
