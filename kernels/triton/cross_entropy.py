"""Triton fused linear cross-entropy: flashgen::linear_cross_entropy_fwd / _bwd on CUDA (math in
kernels/cross_entropy.py).

The host walks the rows in chunks whose float32 logits fit in CHUNK_ELEMS; each chunk's logits come from one
cuBLAS GEMM (torch.matmul), then one program per row runs over the vocabulary in BLOCK columns: the
forward's online max / sum gives lse and the loss, the backward rewrites the row in place into
dz = g (softmax - onehot), which two more GEMMs turn into dhidden and (accumulated) dweight.
"""
import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
CHUNK_ELEMS = 1 << 24  # 64 MiB of float32 logits per chunk


@triton.jit
def _ce_fwd(Z, stride_z, Target, Lse, Loss, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    Z += row * stride_z
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(Z + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        # a lane that has seen only padding shifts by 0, not -inf (exp(-inf - -inf) would be NaN): its sum stays 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    t = tl.load(Target + row)
    valid = t != ignore_index
    picked = tl.load(Z + tl.where(valid, t, 0))
    tl.store(Lse + row, lse)
    tl.store(Loss + row, tl.where(valid, lse - picked, 0.0))


@triton.jit
def _ce_bwd(Z, stride_z, Target, Lse, DLoss, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    Z += row * stride_z
    t = tl.load(Target + row)
    valid = t != ignore_index
    g = tl.where(valid, tl.load(DLoss + row), 0.0)
    lse = tl.load(Lse + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(Z + cols, mask=mask, other=0.0)
        dz = tl.exp(z - lse) * g - tl.where((cols == t) & valid, g, 0.0)
        tl.store(Z + cols, dz, mask=mask)


def _check(name, hidden, weight, bias, target):
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: hidden must be (tokens, H) and weight (vocab, H), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if target.dtype != torch.int64 or target.shape != hidden.shape[:1]:
        raise ValueError(f"{name}: target must be int64 ({hidden.shape[0]},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise ValueError(f"{name}: {arg} must have hidden's dtype {hidden.dtype} and device {hidden.device}")


def _chunks(n, v):
    step = max(1, min(n, CHUNK_ELEMS // max(v, 1)))
    return [(r0, min(step, n - r0)) for r0 in range(0, n, step)]


def _logits(h, w32, b32):
    z = h.float() @ w32.T
    return z + b32 if b32 is not None else z


def linear_cross_entropy_fwd(hidden, weight, bias, target, ignore_index):
    _check("linear_cross_entropy_fwd", hidden, weight, bias, target)
    n, v = hidden.shape[0], weight.shape[0]
    w32, b32 = weight.float(), bias.float() if bias is not None else None
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for r0, rows in _chunks(n, v):
        z = _logits(hidden[r0:r0 + rows], w32, b32)
        _ce_fwd[(rows,)](z, z.stride(0), target[r0:], lse[r0:], loss[r0:], v, ignore_index, BLOCK=BLOCK,
                         num_warps=NUM_WARPS)
    return loss, lse


def linear_cross_entropy_bwd(dloss, hidden, weight, bias, target, lse, ignore_index):
    _check("linear_cross_entropy_bwd", hidden, weight, bias, target)
    n, v = hidden.shape[0], weight.shape[0]
    w32, b32 = weight.float(), bias.float() if bias is not None else None
    dloss = dloss.float().contiguous()
    dh = torch.empty_like(hidden)
    dw = torch.zeros_like(w32)
    db = torch.zeros_like(b32) if b32 is not None else None
    for r0, rows in _chunks(n, v):
        h = hidden[r0:r0 + rows]
        z = _logits(h, w32, b32)
        _ce_bwd[(rows,)](z, z.stride(0), target[r0:], lse[r0:], dloss[r0:], v, ignore_index, BLOCK=BLOCK,
                         num_warps=NUM_WARPS)
        dh[r0:r0 + rows] = (z @ w32).to(hidden.dtype)
        dw.addmm_(z.T, h.float())
        if db is not None:
            db += z.sum(0)
    return dh, dw.to(weight.dtype), db.to(weight.dtype) if db is not None else hidden.new_empty(0)


KERNELS = {"linear_cross_entropy_fwd": linear_cross_entropy_fwd, "linear_cross_entropy_bwd": linear_cross_entropy_bwd}


def aot_specs():
    """Both row kernels (float32 logits; the GEMMs are cuBLAS's)."""
    common = {"Z": "*fp32", "stride_z": "i64", "Target": "*i64", "Lse": "*fp32"}
    fwd = {**common, "Loss": "*fp32", "V": "i32", "ignore_index": "i64", "BLOCK": "constexpr"}
    bwd = {**common, "DLoss": "*fp32", "V": "i32", "ignore_index": "i64", "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 2, 3, 4)}
    return [{"name": f"_ce_{kind}", "fn": fn, "signature": sig, "constexprs": {"BLOCK": BLOCK}, "attrs": attrs,
             "num_warps": NUM_WARPS, "num_stages": 1}
            for kind, fn, sig in (("fwd", _ce_fwd, fwd), ("bwd", _ce_bwd, bwd))]
