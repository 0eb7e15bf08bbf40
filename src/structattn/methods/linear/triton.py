"""Linear attention forward in Triton: chunk states, chunked read-out, exact band; no N x N matrix.

The feature maps (small per-token MLPs) and the key weights run as torch ops (``torch.prepare``),
the merge of the two parts too (``torch.merge``, elementwise); the kernels do the sequence work:

1. ``_chunk_states``: per (state head, chunk of C keys) the state ``phi_k^T v`` [f, Dv] and
   ``sum phi_k`` [f]. Keys are indexed ``t = j - off`` so that query i sees ``t <= i`` (off = 0
   causal, -w causal with a window of w, ``Nk - Nq - w`` for the keys after the window of a
   non-causal query on the reversed sequences). An exclusive prefix sum over chunks (torch, on
   the [S, chunks, f, Dv] states) plus the keys with t < 0 gives each query chunk its state.
2. ``_linear_out``: per (query chunk, head, Dv tile) ``num = phi_q P + tril(phi_q phi_k^T) v`` and
   ``den`` likewise (``MODE_ALL``: one state of every key, no intra-chunk term: non-causal
   without a window).
3. ``_exact_part``: per (block of queries, head) an online softmax over the band
   ``|i - j| < window`` (and ``j <= i`` when causal) and then the sink keys ``j < sinks`` outside
   the band, with the key-padding bias; returns out, log-sum-exp and the row max.

Same formula as ``torch.py`` (and ``naive.py``); fp32 accumulation always, fp32 inputs use IEEE
dots, fp16 / bf16 inputs the default (tf32) ones on features that stay fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import as_4d, interpreting, is_key_padding
from ..triton_common import NEG_INF, dot_precision, empty_output, input_reason, next_pow2
from .torch import merge, prepare

#: largest feature count and value head_dim the kernels hold in registers
MAX_FEATURES = 256
MAX_HEAD_DIM = 128
MODE_ALL, MODE_CAUSAL = 0, 1


def _alloc(*shape, device) -> torch.Tensor:
    """Every buffer a kernel writes (tests replace this to NaN-fill them: unwritten elements show)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


