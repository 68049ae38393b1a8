"""flashgen against llama.cpp (llama-cpp-python) on the same GGUF files: pp512 and tg128 tokens/s, as llama-bench.

Files: the default model (SmolLM2-135M-Instruct Q4_1) and the 1B-class random model of gguf_models.py in each
of its types, written by llama.cpp's quantizer (built when missing). Each file runs in its own worker process,
which loads it in both engines and measures them in turn within every repetition (flashgen, llama.cpp with
flash attention off, llama.cpp with it on), so a change in the machine's load reaches both alike; one untimed
warm-up run of each first. A worker of its own per file gives each file's RSS a clean start, and a crash in one
engine on one file is reported without losing the others.

pp: one prompt of 512 random tokens in one pass (llama.cpp: n_batch = n_ubatch = 512) into an empty cache. tg:
after one prompt token, 128 single-token steps. Tokenization and sampling are excluded in both: flashgen runs
its model's prefill / decode (engine.cli.bench_runs, as `flashgen bench`), llama.cpp `Llama.eval` (llama_decode
with no logits copied). llama.cpp's number is the better of flash attention on / off, per measure.

The ratios compare the best repetitions (as bench_e2e.py: on a shared machine noise only slows a run down).
Decode GB/s = bytes streamed per token (every weight tensor of the file as stored, the norms included, the token
embedding left out as it is only gathered, unless it is also the tied output head) x tg tokens/s, against the
machine's read bandwidth measured with the same threads.

    python benchmarks/bench_gguf.py [--threads 2] [-r 3] [--files default Q4_K_M Q4_0 ...] [--json out.json]
"""
import argparse
import collections
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import gguf_models

log = logging.getLogger("flashgen.bench.gguf")
FLASH_ATTN = {"off": False, "on": True}


def rss_bytes():
    """Resident set size of this process (anonymous and file-backed pages, as `ps` shows it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bytes_per_token(path):
    """Bytes of weights a batch-1 decode step streams from `path`: every tensor but the token embedding, of which
    one row is gathered; a model without output.weight reads the embedding as its output head, so it counts."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def read_into_page_cache(path, chunk=64 * 2**20):
    """Reads the file once, so both engines' load times are from the page cache rather than the disk."""
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


def llamacpp_runs(path, threads, n_prompt, n_gen, flash_attn, seed=0):
    """llama.cpp on `path` as flashgen's bench_runs: ({"pp": fn, "tg": fn}, load seconds); each fn measures one
    run in tokens/s."""
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                          n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, llm.n_vocab(), n_prompt).tolist()
    steps = rng.integers(0, llm.n_vocab(), n_gen).tolist()
    ctx = llm.ctx

    def pp():
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(ctx)
        return n_prompt / (time.perf_counter() - start)

    def tg():
        llm.reset()
        llm.eval(prompt[:1])
        llama_cpp.llama_synchronize(ctx)
        start = time.perf_counter()
        for t in steps:
            llm.eval([t])
        llama_cpp.llama_synchronize(ctx)
        return n_gen / (time.perf_counter() - start)

    return {"pp": pp, "tg": tg}, load_s


