"""Small float64 oracles written from the semantics in the issue (independent of the kernels'
tiling): every matrix is materialised. Used until / besides the methods' plain-torch references."""
from __future__ import annotations

import math

import torch


def _expand_kv(t, heads):
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def additive_mask(attn_mask, B, H, nq, nk):
    """SDPA mask -> float64 additive [B, H, nq, nk] (0 / -inf for bool), or zeros."""
    if attn_mask is None:
        return torch.zeros(B, H, nq, nk, dtype=torch.float64)
    m = attn_mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf"))
    return m.to(torch.float64).expand(B, H, nq, nk)


def _softmax0(x, dim):
    """softmax that gives 0 (not NaN) on a slice that is entirely -inf."""
    mx = x.amax(dim, keepdim=True)
    mx = torch.where(torch.isinf(mx) & (mx < 0), torch.zeros_like(mx), mx)
    e = torch.exp(x - mx)
    s = e.sum(dim, keepdim=True)
    return torch.where(s > 0, e / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(e))


def _dense_scores(q, k, v, attn_mask, scale, is_causal):
    """float64 masked scores [B, H, nq, nk] and the per-query-head values."""
    q, k, v = (t.double() for t in (q, k, v))
    B, H, nq, D = q.shape
    nk = k.shape[2]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2) + additive_mask(attn_mask, B, H, nq, nk)
    if is_causal:
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), float("-inf"))
    return s, v


def exact(q, k, v, attn_mask=None, scale=None, is_causal=False):
    s, v = _dense_scores(q, k, v, attn_mask, scale, is_causal)
    return _softmax0(s, -1) @ v


def monarch(q, k, v, attn_mask=None, scale=None, block_size=None, num_steps=1):
    q, k, v = (t.double() for t in (q, k, v))
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    scale = 1 / math.sqrt(D) if scale is None else scale
    b = block_size or math.isqrt(N) + (math.isqrt(N) ** 2 < N)
    M = -(-N // b)
    NP = M * b
    bias = additive_mask(attn_mask, B, H, 1, N)[:, :, 0, :]
    pad = NP - N
    Q = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(B, H, M, b, D)
    K = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, M, b, D)
    V = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(B, H, M, b, Dv)
    bias = torch.nn.functional.pad(bias, (0, pad), value=float("-inf")).view(B, H, M, b)
    valid = (torch.arange(NP) < N).view(M, b).double()  # [l, j]
    L = torch.eye(M, dtype=torch.float64).expand(B, H, b, M, M)  # [j, k, l]
    for _ in range(num_steps):
        Lv = L * valid.t()[None, None, :, None, :]  # weight of (l, j) rows only if valid
        alpha = torch.einsum("bhjkl,bhljd->bhkjd", Lv, Q)
        c = Lv.sum(-1).permute(0, 1, 3, 2)[..., None]  # [b,h,k,j,1]
        qr = torch.where(c > 0, alpha / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(alpha))
        raw = scale * torch.einsum("bhkjd,bhkid->bhkji", qr, K)
        x = raw + bias[:, :, :, None, :]
        R = _softmax0(x, -1)
        aL = scale * torch.einsum("bhkji,bhkid->bhjkd", R, K)
        pos = R > 0
        ent = -torch.where(pos, R * torch.log(torch.where(pos, R, torch.ones_like(R))), torch.zeros_like(R)).sum(-1)
        beta = torch.where(pos, R * bias[:, :, :, None, :].expand_as(R), torch.zeros_like(R)).sum(-1)
        dead = ~pos.any(-1)  # rows whose keys are all masked
        e = torch.where(dead, torch.full_like(ent, float("-inf")), ent + beta)  # [b,h,k,j]
        logits = torch.einsum("bhljd,bhjkd->bhjkl", Q, aL) + e.permute(0, 1, 3, 2)[..., None]
        L = _softmax0(logits, -2)
    y = torch.einsum("bhkji,bhkid->bhkjd", R, V)
    z = torch.einsum("bhjkl,bhkjd->bhljd", L, y)
    return z.reshape(B, H, NP, Dv)[:, :, :N]


def topk(q, k, v, attn_mask=None, scale=None, is_causal=False, kk=64):
    s, v = _dense_scores(q, k, v, attn_mask, scale, is_causal)
    kk = min(kk, s.shape[-1])
    vals, idx = s.topk(kk, dim=-1)
    keep = torch.full_like(s, float("-inf")).scatter(-1, idx, vals)
    return _softmax0(keep, -1) @ v
