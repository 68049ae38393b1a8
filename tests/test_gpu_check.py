"""benchmarks/gpu_check.py (`make gpu-check`) off a GPU: its benchmark sections on tiny CPU shapes, its roofline
arithmetic, and a clear failure when asked for a GPU that is not there."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402
import roofline  # noqa: E402


def test_smoke_run_writes_every_kernel_and_the_engine(tmp_path):
    out = tmp_path / "results.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--skip-tests", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["failures"] == []
    names = [k["name"] for k in results["kernels"]]
    assert len(names) == 9 and any(n.startswith("decode paged") for n in names)
    for k in results["kernels"]:
        assert k["seconds"] > 0 and k["t_peak"] > 0 and k["bytes"] > 0 and k["flops"] > 0
    engine = results["engine"]
    assert engine["decode_tok_s_graphs"] > 0 and engine["decode_tok_s_eager"] > 0 and engine["prefill_tok_s_eager"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_fails_loudly(tmp_path, caplog):
    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == 1
    assert "needs an NVIDIA GPU" in caplog.text


def test_roofline_arithmetic(monkeypatch):
    work = roofline.attention_work("a", batch=2, heads=4, kv_heads=2, seqlen_q=8, seqlen_k=8, head_dim=16,
                                   causal=True, elem=2)
    assert work.flops == 4 * 2 * 4 * (8 * 8 / 2) * 16
    assert work.bytes == 2 * 2 * 16 * (2 * 4 * 8 + 2 * 2 * 8)
    peak = (1e12, 100e12)
    gemv = roofline.linear_work("g", m=1, n=4096, k=4096, weight_bytes=4096 * 4096 // 2, elem=2)
    assert gemv.bound(peak) == "memory" and gemv.t_peak(peak) == gemv.bytes / 1e12
    gemm = roofline.linear_work("g", m=4096, n=4096, k=4096, weight_bytes=4096 * 4096 * 2, elem=2)
    assert gemm.bound(peak) == "compute" and gemm.record(2 * gemm.t_peak(peak), peak)["efficiency"] == 0.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert roofline.device_peak(torch.device("cuda"), lambda: None) == roofline.PEAKS["H100 80GB HBM3"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert roofline.device_peak(torch.device("cuda"), lambda: (1.0, 2.0)) == (1.0, 2.0)
