"""MRA-2 in float64 with explicit loops over query rows and selection by sorting, written from
the derivation in docs/methods/mra.md: key block j pools its keys with the softmax of their biases
(keys of bias -inf excluded), its pooled logit adds logsumexp(bias), its selection score the
log-mean-exp of the biases of its non-(-inf) keys.

Score modifications: key-only biases (ALiBi included, up to its per-row constant), which join
the key-padding mask (``common.key_only_mask``)."""
from __future__ import annotations

import math

import torch

from ..base import NO_MODS
from ..common import key_only_mask, per_head


def mra_head(q, k, v, bias, scale, causal, b, r_budget, variant, sink=0) -> torch.Tensor:
    """One head: q [Nq,D], k [Nk,D], v [Nk,Dv], bias [Nk] -> [Nq, Dv]."""
    Nq, Nk = q.shape[0], k.shape[0]
    b = min(b, max(Nq, Nk))
    Mq, Mk = math.ceil(Nq / b), math.ceil(Nk / b)
    blocks = lambda j: [m for m in range(j * b, min((j + 1) * b, Nk))]  # noqa: E731
    khat, vhat, beta, count = [], [], [], []
    for j in range(Mk):
        idx = [m for m in blocks(j) if bias[m] != float("-inf")]
        count.append(len(idx))
        if not idx:
            khat.append(torch.zeros(k.shape[1], dtype=torch.float64))
            vhat.append(torch.zeros(v.shape[1], dtype=torch.float64))
            beta.append(float("-inf"))
            continue
        w = torch.softmax(bias[idx], 0)
        khat.append(w @ k[idx])
        vhat.append(w @ v[idx])
        beta.append(torch.logsumexp(bias[idx], 0))
    lhat_of = lambda qhat, j: scale * qhat @ khat[j]  # noqa: E731
    out = torch.zeros(Nq, v.shape[1], dtype=torch.float64)
    for i in range(Mq):
        rows = list(range(i * b, min((i + 1) * b, Nq)))
        qhat = q[rows].mean(0)
        cand = [j for j in range(Mk) if count[j] > 0 and (not causal or j <= i)]
        lhat = {j: lhat_of(qhat, j) + beta[j] - math.log(count[j]) for j in cand}
        r = min(r_budget, Mk)
        order = sorted(cand, key=lambda j: -float(lhat[j]))
        order = [j for j in order if j < sink] + [j for j in order if j >= sink]
        if causal and i in cand:
            order = [i] + [j for j in order if j != i]
        chosen = order[:r]
        for n in rows:
            logits, values = [], []
            for j in chosen:
                for m in blocks(j):
                    if causal and m > n:
                        continue
                    logits.append(scale * q[n] @ k[m] + bias[m])
                    values.append(v[m])
            if variant == "mra2":
                for j in cand:
                    if j not in chosen:
                        logits.append(lhat_of(qhat, j) + beta[j])
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
    """``mra_attention`` with the signature of ``Method.forward``; a key-only score modification
    joins the key-padding mask (``key_only_mask``)."""
    attn_mask = key_only_mask(q, k, attn_mask, mods)
    return mra_attention(q, k, v, attn_mask, scale, is_causal, params.block_size, params.blocks_per_row,
                         params.variant, params.sink_blocks)
