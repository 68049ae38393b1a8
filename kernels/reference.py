"""Plain PyTorch reference of every flashgen op.

These are the oracle in tests (called on float64 inputs) and the fallback kernel on devices that have no
flashgen kernel. Statistics are computed in float32 at least, outputs returned in the input dtype.
"""
import torch


def _stat_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- norms
def rms_norm_fwd(x, weight, residual, eps, weight_offset):
    """h = x + residual (when given); y = h / sqrt(mean(h^2) + eps) * w', w' = 1 + w if weight_offset else w.

    Returns (y, h or an empty tensor when there is no residual, rstd float32 of shape x.shape[:-1]).
    """
    h = x + residual if residual is not None else x
    hf = h.to(_stat_dtype(x))
    rstd = torch.rsqrt(hf.square().mean(-1) + eps)
    y = hf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * (weight.to(hf.dtype) + 1 if weight_offset else weight.to(hf.dtype))
    h_out = h.clone() if residual is not None else x.new_empty(0)
    return y.to(x.dtype), h_out, rstd.to(_stat_dtype(x))


def rms_norm_bwd(dy, dh, h, weight, rstd, weight_offset):
    """With n = h * rstd and w' the effective weight:
    dh_total = rstd * (g - n * mean(g * n)) + dh, where g = dy * w';  dweight = sum_rows(dy * n).
    """
    f = _stat_dtype(h)
    hf, dyf, r = h.to(f), dy.to(f), rstd.to(f).unsqueeze(-1)
    n = hf * r
    g = dyf
    if weight is not None:
        g = dyf * (weight.to(f) + 1 if weight_offset else weight.to(f))
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(f)
    dw = (dyf * n).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    return dx.to(h.dtype), dw


def layer_norm_fwd(x, weight, bias, residual, eps):
    """h = x + residual (when given); y = (h - mean(h)) / sqrt(var(h) + eps) * w + b (biased variance).

    Returns (y, h or empty, mean float32, rstd float32), the statistics of shape x.shape[:-1].
    """
    h = x + residual if residual is not None else x
    hf = h.to(_stat_dtype(x))
    mean = hf.mean(-1)
    xc = hf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    if bias is not None:
        y = y + bias.to(hf.dtype)
    h_out = h.clone() if residual is not None else x.new_empty(0)
    return y.to(x.dtype), h_out, mean, rstd


def layer_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias):
    """With n = (h - mean) * rstd and g = dy * w:
    dh_total = rstd * (g - mean(g) - n * mean(g * n)) + dh;  dweight = sum_rows(dy * n);  dbias = sum_rows(dy).
    """
    f = _stat_dtype(h)
    hf, dyf, r = h.to(f), dy.to(f), rstd.to(f).unsqueeze(-1)
    n = (hf - mean.to(f).unsqueeze(-1)) * r
    g = dyf * weight.to(f) if weight is not None else dyf
    dx = r * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(f)
    rows = dyf.reshape(-1, h.shape[-1])
    dw = (dyf * n).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    db = rows.sum(0).to(weight.dtype if weight is not None else h.dtype) if has_bias else h.new_empty(0)
    return dx.to(h.dtype), dw, db
