"""Top-k attention (Gupta et al. 2021), written from DESIGN.md section 6 / METHODS.md.

For each chunk of queries: dense scores ``s * q k^T`` with every mask applied (bool keep, additive
float, SDPA's top-left ``is_causal``, general [Q, K] masks), keep the ``min(k, Nk)`` largest per
row, softmax over those only, and gather the matching value rows (never a dense probability
matrix). ``k >= Nk`` is exact softmax attention. FLOPs are not reduced (QK^T stays dense); memory
is O(chunk * Nk + Nq * k) per piece of work.

Decisions (the Triton kernel implements the same; keep them in sync):

1. Chunking. ``chunk_size`` bounds the number of query rows (over all heads) scored at once. When
   one kv head's query rows (G = H/Hk query heads x Nq) exceed it, a piece is one kv head and
   ``max(1, chunk_size // G)`` query positions of its G heads; otherwise a piece holds
   ``chunk_size // (G*Nq)`` whole kv heads. So peak extra memory is about
   ``chunk_size * Nk`` scores plus ``chunk_size * k * Dv`` gathered values, whatever B and H are.
2. Masked entries (-inf / False) never get weight: if a row has fewer than k unmasked keys the
   extra picks are -inf and get weight 0; a row with no unmasked key gets output 0 (torch 2.13
   SDPA's behaviour). Ties at the k-th score are broken by ``torch.topk``. Float masks are biases
   added as they are (only -inf is a hard mask).
3. Non-finite inputs follow SDPA row by row: a NaN score ranks above every other in
   ``torch.topk``, so it is always kept and makes its row NaN; a +inf score makes its row NaN
   (``inf - inf``); a -inf score is a masked key. A non-finite value in q poisons its own row
   only. A non-finite value row of v reaches the rows that keep that key (with k >= Nk every row,
   like SDPA). Empty inputs (a dimension of size 0) return SDPA's result.
4. fp16 / bf16 inputs are computed in fp32; float64 stays float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Dim, Method, SiteShape, empty_result
from .masks import as_4d
from .monarch import _check_heads, compute_dtype, sym_min
from .softmax import safe_softmax

__all__ = ["TopkParams", "TopkMethod", "topk_forward", "topk_flops", "topk_pieces"]


@dataclass(frozen=True)
class TopkParams:
    """``k``: keys kept per query; ``chunk_size``: query rows scored at once (memory bound)."""

    k: int = 64
    chunk_size: int = 1024


def topk_pieces(n_kv_heads: int, group: int, nq: int, chunk_size: int) -> tuple[int, int]:
    """``(kv heads per piece, query positions per piece)`` for the chunking rule in the docstring."""
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
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = _check_heads(q, k)
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
    neg_inf = float("-inf")
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
                    s = s.masked_fill(~mp, neg_inf)
                else:
                    s = s + mp.to(cdt)
            if is_causal:
                qpos = torch.arange(q0, q1, device=dev).unsqueeze(-1)
                s = s.masked_fill(torch.arange(nk, device=dev) > qpos, neg_inf)
            vals, idx = torch.topk(s, min(kk, nk), dim=-1, sorted=False)    # [n, G, c, <=kk]
            del s
            w = safe_softmax(vals)
            v_sel = v_flat.index_select(0, (idx + base).reshape(-1)).view(*idx.shape, Dv)  # [n, G, c, kk, Dv]
            parts.append((w.unsqueeze(-2) @ v_sel).squeeze(-2))            # [n, G, c, Dv]
        outs.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    return out.reshape(B, H, Nq, Dv).to(q.dtype)


def topk_flops(site: SiteShape, params: TopkParams) -> Dim:
    """FLOPs: 2*B*H*(Nq*Nk*d + Nq*min(k, Nk)*dv) (QK^T stays dense, PV only over the kept keys)."""
    kk = sym_min(params.k, site.kv_len)
    return 2 * site.batch * site.num_heads * (site.q_len * site.kv_len * site.head_dim
                                              + site.q_len * kk * site.v_head_dim)


class TopkMethod(Method):
    """Top-k attention: softmax over each query's k largest scores, chunked over queries."""

    name = "topk"
    Params = TopkParams
    saves = "memory"
    description = "top-k attention (Gupta et al. 2021), chunked over queries"

    def validate(self, params: TopkParams, *, where: str) -> None:
        self.require_at_least(params, where=where, k=1, chunk_size=1)

    def supports(self, site: SiteShape, params: TopkParams) -> Optional[str]:
        return None

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return topk_forward(q, k, v, attn_mask, scale, is_causal, params)

    def flops(self, site: SiteShape, params: TopkParams) -> Dim:
        return topk_flops(site, params)