@triton.jit
def _chunk_states(FK, V, KV, Z, off, NK, F, DV,
                  s_fk0, s_fk1, s_fk2, s_v0, s_v1, s_v2, s_kv0, s_kv1, s_kv2, s_kv3, s_z0, s_z1, s_z2,
                  C: tl.constexpr, FP: tl.constexpr, BDV: tl.constexpr, DOT: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    dvb = tl.program_id(2)
    j = c * C + tl.arange(0, C) + off
    ok = (j >= 0) & (j < NK)
    rf = tl.arange(0, FP)
    rdv = dvb * BDV + tl.arange(0, BDV)
    fk = tl.load(FK + s * s_fk0 + j[:, None] * s_fk1 + rf[None, :] * s_fk2, mask=ok[:, None] & (rf < F)[None, :],
                 other=0.0).to(tl.float32)
    v = tl.load(V + s * s_v0 + j[:, None] * s_v1 + rdv[None, :] * s_v2, mask=ok[:, None] & (rdv < DV)[None, :],
                other=0.0).to(tl.float32)
    kv = tl.dot(tl.trans(fk), v, input_precision=DOT)                                   # [FP, BDV]
    tl.store(KV + s * s_kv0 + c * s_kv1 + rf[:, None] * s_kv2 + rdv[None, :] * s_kv3, kv,
             mask=(rf < F)[:, None] & (rdv < DV)[None, :])
    if dvb == 0:
        tl.store(Z + s * s_z0 + c * s_z1 + rf * s_z2, tl.sum(fk, 0), mask=rf < F)


@triton.jit
def _linear_out(FQ, FK, V, P, PZ, NUM, DEN, off, NQ, NK, H, G, HS, F, DV,
                s_fq0, s_fq1, s_fq2, s_fq3, s_fk0, s_fk1, s_fk2, s_v0, s_v1, s_v2,
                s_p0, s_p1, s_p2, s_p3, s_pz0, s_pz1, s_pz2, s_n0, s_n1, s_n2, s_n3, s_d0, s_d1, s_d2,
                MODE: tl.constexpr, C: tl.constexpr, FP: tl.constexpr, BDV: tl.constexpr, DOT: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    dvb = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    s = b * HS + h // G
    ri = c * C + tl.arange(0, C)
    iok = ri < NQ
    rf = tl.arange(0, FP)
    fok = rf < F
    rdv = dvb * BDV + tl.arange(0, BDV)
    dok = rdv < DV
    fq = tl.load(FQ + b * s_fq0 + h * s_fq1 + ri[:, None] * s_fq2 + rf[None, :] * s_fq3,
                 mask=iok[:, None] & fok[None, :], other=0.0).to(tl.float32)
    cs = c if MODE == 1 else 0
    state = tl.load(P + s * s_p0 + cs * s_p1 + rf[:, None] * s_p2 + rdv[None, :] * s_p3,
                    mask=fok[:, None] & dok[None, :], other=0.0)
    z = tl.load(PZ + s * s_pz0 + cs * s_pz1 + rf * s_pz2, mask=fok, other=0.0)
    num = tl.dot(fq, state, input_precision=DOT)                                         # [C, BDV]
    den = tl.sum(fq * z[None, :], 1)
    if MODE == 1:
        t = c * C + tl.arange(0, C)
        j = t + off
        ok = (j >= 0) & (j < NK)
        fk = tl.load(FK + s * s_fk0 + j[:, None] * s_fk1 + rf[None, :] * s_fk2, mask=ok[:, None] & fok[None, :],
                     other=0.0).to(tl.float32)
        v = tl.load(V + s * s_v0 + j[:, None] * s_v1 + rdv[None, :] * s_v2, mask=ok[:, None] & dok[None, :],
                    other=0.0).to(tl.float32)
        a = tl.dot(fq, tl.trans(fk), input_precision=DOT)                                # [C, C]
        a = tl.where(t[None, :] <= ri[:, None], a, 0.0)
        num += tl.dot(a, v, input_precision=DOT)
        den += tl.sum(a, 1)
    tl.store(NUM + b * s_n0 + h * s_n1 + ri[:, None] * s_n2 + rdv[None, :] * s_n3, num,
             mask=iok[:, None] & dok[None, :])
    if dvb == 0:
        tl.store(DEN + b * s_d0 + h * s_d1 + ri * s_d2, den, mask=iok)


@triton.jit
def _softmax_tile(q, acc, m, lsum, K, V, BIAS, kbase, vbase, bbase, ri, n0, lo_j, hi_j, NK, D, DV, scale, window, sinks,
                  s_k2, s_k3, s_v2, s_v3, s_b2, SINK_PASS: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                  DOT: tl.constexpr):
    rn = n0 + tl.arange(0, BN)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    nok = (rn >= lo_j) & (rn < hi_j) & (rn < NK)
    kt = tl.load(K + kbase + rn[:, None] * s_k2 + rd[None, :] * s_k3, mask=nok[:, None] & (rd < D)[None, :],
                 other=0.0)
    x = tl.dot(q, tl.trans(kt), input_precision=DOT) * scale                            # [BM, BN]
    if HAS_BIAS:
        kb = tl.load(BIAS + bbase + rn * s_b2, mask=nok, other=0.0)[None, :]
        x = tl.where(kb == NEG_INF, NEG_INF, x + kb)     # a masked key is dropped, even an inf logit
    dist = rn[None, :] - ri[:, None]
    near = (dist < window) & (dist > -window)
    if SINK_PASS:
        keep = (rn[None, :] < sinks) & (near == 0)
    else:
        keep = near
    if CAUSAL:
        keep = keep & (dist <= 0)
    keep = keep & nok[None, :]
    x = tl.where(keep, x, NEG_INF)
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(x - m_safe[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    vt = tl.load(V + vbase + rn[:, None] * s_v2 + rdv[None, :] * s_v3, mask=nok[:, None] & (rdv < DV)[None, :],
                 other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT)
    return acc, m_new, lsum


@triton.jit
def _exact_part(Q, K, V, BIAS, O, LSE, M, scale, NQ, NK, H, G, HS, D, DV, window, sinks,
                s_q0, s_q1, s_q2, s_q3, s_k0, s_k1, s_k2, s_k3, s_v0, s_v1, s_v2, s_v3, s_b0, s_b1, s_b2,
                s_o0, s_o1, s_o2, s_o3, s_l0, s_l1, s_l2,
                CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                DP: tl.constexpr, DVP: tl.constexpr, DOT: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hs = h // G
    ri = mb * BM + tl.arange(0, BM)
    iok = ri < NQ
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    q = tl.load(Q + b * s_q0 + h * s_q1 + ri[:, None] * s_q2 + rd[None, :] * s_q3, mask=iok[:, None] & (rd < D)[None, :],
                other=0.0)
    kbase = b * s_k0 + hs * s_k1
    vbase = b * s_v0 + hs * s_v1
    bbase = b * s_b0 + hs * s_b1
    m = tl.full([BM], NEG_INF, tl.float32)
    lsum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DVP], tl.float32)
    if window > 0:
        first = mb * BM
        last = tl.minimum(mb * BM + BM, NQ) - 1
        lo = tl.maximum(first - window + 1, 0)
        hi = last + 1 if CAUSAL else last + window
        hi = tl.minimum(hi, NK)
        for n0 in range(lo, hi, BN):
            acc, m, lsum = _softmax_tile(q, acc, m, lsum, K, V, BIAS, kbase, vbase, bbase, ri, n0, lo, hi, NK, D, DV,
                                         scale, window, sinks, s_k2, s_k3, s_v2, s_v3, s_b2, False, CAUSAL, HAS_BIAS,
                                         BN, DP, DVP, DOT)
    if sinks > 0:
        hi_s = tl.minimum(sinks, NK)
        for n0 in range(0, hi_s, BN):
            acc, m, lsum = _softmax_tile(q, acc, m, lsum, K, V, BIAS, kbase, vbase, bbase, ri, n0, 0, hi_s, NK, D, DV,
                                         scale, window, sinks, s_k2, s_k3, s_v2, s_v3, s_b2, True, CAUSAL, HAS_BIAS,
                                         BN, DP, DVP, DOT)
    dead = lsum == 0.0
    inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, lsum))
    tl.store(O + b * s_o0 + h * s_o1 + ri[:, None] * s_o2 + rdv[None, :] * s_o3, acc * inv[:, None],
             mask=iok[:, None] & (rdv < DV)[None, :])
    lse = tl.where(dead, NEG_INF, m + tl.log(tl.where(dead, 1.0, lsum)))
    tl.store(LSE + b * s_l0 + h * s_l1 + ri * s_l2, lse, mask=iok)
    tl.store(M + b * s_l0 + h * s_l1 + ri * s_l2, tl.where(m == NEG_INF, 0.0, m), mask=iok)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _sums(fq, fk, v, off: int, mode: int, chunk: int, dot: bool, h: int, g: int):
    """(num [B', H', Nq, Dv], den [B', H', Nq]) of keys ``j <= i + off`` (MODE_CAUSAL) or of all
    keys (MODE_ALL) for fq [S, g, Nq, f] viewed as [B', H', ...] with H' = h query heads."""
    S, _, nq, f = fq.shape
    nk, dv = fk.shape[1], v.shape[-1]
    B = S * g // h
    hs = h // g
    FP, BDV = next_pow2(f), min(next_pow2(dv), 64)
    ndv = triton.cdiv(dv, BDV)
    if mode == MODE_CAUSAL:
        nc = triton.cdiv(nq, chunk)
        kv = _alloc(S, nc, f, dv, device=fq.device)
        z = _alloc(S, nc, f, device=fq.device)
        _chunk_states[(nc, S, ndv)](fk, v, kv, z, off, nk, f, dv, *fk.stride(), *v.stride(), *kv.stride(),
                                    *z.stride(), C=chunk, FP=FP, BDV=BDV, DOT=dot)
        p = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1].cumsum(1)], 1)     # exclusive prefix sums
        pz = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1].cumsum(1)], 1)
        if off > 0:                                # keys before the first chunk: seen by every query
            base = min(off, nk)
            p = p + (fk[:, :base].transpose(-1, -2).float() @ v[:, :base].float()).unsqueeze(1)
            pz = pz + fk[:, :base].float().sum(1).unsqueeze(1)
        grid_c = nc
    else:
        p = (fk.transpose(-1, -2).float() @ v.float()).unsqueeze(1)
        pz = fk.float().sum(1).unsqueeze(1)
        grid_c = triton.cdiv(nq, chunk)
    p, pz = p.contiguous(), pz.contiguous()
    fq4 = fq.reshape(B, h, nq, f)
    num = _alloc(B, h, nq, dv, device=fq.device)
    den = _alloc(B, h, nq, device=fq.device)
    _linear_out[(grid_c, B * h, ndv)](fq4, fk, v, p, pz, num, den, off, nq, nk, h, g, hs, f, dv,
                                      *fq4.stride(), *fk.stride(), *v.stride(), *p.stride(), *pz.stride(),
                                      *num.stride(), *den.stride(), MODE=mode, C=chunk, FP=FP, BDV=BDV, DOT=dot)
    return num, den


