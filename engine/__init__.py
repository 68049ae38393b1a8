"""flashgen.engine: checkpoints (HF folders, GGUF files) -> one decoder with a static KV cache; generation."""
