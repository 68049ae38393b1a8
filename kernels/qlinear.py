"""Quantized linear layers: functions over QuantizedWeight, the QuantizedLinear module and quantize_model.

Every function computes y = x W^T + bias with W the dequantized weight (N, K); x (..., K) in float32, bfloat16
or float16, y (..., N) in x's dtype. The gradient flows to x (dy W) and to bias; the weight takes none.
How each device computes it (exact float, or int8 activations) is documented on the op's kernels:
kernels/reference.py and csrc/cpu/quant_linear.cpp.
"""
import fnmatch
import logging

import torch
from torch import nn

from .quant import QuantizedWeight, quantize_int4, quantize_int8

log = logging.getLogger("flashgen")


def _weight(qweight, fmt):
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
    if fmt not in ("ggml", qweight.format.name) or (fmt == "ggml" and qweight.format.name in ("int4", "int8")):
        raise ValueError(f"expected a {fmt} QuantizedWeight, got format {qweight.format.name}")
    return qweight


def int4_linear(x, qweight, bias=None):
    """y = x W^T + bias for an int4 QuantizedWeight W (weight-only). On the CPU, x is rounded to int8 per block of
    32 features first, like llama.cpp's Q8_0 activations (the error bound is in csrc/cpu/quant_linear.cpp); the
    reference and the GPU kernels keep x in float."""
    w = _weight(qweight, "int4")
    return w.format.linear(x, w, bias, "int4")


def int8_linear(x, qweight, bias=None):
    """y = x W^T + bias for an int8 QuantizedWeight W (weight-only; on the CPU x is rounded to int8 per block of 32
    features, as for int4_linear)."""
    w = _weight(qweight, "int8")
    return w.format.linear(x, w, bias, "int8")


def int8_linear_dynamic(x, qweight, bias=None):
    """W8A8: x is quantized per token to symmetric int8 (scale max|x|/127), the products accumulate in int32,
    y = sx * sum_b sw_b * acc_b + bias. The gradient wrt x treats the activation rounding as identity."""
    w = _weight(qweight, "int8")
    return w.format.linear(x, w, bias, "int8_dynamic")


def ggml_linear(x, qweight, bias=None):
    """y = x W^T + bias for a QuantizedWeight W in a GGML block format (Q4_K, Q6_K, ...: kernels/ggml.py). On the
    CPU x is rounded to int8 per super-block of the type (256 features for K-quants and IQ4_XS, as llama.cpp's
    Q8_K; 32 for Q5_0 / Q5_1 / IQ4_NL), otherwise as for int4_linear."""
    w = _weight(qweight, "ggml")
    return w.format.linear(x, w, bias, w.format.name)


def _quant_buffers(w):
    """A QuantizedWeight's canonical tensors by buffer name: qweight (or its stacked parts qweight_0, qweight_1, ...
    of file blocks, see QuantizedWeight.qweight), scales, offsets."""
    parts = w.qweight_parts
    codes = {"qweight": parts[0]} if len(parts) == 1 else {f"qweight_{i}": t for i, t in enumerate(parts)}
    return {**codes, "scales": w.scales, "offsets": w.offsets}


