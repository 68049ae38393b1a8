"""GGUF files written here with gguf.GGUFWriter from a tiny random Llama (Llama 3 rope scaling as llama.cpp
stores it: `rope_freqs.weight`), its Q and K rows permuted as llama.cpp's converter does.

Layer 0 is Q4_0, layer 1 Q4_1, the embedding Q8_0, the output head F16, the norms F32 (blocks made by
gguf.quants.quantize). Loading must reproduce gguf.quants.dequantize exactly, give transformers' logits for the
dequantized weights, and the float model's logits within quantization error; broken files give clear errors.
"""
import dataclasses
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import make_model, save_tokenizer

from flashgen.engine.config import ModelConfig
from flashgen.engine.gguf import CheckpointError
from flashgen.engine.loader import load_model
from flashgen.engine.model import rope_inv_freq
from flashgen.engine.tokenizer import load_hf_tokenizer
from flashgen.kernels.qlinear import QuantizedLinear
from flashgen.kernels.quant import q8_0_to_int8

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
LAYER_TYPES = (Q.Q4_0, Q.Q4_1)
TEXTS = ["Hello world!", "  two  spaces and\ttabs\n\nnewlines", "café naïve 東京 😀", "<|im_start|>user\nhi<|im_end|>"]


def permute(w, heads):
    """llama.cpp's row order for its interleaved rope (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(w, tokenizer_dir, vocab_size):
    """The tiny byte-level BPE of tiny_models as GGUF metadata (tokens, types, merges, special ids, template)."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [None] * vocab_size
    for text, i in {**vocab, **special}.items():
        tokens[i] = text
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special or t.startswith("[PAD") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(special["<|im_start|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def add_decoder_hparams(w, cfg):
    """The hyperparameters of a rope decoder (Llama-like transformers config) as GGUF metadata."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def write_gguf(model, tokenizer_dir, path):
    """Returns {hf parameter name: the float32 weight the GGUF file stands for (dequantized, HF row order)}."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    add_decoder_hparams(w, cfg)
    w.add_vocab_size(cfg.vocab_size)
    add_tokenizer(w, tokenizer_dir, cfg.vocab_size)
    expected = {}

    def add(name, hf_name, qtype, heads=None):
        value = sd[hf_name] if heads is None else permute(sd[hf_name], heads)
        if qtype in (Q.F32, Q.F16):
            data = value.astype(np.float32 if qtype == Q.F32 else np.float16)
            w.add_tensor(name, data)
            stored = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(value, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            stored = gguf.quants.dequantize(data, qtype)
        expected[hf_name] = torch.from_numpy(stored if heads is None else unpermute(stored, heads))

    add("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", Q.F32)
    add("output.weight", "lm_head.weight", Q.F16)
    inv_freq = rope_inv_freq_of(cfg)
    w.add_tensor("rope_freqs.weight", (inv_freq[0] / inv_freq[1]).numpy().astype(np.float32))
    for i, qtype in enumerate(LAYER_TYPES):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", Q.F32)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", Q.F32)
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", qtype, cfg.num_attention_heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", qtype, cfg.num_key_value_heads)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", qtype)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", qtype)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            add(f"blk.{i}.ffn_{ours}.weight", p + f"mlp.{theirs}.weight", qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def rope_inv_freq_of(hf_config):
    """(plain inv_freq, Llama-3-scaled inv_freq) of a transformers Llama config, through our ModelConfig."""
    scaled = ModelConfig.from_hf(hf_config.to_dict())
    return rope_inv_freq(dataclasses.replace(scaled, rope_scaling=None)), rope_inv_freq(scaled)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = make_model("llama", seed=1)
    save_tokenizer(str(root))
    path = str(root / "tiny.gguf")
    expected = write_gguf(model, str(root), path)
    dequantized = make_model("llama", seed=1)
    dequantized.load_state_dict({**dequantized.state_dict(), **expected})
    return {"path": path, "root": str(root), "float": model, "dequantized": dequantized, "expected": expected}


def test_native_weights_are_exact(files):
    m = load_model(files["path"], max_seq_len=32).model
    exp = files["expected"]
    assert m.config.rope_scaling is None and m.config.tie_word_embeddings is False
    for i, qtype in enumerate(LAYER_TYPES):
        p = f"model.layers.{i}."
        wqkv = m.layers[i].attn.wqkv
        assert isinstance(wqkv, QuantizedLinear) and wqkv.weight.format.name == qtype.name
        qkv = torch.cat([exp[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(wqkv.weight.dequantize(torch.float32), qkv)
        gate_up = torch.cat([exp[p + "mlp.gate_proj.weight"], exp[p + "mlp.up_proj.weight"]])
        assert torch.equal(m.layers[i].mlp.w_in.weight.dequantize(torch.float32), gate_up)
        assert torch.equal(m.layers[i].mlp.w_out.weight.dequantize(torch.float32), exp[p + "mlp.down_proj.weight"])
        assert torch.equal(m.layers[i].attn_norm.weight, exp[p + "input_layernorm.weight"])
    assert torch.equal(m.tok_embeddings.weight.dequantize(torch.float32), exp["model.embed_tokens.weight"])
    assert m.output.weight.format.name == "float16"  # kept 16-bit: exactly the file's values
    assert torch.equal(m.output.weight.dequantize(torch.float32), exp["lm_head.weight"])


@torch.inference_mode()
def test_logits_match_transformers_on_dequantized_weights(files):
    ids = torch.randint(3, 300, (2, 24))
    expected = files["dequantized"](ids).logits
    dense = load_model(files["path"], quant="none", max_seq_len=32).model
    assert not any(isinstance(mod, QuantizedLinear) for mod in dense.modules())
    err = (dense(ids) - expected).abs().max() / expected.abs().max()
    assert err < 1e-4


@torch.inference_mode()
def test_native_linears_within_the_activation_rounding_bound(files):
    """Same weights as the dequantized model; the CPU int4 / int8 kernels round each activation to int8 per block of
    32 (d = max|x_b| / 127), so each output may move by at most sum_k |W[n, k]| d_b(k) / 2
    (csrc/cpu/quant_linear.cpp), checked on the activations every linear gets in a forward pass."""
    native = load_model(files["path"], max_seq_len=32).model
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out)))
             for m in native.modules() if isinstance(m, QuantizedLinear) and m.weight.format.name in ("Q4_0", "Q4_1")]
    native(torch.randint(3, 300, (2, 24)))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4 * native.config.num_layers
    for module, x, y in seen:
        x, w = x.double().reshape(-1, module.in_features), module.weight.dequantize(torch.float64)
        want = x @ w.T
        d = x.abs().unflatten(1, (-1, 32)).amax(-1) / 127  # (rows, blocks)
        bound = (d.repeat_interleave(32, 1) / 2) @ w.abs().T
        slack = 1e-5 * (x.abs() @ w.abs().T) + 1e-6  # float32 sums
        err = (y.double().reshape(want.shape) - want).abs()
        assert (err <= bound + slack).all(), (module.weight.format.name, (err - bound).max().item())


