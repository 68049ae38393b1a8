"""Static GPU check, no GPU needed: register use, spills and shared memory of every flashgen GPU kernel.

- CUDA C++: every kernel in the built flashgen._C_cuda, per architecture in its fatbin (sm_80, sm_90a), read
  with `cuobjdump -res-usage` (Triton ships cuobjdump).
- Triton: every variant in each kernels/triton family's aot_specs(), AOT-compiled for sm_80 and sm_90 with
  triton.compile(ASTSource, GPUTarget); registers and local memory from `cuobjdump -res-usage` on the cubin,
  shared memory from the compile metadata.

Prints one row per kernel and arch: registers, spill (local-memory + stack bytes per thread: ptxas puts spills
there) and shared memory against the arch's limit. Exits 1 on any spill, shared memory over the limit, or a
variant that fails to compile. New kernels join automatically (a new .cu in csrc/cuda, a new Triton family).

    python benchmarks/gpu_static.py [--jobs 2] [--only-triton | --only-cuda] [--family norm ...]
"""
import argparse
import concurrent.futures as cf
import importlib
import logging
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

log = logging.getLogger("flashgen.gpu_static")

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # compute capability -> max dynamic shared memory per block (bytes)


@dataclass
class Usage:
    kernel: str
    arch: str
    registers: int
    spill: int  # local memory + stack frame bytes per thread
    shared: int
    error: str = ""

    def problems(self):
        limit = ARCHS.get(int(re.sub(r"\D", "", self.arch) or 0))
        out = [self.error] if self.error else []
        if self.spill:
            out.append(f"{self.spill} bytes of local memory / stack (spills)")
        if limit is not None and self.shared > limit:
            out.append(f"shared memory {self.shared} > {limit}")
        return out


def triton_bin(tool):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def res_usage(path):
    """[(arch, mangled kernel name, {REG, STACK, SHARED, LOCAL})] from `cuobjdump -res-usage path`."""
    text = subprocess.run([triton_bin("cuobjdump"), "-res-usage", path], check=True, capture_output=True,
                          text=True).stdout
    rows, arch, name = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"Function (\S+):", line):
            name = m.group(1)
        elif line.startswith("REG:") and name:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            rows.append((arch, name, {k: int(v) for k, v in fields.items()}))
            name = None
    return rows


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def cuda_extension_usage():
    import flashgen._C_cuda as ext  # raises ImportError when it was not built

    rows = res_usage(ext.__file__)
    names = demangle([name for _, name, _ in rows])
    return [Usage(short(n), arch, f.get("REG", 0), f.get("STACK", 0) + f.get("LOCAL", 0), f.get("SHARED", 0))
            for (arch, _, f), n in zip(rows, names)]


def short(name, width=110):
    """Drop the namespace noise of a demangled name, keep the template arguments."""
    name = re.sub(r"flashgen_cuda::|\(anonymous namespace\)::|c10::|^void ", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def triton_specs(only=None):
    """(family module name, index, spec name) of every Triton kernel variant (of the families named in `only`)."""
    from flashgen.kernels import triton as families

    return [(module.__name__, i, spec["name"]) for module in families.families()
            if not only or module.__name__.rsplit(".", 1)[-1] in only
            for i, spec in enumerate(module.aot_specs())]


def compile_triton(job):
    """AOT-compile one variant for one arch (runs in a worker process)."""
    module_name, index, name, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = f"sm_{cc}"
    try:
        spec = importlib.import_module(module_name).aot_specs()[index]
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs", {}),
                        attrs=spec.get("attrs"))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                           **spec.get("options", {})})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            (_, _, fields), = res_usage(f.name)
        return Usage(name, arch, fields.get("REG", 0), fields.get("STACK", 0) + fields.get("LOCAL", 0),
                     compiled.metadata.shared)
    except Exception as e:  # a variant that does not compile is a finding, not a crash of the whole check
        return Usage(name, arch, 0, 0, 0, error=f"compile failed: {type(e).__name__}: {str(e)[:300]}")


def triton_usage(jobs, only=None):
    from tqdm import tqdm

    work = [(m, i, name, cc) for m, i, name in triton_specs(only) for cc in ARCHS]
    # fork: the workers inherit the imported modules instead of re-importing torch.
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        return list(tqdm(pool.map(compile_triton, work), total=len(work), desc="triton AOT", unit="kernel",
                         disable=None))


def table(rows):
    width = max([len(r.kernel) for r in rows] + [6])
    lines = [f"{'kernel':<{width}}  {'arch':<7} {'regs':>5} {'spill B':>8} {'shared B':>9}  status"]
    for r in rows:
        status = "; ".join(r.problems()) or "ok"
        lines.append(f"{r.kernel:<{width}}  {r.arch:<7} {r.registers:>5} {r.spill:>8} {r.shared:>9}  {status}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel Triton compiles")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only-triton", action="store_true")
    which.add_argument("--only-cuda", action="store_true")
    parser.add_argument("--family", action="append", help="only these Triton families (e.g. norm); repeatable")
    args = parser.parse_args(argv)
    # AOT compilation needs real JIT functions, not the interpreter's (a calling test process may set this).
    os.environ.pop("TRITON_INTERPRET", None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    if not args.only_triton:
        try:
            cuda_rows = cuda_extension_usage()
        except ImportError as e:
            log.error("flashgen._C_cuda is not built (%s): build it with `make build` where torch has CUDA", e)
            return 2
        if not cuda_rows:
            log.error("flashgen._C_cuda holds no kernels")
            return 2
        rows += cuda_rows
    if not args.only_cuda:
        rows += triton_usage(args.jobs, args.family)
    print(table(rows))
    bad = [r for r in rows if r.problems()]
    log.info("%d kernel variants checked, %d with problems", len(rows), len(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
