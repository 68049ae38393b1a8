"""A GGUF decoder whose linears mix the GGML block types of the files people download (Q4_K_M mixes Q4_K with a
Q6_K attn_v / ffn_down; Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS elsewhere), written here from random blocks (any codes and
sub-block scales, float16 super-block scales set so the weights have a sane size).

Loaded natively, every weight stays in its blocks (a fused projection of mixed types as a StackedLinear), the
dequantized values are the file's, and the model generates the same greedy tokens, with logits within the
bound of one moved activation rounding, as the same file loaded as float (quant="none") whose linears round
their inputs as the CPU kernels do, through the C++ step and the Python layers.
"""
import numpy as np
import pytest
import torch
from test_ggml_quant import HALF_FIELDS, rounded_activations
from test_gguf import add_decoder_hparams, add_tokenizer
from tiny_models import make_model, save_tokenizer

from flashgen.engine.gguf import CheckpointError, GGUFFile
from flashgen.engine.loader import load_model
from flashgen.kernels import ggml
from flashgen.kernels.qlinear import QuantizedLinear, StackedLinear

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
# per layer: (q, k, v, output, gate/up, down)
LAYER_TYPES = [(Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q6_K), (Q.Q3_K, Q.Q3_K, Q.Q3_K, Q.Q5_0, Q.Q5_1, Q.Q5_K),
               (Q.Q2_K, Q.Q2_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ4_XS, Q.Q2_K)]


