"""GGML block types (kernels/ggml.py, csrc/cpu/ggml*.{h,cpp}): reference dequantizers bit for bit against
gguf-py's, the CPU prepack lossless, and ggml_linear against the float64 product of the int8-rounded
activations, for every CPU type, odd out_features, every row-count class and both ISAs."""
import numpy as np
import pytest
import torch

from flashgen.kernels import ggml, ggml_linear, int4_linear
from flashgen.kernels.quant import QuantizedWeight, from_gguf

gguf = pytest.importorskip("gguf")
CPU_TYPES = [t.name for t in ggml.BLOCK_TYPES.values() if t.cpu_kernel]
# Byte offsets of each type's float16 fields (scales d, dmin / m): random bytes there could be inf or NaN.
HALF_FIELDS = {t.name: t.half_fields for t in ggml.BLOCK_TYPES.values()}
# The types whose CPU tiles hold exactly the file's bytes (the K-quants' 6-bit scales widen to bytes: +1.5-3.6%).
EXACT_SIZE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q6_K", "IQ4_NL"}


def random_weight(name, n, k, seed):
    t = ggml.BLOCK_TYPES[name]
    blocks = ggml.random_blocks(name, n * k // t.block, torch.Generator().manual_seed(seed))
    return QuantizedWeight(name, blocks.reshape(n, -1))


@pytest.mark.parametrize("name", sorted(ggml.BLOCK_TYPES))
def test_dequantize_matches_gguf_bit_for_bit(name):
    t = ggml.BLOCK_TYPES[name]
    blocks = ggml.random_blocks(name, 97, torch.Generator().manual_seed(t.type_id))
    want = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[name]).reshape(97, t.block)
    got = t.dequantize(blocks)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", CPU_TYPES)
