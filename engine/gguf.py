"""GGUF files: metadata and tensors from the memory-mapped file, checked before use.

The header is parsed here (gguf-py's reader builds numpy views of every field, which takes seconds for a
tokenizer of 50k entries); the `gguf` package supplies the block type table and the K-quant dequantizers.

Tensors come back in our formats: F32 / F16 / BF16 as torch tensors; the block types asked for (`native`,
see native_types) as QuantizedWeights over the file's own blocks, without a copy (kernels/quant.py `from_gguf`);
any other block type dequantized to float32 by `gguf.quants`.
"""
import mmap
import os
import struct

import numpy as np
import torch

from flashgen.kernels import ggml
from flashgen.kernels.quant import QuantizedWeight, from_gguf

GGUF_MAGIC = b"GGUF"


def native_types(device):
    """The GGUF block types kept quantized on `device` (those its kernels compute); the rest load as float."""
    cpu = torch.device(device).type == "cpu"
    return ("Q8_0",) + (("F16", "BF16") if cpu else ()) + tuple(
        t.name for t in ggml.BLOCK_TYPES.values() if (t.cpu_kernel if cpu else t.gpu_kernel))


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match its configuration."""


# Metadata value types of the GGUF spec: struct format per scalar type; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {"B": np.uint8, "b": np.int8, "H": np.uint16, "h": np.int16, "I": np.uint32, "i": np.int32,
          "f": np.float32, "?": np.bool_, "Q": np.uint64, "q": np.int64, "d": np.float64}


class _Header:
    """A little-endian GGUF (v2 / v3) header parsed straight from the memory map: every count and length is
    checked against the bytes left, so a malformed file fails with a message instead of a huge allocation."""

    MAX_DIMS = 4  # GGML_MAX_DIMS

    def __init__(self, buf):
        self.buf, self.pos = buf, 4

    def take(self, fmt):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, item_bytes, what):
        n = self.take("Q")
        if n * item_bytes > len(self.buf) - self.pos:
            raise CheckpointError(f"{what} count {n} runs past the end of the file")
        return n

    def string(self):
        n = self.count(1, "string length")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise CheckpointError(f"unknown metadata value type {kind}")
        item = self.take("I")
        if item in _SCALARS:  # numbers in one slice
            fmt = _SCALARS[item]
            n = self.count(struct.calcsize(fmt), "array")
            values = np.frombuffer(self.buf, _NUMPY[fmt], n, self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self.value(item) for _ in range(self.count(1, "array"))]

    def parse(self):
        version = self.take("I")
        if version not in (2, 3):
            raise CheckpointError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self.count(1, "tensor"), self.count(1, "metadata")
        meta = {}
        for _ in range(n_kv):
            key = self.string()
            if key in meta:
                raise CheckpointError(f"metadata key {key!r} appears twice")
            meta[key] = self.value(self.take("I"))
        names = set()
        infos = [self.tensor_info(names) for _ in range(n_tensors)]
        align = meta.get("general.alignment", 32)
        if not (type(align) is int and align > 0 and align & (align - 1) == 0):
            raise CheckpointError(f"general.alignment must be a power of two, got {align!r}")
        return meta, infos, (self.pos + align - 1) // align * align

    def tensor_info(self, names):
        """(name, dims, type, offset) of the next tensor, its dims checked: whole blocks, and no more elements than
        the file holds bits (so the byte counts computed from them stay in int64)."""
        import gguf

        name = self.string()
        if name in names:
            raise CheckpointError(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = self.take("I")
        if not 1 <= n_dims <= self.MAX_DIMS:
            raise CheckpointError(f"tensor {name!r} has {n_dims} dimensions (1 to {self.MAX_DIMS})")
        dims = [self.take("Q") for _ in range(n_dims)]
        raw_type, offset = self.take("I"), self.take("Q")
        if min(dims) < 1:
            raise CheckpointError(f"tensor {name!r} has an empty dimension (dims {dims})")
        numel = 1
        for d in dims:
            numel *= d
        if numel > 8 * len(self.buf):
            raise CheckpointError(f"tensor {name!r} has dims {dims}: more elements than the file's {len(self.buf)} "
                                  f"bytes can hold")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:  # an unknown type is reported with the tensor's data
            return name, dims, raw_type, offset
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if dims[0] % block:
            raise CheckpointError(f"tensor {name!r} ({qtype.name}): rows of {dims[0]} values are not whole blocks "
                                  f"of {block}")
        return name, dims, raw_type, offset


class _Tensor:
    def __init__(self, name, dims, qtype, data):
        self.name, self.shape, self.tensor_type, self.data = name, dims, qtype, data


def _tensors(path, buf, infos, start):
    """Name -> _Tensor whose data is a read-only view of the memory map (uint8 rows for block types)."""
    import gguf

    out = {}
    for name, dims, raw_type, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown type {raw_type}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        numel = int(np.prod(dims, dtype=np.int64))
        n_bytes, begin = numel * type_size // block, start + offset
        if begin + n_bytes > len(buf):
            raise CheckpointError(f"{path}: tensor {name!r} ({qtype.name}, shape {tuple(dims)}) needs {n_bytes} bytes "
                                  f"at offset {begin}, but the file has only {len(buf)} bytes (truncated file?)")
        raw = np.frombuffer(buf, np.uint8, n_bytes, begin)
        plain = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(qtype.name)
        data = raw.view(plain) if plain else raw.reshape(-1, dims[0] * type_size // block)
        out[name] = _Tensor(name, np.array(dims), qtype, data)
    return out


class GGUFFile:
    """An open GGUF file: `meta` (key -> value), `tensor_names`, `get(name)`, `shape(name)`."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise CheckpointError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
            # Copy-on-write: tensors are zero-copy views of the file that no write can fault on (release_pages).
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            meta, infos, start = _Header(buf).parse()
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: malformed GGUF header ({e})") from None
        except (struct.error, ValueError, OverflowError, RecursionError) as e:  # RecursionError: nested arrays
            raise CheckpointError(f"{self.path}: malformed GGUF header ({type(e).__name__}: {e})") from None
        self.meta = meta
        self._buf = buf
        self._tensors = _tensors(self.path, buf, infos, start)

    def release_pages(self):
        """Drop the file's pages from this process's memory (once the kernels have their layouts): the views stay
        valid and read the file again if touched."""
        self._buf.madvise(mmap.MADV_DONTNEED)

    @property
    def tensor_names(self):
        return list(self._tensors)

    def __contains__(self, name):
        return name in self._tensors

    def type_name(self, name):
        return self._tensor(name).tensor_type.name

    def shape(self, name):
        """numpy-order shape: (rows, columns) for a matrix (GGUF lists the innermost dimension first)."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def _tensor(self, name):
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self._tensors[name]

    def get(self, name, dtype=torch.float32, native=("Q4_0", "Q4_1", "Q8_0")):
        """The tensor `name`: a QuantizedWeight for a matrix of a block type in `native`, else a float tensor."""
        import gguf

        t = self._tensor(name)
        kind = t.tensor_type.name
        shape = self.shape(name)
        if kind in ("F16", "BF16") and kind in native and len(shape) == 2:  # kept 16-bit: a view of the file
            half = torch.from_numpy(t.data).view(torch.float16 if kind == "F16" else torch.bfloat16).reshape(shape)
            return QuantizedWeight("float16" if kind == "F16" else "bfloat16", half, dtype=dtype)
        if kind in ("F32", "F16"):
            return torch.from_numpy(np.array(t.data)).reshape(shape).to(dtype)
        if kind == "BF16":
            raw = torch.from_numpy(np.array(t.data)).reshape(-1).view(torch.bfloat16)
            return raw.reshape(shape).to(dtype)
        if kind in native and len(shape) == 2:
            return from_gguf(t.data, kind, shape, dtype=dtype)  # GGML blocks stay a view of the file
        try:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported type {kind}") from e
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape).to(dtype)
