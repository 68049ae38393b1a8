"""CPU C++ attention kernels (flashgen::flash_attn_fwd / _bwd / _kvcache) against the float64 reference.

The FlashAttention rule: the kernel's max error against the float64 reference is at most twice the error of
the reference computed at the kernel's precision, plus a small floor; for out, lse and dq, dk, dv.
Outputs are poisoned (torch.empty fills with NaN) and unused cache slots hold NaN, so unwritten or
out-of-range elements show.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

from flashgen.kernels import _backend, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashgen.kernels import reference as ref
from flashgen.kernels.attention import check_cache_contents

from attention_checks import key_major

OPS = ["flash_attn_fwd", "flash_attn_bwd", "flash_attn_kvcache"]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _poison_empty():
    """torch.empty (also inside the C++ kernels) returns NaN-filled memory, so unwritten outputs show."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_cpu_kernels_are_registered():
    for op in OPS:
        assert _backend.has_kernel(op, "CPU"), f"flashgen::{op} has no CPU kernel: tests would check the reference"


def _floor(dtype):
    return {F32: 2e-6, BF16: 2e-3, F16: 5e-4}[dtype]


def assert_flash_rule(name, got, low, exact):
    """max|got - exact| <= 2 max|low - exact| + floor (scaled by the magnitude of exact)."""
    assert not got.isnan().any(), f"{name}: NaN in the kernel's result"
    fin = exact.isfinite()
    assert torch.equal(fin, got.isfinite()), f"{name}: -inf pattern differs from the reference"
    got, low, exact = got.double()[fin], low.double()[fin], exact[fin]
    if exact.numel() == 0:
        return
    err, base = (got - exact).abs().max().item(), (low - exact).abs().max().item()
    floor = _floor(low.dtype if low.dtype != torch.float64 else F32) * (1 + exact.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: kernel error {err:.3g} > 2 x reference error {base:.3g} + {floor:.3g}"


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _fwd_bwd(args, opts):
    """out, lse and (dq, dk, dv) of flash_attn_fwd / _bwd through the dispatcher (the CPU kernels)."""
    dout, q, k, v, cu_q, cu_k = args
    fwd = torch.ops.flashgen.flash_attn_fwd(q, k, v, cu_q, cu_k, 0, 0, *opts)
    bwd = torch.ops.flashgen.flash_attn_bwd(dout, q, k, v, *fwd, cu_q, cu_k, 0, 0, *opts)
    return fwd, bwd


def _ref_fwd_bwd(args, opts, dtype=None):
    """The same through the Python reference, on the inputs cast to dtype (float64 if None)."""
    cast = [t.to(dtype or torch.float64) if t is not None and t.is_floating_point() else t for t in args]
    dout, q, k, v, cu_q, cu_k = cast
    fwd = ref.flash_attn_fwd(q, k, v, cu_q, cu_k, 0, 0, *opts)
    bwd = ref.flash_attn_bwd(dout, q, k, v, *fwd, cu_q, cu_k, 0, 0, *opts)
    return fwd, bwd


def check_against_reference(args, opts, dtype):
    got = _fwd_bwd(args, opts)
    low, exact = _ref_fwd_bwd(args, opts, dtype), _ref_fwd_bwd(args, opts)
    names = [("out", "lse"), ("dq", "dk", "dv")]
    for gs, ls, es, ns in zip(got, low, exact, names):
        for g, lo, e, n in zip(gs, ls, es, ns):
            assert g.shape == e.shape and g.dtype == (F32 if n == "lse" else dtype), n
            assert_flash_rule(n, g, lo, e)


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap, dtype): together every head
# dim, every seqlen (q != k), GQA 1/2/8, both mask kinds, windows and softcap, in every dtype.
DENSE_CASES = [
    (2, 1, 17, 4, 4, 64, True, (-1, -1), 0.0, F32),
    (1, 17, 1, 2, 1, 40, False, (-1, -1), 0.0, BF16),
    (2, 97, 128, 8, 1, 80, True, (-1, -1), 0.0, F32),
    (1, 128, 97, 4, 2, 96, True, (-1, -1), 0.0, BF16),
    (1, 200, 1025, 2, 1, 128, False, (-1, -1), 0.0, F32),
    (1, 1025, 200, 2, 2, 64, True, (-1, -1), 0.0, F32),
    (1, 200, 200, 2, 1, 256, True, (-1, -1), 0.0, BF16),
    (1, 97, 200, 4, 2, 64, False, (32, 8), 0.0, F32),
    (1, 128, 128, 2, 2, 40, True, (16, -1), 0.0, F32),
    (2, 97, 97, 4, 1, 64, True, (-1, -1), 2.0, F32),
    (1, 17, 128, 8, 8, 96, False, (4, 4), 5.0, BF16),
    (1, 97, 97, 2, 1, 80, True, (-1, -1), 0.0, F16),
    (1, 1025, 1025, 2, 1, 64, True, (-1, -1), 0.0, BF16),
    (1, 33, 70, 2, 1, 8, False, (-1, 20), 3.0, F32),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c[:9])) + f"-{str(c[9])[6:]}")
