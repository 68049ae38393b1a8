"""Build flashgen: the Python packages plus flashgen._C (CPU kernels) and flashgen._C_cuda (CUDA kernels).

Environment:
  FLASHGEN_CPU_ARCH   -march for the CPU extension (default x86-64-v3: AVX2+FMA+F16C, so a wheel built
                      here runs on any AVX2 machine; AVX-512 paths are compiled with function target
                      attributes and chosen at run time). Use "native" to tune for the build machine.
  FLASHGEN_BUILD_CUDA 0 skips the CUDA extension; 1 requires it. Default: build it when torch has CUDA
                      and a toolkit is found.
  TORCH_CUDA_ARCH_LIST  GPU targets (default "8.0;9.0a").
"""
import glob
import os

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # A wrapper nvcc on PATH may point torch at the wrong toolkit: prefer the real one.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += glob.glob(os.path.join(root, "*", "include")) + glob.glob(os.path.join(root, "include"))
    return sorted(set(found))


def want_cuda():
    flag = os.environ.get("FLASHGEN_BUILD_CUDA")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise RuntimeError("FLASHGEN_BUILD_CUDA=1 but torch has no CUDA or no CUDA toolkit was found (set CUDA_HOME)")
    return available and bool(rel("csrc/cuda/*.cu"))


# `flashgen serve` (engine/server/): the HTTP stack, metrics and structured output.
SERVE_REQUIRES = ["fastapi", "uvicorn", "prometheus_client", "llguidance"]

cpu_arch = os.environ.get("FLASHGEN_CPU_ARCH", "x86-64-v3")
ext_modules = [
    cpp_extension.CppExtension(
        "flashgen._C",
        rel("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=["-O3", "-std=c++20", "-fopenmp", f"-march={cpu_arch}", "-fno-math-errno", "-Wall",
                            "-Wno-unknown-pragmas"],
        extra_link_args=["-fopenmp"],
    )
]
if want_cuda():
    # After the toolkit's own headers, so the toolkit wins where both have a header. nvcc has no -idirafter:
    # it goes to the host compiler, which also preprocesses nvcc's device pass.
    extra_inc = [f"-idirafter{d}" for d in nvidia_wheel_includes()]
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "flashgen._C_cuda",
            rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"] + extra_inc,
                # Spills are a performance bug: ptxas reports them and the build fails.
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr",
                         "-Xptxas=-v,--warn-on-spills,--warning-as-error"] + [f"-Xcompiler={f}" for f in extra_inc],
            },
        )
    )

setup(
    name="flashgen",
    version="0.1.0",
    description="Fused attention, norm and quantized-matmul kernels, and a small LLM inference engine",
    python_requires=">=3.10",
    packages=["flashgen", "flashgen.kernels", "flashgen.kernels.triton", "flashgen.engine", "flashgen.engine.server",
              "flashgen.integrations"],
    package_dir={"flashgen": "flashgen", "flashgen.kernels": "kernels", "flashgen.engine": "engine"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.6", "numpy", "safetensors", "gguf>=0.10", "tokenizers", "jinja2", "tqdm", "psutil"],
    extras_require={
        "serve": SERVE_REQUIRES,
        "test": ["pytest", "pytest-benchmark", "transformers", "accelerate", "peft", "sentencepiece", "openai",
                 "jsonschema", *SERVE_REQUIRES],
    },
    entry_points={"console_scripts": ["flashgen = flashgen.engine.cli:main"]},
)
