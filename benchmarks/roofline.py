"""Rooflines: what a kernel must move and compute, and the time that takes at a device's peak.

A kernel of `bytes` bytes moved and `flops` floating-point operations cannot beat
    t_peak = max(bytes / peak_bandwidth, flops / peak_flops);
`efficiency` = t_peak / t_measured says how close a measured time comes to it.
"""
import dataclasses

import torch

# Dense peaks from the vendors' data sheets: (bytes/s, bf16 tensor-core FLOP/s without sparsity).
PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100 80GB HBM3": (3.35e12, 989e12),  # the SXM part
    "H100 NVL": (3.9e12, 835e12),
    "H100 PCIe": (2.0e12, 756e12),
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100-SXM4-40GB": (1.555e12, 312e12),
    "A100-PCIE": (1.935e12, 312e12),
    "L40S": (0.864e12, 362e12),
    "A10": (0.6e12, 125e12),
}


@dataclasses.dataclass
class Work:
    """What one call of a kernel moves (bytes) and computes (flops)."""

    name: str
    bytes: float
    flops: float

    def t_peak(self, peak):
        bandwidth, compute = peak
        return max(self.bytes / bandwidth, self.flops / compute)

    def bound(self, peak):
        bandwidth, compute = peak
        return "memory" if self.bytes / bandwidth >= self.flops / compute else "compute"

    def line(self, seconds, peak):
        """One roofline line: measured time, achieved GB/s and TFLOP/s, time at peak and efficiency."""
        return (f"{self.name:<44} {seconds * 1e6:10.1f} us  {self.bytes / seconds / 1e9:8.1f} GB/s  "
                f"{self.flops / seconds / 1e12:7.2f} TFLOP/s  peak {self.t_peak(peak) * 1e6:9.1f} us "
                f"({self.bound(peak)})  {100 * self.t_peak(peak) / seconds:5.1f}% of roofline")

    def record(self, seconds, peak):
        return {"name": self.name, "seconds": seconds, "bytes": self.bytes, "flops": self.flops,
                "t_peak": self.t_peak(peak), "bound": self.bound(peak), "efficiency": self.t_peak(peak) / seconds}


def device_peak(device, measure):
    """(bytes/s, FLOP/s) of `device`: the data sheet's for a known GPU, else measure() (a (bytes/s, FLOP/s)
    estimate timed on the device itself)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(PEAKS, key=len, reverse=True):  # the longest name that matches
            if key.replace(" ", "").lower() in name.replace(" ", "").lower():
                return PEAKS[key]
    return measure()


def attention_work(name, batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, causal, elem):
    """Prefill attention: QK^T and PV, 4 b h sq sk d FLOPs (half of it causal, sq = sk), q, k, v, out once."""
    pairs = seqlen_q * seqlen_k / (2 if causal and seqlen_q == seqlen_k else 1)
    moved = elem * batch * head_dim * (2 * heads * seqlen_q + 2 * kv_heads * seqlen_k)
    return Work(name, moved, 4 * batch * heads * pairs * head_dim)


def decode_work(name, batch, heads, kv_heads, context, head_dim, elem):
    """Decode over a KV cache: every cached key and value read once; 4 b h ctx d FLOPs."""
    return Work(name, elem * batch * (2 * kv_heads * context * head_dim + 2 * heads * head_dim),
                4 * batch * heads * context * head_dim)


def linear_work(name, m, n, k, weight_bytes, elem):
    """y (m, n) = x (m, k) W^T with W of weight_bytes bytes: 2 m n k FLOPs."""
    return Work(name, weight_bytes + elem * m * (k + n), 2 * m * n * k)


def norm_work(name, rows, cols, elem, residual):
    """Fused (add +) RMSNorm: x (and the residual in and out) and y, once each; about 4 FLOPs per element."""
    return Work(name, elem * rows * cols * (4 if residual else 2) + elem * cols, 4 * rows * cols)
