"""MonarchAttention's plain-torch path (the CPU path, and what the backward differentiates).

Every step is a handful of batched matmuls and fused softmaxes on ``[n, G, M, b, *]`` views of
one group of (batch, kv-head) slices; the math, the block sizes and the decisions are in
docs/methods/monarch.md (and ``naive.py`` spells them out with loops).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..base import empty_result
from ..common import MASKED, compute_dtype, key_padding_bias, pad_rows, sizes, softmax_and_lse
from . import MonarchParams, monarch_blocks


#: target size (elements) of the largest temporary of one group of heads; groups of heads are
#: processed one after the other so temporaries stay small (allocator- and cache-friendly)
GROUP_ELEMS = 1 << 21


def head_groups(n_slices: int, elems_per_slice: int) -> list[tuple[int, int]]:
    """Split ``n_slices`` independent (batch, kv-head) slices into ranges of about GROUP_ELEMS work."""
    per = max(1, GROUP_ELEMS // max(1, elems_per_slice))
    return [(a, min(a + per, n_slices)) for a in range(0, n_slices, per)]


def _flat_heads(t: Optional[torch.Tensor], B: int, Hk: int, G: int, H: int) -> Optional[torch.Tensor]:
    """[Bm, Hm, ...] (Hm in {1, H}) -> [B*Hk, G|1, ...] (copies only this small tensor)."""
    if t is None:
        return None
    rest = t.shape[2:]
    if t.shape[1] == H and H > 1:
        return t.expand(B, H, *rest).reshape(B * Hk, G, *rest)
    return t.expand(B, Hk, *rest).reshape(B * Hk, 1, *rest)


def _l_step(qTa: torch.Tensor, kbar: torch.Tensor, ent_bias: torch.Tensor, finite: bool) -> torch.Tensor:
    """Lt [.., j, l, k] = L_j[k, l] = softmax_k(s q_lj . kbar_kj + ent_kj) from qTa [.., j, l, D+1]
    (q with a column of ones), kbar [.., k, j, D] and ent_bias [.., k, j] (-inf: a key block with no
    finite R-logit, which gets no weight).

    ``finite``: q, k and the biases hold no NaN / +-inf. Then the additive term rides in the matmul
    through the ones column (with -inf blocks set to 0 there and masked after, so the backward
    never forms 0 * inf) and torch's fused softmax serves every row with a finite logit. Otherwise
    the logits are computed as plain arithmetic (q.kbar + ent, so inf - inf is NaN as in SDPA) and
    softmaxed with ``softmax_and_lse`` (rows of no finite logit -> 0).
    """
    n, G, bq, M, D1 = qTa.shape
    D = D1 - 1
    ent_t = ent_bias.transpose(-1, -2)                                    # [.., j, k]
    if not finite:
        logits = qTa[..., :D] @ kbar.transpose(-3, -2).transpose(-1, -2)
        logits.add_(ent_t.unsqueeze(-2))
        return softmax_and_lse(logits)[0]
    dead = ent_t == MASKED
    kba = kbar.new_empty(n, G, bq, M, D + 1)                               # [.., j, k, D+1], one pass
    kba[..., :D] = kbar.transpose(-3, -2)
    kba[..., D] = ent_t.masked_fill(dead, 0.0)
    logits = qTa @ kba.transpose(-1, -2)
    if bool(dead.any()):
        logits.masked_fill_(dead.unsqueeze(-2), MASKED)
        if bool(dead.all(-1).any()):                                      # a query that sees no key
            return softmax_and_lse(logits)[0]
    return torch.softmax(logits, dim=-1)


def _monarch_core(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  qvalid: Optional[torch.Tensor], steps: int, finite: bool) -> torch.Tensor:
    """One group of heads. qs [n,G,M,bq,D] (scaled, padded rows 0), k [n,1,M,bk,D], v [n,1,M,bk,Dv],
    bias [n,G|1,M,1,bk] (-inf = masked) or None, qvalid [bq,M,1] 0/1 or None, ``finite``: q, k and
    the biases hold no NaN / +-inf -> z [n,G,M,bq,Dv] (a view)."""
    n, G, M, bq, D = qs.shape
    bk = k.shape[-2]
    kT = k.transpose(-1, -2)                                               # [.., k, D, i]
    # q in L-step layout with a column of ones: [.., j, l, D+1]. The ones column turns the
    # L-step's additive term into part of the matmul, and gives c = sum_l L_j[k,l] in the R-step.
    qTa = torch.cat([qs.transpose(-3, -2), qs.new_ones(n, G, bq, M, 1)], dim=-1)
    Lt = None  # Lt[.., j, l, k] = L_j[k, l]; None means L_j = I
    R = None
    for _ in range(steps):
        # ---- R-step: a = s * alpha^R / c (for L = I: a = s*q; padded rows 0 -> R = softmax(bias))
        if Lt is None:
            a = qs                                                         # [.., k, j, D]
        else:
            Lv = Lt if qvalid is None else Lt * qvalid                     # drop padded query rows
            alpha = Lv.transpose(-1, -2) @ qTa                             # [.., j, k, D+1]
            c = alpha[..., D:]                                             # sum_l L_j[k,l] (valid l)
            c = torch.where(c > 0, c, torch.ones_like(c))                  # c = 0 -> alpha = 0
            a = (alpha[..., :D] / c).transpose(-3, -2)                     # [.., k, j, D]
        if bk == 1:
            # a softmax over one key is 1 whatever its logit (+-inf included): R = 1, kbar = k and
            # H(R) + <R, bias> = bias exactly (the lse identity below would give inf - inf)
            R = None
            kbar = k.expand(n, G, M, bq, D)
            ent_bias = (bias[..., 0] if bias is not None else qs.new_zeros(())).expand(n, G, M, bq)
        else:
            logits = a @ kT                                                # x: [.., k, j, i]
            if bias is not None:
                logits.add_(bias)                                          # x + bias (matmul keeps no output)
            R, lse = softmax_and_lse(logits)                               # [.., k, j, i], [.., k, j]
            kbar = R @ k                                                   # sum_i R_k[j,i] k_ki
            ent_bias = lse - torch.linalg.vecdot(a, kbar)                  # H(R) + <R, bias> = lse - <R, x>
        if M == 1:
            # one key block: L_j = 1 whatever its logit. Only with one key (R = 1 above, so y = v)
            # must the key's bias still act: -inf -> 0 (SDPA's dead row), NaN / +inf -> NaN
            Lt = qs.new_ones(n, G, bq, 1, 1)
            if bk == 1 and bias is not None:
                b = bias[..., 0, 0].reshape(bias.shape[0], bias.shape[1], 1, 1, 1)
                Lt = torch.where(b == float("-inf"), 0.0, 1.0 + 0.0 * b).expand(n, G, bq, 1, 1)
            continue
        # ---- L-step: logits s q_lj . kbar_jk + H(R_k[j,:]) + <R_k[j,:], bias_k> (-inf: no weight)
        Lt = _l_step(qTa, kbar, ent_bias, finite)                          # [.., j, l, k]
    y = v.expand(n, G, M, bq, v.shape[-1]) if R is None else R @ v       # [.., k, j, Dv]
    return (Lt @ y.transpose(-3, -2)).transpose(-3, -2)                    # [.., l, j, Dv]


def monarch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    scale: float, params: MonarchParams) -> torch.Tensor:
    """MonarchAttention on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv].

    Block-batched: every step is a handful of batched matmuls and fused softmaxes on
    [n, G, M, b, *] views (G = H/Hk query heads per kv head, broadcast against k/v). Groups of
    (batch, kv-head) slices run one after another only to keep temporaries small.
    """
    what = "monarch attention"
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    B, H, Hk, Nq, Nk, D, Dv, G = sizes(q, k, v)
    cdt = compute_dtype(q.dtype)
    M, bq, bk = monarch_blocks(Nq, Nk, params.block_size)
    nqp, nkp = M * bq, M * bk

    # [B*Hk, G|1, N, *] views; padding, scaling and dtype casts happen per group of heads
    q4 = q.reshape(B * Hk, G, Nq, D)
    k4 = k.reshape(B * Hk, 1, Nk, D)
    v4 = v.reshape(B * Hk, 1, Nk, Dv)
    # the mask's biases as they are; block padding: -inf
    bias = key_padding_bias(attn_mask, Nk, nkp, cdt, q.device, what)
    if bias is not None:
        bias = _flat_heads(bias, B, Hk, G, H)
        bias = bias.reshape(bias.shape[0], bias.shape[1], M, 1, bk)
    # no NaN / +-inf in q, k or the biases (-inf biases are masks): the L-step's fast path is exact.
    # A sum is non-finite whenever an element is (a finite sum that overflows only costs the fast path)
    finite = bool(torch.isfinite(q.sum(dtype=cdt) + k.sum(dtype=cdt))) and (
        bias is None or not bool((bias.isnan() | (bias == float("inf"))).any()))
    qvalid = None
    if nqp > Nq:
        qvalid = (torch.arange(nqp, device=q.device) < Nq).to(cdt).view(M, bq).transpose(0, 1).unsqueeze(-1)

    per_slice = G * nqp * max(bk, M, D, Dv)
    groups = head_groups(B * Hk, per_slice)
    z = None
    for a, b in groups:
        n = b - a
        qs = pad_rows(q4[a:b].to(cdt) * scale, nqp).view(n, G, M, bq, D)
        kg = pad_rows(k4[a:b].to(cdt), nkp).view(n, 1, M, bk, D)
        vg = pad_rows(v4[a:b].to(cdt), nkp).view(n, 1, M, bk, Dv)
        zg = _monarch_core(qs, kg, vg, None if bias is None else bias[a:b], qvalid, params.num_steps, finite)
        if len(groups) == 1:
            z = zg.contiguous()                                           # [n, G, l, j, Dv]
        else:
            if z is None:
                z = zg.new_empty(B * Hk, G, M, bq, Dv)
            z[a:b] = zg
    out = z.reshape(B, H, nqp, Dv)
    if nqp > Nq:
        out = out[:, :, :Nq]
    return out.to(q.dtype)