class _ExactLinear(torch.autograd.Function):
    """y = x W^T + bias with W dequantized to x's dtype (exact for float32 and float64 x), and dx = dy W with the
    same W: forward and backward agree, as training needs. W is dequantized again in the backward rather than
    saved, so a step holds the codes and one layer's float W at a time (QLoRA's memory)."""

    @staticmethod
    def forward(ctx, x, bias, qweight):
        ctx.qweight, ctx.bias_dtype = qweight, None if bias is None else bias.dtype
        return nn.functional.linear(x, qweight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        dx = dy @ ctx.qweight.dequantize(dy.dtype) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return dx, dbias, None


class _FrozenQuantized(nn.Module):
    """A module over a frozen QuantizedWeight `self.weight`, whose canonical tensors are the module's buffers
    `qweight`, `scales`, `offsets` (so `.to`, accelerate and PEFT see them; not persistent: the state dict
    keeps the self-describing `weight.*` form of QuantizedWeight.state_dict).

    `.to(device)` moves them; dtype conversions leave them alone (a `.half()` must not round float32 scales).
    Assigning `weight` sets the buffers; replacing a buffer (a device move) rebuilds `weight` from them, so its
    prepacked layout is rebuilt on the new device on first use.
    """

    @property
    def weight(self):
        w = self._qweight
        names = _quant_buffers(w)
        if any(t is not self._buffers[name] for name, t in names.items()):
            parts = [self._buffers[name] for name in names if name.startswith("qweight")]
            w = QuantizedWeight(w.format, parts if len(parts) > 1 else parts[0], self._buffers["scales"],
                                self._buffers["offsets"], group_size=w.group_size, shape=w.shape, dtype=w.dtype)
            self._qweight = w
        return w

    @weight.setter
    def weight(self, w):
        if not isinstance(w, QuantizedWeight):
            raise TypeError(f"weight must be a QuantizedWeight, got {type(w).__name__}")
        for name in _quant_buffers(self._qweight) if "_qweight" in self.__dict__ else ():
            del self._buffers[name]
        self._qweight = w
        for name, t in _quant_buffers(w).items():
            self.register_buffer(name, t, persistent=False)

    def _apply(self, fn, recurse=True):
        # fn converts a tensor (device and/or dtype); only its device applies to the codes and scales.
        weight = self.weight  # rebuilt from the buffers if they were replaced
        device = fn(torch.empty(0, device=weight.device)).device
        frozen = {name: self._buffers.pop(name) for name in _quant_buffers(weight)}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update({name: None if t is None else t.to(device) for name, t in frozen.items()})
        return self


class QuantizedLinear(_FrozenQuantized):
    """Drop-in for nn.Linear over a frozen QuantizedWeight. mode: one of the weight format's modes: "int4";
    "int8" or "int8_dynamic" (W8A8); a GGML block type's name.

    exact=False runs the mode's kernel (on the CPU, activations rounded to int8 per block; the backward is the
    float dy W). exact=True computes in float with the dequantized weight, forward and backward alike: the
    training mode (QLoRA, flashgen.integrations.qlora), slower, the weight still frozen.

    The weight is prepacked for its device on first use; `.to(device)` moves it (dtype conversions leave the
    codes and scales alone and apply to the bias only). The state dict holds the canonical tensors.
    """

    def __init__(self, weight: QuantizedWeight, bias=None, mode=None, exact=False):
        super().__init__()
        modes = weight.format.modes
        mode = mode or modes[0]
        if mode not in modes:
            raise ValueError(f"mode {mode!r} does not fit a {weight.format.name} weight (one of {modes})")
        self.weight, self.mode, self.exact = weight, mode, exact
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode="int8", group_size=32, symmetric=False, block_size=None):
        if mode == "int4":
            w = quantize_int4(linear.weight, group_size=group_size, symmetric=symmetric)
        elif mode in ("int8", "int8_dynamic"):
            w = quantize_int8(linear.weight, block_size=block_size)
        else:
            raise ValueError(f"mode must be 'int4', 'int8' or 'int8_dynamic', got {mode!r}")
        return cls(w.to(linear.weight.device), linear.bias, mode)

    def forward(self, x):
        if self.exact:
            return _ExactLinear.apply(x, self.bias, self.weight)
        return self.weight.format.linear(x, self.weight, self.bias, self.mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.weight.state_dict(prefix + "weight."))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [k for k in state_dict if k.startswith(prefix + "weight.")]
        if keys:
            self.weight = QuantizedWeight.from_state_dict(state_dict, prefix + "weight.").to(self.weight.device)
        elif strict:
            missing_keys.append(prefix + "weight.qmeta")
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, group_size={self.weight.group_size}, exact={self.exact}")


class QuantizedEmbedding(_FrozenQuantized):
    """nn.Embedding over a frozen QuantizedWeight (num_embeddings, embedding_dim): the rows looked up are
    dequantized, the table stays quantized (a 1B model's Q4_K token table is 58 MB, in float32 400 MB)."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids):
        return self.weight.rows(ids.reshape(-1)).dequantize().reshape(*ids.shape, self.embedding_dim)


class StackedLinear(nn.Module):
    """Linears of different weight formats stacked along the outputs: y = cat_i(x W_i^T) + bias.

    A fused projection whose checkpoint tensors differ in format (a Q4_K_M file's Q4_K q and k with a Q6_K v)
    stays quantized this way instead of falling back to float. parts: QuantizedWeights or float (N_i, K) tensors.
    """

    def __init__(self, parts, bias=None):
        super().__init__()
        self.parts = nn.ModuleList(
            QuantizedLinear(p) if isinstance(p, QuantizedWeight) else nn.Linear(p.shape[1], p.shape[0], bias=False)
            for p in parts)
        for module, p in zip(self.parts, parts):
            if isinstance(p, torch.Tensor):
                module.weight = nn.Parameter(p, requires_grad=False)
        self.in_features = self.parts[0].in_features
        if any(m.in_features != self.in_features for m in self.parts):
            raise ValueError("StackedLinear: every part must have the same in_features")
        self.out_features = sum(m.out_features for m in self.parts)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x):
        y = torch.cat([m(x) for m in self.parts], dim=-1)
        return y + self.bias if self.bias is not None else y


def quantize_model(model: nn.Module, mode="int8", group_size=32, skip=(), symmetric=False, block_size=None):
    """Replace every nn.Linear of `model` (in place) by a QuantizedLinear; returns the model.

    mode: "int4" (group_size 32/64/128, symmetric or not), "int8" (block_size None or 32) or "int8_dynamic".
    skip: module names or fnmatch patterns (e.g. "lm_head", "*.gate") left in float. An int4 layer whose
    in_features is not a multiple of group_size is left in float too, with a warning.
    """
    if mode not in ("int4", "int8", "int8_dynamic"):
        raise ValueError(f"mode must be 'int4', 'int8' or 'int8_dynamic', got {mode!r}")
    skip = [skip] if isinstance(skip, str) else list(skip)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and not any(name == p or fnmatch.fnmatchcase(name, p) for p in skip)]
    for name, linear in targets:
        if mode == "int4" and linear.in_features % group_size:
            log.warning("quantize_model: %s kept in float (in_features %d not a multiple of group_size %d)",
                        name, linear.in_features, group_size)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(linear, mode, group_size, symmetric, block_size))
    return model
