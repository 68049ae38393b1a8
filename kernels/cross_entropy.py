"""Fused linear cross-entropy: the language-model head and its loss without the (tokens, vocab) logits.

    z = hidden @ weight.T + bias,   loss_n = logsumexp(z_n) - z_n[target_n]   (0 where target_n == ignore_index)
    dz = g (softmax(z) - onehot(target)),  dhidden = dz @ weight,  dweight = dz.T @ hidden,  dbias = sum_n dz

The kernels walk the logits in pieces (CPU: tiles of a row block by a vocabulary chunk; Triton: chunks of
rows): the forward keeps only each row's lse (float32), and the backward recomputes a piece's logits, turns
them into dz in place and accumulates the gradients, so the memory beyond the inputs and gradients is one
piece of logits, whatever the vocabulary. The mean over valid rows is a
tensor division (no host sync), so the op traces under torch.compile(fullgraph=True). Losses are float32.
Kernels: C++ on CPU (tiled GEMMs through ATen, SIMD softmax), Triton on NVIDIA GPUs (the row softmax /
gradient in place), the PyTorch reference elsewhere.
"""
import torch

from . import ops  # noqa: F401  (declares torch.ops.flashgen.linear_cross_entropy_*)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(hidden @ weight.T + bias, target) as F.cross_entropy computes it on the logits.

    hidden: (..., H) float32 / float16 / bfloat16; weight: (V, H) and bias: (V,) of hidden's dtype and device;
    target: (...) int64 class indices in [0, V) or ignore_index. reduction: "mean" (over rows whose target
    is not ignore_index; NaN when there are none, as F.cross_entropy), "sum" or "none" (target's shape).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in _DTYPES:
        raise TypeError(f"linear_cross_entropy: hidden must be a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, {hidden.shape[-1]}) for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"linear_cross_entropy: {name} must have hidden's dtype {hidden.dtype} and device "
                            f"{hidden.device}, got {t.dtype} on {t.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if target.dtype != torch.int64 or target.shape != hidden.shape[:-1] or target.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: target must be int64 of shape {tuple(hidden.shape[:-1])} on "
                         f"{hidden.device}, got {target.dtype} of shape {tuple(target.shape)} on {target.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t = target.reshape(-1).contiguous()
    loss, _ = torch.ops.flashgen.linear_cross_entropy_fwd(h, weight.contiguous(), bias, t, int(ignore_index))
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (t != ignore_index).sum()
