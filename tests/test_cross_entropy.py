"""Fused linear cross-entropy on the CPU kernel against F.cross_entropy of float64 logits: losses, gradients of
hidden / weight / bias, ignore_index (all-ignored too), reductions, several tiles, opcheck, compile."""
import pytest
import torch
import torch.nn.functional as F

from flashgen.kernels import linear_cross_entropy
from test_norm import assert_close

# (rows, hidden, vocab): one row; odd sizes; the kernel's tiles (1024 rows x 2^21 logits) split 97 rows' 40000
# classes into two vocabulary chunks, and 1025 rows into two row blocks of two chunks each (the last ones partial)
CASES = [(1, 8, 5), (97, 40, 1025), (97, 24, 40000), (1025, 16, 3000)]


def _eager(h, w, t, b, ignore_index=-100, reduction="mean"):
    z = h @ w.T
    return F.cross_entropy(z + b if b is not None else z, t, ignore_index=ignore_index, reduction=reduction)


def _inputs(n, hidden, vocab, dtype, bias):
    h = torch.randn(n, hidden, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, dtype=dtype) / hidden ** 0.5).requires_grad_()
    b = torch.randn(vocab, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,))
    t[1:][torch.rand(n - 1) < 0.2] = -100  # row 0 stays valid, so a mean exists
    return h, w, b, t


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case, bias, dtype):
    h, w, b, t = _inputs(*case, dtype, bias)
    params = (h, w, b)
    up = [x.detach().double().requires_grad_() if x is not None else None for x in params]
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(h, w, t, bias=b, reduction=reduction)
        ref = _eager(*up[:2], t, up[2], reduction=reduction)
        low = _eager(*[x.detach().requires_grad_() if x is not None else None for x in params][:2], t,
                     b.detach().requires_grad_() if b is not None else None, reduction=reduction)
        assert loss.dtype == torch.float32
        assert_close(loss, ref, low.float(), f"loss {reduction}", torch.float32 if dtype == torch.float32 else dtype)
        lows = [x.detach().requires_grad_() if x is not None else None for x in params]
        low_loss = _eager(lows[0], lows[1], t, lows[2], reduction=reduction)
        for name, got, want, lp in zip("hwb", _grads(loss, params), _grads(ref, up), _grads(low_loss, lows)):
            assert got.dtype == dtype
            assert_close(got, want, lp, f"d{name} {reduction}", dtype)


def test_none_reduction_and_shapes():
    h, w, _, t = _inputs(12, 16, 33, torch.float32, False)
    per_row = linear_cross_entropy(h.view(3, 4, 16), w, t.view(3, 4), reduction="none")
    assert per_row.shape == (3, 4)
    want = _eager(h.double(), w.double(), t, None, reduction="none").view(3, 4)
    torch.testing.assert_close(per_row.double(), want, rtol=1e-5, atol=1e-5)
    assert (per_row.view(-1)[t == -100] == 0).all()


def test_ignore_index_and_all_ignored():
    h, w, _, t = _inputs(9, 16, 21, torch.float32, False)
    t[:] = 3
    t[::2] = 7
    got = linear_cross_entropy(h, w, t, ignore_index=7)
    torch.testing.assert_close(got, _eager(h, w, t, None, ignore_index=7))
    t[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, t)) and torch.isnan(_eager(h, w, t, None))
    assert linear_cross_entropy(h, w, t, reduction="sum") == 0
    dh, dw = torch.autograd.grad(linear_cross_entropy(h, w, t, reduction="sum"), (h, w))
    assert not dh.any() and not dw.any()


@pytest.mark.parametrize("op", ["linear_cross_entropy_fwd", "linear_cross_entropy_bwd"])
def test_opcheck(op):
    h, w, b, t = _inputs(13, 16, 37, torch.float32, True)
    if op == "linear_cross_entropy_fwd":
        args = (h, w, b, t, -100)
    else:
        _, lse = torch.ops.flashgen.linear_cross_entropy_fwd(h.detach(), w.detach(), b.detach(), t, -100)
        args = (torch.randn(13), h.detach(), w.detach(), b.detach(), t, lse, -100)
    torch.library.opcheck(getattr(torch.ops.flashgen, op).default, args)


def test_torch_compile_fullgraph():
    def step(x, w_in, w_out, t):
        return linear_cross_entropy(torch.tanh(x @ w_in), w_out, t)

    x, w_in, w_out = torch.randn(10, 12), torch.randn(12, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (10,))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w_in, w_out, t), (w_in, w_out))
    want = torch.autograd.grad(step(x, w_in, w_out, t), (w_in, w_out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    h, w, _, t = _inputs(4, 8, 10, torch.float32, False)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(ValueError, match="target must be int64"):
        linear_cross_entropy(h, w, t.int())
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    t[1] = 10
    with pytest.raises(RuntimeError, match=r"target\[1\] = 10 is not a class"):
        linear_cross_entropy(h, w, t)
