"""Quantized weight formats: round-to-nearest quantizers, save/load, and lossless converters (GGUF, AWQ, GPTQ).

Canonical formats (what a QuantizedWeight stores, the same on every device):

- int4: `qweight` uint8 (N, K//2), byte (n, j) = q[n, 2j] | q[n, 2j+1] << 4 with codes q in [0, 15];
  `scales` and `offsets` float32 or float16, the same dtype for both, (N, K//g), one per group of g consecutive
  input features (g in 32, 64, 128):
      w[n, k] = scales[n, k//g] * q[n, k] + offsets[n, k//g]
- int8: `qweight` int8 (N, K); `scales` float32 or float16, (N, 1) per output channel, or (N, K//32) per block of
  32 (GGUF Q8_0):
      w[n, k] = scales[n, k // block] * q[n, k]
- GGML block types (Q4_0, Q4_K, Q6_K, ... kernels/ggml.py) and GGUF Q8_0: `qweight` uint8
  (N, K / block * block_bytes), the GGUF file's own blocks, lossless and as compact as the file (Q8_0 runs the
  int8 kernels, converted when prepacked).
- float16 / bfloat16: `qweight` is the 16-bit W (N, K) itself, kept so under float32 activations.

A format is one QuantFormat object of FORMATS (its tensors, checks, dequantizer and kernel ops).

float16 scales hold the values of formats that store them in float16 (GGUF), losslessly and in half the bytes
the kernels stream; every op computes with them converted to float32 (exact), so the dequantized weight is the
same as with float32 scales of the same values. The round-to-nearest quantizers and the AWQ / GPTQ converters
produce float32 (their offsets -z*s are not float16 values).

Each device's kernels stream a prepacked layout instead (`flashgen::int4_prepack` / `int8_prepack` / `ggml_prepack`);
`QuantizedWeight.packed()` builds it once per device and caches it.
"""
import json

import numpy as np
import torch

from . import _backend, ggml, reference

INT4_GROUP_SIZES = (32, 64, 128)
INT8_BLOCK_SIZES = (None, 32)
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class QuantFormat:
    """A weight format: the canonical tensors a QuantizedWeight of it holds, their checks and dequantizer, and the
    ops of its kernels. FORMATS has one per name; the loader, QuantizedLinear and the C++ decoder go through it.

    modes: the QuantizedLinear modes it computes (the first is the default). cpu_linear(w, mode) gives the
    (kind, parameter) of csrc/cpu/decoder.cpp's CpuLinear.
    """

    name = ""
    modes = ()
    file_blocks = False  # canonical form: one uint8 row of the GGUF file's blocks per output (QuantizedWeight.cat)

    def in_features(self, qweight, group_size):
        raise NotImplementedError

    def check(self, w):
        raise NotImplementedError

    def tensors(self, w):
        raise NotImplementedError

    def dequantize(self, w, dtype):
        raise NotImplementedError

    def prepack(self, w):
        raise NotImplementedError

    def linear(self, x, w, bias, mode):
        raise NotImplementedError

    def cpu_linear(self, w, mode):
        raise NotImplementedError


class _Int4(QuantFormat):
    name, modes = "int4", ("int4",)

    def in_features(self, qweight, group_size):
        return qweight.shape[1] * 2

    def check(self, w):
        _check_int4(w.qweight, w.scales, w.offsets, w.group_size, w.in_features)

    def tensors(self, w):
        return w.qweight, w.scales, w.offsets

    def dequantize(self, w, dtype):
        return reference.int4_dequantize(*self.tensors(w), w.group_size, *w.shape, dtype)

    def prepack(self, w):
        return torch.ops.flashgen.int4_prepack(*self.tensors(w), w.group_size)

    def linear(self, x, w, bias, mode):
        return torch.ops.flashgen.int4_linear(x, *w.packed(), w.group_size, w.out_features, bias)

    def cpu_linear(self, w, mode):
        return "int4", w.group_size


