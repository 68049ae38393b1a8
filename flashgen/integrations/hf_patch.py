"""apply_flashgen / unapply_flashgen: flashgen kernels in one Hugging Face model instance.

Only the instance changes (its config's attention implementation and its modules' forward); the
transformers classes stay as they are, so other models in the process are untouched and unapply_flashgen
restores the model exactly. Supported: Llama, Mistral, Qwen2, Qwen3 and Phi-3 (their RMSNorm is
y = weight * (x / rms(x)).to(x.dtype)) and Gemma's (1 + weight) form, mapped to the fused kernel's
weight_offset. The fused kernel rounds once, after the weight, where transformers rounds before it: equal in
float32, and the more exact of the two in 16-bit. The gated MLPs with a SiLU gate (Llama's gate_proj / up_proj,
Phi-3's fused gate_up_proj) run silu_mul, which saves only its two inputs for the backward. In training, a
forward given labels computes transformers' causal-LM loss (shifted labels, ignore_index -100, mean, or sum
over num_items_in_batch) with the fused linear cross-entropy and returns logits=None: the (tokens, vocab)
logits are never formed. In eval, or without labels, the model's own forward runs. rope: the attention
modules of Llama, Mistral, Qwen2 and Qwen3 (separate q / k / v projections) run the same steps as
transformers' forward, with apply_rotary on the (batch, seqlen, heads, head_dim) projections in place of
rotate_half; Phi-3 and Gemma keep their own.
"""
import inspect
import sys
import types

import torch

from flashgen.kernels import apply_rotary, linear_cross_entropy, silu_mul
from flashgen.kernels import rms_norm as fused_rms_norm

from . import recompute
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
    args = (hidden_states, self.weight, getattr(self, eps_name), None, offset)
    return recompute.register(fused_rms_norm(*args), fused_rms_norm, *args)


def _gating(gate, up):
    return recompute.register(silu_mul(gate, up), silu_mul, gate, up)


def _gated_forward(self, x):
    return self.down_proj(_gating(self.gate_proj(x), self.up_proj(x)))


def _fused_gated_forward(self, x):
    # contiguous halves: silu_mul saves these very tensors, so the recipe holds nothing more
    gate, up = (t.contiguous() for t in self.gate_up_proj(x).chunk(2, dim=-1))
    return self.down_proj(_gating(gate, up))


def _layer_forward(self, *args, **kwargs):
    """A decoder layer's forward with its norms, gating and padded attention output recomputed in the backward
    (integrations/recompute.py); as it was under gradient checkpointing (which recomputes everything), in eval
    and inside torch.compile."""
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()) or getattr(self, "gradient_checkpointing", False) or \
            torch.compiler.is_compiling():
        return forward(self, *args, **kwargs)
    with recompute.recomputing():
        return forward(self, *args, **kwargs)


def _is_silu(fn):
    return type(fn).__name__ in ("SiLU", "SiLUActivation")


def _mlp_forward(module):
    """The silu_mul forward for a gated SiLU MLP module, or None for any other module."""
    if _is_silu(getattr(module, "act_fn", None)) and all(hasattr(module, n) for n in ("gate_proj", "up_proj",
                                                                                        "down_proj")):
        return _gated_forward
    if _is_silu(getattr(module, "activation_fn", None)) and hasattr(module, "gate_up_proj"):
        return _fused_gated_forward
    return None