def test_cpu_prepack_is_lossless(name):
    t = ggml.BLOCK_TYPES[name]
    n, k = 37, 2 * max(t.block, 64)  # a partial tile of 16 rows
    w = random_weight(name, n, k, seed=1)
    packed = w.packed()
    assert len(packed) == 1 and packed[0].dtype == torch.uint8
    streamed = packed[0].numel() / ((n + 15) // 16 * 16)
    assert streamed <= 1.05 * t.row_bytes(k), "the kernels stream at most 5% more than the file per weight row"
    if name in EXACT_SIZE:  # the README's claim: not a byte more than the file
        assert streamed == t.row_bytes(k)
    full = torch.ops.flashgen.ggml_dequantize(packed[0], t.type_id, n, k, torch.float32)
    assert torch.equal(full, w.dequantize(torch.float32))


def rounded_activations(x, block=32):
    """x rounded as the CPU kernels round it: per block (32, or a GGML type's super-block), d = max|x| / 127,
    a = round(x * 127 / max|x|)."""
    m, k = x.shape
    blocks = x.reshape(m, k // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # torch's `127 / t` is 127 * (1 / t), rounded twice: divide as the kernels do
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return ((blocks * inv).round() * (amax / 127)).reshape(m, k)


# The CPU feature each kernel ISA needs (amx: the machine's best; vnni: AVX-512 VNNI without AMX).
ISA_FEATURE = {"avx2": "avx2", "vnni": "avx512_vnni", "amx": "amx_int8"}


def use_isa(isa, monkeypatch):
    """Run the CPU kernels of `isa`, or skip."""
    from flashgen.kernels import _backend

    feature = ISA_FEATURE[isa]
    if not _backend.C.cpu_features()[feature]:
        pytest.skip(f"no {feature} on this machine")
    if isa != "amx":
        monkeypatch.setenv("FLASHGEN_QUANT_ISA", isa)


@pytest.mark.parametrize("isa", ["amx", "vnni", "avx2"])
@pytest.mark.parametrize("name", CPU_TYPES)
def test_linear_matches_float64_product_of_rounded_activations(name, isa, monkeypatch):
    use_isa(isa, monkeypatch)
    t = ggml.BLOCK_TYPES[name]
    n, k = 45, 2 * t.block if t.block == 256 else 96
    w = random_weight(name, n, k, seed=2)
    dense = w.dequantize(torch.float64)
    bias = torch.randn(n)
    for m in (1, 3, 4, 5, 8, 70):  # one row, partial and whole row steps, past one chunk of 64 rows
        x = torch.randn(m, k)
        y = ggml_linear(x, w, bias)
        rounded = rounded_activations(x, t.block).double()  # per super-block, as llama.cpp's Q8_K / Q8_0
        want = rounded @ dense.T + bias.double()
        scale = rounded.abs() @ dense.abs().T + 1e-6
        err = ((y.double() - want).abs() / scale).max().item()
        assert err < 1e-5, f"{name} {isa} m={m}: relative error {err}"
        # and against the exact float product, within the activation rounding bound sum_k |W| d / 2
        d = x.reshape(m, -1, t.block).abs().amax(-1).repeat_interleave(t.block, 1).double() / 127
        bound = (d / 2) @ dense.abs().T * 1.001 + 1e-4
        assert ((y.double() - (x.double() @ dense.T + bias.double())).abs() <= bound).all()


@pytest.mark.parametrize("name", CPU_TYPES)
def test_linear_of_one_hot_rows_reads_every_weight(name):
    """x = I: each output is one weight times the rounded 1, so a misplaced code or scale shows at its place."""
    t = ggml.BLOCK_TYPES[name]
    w = random_weight(name, 19, 2 * t.block, seed=9)
    y = ggml_linear(torch.eye(w.in_features), w)
    assert torch.allclose(y.T.double(), w.dequantize(torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ["amx", "vnni", "avx2"])
@pytest.mark.parametrize("name", CPU_TYPES)
def test_linear_batch_rows_are_independent(name, isa, monkeypatch):
    """A row's result does not depend on the rows computed beside it (batch invariance): on an AMX machine many
    rows take the AMX kernel and one row the VNNI kernel."""
    use_isa(isa, monkeypatch)
    w = random_weight(name, 33, 512, seed=3)
    x = torch.randn(70, 512)
    alone = torch.cat([ggml_linear(x[i:i + 1], w) for i in range(70)])
    assert torch.equal(ggml_linear(x, w), alone)


@pytest.mark.parametrize("name", CPU_TYPES)
def test_linear_is_the_same_bits_on_every_isa(name, monkeypatch):
    """Every kernel computes the same integers and the same float operations on them (ggml_kernels.cpp), so the
    AVX2, VNNI and AMX kernels agree bit for bit, whatever the row count."""
    from flashgen.kernels import _backend

    features = _backend.C.cpu_features()
    isas = [isa for isa, feature in ISA_FEATURE.items() if features[feature]]
    if len(isas) < 2:
        pytest.skip("one kernel ISA on this machine")
    t = ggml.BLOCK_TYPES[name]
    w = random_weight(name, 41, 3 * t.block if t.block == 256 else 160, seed=8)
    x = torch.randn(45, w.in_features) * torch.rand(45, 1) * 10  # rows of different scales
    got = {}
    for isa in isas:
        monkeypatch.setenv("FLASHGEN_QUANT_ISA", "" if isa == "amx" else isa)
        got[isa] = ggml_linear(x, w)
    for isa in isas[1:]:
        assert torch.equal(got[isa], got[isas[0]]), f"{name}: {isa} differs from {isas[0]}"


def test_linear_gradient_and_opcheck():
    w = random_weight("Q6_K", 20, 256, seed=4)
    x = torch.randn(3, 256, requires_grad=True)
    dy = torch.randn(3, 20)
    ggml_linear(x, w).backward(dy)
    assert torch.allclose(x.grad, dy @ w.dequantize(torch.float32), atol=1e-5)
    packed = w.packed()[0]
    torch.library.opcheck(torch.ops.flashgen.ggml_linear.default, (torch.randn(2, 256), packed, 14, 20, None))
    torch.library.opcheck(torch.ops.flashgen.ggml_prepack.default, (w.qweight, 14, 256))


def test_compiled_linear_is_fullgraph():
    w = random_weight("Q5_K", 16, 256, seed=5)
    x = torch.randn(2, 256)
    compiled = torch.compile(lambda a: ggml_linear(a, w), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ggml_linear(x, w))


def test_state_dict_round_trip(tmp_path):
    w = random_weight("Q3_K", 8, 256, seed=6)
    w.save(tmp_path / "w.safetensors")
    back = QuantizedWeight.load(tmp_path / "w.safetensors")
    assert back.format is w.format and torch.equal(back.qweight, w.qweight)


def test_from_gguf_keeps_blocks():
    t = ggml.BLOCK_TYPES["Q6_K"]
    blocks = ggml.random_blocks("Q6_K", 3 * 2, torch.Generator().manual_seed(7))
    w = from_gguf(blocks.numpy().reshape(-1), "Q6_K", (3, 512))
    assert w.format.name == "Q6_K" and w.qweight.shape == (3, 2 * t.block_bytes)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        from_gguf(blocks.numpy().reshape(-1), "Q6_K", (6, 255))
    with pytest.raises(ValueError, match="needs 1260 bytes"):
        from_gguf(blocks.numpy().reshape(-1)[:-1], "Q6_K", (3, 512))


def test_bad_inputs_are_named():
    w = random_weight("Q4_K", 16, 256, seed=8)
    f = torch.ops.flashgen
    with pytest.raises(RuntimeError, match="ggml_linear: packed must have the CPU prepacked shape"):
        f.ggml_linear(torch.randn(1, 256), w.qweight, 12, 16, None)
    with pytest.raises(RuntimeError, match="GGML type 8 has no CPU kernel"):  # Q8_0 runs the int8 kernels
        f.ggml_prepack(w.qweight, 8, 256)
    with pytest.raises(RuntimeError, match="multiple of the block size 256"):
        f.ggml_prepack(w.qweight, 12, 128)
    with pytest.raises(ValueError, match="qweight must have shape"):
        QuantizedWeight("Q4_K", w.qweight[:, :-1])
    with pytest.raises(ValueError, match="scales, offsets and group_size must be None"):
        QuantizedWeight("Q4_K", w.qweight, group_size=32)
    with pytest.raises(ValueError, match="format must be one of"):
        QuantizedWeight("Q9_K", w.qweight)
    with pytest.raises(ValueError, match="expected a int4 QuantizedWeight, got format Q4_K"):
        int4_linear(torch.randn(1, 256), w)
