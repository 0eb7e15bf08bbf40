"""Fast plain-torch linear attention (the CPU path, and the formulation autograd differentiates).

Computes ``naive.py``'s formula without an N x N matrix:

* features ``phi_q(q)`` [B, H, Nq, f] and ``phi_k(k)`` [B, Hk, Nk, f] in fp32 (float64 stays);
* key weights ``c_j = exp(b_j - beta)`` from the key-padding bias (``beta`` = the largest finite
  bias of the row, 0 for masked keys), 0 for the sink tokens (they are in the exact part);
* linear part as sums ``sum_j (phi_q(q_i) . c_j phi_k(k_j)) [v_j, 1]`` (numerator and normaliser
  in one product): one state ``phi_k^T [v, 1]`` per kv head without a mask structure; causal
  (keys ``j <= i - w``, w the window) by chunks of ``chunk_size`` queries: exclusive prefix sums of
  per-chunk states plus a masked intra-chunk product; non-causal with a window as that plus the
  same on the reversed sequences (keys ``j >= i + w``);
* exact part (window, sinks): softmax over the band of keys around each query chunk
  (``unfold`` views) and the sink keys, with its log-sum-exp and its row max ``m_i``;
* the two parts merged by log-sum-exp with ``lse_lin = gamma_h + m_i + beta + log(normaliser)``.

GQA keeps one state per kv head (a mask with a per-query-head bias gets one per query head).
Work is split over slices of (batch x state heads) so temporaries stay near ``CHUNK_ELEMS``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..base import empty_result
from ..common import MASKED, check_heads, compute_dtype, key_padding_bias, softmax_and_lse
from ..mra.torch import merge_partial
from .maps import apply_map, feature_inputs

__all__ = ["linear_forward", "prepare", "merge", "Prepared", "key_weights", "causal_linear", "band_exact"]

#: target size (elements) of the largest temporary of one slice of (batch x state heads)
CHUNK_ELEMS = 1 << 22


def key_weights(bias: Optional[torch.Tensor], nk: int, sink_tokens: int, dtype, device
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(c, beta)``: key weights [Bm, Hm, Nk] of the linear part and the shift beta [Bm, Hm]
    (None, None without a mask or sinks; c None and beta set never happens)."""
    if bias is None:
        if not sink_tokens:
            return None, None
        c = torch.ones(1, 1, nk, dtype=dtype, device=device)
        c[..., :sink_tokens] = 0
        return c, torch.zeros(1, 1, dtype=dtype, device=device)
    beta = bias.amax(-1)
    beta = beta.masked_fill(beta == MASKED, 0.0)
    c = torch.exp(bias - beta.unsqueeze(-1))
    if sink_tokens:
        c = c.clone()
        c[..., :sink_tokens] = 0
    return c, beta


def _shift(t: torch.Tensor, off: int, n: int) -> torch.Tensor:
    """Rows ``t[:, off + r]`` for r in [0, n) along dim 1 (zeros where off + r is out of range)."""
    nk = t.shape[1]
    lo, dst = max(0, off), min(n, max(0, -off))
    count = max(0, min(nk - lo, n - dst))
    return F.pad(t[:, lo:lo + count], (0, 0, dst, n - dst - count))


def causal_linear(fq: torch.Tensor, fk: torch.Tensor, vv: torch.Tensor, off: int, chunk: int) -> torch.Tensor:
    """``out_i = sum_{j <= i + off} (fq_i . fk_j) vv_j`` by chunks of ``chunk`` queries.

    fq [S, G, Nq, f], fk [S, Nk, f], vv [S, Nk, e] -> [S, G, Nq, e]. Keys are re-indexed by
    ``t = j - off`` so that query i sees ``t <= i``: keys with t < 0 form a base state every
    query sees, keys with ``t >= Nq`` none.
    """
    S, G, nq, f = fq.shape
    e = vv.shape[-1]
    nc = -(-nq // chunk)
    npad = nc * chunk
    fks = _shift(fk, off, npad).view(S, nc, chunk, f)
    vvs = _shift(vv, off, npad).view(S, nc, chunk, e)
    kv = fks.transpose(-1, -2) @ vvs                                          # [S, nc, f, e]
    prefix = kv.cumsum(1)
    prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], 1)  # exclusive
    if off > 0:
        base = min(off, fk.shape[1])
        prefix = prefix + (fk[:, :base].transpose(-1, -2) @ vv[:, :base]).unsqueeze(1)
    fqc = F.pad(fq, (0, 0, 0, npad - nq)).view(S, G, nc, chunk, f)
    out = fqc @ prefix.unsqueeze(1)                                           # [S, G, nc, C, e]
    scores = fqc @ fks.transpose(-1, -2).unsqueeze(1)                         # [S, G, nc, C, C]
    scores = scores.tril()
    out = out + scores @ vvs.unsqueeze(1)
    return out.view(S, G, npad, e)[:, :, :nq]


