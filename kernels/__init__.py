"""flashgen kernels: public functions over the `flashgen::*` ops declared in kernels/ops.py."""
from . import _backend, ops  # noqa: F401  (loads the extensions and declares the ops)
from .triton import register as _register_triton

_register_triton()
