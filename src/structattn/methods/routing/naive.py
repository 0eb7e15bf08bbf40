"""Short readable references for routing attention (tests and kernels check against these).

``naive_attention`` is the definition of the attention for a given ``RoutingPlan``, written per
query in float64: the keys a query attends exactly, the pooled blocks it adds, one softmax.
``naive_plan`` is the routing written as plain loops over (batch, kv head) with Python lists.
``forward`` is the two together with the signature of ``Method.forward``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .plan import DEFAULT_NORMALISATION, RoutingPlan, fit_stride, normalise, plan_sizes

__all__ = ["forward", "local_keep", "naive_attention", "naive_plan"]


def local_keep(nq: int, nk: int, local_window: int, is_causal: bool, device=None) -> torch.Tensor:
    """Bool [Nq, Nk]: key j is in query i's local window (positions aligned top-left, as SDPA's
    ``is_causal``). Causal: the ``local_window`` keys ending at i; otherwise ``local_window`` keys
    around i (``local_window // 2`` before it, ``(local_window - 1) // 2`` after it)."""
    i = torch.arange(nq, device=device).unsqueeze(-1)
    j = torch.arange(nk, device=device)
    if local_window <= 0:
        return torch.zeros(nq, nk, dtype=torch.bool, device=device)
    if is_causal:
        return (j <= i) & (j > i - local_window)
    return (j >= i - local_window // 2) & (j <= i + (local_window - 1) // 2)


def _bias_row(attn_mask, b: int, h: int, B: int, H: int, nk: int) -> torch.Tensor:
    if attn_mask is None:
        return torch.zeros(nk, dtype=torch.float64)
    m = attn_mask
    m = m[(None,) * (4 - m.dim())].expand(B, H, m.shape[-2] if m.dim() >= 2 else 1, nk)[b, h, 0]
    return torch.where(m, 0.0, float("-inf")).double() if m.dtype == torch.bool else m.double()


def naive_attention(q, k, v, attn_mask: Optional[torch.Tensor], scale: float, is_causal: bool, plan: RoutingPlan,
                    local_window: int, sink_tokens: int, pooled: bool) -> torch.Tensor:
    """Routing attention for ``plan``, one query at a time, in float64.

    Query i (in query block t of its head) attends exactly, with logit ``scale * q_i . k_j + bias_j``,
    to: the sink keys j < ``sink_tokens``; its local window (``local_keep``); the keys of the key
    blocks routed to t. With ``pooled``, every other key block with a key of finite bias adds one
    pooled key: logit ``scale * q_i . kbar + beta``, value ``vbar`` (bias-softmax-weighted means of
    the block's keys and values; beta the logsumexp of its biases); under ``is_causal`` only blocks
    whose keys are all at or before i. Under ``is_causal`` exact keys are j <= i. A query with no
    finite logit gets 0.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, _ = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    wq, wk = plan.wq, plan.wk
    mk = plan.k_blocks
    local = local_keep(Nq, Nk, local_window, is_causal)
    out = torch.zeros(B, H, Nq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // G
            bias = _bias_row(attn_mask, b, h, B, H, Nk)
            blocks = [[int(j) for j in plan.k_order[b, hk, t * wk:(t + 1) * wk] if j < Nk] for t in range(mk)]
            order = plan.q_order[b, h].tolist()
            for slot, i in enumerate(order):
                if i >= Nq:
                    continue
                t = slot // wq
                routed = {int(x) for x, ok in zip(plan.routes[b, h, t], plan.route_valid[b, h, t]) if ok}
                keys = {j for j in range(min(sink_tokens, Nk))} | {j for j in range(Nk) if local[i, j]}
                keys |= {j for blk in routed for j in blocks[blk]}
                if is_causal:
                    keys = {j for j in keys if j <= i}
                keys = sorted(keys)
                logits = [scale * q[b, h, i] @ k[b, hk, j] + bias[j] for j in keys]
                values = [v[b, hk, j] for j in keys]
                if pooled:
                    for blk in range(mk):
                        members = blocks[blk]
                        if blk in routed or not members or (is_causal and max(members) > i):
                            continue
                        bb = bias[members]
                        if bool((bb == float("-inf")).all()):
                            continue
                        w = torch.softmax(bb, 0)
                        logits.append(scale * q[b, h, i] @ (w @ k[b, hk, members]) + torch.logsumexp(bb, 0))
                        values.append(w @ v[b, hk, members])
                if not logits:
                    continue
                x = torch.stack([torch.as_tensor(t_, dtype=torch.float64) for t_ in logits])
                if bool((x == float("-inf")).all()):
                    continue
                out[b, h, i] = torch.softmax(x, 0) @ torch.stack(values)
    return out


def naive_plan(q, k, attn_mask: Optional[torch.Tensor], scale: float, is_causal: bool, clusters: Optional[int],
               window: Optional[int], routes: int, iterations: int, sink_tokens: int, normalisation: str) -> RoutingPlan:
    """Loop version of ``plan.make_plan`` (float64). Ties are broken towards the lower index and
    the lower cluster, as the sorts there do, so it agrees on data without exact ties."""
    q, k = q.double(), k.double()
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = H // Hk
    c, wq, wk, r = plan_sizes(Nq, Nk, clusters, window, routes)
    mq, mk = -(-Nq // wq), -(-Nk // wk)
    q_order = torch.full((B, H, mq * wq), Nq, dtype=torch.int64)
    k_order = torch.full((B, Hk, mk * wk), Nk, dtype=torch.int64)
    route_idx = torch.zeros(B, H, mq, r, dtype=torch.int64)
    route_ok = torch.zeros(B, H, mq, r, dtype=torch.bool)

    def nearest(x, mu):
        sims = [float(x @ m) for m in mu]
        best = max(range(len(mu)), key=lambda t: (sims[t], -t))
        return best, sims[best]

    for b in range(B):
        for hk in range(Hk):
            heads = list(range(hk * G, (hk + 1) * G))
            biases = [_bias_row(attn_mask, b, h, B, H, Nk) for h in heads]
            live = [[bool(bias[j] > float("-inf")) for j in range(Nk)] for bias in biases]
            joins = [j >= sink_tokens and any(lv[j] for lv in live) for j in range(Nk)]
            xk = normalise(k[b, hk][None], normalisation, torch.tensor(joins)[None])[0]
            members = [j for j in range(Nk) if joins[j]]
            mu = [xk[members[((2 * t + 1) * len(members)) // (2 * c)]] if members else torch.zeros(D, dtype=torch.float64)
                  for t in range(c)]
            fit = [j for j in members if j % fit_stride(Nk, c) == 0]
            for _ in range(iterations):
                sums = [torch.zeros(D, dtype=torch.float64) for _ in range(c)]
                for j in fit:
                    sums[nearest(xk[j], mu)[0]] += xk[j]
                mu = [s / s.norm() if s.norm() > 0 else m for s, m in zip(sums, mu)]
            ranked = sorted(members, key=lambda j: (nearest(xk[j], mu)[0], -nearest(xk[j], mu)[1], j))
            k_order[b, hk, :len(ranked)] = torch.tensor(ranked, dtype=torch.int64)
            blocks = [ranked[t * wk:(t + 1) * wk] for t in range(mk)]
            for g, h in enumerate(heads):
                qlive = [live[g][i] if Nq == Nk else True for i in range(Nq)]
                xq = normalise(q[b, h][None], normalisation, torch.tensor(qlive)[None] if Nq == Nk else None)[0]
                near = [nearest(xq[i], mu) for i in range(Nq)]
                order = sorted(range(Nq), key=lambda i: (near[i][0] if qlive[i] else c, -near[i][1], i))
                q_order[b, h, :Nq] = torch.tensor(order, dtype=torch.int64)
                bias = biases[g]
                for t in range(mq):
                    qs = order[t * wq:(t + 1) * wq]
                    qbar = q[b, h, qs].mean(0)
                    scores = []
                    for blk in range(mk):
                        mem = [j for j in blocks[blk] if bias[j] > float("-inf")]
                        if not mem or (is_causal and min(blocks[blk]) > max(qs)):
                            continue
                        w = torch.softmax(bias[mem], 0)
                        s = scale * float(qbar @ (w @ k[b, hk, mem])) + float(torch.logsumexp(bias[mem], 0)) - math.log(len(mem))
                        scores.append((s, blk))
                    best = sorted(scores, key=lambda sb: (-sb[0], sb[1]))[:r]
                    for slot, (_, blk) in enumerate(best):
                        route_idx[b, h, t, slot] = blk
                        route_ok[b, h, t, slot] = True
    return RoutingPlan(wq, wk, q_order, k_order, route_idx, route_ok)


def forward(q, k, v, attn_mask, scale, is_causal, params) -> torch.Tensor:
    """Routing attention in float64 with the signature of ``Method.forward``: ``naive_plan`` then
    ``naive_attention``."""
    if q.numel() == 0 or k.shape[2] == 0:
        return torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    plan = naive_plan(q, k, attn_mask, scale, is_causal, params.clusters, params.window, params.routes,
                      params.iterations, params.sink_tokens, DEFAULT_NORMALISATION)
    return naive_attention(q, k, v, attn_mask, scale, is_causal, plan, params.local_window, params.sink_tokens,
                           params.pooled)
