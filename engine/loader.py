"""Checkpoints -> Transformer: Hugging Face safetensors folders and GGUF files.

Every checkpoint tensor is mapped to our parameter names (engine/model.py), fused where the model fuses
(q|k|v -> wqkv, gate|up -> w_in), transposed where GPT-2's Conv1D stores (in, out), and un-permuted where
llama.cpp reordered the rows of Q and K for its interleaved rope. Float weights may be quantized on load
(int8 per channel, int4 per group); GGUF block types stay quantized where the device has their kernels
(in their own blocks, views of the file; gguf.native_types), and only the kernels' layouts of them stay in
memory once loaded.
"""
import ctypes
import ctypes.util
import json
import logging
import os
import struct
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from flashgen.kernels.qlinear import QuantizedEmbedding, QuantizedLinear, StackedLinear
from flashgen.kernels.quant import QuantizedWeight, quantize_int4, quantize_int8

from .config import ModelConfig, lookup, one_line, read_json
from .gguf import CheckpointError, GGUFFile, native_types
from .model import Transformer, rope_inv_freq
from .tokenizer import gguf_tokenizer, load_hf_tokenizer

log = logging.getLogger("flashgen")
QUANT_MODES = (None, "none", "int8", "int4")
_LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out")
_HALVES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}  # 16-bit float weights kept so on the CPU


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: object
    generation_config: dict = field(default_factory=dict)


def load_model(path, device="cpu", dtype=None, quant=None, group_size=32, max_seq_len=None, max_batch_size=1,
               kv_cache_dtype=None):
    """Load a Hugging Face folder or a .gguf file into a Transformer with a KV cache.

    dtype: activation / float-weight dtype (default float32 on CPU, bfloat16 on CUDA). float16 / bfloat16 matrices
        of a float32 CPU model stay 16-bit (quant None), computed in float32 by the CPU kernels.
    quant: None keeps the checkpoint's format (GGUF block types native, float stays float); "none"
        dequantizes everything to float; "int8" / "int4" quantize the float linears (group_size for int4).
    max_seq_len: KV cache length (default min(context length, 4096)).
    kv_cache_dtype: of the KV cache (default: dtype); bfloat16 or float16 under float32 halve its memory.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = str(path)
    if os.path.isdir(path):
        config, tensors, tokenizer, gen = _read_hf(path, dtype)
    elif os.path.isfile(path):
        config, tensors, tokenizer, gen = _read_gguf(path, dtype, native=() if quant == "none" else native_types(device))
    else:
        raise FileNotFoundError(f"{path}: no such file or directory (expected a Hugging Face folder or a .gguf file)")
    model = _build(config, tensors, device, dtype, quant, group_size)
    if isinstance(tensors, _FilePlan):
        tensors.file.release_pages()
    _return_freed_heap()
    max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
    model.setup_cache(max_batch_size, max_seq_len, kv_cache_dtype)
    tokenizer.eos_token_ids |= set(config.eos_token_ids)
    return LoadedModel(model, config, tokenizer, gen)


def _return_freed_heap():
    """Hand the heap that loading freed back to the system. Converting and prepacking make transient tensors of up
    to a few tens of MB, which glibc serves from its heap (above its adaptive mmap threshold) and keeps after free:
    on a 1B Q4_0 file that was 0.3 GB of resident memory, 40% of the weights. No-op without glibc."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


