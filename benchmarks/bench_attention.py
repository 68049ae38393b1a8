"""CPU attention: flashgen's C++ kernels against eager softmax(QK^T)V and F.scaled_dot_product_attention.

Cases (float32, batch 1, 2 threads): prefill seqlen 512 and 2048, causal, 9 heads x 64 (SmolLM2-135M, 3 kv
heads) and 32 x 128 (8 kv heads), forward and forward+backward; decode of one token against a contiguous
cache of 1k and 8k tokens. For each case the test times all three implementations in one run (best of the
rounds) and records the time ratios and the peak memory of one call.

Peak memory: each implementation runs once in a fresh subprocess with its inputs allocated; the kernel resets
the process's resident-set high-water mark (/proc/self/clear_refs), and the peak is VmHWM after the call minus
VmRSS before it. It counts every page the call makes resident (tensors, kernel scratch, thread stacks).

    python benchmarks/bench_attention.py                         # the table
    pytest benchmarks/bench_attention.py --benchmark-only        # pytest-benchmark, ratios in extra_info
"""
import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flashgen.kernels import flash_attn_func, flash_attn_with_kvcache
from timing import best_time, fixed_threads

log = logging.getLogger("flashgen.bench")
HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 2
IMPLS = ["flashgen", "eager", "sdpa"]
# name -> (kind, seqlen or cache length, heads, kv_heads, head_dim)
CASES = {
    f"{kind}-{s}-{h}x{d}": (kind, s, h, hkv, d)
    for kind in ("fwd", "fwd+bwd") for s in (512, 2048) for h, hkv, d in ((9, 3, 64), (32, 8, 128))
}
CASES.update({f"decode-{n // 1024}k-{h}x{d}": ("decode", n, h, hkv, d)
              for n in (1024, 8192) for h, hkv, d in ((9, 3, 64), (32, 8, 128))})


def eager_attention(q, k, v, causal):
    """softmax(Q K^T / sqrt(d)) V written out, (batch, seqlen, heads, head_dim), kv heads repeated for GQA."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(
        group, 1)
    s = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:  # bottom-right aligned
        sq, sk = q.shape[1], k.shape[1]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1), float("-inf"))
    return (s.softmax(-1) @ vh).transpose(1, 2)


def sdpa_attention(q, k, v, causal):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def flashgen_attention(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal)


ATTENTION = {"flashgen": flashgen_attention, "eager": eager_attention, "sdpa": sdpa_attention}


def make_call(name, impl):
    """A no-argument function running one call of `impl` on the case's (freshly allocated) inputs."""
    kind, n, h, hkv, d = CASES[name]
    if kind == "decode":
        q, kc, vc = torch.randn(1, 1, h, d), torch.randn(1, n, hkv, d), torch.randn(1, n, hkv, d)
        if impl == "flashgen":
            return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n)
        return lambda: ATTENTION[impl](q, kc, vc, causal=False)
    grad = kind == "fwd+bwd"
    q = torch.randn(1, n, h, d, requires_grad=grad)
    k, v = torch.randn(1, n, hkv, d, requires_grad=grad), torch.randn(1, n, hkv, d, requires_grad=grad)
    fn = ATTENTION[impl]
    if not grad:
        return lambda: fn(q, k, v, causal=True)
    dout = torch.randn(1, n, h, d)
    return lambda: torch.autograd.grad(fn(q, k, v, causal=True), (q, k, v), dout)


def peak_memory_mb(name, impl):
    """Growth of ru_maxrss over one call in a fresh process (see the module docstring)."""
    code = ("import sys; sys.path.insert(0, %r); import torch, bench_attention as b; torch.set_num_threads(%d); "
            "print(b._child_peak(%r, %r))" % (HERE, THREADS, name, impl))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _child_peak(name, impl):
    with torch.no_grad() if CASES[name][0] != "fwd+bwd" else torch.enable_grad():
        call = make_call(name, impl)
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM to the current RSS
            f.write("5")
        call()
        return (_status_kib("VmHWM") - before) / 1024


def rounds_for(name):
    return 2 if "2048" in name and "32x" in name else 5


def measure(name):
    """{impl: seconds} for the case, all in this process, plus ratios."""
    with torch.no_grad() if CASES[name][0] != "fwd+bwd" else torch.enable_grad():
        times = {impl: best_time(make_call(name, impl), rounds_for(name)) for impl in IMPLS}
    return times


_threads = fixed_threads(THREADS)


@pytest.mark.parametrize("name", list(CASES))
def test_attention(benchmark, name):
    benchmark.group = name
    grad = CASES[name][0] == "fwd+bwd"
    with torch.no_grad() if not grad else torch.enable_grad():
        call = make_call(name, "flashgen")
        benchmark.pedantic(call, rounds=rounds_for(name), iterations=1, warmup_rounds=1)
    times = measure(name)
    info = benchmark.extra_info
    for impl in IMPLS:
        info[f"{impl}_ms"] = times[impl] * 1e3
        info[f"{impl}_peak_MiB"] = peak_memory_mb(name, impl)
    info["speedup_vs_eager"] = times["eager"] / times["flashgen"]
    info["speedup_vs_sdpa"] = times["sdpa"] / times["flashgen"]
    log.info("%s: %s", name, json.dumps(info))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"{'case':24} " + " ".join(f"{i + ' ms':>12}" for i in IMPLS) + "  vs eager  vs sdpa  "
          + " ".join(f"{i + ' MiB':>12}" for i in IMPLS))
    for name in args.cases:
        t = measure(name)
        mem = {impl: peak_memory_mb(name, impl) for impl in IMPLS}
        print(f"{name:24} " + " ".join(f"{t[i] * 1e3:12.2f}" for i in IMPLS)
              + f"  {t['eager'] / t['flashgen']:7.2f}x {t['sdpa'] / t['flashgen']:6.2f}x  "
              + " ".join(f"{mem[i]:12.1f}" for i in IMPLS), flush=True)


if __name__ == "__main__":
    main()
