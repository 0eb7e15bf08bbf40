"""Shared helpers for the method tests (tests/methods): float64 oracles, random inputs, error measures.

Imported as a plain module (pytest puts this folder on sys.path); the name is unique on purpose."""
from __future__ import annotations

import math

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num if den == 0 else num / den


def dense_attention(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """Exact softmax attention in float64, written out (not SDPA): rows with no unmasked key give 0.

    q [B,H,Nq,D], k/v [B,Hk,Nk,*] (GQA by repetition), mask bool (True keep) or additive float.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.double()
    if is_causal:
        s = s.masked_fill(torch.ones(Nq, k.shape[2], dtype=torch.bool).tril().logical_not(), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z > 0, z, torch.ones_like(z))
    return p @ v


def key_bias_1d(attn_mask, B: int, H: int, b: int, h: int, nk: int) -> torch.Tensor:
    """The float64 additive per-key bias (-inf for dropped keys) of a key-padding mask at (b, h)."""
    if attn_mask is None:
        return torch.zeros(nk, dtype=torch.float64)
    nq = attn_mask.shape[-2] if attn_mask.dim() >= 2 else 1
    row = attn_mask.expand(B, H, nq, nk)[b, h, 0]   # expand prepends the missing leading dims
    if row.dtype == torch.bool:
        return torch.where(row, 0.0, float("-inf")).double()
    return row.double()


def per_head(head_fn, q, k, v, attn_mask, *args) -> torch.Tensor:
    """Apply a single-head float64 oracle ``head_fn(q, k, v, key_bias, *args) -> [Nq, Dv]`` to every
    (batch, query head), with the query head's kv head (GQA) and its per-key mask bias."""
    B, H, Nq, _ = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            bias = key_bias_1d(attn_mask, B, H, b, h, k.shape[2])
            out[b, h] = head_fn(q[b, h].double(), k[b, h // G].double(), v[b, h // G].double(), bias, *args)
    return out


def make_qkv(B=2, H=4, Hk=2, Nq=16, Nk=None, D=8, Dv=None, dtype=torch.float64, seed=0, spread=1.0):
    """Fresh random q, k, v (seeded per test). ``spread`` scales q to make attention peakier."""
    g = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64) * spread
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, Nk, Dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def key_padding(B, Nk, seed=0, p_keep=0.7, heads=1, float_mask=False, dead_batch=None):
    """Random key-padding mask [B, heads, 1, Nk]; ``dead_batch`` masks every key of that batch."""
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(B, heads, 1, Nk, generator=g) < p_keep
    m[..., 0] = True
    if dead_batch is not None:
        m[dead_batch] = False
    if float_mask:
        return torch.where(m, 0.0, float("-inf")).double()
    return m