# ------------------------------------------------------------------ Hugging Face folders
class _SafetensorsFolder:
    """The tensors of model.safetensors or of the shards listed in model.safetensors.index.json, memory-mapped."""

    # bits per element of each safetensors dtype, to tell which tensor of a refused header is wrong
    DTYPE_BITS = {**dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 8),
                  **dict.fromkeys(("U16", "I16", "F16", "BF16"), 16), **dict.fromkeys(("U32", "I32", "F32"), 32),
                  **dict.fromkeys(("U64", "I64", "F64", "C64"), 64), "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

    def __init__(self, folder):
        from safetensors import safe_open

        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index_path):
            weight_map = lookup(read_json(index_path), "weight_map", "an object", index_path)
            for name, file in weight_map.items():
                if not (isinstance(file, str) and file == os.path.basename(file) and file.endswith(".safetensors")):
                    raise CheckpointError(f"{index_path}: weight_map[{name!r}] is {file!r}, not the name of a "
                                          f".safetensors file beside it")
            files = sorted(set(weight_map.values()))
            self.source = index_path
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors weights (pickled .bin checkpoints are refused)")
            self.source = os.path.join(folder, files[0] if len(files) == 1 else "*.safetensors")
        self.handles, self.where = {}, {}
        for name in files:
            file_path = os.path.join(folder, name)
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"{file_path}: missing (listed in the weight_map of {index_path})")
            try:
                handle = safe_open(file_path, framework="pt")
                for key in handle.keys():
                    self.where[key] = file_path
            except Exception as e:  # safetensors raises its own SafetensorError for malformed headers
                problem = self.header_problem(file_path) or f"not a valid safetensors file ({one_line(e)})"
                raise CheckpointError(f"{file_path}: {problem}") from None
            self.handles[file_path] = handle
        self.n_bytes = sum(os.path.getsize(path) for path in self.handles)

    @classmethod
    def header_problem(cls, path):
        """What is wrong in the header of a safetensors file the library refused (naming the tensor), or None."""
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header (truncated file?)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"the header length {n} runs past the end of the file ({size} bytes; truncated file?)"
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            return f"the {n}-byte header is not JSON ({one_line(e)})"
        if not isinstance(header, dict):
            return f"the header is not a JSON object but {type(header).__name__}"
        meta = header.pop("__metadata__", {})
        if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            return "__metadata__ must be an object of strings"
        spans = []
        for name, info in header.items():
            problem = cls._entry_problem(info)
            if problem:
                return f"tensor {name!r}: {problem}"
            spans.append((*info["data_offsets"], name))
        data_bytes, offset, previous = size - 8 - n, 0, None
        for begin, end, name in sorted(spans):
            if begin < offset:
                return f"tensors {previous!r} and {name!r} overlap (data_offsets up to {offset}, from {begin})"
            if begin > offset:
                return f"tensor {name!r}: data_offsets begin at {begin}, but the data before it ends at {offset}"
            offset, previous = end, name
        if offset != data_bytes:
            return f"the tensors' data ends at byte {offset} of {data_bytes} (truncated or padded file?)"
        return None

    @classmethod
    def _entry_problem(cls, info):
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            return "expected an object of dtype, shape and data_offsets"
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in cls.DTYPE_BITS:
            return f"dtype {dtype!r} is not one of {sorted(cls.DTYPE_BITS)}"
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            return f"shape {shape!r} is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
        numel = 1
        for d in shape:
            numel *= d
        if (offsets[1] - offsets[0]) * 8 != numel * cls.DTYPE_BITS[dtype]:
            return (f"{dtype} of shape {shape} takes {numel * cls.DTYPE_BITS[dtype] // 8} bytes, but data_offsets "
                    f"{offsets} hold {offsets[1] - offsets[0]}")
        return None

    def __contains__(self, name):
        return name in self.where

    def get(self, name):
        if name not in self.where:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing from the checkpoint")
        path = self.where[name]
        try:
            return self.handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); the file may be truncated") from e