_ROPE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def _rope_attention_forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    cos, sin = position_embeddings
    q, k = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
    if hasattr(self, "q_norm"):  # Qwen3
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    # Qwen2 / Qwen3 keep their window per layer; Mistral reads its config's
    window = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
    out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, sliding_window=window, **kwargs)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _causal_lm_forward(self, *args, **kwargs):
    original = type(self).forward
    arguments = inspect.signature(original).bind(self, *args, **kwargs).arguments
    extra = arguments.pop("kwargs", {})
    labels, head = arguments.pop("labels", None), self.lm_head
    if labels is None or not self.training or head.weight.dtype != next(self.model.parameters()).dtype:
        return original(self, *args, **kwargs)
    del arguments["self"]
    arguments.pop("logits_to_keep", None)
    shift_labels, num_items = extra.pop("shift_labels", None), extra.get("num_items_in_batch")
    outputs = self.model(**arguments, **extra)
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    hidden = outputs.last_hidden_state
    loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias,
                                reduction="mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def apply_flashgen(model, attention=True, rms_norm=True, swiglu=True, rope=True, fused_linear_cross_entropy=True,
                   recompute_activations=True, verify=False):
    """Patch `model` (a transformers PreTrainedModel) in place; returns it.

    attention: attn_implementation "fg_attention" (integrations/hf_attention.py). rms_norm: every RMSNorm
    module runs the fused kernel. swiglu: every gated SiLU MLP runs silu_mul. rope: the rotary embedding of the
    attention modules runs apply_rotary (see the module docstring). fused_linear_cross_entropy: the training
    loss without logits (see the module docstring). verify: check each patched part
    against the original on a small random input now (a mismatch undoes the patch and raises). The model's
    other modules are left as they are.
    """
    require_transformers()
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"apply_flashgen supports model types {list(SUPPORTED)}, got {model_type!r}")
    if getattr(model, "_flashgen_patched", None) is not None:
        raise ValueError("apply_flashgen: this model is already patched (unapply_flashgen first)")
    forwards = []  # (name, module, new forward)
    for name, module in model.named_modules():
        if rms_norm and type(module).__name__ in _NORMS:
            forwards.append((name, module, _rms_forward))
        elif swiglu and (fn := _mlp_forward(module)) is not None:
            forwards.append((name, module, fn))
        elif rope and type(module).__name__ in _ROPE_ATTENTION:
            forwards.append((name, module, _rope_attention_forward))
        elif recompute_activations and type(module).__name__.endswith("DecoderLayer"):
            forwards.append((name, module, _layer_forward))
    if fused_linear_cross_entropy:
        if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear) or not hasattr(model, "model"):
            raise ValueError(f"fused_linear_cross_entropy needs a causal LM with lm_head and model (got "
                             f"{type(model).__name__}); pass fused_linear_cross_entropy=False")
        forwards.append(("", model, _causal_lm_forward))
    if verify:
        for name, module, fn in forwards:
            # the attention and layer forwards are checked with the whole model below
            if module is not model and fn not in (_rope_attention_forward, _layer_forward):
                _verify_module(name, module, fn)
    reference = _sample_logits(model) if verify else None
    patched = {"attention": None, "modules": [m for _, m, _ in forwards]}
    if attention:
        register_attention()
        patched["attention"] = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
    for _, module, fn in forwards:
        module.forward = types.MethodType(fn, module)
    model._flashgen_patched = patched
    if reference is not None:
        _verify_logits(model, reference)
    return model


def unapply_flashgen(model):
    """Undo apply_flashgen on `model`; returns it."""
    patched = getattr(model, "_flashgen_patched", None)
    if patched is None:
        raise ValueError("unapply_flashgen: this model is not patched")
    for module in patched["modules"]:
        del module.forward  # the instance attribute: the class's forward shows again
    if patched["attention"] is not None:
        model.set_attn_implementation(patched["attention"])
    del model._flashgen_patched
    return model


def _tolerance(dtype):
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, 1e-4)


def _verify_module(name, module, forward):
    weight = next(module.parameters())
    hidden = weight.shape[-1] if type(module).__name__ in _NORMS else weight.shape[1]
    x = torch.randn(2, 5, hidden, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        expected, got = type(module).forward(module, x), forward(module, x)
    tol = _tolerance(x.dtype) * (1 + float(expected.abs().max()))
    if got.dtype != expected.dtype or not torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol):
        raise RuntimeError(f"apply_flashgen(verify=True): the fused forward of {name} ({type(module).__name__}) "
                           f"differs from the original; nothing was patched")


def _run(model, ids, mask):
    """(logits in eval mode, the training loss with labels) of the model on one padded batch."""
    labels = ids.masked_fill(mask == 0, -100)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()
            logits = model(input_ids=ids, attention_mask=mask).logits
            model.train()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    finally:
        model.train(training)
    return logits, loss


def _sample_logits(model):
    """(input ids, attention mask, logits, loss) of the unpatched model on a small padded batch."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row: the padded path too
    return (ids, mask, *_run(model, ids, mask))


def _verify_logits(model, reference):
    ids, mask, expected, expected_loss = reference
    got, loss = _run(model, ids, mask)
    valid = mask.bool()
    tol = _tolerance(expected.dtype)
    scale = expected[valid].abs().max().clamp(min=1)
    problems = []
    if not torch.allclose(got[valid], expected[valid], rtol=tol, atol=tol * scale):
        problems.append(f"logits by {float((got[valid] - expected[valid]).abs().max()):.3g}")
    if not torch.allclose(loss.float(), expected_loss.float(), rtol=tol, atol=tol):
        problems.append(f"the loss, {float(loss):.6g} against {float(expected_loss):.6g}")
    if problems:
        unapply_flashgen(model)
        raise RuntimeError(f"apply_flashgen(verify=True): the patched model differs from the original in "
                           f"{' and '.join(problems)}; the patch was undone")
