"""flashgen.integrations.recompute: tensors saved as recipes are rebuilt once, bit for bit, in the right view;
a tensor written in place after it was registered, or freed, is never mistaken for its recipe."""
import torch

from flashgen.integrations import recompute


def _double(x):
    _double.calls += 1
    return x * 2


_double.calls = 0


def _grads(w, use_recipe, inplace=False):
    """Gradient of w in sum((y @ w) + (y[1:] @ w) ** 2), y = 2x kept as a recipe (or not)."""
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    with recompute.recomputing() as registry:
        y = _double(x)
        if use_recipe:
            recompute.register(y, _double, x)
        if inplace:
            y.add_(1)
        loss = (y @ w).sum() + ((y[1:] @ w) ** 2).sum()
    _double.calls = 0
    return torch.autograd.grad(loss, w)[0], registry.saved, _double.calls


def test_saved_views_rebuilt_once_and_equal():
    w = torch.randn(7, 3, requires_grad=True)
    kept, saved_kept, _ = _grads(w, use_recipe=False)
    rebuilt, saved, calls = _grads(w, use_recipe=True)
    assert saved_kept == 0 and saved == 2 and calls == 1  # both mm's saved views, one rebuild
    assert torch.equal(kept, rebuilt)


def test_written_in_place_is_saved_as_usual():
    w = torch.randn(7, 3, requires_grad=True)
    kept, _, _ = _grads(w, use_recipe=False, inplace=True)
    got, saved, calls = _grads(w, use_recipe=True, inplace=True)
    assert saved == 0 and calls == 0
    assert torch.equal(kept, got)


def test_freed_tensor_is_forgotten():
    with recompute.recomputing() as registry:
        recompute.register(torch.ones(64, 64), torch.zeros, 64, 64)  # dies at once
        w = torch.randn(64, 3, requires_grad=True)
        loss = (torch.full((64, 64), 3.0) @ w).sum()  # may reuse the freed memory
    assert registry.saved == 0
    assert torch.equal(torch.autograd.grad(loss, w)[0], torch.full((64, 3), 3.0 * 64))


def test_register_outside_is_a_no_op():
    y = torch.ones(3)
    assert recompute.register(y, torch.zeros, 3) is y
