"""Shared set-up for the Triton tests that run under TRITON_INTERPRET=1 on CPU tensors.

Import this module before anything imports triton: the interpreter is chosen when triton is first imported.
"""
import contextlib
import os
import sys

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported for the GPU in this process; run the interpreter tests on their own: "
                "TRITON_INTERPRET=1 pytest tests/test_triton_*.py", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


def _widen_bf16_dot_operands():
    """The interpreter multiplies bfloat16 dot operands as their raw uint16 bits (Triton 3.8): widen them to
    float32 first, as the tensor cores do, so bfloat16 kernels can be checked here."""
    dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, *args):
        return dot(self, widen(a), widen(b), *args)

    interpreter.InterpreterBuilder.create_dot = create_dot


_widen_bf16_dot_operands()


@contextlib.contextmanager
def poisoned():
    """Float tensors allocated inside start as NaN, so an element a kernel never writes shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: nan(empty(*a, **k))
    torch.empty_like = lambda *a, **k: nan(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
