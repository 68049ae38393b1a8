"""float16 / bfloat16 weights kept 16-bit under float32 activations (format "float16" / "bfloat16",
flashgen::half_linear): exact weights, float32 products, against the float64 product; a bfloat16 checkpoint
loads without a float32 copy and computes what its float32 copy computes."""
import pytest
import torch

from flashgen.engine.loader import load_model
from flashgen.kernels.qlinear import QuantizedEmbedding, QuantizedLinear, StackedLinear
from flashgen.kernels.quant import QuantizedWeight
from tiny_models import make_model, save_tokenizer


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_linear_matches_float64(dtype, isa, monkeypatch):
    """Float32 products of the exact weights, summed in float32 (k / lanes partial sums, then the lanes), and each
    row's result the same bits whatever rows come with it (batch invariance)."""
    monkeypatch.setenv("FLASHGEN_QUANT_ISA", isa)  # avx512: the CPU's best (AVX2 without AVX-512)
    for n, k in ((77, 203), (5, 8), (130, 1025)):
        w = torch.randn(n, k).to(dtype)
        qw = QuantizedWeight(str(dtype).removeprefix("torch."), w)
        bias = torch.randn(n)
        lin = QuantizedLinear(qw, bias)
        x = torch.randn(97, k)
        full = lin(x)
        for m in (1, 5, 70, 97):  # 70, 97: past one row chunk (64)
            y = lin(x[:m])
            want = x[:m].double() @ w.double().T + bias.double()
            scale = x[:m].double().abs() @ w.double().abs().T + 1
            assert ((y.double() - want).abs() / scale).max() < k * 2**-24, (n, k, m)
            assert torch.equal(y, full[:m]), (n, k, m)
        assert torch.equal(lin(x[40:41]), full[40:41])
    assert torch.equal(qw.dequantize(torch.float32), w.float())


def test_half_linear_gradient_opcheck_and_errors():
    w = torch.randn(12, 40).to(torch.bfloat16)
    x = torch.randn(3, 40, requires_grad=True)
    dy = torch.randn(3, 12)
    torch.ops.flashgen.half_linear(x, w, None).backward(dy)
    assert torch.allclose(x.grad, dy @ w.float(), atol=1e-5)
    torch.library.opcheck(torch.ops.flashgen.half_linear.default, (torch.randn(2, 40), w, torch.randn(12)))
    with pytest.raises(RuntimeError, match="half_linear: weight must be a contiguous float16 or bfloat16"):
        torch.ops.flashgen.half_linear(torch.randn(2, 40), w.float(), None)
    with pytest.raises(RuntimeError, match=r"of shape \(12, 41\)"):
        torch.ops.flashgen.half_linear(torch.randn(2, 41), w, None)
    with pytest.raises(TypeError, match="qweight must be torch.bfloat16"):
        QuantizedWeight("bfloat16", w.float())


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    make_model("qwen2", seed=3).to(torch.bfloat16).save_pretrained(root)
    save_tokenizer(str(root))
    return str(root)


@pytest.mark.parametrize("cpp", [True, False])
def test_bfloat16_checkpoint_stays_16_bit(bf16_folder, cpp):
    kept = load_model(bf16_folder, max_seq_len=32).model
    widened = load_model(bf16_folder, max_seq_len=32, quant="none").model
    qkv = kept.layers[0].attn.wqkv
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.format.name == "bfloat16" and qkv.bias is not None
    assert isinstance(kept.tok_embeddings, QuantizedEmbedding)
    assert not any(isinstance(m, StackedLinear) for m in kept.modules())
    assert widened.layers[0].attn.wqkv.weight.dtype == torch.float32
    prompt = torch.tensor([[4, 9, 33, 7, 21]])
    logits = []
    for m in (kept, widened):
        m.cpp_step, m._cpp_step = cpp, None
        m.reset(1)
        out = [m.prefill(prompt, torch.tensor([5]))]
        out += [m.decode(out[-1].argmax(-1)) for _ in range(3)]
        logits.append(torch.cat(out))
    if cpp:
        assert kept._cpp_step, "the C++ step was not used"
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4 * logits[1].abs().max().item(), rtol=0)
