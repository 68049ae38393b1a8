"""flashgen attention as a transformers attention implementation, "fg_attention".

transformers reserves names containing "flash" for the flash-attn package, so the name avoids it. The
implementation registers both halves transformers needs: the attention function (AttentionInterface) and
its mask function (AttentionMaskInterface). Without the latter a custom attention gets attention_mask=None
and padding would leak into every row silently. The mask function hands over the 2-D padding mask (or None
when nothing is padded), as transformers' own flash-attention path does, and the attention function picks:

- packed sequences (cu_seq_lens_q / cu_seq_lens_k kwargs, as DataCollatorWithFlattening passes them, or
  position_ids that restart at 0 inside a row): flash_attn_varlen_func over the sequences;
- padding: the valid tokens of each row are gathered into packed sequences (unpad), attended with
  flash_attn_varlen_func and scattered back (pad rows are 0), so a padded token never reaches a valid one;
- otherwise flash_attn_func on the dense batch.

GQA / MQA go to the kernels as they are (no repeat_kv); sliding_window W keeps the W most recent keys
(window (W - 1, 0)); softcap applies to the scores. Dropout and output_attentions are refused.
"""
import torch

from flashgen.kernels import flash_attn_func, flash_attn_varlen_func

from . import recompute
from ._transformers import require_transformers

ATTENTION_NAME = "fg_attention"


def fg_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                 softcap=None, is_causal=None, **kwargs):
    """transformers' attention signature: query (B, H, S, D), key / value (B, Hkv, S_kv, D); returns
    (out (B, S, H, D), None)."""
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} has no attention dropout (got dropout={dropout}); set the model's "
                         f"attention_dropout to 0 or use attn_implementation='sdpa'")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{ATTENTION_NAME} never forms the attention weights: output_attentions=True needs "
                         f"attn_implementation='eager'")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{ATTENTION_NAME} does not support attention sinks (s_aux)")
    causal = module.is_causal if is_causal is None else is_causal
    options = dict(causal=bool(causal), softmax_scale=scaling, softcap=float(softcap or 0.0),
                   window_size=(sliding_window - 1, 0 if causal else sliding_window - 1) if sliding_window
                   else (-1, -1))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, heads, D)
    batch, q_len = q.shape[:2]

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and attention_mask is None:
        cu_q = cu_k = _restarts(kwargs.get("position_ids"), batch, q_len)
    if cu_q is not None:
        if cu_k is None:
            cu_k = cu_q
        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
        out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                     v.reshape(-1, *v.shape[2:]), cu_q.to(torch.int32), cu_k.to(torch.int32),
                                     max_q, max_k, **options)
        return out.view(q.shape), None
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask, options), None
    return flash_attn_func(q, k, v, **options), None


def _restarts(position_ids, batch, q_len):
    """cu_seqlens of packed rows (positions restarting at 0 inside a row), or None for ordinary rows. Only for
    a full forward (positions start at 0), as transformers' flash path does."""
    if position_ids is None or q_len == 1 or torch.compiler.is_compiling():
        return None  # (compiled code passes packed sequences as cu_seq_lens: this test reads values)
    flat = position_ids.expand(batch, q_len).reshape(-1)
    if flat[0] != 0:
        return None
    starts = (flat == 0).nonzero().flatten()
    if starts.numel() == batch:  # one sequence per row: not packed
        return None
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def _padded(q, k, v, mask, options):
    """Attention of a padded batch: mask (B, S_kv), nonzero for real tokens; queries are the last q_len
    positions of the mask. Pad rows come out 0."""
    batch, q_len = q.shape[:2]
    keep_k = mask[:, -k.shape[1]:].bool()
    keep_q = keep_k[:, -q_len:]
    cu_q = torch.nn.functional.pad(keep_q.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(keep_k.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    rows_q, rows_k = keep_q.flatten().nonzero().flatten(), keep_k.flatten().nonzero().flatten()
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    out = flash_attn_varlen_func(flat(q).index_select(0, rows_q), flat(k).index_select(0, rows_k),
                                 flat(v).index_select(0, rows_k), cu_q, cu_k, int(keep_q.sum(1).max()),
                                 int(keep_k.sum(1).max()), **options)
    full = recompute.register(_scatter(out, rows_q, batch * q_len), _scatter, out, rows_q, batch * q_len)
    return full.view(batch, q_len, *out.shape[1:])


def _scatter(packed, rows, total):
    return packed.new_zeros(total, *packed.shape[1:]).index_copy(0, rows, packed)


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
          **kwargs):
    """The padding mask for fg_attention: (B, kv_length) or None when every token is real."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention():
    """Make attn_implementation="fg_attention" known to transformers (idempotent)."""
    transformers = require_transformers()
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(ATTENTION_NAME, fg_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask)
    return ATTENTION_NAME
