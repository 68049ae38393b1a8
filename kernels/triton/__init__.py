"""Triton kernels: one file per op family, each holding its kernels, launch wrappers and two hooks:

- `KERNELS`: {op name: launch wrapper}, the family's flashgen ops it computes (`register()` makes them the
  CUDA kernels; `flashgen.kernels.use_backend("triton")` routes calls to them from any device);
- `aot_specs()` lists every kernel variant (each autotune config) for the static GPU check
  (benchmarks/gpu_static.py), which AOT-compiles them for sm_80/sm_90 without a GPU: dicts with "name", "fn",
  "signature", "constexprs", "num_warps", "num_stages" and "attrs" (the divisibility-by-16 facts a real launch
  specializes on; without them large tiles compile to a different, spilling variant).

Under TRITON_INTERPRET=1 the same launch wrappers run on CPU tensors: that is how tests check them here.
"""
import functools
import importlib
import pkgutil

import torch

from .._backend import triton_available


def families():
    """The Triton op-family modules (every module in this package not starting with '_')."""
    if not triton_available():
        return []
    return [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
            if not m.name.startswith("_")]


@functools.cache
def kernels():
    """{op name: Triton launch wrapper} over every family."""
    return {name: fn for module in families() for name, fn in module.KERNELS.items()}


def register():
    for name, fn in kernels().items():
        torch.library.register_kernel(f"flashgen::{name}", "cuda", fn)
