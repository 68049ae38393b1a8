"""flashgen.integrations on Hugging Face models: fg_attention and apply_flashgen against unpatched transformers.

Tiny random models of tests/tiny_models.py; float32 comparisons are tight, bfloat16 ones are bounded by the
unpatched model's own bfloat16 error against float32 (the FlashAttention rule).
"""
import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashgen.integrations import apply_flashgen, fg_attention, recompute, register_attention, unapply_flashgen  # noqa: E402,E501
from tiny_models import VOCAB_SIZE, make_model  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gemma():
    config = transformers.GemmaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                      initializer_range=0.1)
    model = transformers.GemmaForCausalLM(config)
    with torch.no_grad():  # Gemma's norms start at weight 0 (scale 1 + 0): make the offset matter
        for m in model.modules():
            if type(m).__name__ == "GemmaRMSNorm":
                m.weight.normal_(0, 0.3)
    return model


def _model(arch, dtype=torch.float32):
    seed = int(torch.randint(0, 2 ** 31, ()))
    model = (_gemma() if arch == "gemma" else make_model(arch, seed=seed)).to(dtype)
    model.config.attention_dropout = 0.0
    return model.train()


def _batch(batch=3, seq=11):
    ids = torch.randint(0, VOCAB_SIZE, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, seq - 4:] = 0  # right padding (training)
    mask[-1, :3] = 0  # left padding (generation)
    return ids, mask


def _loss(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits[mask.bool()]
    target = torch.roll(ids, -1, 1)[mask.bool()]
    return torch.nn.functional.cross_entropy(logits.float(), target), out.logits


@pytest.mark.parametrize("arch", ARCHS + ["gemma"])
def test_forward_and_gradients_match(arch):
    ref = _model(arch)
    fused = apply_flashgen(copy.deepcopy(ref), verify=True)
    assert fused.config._attn_implementation == "fg_attention"
    layer = fused.model.layers[0]
    assert "forward" in vars(layer.input_layernorm)
    assert ("forward" in vars(layer.mlp)) == (arch != "gemma")  # Gemma's MLP gate is GELU, left alone
    assert ("forward" in vars(layer.self_attn)) == (arch not in ("gemma", "phi3"))  # the fused rotary
    ids, mask = _batch()
    loss_ref, logits_ref = _loss(ref, ids, mask)
    loss, logits = _loss(fused, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], logits_ref[valid], rtol=1e-5, atol=1e-5)
    loss_ref.backward()
    loss.backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), fused.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_curves_match(arch):
    ref = _model(arch)
    fused = apply_flashgen(copy.deepcopy(ref), rope=arch != "mistral")  # rope=False: rotate_half kept
    # SGD: AdamW's m / sqrt(v) turns a gradient that cancels to ~1e-9 into a full step of either sign, which
    # compares the optimizer's amplification of rounding, not the kernels.
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in (ref, fused)]
    batches = [_batch(2, 16) for _ in range(3)]  # cycled: a loss that can go down
    curve = []
    for step in range(30):
        ids, mask = batches[step % 3]
        losses = []
        for model, opt in zip((ref, fused), opts):
            opt.zero_grad()
            # transformers' causal-LM loss; the patched model's is the fused linear cross-entropy
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5), f"step {step}"
        curve.append(losses[0])
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert max(curve[-3:]) < min(curve[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS + ["gemma"])
def test_recomputed_activations_give_the_same_gradients(arch, dtype, monkeypatch):
    """recompute_activations: the same loss and gradients bit for bit, with the norms' and gating's outputs and
    the padded attention output saved as recipes (each linear input that is one of them)."""
    registries = []
    recomputing = recompute.recomputing

    @contextlib.contextmanager
    def spy():
        with recomputing() as registry:
            registries.append(registry)
            yield registry

    monkeypatch.setattr(recompute, "recomputing", spy)
    model = _model(arch, dtype)
    rebuilt = apply_flashgen(copy.deepcopy(model), recompute_activations=True)
    kept = apply_flashgen(model, recompute_activations=False)
    ids, mask = _batch()
    grads = []
    for model in (kept, rebuilt):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads.append([loss] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    layers = kept.config.num_hidden_layers
    assert len(registries) == layers
    # per layer: q, k, v (or qkv) and gate, up (or gate_up) projections read norm outputs; down reads the
    # gating (not Gemma's GELU MLP); o_proj the padded attention output
    fused = hasattr(kept.model.layers[0].mlp, "gate_up_proj")
    expected = (2 if fused else 5) + (arch != "gemma") + 1
    assert [r.saved for r in registries] == [expected] * layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_fused_linear_cross_entropy_loss(arch):
    """labels in training: the fused loss (no logits) equals transformers' shifted, ignore_index loss."""
    ref = _model(arch)
    fused = apply_flashgen(copy.deepcopy(ref), attention=False, rms_norm=False, swiglu=False)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    for extra in ({}, {"num_items_in_batch": torch.tensor(7)}):
        want = ref(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        got = fused(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        assert got.logits is None
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        grads_ref = torch.autograd.grad(want.loss, list(ref.parameters()))
        grads = torch.autograd.grad(got.loss, list(fused.parameters()))
        for (name, _), g_ref, g in zip(ref.named_parameters(), grads_ref, grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    fused.eval()  # eval keeps the logits
    assert fused(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_within_eager_error(arch):
    ref32 = _model(arch)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    fused16 = apply_flashgen(copy.deepcopy(ref16))
    ids, mask = _batch()
    valid = mask.bool()
    with torch.no_grad():
        exact = ref32(input_ids=ids, attention_mask=mask).logits[valid]
        eager_err = (ref16(input_ids=ids, attention_mask=mask).logits[valid].float() - exact).abs().max()
        ours = fused16(input_ids=ids, attention_mask=mask).logits[valid]
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() <= 2 * eager_err + 1e-2


def test_padding_never_reaches_valid_tokens():
    model = apply_flashgen(_model("llama")).eval()
    ids, mask = _batch()
    other = torch.where(mask.bool(), ids, torch.randint(0, VOCAB_SIZE, ids.shape))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=other, attention_mask=mask).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    assert not torch.equal(ids, other)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_equals_separate(arch):
    model = apply_flashgen(_model(arch)).eval()
    lengths = [5, 1, 9]
    seqs = [torch.randint(0, VOCAB_SIZE, (1, n)) for n in lengths]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s).logits for s in seqs], 1)
        packed_ids = torch.cat(seqs, 1)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        by_positions = model(input_ids=packed_ids, position_ids=positions).logits
        cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
        by_cu = model(input_ids=packed_ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=9, max_length_k=9).logits
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_cu, by_positions, rtol=0, atol=0)


def test_unapply_restores_the_model():
    ref = _model("qwen3")
    model = copy.deepcopy(ref)
    original = model.config._attn_implementation
    apply_flashgen(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_flashgen(model)
    unapply_flashgen(model)
    assert model.config._attn_implementation == original
    assert not any("forward" in vars(m) for m in model.modules())
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)


def test_from_pretrained_with_the_registered_name(tmp_path):
    register_attention()
    _model("llama").save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fg_attention")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids, mask = _batch()
    with torch.no_grad():
        got, want = (m(input_ids=ids, attention_mask=mask).logits for m in (loaded, ref))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="model types"):
        apply_flashgen(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    model = _model("llama")
    q = torch.randn(1, 4, 3, 16)
    layer = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="dropout"):
        fg_attention(layer, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="output_attentions"):
        fg_attention(layer, q, q, q, None, output_attentions=True)


