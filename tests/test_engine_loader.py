"""Loader: sharded safetensors, quantize on load, config parsing, and clear errors for bad checkpoints."""
import json
import os
import shutil

import pytest
import torch
from tiny_models import make_model, save_tokenizer, tiny_models  # noqa: F401  (fixture)

from flashgen.engine.config import ConfigError, ModelConfig
from flashgen.engine.gguf import CheckpointError
from flashgen.engine.loader import load_model
from flashgen.kernels.qlinear import QuantizedLinear


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def mean_rel_err(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


def copy_of(tiny_models, arch, tmp_path):  # noqa: F811
    dst = tmp_path / arch
    shutil.copytree(tiny_models[arch], dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@torch.inference_mode()
def test_sharded_equals_single_file(tiny_models, tmp_path):  # noqa: F811
    sharded = tmp_path / "sharded"
    make_model("qwen2").save_pretrained(sharded, max_shard_size="40KB")
    save_tokenizer(str(sharded))
    assert (sharded / "model.safetensors.index.json").exists()
    ids = torch.randint(3, 300, (2, 11))
    a = load_model(str(sharded), max_seq_len=16).model(ids)
    b = load_model(tiny_models["qwen2"], max_seq_len=16).model(ids)
    assert torch.equal(a, b)


def test_tied_embeddings_share_one_matrix(tiny_models):  # noqa: F811
    m = load_model(tiny_models["qwen3"], max_seq_len=16).model
    assert m.output.weight is m.tok_embeddings.weight


@pytest.mark.parametrize("quant, group_size", [("int8", 32), ("int4", 32), ("int4", 64)])
@torch.inference_mode()
def test_quantize_on_load(tiny_models, quant, group_size):  # noqa: F811
    path = tiny_models["llama"]
    q = load_model(path, quant=quant, group_size=group_size, max_seq_len=16).model
    f = load_model(path, max_seq_len=16).model
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    linears = [n for n, m in f.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * q.config.num_layers + 1  # wqkv, wo, w_in, w_out per layer, and the head
    # int4 needs in_features divisible by the group size (intermediate_size 96 is not, for 64)
    divisible = [n for n in linears if quant == "int8" or f.get_submodule(n).in_features % group_size == 0]
    assert sorted(quantized) == sorted(divisible)
    for name, module in quantized.items():
        assert module.weight.format.name == quant
        w = module.weight.dequantize(torch.float32)
        original = f.get_submodule(name).weight
        assert (w - original).abs().max() <= module.weight.scales.max() / 2 * 1.001 + 1e-7
        f.get_submodule(name).weight.copy_(w)  # the float model now holds exactly the quantized values
    ids = torch.randint(3, 300, (2, 9))
    # Same weights; the CPU kernels round activations to int8 per block of 32 (llama.cpp's Q8_0 scheme), and
    # for int4 that rounding multiplies s*q rather than w (llama.cpp's Q4_1 x Q8_1): a few percent on these
    # logits (measured up to ~4% mean), where a wiring mistake would be ~100%.
    a, b = q(ids), f(ids)
    assert rel_err(a, b) < 0.15 and mean_rel_err(a, b) < 0.06


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_config(tiny_models, tmp_path):  # noqa: F811
    folder = copy_of(tiny_models, "llama", tmp_path)
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        load_model(str(folder))


def test_truncated_safetensors(tiny_models, tmp_path):  # noqa: F811
    folder = copy_of(tiny_models, "llama", tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*(valid|truncated)"):
        load_model(str(folder))


def test_missing_shard(tiny_models, tmp_path):  # noqa: F811
    folder = tmp_path / "sharded"
    make_model("llama").save_pretrained(folder, max_shard_size="40KB")
    save_tokenizer(str(folder))
    shard = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))[-1]
    os.remove(folder / shard)
    with pytest.raises(FileNotFoundError, match=shard.replace(".", r"\.")):
        load_model(str(folder))


def test_unknown_architecture(tiny_models, tmp_path):  # noqa: F811
    folder = copy_of(tiny_models, "llama", tmp_path)
    edit_config(folder, architectures=["FalconForCausalLM"])
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture.*LlamaForCausalLM"):
        load_model(str(folder))


def test_inconsistent_sizes(tiny_models, tmp_path):  # noqa: F811
    folder = copy_of(tiny_models, "llama", tmp_path)
    edit_config(folder, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"config\.json: tensor for layers\.0\.mlp\.w_in\.weight has shape"):
        load_model(str(folder))
    edit_config(folder, intermediate_size=96, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        load_model(str(folder))


def test_config_derives_and_validates():
    c = ModelConfig(arch="llama", vocab_size=10, hidden_size=64, num_layers=1, num_heads=4)
    assert (c.num_kv_heads, c.head_dim, c.intermediate_size, c.rotary_dim) == (4, 16, 256, 16)
    with pytest.raises(ConfigError, match="hidden_size 60 is not a multiple of num_heads 8"):
        ModelConfig(arch="llama", vocab_size=10, hidden_size=60, num_layers=1, num_heads=8)
    with pytest.raises(ConfigError, match="supported"):
        ModelConfig(arch="bert", vocab_size=10, hidden_size=64, num_layers=1, num_heads=4)


def test_cache_limits(tiny_models):  # noqa: F811
    m = load_model(tiny_models["gpt2"], max_batch_size=2, max_seq_len=8).model
    with pytest.raises(ValueError, match="max_batch_size 2"):
        m.prefill(torch.ones(3, 4, dtype=torch.long), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="max_seq_len 8"):
        m.prefill(torch.ones(1, 9, dtype=torch.long), torch.tensor([9]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 4\]"):
        m.prefill(torch.ones(2, 4, dtype=torch.long), torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="active batch"):
        m.prefill(torch.ones(2, 4, dtype=torch.long), torch.tensor([4, 2]))
        m.decode(torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match="learned positions"):
        m.setup_cache(1, 100000)