def measure_file(path, threads, n_prompt, n_gen, repetitions, flash_attn=("off", "on"), flashgen=True):
    """Both engines on one file, in this process: {engine: {"pp": stats, "tg": stats, "load_s", ...}}; a flashgen
    failure to load or run is recorded as {"error": text} and llama.cpp still runs."""
    import torch

    from bench_e2e import _stats
    from flashgen.engine.cli import bench_runs
    from flashgen.engine.llm import LLM

    torch.set_num_threads(threads)
    read_into_page_cache(path)
    results, engines, failed = {}, {}, set()

    def run(name, kind):
        try:
            with torch.inference_mode():
                return engines[name][kind]()
        except Exception as e:  # noqa: BLE001 - the report names the failure; llama.cpp still runs
            if name != "flashgen":
                raise
            log.exception("flashgen failed running %s on %s", kind, path)
            results[name]["error"] = f"{kind}: {type(e).__name__}: {e}"
            failed.add(name)

    def warm_up(name):
        for kind in ("pp", "tg"):
            if name not in failed:
                run(name, kind)

    if flashgen:
        before = rss_bytes()
        try:
            start = time.perf_counter()
            llm = LLM(path, device="cpu", max_seq_len=n_prompt + n_gen + 8)
            results["flashgen"] = {"load_s": time.perf_counter() - start, "rss_bytes": rss_bytes(),
                                   "rss_before_bytes": before}
            engines["flashgen"] = bench_runs(llm, n_prompt, n_gen)
        except Exception as e:  # noqa: BLE001
            log.exception("flashgen failed to load %s", path)
            results["flashgen"] = {"error": f"{type(e).__name__}: {e}"}
        if "flashgen" in engines:
            # Weights mapped from the file count in RSS only once touched: the resident footprint is the
            # RSS after a run, taken before llama.cpp maps the same file.
            warm_up("flashgen")
            results["flashgen"]["rss_after_run_bytes"] = rss_bytes()
    for fa in flash_attn:
        name = f"llama.cpp FA {fa}"
        runs, load_s = llamacpp_runs(path, threads, n_prompt, n_gen, FLASH_ATTN[fa])
        engines[name], results[name] = runs, {"load_s": load_s}
        warm_up(name)
    samples = {name: {"pp": [], "tg": []} for name in engines}
    for rep in range(repetitions):
        for name in engines:
            for kind in ("pp", "tg"):
                if name not in failed:
                    samples[name][kind].append(run(name, kind))
        log.info("%s: repetition %d/%d done", os.path.basename(path), rep + 1, repetitions)
    for name, s in samples.items():
        if name not in failed:
            results[name].update(pp=_stats(s["pp"]), tg=_stats(s["tg"]))
    engines.clear()
    gc.collect()
    return results


