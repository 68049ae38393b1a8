"""A training step of a SmolLM2-135M-shaped Llama (random weights, built offline), eager transformers against
apply_flashgen, each variant in a fresh process (so one variant's allocations never shape another's peak).

Per variant: tokens/s of forward + backward + AdamW step on `--tokens` tokens (batch x sequence, labels =
inputs, a few padded positions), best of the timed steps after two untimed ones, and the peak memory of the
tensors a step allocates (AdamW's state included, as in any first step) over those before it: CUDA's max
allocated on a GPU; on the CPU the same quantity from the profiler's allocation events over the two untimed
steps (the tensors alive at each allocation or free), so it reads the same on both. Also, on the CPU, the growth
of the peak resident set (ru_maxrss) over its value before the first step: that adds what glibc's heap keeps of
freed memory, which depends on the allocation pattern as much as on the peak. Results as CSV on stdout (and
--csv FILE).

Targets (issue 14): patched peak memory <= 0.6x eager's, patched speed >= 1.2x eager's.

    python benchmarks/bench_train.py --threads 2 [--tokens 2048] [--steps 2] [--csv train.csv]
    pytest benchmarks/bench_train.py --benchmark-only      # the same, asserting the targets
"""
import argparse
import csv
import io
import json
import resource
import subprocess
import sys
import time

VARIANTS = {"eager": {}, "flashgen": {"apply": True}}
TARGETS = {"memory_ratio_max": 0.6, "speed_ratio_min": 1.2}
# SmolLM2-135M's shape
CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
              tie_word_embeddings=True, attention_dropout=0.0)


def _rss_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_peak_allocated(fn):
    """Run fn() under the profiler; the most CPU tensor bytes it held at once beyond what was alive before."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))  # < 0 for a free
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure(variant, tokens, steps, device, threads, batch):
    """One variant in this process: {"variant", "tokens_per_s", "peak_step_bytes", "peak_rss_bytes", "loss"}."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(device).train()
    if VARIANTS[variant].get("apply"):
        from flashgen.integrations import apply_flashgen

        apply_flashgen(model)
    else:
        model.set_attn_implementation("sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, tokens // batch), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[-1, -7:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        return float(loss)

    def untimed():  # warm-up; AdamW's state is allocated in the first, as in any first step
        step()
        step()

    cuda = torch.device(device).type == "cuda"
    rss = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        untimed()
    else:
        base_rss = _rss_peak_bytes()
        peak = _cpu_peak_allocated(untimed)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        rss = _rss_peak_bytes() - base_rss
    return {"variant": variant, "tokens_per_s": tokens / min(times), "peak_step_bytes": peak, "peak_rss_bytes": rss,
            "loss": loss}


def run(tokens=2048, steps=2, device="cpu", threads=2, batch=2):
    """Every variant in its own process; returns {"rows": [...], "memory_ratio", "speed_ratio"}."""
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--steps", str(steps),
               "--device", device, "--threads", str(threads), "--batch", str(batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    eager, ours = rows
    rss = ours["peak_rss_bytes"] / eager["peak_rss_bytes"] if eager["peak_rss_bytes"] else None
    return {"rows": rows, "memory_ratio": ours["peak_step_bytes"] / eager["peak_step_bytes"],
            "rss_ratio": rss, "speed_ratio": ours["tokens_per_s"] / eager["tokens_per_s"]}


def to_csv(results):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["variant", "tokens_per_s", "peak_step_bytes", "peak_rss_bytes", "loss"])
    writer.writeheader()
    writer.writerows(results["rows"])
    return buf.getvalue()


def test_train_step(benchmark):
    """`make bench`: one measured run, then the targets."""
    results = benchmark.pedantic(run, kwargs={"steps": 1}, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in results.items() if k != "rows"})
    assert results["memory_ratio"] <= TARGETS["memory_ratio_max"], results
    assert results["speed_ratio"] >= TARGETS["speed_ratio_min"], results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", help="also write the CSV here")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.steps, args.device, args.threads, args.batch)))
        return
    results = run(args.tokens, args.steps, args.device, args.threads, args.batch)
    text = to_csv(results)
    sys.stdout.write(text)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(text)
    rss = f" (peak RSS growth: {results['rss_ratio']:.2f})" if results["rss_ratio"] else ""
    print(f"peak step memory flashgen / eager: {results['memory_ratio']:.2f}{rss} (target <= "
          f"{TARGETS['memory_ratio_max']}); speed flashgen / eager: {results['speed_ratio']:.2f} (target >= "
          f"{TARGETS['speed_ratio_min']})", file=sys.stderr)


if __name__ == "__main__":
    main()