def _q4_grid(weight):
    """A Q4_0 / Q4_1 weight's grid w = s q + m (codes 0..15) per block of 32: (s, m) from its blocks' float16 fields."""
    n, k = weight.shape
    blocks = weight.qweight.reshape(n, k // 32, -1)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, -1).double()
    m = -8 * d if weight.format.name == "Q4_0" else blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, -1)
    return SimpleNamespace(scales=d, offsets=m.double(), group_size=32)


def _grid_bound(w, weight, qmin, qmax):
    """The largest |w - w'| a weight `w` may be off by in `weight`'s codes: half a step inside its group's grid
    s * q + m (q in [qmin, qmax]), plus the distance to the grid's ends outside it; plus llama.cpp's float16 rounding
    of the scale and offset it quantized with (a relative 2^-11 of |s q| and |m|)."""
    g = weight.group_size or w.shape[1]
    s = weight.scales.double().repeat_interleave(g, 1)
    m = torch.zeros_like(s) if weight.offsets is None else weight.offsets.double().repeat_interleave(g, 1)
    lo, hi = torch.minimum(m + s * qmin, m + s * qmax), torch.maximum(m + s * qmin, m + s * qmax)
    outside = (lo - w).clamp(min=0) + (w - hi).clamp(min=0)
    return s.abs() / 2 + outside + (max(-qmin, qmax) * s.abs() + m.abs()) * 2**-11


def test_weights_within_what_the_format_allows(files):
    """The loaded weights against the float model they were quantized from, element by element: Q4_0 / Q4_1 (int4
    codes 0..15), Q8_0 (int8 codes -127..127) within their grid's half step, F16 within its rounding."""
    from flashgen.engine.gguf import GGUFFile

    m = load_model(files["path"], max_seq_len=32).model
    float_sd = files["float"].state_dict()
    checked = 0
    for i in range(m.config.num_layers):
        p = f"model.layers.{i}."
        originals = {"attn.wqkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                     "attn.wo": [p + "self_attn.o_proj.weight"],
                     "mlp.w_in": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                     "mlp.w_out": [p + "mlp.down_proj.weight"]}
        for ours, theirs in originals.items():
            weight = m.get_submodule(f"layers.{i}.{ours}").weight
            assert weight.format.name == LAYER_TYPES[i].name
            w = torch.cat([float_sd[t] for t in theirs]).double()
            bound = _grid_bound(w, _q4_grid(weight), 0, 15)
            assert ((weight.dequantize(torch.float64) - w).abs() <= bound).all(), (i, ours)
            checked += 1
    embedding = q8_0_to_int8(GGUFFile(files["path"]).get("token_embd.weight"))  # Q8_0, kept so by the model
    assert embedding.format.name == "int8"
    w = float_sd["model.embed_tokens.weight"].double()
    assert ((embedding.dequantize(torch.float64) - w).abs() <= _grid_bound(w, embedding, -127, 127)).all()
    head, w = m.output.weight.dequantize(torch.float64), float_sd["lm_head.weight"].double()
    assert ((head - w).abs() <= w.abs() * 2**-11 + 2**-25).all()  # F16: round to nearest (2^-25: subnormals)
    assert checked == 4 * m.config.num_layers


