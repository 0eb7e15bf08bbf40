"""MonarchAttention in float64 with explicit loops over blocks and positions, explicit entropies
(-sum p log p) and an explicit dense A = L_j[k,l] R_k[j,i]: the reference the torch path and the
kernel are checked against (docs/methods/monarch.md).

Score modifications: key-only biases (ALiBi included, up to its per-row constant), which join
the key-padding mask (``common.key_only_mask``)."""
from __future__ import annotations

import math

import torch

from ..base import NO_MODS
from ..common import key_only_mask, per_head


def _softmax_or_zero(x: torch.Tensor) -> torch.Tensor:
    if torch.isinf(x).all() and (x < 0).all():
        return torch.zeros_like(x)
    return torch.softmax(x, dim=0)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    nz = p[p > 0]
    return -(nz * nz.log()).sum()


def monarch_head(q, k, v, bias, scale, block_size, steps):
    """One head. q [Nq,D], k [Nk,D], v [Nk,Dv], bias [Nk] (-inf = masked). Returns (out, A, S)."""
    Nq, Nk = q.shape[0], k.shape[0]
    bk = min(block_size or math.ceil(math.sqrt(Nk)), Nk)
    M = math.ceil(Nk / bk)
    bq = bk if Nq == Nk else math.ceil(Nq / M)
    qp = torch.zeros(M * bq, q.shape[1], dtype=torch.float64)
    qp[:Nq] = q
    kp = torch.zeros(M * bk, k.shape[1], dtype=torch.float64)
    kp[:Nk] = k
    vp = torch.zeros(M * bk, v.shape[1], dtype=torch.float64)
    vp[:Nk] = v
    bp = torch.full((M * bk,), float("-inf"), dtype=torch.float64)
    bp[:Nk] = bias
    Q = lambda l, j: qp[l * bq + j]  # noqa: E731
    valid = lambda l, j: l * bq + j < Nq  # noqa: E731
    Kb = lambda kb: kp[kb * bk:(kb + 1) * bk]  # noqa: E731
    Bb = lambda kb: bp[kb * bk:(kb + 1) * bk]  # noqa: E731

    L = [torch.eye(M, dtype=torch.float64) for _ in range(bq)]  # L[j][k, l]
    R = None
    for _ in range(steps):
        R = torch.zeros(M, bq, bk, dtype=torch.float64)
        for kb in range(M):
            for j in range(bq):
                c = sum(L[j][kb, l] for l in range(M) if valid(l, j))
                alpha = sum((L[j][kb, l] * Q(l, j) for l in range(M) if valid(l, j)),
                            torch.zeros(q.shape[1], dtype=torch.float64))
                x = scale * (Kb(kb) @ alpha) / c if c > 0 else torch.zeros(bk, dtype=torch.float64)
                R[kb, j] = _softmax_or_zero(x + Bb(kb))
        newL = []
        for j in range(bq):
            Lj = torch.zeros(M, M, dtype=torch.float64)
            for l in range(M):
                logits = torch.empty(M, dtype=torch.float64)
                for kb in range(M):
                    r = R[kb, j]
                    if torch.isinf(Bb(kb)).all():
                        logits[kb] = float("-inf")
                        continue
                    keep = r > 0
                    kbar = scale * (r @ Kb(kb))
                    logits[kb] = Q(l, j) @ kbar + _entropy(r) + (r[keep] * Bb(kb)[keep]).sum()
                Lj[:, l] = _softmax_or_zero(logits)
            newL.append(Lj)
        L = newL
    A = torch.zeros(M * bq, M * bk, dtype=torch.float64)
    for l in range(M):
        for j in range(bq):
            for kb in range(M):
                A[l * bq + j, kb * bk:(kb + 1) * bk] = L[j][kb, l] * R[kb, j]
    A = A[:Nq, :Nk]
    S = scale * q @ k.T + bias
    return A @ v, A, S


def objective(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """<A, S> + H(A) summed over rows, ignoring masked (-inf) entries that carry no weight."""
    keep = A > 0
    return (A[keep] * S[keep]).sum() - (A[keep] * A[keep].log()).sum()


def monarch_attention(q, k, v, attn_mask, scale, block_size, steps) -> torch.Tensor:
    """Every (batch, head) through ``monarch_head`` (key-padding masks)."""
    return per_head(lambda *a: monarch_head(*a)[0], q, k, v, attn_mask, scale, block_size, steps)


def forward(q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS) -> torch.Tensor:
    """``monarch_attention`` with the signature of ``Method.forward``; a key-only score
    modification joins the key-padding mask (``key_only_mask``)."""
    if is_causal:
        raise ValueError("monarch attention has no causal form")
    attn_mask = key_only_mask(q, k, attn_mask, mods)
    return monarch_attention(q, k, v, attn_mask, scale, params.block_size, params.num_steps)
