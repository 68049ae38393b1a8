"""flashgen kernels inside Hugging Face models (transformers is optional: imported only when asked for).

    from flashgen.integrations import apply_flashgen
    model = AutoModelForCausalLM.from_pretrained(...)
    apply_flashgen(model, verify=True)            # attention "fg_attention" and fused RMSNorm on this instance
    ...train as usual...
    unapply_flashgen(model)

QLoRA over flashgen's quantized linears (peft optional): `quantize_model(model, "int4", skip=["lm_head"])`,
then `get_qlora_model(model, peft.LoraConfig(...))`.

Or only the attention: `register_attention()`, then `attn_implementation="fg_attention"` in from_pretrained.
"""
from .hf_attention import ATTENTION_NAME, fg_attention, register_attention  # noqa: F401
from .hf_patch import apply_flashgen, unapply_flashgen  # noqa: F401
from .qlora import get_qlora_model, register_qlora  # noqa: F401