class _Int8(QuantFormat):
    name, modes = "int8", ("int8", "int8_dynamic")

    def in_features(self, qweight, group_size):
        return qweight.shape[1]

    def check(self, w):
        _check_int8(w.qweight, w.scales, w.offsets, w.group_size, w.in_features)

    def tensors(self, w):
        return w.qweight, w.scales

    def dequantize(self, w, dtype):
        return reference.int8_dequantize(*self.tensors(w), *w.shape, dtype)

    def prepack(self, w):
        return torch.ops.flashgen.int8_prepack(*self.tensors(w))

    def linear(self, x, w, bias, mode):
        op = torch.ops.flashgen.int8_linear_dynamic if mode == "int8_dynamic" else torch.ops.flashgen.int8_linear
        return op(x, *w.packed(), w.out_features, bias)

    def cpu_linear(self, w, mode):
        return mode, 0


class _Half(QuantFormat):
    """float16 / bfloat16 weights kept 16-bit (exact) under float32 activations: qweight is W itself, (N, K)."""

    def __init__(self, dtype):
        self.torch_dtype = dtype
        self.name = str(dtype).removeprefix("torch.")
        self.modes = (self.name,)

    def in_features(self, qweight, group_size):
        return qweight.shape[1]

    def check(self, w):
        if w.scales is not None or w.offsets is not None or w.group_size is not None:
            raise ValueError(f"{self.name} weights take no scales, offsets or group_size")
        _expect(w.qweight, "qweight", self.torch_dtype, w.shape)

    def tensors(self, w):
        return (w.qweight,)

    def dequantize(self, w, dtype):
        return w.qweight.to(dtype)

    def prepack(self, w):
        return (w.qweight.contiguous(),)

    def linear(self, x, w, bias, mode):
        return torch.ops.flashgen.half_linear(x, *w.packed(), bias)

    def cpu_linear(self, w, mode):
        return "half", 0


class _GGML(QuantFormat):
    """A GGML block type kept in its blocks (kernels/ggml.py): qweight uint8 (N, K / block * block_bytes)."""

    file_blocks = True

    def __init__(self, block_type):
        self.block_type = block_type
        self.name, self.modes = block_type.name, (block_type.name,)

    def in_features(self, qweight, group_size):
        return qweight.shape[1] // self.block_type.block_bytes * self.block_type.block

    def check(self, w):
        t = self.block_type
        if w.scales is not None or w.offsets is not None or w.group_size is not None:
            raise ValueError(f"{t.name} weights keep their scales in their blocks: scales, offsets and group_size "
                             f"must be None")
        _expect(w.qweight, "qweight", torch.uint8, (w.out_features, t.row_bytes(w.in_features)))

    def tensors(self, w):
        return (w.qweight,)

    def dequantize(self, w, dtype):
        return reference.ggml_dequantize(w.qweight, self.block_type.type_id, *w.shape, dtype)

    def prepack(self, w):
        return (torch.ops.flashgen.ggml_prepack(w.qweight, self.block_type.type_id, w.in_features),)

    def linear(self, x, w, bias, mode):
        return torch.ops.flashgen.ggml_linear(x, *w.packed(), self.block_type.type_id, w.out_features, bias)

    def cpu_linear(self, w, mode):
        return "ggml", self.block_type.type_id


