"""Routing attention forward in Triton: tokens sorted by cluster, block-sparse flash passes.

Pipeline (``forward``):

1. the routing plan (``plan.make_plan``: k-means, cluster order, blocks and routes) and, with
   ``pooled``, each key block's pooled key and value (``plan.block_stats``), in torch;
2. ``_routed_kernel`` (grid Mq*QT x B*H): one program per (query head, query block, tile of the
   block's queries). The query rows are gathered through ``q_order``; a flash pass runs over the
   keys of the block's routed key blocks (gathered through ``k_order``: the tokens sorted by
   cluster), then over the pooled keys of the other blocks. It writes each query's normalised
   partial output and log-sum-exp in position order (fp32 scratch);
3. ``_static_kernel`` (grid ceil(Nq/BM) x B*H): in position order, a flash pass over the sink keys
   and the local band (minus the keys of the query's routed blocks), then the log-sum-exp merge
   with the routed part, and the store.

It computes what ``torch.attend`` computes (the same plan, the same key sets). Mask conventions
follow the reference: key biases added as they are (-inf the only hard mask), empty slots and
invalid routes never loaded, ``is_causal`` as key position <= query position, and a row with no
finite logit in either part gets 0 while a NaN stays NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import ceil_div, is_key_padding
from ..triton_common import (NEG_INF, configs, dot_precision, empty_output, input_reason, inverse_or_zero,
                             key_bias_view, launch, log_sum, next_pow2, online_softmax, split_head)
from .plan import block_stats, flat_key_bias, make_plan

__all__ = ["supports", "forward"]


@triton.jit
def _accumulate(x, v, m, lsum, acc, DOT: tl.constexpr):
    """One online-softmax step over logits x [BM, BN] (-inf: excluded) and values v [BN, DVP]."""
    m, alpha, p, lsum = online_softmax(m, lsum, x)
    return m, lsum, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)


@triton.jit
def _scores(q, kt, scale, DOT: tl.constexpr):
    """Scaled logits of query rows q [BM, DP] against key rows kt [BN, DP]."""
    return tl.dot(q, tl.trans(kt), input_precision=DOT) * scale


@triton.autotune(configs=configs([(4, 2), (2, 2)]),
                 key=["WQ", "WK", "R", "MK", "D", "DV"])
@triton.jit
def _routed_kernel(
    Q, K, V, BIAS, QORD, KORD, ROUTES, RVALID, KBAR, BETA, VBAR, KLAST, OR, LSER,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn,
    H, G, HK, NQ, NK, MQ, MK, WQ, WK, R, D, DV, QT, scale,
    DP: tl.constexpr, DVP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, POOLED: tl.constexpr, DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = split_head(bh, H, G)
    bk = b * HK + hk
    t = pid // QT
    slot = (pid % QT) * BM + tl.arange(0, BM)
    s_ok = slot < WQ
    qp = tl.load(QORD + bh * (MQ * WQ) + t * WQ + slot, mask=s_ok, other=NQ)
    q_ok = s_ok & (qp < NQ)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    d_ok = rd < D
    dv_ok = rdv < DV
    q = tl.load(Q + b * sqb + h * sqh + qp[:, None] * sqn + rd[None, :] * sqd, mask=q_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([BM], float("-inf"), tl.float32)
    lsum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DVP], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    route_base = bh * (MQ * R) + t * R
    for i in range(R):
        blk = tl.load(ROUTES + route_base + i)
        ok = tl.load(RVALID + route_base + i)
        if ok != 0:
            for s0 in range(0, WK, BN):
                sl = s0 + tl.arange(0, BN)
                kp = tl.load(KORD + bk * (MK * WK) + blk * WK + sl, mask=sl < WK, other=NK)
                k_ok = (sl < WK) & (kp < NK)
                kt = tl.load(k_base + kp[:, None] * skn + rd[None, :] * skd, mask=k_ok[:, None] & d_ok[None, :],
                             other=0.0)
                x = _scores(q, kt, scale, DOT)
                if HAS_BIAS:
                    x = x + tl.load(BIAS + b * sbb + h * sbh + kp * sbn, mask=k_ok, other=0.0)[None, :]
                keep = k_ok[None, :]
                if CAUSAL:
                    keep = keep & (kp[None, :] <= qp[:, None])
                x = tl.where(keep, x, NEG_INF)
                vt = tl.load(v_base + kp[:, None] * svn + rdv[None, :] * svd, mask=k_ok[:, None] & dv_ok[None, :],
                             other=0.0)
                m, lsum, acc = _accumulate(x, vt, m, lsum, acc, DOT)
    if POOLED:
        for j0 in range(0, MK, BP):
            jb = j0 + tl.arange(0, BP)
            j_ok = jb < MK
            kb = tl.load(KBAR + bh * (MK * D) + jb[:, None] * D + rd[None, :], mask=j_ok[:, None] & d_ok[None, :],
                         other=0.0)
            x = _scores(q, kb, scale, DOT)
            x = x + tl.load(BETA + bh * MK + jb, mask=j_ok, other=float("-inf"))[None, :]
            routed = jb < 0
            for i in range(R):
                blk = tl.load(ROUTES + route_base + i)
                ok = tl.load(RVALID + route_base + i)
                routed = routed | ((jb == blk) & (ok != 0))
            keep = (j_ok & ~routed)[None, :] & q_ok[:, None]
            if CAUSAL:
                last = tl.load(KLAST + bk * MK + jb, mask=j_ok, other=0)
                keep = keep & (last[None, :] <= qp[:, None])
            x = tl.where(keep, x, NEG_INF)
            vb = tl.load(VBAR + bh * (MK * DV) + jb[:, None] * DV + rdv[None, :], mask=j_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            m, lsum, acc = _accumulate(x, vb, m, lsum, acc, DOT)
    o = acc * inverse_or_zero(lsum)[:, None]
    lse = log_sum(m, lsum)
    # a NaN anywhere in the row keeps its output NaN (lsum NaN is not 0)
    tl.store(OR + bh * (NQ * DV) + qp[:, None] * DV + rdv[None, :], o, mask=q_ok[:, None] & dv_ok[None, :])
    tl.store(LSER + bh * NQ + qp, lse, mask=q_ok)


@triton.autotune(configs=configs([(4, 2), (2, 2)]),
                 key=["L", "S", "R", "D", "DV"])
@triton.jit
def _static_kernel(
    Q, K, V, BIAS, QBLK, KBLK, ROUTES, RVALID, OR, LSER, OUT,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn, sob, soh, son, sod,
    H, G, HK, NQ, NK, MQ, MK, R, D, DV, L, S, scale,
    DP: tl.constexpr, DVP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = split_head(bh, H, G)
    bk = b * HK + hk
    qp = pid * BM + tl.arange(0, BM)
    q_ok = qp < NQ
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    d_ok = rd < D
    dv_ok = rdv < DV
    q = tl.load(Q + b * sqb + h * sqh + qp[:, None] * sqn + rd[None, :] * sqd, mask=q_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([BM], float("-inf"), tl.float32)
    lsum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DVP], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    # sink keys
    for s0 in range(0, S, BN):
        kp = s0 + tl.arange(0, BN)
        k_ok = kp < S
        kt = tl.load(k_base + kp[:, None] * skn + rd[None, :] * skd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        x = _scores(q, kt, scale, DOT)
        if HAS_BIAS:
            x = x + tl.load(BIAS + b * sbb + h * sbh + kp * sbn, mask=k_ok, other=0.0)[None, :]
        keep = k_ok[None, :]
        if CAUSAL:
            keep = keep & (kp[None, :] <= qp[:, None])
        x = tl.where(keep, x, NEG_INF)
        vt = tl.load(v_base + kp[:, None] * svn + rdv[None, :] * svd, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
        m, lsum, acc = _accumulate(x, vt, m, lsum, acc, DOT)
    # local band minus the keys of the query's routed blocks
    if L > 0:
        if CAUSAL:
            before = L - 1
            after = 0
        else:
            before = L // 2
            after = (L - 1) // 2
        lo = tl.maximum(pid * BM - before, S)
        hi = tl.minimum(pid * BM + BM - 1 + after + 1, NK)
        qb = tl.load(QBLK + bh * NQ + qp, mask=q_ok, other=0)
        for k0 in range(lo, hi, BN):
            kp = k0 + tl.arange(0, BN)
            k_ok = kp < hi
            kt = tl.load(k_base + kp[:, None] * skn + rd[None, :] * skd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            x = _scores(q, kt, scale, DOT)
            if HAS_BIAS:
                x = x + tl.load(BIAS + b * sbb + h * sbh + kp * sbn, mask=k_ok, other=0.0)[None, :]
            keep = k_ok[None, :] & (kp[None, :] >= qp[:, None] - before) & (kp[None, :] <= qp[:, None] + after)
            kb = tl.load(KBLK + bk * NK + kp, mask=k_ok, other=MK)
            for i in range(R):
                ri = tl.load(ROUTES + bh * (MQ * R) + qb * R + i, mask=q_ok, other=-1)
                oi = tl.load(RVALID + bh * (MQ * R) + qb * R + i, mask=q_ok, other=0)
                keep = keep & ~((ri[:, None] == kb[None, :]) & (oi[:, None] != 0))
            x = tl.where(keep, x, NEG_INF)
            vt = tl.load(v_base + kp[:, None] * svn + rdv[None, :] * svd, mask=k_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            m, lsum, acc = _accumulate(x, vt, m, lsum, acc, DOT)
    # log-sum-exp merge with the routed part (normalised o_r, lse_r)
    o_r = tl.load(OR + bh * (NQ * DV) + qp[:, None] * DV + rdv[None, :], mask=q_ok[:, None] & dv_ok[None, :],
                  other=0.0)
    lse_r = tl.load(LSER + bh * NQ + qp, mask=q_ok, other=float("-inf"))
    m_s = tl.where(lsum == 0.0, float("-inf"), m)
    mt = tl.maximum(m_s, lse_r)
    mt_safe = tl.where(mt == NEG_INF, 0.0, mt)
    w_s = tl.exp(m_s - mt_safe)
    w_r = tl.exp(lse_r - mt_safe)
    num = acc * w_s[:, None] + o_r * w_r[:, None]
    den = lsum * w_s + w_r
    out = num * inverse_or_zero(den)[:, None]
    tl.store(OUT + b * sob + h * soh + qp[:, None] * son + rdv[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=q_ok[:, None] & dv_ok[None, :])


def supports(q, k, v, attn_mask, is_causal, params) -> Optional[str]:
    """None when the kernels can serve this call, else why not."""
    reason = input_reason(q, v)
    if reason:
        return reason
    if attn_mask is not None and not is_key_padding(attn_mask):
        return "routing supports key-padding and causal masks only"
    if is_causal and params.local_window == 0 and params.sink_tokens == 0:
        return "is_causal needs local_window >= 1 or sink_tokens >= 1"
    return None


def forward(q, k, v, attn_mask, scale, is_causal, params, *, out=None, scratch_fill: Optional[float] = None):
    """Routing attention (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*]; writes
    ``out`` when given. ``scratch_fill`` fills the fp32 scratch of the routed part first (tests
    poison it with NaN to check that every row is written)."""
    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    B, H, NQ, D = q.shape
    Hk, NK, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hk
    BH = B * H
    dev = q.device
    plan = make_plan(q, k, attn_mask, scale, is_causal, params.clusters, params.window, params.routes,
                     params.iterations, params.sink_tokens)
    wq, wk, MQ, MK = plan.wq, plan.wk, plan.q_blocks, plan.k_blocks
    R = plan.routes.shape[-1]
    q_order = plan.q_order.reshape(BH, MQ * wq).contiguous()
    k_order = plan.k_order.reshape(B * Hk, MK * wk).contiguous()
    routes = plan.routes.reshape(BH, MQ, R).contiguous()
    rvalid = plan.route_valid.reshape(BH, MQ, R).to(torch.uint8)
    bias = key_bias_view(attn_mask, B, H, NK)
    sb = (0, 0, 0) if bias is None else bias.stride()
    in_dtype = q.dtype

    pooled = bool(params.pooled)
    if pooled:
        with torch.no_grad():
            kb = flat_key_bias(attn_mask, B, H, Hk, NK, torch.float32, dev)
            kbar, beta, _, vbar = block_stats(k.reshape(B * Hk, NK, D).float(), kb, k_order, wk,
                                              extra=v.reshape(B * Hk, NK, Dv).float())
        kbar = kbar.expand(B * Hk, G, MK, D).reshape(BH, MK, D).to(in_dtype).contiguous()
        vbar = vbar.expand(B * Hk, G, MK, Dv).reshape(BH, MK, Dv).to(in_dtype).contiguous()
        beta = beta.expand(B * Hk, G, MK).reshape(BH, MK).float().contiguous()
    else:
        kbar = vbar = beta = q
    klast = torch.where(k_order < NK, k_order, -1).view(B * Hk, MK, wk).amax(-1).contiguous()

    o_r = torch.empty(BH, NQ, Dv, device=dev, dtype=torch.float32)
    lse_r = torch.empty(BH, NQ, device=dev, dtype=torch.float32)
    if scratch_fill is not None:
        o_r.fill_(scratch_fill)
        lse_r.fill_(scratch_fill)
    DP, DVP = next_pow2(D), next_pow2(Dv)
    BM = min(64, next_pow2(wq))
    QT = ceil_div(wq, BM)
    BN = min(64 if max(DP, DVP) <= 64 else 32, next_pow2(wk))
    BP = 32
    DOT = dot_precision(in_dtype)
    launch(
        _routed_kernel, (MQ * QT, BH), (in_dtype, wq, wk, R, MK, D, Dv, bool(is_causal), bias is not None, pooled),
        q, k, v, q if bias is None else bias, q_order, k_order, routes, rvalid, kbar, beta, vbar, klast, o_r, lse_r,
        *q.stride(), *k.stride(), *v.stride(), *sb,
        H, G, Hk, NQ, NK, MQ, MK, wq, wk, R, D, Dv, QT, float(scale),
        DP=DP, DVP=DVP, BM=BM, BN=BN, BP=BP, CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, POOLED=pooled,
        DOT=DOT,
    )

    # position -> block maps for the band's exclusion of routed keys
    L = int(params.local_window)
    S = min(int(params.sink_tokens), NK)
    slot = torch.zeros(BH, NQ + 1, dtype=torch.int64, device=dev)
    slot.scatter_(-1, q_order, torch.arange(MQ * wq, device=dev).expand_as(q_order))
    q_block = (slot[:, :NQ] // wq).contiguous()
    k_block = torch.full((B * Hk, NK + 1), MK, dtype=torch.int64, device=dev)
    k_block.scatter_(-1, k_order, (torch.arange(MK * wk, device=dev) // wk).expand_as(k_order))
    k_block = k_block[:, :NK].contiguous()

    if out is None:
        out = torch.empty(B, H, NQ, Dv, device=dev, dtype=in_dtype)
    BMS = 32 if L <= 32 else 64
    BNS = 32 if max(DP, DVP) > 64 else 64
    launch(
        _static_kernel, (triton.cdiv(NQ, BMS), BH), (in_dtype, L, S, R, D, Dv, bool(is_causal), bias is not None),
        q, k, v, q if bias is None else bias, q_block, k_block, routes, rvalid, o_r, lse_r, out,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
        H, G, Hk, NQ, NK, MQ, MK, R, D, Dv, L, S, float(scale),
        DP=DP, DVP=DVP, BM=BMS, BN=BNS, CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, DOT=DOT,
    )
    return out
