"""MRA-2's differentiable path with a score modification: soft-capping, relative or general
biases, any element-wise chain, and sliding windows (docs/methods/mra.md, "Score
modifications").

The selection (``torch.mra_select``) applies the expression to the pooled scores at each block's
mean positions; here every gathered entry of a selected block gets its exact logit
``g(scale q.k, b, h, q, k)`` plus its key bias, and the hard masks (key padding, block padding,
unused slots, causality, the window) by position. Everything is plain torch, so gradients reach
q, k, v and the expression's tensors. The fused CPU path (``fused_cpu.py``) serves only key-only
modifications; these calls always come here.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..base import ScoreMods, empty_result
from ..common import MASKED, ceil_div, compute_dtype, pad_rows, sizes, softmax_and_lse
from . import MraParams
from .torch import _chunks, _slot_masks, low_resolution, merge_partial, mra_select


def mra_forward_mods(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                     scale: float, is_causal: bool, params: MraParams, mods: ScoreMods) -> torch.Tensor:
    """MRA-2 / MRA-2-s with ``mods`` (an expression without key-only summands, which belong in
    ``attn_mask``, and / or a window) on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv]."""
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    B, H, Hk, Nq, Nk, D, Dv, G = sizes(q, k, v)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    sel = mra_select(q, k, attn_mask, scale, is_causal, params, mods)
    b = sel.block
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)
    nqp = mq * b
    r = sel.block_idx.shape[-1]
    BH = B * Hk

    o_lo, lse_lo = low_resolution(sel, v, params, cdt, H)
    if o_lo is not None:
        o_lo, lse_lo = o_lo.reshape(BH, G, mq, 1, Dv), lse_lo.reshape(BH, G, mq, 1, 1)

    q4, k3, v3 = q.reshape(BH, G, Nq, D), k.reshape(BH, Nk, D), v.reshape(BH, Nk, Dv)
    unused = not bool(sel.block_valid.all())
    blocks_per_head = mk + 1 if unused else mk
    idx = sel.block_idx if not unused else torch.where(sel.block_valid, sel.block_idx, mk)
    idx = idx.reshape(BH, G, mq, r)
    slot_bias, slot_void, _ = _slot_masks(sel, B, H, Nk, G, unused, False)

    # positions and indices of every gathered entry, broadcastable against [n, G, nb, b, r*b];
    # padding (keys past Nk, unused slots, queries past Nq) reads the last real position, so the
    # expression never indexes its tensors out of range (those entries are masked or dropped)
    offs = torch.arange(b, device=dev)
    kpos = (idx.unsqueeze(-1) * b + offs).clamp(max=Nk - 1).reshape(BH, G, mq, 1, r * b)
    qpos = (torch.arange(mq, device=dev).view(mq, 1) * b + offs).clamp(max=Nq - 1).view(1, 1, mq, b, 1)
    heads = torch.arange(BH, device=dev)
    bidx = (heads // Hk).view(BH, 1, 1, 1, 1)
    hidx = ((heads % Hk) * G).view(BH, 1, 1, 1, 1) + torch.arange(G, device=dev).view(1, G, 1, 1, 1)

    chunks = _chunks(BH, mq, G * r * b * max(b, D, Dv))
    parts = []
    for a0, a1, i0, i1 in chunks:
        n, nb = a1 - a0, i1 - i0
        qs = pad_rows(q4[a0:a1].to(cdt) * scale, nqp).view(n, G, mq, b, D)[:, :, i0:i1]
        kf = pad_rows(k3[a0:a1].to(cdt), blocks_per_head * b).view(n * blocks_per_head, b * D)
        vf = pad_rows(v3[a0:a1].to(cdt), blocks_per_head * b).view(n * blocks_per_head, b * Dv)
        head_base = (torch.arange(n, device=dev) * blocks_per_head).view(n, 1, 1, 1)
        flat = (idx[a0:a1, :, i0:i1] + head_base).reshape(-1)
        k_sel = kf.index_select(0, flat).view(n, G, nb, r * b, D)
        v_sel = vf.index_select(0, flat).view(n, G, nb, r * b, Dv)
        qq, kk = qpos[:, :, i0:i1], kpos[a0:a1, :, i0:i1]
        s = mods.logits(qs @ k_sel.transpose(-1, -2), b=bidx[a0:a1], h=hidx[a0:a1], q=qq, k=kk)
        if slot_bias is not None:
            s = s + slot_bias[a0:a1, :, i0:i1]
        hide = _hidden(qq, kk, is_causal, mods)
        if slot_void is not None:
            void = slot_void[a0:a1, :, i0:i1]
            hide = void if hide is None else hide | void
        if hide is not None:
            s = s.masked_fill(hide, MASKED)
        p, lse_hi = softmax_and_lse(s)                                    # a row of all -inf: p = 0
        o = p @ v_sel                                                     # [n, G, nb, b, Dv]
        if lse_lo is not None:
            o = merge_partial(o, lse_hi.unsqueeze(-1), o_lo[a0:a1, :, i0:i1], lse_lo[a0:a1, :, i0:i1])
        parts.append(((a0, a1, i0, i1), o))
    if len(parts) == 1:
        z = parts[0][1]
    else:   # torch.cat per head range (keeps autograd simple; chunks cover the grid row by row)
        rows: dict = {}
        for (a0, a1, i0, i1), o in parts:
            rows.setdefault((a0, a1), []).append(o)
        z = torch.cat([torch.cat(os, dim=2) for _, os in sorted(rows.items())], dim=0)
    out = z.reshape(B, H, nqp, Dv)
    if nqp > Nq:
        out = out[:, :, :Nq]
    return out.to(q.dtype)


def _hidden(qpos: torch.Tensor, kpos: torch.Tensor, is_causal: bool, mods: ScoreMods) -> Optional[torch.Tensor]:
    """True where causality or the window hides key ``kpos`` from query ``qpos`` (None: nothing)."""
    hide = None
    d = kpos - qpos
    for bad in ((d > 0) if is_causal else None,
                (d < -mods.window_left) if mods.window_left >= 0 else None,
                (d > mods.window_right) if mods.window_right >= 0 else None):
        if bad is not None:
            hide = bad if hide is None else hide | bad
    return hide
