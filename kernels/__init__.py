"""flashgen kernels: public functions over the `flashgen::*` ops declared in kernels/ops.py."""
# Run from the repository root, this folder is also importable as a top-level `kernels`, a name transformers
# probes for the Hugging Face hub package of that name: imported so, it hands the name to that package where one
# is installed, and stays empty otherwise (flashgen's ops must be declared once, by flashgen.kernels).
if __name__ != "flashgen.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:  # the import system returns what sys.modules holds once this file has run
        sys.modules[__name__] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[__name__])
else:
    import torch

    from . import _backend, ops  # noqa: F401  (loads the extensions and declares the ops)
    from ._backend import use_backend  # noqa: F401
    from .norm import FusedLayerNorm, FusedRMSNorm, layer_norm, rms_norm  # noqa: F401
    from .activation import silu_mul  # noqa: F401
    from .cross_entropy import linear_cross_entropy  # noqa: F401
    from .rotary import apply_rotary  # noqa: F401
    from .attention import (flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_with_kvcache,  # noqa: F401
                            flash_attn_with_kvcache)
    from .qlinear import (QuantizedLinear, QuantizedWeight, ggml_linear, int4_linear, int8_linear, int8_linear_dynamic,  # noqa: F401,E501
                          quantize_int4, quantize_int8, quantize_model)

    if torch.cuda.is_available():
        # Importing Triton costs start-up time, so the CUDA kernels are registered only where they can run.
        from .triton import register as _register_triton

        _register_triton()
