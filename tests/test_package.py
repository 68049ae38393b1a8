import torch

import flashgen
from flashgen.kernels import _backend, ops


def test_extension_reports_cpu_features():
    feats = flashgen.kernels._backend.C.cpu_features()
    assert set(feats) == {"avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_int8"}
    assert feats["avx2"], "flashgen is built for x86-64-v3 (AVX2) or newer"


def test_every_op_is_declared_with_a_schema():
    """Every flashgen op the dispatcher knows is declared in kernels/ops.py (each `_define` returns its name), with
    a schema, the reference as the fallback for devices without a kernel, a fake impl for torch.compile, the C++
    kernel for the CPU, and autograd where the design gives it a backward (every *_fwd op, the quantized
    linears' input gradient, rotary: one op for both directions)."""
    from torch._library.simple_registry import singleton

    declared = {v for v in vars(ops).values() if isinstance(v, str) and v.startswith("flashgen::")}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("flashgen::")}
    assert declared == registered
    for qualname in sorted(declared):
        name = qualname.removeprefix("flashgen::")
        assert getattr(torch.ops.flashgen, name).default._schema.name == qualname
        assert _backend.has_kernel(name, "CompositeExplicitAutograd"), f"{name}: no reference fallback"
        assert singleton.find(qualname).fake_impl.kernel is not None, f"{name}: no fake impl"
        assert _backend.has_kernel(name, "CPU"), f"{name}: no CPU kernel"
        has_backward = name.endswith("_fwd") or "_linear" in name or name == "rotary"
        assert _backend.has_kernel(name, "Autograd") == has_backward, f"{name}: autograd registration"
