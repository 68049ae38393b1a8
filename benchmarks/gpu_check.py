"""The one-command GPU check (`make gpu-check`): tests/gpu, then each kernel against its roofline, then the
engine's decode (with and without CUDA graphs) and prefill on the default model; everything into one file.

It fails (exit 1) when anything cannot run where a GPU is present: a test failing or skipping, the CUDA
extension missing, a benchmark raising. Sized to finish in a few minutes on an H100 / H200-class GPU.
`--device cpu --smoke` runs the benchmark sections on tiny shapes on the CPU (what the CPU tests check).
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import torch

import roofline

log = logging.getLogger("flashgen.gpu_check")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (full size, smoke size) of each benchmark's dimensions
SHAPES = {
    "norm": ((8192, 4096), (64, 256)),
    "prefill": ((4, 32, 8, 2048, 128), (1, 4, 2, 64, 64)),  # batch, heads, kv heads, seqlen, head dim
    "decode": ((32, 32, 8, 4096, 128), (2, 4, 2, 128, 64)),  # batch, heads, kv heads, context, head dim
    "linear": ((14336, 4096), (256, 256)),  # N, K; M = 1 (GEMV) and 512 (GEMM)
}


class Timer:
    """Median seconds per call: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device, reps):
        self.device, self.reps = device, reps

    def __call__(self, fn):
        fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def measured_peak(device, timer):
    """(bytes/s, FLOP/s) measured: a large copy and a large bf16 (float32 off a GPU) matmul."""
    n = 1 << 26 if device.type == "cuda" else 1 << 22
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    bandwidth = 2 * a.numel() * 4 / timer(lambda: b.copy_(a))
    m = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(m, m, dtype=dtype, device=device)
    return bandwidth, 2 * m ** 3 / timer(lambda: x @ x)


