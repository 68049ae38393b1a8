"""GGUF files: metadata and tensors, read with the `gguf` package (memory-mapped), checked before use.

Tensors come back in our formats: F32 / F16 / BF16 as torch tensors, Q4_0 / Q4_1 / Q8_0 converted losslessly
to int4 / int8 QuantizedWeights (kernels/quant.py `from_gguf`, no float round trip), and every other block type
llama.cpp writes (Q4_K, Q6_K, ...) dequantized to float32 by `gguf.quants`.
"""
import os

import numpy as np
import torch

from flashgen.kernels.quant import from_gguf

GGUF_MAGIC = b"GGUF"
NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # block types we keep quantized


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match its configuration."""


def _reader_class():
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """GGUFReader that names the tensor and sizes when the data runs past the end of the file."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n_bytes = int(np.prod(dims)) * type_size // block
                begin = int(start_offs + offset[0])
                if begin + n_bytes > size:
                    raise CheckpointError(
                        f"tensor {bytes(name).decode(errors='replace')!r} ({qtype.name}, shape "
                        f"{tuple(int(d) for d in dims)}) needs {n_bytes} bytes at offset {begin}, but the file has "
                        f"only {size} bytes (truncated file?)")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


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
        try:
            self._reader = _reader_class()(self.path)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: malformed GGUF header ({type(e).__name__}: {e})") from e
        self.meta = {}
        for key, field in self._reader.fields.items():
            if not key.startswith("GGUF."):
                value = field.contents()
                self.meta[key] = value
        self._tensors = {t.name: t for t in self._reader.tensors}

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

    def get(self, name, dtype=torch.float32, native=True):
        """The tensor `name`: a float tensor, or (native) a QuantizedWeight for Q4_0 / Q4_1 / Q8_0 matrices."""
        import gguf

        t = self._tensor(name)
        kind = t.tensor_type.name
        shape = self.shape(name)
        if kind in ("F32", "F16"):
            return torch.from_numpy(np.array(t.data)).reshape(shape).to(dtype)
        if kind == "BF16":
            raw = torch.from_numpy(np.array(t.data)).reshape(-1).view(torch.bfloat16)
            return raw.reshape(shape).to(dtype)
        if native and kind in NATIVE_TYPES and len(shape) == 2:
            return from_gguf(np.array(t.data), kind, shape, dtype=dtype)
        try:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported type {kind}") from e
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape).to(dtype)