def test_dense_forward_backward(case):
    b, sq, sk, h, hkv, d, causal, window, softcap, dtype = case
    q = _rand(b, sq, h, d, dtype=dtype, scale=2.0 if softcap else 1.0)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    dout = _rand(b, sq, h, d, dtype=dtype)
    opts = (d ** -0.5, causal, *window, softcap)
    check_against_reference((dout, q, k, v, None, None), opts, dtype)


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("dtype,causal,window,softcap", [(F32, True, (-1, -1), 0.0), (BF16, False, (8, 3), 1.5)])
def test_varlen_forward_backward(dtype, causal, window, softcap):
    lens_q, lens_k = [1, 97, 17, 0, 130, 5], [17, 97, 1, 4, 200, 5]
    h, hkv, d = 4, 2, 64
    q = _rand(sum(lens_q) + 3, h, d, dtype=dtype)  # 3 trailing tokens outside every sequence
    k, v = _rand(sum(lens_k), hkv, d, dtype=dtype), _rand(sum(lens_k), hkv, d, dtype=dtype)
    dout = _rand(*q.shape, dtype=dtype)
    opts = (d ** -0.5, causal, *window, softcap)
    check_against_reference((dout, q, k, v, _cu(lens_q), _cu(lens_k)), opts, dtype)


