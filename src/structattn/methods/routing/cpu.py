"""The fast CPU path of routing attention (inference): the same parts as ``torch.attend``, each
one call of PyTorch's fused CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the row log-sum-exp), so
score matrices never reach memory:

* routed: every (query head, query block) is one batch entry: its wq queries against its r
  routed key blocks, gathered as whole blocks from the keys put in block order once, one
  contiguous [r*wk, E] slice. The mask is [.., 1, keys] (broadcast over the block's queries)
  unless ``is_causal`` needs it per pair; the pooled blocks ([wq, Mk] per query block) are small
  explicit matmuls merged by log-sum-exp;
* static: the band of every block of ``local_window`` queries (2*local_window - 1 keys) plus the
  sink keys, with a per-pair mask (window, causality, keys already routed);
* the two parts merged by log-sum-exp as in ``torch.merge_two``.

The flash kernel has no gradient for its log-sum-exp and returns lse 0 for a row with no finite
logit, so this path serves calls without autograd and sets such rows' lse to -inf itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..common import ceil_div, compute_dtype, softmax_and_lse
from .plan import RoutingPlan, _rows, block_stats, flat_key_bias
from .torch import in_window, merge_two, routed_lookup

__all__ = ["usable", "attend"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_NEG_INF = float("-inf")
#: target size (elements) of the gathered keys of one chunk of (batch, kv head) slices: chunks
#: of one slice made a 4K call three times slower than chunks of several (per-op costs, less
#: parallel work per op), so chunks are large (about 32 MB of fp32 per temporary)
CHUNK_ELEMS = 1 << 23


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when this path can serve the call, else why not."""
    if q.device.type != "cpu":
        return "not a CPU tensor"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "autograd is recording (the fused kernel has no log-sum-exp gradient)"
    if q.shape[-1] == 0:
        return "head_dim 0"
    if q.dtype == torch.float64:
        return "float64 (the reference path is the oracle there)"
    # one reduction per tensor: a sum is finite iff every element is (barring an overflow, which
    # only sends a finite call to the reference path)
    if not all(bool(torch.isfinite(t.sum())) for t in (q, k, v)):
        return "non-finite inputs (masked keys are -inf biases here: a query holding inf would make NaN)"
    return None


def _flash(q, k, v, mask, scale):
    """(o, lse) of the fused kernel, lse -inf for rows with no finite logit."""
    o, lse = _FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    if mask is not None:
        alive = mask.amax(-1) > _NEG_INF                                              # [.., 1 | T]
        lse = torch.where(alive, lse, _NEG_INF)
    return o, lse


