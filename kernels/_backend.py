"""Loads the compiled extensions and tells which backends have a kernel for an op."""
import importlib
import logging

import torch

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