def supports(q, k, v, attn_mask, is_causal, params) -> Optional[str]:
    """None when the kernels serve these inputs, else why not."""
    reason = input_reason(q, v, MAX_HEAD_DIM)
    if reason:
        return reason
    if params.num_features > MAX_FEATURES:
        return f"num_features {params.num_features} above the kernels' limit of {MAX_FEATURES}"
    if attn_mask is not None and not is_key_padding(attn_mask):
        m = as_4d(attn_mask)
        if not bool((m == m[..., :1, :]).all()):
            return "the kernels take key-padding masks only (no query axis)"
    return None


def forward(q, k, v, attn_mask, scale, is_causal, params, *tensors):
    """Linear attention (module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*] -> [B,H,Nq,Dv]."""
    from . import check_bound

    check_bound(params, tensors)
    done = empty_output(q, k, v, None)
    if done is not None:
        return done
    B, H, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    w, sinks = params.local_window, params.sink_tokens
    pre = prepare(q, k, v, attn_mask, scale, params.feature_map, tensors, sinks)
    dot = dot_precision(q.dtype)
    chunk = max(16, min(next_pow2(params.chunk_size), 128))
    g = pre.fq.shape[1]
    hq = pre.hs * g
    fq, fk, vf = pre.fq.contiguous(), pre.fk.contiguous(), pre.v.contiguous()
    if is_causal:
        num, den = _sums(fq, fk, vf, -w, MODE_CAUSAL, chunk, dot, hq, g)
    elif w == 0:
        num, den = _sums(fq, fk, vf, 0, MODE_ALL, chunk, dot, hq, g)
    else:
        num, den = _sums(fq, fk, vf, -w, MODE_CAUSAL, chunk, dot, hq, g)
        rn, rd = _sums(fq.flip(2).contiguous(), fk.flip(1).contiguous(), vf.flip(1).contiguous(), nk - nq - w,
                       MODE_CAUSAL, chunk, dot, hq, g)
        num, den = num + rn.flip(2), den + rd.flip(2)
    exact = None
    if w > 0 or sinks > 0:
        exact = _exact(q, k, v, pre, scale, is_causal, w, sinks, dot, hq)
    S = pre.fq.shape[0]
    out = merge(num.reshape(S, g, nq, dv), den.reshape(S, g, nq), pre.shift,
                None if exact is None else tuple(t.reshape(S, g, nq, *t.shape[3:]) for t in exact))
    return out.reshape(B, H, nq, dv).to(q.dtype)