def kernel_benchmarks(device, smoke, timer):
    """[(Work, fn)] of every kernel benchmarked, on fresh random inputs."""
    from flashgen.kernels import flash_attn_func, ggml, rms_norm
    from flashgen.kernels.attention import _options
    from flashgen.kernels.qlinear import QuantizedLinear
    from flashgen.kernels.quant import QuantizedWeight, quantize_int4, quantize_int8

    pick = 1 if smoke else 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.empty(0, dtype=dtype).element_size()
    out = []

    rows, cols = SHAPES["norm"][pick]
    x, res = (torch.randn(rows, cols, dtype=dtype, device=device) for _ in range(2))
    w = torch.randn(cols, dtype=dtype, device=device)
    out.append((roofline.norm_work(f"rms_norm+residual {rows}x{cols}", rows, cols, elem, True),
                lambda: rms_norm(x, w, residual=res)))

    b, h, kvh, s, d = SHAPES["prefill"][pick]
    q = torch.randn(b, s, h, d, dtype=dtype, device=device)
    k, v = (torch.randn(b, s, kvh, d, dtype=dtype, device=device) for _ in range(2))
    out.append((roofline.attention_work(f"flash_attn_func causal b{b} h{h}/{kvh} s{s} d{d}", b, h, kvh, s, s, d,
                                        True, elem), lambda: flash_attn_func(q, k, v, causal=True)))

    b, h, kvh, ctx, d = SHAPES["decode"][pick]
    block = 64
    per_seq = ctx // block
    kc, vc = (torch.randn(b * per_seq, block, kvh, d, dtype=dtype, device=device) for _ in range(2))
    table = torch.randperm(b * per_seq, device=device).to(torch.int32).reshape(b, per_seq)
    lens = torch.full((b,), ctx - 1, dtype=torch.int32, device=device)
    qd = torch.randn(b, 1, h, d, dtype=dtype, device=device)
    kd, vd = (torch.randn(b, 1, kvh, d, dtype=dtype, device=device) for _ in range(2))

    options = _options(qd, None, True, (-1, -1), 0.0)

    def decode():  # the op itself: the public function's cache checks sync with the host
        return torch.ops.flashgen.flash_attn_kvcache(qd, kc, vc, kd, vd, lens, table, *options, 0)

    out.append((roofline.decode_work(f"decode paged b{b} h{h}/{kvh} ctx{ctx} d{d}", b, h, kvh, ctx, d, elem),
                decode))
    if device.type == "cuda" and not smoke:
        out.append((roofline.decode_work(f"decode paged CUDA C++ b{b} ctx{ctx} d{d}", b, h, kvh, ctx, d, elem),
                    lambda: _cuda(decode)))

    n, kdim = SHAPES["linear"][pick]
    weight = torch.randn(n, kdim, device=device) * 0.02
    for name, qw in (("int4 g32", quantize_int4(weight, group_size=32)), ("int8", quantize_int8(weight))):
        layer = QuantizedLinear(qw.to(device))
        wbytes = sum(t.numel() * t.element_size() for t in qw.tensors() if t is not None)
        for m in (1, 16 if smoke else 512):
            xm = torch.randn(m, kdim, dtype=dtype, device=device)
            out.append((roofline.linear_work(f"{name} linear m{m} n{n} k{kdim}", m, n, kdim, wbytes, elem),
                        lambda layer=layer, xm=xm: layer(xm)))
    for name in ("Q4_K", "Q6_K"):  # a Q4_K_M file's types; the file's bytes are what a GEMV must stream
        t = ggml.BLOCK_TYPES[name]
        qw = QuantizedWeight(name, ggml.random_blocks(name, n * kdim // t.block).reshape(n, -1)).to(device)
        layer = QuantizedLinear(qw)
        xm = torch.randn(1, kdim, dtype=dtype, device=device)
        out.append((roofline.linear_work(f"{name} linear m1 n{n} k{kdim}", 1, n, kdim, qw.qweight.numel(), elem),
                    lambda layer=layer, xm=xm: layer(xm)))
        if device.type == "cuda" and not smoke:
            out.append((roofline.linear_work(f"{name} linear CUDA C++ m1 n{n} k{kdim}", 1, n, kdim,
                                             qw.qweight.numel(), elem), lambda layer=layer, xm=xm: _cuda(layer, xm)))
    return out


def _cuda(fn, *args):
    """fn(*args) with FLASHGEN_CUDA_BACKEND=cuda: the CUDA C++ kernel where one takes the call."""
    os.environ["FLASHGEN_CUDA_BACKEND"] = "cuda"
    try:
        return fn(*args)
    finally:
        del os.environ["FLASHGEN_CUDA_BACKEND"]


def engine_benchmarks(device, smoke):
    """Decode tok/s (B=1) with and without CUDA graphs, and prefill tok/s, on the default model."""
    from flashgen.engine.llm import LLM

    new, prompt_words = (8, 40) if smoke else (128, 400)
    prompt = " ".join(["the sky is blue because of Rayleigh scattering"] * (prompt_words // 8))
    results = {}
    for graphs in (True, False):
        llm = LLM(device=str(device), cuda_graphs=graphs, max_seq_len=1024)
        llm.generate(prompt, max_new_tokens=4, temperature=0)  # warm-up: prepack, compile, capture
        llm.generate(prompt, max_new_tokens=new, temperature=0, ignore_eos=True)
        key = "graphs" if graphs else "eager"
        results[f"decode_tok_s_{key}"] = llm.stats.decode_tokens_per_s
        results[f"prefill_tok_s_{key}"] = llm.stats.prefill_tokens_per_s
        results["prompt_tokens"] = llm.stats.prompt_tokens
    return results


def run_gpu_tests(junit):
    """tests/gpu in its own pytest process (no interpreter); returns (ok, summary)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-rs", "tests/gpu",
                           f"--junitxml={junit}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = proc.returncode == 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0
    return ok, counts, proc.stdout[-6000:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "gpu-check-results.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a check of this script)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    results, failures, lines = {"device": str(device), "smoke": args.smoke}, [], []

    def fail(what):
        failures.append(what)
        log.error("FAILED: %s", what)

    if device.type == "cuda":
        if not torch.cuda.is_available():
            log.error("gpu-check needs an NVIDIA GPU: torch.cuda.is_available() is False")
            return 1
        results["device"] = torch.cuda.get_device_name(device)
        from flashgen.kernels import _backend

        if _backend.C_cuda is None:
            fail("the CUDA extension flashgen._C_cuda is not built (FLASHGEN_BUILD_CUDA=1 make build)")
    if not args.skip_tests:
        ok, counts, output = run_gpu_tests(args.out + ".junit.xml")
        results["tests"] = counts
        lines.append(f"tests/gpu: {counts}")
        log.info("%s", output)
        if not ok:
            fail(f"tests/gpu: {counts} (every GPU test must run and pass)")
    timer = Timer(device, 5 if args.smoke else 20)
    peak = roofline.device_peak(device, lambda: measured_peak(device, timer))
    results["peak"] = {"bytes_per_s": peak[0], "flops": peak[1]}
    lines.append(f"peak: {peak[0] / 1e9:.0f} GB/s, {peak[1] / 1e12:.0f} TFLOP/s")
    results["kernels"] = []
    try:
        for work, fn in kernel_benchmarks(device, args.smoke, timer):
            try:
                seconds = timer(fn)
            except Exception:
                fail(f"{work.name}: {traceback.format_exc(limit=3)}")
                continue
            results["kernels"].append(work.record(seconds, peak))
            lines.append(work.line(seconds, peak))
            log.info("%s", lines[-1])
    except Exception:
        fail(f"kernel set-up: {traceback.format_exc(limit=3)}")
    if not args.skip_engine:
        try:
            results["engine"] = engine_benchmarks(device, args.smoke)
            lines.append(f"engine: {results['engine']}")
            log.info("%s", lines[-1])
        except Exception:
            fail(f"engine: {traceback.format_exc(limit=5)}")
    results["failures"], results["lines"] = failures, lines
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    log.info("results in %s; %s", args.out, "FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