def test_compile_fullgraph_dense_and_packed():
    layer = _model("llama").model.layers[0].self_attn
    q = torch.randn(1, 4, 13, 16, requires_grad=True)
    k = torch.randn(1, 2, 13, 16, requires_grad=True)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)

    def dense(q, k):
        return fg_attention(layer, q, k, k, None, scaling=0.25)[0]

    def packed(q, k):
        return fg_attention(layer, q, k, k, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                            max_length_q=7, max_length_k=7)[0]

    for fn in (dense, packed):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        expected, got = fn(q, k), compiled(q, k)
        torch.testing.assert_close(got, expected)
        gq, = torch.autograd.grad(got.sum(), q)
        eq, = torch.autograd.grad(expected.sum(), q)
        torch.testing.assert_close(gq, eq)


def test_works_from_the_repository_root():
    """transformers probes for a hub package named `kernels`; from the root it finds our kernels/ folder."""
    code = ("import transformers, torch; from flashgen.integrations import apply_flashgen; "
            "m = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=32, "
            "num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)); apply_flashgen(m, verify=True); "
            "print(m(torch.tensor([[1, 2, 3]])).logits.shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([1, 3, 64])" in out.stdout


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_with_cache_equals_unpatched(arch):
    """Decoding through the KV cache (q_len 1, left padding) with every patch on gives transformers' tokens."""
    ref = _model(arch).eval()
    fused = apply_flashgen(copy.deepcopy(ref))
    ids, mask = _batch(2, 6)
    mask[1, :] = 1
    mask[-1, :3] = 0  # left padding only, as generation wants
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kw)
    got = fused.generate(ids, **kw)
    assert torch.equal(got, want)