class _Q8_0(QuantFormat):
    """GGUF Q8_0 kept in the file's blocks (qweight uint8 (N, K / 32 * 34): fp16 d, 32 int8 q; w = d q), a view of
    the file when loaded from one, and computed by the int8 kernels (an 8-bit plane is their layout): each
    prepack converts the blocks to int8 codes and block scales (`q8_0_to_int8`, losslessly) and prepacks those, so
    of a loaded model only the kernels' layout stays in memory. group_size is 32, the block."""

    name, modes, block_bytes, file_blocks = "Q8_0", ("Q8_0",), 34, True

    def in_features(self, qweight, group_size):
        return qweight.shape[1] // self.block_bytes * 32

    def check(self, w):
        if w.scales is not None or w.offsets is not None or w.group_size != 32:
            raise ValueError(f"{self.name} weights keep their scales in blocks of 32: scales and offsets must be "
                             f"None and group_size 32, got group_size {w.group_size}")
        _expect(w.qweight, "qweight", torch.uint8, (w.out_features, w.in_features // 32 * self.block_bytes))

    def tensors(self, w):
        return (w.qweight,)

    def dequantize(self, w, dtype):
        return q8_0_to_int8(w).dequantize(dtype)

    def prepack(self, w):
        return _INT8.prepack(q8_0_to_int8(w))

    def linear(self, x, w, bias, mode):
        return _INT8.linear(x, w, bias, "int8")

    def cpu_linear(self, w, mode):
        return _INT8.cpu_linear(w, "int8")


_INT4, _INT8 = _Int4(), _Int8()
FORMATS = {f.name: f for f in (_INT4, _INT8, _Half(torch.float16), _Half(torch.bfloat16),
                                _Q8_0(),
                                *(_GGML(t) for t in ggml.BLOCK_TYPES.values()))}


def quant_format(name):
    """The QuantFormat called `name` (or `name` itself when it is one)."""
    if isinstance(name, QuantFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


class QuantizedWeight:
    """A quantized (N, K) weight in the canonical tensors of its format (module docstring), plus its shape and
    dtype.

    format: a FORMATS name ("int4", "int8", or a GGML block type such as "Q4_K") or a QuantFormat.
    group_size: int4 group size g; int8 block size (32) or None for per-output-channel scales; None for GGML.
    dtype: the dtype of the weight it was made from (the default dtype of `dequantize()`).
    """

    def __init__(self, format, qweight, scales=None, offsets=None, group_size=None, shape=None, dtype=torch.float32):
        self.format = quant_format(format)
        rows = tuple(qweight) if isinstance(qweight, (tuple, list)) and self.format.file_blocks else (qweight,)
        if not rows or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in rows):
            raise TypeError(f"qweight must be a 2-D tensor (or, for file blocks, a sequence of them), got "
                            f"{getattr(qweight, 'shape', type(qweight).__name__)}")
        if any(t.shape[1] != rows[0].shape[1] for t in rows):
            raise ValueError(f"qweight parts must have rows of one length, got {[tuple(t.shape) for t in rows]}")
        n, k = sum(t.shape[0] for t in rows), self.format.in_features(rows[0], group_size)
        shape = tuple(shape) if shape is not None else (n, k)
        if shape != (n, k):
            raise ValueError(f"shape {shape} does not match qweight {(n, rows[0].shape[1])} for {self.format.name} "
                             f"codes")
        self._parts = rows
        self.scales, self.offsets = scales, offsets
        self.group_size, self.shape, self.dtype = group_size, shape, dtype
        self.format.check(self)
        self._packed = {}

    @property
    def qweight(self):
        """The codes (module docstring). Of file blocks stacked by `cat`, the parts concatenated anew on each
        read (by prepack, dequantize, rows, to): the parts stay views of the file, so a fused projection keeps
        no copy of its weights besides the kernels' layout."""
        return self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)

    @property
    def qweight_parts(self):
        """The tensors whose concatenation is qweight (one, unless stacked by `cat` from file blocks)."""
        return self._parts

    @property
    def out_features(self):
        return self.shape[0]

    @property
    def in_features(self):
        return self.shape[1]

    @property
    def device(self):
        return self._parts[0].device

    def tensors(self):
        """The canonical tensors: (qweight, scales, offsets) for int4, (qweight, scales) for int8, (blocks,) for
        GGML block types."""
        return self.format.tensors(self)

    def dequantize(self, dtype=None):
        """The (N, K) weight the codes stand for (exact in float32 and float64; rounded once to other dtypes)."""
        return self.format.dequantize(self, dtype or self.dtype)

    def packed(self):
        """The tensors prepacked for this weight's device and the active backend (the format's prepack op),
        built once and cached."""
        backend = _backend.active_backend()
        if backend not in self._packed:
            self._packed[backend] = self.format.prepack(self)
        return self._packed[backend]

    def rows(self, index):
        """The weight of output rows `index` (every canonical tensor is one row per output feature)."""
        picked = [None if t is None else t[index] for t in (self.qweight, self.scales, self.offsets)]
        return QuantizedWeight(self.format, *picked, group_size=self.group_size,
                               shape=(len(index), self.in_features), dtype=self.dtype)

    @staticmethod
    def cat(parts):
        """The weights stacked along the output features (one format and group size); file blocks stay their
        parts (see qweight)."""
        first = parts[0]
        if any((p.format, p.group_size, p.in_features) != (first.format, first.group_size, first.in_features)
               for p in parts):
            raise ValueError("QuantizedWeight.cat: every part must have the same format, group size and in_features")
        shape, kw = (sum(p.out_features for p in parts), first.in_features), {"dtype": first.dtype}
        if first.format.file_blocks:
            rows = [r for p in parts for r in p.qweight_parts]
            return QuantizedWeight(first.format, rows, group_size=first.group_size, shape=shape, **kw)
        tensors = [None if getattr(first, a) is None else torch.cat([getattr(p, a) for p in parts])
                   for a in ("qweight", "scales", "offsets")]
        return QuantizedWeight(first.format, *tensors, group_size=first.group_size, shape=shape, **kw)

    def to(self, device):
        """A copy on `device` (the prepacked cache is rebuilt there on first use)."""
        rows = [r.to(device) for r in self._parts]
        moved = [t.to(device) if t is not None else None for t in (self.scales, self.offsets)]
        return QuantizedWeight(self.format, rows if len(rows) > 1 else rows[0], *moved, group_size=self.group_size,
                               shape=self.shape, dtype=self.dtype)

    def state_dict(self, prefix=""):
        """Canonical tensors under `prefix` + qweight / scales / offsets, and a uint8 `qmeta` tensor holding
        format, group size, shape and dtype as JSON (so a state dict is self-describing in safetensors)."""
        meta = json.dumps({"format": self.format.name, "group_size": self.group_size, "shape": list(self.shape),
                           "dtype": str(self.dtype)})
        sd = {prefix + "qweight": self.qweight, prefix + "qmeta": torch.tensor(list(meta.encode()), dtype=torch.uint8)}
        for name in ("scales", "offsets"):
            if getattr(self, name) is not None:
                sd[prefix + name] = getattr(self, name)
        return sd

    @classmethod
    def from_state_dict(cls, sd, prefix=""):
        if prefix + "qmeta" not in sd:
            raise KeyError(f"no quantized weight under prefix {prefix!r}: {prefix}qmeta is missing")
        meta = json.loads(bytes(sd[prefix + "qmeta"].tolist()).decode())
        if meta.get("dtype") not in _DTYPES:
            raise ValueError(f"{prefix}qmeta: unknown dtype {meta.get('dtype')!r}")
        fmt = meta.get("format") or {4: "int4", 8: "int8"}.get(meta.get("bits"))  # files saved before formats
        return cls(fmt, sd[prefix + "qweight"], sd.get(prefix + "scales"), sd.get(prefix + "offsets"),
                   group_size=meta["group_size"], shape=meta["shape"], dtype=_DTYPES[meta["dtype"]])

    def save(self, path):
        """Write the state dict to a safetensors file."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, path, device="cpu"):
        """Read a file written by `save` (safetensors: no pickle)."""
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(path, device=str(device)))

    def __repr__(self):
        return (f"QuantizedWeight(format={self.format.name}, shape={self.shape}, group_size={self.group_size}, "
                f"dtype={self.dtype}, device={self.device})")


SCALE_DTYPES = (torch.float32, torch.float16)


def _expect(t, name, dtypes, shape):
    """t must be a tensor of one of `dtypes` (a dtype or a tuple of them) and of `shape`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_int4(qweight, scales, offsets, group_size, k):
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"int4: in_features {k} must be a multiple of group_size {group_size}")
    n = qweight.shape[0]
    _expect(qweight, "qweight", torch.uint8, (n, k // 2))
    _expect(scales, "scales", SCALE_DTYPES, (n, k // group_size))
    _expect(offsets, "offsets", SCALE_DTYPES, (n, k // group_size))
    if offsets.dtype != scales.dtype:
        raise TypeError(f"offsets must have the dtype of scales ({scales.dtype}), got {offsets.dtype}")


def _check_int8(qweight, scales, offsets, block_size, k):
    if block_size not in INT8_BLOCK_SIZES:
        raise ValueError(f"int8 block_size must be None (per output channel) or 32, got {block_size}")
    if block_size and k % block_size:
        raise ValueError(f"int8: in_features {k} must be a multiple of block_size {block_size}")
    if offsets is not None:
        raise ValueError("int8 weights are symmetric: offsets must be None")
    n = qweight.shape[0]
    _expect(qweight, "qweight", torch.int8, (n, k))
    _expect(scales, "scales", SCALE_DTYPES, (n, k // block_size if block_size else 1))


def _check_weight(w):
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight (out_features, in_features), got "
                         f"{getattr(w, 'shape', type(w).__name__)} {getattr(w, 'dtype', '')}")


def int4_pack(q):
    """codes (N, K) in [0, 15] -> canonical uint8 (N, K//2), code 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_int4(w, group_size=32, symmetric=False):
    """Round-to-nearest int4 per group of `group_size` input features.

    Asymmetric: s = (max - min) / 15, m = min, q = round((w - m) / s).
    Symmetric: s = max|w| / 7, m = -8 s, q = round(w / s) + 8 (GGUF Q4_0-style, codes 1..15).
    Either way |w - (s q + m)| <= s/2 per group (plus float32 rounding). Constant groups get s = 0.
    """
    _check_weight(w)
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"int4: in_features {k} must be a multiple of group_size {group_size}")
    g = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        s = g.abs().amax(-1, keepdim=True) / 7
        m = -8 * s
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        s, m = (hi - lo) / 15, lo
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round((g - m) / safe), torch.zeros_like(g)).clamp(0, 15)
    return QuantizedWeight("int4", int4_pack(q.reshape(n, k)), s.reshape(n, -1).contiguous(),
                           m.reshape(n, -1).contiguous(), group_size=group_size, dtype=w.dtype)


def quantize_int8(w, block_size=None):
    """Round-to-nearest symmetric int8: s = max|w| / 127 per output channel (block_size None) or per block of
    32 input features; q = round(w / s) in [-127, 127]. |w - s q| <= s/2 (plus float32 rounding)."""
    _check_weight(w)
    n, k = w.shape
    if block_size not in INT8_BLOCK_SIZES:
        raise ValueError(f"int8 block_size must be None (per output channel) or 32, got {block_size}")
    if block_size and k % block_size:
        raise ValueError(f"int8: in_features {k} must be a multiple of block_size {block_size}")
    g = w.detach().to(torch.float32).reshape(n, k // block_size if block_size else 1, -1)
    s = g.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(g / safe).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q.reshape(n, k), s.reshape(n, -1).contiguous(), group_size=block_size, dtype=w.dtype)


# ---------------------------------------------------------------- lossless converters
# from_gguf keeps every GGUF block type in its blocks, a QuantizedWeight of that format: the GGML types of
# kernels/ggml.py have kernels of their own; Q8_0 runs the int8 kernels, converted when prepacked (q8_0_to_int8:
# d stays float16, the products d q are exact in float32, so dequantizing gives the very values ggml computes).
GGUF_TYPES = ("Q8_0", *ggml.BLOCK_TYPES)  # the block types from_gguf keeps quantized


def _gguf_type_name(ggml_type):
    name = getattr(ggml_type, "name", ggml_type)
    if name not in GGUF_TYPES:
        raise ValueError(f"ggml_type must be one of {sorted(GGUF_TYPES)}, got {ggml_type!r}")
    return name


def from_gguf(raw, ggml_type, shape, dtype=torch.float32):
    """A GGUF tensor's raw block bytes (a type of GGUF_TYPES) -> QuantizedWeight of that format, shape (N, K) =
    `shape` (GGUF lists dims innermost first: pass (ne[1], ne[0])), over the very bytes (no copy where raw is a
    writable array or tensor). raw: bytes, a uint8 numpy array or tensor."""
    name = _gguf_type_name(ggml_type)
    n, k = (int(d) for d in shape)
    block, bb = (32, _Q8_0.block_bytes) if name == "Q8_0" else (ggml.BLOCK_TYPES[name].block,
                                                                 ggml.BLOCK_TYPES[name].block_bytes)
    if k % block:
        raise ValueError(f"GGUF {name}: in_features {k} must be a multiple of the block size {block}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).view(np.uint8)
        raw = torch.from_numpy(raw if raw.flags.writeable else raw.copy())  # (e.g. a read-only GGUF memmap)
    if raw.numel() != n * k // block * bb:
        raise ValueError(f"GGUF {name} tensor of shape ({n}, {k}) needs {n * k // block * bb} bytes, got {raw.numel()}")
    blocks = raw.reshape(-1).view(torch.uint8).reshape(n, -1)
    return QuantizedWeight(name, blocks, group_size=32 if name == "Q8_0" else None, dtype=dtype)


def q8_0_to_int8(w):
    """A Q8_0 QuantizedWeight as the int8 one (block scales of 32, float16) of the same values."""
    (n, k), blocks = w.shape, w.qweight.reshape(-1, _Q8_0.block_bytes)
    d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(n, k // 32)
    q = blocks[:, 2:].contiguous().view(torch.int8).reshape(n, k)
    return QuantizedWeight("int8", q, d, group_size=32, dtype=w.dtype)


# AWQ / GPTQ checkpoints store W^T (in_features K, out_features N) as 4-bit codes in int32 words, with fp16
# scales s and 4-bit zero points z per group: w = (q - z) s. Ours: s, m = -z s (exact in float32), so the
# dequantized values equal theirs exactly (in float32; theirs in fp16 are the same values rounded once).
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + _AWQ_ORDER[i]


def _nibbles(words):
    """int32 (..., C) -> int64 (..., C, 8): nibble i = bits 4i..4i+3."""
    shifts = torch.arange(0, 32, 4, device=words.device)
    return (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF


def _unpack_awq_cols(words):
    """int32 (R, N//8) in AWQ order -> codes (R, N)."""
    nib = _nibbles(words)
    cols = torch.empty_like(nib)
    cols[..., list(_AWQ_ORDER)] = nib
    return cols.reshape(words.shape[0], -1)


def _from_zero_point(codes_kn, zeros, scales, dtype):
    """codes (K, N), zero points (K//g, N), fp16 scales (K//g, N) -> int4 QuantizedWeight of W (N, K)."""
    k, n = codes_kn.shape
    if scales.dim() != 2 or scales.shape[1] != n or k % scales.shape[0]:
        raise ValueError(f"scales must be (K // group_size, N) = (K // g, {n}) with K = {k}, got "
                         f"{tuple(scales.shape)}")
    g = k // scales.shape[0]
    if g not in INT4_GROUP_SIZES:
        raise ValueError(f"group size {g} (K {k} / {scales.shape[0]} scale rows) is not one of {INT4_GROUP_SIZES}")
    if tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"qzeros unpack to {tuple(zeros.shape)}, expected {tuple(scales.shape)}")
    s = scales.to(torch.float32)
    m = -zeros.to(torch.float32) * s
    return QuantizedWeight("int4", int4_pack(codes_kn.t()), s.t().contiguous(), m.t().contiguous(), group_size=g,
                           dtype=dtype)


def _check_int32(t, name):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
        raise TypeError(f"{name} must be a 2-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)} "
                        f"{tuple(getattr(t, 'shape', ()))}")


def from_awq(qweight, qzeros, scales, dtype=torch.float16):
    """AWQ (GEMM format) 4-bit tensors -> int4 QuantizedWeight.
    qweight int32 (K, N//8) and qzeros int32 (K//g, N//8), nibbles in AWQ order [0,2,4,6,1,3,5,7];
    scales fp16 (K//g, N); w[k, n] = (q[k, n] - z[k//g, n]) * s[k//g, n]."""
    _check_int32(qweight, "qweight")
    _check_int32(qzeros, "qzeros")
    return _from_zero_point(_unpack_awq_cols(qweight), _unpack_awq_cols(qzeros), scales, dtype)


def from_gptq(qweight, qzeros, scales, g_idx=None, zero_plus_one=True, dtype=torch.float16):
    """GPTQ 4-bit tensors -> int4 QuantizedWeight.
    qweight int32 (K//8, N): nibble j of word (i, n) is q[8i + j, n]; qzeros int32 (K//g, N//8): nibble j of
    word (r, c) is the stored zero of column 8c + j; scales fp16 (K//g, N).
    zero_plus_one=True is the convention of AutoGPTQ's original checkpoints (checkpoint_format "gptq"):
    z = stored + 1, w = (q - z) s. Pass False for "gptq_v2" checkpoints, which store z itself.
    g_idx (K,) must be the trivial k // g: act-order (desc_act) checkpoints are refused."""
    _check_int32(qweight, "qweight")
    _check_int32(qzeros, "qzeros")
    k8, n = qweight.shape
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(k8 * 8, n)
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + (1 if zero_plus_one else 0)
    if g_idx is not None:
        g = codes.shape[0] // max(scales.shape[0], 1)
        trivial = torch.arange(codes.shape[0], device=g_idx.device) // g
        if g_idx.shape != trivial.shape or not torch.equal(g_idx.to(torch.int64), trivial):
            raise ValueError("g_idx is not k // group_size: act-order (desc_act=True) GPTQ checkpoints are not "
                             "supported; re-quantize without act-order")
    return _from_zero_point(codes, zeros, scales, dtype)