def blocks_of(qtype, rows, cols, rng, rms):
    """Random blocks for a (rows, cols) weight whose values have root mean square `rms`."""
    t = ggml.BLOCK_TYPES[qtype.name]
    raw = rng.integers(0, 256, (rows * cols // t.block, t.block_bytes), dtype=np.uint8)
    one = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    for at in HALF_FIELDS[qtype.name]:
        raw[:, at:at + 2] = one
    unit = t.dequantize(torch.from_numpy(raw)).pow(2).mean().sqrt().item()
    scale = np.float16(rms / unit).tobytes()
    for at in HALF_FIELDS[qtype.name]:
        raw[:, at:at + 2] = np.frombuffer(scale, np.uint8)
    return raw.reshape(rows, -1)


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquants")
    save_tokenizer(str(root))
    cfg = make_model("llama").config
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    cfg.num_hidden_layers = len(LAYER_TYPES)
    cfg.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
    path = str(root / "kquants.gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    add_decoder_hparams(w, cfg)
    w.add_vocab_size(cfg.vocab_size)
    add_tokenizer(w, str(root), cfg.vocab_size)
    types = {}

    def add(name, qtype, rows, cols, rms=0.02):  # a small gain per layer: random layers must not blow up
        types[name] = qtype.name
        if qtype == Q.F32:
            w.add_tensor(name, rng.uniform(0.5, 1.5, rows).astype(np.float32))
        else:
            w.add_tensor(name, blocks_of(qtype, rows, cols, rng, rms), raw_dtype=qtype)

    h, ff, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    add("token_embd.weight", Q.Q6_K, cfg.vocab_size, h)
    add("output_norm.weight", Q.F32, h, 1)
    add("output.weight", Q.Q6_K, cfg.vocab_size, h, rms=0.2)  # logits far apart: no near ties
    for i, (tq, tk, tv, to, tgu, td) in enumerate(LAYER_TYPES):
        add(f"blk.{i}.attn_norm.weight", Q.F32, h, 1)
        add(f"blk.{i}.ffn_norm.weight", Q.F32, h, 1)
        add(f"blk.{i}.attn_q.weight", tq, h, h)
        add(f"blk.{i}.attn_k.weight", tk, kv, h)
        add(f"blk.{i}.attn_v.weight", tv, kv, h)
        add(f"blk.{i}.attn_output.weight", to, h, h)
        add(f"blk.{i}.ffn_gate.weight", tgu, ff, h)
        add(f"blk.{i}.ffn_up.weight", tgu, ff, h)
        add(f"blk.{i}.ffn_down.weight", td, h, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, types


def test_weights_stay_in_their_blocks(kquant_file):
    path, types = kquant_file
    model = load_model(path, max_seq_len=32).model
    f = GGUFFile(path)
    layer = model.layers[0]
    qkv = layer.attn.wqkv

    def addr(name):
        return f._tensor(name).data.ctypes.data
    # fused projections merge their runs of one type and stack the runs (no float); gate | up keeps the file's
    # blocks as its parts (no copy)
    assert isinstance(qkv, StackedLinear), "Q4_K q, k with a Q6_K v: stacked, not dequantized"
    assert [(m.weight.format.name, m.out_features) for m in qkv.parts] == [
        ("Q4_K", model.config.q_size + model.config.kv_size), ("Q6_K", model.config.kv_size)]
    for i, name in ((0, "Q4_K"), (1, "Q5_1")):
        w_in = model.layers[i].mlp.w_in
        assert isinstance(w_in, QuantizedLinear) and w_in.weight.format.name == name
        gate, up = w_in.weight.qweight_parts  # views: as far apart in memory as in the file
        assert up.data_ptr() - gate.data_ptr() == addr(f"blk.{i}.ffn_up.weight") - addr(f"blk.{i}.ffn_gate.weight")

    # zero-copy: the two tensors lie as far apart in memory as in the file
    v, down = qkv.parts[1].weight.qweight, layer.mlp.w_out.weight.qweight
    assert down.data_ptr() - v.data_ptr() == addr("blk.0.ffn_down.weight") - addr("blk.0.attn_v.weight")
    assert model.output.weight.format.name == "Q6_K"
    down = layer.mlp.w_out.weight
    want = torch.from_numpy(gguf.quants.dequantize(f._tensor("blk.0.ffn_down.weight").data, Q.Q6_K))
    assert torch.equal(down.dequantize(torch.float32), want)


def activation_blocks(native):
    """Per linear of a natively loaded model, its parts' (out_features, activation block): the CPU kernels round a
    GGML type's inputs per super-block (32 or 256), int4 / int8 ones per 32."""
    blocks = {}
    for name, module in native.named_modules():
        if isinstance(module, (QuantizedLinear, StackedLinear)):
            parts = module.parts if isinstance(module, StackedLinear) else [module]
            types = [ggml.BLOCK_TYPES.get(p.weight.format.name) for p in parts]
            blocks[name] = [(p.out_features, t.block if t else 32) for p, t in zip(parts, types)]
    return blocks


def round_linear_inputs(model, blocks):
    """The float model's linears round their inputs as the CPU kernels do, part by part of a fused projection, so
    it computes what the native kernels compute, up to float32 accumulation order."""
    def forward(x, m, parts):
        flat = x.reshape(-1, x.shape[-1])
        rows = torch.split(torch.arange(m.out_features), [n for n, _ in parts])
        ys = [torch.nn.functional.linear(rounded_activations(flat, block), m.weight[r], None if m.bias is None
                                         else m.bias[r]) for r, (_, block) in zip(rows, parts)]
        return torch.cat(ys, -1).reshape(*x.shape[:-1], -1)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = blocks.get(name, [(module.out_features, 32)])
            module.forward = lambda x, m=module, p=parts: forward(x, m, p)
    return model


@pytest.mark.parametrize("cpp", [True, False])
def test_greedy_equals_the_dequantized_model(kquant_file, cpp):
    path, _ = kquant_file
    native = load_model(path, max_seq_len=48).model
    floats = round_linear_inputs(load_model(path, max_seq_len=48, quant="none").model, activation_blocks(native))
    native.cpp_step, native._cpp_step = cpp, None
    floats.cpp_step, floats._cpp_step = False, None
    prompt = torch.tensor([[5, 17, 99, 3, 42, 8, 250, 11, 7]])

    def greedy(m, steps=8):
        m.reset(1)
        logits = [m.prefill(prompt, torch.tensor([prompt.shape[1]]))]
        tokens = []
        for _ in range(steps):
            tokens.append(logits[-1].argmax(-1))
            logits.append(m.decode(tokens[-1]))
        return torch.stack(tokens).flatten().tolist(), torch.cat(logits)

    got, got_logits = greedy(native)
    want, want_logits = greedy(floats)
    if cpp:
        assert native._cpp_step, "the C++ step was not used"
    assert got == want
    # float32 sums in another order can move one activation rounding (then one code of 255 steps), hence the bound
    torch.testing.assert_close(got_logits, want_logits, atol=3e-2 * want_logits.abs().max().item(), rtol=0)


def test_truncated_kquant_tensor_is_named(kquant_file, tmp_path):
    path, _ = kquant_file
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="blk.2.ffn_down.weight.*truncated"):
        load_model(str(cut), max_seq_len=32)
