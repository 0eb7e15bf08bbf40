"""Top-k attention in float64, one query row at a time: sort the masked scores, softmax over the
best k, weighted sum of their values (docs/methods/topk.md)."""
from __future__ import annotations

import torch


def topk_attention(q, k, v, attn_mask, scale, causal, kk) -> torch.Tensor:
    """q [B,H,Nq,D], k/v [B,Hk,Nk,*] (GQA), any SDPA mask, ``causal`` top-left; ``kk`` keys per row."""
    B, H, Nq, _ = q.shape
    G = H // k.shape[1]
    Nk = k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(B, H, Nq, Nk)   # expand prepends the missing leading dims
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for n in range(Nq):
                s = scale * k[b, h // G].double() @ q[b, h, n].double()
                if mask is not None:
                    mm = mask[b, h, n]
                    s = s.masked_fill(~mm, float("-inf")) if mm.dtype == torch.bool else s + mm.double()
                if causal:
                    s[n + 1:] = float("-inf")
                vals, idx = torch.sort(s, descending=True)
                vals, idx = vals[:kk], idx[:kk]
                if torch.isinf(vals).all():
                    continue
                out[b, h, n] = torch.softmax(vals, 0) @ v[b, h // G, idx].double()
    return out


def forward(q, k, v, attn_mask, scale, is_causal, params) -> torch.Tensor:
    """``topk_attention`` with the signature of ``Method.forward``."""
    return topk_attention(q, k, v, attn_mask, scale, is_causal, params.k)
