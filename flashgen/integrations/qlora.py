"""QLoRA on flashgen's quantized linears: frozen int4 / int8 / GGML weights, trainable LoRA adapters (PEFT).

    from flashgen.kernels import quantize_model
    from flashgen.integrations import get_qlora_model
    quantize_model(model, "int4", skip=["lm_head"])
    model = get_qlora_model(model, peft.LoraConfig(r=16, target_modules="all-linear"))

Each adapted layer computes y = x W^T + bias + s * B(A(dropout(x))) with W the frozen dequantized weight and
s = lora_alpha / r (or / sqrt(r) with rslora). The base layer runs in QuantizedLinear's exact mode, so its
forward is the float product the backward differentiates (the inference kernels round activations to int8,
which a gradient step would not see). Only A and B train; the codes and scales stay bitwise as they were.
"""
import functools

from flashgen.kernels.qlinear import QuantizedLinear


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("flashgen.integrations.qlora needs peft: pip install peft") from None
    return peft


@functools.cache
def _lora_class():
    """The PEFT LoRA layer over a QuantizedLinear (defined on first use: peft is optional)."""
    from peft.tuners.lora.layer import LoraLayer
    from torch import nn

    class LoraQuantizedLinear(nn.Module, LoraLayer):
        """LoRA adapters over a frozen QuantizedLinear (PEFT's custom-module protocol)."""

        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            if config.use_dora:
                raise ValueError("LoRA over a flashgen QuantizedLinear does not support DoRA (use_dora=True)")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.get_base_layer().exact = True
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                update = lora_b(lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))))
                result = result + (update * self.scaling[name]).to(result.dtype)
            return result

        def merge(self, safe_merge=False, adapter_names=None):
            raise NotImplementedError("LoRA adapters cannot merge into quantized codes: merge into the float model "
                                      "(dequantize it first) or keep the adapters separate")

        def unmerge(self):
            raise NotImplementedError("LoRA adapters over a QuantizedLinear are never merged")

        def __repr__(self):
            return "lora." + super().__repr__()

    return LoraQuantizedLinear


def register_qlora(lora_config):
    """Teach `lora_config` (a peft.LoraConfig) to adapt flashgen QuantizedLinear layers; returns it."""
    _require_peft()
    lora_config._register_custom_module({QuantizedLinear: _lora_class()})
    return lora_config


def get_qlora_model(model, lora_config, **kwargs):
    """peft.get_peft_model over a model whose linears are flashgen QuantizedLinear (quantize_model, or the
    engine's loader): LoRA layers on the targeted ones, every base weight frozen.

    target_modules="all-linear" means every QuantizedLinear but the output head (PEFT's own "all-linear" looks
    for nn.Linear only)."""
    peft = _require_peft()
    if lora_config.target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        lora_config.target_modules = {name.rpartition(".")[2] for name, m in model.named_modules()
                                      if isinstance(m, QuantizedLinear) and m is not head}
        if not lora_config.target_modules:
            raise ValueError("target_modules='all-linear' found no flashgen QuantizedLinear in the model (besides "
                             "the output head): quantize it first, e.g. flashgen.kernels.quantize_model(model, "
                             "'int4', skip=['lm_head'])")
    return peft.get_peft_model(model, register_qlora(lora_config), **kwargs)