def run_worker(path, args):
    """measure_file in a fresh process: its results, or {"crash": ...} with the tail of its stderr (which is also
    passed through live)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--worker-out", out,
               "--threads", str(args.threads), "-p", str(args.n_prompt), "-n", str(args.n_gen),
               "-r", str(args.repetitions), "--flash-attn", args.flash_attn]
        if args.skip_flashgen:
            cmd.append("--skip-flashgen")
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        tail = collections.deque(maxlen=256)
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
        rc = proc.wait()
        if rc == 0:
            with open(out) as f:
                return json.load(f)
    lines = b"".join(tail).decode(errors="replace").replace("\r", "\n").strip().splitlines()
    return {"crash": {"returncode": rc, "stderr_tail": lines[-20:]}}


def resolve_files(names, cache, threads):
    """{label: path}: "default" is the default model, a type of gguf_models.QUANT_TYPES its 1B-class file (built
    when missing), anything else a path."""
    from flashgen.engine.llm import default_model_path

    files, types = {}, [n for n in names if n in gguf_models.QUANT_TYPES or n == "F16"]
    built = gguf_models.build(cache, types, threads) if types else {}
    for name in names:
        if name == "default":
            files["SmolLM2-135M Q4_1 (default)"] = default_model_path()
        elif name in built:
            files[f"1B {name}"] = built[name]
        else:
            files[os.path.basename(name)] = name
    return files


def best_llamacpp(result, kind):
    """(variant name, stats) of the llama.cpp variant with the fastest repetition of `kind`."""
    variants = [(name, r[kind]) for name, r in result.items() if name.startswith("llama.cpp") and kind in r]
    return max(variants, key=lambda v: v[1]["best"]) if variants else (None, None)


def report(r):
    def ts(s):
        return f"{s['mean']:.1f} ± {s['std']:.1f} ({s['best']:.1f})"

    bw = r["read_bandwidth_gbs"]
    pp, tg = f"pp{r['n_prompt']}", f"tg{r['n_gen']}"
    lines = [f"{r['threads']} threads; read bandwidth {bw:.1f} GB/s; tokens/s as mean ± std (best) of "
             f"{r['repetitions']} repetitions; GB/s from the best tg repetition", "",
             f"| file | size | engine | load s | RSS after load / after a run | {pp} t/s | {tg} t/s | decode GB/s | of read bw |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, f in r["files"].items():
        head = f"| {label} | {f['size_bytes'] / 1e6:.0f} MB"
        res = f["results"]
        if "crash" in res:
            lines.append(f"{head} | flashgen | crashed (exit {res['crash']['returncode']}): "
                         f"{(res['crash']['stderr_tail'] or ['?'])[-1]} | | | | | |")
            res = f.get("llamacpp_only", {})
            if "crash" in res:
                lines.append(f"{head} | llama.cpp | crashed too: {(res['crash']['stderr_tail'] or ['?'])[-1]} "
                             "| | | | | |")
                continue
        for name, e in res.items():
            load = f"{e['load_s']:.2f}" if "load_s" in e else ""
            rss = (f"{e['rss_bytes'] / 1e9:.2f} / {e.get('rss_after_run_bytes', 0) / 1e9:.2f} GB "
                   f"(process before: {e['rss_before_bytes'] / 1e9:.2f})" if "rss_bytes" in e else "")
            if "tg" not in e:
                lines.append(f"{head} | {name} | {load} | {rss} | failed: {e.get('error', '?')} | | | |")
                continue
            gbs = f["bytes_per_token"] * e["tg"]["best"] / 1e9
            lines.append(f"{head} | {name} | {load} | {rss} | {ts(e['pp'])} | {ts(e['tg'])} | {gbs:.1f} | "
                         f"{gbs / bw:.0%} |")
    lines += ["", f"| file | weights per token | flashgen / llama.cpp {pp} | flashgen / llama.cpp {tg} |",
              "|---|---|---|---|"]
    for label, f in r["files"].items():
        res = f["results"]
        fg = res.get("flashgen", {})
        cells = []
        for kind in ("pp", "tg"):
            variant, best = best_llamacpp(f.get("llamacpp_only", res), kind)
            cells.append(f"{fg[kind]['best'] / best['best']:.2f}x (vs {variant})" if kind in fg and best else "n/a")
        lines.append(f"| {label} | {f['bytes_per_token'] / 1e6:.0f} MB | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--files", nargs="+", default=["default", *gguf_models.QUANT_TYPES],
                   help="'default' (the default model), 1B-class types (" + " ".join(gguf_models.QUANT_TYPES)
                        + ", F16) or paths of .gguf files")
    p.add_argument("--cache", help="folder of the 1B-class files (see gguf_models.py)")
    p.add_argument("--flash-attn", choices=["off", "on", "both"], default="both",
                   help="llama.cpp's flash attention; with both, the better of the two counts")
    p.add_argument("--skip-flashgen", action="store_true", help="llama.cpp alone")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        fa = ("off", "on") if args.flash_attn == "both" else (args.flash_attn,)
        results = measure_file(args.worker, args.threads, args.n_prompt, args.n_gen, args.repetitions, fa,
                               flashgen=not args.skip_flashgen)
        with open(args.worker_out, "w") as f:
            json.dump(results, f)
        return 0

    from bench_e2e import read_bandwidth_gbs

    files = resolve_files(args.files, args.cache, args.threads)
    r = {"threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
         "repetitions": args.repetitions, "read_bandwidth_gbs": read_bandwidth_gbs(args.threads), "files": {}}
    log.info("read bandwidth %.1f GB/s", r["read_bandwidth_gbs"])
    for label, path in files.items():
        log.info("%s: %s", label, path)
        f = r["files"][label] = {"path": path, "size_bytes": os.path.getsize(path),
                                 "bytes_per_token": bytes_per_token(path), "results": run_worker(path, args)}
        if "crash" in f["results"] and not args.skip_flashgen:
            log.error("%s: the worker crashed (%s); llama.cpp alone again", label, f["results"]["crash"])
            f["llamacpp_only"] = run_worker(path, argparse.Namespace(**{**vars(args), "skip_flashgen": True}))
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
