"""Selective recomputation: activations that are cheap to redo are kept for the backward as their recipe.

Most of what a transformer block keeps between forward and backward are the inputs of its linear layers, and
three of them are cheap functions of tensors the backward keeps anyway: a norm's output (of its input, which
the norm's own backward saves), SwiGLU's silu(gate) * up (of gate and up, which silu_mul saves) and the padded
attention output (the packed one, which attention saves, scattered into its rows). Inside `recomputing()` the
autograd saved-tensor hooks store such a tensor as (recipe, view) instead of its storage, so it is freed after
the forward like any temporary; the backward rebuilds it once, when the first of its consumers asks, by the
same kernel on the same inputs (bit for bit the forward's value). About 0.4 MB per token of a SmolLM2-135M
training step (0.8 GB at 2048 tokens), at the cost of re-running the norms and the gating.

A registered tensor is used as a recipe only while it is alive and unmodified (its version counter is checked),
so a freed tensor whose memory a new one reuses, or one written in place, is saved as usual.
"""
import contextlib
import contextvars
import weakref

import torch

_registry = contextvars.ContextVar("flashgen_recompute", default=None)


class _Recipe:
    """fn(*args), run at most once, when the backward first needs the value."""

    __slots__ = ("fn", "args", "value")

    def __init__(self, fn, args):
        self.fn, self.args, self.value = fn, args, None

    def get(self):
        if self.value is None:
            self.value = self.fn(*self.args)
            self.args = None
        return self.value


class _SavedView:
    """What the hooks store for one saved tensor: its recipe and the view of the recipe's output it was."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe, t):
        self.recipe, self.size, self.stride, self.offset = recipe, t.size(), t.stride(), t.storage_offset()

    def unpack(self):
        return self.recipe.get().as_strided(self.size, self.stride, self.offset)


class _Registry:
    def __init__(self):
        self.entries = {}  # storage address -> (weak reference to the tensor, its version, recipe)
        self.saved = 0  # saved tensors stored as recipes (tests read it)

    def pack(self, t):
        entry = self.entries.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if entry is None:
            return t
        ref, version, recipe = entry
        owner = ref()
        # alive means the address is still its storage; an equal version means nothing wrote to it since
        if owner is None or owner._version != version or t._version != version or t.dtype != owner.dtype:
            return t
        self.saved += 1
        return _SavedView(recipe, t)


def _unpack(saved):
    return saved.unpack() if isinstance(saved, _SavedView) else saved


def register(out, fn, *args):
    """Inside `recomputing()`: the backward may rebuild `out` as fn(*args) instead of keeping it. fn must give
    the same values from the same args; args should be tensors the backward keeps anyway. No-op elsewhere, and
    for a tensor that is not the whole of its storage."""
    registry = _registry.get()
    if registry is None or not out.is_contiguous() or out.storage_offset() != 0 or out.numel() == 0 or \
            out.untyped_storage().nbytes() != out.numel() * out.element_size():
        return out
    registry.entries[out.untyped_storage().data_ptr()] = (weakref.ref(out), out._version, _Recipe(fn, args))
    return out


@contextlib.contextmanager
def recomputing():
    """Saved-tensor hooks for the tensors `register` names while the block runs; yields the registry."""
    registry = _Registry()
    token = _registry.set(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, _unpack):
            yield registry
    finally:
        _registry.reset(token)
