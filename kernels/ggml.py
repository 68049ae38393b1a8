"""GGML block types (the tensor types of GGUF files): their layouts and reference dequantizers in PyTorch.

A weight row of K values is K / block blocks of `block_bytes` bytes each, as llama.cpp's ggml-common.h defines
them. Each dequantizer maps uint8 blocks (B, block_bytes) to float32 values (B, block) with the operations, in
the order, of ggml's and gguf-py's dequantizers (float16 fields widened to float32 exactly; integer scales times
the float16 scale are exact in float32), so the values are the file's, bit for bit. A weight stays in its blocks
(a QuantizedWeight of the type's format, kernels/quant.py `from_gguf`), which each device prepacks for its
kernels (`flashgen::ggml_prepack`). (Q8_0 is not here: it runs the int8 kernels.)

K-quants (Q2_K .. Q6_K, IQ4_XS) are super-blocks of 256 values in sub-blocks of 16 or 32, each with a small
integer scale (and min) under float16 super-block scales d (and dmin):  w = d * sc_j * q - dmin * m_j.
"""
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class BlockType:
    name: str
    type_id: int  # ggml_type / gguf.GGMLQuantizationType
    block: int  # values per block
    block_bytes: int
    dequantize: Callable  # uint8 (B, block_bytes) -> float32 (B, block)
    cpu_kernel: bool  # csrc/cpu/ggml.h computes it natively (else a CPU model dequantizes it at load)
    gpu_kernel: bool  # kernels/triton/ggml.py computes it natively (else a GPU model dequantizes it at load)
    half_fields: tuple = ()  # byte offsets of its float16 fields (d, dmin / m) within a block
    cuda_bytes: int = 0  # bytes per block in the CUDA layout of ggml_prepack (kernels/triton/ggml.py); 0: block_bytes

    def row_bytes(self, k):
        return k // self.block * self.block_bytes


def _f16(b, at):
    """The float16 field at byte `at` of each block, as float32 (B, 1)."""
    return b[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _u32(b, at):
    return b[:, at:at + 4].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _nibbles(qs):
    """(B, n) bytes -> (B, 2n) int64: the n low nibbles, then the n high nibbles."""
    qs = qs.to(torch.int64)
    return torch.cat((qs & 0xF, qs >> 4), dim=1)


def _bits(word, count):
    """(B, 1) int64 -> (B, count) its low `count` bits."""
    return (word >> torch.arange(count, device=word.device)) & 1


def _per(values, size):
    """(B, S) per-sub-block values repeated over sub-blocks of `size`."""
    return values.repeat_interleave(size, dim=1)


def q5_0_codes(b):
    """Q5_0 / Q5_1 blocks (B, 22) / (B, 24) -> codes int64 (B, 32) in [0, 31]: the 5th bits qh (a u32) just
    before the 16 bytes of nibbles."""
    at = b.shape[1] - 20
    return _nibbles(b[:, at + 4:]) | (_bits(_u32(b, at), 32) << 4)


def q4_0_codes(b):
    """Q4_0 / Q4_1 blocks (B, 18) / (B, 20) -> codes int64 (B, 32) in [0, 15]: the 16 bytes of nibbles last."""
    return _nibbles(b[:, b.shape[1] - 16:])


def _q4_0(b):  # d, qs[16]: w = d (q - 8)
    return _f16(b, 0) * (q4_0_codes(b) - 8).to(torch.float32)


def _q4_1(b):  # d, m, qs[16]: w = d q + m
    return _f16(b, 0) * q4_0_codes(b).to(torch.float32) + _f16(b, 2)


def _q5_0(b):  # d, qh[4], qs[16]: w = d (q - 16)
    return _f16(b, 0) * (q5_0_codes(b) - 16).to(torch.float32)


def _q5_1(b):  # d, m, qh[4], qs[16]: w = d q + m
    return _f16(b, 0) * q5_0_codes(b).to(torch.float32) + _f16(b, 2)


def _scale_min_k4(s):
    """Q4_K / Q5_K: 8 6-bit scales and mins packed in 12 bytes (B, 12) -> (B, 8), (B, 8) float32."""
    s = s.to(torch.int64)
    lo_sc, lo_mn = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_mn = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), 1).to(torch.float32), torch.cat((lo_mn, hi_mn), 1).to(torch.float32)


