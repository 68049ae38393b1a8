"""Triton fused linear cross-entropy (kernels/triton/cross_entropy.py) under TRITON_INTERPRET=1 on CPU tensors,
against the float64 reference: several column blocks per row and several row chunks."""
from triton_interp import poisoned  # isort: skip  (sets TRITON_INTERPRET before triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402

from flashgen.kernels import reference  # noqa: E402
from flashgen.kernels.triton import cross_entropy as tri  # noqa: E402


@pytest.mark.parametrize("n,hidden,vocab", [(1, 8, 5), (13, 24, 4100)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64(monkeypatch, n, hidden, vocab, bias):
    monkeypatch.setattr(tri, "CHUNK_ELEMS", 5 * vocab)  # chunks of 5 rows
    h, w = torch.randn(n, hidden), torch.randn(vocab, hidden) / hidden ** 0.5
    b = torch.randn(vocab) if bias else None
    t = torch.randint(0, vocab, (n,))
    t[::3] = -100
    dloss = torch.rand(n)
    with poisoned():
        loss, lse = tri.linear_cross_entropy_fwd(h, w, b, t, -100)
        dh, dw, db = tri.linear_cross_entropy_bwd(dloss, h, w, b, t, lse, -100)
    up = lambda x: x.double() if x is not None else None  # noqa: E731
    loss64, lse64 = reference.linear_cross_entropy_fwd(up(h), up(w), up(b), t, -100)
    dh64, dw64, db64 = reference.linear_cross_entropy_bwd(dloss.double(), up(h), up(w), up(b), t, lse64, -100)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), dh64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-5)
    if bias:
        torch.testing.assert_close(db.double(), db64, rtol=1e-4, atol=1e-5)
    else:
        assert db.numel() == 0
