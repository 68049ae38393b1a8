"""flashgen: fused attention, norm and quantized-matmul kernels, and a small LLM inference engine."""
__version__ = "0.1.0"

from flashgen import kernels  # noqa: E402,F401


def __getattr__(name):
    # The engine pulls in tokenizers and checkpoint readers: load it only when asked for.
    if name == "LLM":
        from flashgen.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'flashgen' has no attribute {name!r}")