def _k_quant(b, q, sc, mn, sub):
    """d * sc_j * q - dmin * m_j for Q2_K / Q4_K / Q5_K (d, dmin the first two float16 fields)."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    return _per(d * sc, sub) * q.to(torch.float32) - _per(dmin * mn, sub)


def q4_k_codes(b):
    """Q4_K blocks (B, 144) -> codes int64 (B, 256) in [0, 15] and sub-block scales, mins float32 (B, 8)."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return torch.cat([_nibbles(b[:, 16 + 32 * i:48 + 32 * i]) for i in range(4)], 1), sc, mn


def _q4_k(b):  # d, dmin, scales[12], qs[128]: 64 values per 32 bytes, low nibbles then high
    q, sc, mn = q4_k_codes(b)
    return _k_quant(b, q, sc, mn, 32)


def q5_k_codes(b):
    """Q5_K blocks (B, 176) -> codes int64 (B, 256) in [0, 31] and sub-block scales, mins float32 (B, 8).
    Bit 2i + h of qh[l] is the 5th bit of value 64i + 32h + l."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48].to(torch.int64)
    q = torch.cat([_nibbles(b[:, 48 + 32 * i:80 + 32 * i])
                   | (torch.cat(((qh >> (2 * i)) & 1, (qh >> (2 * i + 1)) & 1), 1) << 4) for i in range(4)], 1)
    return q, sc, mn


def _q5_k(b):  # d, dmin, scales[12], qh[32], qs[128]
    q, sc, mn = q5_k_codes(b)
    return _k_quant(b, q, sc, mn, 32)


def _two_bit_groups(qs, count):
    """(B, 32 n) bytes -> (B, 128 n): per 32 bytes, bits 0-1 of all, then bits 2-3, 4-5, 6-7 (Q2_K, Q3_K)."""
    qs = qs.to(torch.int64)
    return torch.cat([(qs[:, 32 * c:32 * c + 32] >> (2 * j)) & 3 for c in range(count) for j in range(4)], 1)


def q2_k_codes(b):
    """Q2_K blocks (B, 84) -> codes int64 (B, 256) in [0, 3] and the sub-block scales, mins (B, 16) in [0, 15]."""
    s = b[:, 0:16].to(torch.int64)
    return _two_bit_groups(b[:, 16:80], 2), s & 0xF, s >> 4


def _q2_k(b):  # scales[16] (scale | min << 4), qs[64], d, dmin
    q, sc, mn = q2_k_codes(b)
    d, dmin = _f16(b, 80), _f16(b, 82)
    return _per(d * sc.to(torch.float32), 16) * q.to(torch.float32) - _per(dmin * mn.to(torch.float32), 16)


def q3_k_codes(b):
    """Q3_K blocks (B, 110) -> codes int64 (B, 256) in [0, 7] (q2 + 4 h; the value is code - 4) and the
    sub-block scales (B, 16) in [0, 63] (the scale is sc - 32)."""
    s = b[:, 96:108].to(torch.int64)
    i = torch.arange(16, device=b.device)
    sc = ((s[:, i % 8] >> (4 * (i // 8))) & 0xF) | (((s[:, 8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
    hm = b[:, 0:32].to(torch.int64)
    h = torch.cat([(hm >> j) & 1 for j in range(8)], 1)  # value 32 j + l takes bit j of hmask[l]
    return _two_bit_groups(b[:, 32:96], 2) + 4 * h, sc


def _q3_k(b):  # hmask[32], qs[64], scales[12] (16 6-bit scales), d: w = d (sc - 32) (q2 + 4 h - 4)
    q, sc = q3_k_codes(b)
    return _per(_f16(b, 108) * (sc - 32).to(torch.float32), 16) * (q - 4).to(torch.float32)


def q6_k_codes(b):
    """Q6_K blocks (B, 210) -> codes int64 (B, 256) in [0, 63] (the value is code - 32)."""
    ql, qh = b[:, 0:128].to(torch.int64), b[:, 128:192].to(torch.int64)
    parts = []
    for n in range(2):
        lo, hi = ql[:, 64 * n:64 * n + 64], qh[:, 32 * n:32 * n + 32]
        for t in range(4):
            nib = (lo[:, 32 * (t % 2):32 * (t % 2) + 32] >> (4 * (t // 2))) & 0xF
            parts.append(nib | (((hi >> (2 * t)) & 3) << 4))
    return torch.cat(parts, 1)


def _q6_k(b):  # ql[128], qh[64], scales int8[16], d: w = d sc_j (q - 32), sub-blocks of 16
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return _per(_f16(b, 208) * sc, 16) * (q6_k_codes(b) - 32).to(torch.float32)


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


def _iq4(codes):
    return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=codes.device)[codes]


def iq4_nl_codes(b):
    """IQ4_NL blocks (B, 18) -> codes int64 (B, 32) in [0, 15] (indices into IQ4_VALUES)."""
    return _nibbles(b[:, 2:18])


def _iq4_nl(b):  # d, qs[16]: w = d kvalues[q]
    return _f16(b, 0) * _iq4(iq4_nl_codes(b))


def iq4_xs_codes(b):
    """IQ4_XS blocks (B, 136) -> codes int64 (B, 256) in [0, 15] and the sub-block scales (B, 8) in [0, 63]
    (the scale is ls - 32)."""
    i = torch.arange(8, device=b.device)
    sl = b[:, 4:8].to(torch.int64)
    sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    ls = ((sl[:, i // 2] >> (4 * (i % 2))) & 0xF) | (((sh >> (2 * i)) & 3) << 4)
    return torch.cat([_nibbles(b[:, 8 + 16 * j:24 + 16 * j]) for j in range(8)], 1), ls


def _iq4_xs(b):  # d, scales_h u16, scales_l[4], qs[128]: 8 sub-blocks of 32, w = d (ls - 32) kvalues[q]
    q, ls = iq4_xs_codes(b)
    return _per(_f16(b, 0) * (ls - 32).to(torch.float32), 32) * _iq4(q)


BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 18, _q4_0, True, True, half_fields=(0,)),
    BlockType("Q4_1", 3, 32, 20, _q4_1, True, True, half_fields=(0, 2)),
    BlockType("Q5_0", 6, 32, 22, _q5_0, True, True, half_fields=(0,)),
    BlockType("Q5_1", 7, 32, 24, _q5_1, True, True, half_fields=(0, 2)),
    BlockType("Q2_K", 10, 256, 84, _q2_k, True, True, half_fields=(80, 82)),
    BlockType("Q3_K", 11, 256, 110, _q3_k, True, True, half_fields=(108,), cuda_bytes=114),
    BlockType("Q4_K", 12, 256, 144, _q4_k, True, True, half_fields=(0, 2), cuda_bytes=148),
    BlockType("Q5_K", 13, 256, 176, _q5_k, True, True, half_fields=(0, 2), cuda_bytes=180),
    BlockType("Q6_K", 14, 256, 210, _q6_k, True, True, half_fields=(208,)),
    BlockType("IQ4_NL", 20, 32, 18, _iq4_nl, True, True, half_fields=(0,)),
    BlockType("IQ4_XS", 23, 256, 136, _iq4_xs, True, True, half_fields=(0,), cuda_bytes=138),
)}
BY_ID = {t.type_id: t for t in BLOCK_TYPES.values()}


def block_type(name_or_id):
    """The BlockType of a name ("Q4_K") or a GGML type id (12); ValueError naming the supported ones."""
    found = BY_ID.get(name_or_id) if isinstance(name_or_id, int) else BLOCK_TYPES.get(getattr(name_or_id, "name",
                                                                                              name_or_id))
    if found is None:
        raise ValueError(f"ggml_type must be one of {sorted(BLOCK_TYPES)} (or their type ids), got {name_or_id!r}")
    return found


def cuda_row_bytes(type_id, k):
    """Bytes of one row of K values in the CUDA layout of ggml_prepack (kernels/triton/ggml.py)."""
    t = block_type(type_id)
    return k // t.block * (t.cuda_bytes or t.block_bytes)


def random_blocks(name, count, generator=None):
    """`count` blocks of type `name` with random codes and sub-block scales (every bit pattern is a valid one)
    and random finite float16 scales in its float16 fields (tests and benchmarks)."""
    t = BLOCK_TYPES[name]
    blocks = torch.randint(0, 256, (count, t.block_bytes), dtype=torch.uint8, generator=generator)
    for at in t.half_fields:
        scale = (torch.rand(count, generator=generator) * 0.02 + 1e-3).to(torch.float16)
        blocks[:, at:at + 2] = scale.view(torch.uint8).reshape(count, 2)
    return blocks


def dequantize_rows(blocks, type_id, in_features):
    """uint8 blocks (N, K / block * block_bytes) -> float32 (N, K)."""
    t = block_type(type_id)
    n = blocks.shape[0]
    return t.dequantize(blocks.reshape(-1, t.block_bytes)).reshape(n, in_features)