def _cache(batch, cache_len, n_new, hkv, d, block_size, dtype):
    """A cache holding cache_len[b] tokens per sequence (NaN in every unused slot), contiguous when block_size
    is None, else paged with a random permutation of the blocks as the block table."""
    need = [c + n_new for c in cache_len]
    if block_size is None:
        shape, table = (batch + 1, max(need) + 3, hkv, d), None
    else:
        per_seq = max(-(-n // block_size) for n in need) + 1
        perm = torch.randperm(batch * per_seq + 2)
        table = perm[: batch * per_seq].view(batch, per_seq).to(torch.int32)
        shape = (batch * per_seq + 2, block_size, hkv, d)
    kc, vc = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    lens = torch.tensor(cache_len, dtype=torch.int32)
    for b, n in enumerate(cache_len):  # fill the first n tokens of each sequence
        if table is None:
            where = (b, slice(0, n))
        else:
            where = ref.cache_positions(table, b, n, block_size)
        kc[where], vc[where] = _rand(n, hkv, d, dtype=dtype), _rand(n, hkv, d, dtype=dtype)
    return kc, vc, lens, table


# (cache lengths per sequence, seqlen_q, new tokens, heads, kv_heads, head_dim, block_size, num_splits, dtype,
#  causal, window, softcap)
DECODE_CASES = [
    ([1, 255], 1, 1, 4, 4, 64, 16, 0, F32, True, (-1, -1), 0.0),
    ([4097], 1, 0, 9, 3, 64, 256, 0, F32, True, (-1, -1), 0.0),
    ([255, 4097, 1], 1, 1, 8, 1, 128, None, 3, BF16, True, (-1, -1), 0.0),
    ([4096, 17], 5, 5, 4, 2, 80, 16, 0, F32, True, (-1, -1), 0.0),
    ([255, 1000], 3, 0, 4, 2, 40, 256, 1, BF16, True, (100, -1), 0.0),
    ([1, 300], 7, 7, 16, 2, 96, None, 0, F32, False, (-1, -1), 5.0),
    ([0, 100], 1, 1, 2, 1, 256, 16, 2, F16, True, (-1, -1), 0.0),
    ([60, 200], 33, 33, 8, 2, 64, 16, 0, BF16, True, (-1, -1), 0.0),  # 33 x 4 packed rows: several row groups
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0]}-q{c[1]}-new{c[2]}-d{c[5]}-bs{c[6]}-s{c[7]}")
def test_kvcache(case):
    cache_len, sq, n_new, h, hkv, d, block_size, splits, dtype, causal, window, softcap = case
    batch = len(cache_len)
    kc, vc, lens, table = _cache(batch, cache_len, n_new, hkv, d, block_size, dtype)
    q = _rand(batch, sq, h, d, dtype=dtype)
    k, v = (_rand(batch, n_new, hkv, d, dtype=dtype) if n_new else None for _ in range(2))
    opts = (d ** -0.5, causal, *window, softcap, splits)

    def run(fn, cast):
        c = [cast(t) if t is not None else None for t in (q, kc, vc, k, v)]
        out = fn(c[0], c[1], c[2], c[3], c[4], lens, table, *opts)
        return out, c[1], c[2]

    got, kc_got, vc_got = run(torch.ops.flashgen.flash_attn_kvcache, lambda t: t.clone())
    low, _, _ = run(ref.flash_attn_kvcache, lambda t: t.clone())
    exact, kc_ref, vc_ref = run(ref.flash_attn_kvcache, lambda t: t.double())
    for name, g, lo, e in zip(("out", "lse"), got, low, exact):
        assert_flash_rule(name, g, lo, e)
    # The new tokens were written in place, exactly, and nothing else changed.
    torch.testing.assert_close(kc_got.double(), kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc_got.double(), vc_ref, rtol=0, atol=0, equal_nan=True)
    # Key-major keys (the engine's CPU cache) give the same results bit for bit and take the append alike.
    km, kc_km, _ = run(torch.ops.flashgen.flash_attn_kvcache, lambda t: key_major(t) if t is kc else t.clone())
    assert kc_km.stride(1) == 1
    for g, k_ in zip(got, km):
        assert torch.equal(g, k_)
    torch.testing.assert_close(kc_km.double(), kc_ref, rtol=0, atol=0, equal_nan=True)


def test_kvcache_pages_out_of_order_inside_a_key_block():
    """Keys 0-63 on pages 0, 5, 4, 3: the first and last lie where one stride from page 0 would put them, the
    middle two do not, so only a check of every page boundary sees that the block must be gathered."""
    bs, h, hkv, d = 16, 4, 2, 64
    kc, vc = _rand(6, bs, hkv, d, dtype=F32), _rand(6, bs, hkv, d, dtype=F32)
    table = torch.tensor([[0, 5, 4, 3, 1, 2]], dtype=torch.int32)
    q, lens = _rand(1, 1, h, d, dtype=F32), torch.tensor([96], dtype=torch.int32)
    opts = (d ** -0.5, True, -1, -1, 0.0, 1)
    got = torch.ops.flashgen.flash_attn_kvcache(q, kc, vc, None, None, lens, table, *opts)
    low = ref.flash_attn_kvcache(q, kc, vc, None, None, lens, table, *opts)
    exact = ref.flash_attn_kvcache(q.double(), kc.double(), vc.double(), None, None, lens, table, *opts)
    for name, g, lo, e in zip(("out", "lse"), got, low, exact):
        assert_flash_rule(name, g, lo, e)


def test_kvcache_splits_agree_and_public_api_appends():
    kc, vc, lens, table = _cache(2, [700, 1500], 1, 2, 64, 16, F32)
    q, k, v = _rand(2, 1, 4, 64, dtype=F32), _rand(2, 1, 2, 64, dtype=F32), _rand(2, 1, 2, 64, dtype=F32)
    outs = []
    for splits in (1, 4, 0):
        kcs, vcs = kc.clone(), vc.clone()
        outs.append(flash_attn_with_kvcache(q, kcs, vcs, k, v, cache_seqlens=lens, block_table=table,
                                            num_splits=splits, return_lse=True))
        pos = ref.cache_positions(table, 1, 1501, 16)
        assert torch.equal(kcs[pos[0][1500], pos[1][1500]], k[1, 0])
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-5, atol=1e-6)


