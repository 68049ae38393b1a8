"""CPU fused norms: flashgen's C++ kernels against eager PyTorch, bfloat16.

Implementations per case:
- flashgen: rms_norm / layer_norm (residual add fused in when the case has one);
- eager: the unfused formula as Hugging Face writes it (LlamaRMSNorm: h.float().pow(2).mean, rsqrt, multiply,
  cast back, times weight; for LayerNorm the same written out with mean and variance), after `h = x + residual`;
- torch: torch.nn.functional.rms_norm / layer_norm, after `h = x + residual`.
Cases: RMSNorm and LayerNorm, with and without residual, forward and forward+backward, tokens x hidden from
1 x 576 to 4096 x 4096. The summary printed at the end (benchmarks/conftest.py) gives eager/flashgen and
torch/flashgen time ratios (median over rounds): > 1 means flashgen is faster.

    python benchmarks/bench_norm.py                      # runs the suite and prints the ratio table
    pytest benchmarks/bench_norm.py --benchmark-only     # the same through pytest
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from flashgen.kernels import layer_norm, rms_norm

DTYPE = torch.bfloat16
SHAPES = [(1, 576), (128, 2048), (1024, 4096), (4096, 4096)]
IMPLS = ["flashgen", "eager", "torch"]
EPS = 1e-6


def hf_rms_norm(h, w):
    """LlamaRMSNorm.forward."""
    dtype = h.dtype
    h = h.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(dtype)


def eager_layer_norm(h, w, b):
    dtype = h.dtype
    h = h.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return w * ((h - mean) * torch.rsqrt(var + EPS)).to(dtype) + b


def norm_fn(norm, impl, residual):
    """f(x, r, w, b) -> (y, h) (h unused without a residual)."""
    if impl == "flashgen":
        if norm == "rms":
            return (lambda x, r, w, b: rms_norm(x, w, EPS, residual=r)) if residual else \
                (lambda x, r, w, b: (rms_norm(x, w, EPS), x))
        return (lambda x, r, w, b: layer_norm(x, w, b, EPS, residual=r)) if residual else \
            (lambda x, r, w, b: (layer_norm(x, w, b, EPS), x))
    if norm == "rms":
        body = hf_rms_norm if impl == "eager" else (lambda h, w: F.rms_norm(h, h.shape[-1:], w, EPS))
        core = lambda h, w, b: body(h, w)  # noqa: E731
    else:
        core = eager_layer_norm if impl == "eager" else (lambda h, w, b: F.layer_norm(h, h.shape[-1:], w, b, EPS))

    def run(x, r, w, b):
        h = x + r if residual else x
        return core(h, w, b), h

    return run


CASES = [(norm, residual, mode, shape) for norm in ("rms", "layer") for residual in (True, False)
         for mode in ("fwd", "fwd+bwd") for shape in SHAPES]


def case_id(case):
    norm, residual, mode, (m, n) = case
    return f"{norm}{'+residual' if residual else ''} {mode} {m}x{n}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_norm(benchmark, case, impl):
    norm, residual, mode, shape = case
    grad = mode == "fwd+bwd"
    x, r = (torch.randn(shape, dtype=DTYPE, requires_grad=grad) for _ in range(2))
    w, b = (torch.randn(shape[-1], dtype=DTYPE, requires_grad=grad) for _ in range(2))
    fn = norm_fn(norm, impl, residual)
    inputs = [t for t in (x, r if residual else None, w, b if norm == "layer" else None) if t is not None]
    gy = torch.randn(shape, dtype=DTYPE)

    def call():
        y, _ = fn(x, r, w, b)
        if grad:
            torch.autograd.grad(y, inputs, gy)

    with torch.no_grad() if not grad else torch.enable_grad():
        call()  # warm-up (allocator, first-call dispatch)
        elements = shape[0] * shape[1]
        rounds = 5 if elements >= 1 << 22 else 20 if elements >= 1 << 18 else 200
        benchmark.group = case_id(case)
        benchmark.extra_info["impl"] = impl
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", "--benchmark-disable-gc",
                          "--benchmark-columns=median,min,rounds", *sys.argv[1:]]))
