"""Loads the compiled extensions, tells which backends have a kernel for an op, and routes ops to a chosen
backend (use_backend)."""
import contextlib
import importlib
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("flashgen")


def _load(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        log.debug("%s not loaded: %s", name, e)
        return None


# Importing the extensions runs their TORCH_LIBRARY_IMPL registrations.
C = _load("flashgen._C")
if C is None:
    raise ImportError(
        "flashgen's CPU extension flashgen._C is not built. Build it with "
        "`pip install -e . --no-build-isolation` (or `make build`) from the repository root."
    )
C_cuda = _load("flashgen._C_cuda") if torch.version.cuda else None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if `flashgen::op` has a kernel registered directly for `dispatch_key` (not a fallback)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"flashgen::{op}", dispatch_key)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_active = []  # the backends of the enclosing use_backend blocks, innermost last


def active_backend():
    """The backend of the innermost use_backend block, or None (each device's registered kernels)."""
    return _active[-1] if _active else None


class _TritonRoute(TorchDispatchMode):
    """Below autograd, every flashgen op goes to its Triton launch wrapper, or, where the family has none, to
    its reference: what a CUDA device runs. Other ops run as they are."""

    def __init__(self):
        super().__init__()
        from . import ops
        from .triton import families, kernels

        if not torch.cuda.is_available():
            from triton.runtime.interpreter import InterpretedFunction

            if not any(isinstance(v, InterpretedFunction) for m in families() for v in vars(m).values()):
                raise RuntimeError("use_backend('triton') without a GPU runs Triton's interpreter: set "
                                   "TRITON_INTERPRET=1 before flashgen's Triton kernels are first imported")
        self.kernels = {**ops.REFERENCE, **kernels()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "flashgen":
            return self.kernels[func._schema.name.split("::", 1)[1]](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def use_backend(name):
    """Inside, every flashgen op runs its "triton" kernel (the only backend `name` takes for now) whatever its
    tensors' device: the GPU code path. On CPU tensors that needs TRITON_INTERPRET=1 set before triton is first
    imported, and runs the same kernel source in Triton's interpreter. Ops without a Triton kernel run their
    reference, as on a GPU. The engine follows: on the CPU it leaves its C++ step for the Python layers, and
    quantized weights are prepacked per backend."""
    if name != "triton":
        raise ValueError(f"backend must be 'triton', got {name!r}")
    if not triton_available():
        raise RuntimeError("use_backend('triton') needs triton installed")
    _active.append(name)
    try:
        with _TritonRoute():
            yield
    finally:
        _active.pop()
