"""The C++ forward over the KV cache for a Transformer on the CPU (torch.classes.flashgen.CpuDecoder,
csrc/cpu/decoder.cpp).

A batch-1 decode step of a small model is a few hundred tiny kernels; called one by one from Python their
dispatch costs more than their work. The C++ step computes the same layers (see Transformer's docstring) in
one call, on the model's own weights and KV cache buffers (shared, not copied); a prompt goes through it at
once too (its activation and rope fused, no Python per layer).

`build(model)` returns forward(tokens, cu_seqlens_q, cache_seqlens, block_table, logit_rows) -> logits, the
C++ Transformer.forward_packed (see CpuDecoder::forward), or None when the model is outside what the C++ step
computes: not float32 on the CPU, or a linear that is neither a float32 nn.Linear nor a CPU QuantizedLinear
(or a stack of them). forward_packed falls back to its Python layers then.
"""
import math

import torch
from torch import nn

from flashgen.kernels.qlinear import QuantizedEmbedding, QuantizedLinear, StackedLinear

_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_NONE = torch.empty(0)


def _linear(module):
    if isinstance(module, StackedLinear):
        parts = [_linear(m) for m in module.parts]
        if any(p is None for p in parts):
            return None
        for p in parts[1:]:
            parts[0].stack(p)
        if module.bias is not None:
            parts[0].set_bias(module.bias)
        return parts[0]
    if isinstance(module, QuantizedLinear):
        w = module.weight
        if w.device.type != "cpu":
            return None
        kind, param = w.format.cpu_linear(w, module.mode)
        return torch.classes.flashgen.CpuLinear(kind, list(w.packed()), module.bias, w.in_features, w.out_features,
                                                param)
    if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32 and module.weight.is_cpu:
        return torch.classes.flashgen.CpuLinear("float", [module.weight.contiguous()], module.bias,
                                                module.in_features, module.out_features, 0)
    return None


def _norm(norm):
    return norm.weight, norm.bias if norm.bias is not None else _NONE


def build(model):
    c, cache = model.config, model.cache
    emb, table = model.tok_embeddings.weight, None
    if cache is None or emb.dtype != torch.float32 or emb.device.type != "cpu":
        return None
    if isinstance(model.tok_embeddings, QuantizedEmbedding):  # rows dequantized in C++ as they are looked up
        emb, table = _NONE, _linear(QuantizedLinear(emb))
    linears = [[_linear(m) for m in (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out)] for b in model.layers]
    head = _linear(model.output)
    if head is None or any(lin is None for layer in linears for lin in layer):
        return None
    dims = {"hidden": c.hidden_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "rotary_dim": 0 if c.learned_positions else c.rotary_dim, "intermediate": c.intermediate_size,
            "vocab": c.vocab_size, "window_left": model.layers[0].attn.window[0],
            "gated": int(c.mlp == "swiglu"), "activation": _ACTIVATIONS[c.activation]}
    floats = {"eps": float(c.norm_eps), "scale": 1.0 / math.sqrt(c.head_dim)}
    pos = model.pos_embeddings.weight if model.pos_embeddings is not None else _NONE
    inv_freq = model.inv_freq if model.inv_freq is not None else _NONE
    decoder = torch.classes.flashgen.CpuDecoder(dims, floats, emb, pos, inv_freq, cache.k, cache.v)
    for block, (qkv, o, w_in, w_out) in zip(model.layers, linears):
        attn = block.attn
        qk = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (_NONE, _NONE)
        decoder.add_layer(*_norm(block.attn_norm), *_norm(block.mlp_norm), *qk, qkv, o, w_in, w_out)
    decoder.set_head(*_norm(model.norm), head)
    if table is not None:
        decoder.set_token_table(table)
    return decoder.forward