def test_public_functions_match_reference():
    q, k, v = _rand(2, 33, 4, 40, dtype=F32), _rand(2, 50, 2, 40, dtype=F32), _rand(2, 50, 2, 40, dtype=F32)
    out, lse = flash_attn_func(q, k, v, causal=True, window_size=(10, -1), return_lse=True)
    e_out, e_lse = ref.flash_attn_fwd(q.double(), k.double(), v.double(), None, None, 33, 50, 40 ** -0.5, True, 10,
                                      -1, 0.0)
    torch.testing.assert_close(out.double(), e_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), e_lse, rtol=0, atol=1e-5)
    cu = _cu([33, 33])
    vout = flash_attn_varlen_func(q.flatten(0, 1), k[:, :33].flatten(0, 1), v[:, :33].flatten(0, 1), cu, cu, 33, 33)
    torch.testing.assert_close(vout.view_as(q), flash_attn_func(q, k[:, :33], v[:, :33]), rtol=1e-6, atol=1e-6)


def test_strided_inputs_and_caches():
    """q, k, v sliced out of one packed qkv tensor, and caches that are views of one (.., 2, kv_heads, d) buffer."""
    qkv = _rand(2, 70, 4 + 2 + 2, 64, dtype=F32)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    dout = _rand(2, 70, 4, 64, dtype=F32)
    check_against_reference((dout, q, k, v, None, None), (0.125, True, -1, -1, 0.0), F32)
    kv_cache = _rand(3, 100, 2, 2, 64, dtype=F32)
    kc, vc = kv_cache[:, :, 0], kv_cache[:, :, 1]
    new_k, new_v = _rand(2, 1, 2, 64, dtype=F32), _rand(2, 1, 2, 64, dtype=F32)
    lens = torch.tensor([50, 98], dtype=torch.int32)
    exact_kc, exact_vc = kc.double(), vc.double()
    out = torch.ops.flashgen.flash_attn_kvcache(q[:, :1], kc, vc, new_k, new_v, lens, None, 0.125, True, -1, -1, 0.0, 0)
    exact = ref.flash_attn_kvcache(q[:, :1].double(), exact_kc, exact_vc, new_k.double(), new_v.double(), lens, None,
                                   0.125, True, -1, -1, 0.0, 0)
    assert torch.equal(kc.double(), exact_kc) and torch.equal(vc.double(), exact_vc)
    for g, e in zip(out, exact):
        torch.testing.assert_close(g.double(), e, rtol=0, atol=1e-5)


def test_backward_is_bitwise_deterministic_across_runs_and_threads():
    q = _rand(1, 200, 8, 64, dtype=BF16).requires_grad_()
    k, v = _rand(1, 300, 2, 64, dtype=BF16).requires_grad_(), _rand(1, 300, 2, 64, dtype=BF16).requires_grad_()
    dout = _rand(1, 200, 8, 64, dtype=BF16)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout))
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