def _linear_part(fq, fk, vv, is_causal: bool, window: int, chunk: int) -> torch.Tensor:
    """Sums over the linear set (see the module docstring): [S, G, Nq, e]."""
    nq, nk = fq.shape[2], fk.shape[1]
    if is_causal:
        return causal_linear(fq, fk, vv, -window, chunk)
    if window == 0:
        state = fk.transpose(-1, -2) @ vv                                     # [S, f, e]
        return fq @ state.unsqueeze(1)
    ahead = causal_linear(fq.flip(2), fk.flip(1), vv.flip(1), nk - nq - window, chunk).flip(2)
    return causal_linear(fq, fk, vv, -window, chunk) + ahead


def band_exact(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], is_causal: bool,
               window: int, sinks: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the exact set (keys ``|i - j| < window``, ``j < sinks``; causal ``j <= i``).

    qs [S, G, Nq, D] (already scaled), k [S, Nk, D], v [S, Nk, Dv], bias [S, Nk] or None ->
    ``(out [S, G, Nq, Dv], lse [S, G, Nq], m [S, G, Nq])`` with m the row max (0 for a row
    without a finite logit, whose out is 0 and lse -inf).
    """
    S, G, nq, d = qs.shape
    nk, dv = k.shape[1], v.shape[-1]
    parts, values = [], []
    if window:
        nc = -(-nq // chunk)
        npad = nc * chunk
        behind, ahead = window - 1, (0 if is_causal else window - 1)
        span = chunk + behind + ahead                                # keys seen by one query chunk
        total = npad + behind + ahead
        keep = min(nk, total - behind)
        kp = F.pad(k[:, :keep], (0, 0, behind, total - behind - keep))
        vp = F.pad(v[:, :keep], (0, 0, behind, total - behind - keep))
        bp = bias[:, :keep] if bias is not None else torch.zeros(S, keep, dtype=qs.dtype, device=qs.device)
        bp = F.pad(bp, (behind, total - behind - keep), value=MASKED)
        kw = kp.unfold(1, span, chunk)                                # [S, nc, D, span]
        vw = vp.unfold(1, span, chunk)                                # [S, nc, Dv, span]
        bw = bp.unfold(1, span, chunk)                                # [S, nc, span]
        qc = F.pad(qs, (0, 0, 0, npad - nq)).view(S, G, nc, chunk, d)
        s = qc @ kw.unsqueeze(1)                                      # [S, G, nc, C, span]
        r = torch.arange(chunk, device=qs.device).unsqueeze(-1)
        p = torch.arange(span, device=qs.device)
        band = ((p - r) >= 0) & ((p - r) <= behind + ahead)
        bw = bw.unsqueeze(1).unsqueeze(-2)
        # a masked key (-inf bias) is dropped whatever its logit holds (SDPA's bool-mask behaviour)
        s = (s + bw).masked_fill(~band | (bw == MASKED), MASKED)
        parts.append(s.view(S, G, npad, span)[:, :, :nq])
        values.append(vw.transpose(-1, -2))
    sinks = min(sinks, nk)
    if sinks:
        s = qs @ k[:, :sinks].transpose(-1, -2).unsqueeze(1)          # [S, G, Nq, sinks]
        if bias is not None:
            bs = bias[:, None, None, :sinks]
            s = (s + bs).masked_fill(bs == MASKED, MASKED)
        i = torch.arange(nq, device=qs.device).unsqueeze(-1)
        j = torch.arange(sinks, device=qs.device)
        drop = (j - i).abs() < window                                 # already in the band
        if is_causal:
            drop = drop | (j > i)
        parts.append(s.masked_fill(drop, MASKED))
    logits = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    m = logits.amax(-1)
    m = m.masked_fill(m == MASKED, 0.0)
    prob, lse = softmax_and_lse(logits)
    out = None
    if window:
        pb = prob[..., :span] if sinks else prob
        pb = F.pad(pb, (0, 0, 0, npad - nq)).view(S, G, nc, chunk, span)
        out = (pb @ values[0].unsqueeze(1)).view(S, G, npad, dv)[:, :, :nq]
    if sinks:
        o_s = prob[..., -sinks:] @ v[:, :sinks].unsqueeze(1)
        out = o_s if out is None else out + o_s
    return out, lse, m


class Prepared(NamedTuple):
    """What both paths compute first (``prepare``), in the compute dtype, heads flattened to
    S = B x state heads (hs: the kv heads, or the query heads when the mask's bias is per query
    head) with g = H / hs query heads each."""

    fq: torch.Tensor                  # [S, g, Nq, f] query features
    fk: torch.Tensor                  # [S, Nk, f] key features times the key weights (0: not linear)
    k: torch.Tensor                   # [S, Nk, D]
    v: torch.Tensor                   # [S, Nk, Dv]
    bias: Optional[torch.Tensor]      # [S, Nk] key bias of the exact part, or None
    shift: torch.Tensor               # [S, g, 1] gamma of the query head + beta of the row
    hs: int


def prepare(q, k, v, attn_mask, scale: float, kind: str, tensors: tuple, sink_tokens: int) -> Prepared:
    """Features, key weights and the log-sum-exp shift of the linear part (module docstring)."""
    B, H, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    G = check_heads(q, k)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    n = (len(tensors) - 1) // 2
    gamma, qmap, kmap = tensors[0].to(device=dev, dtype=cdt), tensors[1:1 + n], tensors[1 + n:]
    bias = key_padding_bias(attn_mask, nk, nk, cdt, dev, "linear attention")      # [Bm, Hm, Nk]
    c, beta = key_weights(bias, nk, sink_tokens, cdt, dev)
    xq, xk = feature_inputs(q.to(cdt), k.to(cdt), scale)
    fq = apply_map(kind, [t.to(dev) for t in qmap], xq)                           # [B, H, Nq, f]
    fk = apply_map(kind, [t.to(dev) for t in kmap], xk)                           # [B, Hk, Nk, f]
    kc, vc = k.to(cdt), v.to(cdt)
    if bias is not None and bias.shape[1] == H and H != hk:
        # a per-query-head key bias: one state per query head
        fk, kc, vc = (t.repeat_interleave(G, 1) for t in (fk, kc, vc))
    hs = fk.shape[1]
    g = H // hs
    if c is not None:
        w = c.expand(B, hs, nk)
        fk = (fk * w.unsqueeze(-1)).masked_fill((w == 0).unsqueeze(-1), 0.0)   # a masked key adds nothing
    shift = gamma.view(1, hs, g, 1).expand(B, hs, g, 1)
    if beta is not None:
        shift = shift + beta.expand(B, hs).view(B, hs, 1, 1)
    f = fq.shape[-1]
    return Prepared(fq.reshape(B * hs, g, nq, f), fk.reshape(B * hs, nk, f), kc.reshape(B * hs, nk, -1),
                    vc.reshape(B * hs, nk, -1), None if bias is None else bias.expand(B, hs, nk).reshape(B * hs, nk),
                    shift.reshape(B * hs, g, 1), hs)


def merge(num: torch.Tensor, den: torch.Tensor, shift: torch.Tensor,
          exact: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The output from the linear sums ``num`` [.., Nq, Dv], ``den`` [.., Nq] and, when there is
    an exact part, its ``(out, lse, m)``: one normaliser (log-sum-exp merge, lse of the linear
    part ``log(den) + shift + m``). A row without any key gives 0."""
    o_lin = num / den.masked_fill(den == 0, 1.0).unsqueeze(-1)
    if exact is None:
        return o_lin
    o_ex, lse_ex, m = exact
    # den = 0 (no linear key): lse -inf, with no NaN gradient from log(0)
    lse_lin = torch.log(den.clamp_min(torch.finfo(den.dtype).tiny)).masked_fill(den == 0, MASKED) + shift + m
    return merge_partial(o_ex, lse_ex.unsqueeze(-1), o_lin, lse_lin.unsqueeze(-1))


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   scale: float, is_causal: bool, kind: str, tensors: tuple, local_window: int,
                   sink_tokens: int, chunk_size: int) -> torch.Tensor:
    """Linear attention with fitted maps on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] ->
    [B,H,Nq,Dv]; ``tensors`` = ``FeatureMaps.tensors()`` of ``kind``. Key-padding masks only."""
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    B, H, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    cdt = compute_dtype(q.dtype)
    pre = prepare(q, k, v, attn_mask, scale, kind, tensors, sink_tokens)
    g, f = pre.fq.shape[1], pre.fq.shape[-1]
    vv = torch.cat([pre.v, torch.ones_like(pre.v[..., :1])], -1)                 # [S, Nk, Dv+1]
    exact_part = local_window > 0 or sink_tokens > 0
    qs = (q.to(cdt) * scale).reshape(pre.fq.shape[0], g, nq, d) if exact_part else None
    chunk = max(1, min(chunk_size, nq))
    per_slice = g * max(nq * (f + dv + 1), nq * (chunk + 2 * local_window + sink_tokens)) \
        + (nq // chunk + 1) * f * (dv + 1) * 2
    step = max(1, CHUNK_ELEMS // max(1, per_slice))
    outs = []
    for a in range(0, pre.fq.shape[0], step):
        z = slice(a, min(a + step, pre.fq.shape[0]))
        lin = _linear_part(pre.fq[z], pre.fk[z], vv[z], is_causal, local_window, chunk)   # [s, g, Nq, Dv+1]
        exact = None
        if exact_part:
            exact = band_exact(qs[z], pre.k[z], pre.v[z], None if pre.bias is None else pre.bias[z], is_causal,
                               local_window, sink_tokens, chunk)
        outs.append(merge(lin[..., :dv], lin[..., dv], pre.shift[z], exact))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.reshape(B, H, nq, dv).to(q.dtype)
