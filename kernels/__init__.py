"""flashgen kernels: public functions over the `flashgen::*` ops declared in kernels/ops.py."""
import torch

from . import _backend, ops  # noqa: F401  (loads the extensions and declares the ops)

if torch.cuda.is_available():
    # Importing Triton costs start-up time, so the CUDA kernels are registered only where they can run.
    from .triton import register as _register_triton

    _register_triton()
