import torch

import flashgen
from flashgen.kernels import _backend


def test_extension_reports_cpu_features():
    feats = flashgen.kernels._backend.C.cpu_features()
    assert set(feats) == {"avx2", "avx512", "avx512_vnni", "avx512_bf16"}
    assert feats["avx2"], "flashgen is built for x86-64-v3 (AVX2) or newer"


def test_every_op_is_declared_with_a_schema():
    for name in ["rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"]:
        op = getattr(torch.ops.flashgen, name)
        assert op.default._schema.name == f"flashgen::{name}"
    assert _backend.has_kernel("rms_norm_fwd", "CompositeExplicitAutograd")
