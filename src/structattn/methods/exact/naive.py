"""Exact softmax attention in float64, written out (no SDPA): the oracle of every method's exact
limits and of the kernels."""
from __future__ import annotations

import math

import torch

from ..common import MASKED, as_4d


def dense_attention(q, k, v, attn_mask=None, scale=None, is_causal=False) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v in float64; rows with no unmasked key give 0.

    q [B,H,Nq,D], k/v [B,Hk,Nk,*] (GQA by repetition), mask bool (True keep) or additive float of
    any rank that broadcasts to [B, H, Nq, Nk], ``is_causal`` top-left aligned.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if attn_mask is not None:
        m = as_4d(attn_mask)
        s = s.masked_fill(~m, MASKED) if m.dtype == torch.bool else s + m.double()
    if is_causal:
        s = s.masked_fill(torch.ones(Nq, k.shape[2], dtype=torch.bool).tril().logical_not(), MASKED)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    return (e / torch.where(z > 0, z, torch.ones_like(z))) @ v


def forward(q, k, v, attn_mask, scale, is_causal, params) -> torch.Tensor:
    """``dense_attention`` with the signature of ``Method.forward``."""
    return dense_attention(q, k, v, attn_mask, scale, is_causal)
