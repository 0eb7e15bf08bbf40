"""Exact attention through PyTorch's SDPA, with the op contract's extras (GQA, a mask together
with ``is_causal``, masks of fewer than 4 dims)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..common import as_4d, as_additive, causal_keep


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
         scale: float, is_causal: bool) -> torch.Tensor:
    """SDPA that also accepts ``attn_mask`` together with ``is_causal``, grouped k/v heads and a
    mask of fewer than 4 dims (``[Nk]`` included, which SDPA itself rejects).

    Causal attention with a key-padding mask runs as SDPA's ``is_causal`` kernel (which skips the
    upper triangle) without building an N x N mask: a mask that keeps every key is dropped, and
    contiguous padding (right or left, per batch item) becomes causal attention on the unpadded
    block plus unmasked attention for queries past it. Other masks are combined into one.
    """
    gqa = k.shape[1] != q.shape[1]
    if attn_mask is not None:
        attn_mask = as_4d(attn_mask)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
        if _keeps_everything(attn_mask):
            attn_mask = None
    if is_causal and attn_mask is not None:
        out = _causal_key_padding(q, k, v, attn_mask, scale, gqa)
        if out is not None:
            return out
        keep = causal_keep(q.shape[-2], k.shape[-2], q.device)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask + as_additive(keep, q.dtype)
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def _keeps_everything(attn_mask: torch.Tensor) -> bool:
    """A bool mask of all True, or an additive mask of all zeros (only cheap [.., 1, K] masks are
    checked: a general mask is used as it is)."""
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        return False
    return bool(attn_mask.all()) if attn_mask.dtype == torch.bool else not bool(attn_mask.any())


def _padding_runs(keep: torch.Tensor) -> Optional[list[tuple[int, int]]]:
    """For a bool key-padding mask [B, K] (already reduced over heads): per batch item the kept
    run ``(start, stop)`` when the kept keys are one contiguous run touching an end (right or left
    padding), else None."""
    runs = []
    n = keep.shape[-1]
    counts = keep.sum(-1).tolist()
    first = keep.to(torch.int8).argmax(-1).tolist()
    for row, c, f in zip(keep, counts, first):
        if c == 0:
            runs.append((0, 0))
            continue
        if f != 0 and f + c != n:
            return None
        if not bool(row[f:f + c].all()):
            return None
        runs.append((f, f + c))
    return runs


def _causal_key_padding(q, k, v, attn_mask, scale, gqa) -> Optional[torch.Tensor]:
    """Causal + contiguous key padding without an N x N mask (see ``sdpa``); None if not that."""
    nq, nk = q.shape[-2], k.shape[-2]
    m = attn_mask
    if nq != nk or (m.dim() >= 2 and m.shape[-2] != 1):
        return None
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == float("-inf"))).all()):
            return None   # a finite bias: not a keep/drop mask
        m = m == 0
    m = m[..., 0, :]                                                      # [B|1, H|1, K]
    if m.shape[1] != 1 and not bool((m == m[:, :1]).all()):
        return None   # padding that differs between heads
    keep = m[:, 0].expand(q.shape[0], nk)
    runs = _padding_runs(keep)
    if runs is None:
        return None
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    kw = dict(scale=scale, enable_gqa=gqa)
    for b, (start, stop) in enumerate(runs):
        if stop == start:
            continue   # every key padded: SDPA's dead rows are 0
        sl = slice(b, b + 1)
        qs, ks, vs = q[sl, :, start:stop], k[sl, :, start:stop], v[sl, :, start:stop]
        # queries start..stop-1 see keys start..i (rows before start see only padding: dead)
        out[sl, :, start:stop] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, **kw)
        if stop < nq:
            # queries past the last kept key see every kept key
            out[sl, :, stop:] = F.scaled_dot_product_attention(q[sl, :, stop:], ks, vs, **kw)
    return out
