"""Routing attention in plain torch: the differentiable path (autograd, float64 runs).

Given a ``RoutingPlan`` every query's keys are computed in two parts, each a normalised softmax
with its log-sum-exp, merged per query by log-sum-exp (``naive.naive_attention`` is the
definition they add up to):

* **routed** (in block order): each query block of wq queries against the keys of its r routed
  key blocks, one dense [wq, r*wk] block per query block (a batch of blocks: batched matmuls),
  under ``is_causal`` only keys at or before the query; with ``pooled``, one pooled key per
  other key block in the same softmax;
* **static** (in position order): the sink keys and the local window minus the keys of the
  query's routed blocks (they are counted there), as a band: query blocks of ``local_window``
  rows against ``2 * local_window - 1`` keys.

The routed part is computed in block order and gathered back to position order.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..base import empty_result
from ..common import ceil_div, check_heads, compute_dtype, softmax_and_lse
from .plan import RoutingPlan, _rows, block_stats, flat_key_bias, make_plan

__all__ = ["routing_forward", "attend", "routed_part", "static_part", "merge_two", "check_causal_rows"]

_NEG_INF = float("-inf")
#: target size (elements) of the largest temporary of one chunk of (batch, kv head) slices
CHUNK_ELEMS = 1 << 21


def check_causal_rows(is_causal: bool, local_window: int, sink_tokens: int) -> None:
    """ValueError when a causal query could be left with no key (no window and no sink)."""
    if is_causal and local_window == 0 and sink_tokens == 0:
        raise ValueError(
            "routing attention with is_causal needs local_window >= 1 or sink_tokens >= 1: a query whose "
            "routed keys all lie after it would otherwise attend to nothing"
        )


def routing_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    scale: float, is_causal: bool, params) -> torch.Tensor:
    """Routing attention on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv] (``params``:
    ``RoutingParams``). The routing runs without autograd; the attention is differentiable."""
    check_causal_rows(is_causal, params.local_window, params.sink_tokens)
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    check_heads(q, k)
    plan = make_plan(q, k, attn_mask, scale, is_causal, params.clusters, params.window, params.routes,
                     params.iterations, params.sink_tokens)
    from . import cpu

    path = cpu.attend if cpu.usable(q, k, v) is None else attend
    return path(q, k, v, attn_mask, scale, is_causal, plan, params.local_window, params.sink_tokens,
                params.pooled).to(q.dtype)


def attend(q, k, v, attn_mask, scale: float, is_causal: bool, plan: RoutingPlan, local_window: int,
           sink_tokens: int, pooled: bool) -> torch.Tensor:
    """The attention of the module docstring for a computed ``plan``; result in the compute dtype."""
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    BHk = B * Hk
    cdt = compute_dtype(q.dtype)
    bias = flat_key_bias(attn_mask, B, H, Hk, Nk, cdt, q.device)
    mq, mk, r = plan.q_blocks, plan.k_blocks, plan.routes.shape[-1]
    q4 = q.reshape(BHk, G, Nq, D)
    k3, v3 = k.reshape(BHk, Nk, D), v.reshape(BHk, Nk, Dv)
    q_order = plan.q_order.reshape(BHk, G, -1)
    k_order = plan.k_order.reshape(BHk, -1)
    routes = plan.routes.reshape(BHk, G, mq, r)
    route_ok = plan.route_valid.reshape(BHk, G, mq, r)
    band = min(2 * local_window - 1, Nk) if local_window > 0 else 0
    per_slice = G * mq * plan.wq * (r * plan.wk + (mk if pooled else 0) + band + sink_tokens)
    per_slice = max(per_slice, G * mq * r * plan.wk * max(D, Dv))
    per = max(1, CHUNK_ELEMS // max(1, per_slice))
    out = None
    for a0 in range(0, BHk, per):
        a1 = min(a0 + per, BHk)
        qs = q4[a0:a1].to(cdt) * scale
        kc, vc = k3[a0:a1].to(cdt), v3[a0:a1].to(cdt)
        bc = None if bias is None else bias[a0:a1]
        o_r, lse_r = routed_part(qs, kc, vc, bc, q_order[a0:a1], k_order[a0:a1], routes[a0:a1], route_ok[a0:a1],
                                 plan.wq, plan.wk, is_causal, pooled)
        routed = routed_lookup(q_order[a0:a1], k_order[a0:a1], routes[a0:a1], route_ok[a0:a1], plan.wq, plan.wk,
                               Nq, Nk) if local_window > 0 else None
        o_s, lse_s = static_part(qs, kc, vc, bc, is_causal, local_window, sink_tokens, routed)
        o = merge_two(o_r, lse_r, o_s, lse_s)
        if a0 == 0 and a1 == BHk:
            out = o
        else:
            if out is None:
                out = o.new_empty(BHk, G, Nq, Dv)
            out[a0:a1] = o
    return out.reshape(B, H, Nq, Dv)


def in_window(qpos: torch.Tensor, kpos: torch.Tensor, local_window: int, is_causal: bool) -> torch.Tensor:
    """Bool: key position ``kpos`` is in the local window of query position ``qpos`` (broadcast)."""
    if local_window <= 0:
        return torch.zeros(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool, device=qpos.device)
    if is_causal:
        return (kpos <= qpos) & (kpos > qpos - local_window)
    return (kpos >= qpos - local_window // 2) & (kpos <= qpos + (local_window - 1) // 2)


def routed_part(qs, kc, vc, bias, q_order, k_order, routes, route_ok, wq: int, wk: int, is_causal: bool,
                pooled: bool):
    """Routed keys (and pooled blocks) of every query, in position order: qs [n,G,Nq,D] (scaled),
    kc/vc [n,Nk,*], bias [n,G|1,Nk] or None, q_order [n,G,Mq*wq], k_order [n,Mk*wk], routes /
    route_ok [n,G,Mq,r] -> (o [n,G,Nq,Dv], lse [n,G,Nq])."""
    n, G, Nq, D = qs.shape
    Nk, Dv = kc.shape[1], vc.shape[2]
    mq, r = routes.shape[2], routes.shape[3]
    mk = k_order.shape[-1] // wk
    dev = qs.device
    head_base = (torch.arange(G, device=dev) * Nq).view(1, G, 1)
    qg = _rows(qs.reshape(n, G * Nq, D), q_order.clamp(max=Nq - 1) + head_base).view(n, G, mq, wq, D)
    qpos = q_order.view(n, G, mq, wq, 1)
    kblocks = k_order.view(n, mk, wk)
    kpos = kblocks[torch.arange(n, device=dev).view(n, 1, 1), routes.view(n, G * mq, r)]   # [n, G*mq, r, wk]
    kpos = kpos.view(n, G, mq, 1, r * wk)
    krows = kpos.clamp(max=Nk - 1)
    ksel = _rows(kc, krows.view(n, G, mq, r * wk))                                        # [n, G, mq, r*wk, D]
    vsel = _rows(vc, krows.view(n, G, mq, r * wk))
    s = qg @ ksel.transpose(-1, -2)                                                       # [n, G, mq, wq, r*wk]
    if bias is not None:
        s = s + bias.expand(n, G, Nk).gather(-1, krows.view(n, G, -1)).view(n, G, mq, 1, r * wk)
    hard = (kpos == Nk) | ~route_ok.repeat_interleave(wk, dim=-1).view(n, G, mq, 1, r * wk)
    if is_causal:
        hard = hard | (kpos > qpos)
    s = s.masked_fill(hard, _NEG_INF)
    if pooled:
        kbar, beta, count, vbar = block_stats(kc, bias, k_order, wk, extra=vc)         # [n, G|1, Mk, *]
        ps = qg @ kbar.unsqueeze(2).transpose(-1, -2) + beta.view(n, -1, 1, 1, mk)      # [n, G, mq, wq, Mk]
        chosen = torch.zeros(n, G, mq, mk + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(route_ok, routes, mk), True)
        phard = chosen[..., :mk].unsqueeze(-2)
        if is_causal:
            klast = torch.where(kblocks < Nk, kblocks, -1).amax(-1)                      # [n, Mk]
            phard = phard | (klast.view(n, 1, 1, 1, mk) > qpos)
        s = torch.cat([s, ps.masked_fill(phard, _NEG_INF)], -1)
    p, lse = softmax_and_lse(s)
    o = p[..., :r * wk] @ vsel
    if pooled:
        o = o + p[..., r * wk:] @ vbar.unsqueeze(2)
    # back to position order: slot of each query (empty slots sort past every query)
    slot = torch.argsort(q_order, dim=-1)[..., :Nq]                                       # [n, G, Nq]
    o = _rows(o.reshape(n, G * mq * wq, Dv), slot + (torch.arange(G, device=dev) * mq * wq).view(1, G, 1))
    lse = lse.reshape(n, G, mq * wq).gather(-1, slot)
    return o, lse


def routed_lookup(q_order, k_order, routes, route_ok, wq: int, wk: int, nq: int, nk: int):
    """A function ``(qpos [.., T, 1] (< Nq), kpos [.., W] (clamped to [0, Nk))) -> bool [n, G, .., T, W]``:
    key kpos is in a key block routed to the query block of qpos (per slice and query head)."""
    n, G, mq, r = routes.shape
    mk = k_order.shape[-1] // wk
    dev = routes.device
    slot = torch.full((n, G, nq + 1), 0, dtype=torch.int64, device=dev)
    slot.scatter_(-1, q_order, torch.arange(q_order.shape[-1], device=dev).expand_as(q_order))
    q_block = slot[..., :nq] // wq                                                       # [n, G, Nq]
    k_block = torch.full((n, nk + 1), mk, dtype=torch.int64, device=dev)                # mk: no block
    k_block.scatter_(-1, k_order, (torch.arange(k_order.shape[-1], device=dev) // wk).expand_as(k_order))
    k_block = k_block[:, :nk]
    table = torch.zeros(n, G, mq, mk + 1, dtype=torch.bool, device=dev)
    table.scatter_(-1, torch.where(route_ok, routes, mk), True)
    table[..., mk] = False

    def lookup(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        qb = q_block[..., qpos.reshape(-1)].view(n, G, *qpos.shape)                     # [n, G, .., T, 1]
        kb = k_block[:, kpos.reshape(-1)].view(n, 1, *kpos.shape)                       # [n, 1, .., W]
        idx = qb * (mk + 1) + kb
        flat = table.view(n, G, mq * (mk + 1))
        return flat.gather(-1, idx.reshape(n, G, -1)).view(idx.shape)

    return lookup


def static_part(qs, kc, vc, bias, is_causal: bool, local_window: int, sink_tokens: int, routed=None):
    """Sink keys and local window of every query -> (o [n,G,Nq,Dv], lse [n,G,Nq]); 0 / -inf when
    both are off. Local keys that are sinks count once (as sinks); ``routed`` (``routed_lookup``)
    removes the local keys that the query's routed blocks hold."""
    n, G, Nq, D = qs.shape
    Nk, Dv = kc.shape[1], vc.shape[2]
    S = min(sink_tokens, Nk)
    L = local_window
    dev = qs.device
    if L <= 0 and S == 0:
        return qs.new_zeros(n, G, Nq, Dv), qs.new_full((n, G, Nq), _NEG_INF)
    T = L if L > 0 else Nq                        # query rows per band block
    tq = ceil_div(Nq, T)
    nqp = tq * T
    qpos = torch.arange(nqp, device=dev).view(tq, T, 1)
    qsp = _pad_rows(qs, nqp).view(n, G, tq, T, D)
    scores, values = [], []
    if S:
        s = qsp @ kc[:, None, None, :S].transpose(-1, -2)                              # [n, G, tq, T, S]
        if bias is not None:
            s = s + bias[:, :, None, None, :S]
        if is_causal:
            s = s.masked_fill(torch.arange(S, device=dev) > qpos, _NEG_INF)
        scores.append(s)
        values.append(vc[:, None, None, :S])
    if L > 0:
        width = 2 * L - 1
        off = L - 1 if is_causal else L // 2
        pos = (torch.arange(tq, device=dev) * L - off).unsqueeze(-1) + torch.arange(width, device=dev)  # [tq, width]
        kp = pos.unsqueeze(-2)
        keep = (kp >= S) & (kp < Nk) & in_window(qpos, kp, L, is_causal)                # [tq, T, width]
        rows = pos.clamp(0, Nk - 1)
        kband = _rows(kc, rows.expand(n, tq, width))
        vband = _rows(vc, rows.expand(n, tq, width))
        s = qsp @ kband.unsqueeze(1).transpose(-1, -2)                                  # [n, G, tq, T, width]
        if bias is not None:
            s = s + bias[:, :, rows].unsqueeze(-2)
        drop = ~keep
        if routed is not None:
            drop = drop | routed(qpos.clamp(max=Nq - 1), rows.unsqueeze(-2))
        scores.append(s.masked_fill(drop, _NEG_INF))
        values.append(vband.unsqueeze(1))
    s = scores[0] if len(scores) == 1 else torch.cat(scores, -1)
    p, lse = softmax_and_lse(s)
    o = p[..., :S] @ values[0] if S else 0
    if L > 0:
        o = o + p[..., S:] @ values[-1]
    return o.reshape(n, G, nqp, Dv)[:, :, :Nq], lse.reshape(n, G, nqp)[:, :, :Nq]


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim -2 of t [..., N, E] with zeros to n rows."""
    if t.shape[-2] == n:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-2], n - t.shape[-2], t.shape[-1])], -2)


def merge_two(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp merge of two normalised partial softmax outputs o [.., Dv] with lse [..]; rows
    where both are -inf give 0, NaN stays NaN, and every intermediate is finite for finite inputs."""
    m = torch.maximum(lse_a, lse_b).detach()                                            # the result is shift-free
    m = m.masked_fill(m == _NEG_INF, 0.0)
    w_a = torch.exp(lse_a - m).unsqueeze(-1)
    w_b = torch.exp(lse_b - m).unsqueeze(-1)
    den = w_a + w_b
    return torch.addcmul(o_a * w_a, o_b, w_b) / den.masked_fill(den == 0, 1.0)
