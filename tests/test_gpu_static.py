"""The static GPU check (benchmarks/gpu_static.py): every CUDA C++ kernel in flashgen._C_cuda and every Triton
kernel variant compiles for sm_80 / sm_90 with no spills and within the shared-memory limit. No GPU needed."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_static  # noqa: E402


def test_problems_are_reported():
    assert gpu_static.Usage("k", "sm_80", 64, 0, 1024).problems() == []
    assert gpu_static.Usage("k", "sm_80", 255, 16, 1024).problems() == ["16 bytes of local memory / stack (spills)"]
    over = gpu_static.Usage("k", "sm_80", 64, 0, 200 * 1024).problems()
    assert over == [f"shared memory {200 * 1024} > {163 * 1024}"]
    assert gpu_static.Usage("k", "sm_90a", 64, 0, 200 * 1024).problems() == []
    assert gpu_static.Usage("k", "sm_90", 0, 0, 0, error="compile failed").problems() == ["compile failed"]


@pytest.mark.skipif(torch.version.cuda is None, reason="torch has no CUDA, so flashgen._C_cuda is not built")
def test_every_gpu_kernel_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_static.py"), "--jobs", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"gpu_static.py failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert "rms_norm_fwd_kernel" in r.stdout, "the CUDA extension's kernels are missing from the table"
    assert "_norm_fwd[rms" in r.stdout, "the Triton norm kernels are missing from the table"