def test_tokenizer_from_metadata_matches_tokenizer_json(files):
    ours = load_model(files["path"], max_seq_len=8).tokenizer
    hf = load_hf_tokenizer(files["root"])
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_ids >= {hf.eos_token_id}
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_magic(tmp_path, files):
    bad = tmp_path / "bad.gguf"
    data = open(files["path"], "rb").read()
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a GGUF file"):
        load_model(str(bad))


def test_tensor_shorter_than_header(tmp_path, files):
    cut = tmp_path / "cut.gguf"
    data = open(files["path"], "rb").read()
    cut.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor '.*' .* needs \d+ bytes .* only \d+ bytes"):
        load_model(str(cut))


@pytest.mark.parametrize("damage", ["cut_in_metadata", "huge_count", "version"])
def test_malformed_header(tmp_path, files, damage):
    import struct

    data = bytearray(open(files["path"], "rb").read())
    if damage == "cut_in_metadata":
        data = data[:200]
    elif damage == "huge_count":  # the metadata count (after magic, version, tensor count)
        data[16:24] = struct.pack("<Q", 2**60)
    else:
        data[4:8] = struct.pack("<I", 7)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.gguf: malformed GGUF header \(.*(past the end|version 7|unpack)"):
        load_model(str(bad))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model(str(tmp_path / "nothing.gguf"))


# HF name patterns -> llama.cpp names, for float GGUF files of the other architectures (F32: exact).
GGUF_NAMES = [
    (r"^(model|transformer)\.(embed_tokens|wte)\.", "token_embd."), (r"^transformer\.wpe\.", "position_embd."),
    (r"^(model\.norm|transformer\.ln_f)\.", "output_norm."), (r"^lm_head\.", "output."),
    (r"^(model\.layers|transformer\.h)\.(\d+)\.", r"blk.\2."), (r"(input_layernorm|ln_1)\.", "attn_norm."),
    (r"(post_attention_layernorm|ln_2)\.", "ffn_norm."), (r"self_attn\.([qkv])_proj\.", r"attn_\1."),
    (r"(self_attn\.qkv_proj|attn\.c_attn)\.", "attn_qkv."), (r"(self_attn\.o_proj|attn\.c_proj)\.", "attn_output."),
    (r"self_attn\.([qk])_norm\.", r"attn_\1_norm."), (r"mlp\.gate_proj\.", "ffn_gate."),
    (r"mlp\.(up_proj|gate_up_proj|c_fc)\.", "ffn_up."), (r"mlp\.(down_proj|c_proj)\.", "ffn_down."),
]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def write_float_gguf(arch, model, tokenizer_dir, path):
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    if arch == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        add_decoder_hparams(w, cfg)
    add_tokenizer(w, tokenizer_dir, cfg.vocab_size)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = value.t() if name.endswith(CONV1D) else value  # llama.cpp stores (out, in)
        for pattern, repl in GGUF_NAMES:
            name = re.sub(pattern, repl, name)
        w.add_tensor(name, value.contiguous().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gpt2"])
@torch.inference_mode()
def test_float_gguf_of_other_architectures(arch, tmp_path):
    model = make_model(arch)
    save_tokenizer(str(tmp_path))
    path = str(tmp_path / f"{arch}.gguf")
    write_float_gguf(arch, model, str(tmp_path), path)
    ours = load_model(path, max_seq_len=32).model
    assert ours.config.arch == arch
    ids = torch.randint(3, 300, (2, 17))
    expected = model(ids).logits
    assert (ours(ids) - expected).abs().max() / expected.abs().max() < 1e-4


def test_k_quants_and_bf16_are_dequantized(tmp_path):
    """Not asked to keep them (`native`), Q4_K / Q6_K come back as float32 equal to gguf.quants' dequantizer; BF16
    exactly."""
    from flashgen.engine.gguf import GGUFFile

    rng = np.random.default_rng(0)
    rows, cols = 3, 512
    path = str(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(path, "llama")
    blocks = {}
    for qtype, scale_fields in ((Q.Q4_K, (0, 2)), (Q.Q6_K, (208,))):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for offset in scale_fields:  # valid fp16 super-block scales (random bytes could be inf / NaN)
            raw[..., offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        blocks[qtype] = raw.reshape(rows, -1)
        w.add_tensor(qtype.name, blocks[qtype], raw_dtype=qtype)
    bf16 = torch.randn(rows, cols).to(torch.bfloat16)
    w.add_tensor("BF16", bf16.view(torch.int16).numpy().view(np.uint8).reshape(rows, -1), raw_dtype=Q.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    for qtype, raw in blocks.items():
        got = f.get(qtype.name)
        assert got.dtype == torch.float32 and got.shape == (rows, cols)
        assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw, qtype)))
        assert torch.isfinite(got).all()
    assert torch.equal(f.get("BF16"), bf16.float())