def _exact(q, k, v, pre, scale, is_causal, w, sinks, dot, hq):
    """(out [B, hq, Nq, Dv], lse, m [B, hq, Nq]) of the exact part."""
    B, H, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    hs = pre.hs
    g = hq // hs
    # the inputs' own dtype (the dots take q and k alike); per-query-head states repeat kv heads
    kk, vv = (k, v) if hs == k.shape[1] else (k.repeat_interleave(hs // k.shape[1], 1),
                                              v.repeat_interleave(hs // k.shape[1], 1))
    out = _alloc(B, hq, nq, dv, device=q.device)
    lse = _alloc(B, hq, nq, device=q.device)
    m = _alloc(B, hq, nq, device=q.device)
    bias = pre.bias.view(B, hs, nk) if pre.bias is not None else out
    sb = bias.stride() if pre.bias is not None else (0, 0, 0)
    DP, DVP = next_pow2(d), next_pow2(dv)
    BM = 64 if max(DP, DVP) <= 64 else 32
    BN = 32 if interpreting() else 64
    _exact_part[(triton.cdiv(nq, BM), B * hq)](
        q, kk, vv, bias, out, lse, m, float(scale), nq, nk, hq, g, hs, d, dv, w, sinks,
        *q.stride(), *kk.stride(), *vv.stride(), *sb, *out.stride(), *lse.stride(),
        CAUSAL=bool(is_causal), HAS_BIAS=pre.bias is not None, BM=BM, BN=BN, DP=DP, DVP=DVP, DOT=dot)
    return out, lse, m
