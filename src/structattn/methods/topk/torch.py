"""Top-k attention's plain-torch path: per chunk of query rows, dense masked scores, the k
largest per row, a softmax over those and a gather of their value rows (never a dense
probability matrix). Chunking and decisions: docs/methods/topk.md."""
from __future__ import annotations

from typing import Optional

import torch

from ..base import empty_result
from ..common import MASKED, as_4d, compute_dtype, safe_softmax, sizes
from . import TopkParams


def topk_pieces(n_kv_heads: int, group: int, nq: int, chunk_size: int) -> tuple[int, int]:
    """``(kv heads per piece, query positions per piece)``: a piece scores at most about
    ``chunk_size`` query rows. When one kv head's rows (``group`` query heads x ``nq``) reach
    ``chunk_size``, a piece is one kv head and ``max(1, chunk_size // group)`` query positions of
    its heads; otherwise it holds ``chunk_size // (group * nq)`` whole kv heads (at least one)."""
    rows = group * nq
    if rows >= chunk_size:
        return 1, max(1, chunk_size // group)
    return max(1, min(n_kv_heads, chunk_size // rows)), nq


def topk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 scale: float, is_causal: bool, params: TopkParams) -> torch.Tensor:
    """Top-k attention on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv]."""
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    B, H, Hk, Nq, Nk, D, Dv, G = sizes(q, k, v)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    kk = min(params.k, Nk)
    BH = B * Hk

    qf = q.reshape(BH, G, Nq, D)
    kf = k.reshape(BH, Nk, D)
    vf = v.reshape(BH, Nk, Dv)
    mask5 = None
    if attn_mask is not None:
        mask5 = as_4d(attn_mask).expand(B, H, Nq, Nk).view(B, Hk, G, Nq, Nk)   # a view: nothing materialised

    heads_per, q_per = topk_pieces(BH, G, Nq, params.chunk_size)
    outs = []
    for h0 in range(0, BH, heads_per):
        h1 = min(h0 + heads_per, BH)
        n = h1 - h0
        kT = kf[h0:h1].to(cdt).unsqueeze(1).transpose(-1, -2)              # [n, 1, D, Nk]
        v_flat = vf[h0:h1].to(cdt).reshape(n * Nk, Dv)
        base = (torch.arange(n, device=dev) * Nk).view(n, 1, 1, 1)
        fh = torch.arange(h0, h1, device=dev)
        parts = []
        for q0 in range(0, Nq, q_per):
            q1 = min(q0 + q_per, Nq)
            # causal (top-left): queries q0..q1-1 see no key at or after q1, so those are not scored
            nk = min(q1, Nk) if is_causal else Nk
            s = (qf[h0:h1, :, q0:q1].to(cdt) * scale) @ kT[..., :nk]       # [n, G, c, nk]
            if mask5 is not None:
                mp = mask5[:, :, :, q0:q1, :nk][fh // Hk, fh % Hk]          # [n, G, c, nk]
                if mp.dtype == torch.bool:
                    s = s.masked_fill(~mp, MASKED)
                else:
                    s = s + mp.to(cdt)
            if is_causal:
                qpos = torch.arange(q0, q1, device=dev).unsqueeze(-1)
                s = s.masked_fill(torch.arange(nk, device=dev) > qpos, MASKED)
            vals, idx = torch.topk(s, min(kk, nk), dim=-1, sorted=False)    # [n, G, c, <=kk]
            del s
            w = safe_softmax(vals)
            v_sel = v_flat.index_select(0, (idx + base).reshape(-1)).view(*idx.shape, Dv)  # [n, G, c, kk, Dv]
            parts.append((w.unsqueeze(-2) @ v_sel).squeeze(-2))            # [n, G, c, Dv]
        outs.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    return out.reshape(B, H, Nq, Dv).to(q.dtype)
