"""apply_flashgen / unapply_flashgen: flashgen kernels in one Hugging Face model instance.

Only the instance changes (its config's attention implementation and its norm modules' forward); the
transformers classes stay as they are, so other models in the process are untouched and unapply_flashgen
restores the model exactly. Supported: Llama, Mistral, Qwen2, Qwen3 and Phi-3 (their RMSNorm is
y = weight * (x / rms(x)).to(x.dtype)) and Gemma's (1 + weight) form, mapped to the fused kernel's
weight_offset. The fused kernel rounds once, after the weight, where transformers rounds before it: equal in
float32, and the more exact of the two in 16-bit.
"""
import types

import torch

from flashgen.kernels import rms_norm as fused_rms_norm

from ._transformers import require_transformers
from .hf_attention import ATTENTION_NAME, register_attention

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# RMSNorm classes by how they read: (epsilon attribute, weight offset)
_NORMS = {"LlamaRMSNorm": ("variance_epsilon", False), "MistralRMSNorm": ("variance_epsilon", False),
          "Qwen2RMSNorm": ("variance_epsilon", False), "Qwen3RMSNorm": ("variance_epsilon", False),
          "Phi3RMSNorm": ("variance_epsilon", False), "GemmaRMSNorm": ("eps", True)}


def _rms_forward(self, hidden_states):
    eps_name, offset = _NORMS[type(self).__name__]
    if self.weight.dtype != hidden_states.dtype:  # mixed dtypes: transformers' own promotion rules
        return type(self).forward(self, hidden_states)
    return fused_rms_norm(hidden_states, self.weight, getattr(self, eps_name), weight_offset=offset)


def apply_flashgen(model, attention=True, rms_norm=True, verify=False):
    """Patch `model` (a transformers PreTrainedModel) in place; returns it.

    attention: attn_implementation "fg_attention" (integrations/hf_attention.py). rms_norm: every RMSNorm
    module runs the fused kernel. verify: check each patched part against the original on a small random
    input now (a mismatch undoes the patch and raises). The model's other modules are left as they are.
    """
    require_transformers()
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"apply_flashgen supports model types {list(SUPPORTED)}, got {model_type!r}")
    if getattr(model, "_flashgen_patched", None) is not None:
        raise ValueError("apply_flashgen: this model is already patched (unapply_flashgen first)")
    norms = [(n, m) for n, m in model.named_modules() if type(m).__name__ in _NORMS] if rms_norm else []
    if verify:
        for name, module in norms:
            _verify_norm(name, module)
    reference = _sample_logits(model) if verify else None
    patched = {"attention": None, "norms": [m for _, m in norms]}
    if attention:
        register_attention()
        patched["attention"] = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
    for _, module in norms:
        module.forward = types.MethodType(_rms_forward, module)
    model._flashgen_patched = patched
    if reference is not None:
        _verify_logits(model, reference)
    return model


def unapply_flashgen(model):
    """Undo apply_flashgen on `model`; returns it."""
    patched = getattr(model, "_flashgen_patched", None)
    if patched is None:
        raise ValueError("unapply_flashgen: this model is not patched")
    for module in patched["norms"]:
        del module.forward  # the instance attribute: the class's forward shows again
    if patched["attention"] is not None:
        model.set_attn_implementation(patched["attention"])
    del model._flashgen_patched
    return model


def _tolerance(dtype):
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, 1e-4)


def _verify_norm(name, module):
    weight = module.weight
    x = torch.randn(2, 5, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        expected, got = type(module).forward(module, x), _rms_forward(module, x)
    if got.dtype != expected.dtype or not torch.allclose(got.float(), expected.float(), rtol=_tolerance(x.dtype),
                                                         atol=_tolerance(x.dtype)):
        raise RuntimeError(f"apply_flashgen(verify=True): the fused RMSNorm differs from {name} "
                           f"({type(module).__name__}); nothing was patched")


def _sample_logits(model):
    """(input ids, attention mask, logits) of the unpatched model on a small padded batch."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row: the padded path too
    with torch.no_grad():
        return ids, mask, model(input_ids=ids, attention_mask=mask).logits


def _verify_logits(model, reference):
    ids, mask, expected = reference
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    tol = _tolerance(expected.dtype)
    scale = expected[valid].abs().max().clamp(min=1)
    if not torch.allclose(got[valid], expected[valid], rtol=tol, atol=tol * scale):
        err = (got[valid] - expected[valid]).abs().max()
        unapply_flashgen(model)
        raise RuntimeError(f"apply_flashgen(verify=True): the patched model's logits differ from the original's "
                           f"by {float(err):.3g}; the patch was undone")
