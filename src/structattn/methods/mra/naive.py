"""MRA-2 in float64 with explicit loops over query rows and selection by sorting, written from
the derivation in docs/methods/mra.md: key block j pools its keys with the softmax of their biases
(keys of bias -inf excluded), its pooled logit adds logsumexp(bias), its selection score the
log-mean-exp of the biases of its non-(-inf) keys.

Score modifications (docs/methods/mra.md, "Score modifications"): the expression's key-only
summands join the key-padding bias (per-row constants dropped); the rest ``g(s, b, h, q, k)`` makes
every selected entry's logit ``g(scale q_n.k_m, b, h, n, m)`` and every pooled block's logit
``g(scale qhat_i.khat_j, b, h, qbar_i, kbar_j)`` at the block's mean query position and the
bias-weighted mean key position. A sliding window (like the causal mask) limits the candidates to
key blocks some query of the block sees; a block that the window or causality cuts for some query
of the block is never pooled: it is selected first (after the causal diagonal) or dropped."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ...scoremod.analysis import split_key_bias
from ...scoremod.evaluate import apply_score_mod
from ..base import NO_MODS
from ..common import key_bias_1d, key_only_mask, per_head, with_key_bias


def mra_head(q, k, v, bias, scale, causal, b, r_budget, variant, sink=0,
             logit: Optional[Callable] = None, window: tuple = (-1, -1)) -> torch.Tensor:
    """One head: q [Nq,D], k [Nk,D], v [Nk,Dv], bias [Nk] -> [Nq, Dv]. ``logit(s, qpos, kpos)``
    maps scaled scores to logits (positions broadcast against ``s``; identity when None);
    ``window`` = (left, right) of the sliding window (-1 = unbounded)."""
    Nq, Nk = q.shape[0], k.shape[0]
    g = logit if logit is not None else (lambda s, qp, kp: s)
    left, right = window
    windowed = left >= 0 or right >= 0
    b = min(b, max(Nq, Nk))
    Mq, Mk = math.ceil(Nq / b), math.ceil(Nk / b)
    blocks = lambda j: [m for m in range(j * b, min((j + 1) * b, Nk))]  # noqa: E731

    def sees(n: int, m: int) -> bool:
        return (not causal or m <= n) and (left < 0 or m >= n - left) and (right < 0 or m <= n + right)

    khat, vhat, beta, count, kbar = [], [], [], [], []
    for j in range(Mk):
        idx = [m for m in blocks(j) if bias[m] != float("-inf")]
        count.append(len(idx))
        if not idx:
            khat.append(torch.zeros(k.shape[1], dtype=torch.float64))
            vhat.append(torch.zeros(v.shape[1], dtype=torch.float64))
            beta.append(float("-inf"))
            kbar.append(0.0)
            continue
        w = torch.softmax(bias[idx], 0)
        khat.append(w @ k[idx])
        vhat.append(w @ v[idx])
        beta.append(torch.logsumexp(bias[idx], 0))
        kbar.append(float(w @ torch.tensor(idx, dtype=torch.float64)))
    out = torch.zeros(Nq, v.shape[1], dtype=torch.float64)
    keys = torch.arange(Nk)
    for i in range(Mq):
        rows = list(range(i * b, min((i + 1) * b, Nq)))
        qhat = q[rows].mean(0)
        qbar = sum(rows) / len(rows)
        lhat_of = lambda j: g(scale * qhat @ khat[j], torch.tensor(qbar), torch.tensor(kbar[j]))  # noqa: E731
        see_any = {j: any(sees(n, m) for n in rows for m in blocks(j)) for j in range(Mk)}
        see_all = {j: all(sees(n, m) for n in rows for m in blocks(j)) for j in range(Mk)}
        cand = [j for j in range(Mk) if count[j] > 0 and (not causal or j <= i) and (not windowed or see_any[j])]
        partial = [j for j in cand if windowed and not see_all[j]]
        lhat = {j: lhat_of(j) + beta[j] - math.log(count[j]) for j in cand}
        r = min(r_budget, Mk)
        order = sorted(cand, key=lambda j: -float(lhat[j]))
        order = [j for j in order if j < sink] + [j for j in order if j >= sink]
        # cut blocks first, the nearest to the query block first (ties: the left one)
        cut = sorted(partial, key=lambda j: 2 * abs(j - i) + (j > i))
        order = cut + [j for j in order if j not in partial]
        if causal and i in cand:
            order = [i] + [j for j in order if j != i]
        chosen = order[:r]
        for n in rows:
            row = g(scale * k @ q[n], torch.tensor(n), keys)                    # [Nk]
            logits, values = [], []
            for j in chosen:
                for m in blocks(j):
                    if sees(n, m):
                        logits.append(row[m] + bias[m])
                        values.append(v[m])
            if variant == "mra2":
                for j in cand:
                    if j not in chosen and j not in partial:
                        logits.append(lhat_of(j) + beta[j])
                        values.append(vhat[j])
            if not logits:
                continue
            x = torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in logits])
            if torch.isinf(x).all():
                continue
            p = torch.softmax(x, 0)
            out[n] = p @ torch.stack(values)
    return out


def mra_attention(q, k, v, attn_mask, scale, causal, b, r, variant, sink=0) -> torch.Tensor:
    """Every (batch, head) through ``mra_head`` (key-padding masks)."""
    return per_head(mra_head, q, k, v, attn_mask, scale, causal, b, r, variant, sink)


def forward(q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS) -> torch.Tensor:
    """``mra_attention`` with the signature of ``Method.forward``. A key-only score modification
    joins the key-padding mask (``key_only_mask``); any other has its key-only summands joined to
    the mask and the rest applied as ``mra_head``'s ``logit``, with the window."""
    args = (params.block_size, params.blocks_per_row, params.variant, params.sink_blocks)
    if not mods.windowed and (not mods.text or split_key_bias(mods.text).exact_key_only):
        attn_mask = key_only_mask(q, k, attn_mask, mods)
        return mra_attention(q, k, v, attn_mask, scale, is_causal, *args)
    split = split_key_bias(mods.text)
    attn_mask = with_key_bias(q, k, attn_mask, split.key_bias, mods.tensors, torch.float64, "mra reference")
    B, H, Nq, _ = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            def logit(s, qp, kp, bi=bi, h=h):
                if not split.rest:
                    return s
                return apply_score_mod(split.rest, s, b=bi, h=h, q=qp, k=kp, tensors=mods.tensors)
            bias = key_bias_1d(attn_mask, B, H, bi, h, k.shape[2])
            out[bi, h] = mra_head(q[bi, h].double(), k[bi, h // G].double(), v[bi, h // G].double(), bias, scale,
                                  is_causal, *args, logit=logit, window=(mods.window_left, mods.window_right))
    return out