def test_autograd_matches_reference_gradients():
    q = _rand(2, 17, 4, 64, dtype=F32).requires_grad_()
    k, v = _rand(2, 40, 2, 64, dtype=F32).requires_grad_(), _rand(2, 40, 2, 64, dtype=F32).requires_grad_()
    grads = torch.autograd.grad(flash_attn_func(q, k, v, causal=True, softcap=3.0).square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = ref.flash_attn_fwd(q64, k64, v64, None, None, 17, 40, 0.125, True, -1, -1, 3.0)[0]
    exact = torch.autograd.grad(out64.square().sum(), (q64, k64, v64))
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g.double(), e, rtol=0, atol=1e-4 * (1 + e.abs().max().item()))


def test_torch_compile_fullgraph_forward_backward():
    q = _rand(1, 40, 4, 64, dtype=F32).requires_grad_()
    k, v = _rand(1, 50, 2, 64, dtype=F32).requires_grad_(), _rand(1, 50, 2, 64, dtype=F32).requires_grad_()

    def loss(q, k, v):
        return flash_attn_func(q, k, v, causal=True, window_size=(20, -1)).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, e in zip(got, eager):
        assert torch.equal(g, e)


def _opcheck_args():
    q, k, v = _rand(2, 9, 4, 16, dtype=F32), _rand(2, 12, 2, 16, dtype=F32), _rand(2, 12, 2, 16, dtype=F32)
    opts = (0.25, True, -1, -1, 0.0)
    fwd = torch.ops.flashgen.flash_attn_fwd(q, k, v, None, None, 9, 12, *opts)
    cu_q, cu_k = _cu([4, 5]), _cu([7, 5])
    qv, kv, vv = q.flatten(0, 1), k[:, :6].flatten(0, 1), v[:, :6].flatten(0, 1)
    kc, vc, lens, table = _cache(2, [5, 30], 2, 2, 16, 16, F32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    grad = [t.clone().requires_grad_() for t in (q, k, v)]
    packed = _rand(2, 12, 8, 16, dtype=F32).requires_grad_()
    return [
        ("flash_attn_fwd", (*grad, None, None, 9, 12, *opts)),
        ("flash_attn_fwd", (qv.requires_grad_(), kv, vv, cu_q, cu_k, 5, 7, 0.25, False, 2, 1, 1.0)),
        ("flash_attn_bwd", (torch.randn_like(q), q, k, v, *fwd, None, None, 9, 12, *opts)),
        ("flash_attn_kvcache", (q[:, :2], kc, vc, k[:, :2], v[:, :2], lens, table, 0.25, True, -1, -1, 0.0, 0)),
        # strided q, k, v (slices of one packed tensor): the outputs are contiguous, as the fakes say
        ("flash_attn_fwd", (*packed.split([4, 2, 2], 2), None, None, 12, 12, *opts)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    name, args = _opcheck_args()[i]
    opcheck(getattr(torch.ops.flashgen, name).default, args)


def test_avx2_path_in_a_subprocess():
    """The machine may have AVX-512; FLASHGEN_NO_AVX512=1 makes the kernels take the AVX2 path."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import test_attention as t\n"
        "t.test_dense_forward_backward(t.DENSE_CASES[3]); t.test_dense_forward_backward(t.DENSE_CASES[13])\n"
        "t.test_kvcache(t.DECODE_CASES[4])\n"
        "import test_attention_varlen_kvcache as v; [v.test_matches_reference(c) for c in v.CASES[-2:]]\n"
        "print('ok')\n" % os.path.dirname(__file__)
    )
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLASHGEN_NO_AVX512": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- bad inputs
def _qkv(b=1, sq=4, sk=4, h=4, hkv=2, d=64, dtype=F32):
    return torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype), torch.randn(b, sk, hkv, d,
                                                                                                       dtype=dtype)


@pytest.mark.parametrize("make,match", [
    (lambda: flash_attn_func(*_qkv(d=0)), "head_dim"),
    (lambda: flash_attn_func(*_qkv(d=264)), "head_dim"),
    (lambda: flash_attn_func(*_qkv(h=3, hkv=2)), "multiple"),
    (lambda: flash_attn_func(*_qkv()[:2], _qkv(dtype=BF16)[2]), "dtype"),
    (lambda: flash_attn_func(*_qkv()[:2], _qkv()[2].to("meta")), "device"),
    (lambda: flash_attn_func(*_qkv(dtype=torch.float64)), "float16, bfloat16 or float32"),
    (lambda: flash_attn_varlen_func(*[t[0] for t in _qkv()], _cu([4]).long(), _cu([4]), 4, 4), "int32"),
    (lambda: flash_attn_varlen_func(*[t[0] for t in _qkv()], _cu([5]), _cu([4]), 5, 4), "packed tokens"),
])
def test_bad_inputs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _decode_inputs(block_size=16, blocks=4):
    q = torch.randn(2, 1, 4, 64)
    kc, vc = torch.zeros(blocks * 2, block_size, 2, 64), torch.zeros(blocks * 2, block_size, 2, 64)
    table = torch.arange(blocks * 2, dtype=torch.int32).view(2, blocks)
    return q, kc, vc, table


def test_kvcache_bad_inputs():
    q, kc, vc, table = _decode_inputs()
    new = torch.randn(2, 1, 2, 64)
    # Lengths and block indices are checked by the kernel (C++ on CPU: RuntimeError), shapes in Python.
    with pytest.raises(RuntimeError, match="needs 5 blocks but block_table has 4"):
        flash_attn_with_kvcache(q, kc, vc, new, new, cache_seqlens=64, block_table=table)
    bad = table.clone()
    bad[1, 0] = 99
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = 99 is outside"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, block_table=bad)
    # The same checks in Python, which GPU tensors get (their kernels don't check).
    with pytest.raises(ValueError, match="too small"):
        check_cache_contents(kc, torch.tensor([64, 3], dtype=torch.int32), table, 1)
    with pytest.raises(ValueError, match="block_table has entries outside"):
        check_cache_contents(kc, torch.tensor([3, 3], dtype=torch.int32), bad, 0)
    check_cache_contents(kc, torch.tensor([63, 3], dtype=torch.int32), table, 1)
    q8, kc8, vc8, table8 = _decode_inputs(block_size=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        flash_attn_with_kvcache(q8, kc8, vc8, cache_seqlens=3, block_table=table8)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([1, 2]), block_table=table)
    # The C++ kernel checks on its own too (callers of torch.ops skip the Python checks): no crash.
    with pytest.raises(RuntimeError, match="block_table"):
        torch.ops.flashgen.flash_attn_kvcache(q, kc, vc, None, None, torch.tensor([3, 3], dtype=torch.int32), bad,
                                              0.125, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="cache tokens"):
        torch.ops.flashgen.flash_attn_kvcache(q, kc[:2], vc[:2], new, new, torch.tensor([3, 64], dtype=torch.int32),
                                              None, 0.125, True, -1, -1, 0.0, 0)
    lens = torch.tensor([3, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"k_cache must be contiguous in head_dim \(stride\(3\) == 1\) or in its"):
        torch.ops.flashgen.flash_attn_kvcache(q, kc.transpose(0, 3).contiguous().transpose(0, 3), vc, None, None,
                                              lens, table, 0.125, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"v_cache must be contiguous in head_dim"):
        torch.ops.flashgen.flash_attn_kvcache(q, kc, key_major(vc), None, None, lens, table, 0.125, True, -1, -1,
                                              0.0, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.flashgen.flash_attn_fwd(*(t.double() for t in _qkv()), None, None, 4, 4, 0.125, False, -1, -1, 0.0)
