"""The optional transformers import, with a clear error when it is missing."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("flashgen.integrations needs transformers: pip install transformers") from None
    return transformers