def attend(q, k, v, attn_mask, scale: float, is_causal: bool, plan: RoutingPlan, local_window: int,
           sink_tokens: int, pooled: bool) -> torch.Tensor:
    """``torch.attend`` through the fused kernel; [B, H, Nq, Dv] in the compute dtype."""
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    BHk = B * Hk
    cdt = compute_dtype(q.dtype)
    E = max(D, Dv)                                # the kernel needs one head size: zero columns change nothing
    bias = flat_key_bias(attn_mask, B, H, Hk, Nk, cdt, q.device)
    mq, mk, r = plan.q_blocks, plan.k_blocks, plan.routes.shape[-1]
    q4 = F.pad(q.reshape(BHk, G, Nq, D).to(cdt), (0, E - D))
    k3 = F.pad(k.reshape(BHk, Nk, D).to(cdt), (0, E - D))
    v3 = F.pad(v.reshape(BHk, Nk, Dv).to(cdt), (0, E - Dv))
    q_order = plan.q_order.reshape(BHk, G, -1)
    k_order = plan.k_order.reshape(BHk, -1)
    routes = plan.routes.reshape(BHk, G, mq, r)
    route_ok = plan.route_valid.reshape(BHk, G, mq, r)
    keys = r * plan.wk + (mk if pooled else 0)
    band = 2 * local_window - 1 if local_window > 0 else 0
    per = max(1, CHUNK_ELEMS // max(1, G * mq * max(keys * E, plan.wq * keys) + G * Nq * (band + sink_tokens)))
    out = torch.empty(BHk, G, Nq, E, dtype=cdt, device=q.device)
    for a0 in range(0, BHk, per):
        a1 = min(a0 + per, BHk)
        qc, kc, vc = q4[a0:a1], k3[a0:a1], v3[a0:a1]
        bc = None if bias is None else bias[a0:a1]
        o_r, lse_r = _routed(qc, kc, vc, bc, q_order[a0:a1], k_order[a0:a1], routes[a0:a1], route_ok[a0:a1],
                             plan.wq, plan.wk, scale, is_causal, pooled)
        if local_window > 0 or sink_tokens > 0:
            routed = routed_lookup(q_order[a0:a1], k_order[a0:a1], routes[a0:a1], route_ok[a0:a1], plan.wq,
                                   plan.wk, Nq, Nk) if local_window > 0 else None
            o_s, lse_s = _static(qc, kc, vc, bc, scale, is_causal, local_window, sink_tokens, routed)
            out[a0:a1] = merge_two(o_r, lse_r, o_s, lse_s)
        else:
            out[a0:a1] = torch.where(torch.isfinite(lse_r).unsqueeze(-1), o_r, 0.0)
    return out[..., :Dv].reshape(B, H, Nq, Dv)


def _routed(qc, kc, vc, bias, q_order, k_order, routes, route_ok, wq, wk, scale, is_causal, pooled):
    """Routed keys (and pooled blocks) -> (o [n, G, Nq, E], lse [n, G, Nq]) in position order."""
    n, G, Nq, E = qc.shape
    Nk = kc.shape[1]
    mq, r = routes.shape[2], routes.shape[3]
    mk = k_order.shape[-1] // wk
    dev = qc.device
    cdt = qc.dtype
    head_base = (torch.arange(G, device=dev) * Nq).view(1, G, 1)
    qg = _rows(qc.reshape(n, G * Nq, E), q_order.clamp(max=Nq - 1) + head_base).view(n, G, mq, wq, E)
    # keys and values in block order once per slice, then whole blocks gathered per route
    k_rows = k_order.clamp(max=Nk - 1)
    kb = _rows(kc, k_rows).view(n * mk, wk * E)
    vb = _rows(vc, k_rows).view(n * mk, wk * E)
    block_rows = (routes + (torch.arange(n, device=dev) * mk).view(n, 1, 1, 1)).reshape(-1)
    ksel = kb.index_select(0, block_rows).view(n * G * mq, 1, r * wk, E)
    vsel = vb.index_select(0, block_rows).view(n * G * mq, 1, r * wk, E)
    kpos = k_order.view(n * mk, wk).index_select(0, block_rows).view(n, G, mq, 1, r * wk)
    dead = (kpos == Nk) | ~route_ok.repeat_interleave(wk, dim=-1).view(n, G, mq, 1, r * wk)
    qpos = q_order.view(n, G, mq, wq, 1)
    mask = None
    if bias is not None:
        mask = bias.expand(n, G, Nk).gather(-1, k_rows.unsqueeze(1).expand(n, G, -1)).view(n, G, mk, wk)
        mask = mask.gather(2, routes.reshape(n, G, mq * r, 1).expand(n, G, mq * r, wk)).view(n, G, mq, 1, r * wk)
    if bias is not None or bool(dead.any()):
        mask = (torch.zeros((), dtype=cdt, device=dev) if mask is None else mask).masked_fill(dead, _NEG_INF)
        mask = mask.expand(n, G, mq, 1, r * wk)
    if is_causal:
        late = kpos > qpos
        mask = torch.zeros(n, G, mq, wq, r * wk, dtype=cdt, device=dev) if mask is None else mask
        mask = mask.masked_fill(late, _NEG_INF)
    o, lse = _flash(qg.reshape(n * G * mq, 1, wq, E), ksel, vsel,
                    None if mask is None else mask.reshape(n * G * mq, 1, mask.shape[-2], r * wk), scale)
    o, lse = o.view(n, G, mq, wq, E), lse.view(n, G, mq, wq)
    if pooled:
        # one pooled key per block not routed to the query block: explicit, [wq, Mk] per block
        kbar, beta, _, vbar = block_stats(kc, bias, k_order, wk, extra=vc)           # [n, G|1, Mk, E]
        ps = (qg * scale) @ kbar.unsqueeze(2).transpose(-1, -2) + beta.view(n, -1, 1, 1, mk)
        chosen = torch.zeros(n, G, mq, mk + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(route_ok, routes, mk), True)
        drop = chosen[..., :mk].unsqueeze(-2)
        if is_causal:
            klast = torch.where(k_order.view(n, mk, wk) < Nk, k_order.view(n, mk, wk), -1).amax(-1)
            drop = drop | (klast.view(n, 1, 1, 1, mk) > qpos)
        p_lo, lse_lo = softmax_and_lse(ps.masked_fill(drop, _NEG_INF))
        o = merge_two(o, lse, p_lo @ vbar.unsqueeze(2), lse_lo)
        lse = torch.logaddexp(lse, lse_lo)
    slot = torch.argsort(q_order, dim=-1)[..., :Nq]                                   # block-order slot of each query
    o = _rows(o.reshape(n, G * mq * wq, E), slot + (torch.arange(G, device=dev) * mq * wq).view(1, G, 1))
    lse = lse.reshape(n, G, mq * wq).gather(-1, slot)
    return o, lse


def _static(qc, kc, vc, bias, scale, is_causal, local_window, sink_tokens, routed):
    """Sink keys and the local window (minus routed keys) -> (o [n, G, Nq, E], lse [n, G, Nq]).
    The G query heads of a kv head share the keys of a band block: their rows go in one batch
    entry, so the keys are gathered once."""
    n, G, Nq, E = qc.shape
    Nk = kc.shape[1]
    S = min(sink_tokens, Nk)
    L = local_window
    dev = qc.device
    T = L if L > 0 else Nq
    tq = ceil_div(Nq, T)
    nqp = tq * T
    qpos = torch.arange(nqp, device=dev).view(tq, T, 1)
    qp = F.pad(qc, (0, 0, 0, nqp - Nq)).view(n, G, tq, T, E).transpose(1, 2).reshape(n * tq, 1, G * T, E)
    pos = torch.arange(S, device=dev).expand(tq, S)
    keep = (pos.unsqueeze(-2) <= qpos) if is_causal else torch.ones(tq, 1, S, dtype=torch.bool, device=dev)
    keep = keep.expand(tq, T, S)
    drop_routed = None
    if L > 0:
        width = 2 * L - 1
        off = L - 1 if is_causal else L // 2
        band = (torch.arange(tq, device=dev) * L - off).unsqueeze(-1) + torch.arange(width, device=dev)
        kp = band.unsqueeze(-2)
        in_band = (kp >= S) & (kp < Nk) & in_window(qpos, kp, L, is_causal)           # [tq, T, width]
        pos = torch.cat([pos, band.clamp(0, Nk - 1)], -1)
        keep = torch.cat([keep, in_band], -1)
        if routed is not None:
            drop_routed = F.pad(routed(qpos.clamp(max=Nq - 1), band.clamp(0, Nk - 1).unsqueeze(-2)), (S, 0))
    keys = pos.shape[-1]
    ks = _rows(kc, pos.expand(n, tq, keys)).view(n * tq, 1, keys, E)
    vs = _rows(vc, pos.expand(n, tq, keys)).view(n * tq, 1, keys, E)
    drop = ~keep                                                                       # [tq, T, keys]
    if drop_routed is not None:
        drop = drop | drop_routed                                                      # [n, G, tq, T, keys]
    mask = torch.zeros((), dtype=qc.dtype, device=dev)
    if bias is not None:
        mask = bias[:, :, pos].unsqueeze(-2)                                           # [n, G|1, tq, 1, keys]
    mask = mask.masked_fill(drop, _NEG_INF).expand(n, G, tq, T, keys).transpose(1, 2)
    o, lse = _flash(qp, ks, vs, mask.reshape(n * tq, 1, G * T, keys), scale)
    o = o.view(n, tq, G, T, E).transpose(1, 2).reshape(n, G, nqp, E)
    lse = lse.view(n, tq, G, T).transpose(1, 2).reshape(n, G, nqp)
    return o[:, :, :Nq], lse[:, :, :Nq]
