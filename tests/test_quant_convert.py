"""Lossless converters: GGUF blocks (Q8_0 to int8, and every type kept in its blocks) against the gguf package's
own dequantization, and
AWQ / GPTQ tensors against the reference unpacking written here (packing as AutoAWQ / AutoGPTQ store it)."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

import flashgen.kernels as K
from flashgen.kernels.quant import QuantizedWeight, from_awq, from_gguf, from_gptq, q8_0_to_int8


def test_gguf_q8_0_bit_exact(monkeypatch):
    n, k = 7, 160
    w = (np.random.randn(n, k) * np.random.rand(n, 1) * 3).astype(np.float32)
    raw = gguf_quants.quantize(w, GGMLQuantizationType.Q8_0)
    expect = torch.from_numpy(gguf_quants.dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float32))
    blocks = from_gguf(raw, "Q8_0", (n, k))
    # the file's blocks, not a copy: a loaded model holds only the kernels' layout
    assert blocks.format.name == "Q8_0" and blocks.qweight.data_ptr() == raw.ctypes.data
    assert torch.equal(blocks.dequantize(torch.float32), expect)
    qw = q8_0_to_int8(blocks)
    assert qw.format.name == "int8" and qw.group_size == 32
    # the block scales stay float16, as stored
    assert qw.scales.dtype == qw.packed()[1].dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(blocks.packed(), qw.packed()))
    assert torch.equal(qw.dequantize(torch.float32), expect)
    assert torch.equal(from_gguf(raw.tobytes(), "Q8_0", (n, k)).dequantize(torch.float32), expect)
    assert torch.equal(torch.ops.flashgen.int8_dequantize(*qw.packed(), n, k, torch.float32), expect)
    # the CPU linears give what float32 scales of the same values give, on both ISA paths
    full = QuantizedWeight(qw.format, qw.qweight, qw.scales.float(), group_size=32)
    x = torch.randn(5, k)
    for isa in ("vnni", "avx2"):
        monkeypatch.setenv("FLASHGEN_QUANT_ISA", isa)
        for linear in (K.int8_linear, K.int8_linear_dynamic):
            assert torch.equal(linear(x, qw), linear(x, full)), (isa, linear.__name__)
        assert torch.equal(K.ggml_linear(x, blocks), K.int8_linear(x, qw)), isa


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q5_0"])
def test_file_blocks_stack_without_a_copy(name):
    """QuantizedWeight.cat of file blocks (a fused gate | up) keeps the parts as they are, views of the file, and
    concatenates them only when read: its values, layout and products are those of the concatenated blocks."""
    k, rows = 64, (16, 5, 33)
    qtype = GGMLQuantizationType[name]
    raws = [gguf_quants.quantize(np.random.randn(n, k).astype(np.float32), qtype) for n in rows]
    parts = [from_gguf(r, name, (n, k)) for r, n in zip(raws, rows)]
    stacked = QuantizedWeight.cat(parts)
    assert stacked.shape == (sum(rows), k)
    assert [t.data_ptr() for t in stacked.qweight_parts] == [r.ctypes.data for r in raws]
    whole = from_gguf(np.concatenate(raws), name, (sum(rows), k))
    assert torch.equal(stacked.qweight, whole.qweight)
    assert torch.equal(stacked.dequantize(torch.float32), whole.dequantize(torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(stacked.packed(), whole.packed()))
    x = torch.randn(3, k)
    assert torch.equal(K.ggml_linear(x, stacked), K.ggml_linear(x, whole))
    # a module over it keeps the parts as its buffers, through a device move and back
    module = K.QuantizedLinear(stacked)
    assert sorted(name for name, _ in module.named_buffers()) == ["qweight_0", "qweight_1", "qweight_2"]
    module.to("cpu").float()
    assert module.weight.qweight_parts[1].data_ptr() == raws[1].ctypes.data
    assert torch.equal(module(x), K.ggml_linear(x, whole))
    with pytest.raises(ValueError, match="one length"):
        QuantizedWeight(name, [parts[0].qweight, parts[1].qweight[:, :-1]], group_size=parts[0].group_size)


def test_gguf_bad_input():
    raw = gguf_quants.quantize(np.random.randn(2, 64).astype(np.float32), GGMLQuantizationType.Q4_0)
    with pytest.raises(ValueError, match="needs 108 bytes, got 72"):
        from_gguf(raw, "Q4_0", (3, 64))
    with pytest.raises(ValueError, match="ggml_type"):
        from_gguf(raw, "IQ2_XS", (2, 64))
    with pytest.raises(ValueError, match="multiple of the block size"):
        from_gguf(raw, "Q4_0", (2, 48))


# ---------------------------------------------------------------- AWQ / GPTQ
def pack_words(codes):
    """(..., 8c) codes -> int32 (..., c): nibble i of word j holds codes[..., 8j + i]."""
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    words = sum(c[..., i] << (4 * i) for i in range(8))
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32


def unpack_words(words):
    shifts = torch.arange(0, 32, 4)
    return ((words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(*words.shape[:-1], -1)


AWQ_PACK = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ packs column 8c + AWQ_PACK[i] into nibble i
AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # and unpacks with this permutation


def random_zero_point(k, n, g):
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // g, n))
    s = (torch.rand(k // g, n) * 0.02 + 1e-3).half()
    return q, z, s


def reference_dequant(q, z, s, g):
    """w (N, K) = ((q - z) * s)^T, exactly (float64) and as the fp16 kernels compute it."""
    z_full, s_full = z.repeat_interleave(g, 0), s.repeat_interleave(g, 0)
    exact = ((q - z_full).double() * s_full.double()).t()
    fp16 = ((q - z_full).half() * s_full).t()
    return exact, fp16


@pytest.mark.parametrize("g", [32, 64, 128])
def test_awq_bit_exact(g):
    k, n = 2 * g, 40
    q, z, s = random_zero_point(k, n, g)
    qweight = pack_words(q[:, torch.tensor(AWQ_PACK).repeat(n // 8) + torch.arange(n // 8).repeat_interleave(8) * 8])
    qzeros = pack_words(z[:, torch.tensor(AWQ_PACK).repeat(n // 8) + torch.arange(n // 8).repeat_interleave(8) * 8])
    # the reference unpacking (AutoAWQ's): nibbles in order, then the reverse permutation per 8 columns
    order = (torch.arange(n).view(-1, 8)[:, AWQ_REVERSE]).reshape(-1)
    q_ref, z_ref = unpack_words(qweight)[:, order], unpack_words(qzeros)[:, order]
    assert torch.equal(q_ref, q) and torch.equal(z_ref, z)
    exact, fp16 = reference_dequant(q_ref, z_ref, s, g)
    qw = from_awq(qweight, qzeros, s)
    assert qw.shape == (n, k) and qw.group_size == g
    assert qw.scales.dtype == qw.offsets.dtype == torch.float32  # -z s is no float16 value in general
    assert torch.equal(qw.dequantize(torch.float64), exact)
    assert torch.equal(qw.dequantize(torch.float16), fp16)


@pytest.mark.parametrize("zero_plus_one", [True, False])
def test_gptq_bit_exact(zero_plus_one):
    g, k, n = 64, 256, 24
    q, z, s = random_zero_point(k, n, g)
    stored_z = (z - 1).clamp(min=0) if zero_plus_one else z
    z = stored_z + 1 if zero_plus_one else z
    qweight = pack_words(q.t()).t().contiguous()  # (K//8, N): sequential nibbles along K
    qzeros = pack_words(stored_z)  # (K//g, N//8): sequential along N
    # reference unpacking (AutoGPTQ's): shift-and-mask, +1 on the zeros of "gptq" (v1) checkpoints
    q_ref = unpack_words(qweight.t()).t()
    z_ref = unpack_words(qzeros) + (1 if zero_plus_one else 0)
    assert torch.equal(q_ref, q) and torch.equal(z_ref, z)
    exact, fp16 = reference_dequant(q_ref, z_ref, s, g)
    g_idx = (torch.arange(k) // g).to(torch.int32)
    qw = from_gptq(qweight, qzeros, s, g_idx, zero_plus_one=zero_plus_one)
    assert torch.equal(qw.dequantize(torch.float64), exact)
    assert torch.equal(qw.dequantize(torch.float16), fp16)
    # through the CPU layout too
    assert torch.equal(torch.ops.flashgen.int4_dequantize(*qw.packed(), g, n, k, torch.float64), exact)


def test_gptq_refuses_act_order_and_bad_groups():
    g, k, n = 32, 128, 8
    q, z, s = random_zero_point(k, n, g)
    qweight, qzeros = pack_words(q.t()).t().contiguous(), pack_words(z)
    g_idx = (torch.arange(k) // g).to(torch.int32)[torch.randperm(k)]
    with pytest.raises(ValueError, match="act-order"):
        from_gptq(qweight, qzeros, s, g_idx)
    with pytest.raises(ValueError, match="group size 16"):
        from_gptq(qweight, pack_words(torch.randint(0, 16, (k // 16, n))), torch.rand(k // 16, n).half())
    with pytest.raises(TypeError, match="int32"):
        from_awq(qweight.to(torch.int64), qzeros, s)