def _read_hf(folder, dtype):
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: missing")
    config = ModelConfig.from_hf(read_json(config_path), source=config_path)
    gen_path = os.path.join(folder, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    src = _SafetensorsFolder(folder)
    config.check_size(src.n_bytes, src.source)
    eos = lookup(gen, "eos_token_id", "an integer >= 0 or a list of them", gen_path, None)
    tokenizer = load_hf_tokenizer(folder, extra_eos=[] if eos is None else [eos] if isinstance(eos, int) else eos)
    tokenizer.check_ids_below(config.vocab_size, f"{config_path} vocab_size")
    return config, _hf_tensors(config, src), tokenizer, gen


def _hf_tensors(c, src):
    """our parameter name -> a function reading its tensor from the checkpoint (called once, in _build)."""
    gpt2 = c.arch == "gpt2"
    root = ("transformer." if "transformer.wte.weight" in src else "") if gpt2 else "model."

    def one(name, transpose=False):
        return lambda: src.get(name).t() if transpose else src.get(name)

    def cat(*names):
        return lambda: torch.cat(_check_parts(src.source, names, [src.get(n) for n in names]))

    if gpt2:
        plan = {"tok_embeddings.weight": one(root + "wte.weight"), "pos_embeddings.weight": one(root + "wpe.weight"),
                "norm.weight": one(root + "ln_f.weight"), "norm.bias": one(root + "ln_f.bias")}
        for i in range(c.num_layers):
            p, o = f"{root}h.{i}.", f"layers.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                for kind in ("weight", "bias"):
                    plan[f"{o}{ours}.{kind}"] = one(f"{p}{theirs}.{kind}")
            for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"), ("mlp.w_in", "mlp.c_fc"),
                                 ("mlp.w_out", "mlp.c_proj")):
                plan[f"{o}{ours}.weight"] = one(f"{p}{theirs}.weight", transpose=True)  # Conv1D: (in, out)
                plan[f"{o}{ours}.bias"] = one(f"{p}{theirs}.bias")
        if "lm_head.weight" in src and not c.tie_word_embeddings:
            plan["output.weight"] = one("lm_head.weight")
        return plan
    plan = {"tok_embeddings.weight": one("model.embed_tokens.weight"), "norm.weight": one("model.norm.weight")}
    if not c.tie_word_embeddings:
        plan["output.weight"] = one("lm_head.weight")
    for i in range(c.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        plan[o + "attn_norm.weight"] = one(p + "input_layernorm.weight")
        plan[o + "mlp_norm.weight"] = one(p + "post_attention_layernorm.weight")
        attn = p + "self_attn."
        fused = attn + "qkv_proj.weight" in src
        for kind, present in (("weight", True), ("bias", c.qkv_bias)):
            if present:
                plan[f"{o}attn.wqkv.{kind}"] = (one(f"{attn}qkv_proj.{kind}") if fused else
                                                cat(*(f"{attn}{x}_proj.{kind}" for x in "qkv")))
        plan[o + "attn.wo.weight"] = one(attn + "o_proj.weight")
        if c.o_bias:
            plan[o + "attn.wo.bias"] = one(attn + "o_proj.bias")
        if c.qk_norm:
            plan[o + "attn.q_norm.weight"] = one(attn + "q_norm.weight")
            plan[o + "attn.k_norm.weight"] = one(attn + "k_norm.weight")
        mlp = p + "mlp."
        for kind, present in (("weight", True), ("bias", c.mlp_bias)):
            if present:
                plan[f"{o}mlp.w_in.{kind}"] = (one(f"{mlp}gate_up_proj.{kind}") if f"{mlp}gate_up_proj.weight" in src
                                               else cat(f"{mlp}gate_proj.{kind}", f"{mlp}up_proj.{kind}"))
                plan[f"{o}mlp.w_out.{kind}"] = one(f"{mlp}down_proj.{kind}")
    return plan


# ------------------------------------------------------------------ GGUF files
def _read_gguf(path, dtype, native):
    f = GGUFFile(path)
    tokenizer = gguf_tokenizer(f.meta, source=path)  # first: the config falls back on its token count
    config = ModelConfig.from_gguf(f.meta, has_output="output.weight" in f, source=path)
    config.check_size(os.path.getsize(path), path)
    tokenizer.check_ids_below(config.vocab_size, "its vocab_size")
    gen = {"eos_token_id": sorted(tokenizer.eos_token_ids | set(config.eos_token_ids))}
    return config, _gguf_tensors(config, f, dtype, native), tokenizer, gen


class _FilePlan(dict):
    """The tensor thunks of one memory-mapped file, whose pages are released once the model is built."""

    def __init__(self, file, plan):
        super().__init__(plan)
        self.file = file


def _gguf_tensors(c, f, dtype, native):
    """our name -> thunk over llama.cpp tensor names (blk.N.attn_q.weight, ...). native: the block types kept
    quantized (gguf.native_types; every other tensor is dequantized to float)."""
    # llama.cpp's converter reorders the rows of Q and K of "llama" files for its interleaved (GPT-J) rope;
    # we rotate halves (HF layout), so those rows are put back.
    unpermute = f.meta.get("general.architecture") in ("llama", "mistral")
    if "rope_factors_long.weight" in f or "rope_factors_short.weight" in f:
        raise CheckpointError(f"{f.path}: LongRoPE scaling (rope_factors_*) is not supported")

    def one(name):
        return lambda: f.get(name, dtype, native)

    def qkv(blk, kind):
        if f"{blk}attn_qkv.{kind}" in f:
            return one(f"{blk}attn_qkv.{kind}")

        def load():
            names = [f"{blk}attn_{x}.{kind}" for x in "qkv"]
            q, k, v = (f.get(n, dtype, native) for n in names)
            if kind == "weight":
                _check_parts(f.path, names, (q, k, v), (c.q_size, c.kv_size, c.kv_size))
            if unpermute:
                q, k = _unpermute_rope(q, c.num_heads), _unpermute_rope(k, c.num_kv_heads)
            return _cat_rows([q, k, v])
        return load

    plan = {"tok_embeddings.weight": one("token_embd.weight"), "norm.weight": one("output_norm.weight")}
    if "position_embd.weight" in f:
        plan["pos_embeddings.weight"] = one("position_embd.weight")
    if "output_norm.bias" in f:
        plan["norm.bias"] = one("output_norm.bias")
    if "output.weight" in f:
        plan["output.weight"] = one("output.weight")
    for i in range(c.num_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")):
            for kind in ("weight", "bias"):
                if f"{b}{theirs}.{kind}" in f:
                    plan[f"{o}{ours}.{kind}"] = one(f"{b}{theirs}.{kind}")
        plan[o + "attn.wqkv.weight"] = qkv(b, "weight")
        if f"{b}attn_qkv.bias" in f or f"{b}attn_q.bias" in f:
            plan[o + "attn.wqkv.bias"] = qkv(b, "bias")
        for ours, theirs in (("attn.wo", "attn_output"), ("mlp.w_out", "ffn_down")):
            for kind in ("weight", "bias"):
                if f"{b}{theirs}.{kind}" in f:
                    plan[f"{o}{ours}.{kind}"] = one(f"{b}{theirs}.{kind}")
        if c.qk_norm:
            plan[o + "attn.q_norm.weight"] = one(b + "attn_q_norm.weight")
            plan[o + "attn.k_norm.weight"] = one(b + "attn_k_norm.weight")
        if f"{b}ffn_gate.weight" in f:
            plan[o + "mlp.w_in.weight"] = lambda b=b: _cat_rows(_check_parts(
                f.path, [f"{b}ffn_gate.weight", f"{b}ffn_up.weight"],
                [f.get(f"{b}ffn_{x}.weight", dtype, native) for x in ("gate", "up")]))
        else:  # Phi-3 stores gate|up fused in ffn_up; GPT-2 has no gate
            plan[o + "mlp.w_in.weight"] = one(b + "ffn_up.weight")
        if f"{b}ffn_up.bias" in f:
            plan[o + "mlp.w_in.bias"] = one(b + "ffn_up.bias")
    if "rope_freqs.weight" in f:  # Llama 3 rope scaling, stored as per-frequency divisors of inv_freq
        plan["inv_freq"] = lambda: rope_inv_freq(c) / _rope_freqs(f, c)
    return _FilePlan(f, plan)


def _rope_freqs(f, c):
    freqs = f.get("rope_freqs.weight", torch.float32)
    if tuple(freqs.shape) != (c.rotary_dim // 2,):
        raise CheckpointError(f"{f.path}: rope_freqs.weight must have rotary_dim / 2 = {c.rotary_dim // 2} entries, "
                              f"got shape {tuple(freqs.shape)}")
    return freqs


def _unpermute_rope(w, heads):
    """Undo llama.cpp's row order for rope: its row h*D + 2j + t is our row h*D + t*D/2 + j (t in 0, 1)."""
    rows = w.shape[0]
    d = rows // heads
    index = torch.arange(rows).reshape(heads, d // 2, 2).transpose(1, 2).reshape(-1)
    return _take_rows(w, index)


def _check_parts(source, names, parts, rows=None):
    """The parts of a fused projection must be matrices over the same inputs (or all vectors: biases), with `rows`
    outputs each if given: else a CheckpointError naming the file and the tensors."""
    shapes = [tuple(p.shape) for p in parts]
    ok = all(len(sh) == 1 for sh in shapes) or (all(len(sh) == 2 for sh in shapes) and len({sh[1] for sh in shapes}) == 1)
    if ok and rows is not None:
        ok = [sh[0] for sh in shapes] == list(rows)
    if not ok:
        want = "" if rows is None else f" with {list(rows)} rows"
        raise CheckpointError(f"{source}: {', '.join(names)} must be matrices over the same in_features{want}, got "
                              f"shapes {shapes}")
    return parts


def _take_rows(w, index):
    return w[index] if isinstance(w, torch.Tensor) else w.rows(index)


def _cat_rows(parts):
    """Stack weights along the output dimension. Runs of parts in one format merge into one tensor or
    QuantizedWeight (file blocks without a copy: QuantizedWeight.cat); when runs of several formats remain, their
    list (a StackedLinear, each part computing its own outputs)."""
    def key(p):
        if isinstance(p, torch.Tensor):
            return "float"
        return p.format, p.group_size

    runs = []
    for p in parts:
        if runs and key(runs[-1][-1]) == key(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    merged = [r[0] if len(r) == 1 else torch.cat(r) if isinstance(r[0], torch.Tensor) else QuantizedWeight.cat(r)
              for r in runs]
    return merged[0] if len(merged) == 1 else merged


# ------------------------------------------------------------------ assembling the model
def _build(config, plan, device, dtype, quant, group_size):
    """Instantiate the model without memory (meta), then give every parameter its checkpoint tensor."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(plan) - ({"output.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{config.source}: the checkpoint lacks {len(missing)} tensors the config implies, "
                              f"e.g. {missing[:4]}")
    source = config.source
    keep_16bit = quant is None and device.type == "cpu" and dtype == torch.float32
    for name, load in tqdm(plan.items(), desc="loading weights", unit="tensor", leave=False,
                           disable=not log.isEnabledFor(logging.INFO)):
        value = load()
        if name == "inv_freq":
            model.inv_freq = value.to(device)
            continue
        owner, _, attr = name.rpartition(".")
        if keep_16bit and isinstance(value, torch.Tensor) and value.dim() == 2 and value.dtype in _HALVES and (
                attr == "weight" and (owner.endswith(_LINEARS) or owner in ("output", "tok_embeddings"))):
            value = QuantizedWeight(_HALVES[value.dtype], value)  # no float32 copy: the CPU kernels widen it
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor for {name}")
        want = tuple(expected[name].shape)
        got = (sum(p.shape[0] for p in value), value[0].shape[1]) if isinstance(value, list) else tuple(value.shape)
        if got != want:
            raise CheckpointError(f"{source}: tensor for {name} has shape {got}, but the config implies {want} "
                                  f"(inconsistent config sizes?)")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name == "tok_embeddings.weight" and isinstance(value, QuantizedWeight) and quant != "none":
            model.tok_embeddings = QuantizedEmbedding(value.to(device))
            if "output.weight" not in plan:  # tied head: the same quantized matrix
                model.output = QuantizedLinear(model.tok_embeddings.weight)
            continue
        if isinstance(value, list):
            _set_module(model, module_name, StackedLinear([p.to(device) if isinstance(p, QuantizedWeight)
                                                           else p.to(device, dtype) for p in value]))
            continue
        if isinstance(value, QuantizedWeight) and (quant == "none" or name == "pos_embeddings.weight"):
            value = value.dequantize(dtype)
        if isinstance(value, QuantizedWeight):
            _set_quantized(model, module_name, value.to(device))
        elif isinstance(module, (QuantizedLinear, StackedLinear)):
            module.bias = nn.Parameter(value.to(device, dtype), requires_grad=False)
        else:
            setattr(module, attr, nn.Parameter(value.to(device, dtype).contiguous(), requires_grad=False))
    if config.tie_word_embeddings and "output.weight" not in plan and not isinstance(model.output, QuantizedLinear):
        model.output.weight = model.tok_embeddings.weight
    if quant in ("int8", "int4"):
        _quantize_linears(model, quant, group_size)
    model.inv_freq = None if model.inv_freq is None else model.inv_freq.to(device)
    unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        raise CheckpointError(f"{source}: no checkpoint tensor for {unloaded[:4]}")
    for module in tqdm(list(model.modules()), desc="prepacking", unit="module", leave=False,
                       disable=not log.isEnabledFor(logging.INFO)):
        if isinstance(module, QuantizedLinear):  # the kernels' layouts now, so the first prompt does not pay for them
            module.weight.packed()
    return model.eval()


def _set_quantized(model, module_name, weight):
    """Swap the linear `module_name` for a QuantizedLinear (its bias, possibly still unloaded, carries over)."""
    _set_module(model, module_name, QuantizedLinear(weight, model.get_submodule(module_name).bias))


def _set_module(model, module_name, new):
    if new.bias is None and getattr(model.get_submodule(module_name), "bias", None) is not None:
        new.bias = model.get_submodule(module_name).bias  # unloaded yet (meta), set when its tensor comes
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _quantize_linears(model, quant, group_size):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (n.endswith(_LINEARS) or n == "output")]
    for name in names:
        linear = model.get_submodule(name)
        k = linear.in_features
        if quant == "int4" and k % group_size:
            log.warning("%s kept in float: in_features %d is not a multiple of group_size %d", name, k, group_size)
            continue
        w = quantize_int4(linear.weight, group_size) if quant == "int4" else quantize_int8(linear.weight)
        _set_quantized(model, name, w)
