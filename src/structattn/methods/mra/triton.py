"""MRA-2 / MRA-2-s forward in Triton: pooling + selection, pooled values, and the fused kernel.

Pipeline (``forward``), five launches (plus a few small torch ops when a mask is given):

1. **pooling + selection** (``select``, three launches, instead of the ~40 small torch launches of
   ``torch.mra_select``, which computes the same ``MraSelection``; rules in docs/methods/mra.md):
   * ``_pool_qk_kernel`` (grid max(Mq, Mk) x B*H): per block, the mean of its queries (q_hat);
     per key block, in two passes over its keys, the max of their biases and then the
     bias-softmax weighted mean of the keys (k_hat), the logsumexp of the biases (``block_lse``;
     log(count) without a mask) and the number of keys whose bias is not -inf (count);
   * ``_lowres_kernel`` (grid Mq/BM x Mk/BN x B*H): ``qk = s * q_hat k_hat^T`` on candidates
     (count > 0; causal: key block <= query block), written twice: as the selection rank
     ``qk + block_lse - log(count)`` (NaN -> -1e38, clamped to +-1e38; the ``sink_blocks`` first
     blocks at 3e38, the causal diagonal at +inf so it is always chosen first) and as the pooled
     branch's logit ``qk + block_lse`` (-inf off candidates). The product is an IEEE fp32
     ``tl.dot`` so the scores match torch's fp32 matmul to rounding;
   * ``_topr_kernel`` (grid Mq x B*H): each row's r best blocks by r rounds of max / first argmax
     over the row held in registers; chosen blocks get pooled logit -inf.
   Ties: the lowest block index wins (``torch.topk`` leaves ties unspecified); only exact ties can
   differ from the torch selection, which random data does not produce (ranks clamped to +-1e38 or
   a NaN score tie by construction: only inputs holding +-inf / NaN produce them). Rows up to
   ``MAX_BLOCKS`` key blocks (N = 256K at b = 32); longer rows use the torch selection
   (``SELECT_IMPL`` picks another implementation for measurements).
2. ``_pool_v_kernel`` (one launch, grid Mk x B*H): the pooled values ``vhat`` (fp32), each block's
   values weighted by the softmax of their key biases ``exp(bias - block_lse)`` (block means
   without a mask).
3. ``_mra_kernel`` (one launch, grid ceil(Mq/QB) x B*H), per program QB query blocks:
   * pooled remainder for the QB blocks at once: an online softmax over the Mk pooled logits and a
     [QB, Mk] x [Mk, Dv] product with ``vhat`` on the tensor cores (vhat is read once per QB
     blocks, not once per block);
   * for each query block: a flash-style pass over the keys of its selected blocks (exact scores
     with the key-padding bias and, for ``is_causal``, key <= query), then the log-sum-exp merge
     with the block's pooled partial softmax, and the store.

Score modifications: a constant scale and key-only biases fold into the scale and the key-padding
bias (the pipeline above, unchanged). Any other expression (soft-capping, relative / general
biases, chains) and sliding windows: its key-only summands stay in the key-padding bias, the
selection and pooled logits come from ``torch.mra_select`` (which applies the expression at the
blocks' mean positions and the window's candidate rules), and ``_mra_kernel`` applies the rest as
the site's generated ``score_mod`` (``scoremod.triton_gen``, a ``tl.constexpr`` function with the
captured tensors as trailing arguments) to every exact score, with the window as a mask. Without a
modification ``HAS_MOD`` / ``WINDOWED`` are False and the kernel compiles as before.

Mask conventions are the torch path's: key biases are added as they are (-inf is the only hard
mask), block padding, the causal upper triangle and unused slots are excluded (never loaded or
set to -inf), and a row with no finite logit in either branch gets 0 (the merged denominator is
0) while a NaN denominator stays NaN. FlexAttention for the selected blocks was measured as the
alternative (benchmarks/gpu.py, benchmarks/RESULTS.md: on an H100, bf16, 12 heads, d = 64, 1.84
ms vs 0.185 ms for this kernel at N = 16K), so ``forward`` uses this kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..base import NO_MODS
from ..common import ceil_div, fold_key_bias, key_bias_mods_reason, key_padding_bias, sizes
from ..triton_common import (NEG_INF, configs, dot_precision, empty_output, input_reason, inverse_or_zero, launch,
                             next_pow2, online_softmax, split_head)
from . import VARIANTS, clamp_block
from .torch import RANK_LIMIT as _RANK_LIMIT, SINK_RANK as _SINK_RANK, MraSelection, mra_select

#: key blocks per row the top-r kernel holds in registers
MAX_BLOCKS = 8192
#: selection ranks of the torch path, as constexprs for the kernels
RANK_LIMIT = tl.constexpr(_RANK_LIMIT)
SINK_RANK = tl.constexpr(_SINK_RANK)


# ------------------------------------------------------------------------------------------------
# 1. pooling and block selection
# ------------------------------------------------------------------------------------------------
@triton.jit
def _block_keys(bias_row, sbn, j, c0, BS, NK, BB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Keys ``c0 .. c0+BB`` of key block ``j``: their index, whether they exist, and their bias
    (-inf where they do not; 0 without a mask). ``bias_row`` points at the (batch, head)'s biases."""
    rc = c0 + tl.arange(0, BB)
    n = j * BS + rc
    ok = (rc < BS) & (n < NK)
    if HAS_BIAS:
        bias = tl.load(bias_row + n * sbn, mask=ok, other=NEG_INF)
    else:
        bias = tl.where(ok, 0.0, NEG_INF)
    return n, ok, bias


@triton.jit
def _pool_qk_kernel(
    Q, K, BIAS, QHAT, KHAT, COUNT, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn,
    H, G, NQ, NK, MQ, MK, BS, D,
    DP: tl.constexpr, BB: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = split_head(bh, H, G)
    rd = tl.arange(0, DP)
    dmask = rd < D
    if j < MQ:
        acc = tl.zeros([DP], tl.float32)
        for c0 in range(0, BS, BB):
            rc = c0 + tl.arange(0, BB)
            n = j * BS + rc
            ok = (rc < BS) & (n < NQ)
            x = tl.load(Q + b * sqb + h * sqh + n[:, None] * sqn + rd[None, :] * sqd,
                        mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x, 0)
        cnt = tl.minimum(NQ - j * BS, BS).to(tl.float32)
        tl.store(QHAT + (bh * MQ + j) * D + rd, acc / cnt, mask=dmask)
    if j < MK:
        # pass 1: the block's largest bias (the softmax shift; -inf -> 0 so exp gives 0, not NaN)
        bias_row = BIAS + b * sbb + h * sbh
        mb = 0.0
        if HAS_BIAS:
            mv = tl.full([BB], NEG_INF, tl.float32)
            for c0 in range(0, BS, BB):
                n, ok, bias = _block_keys(bias_row, sbn, j, c0, BS, NK, BB, HAS_BIAS)
                mv = tl.maximum(mv, bias)
            mb = tl.max(mv, 0)
            mb = tl.where(mb == NEG_INF, 0.0, mb)
        # pass 2: bias-softmax weights exp(bias - mb), weighted key sum, weight sum, key count
        acc = tl.zeros([DP], tl.float32)
        wsum = tl.zeros([BB], tl.float32)
        nsum = tl.zeros([BB], tl.float32)
        for c0 in range(0, BS, BB):
            n, ok, bias = _block_keys(bias_row, sbn, j, c0, BS, NK, BB, HAS_BIAS)
            w = tl.where(ok, tl.exp(bias - mb), 0.0)
            nsum += tl.where(bias != NEG_INF, 1.0, 0.0)
            x = tl.load(K + b * skb + hk * skh + n[:, None] * skn + rd[None, :] * skd,
                        mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * w[:, None], 0)
            wsum += w
        total = tl.sum(wsum, 0)
        none = total == 0.0  # every bias -inf: no candidate (lse -inf, k_hat 0); NaN stays NaN
        safe = tl.where(none, 1.0, total)
        tl.store(KHAT + (bh * MK + j) * D + rd, acc / safe, mask=dmask)
        tl.store(COUNT + bh * MK + j, tl.sum(nsum, 0))
        tl.store(LSE + bh * MK + j, tl.where(none, NEG_INF, mb + tl.log(safe)))


@triton.jit
def _lowres_kernel(
    QHAT, KHAT, COUNT, LSE, SCORE, POOLED,
    MQ, MK, D, scale, SINK,
    DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    ri = pid_m * BM + tl.arange(0, BM)
    rj = pid_n * BN + tl.arange(0, BN)
    rd = tl.arange(0, DP)
    qh = tl.load(QHAT + (bh * MQ + ri[:, None]) * D + rd[None, :], mask=(ri < MQ)[:, None] & (rd < D)[None, :], other=0.0)
    kh = tl.load(KHAT + (bh * MK + rj[None, :]) * D + rd[:, None], mask=(rj < MK)[None, :] & (rd < D)[:, None], other=0.0)
    s = tl.dot(qh, kh, input_precision="ieee") * scale
    count = tl.load(COUNT + bh * MK + rj, mask=rj < MK, other=0.0)
    lse = tl.load(LSE + bh * MK + rj, mask=rj < MK, other=NEG_INF)
    cand = (count > 0)[None, :] & (ri < MQ)[:, None] & (rj < MK)[None, :]
    if CAUSAL:
        cand = cand & (rj[None, :] <= ri[:, None])
    lowres = s + (lse - tl.log(tl.maximum(count, 1.0)))[None, :]
    # ranks: a candidate stays above -inf whatever its score holds (NaN, +-inf)
    rank = tl.where(lowres != lowres, -RANK_LIMIT, lowres)
    rank = tl.minimum(tl.maximum(rank, -RANK_LIMIT), RANK_LIMIT)
    rank = tl.where(cand, rank, NEG_INF)
    rank = tl.where(cand & (rj[None, :] < SINK), SINK_RANK, rank)
    if CAUSAL:
        rank = tl.where(cand & (rj[None, :] == ri[:, None]), float("inf"), rank)
    pooled = tl.where(cand, s + lse[None, :], NEG_INF)
    offs = (bh * MQ + ri[:, None]) * MK + rj[None, :]
    inb = (ri < MQ)[:, None] & (rj < MK)[None, :]
    tl.store(SCORE + offs, rank, mask=inb)
    tl.store(POOLED + offs, pooled, mask=inb)


@triton.jit
def _topr_kernel(SCORE, POOLED, IDX, VALID, MQ, MK, R: tl.constexpr, MKP: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    rj = tl.arange(0, MKP)
    row_off = (bh * MQ + i) * MK
    row = tl.load(SCORE + row_off + rj, mask=rj < MK, other=NEG_INF)
    for t in tl.static_range(R):
        mx = tl.max(row, 0)
        am = tl.min(tl.where(row == mx, rj, MKP), 0)
        ok = mx > NEG_INF
        am = tl.where(ok, am, 0)
        tl.store(IDX + (bh * MQ + i) * R + t, am.to(tl.int64))
        tl.store(VALID + (bh * MQ + i) * R + t, ok.to(tl.int8))
        tl.store(POOLED + row_off + am, NEG_INF, mask=ok)
        row = tl.where(rj == am, NEG_INF, row)


def supports_selection(q: torch.Tensor, k: torch.Tensor, block: int) -> bool:
    """Whether the Triton selection handles these shapes (else the torch selection serves)."""
    mk = ceil_div(k.shape[2], block)
    return mk <= MAX_BLOCKS and q.shape[-1] <= 128


def select(q, k, attn_mask, scale, is_causal, params):
    """Triton version of ``torch.mra_select`` (same ``MraSelection``; ``lowres`` is None)."""
    B, H, NQ, D = q.shape
    Hk, NK = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    bs = clamp_block(params, NQ, NK)
    MQ, MK = ceil_div(NQ, bs), ceil_div(NK, bs)
    nkp = MK * bs
    BH = B * H
    bias = key_padding_bias(attn_mask, NK, nkp, torch.float32, dev, "mra attention")
    if bias is None:
        bias_view, sb = q, (0, 0, 0)
    else:
        bias_view = bias.expand(B, H, nkp)
        sb = bias_view.stride()

    f32 = dict(device=dev, dtype=torch.float32)
    qhat, khat = torch.empty(BH, MQ, D, **f32), torch.empty(BH, MK, D, **f32)
    count, lse = torch.empty(BH, MK, **f32), torch.empty(BH, MK, **f32)
    DP = next_pow2(D)
    _pool_qk_kernel[(max(MQ, MK), BH)](
        q, k, bias_view, qhat, khat, count, lse,
        *q.stride(), *k.stride(), *sb, H, G, NQ, NK, MQ, MK, bs, D,
        DP=DP, BB=min(64, next_pow2(bs)), HAS_BIAS=bias is not None,
    )
    score, pooled = torch.empty(BH, MQ, MK, **f32), torch.empty(BH, MQ, MK, **f32)
    BM = BN = 32 if DP > 64 else 64
    _lowres_kernel[(triton.cdiv(MQ, BM), triton.cdiv(MK, BN), BH)](
        qhat, khat, count, lse, score, pooled, MQ, MK, D, float(scale), int(params.sink_blocks),
        DP=DP, BM=BM, BN=BN, CAUSAL=bool(is_causal), num_warps=4,
    )
    R = min(params.blocks_per_row, MK)
    idx = torch.empty(B, H, MQ, R, device=dev, dtype=torch.int64)
    valid = torch.empty(B, H, MQ, R, device=dev, dtype=torch.bool)
    MKP = next_pow2(MK)
    _topr_kernel[(MQ, BH)](score, pooled, idx, valid.view(torch.int8), MQ, MK, R=R, MKP=MKP,
                           num_warps=max(1, min(8, MKP // 256)))
    block_lse = None if bias is None else lse.view(B, H, MK)
    return MraSelection(bs, idx, valid, None, pooled.view(B, H, MQ, MK), bias, block_lse, count.view(B, H, MK))


# ------------------------------------------------------------------------------------------------
# 2-3. pooled values and the fused forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _pool_v_kernel(
    V, BIAS, LSE, VHAT,
    svb, svh, svn, svd,
    sbb, sbh, sbn,
    H, G, NK, MK, BS, DV,
    DVP: tl.constexpr, BB: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = split_head(bh, H, G)
    rdv = tl.arange(0, DVP)
    acc = tl.zeros([DVP], tl.float32)
    cnt = tl.zeros([BB], tl.float32)
    lse_safe = 0.0
    if HAS_BIAS:
        lse = tl.load(LSE + bh * MK + j)
        lse_safe = tl.where(lse == NEG_INF, 0.0, lse)  # such a block has weights 0 (bias -inf)
    for c0 in range(0, BS, BB):
        n, ok, bias = _block_keys(BIAS + b * sbb + h * sbh, sbn, j, c0, BS, NK, BB, HAS_BIAS)
        w = tl.where(ok, tl.exp(bias - lse_safe), 0.0)
        vt = tl.load(V + b * svb + hk * svh + n[:, None] * svn + rdv[None, :] * svd,
                     mask=ok[:, None] & (rdv < DV)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(vt * w[:, None], 0)
        cnt += w
    if HAS_BIAS:
        out = acc  # the weights already sum to 1 over the block
    else:
        out = acc / tl.maximum(tl.sum(cnt, 0), 1.0)
    tl.store(VHAT + (bh * MK + j) * DV + rdv, out, mask=rdv < DV)


@triton.autotune(configs=configs([(4, 2), (2, 2)]),
                 key=["BS", "R", "MK", "DP", "DVP", "QB", "MRA2", "CAUSAL", "HAS_BIAS", "HAS_MOD", "WINDOWED"])
@triton.jit
def _mra_kernel(
    Q, K, V, BIAS, IDX, VALID, POOLED, VHAT, OUT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn,
    sob, soh, son, sod,
    H, G, NQ, NK, MQ, MK, BS, R, D, DV, scale, WL, WR,
    T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
    T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
    T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
    T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3,
    DP: tl.constexpr, DVP: tl.constexpr, QB: tl.constexpr, QB16: tl.constexpr,
    MRA2: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BMQ: tl.constexpr, BNK: tl.constexpr, BJ: tl.constexpr,
    SCORE_MOD: tl.constexpr, HAS_MOD: tl.constexpr, WINDOWED: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = split_head(bh, H, G)
    i0 = pid * QB
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    d_ok = rd < D
    dv_ok = rdv < DV

    # ---- pooled remainder of the QB query blocks: online softmax over the Mk pooled logits ----
    rq = i0 + tl.arange(0, QB16)
    rq_ok = (tl.arange(0, QB16) < QB) & (rq < MQ)
    m_lo = tl.full([QB16], NEG_INF, tl.float32)
    l_lo = tl.zeros([QB16], tl.float32)
    acc_lo = tl.zeros([QB16, DVP], tl.float32)
    if MRA2:
        for j0 in range(0, MK, BJ):
            rj = j0 + tl.arange(0, BJ)
            j_ok = rj < MK
            pl = tl.load(POOLED + (bh * MQ + rq[:, None]) * MK + rj[None, :],
                         mask=rq_ok[:, None] & j_ok[None, :], other=NEG_INF)
            m_lo, alpha, p, l_lo = online_softmax(m_lo, l_lo, pl)
            vh = tl.load(VHAT + (bh * MK + rj[:, None]) * DV + rdv[None, :], mask=j_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            acc_lo = acc_lo * alpha[:, None] + tl.dot(p, vh, input_precision=DOT)

    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for qi in range(QB):
        i = i0 + qi
        if i < MQ:
            sel_row = tl.arange(0, QB16) == qi
            mlo = tl.max(tl.where(sel_row, m_lo, NEG_INF), 0)
            llo = tl.sum(tl.where(sel_row, l_lo, 0.0), 0)
            olo = tl.sum(tl.where(sel_row[:, None], acc_lo, 0.0), 0)  # [DVP]
            for r0 in range(0, BS, BMQ):
                rr = r0 + tl.arange(0, BMQ)
                n_q = i * BS + rr
                q_ok = (rr < BS) & (n_q < NQ)
                q = tl.load(Q + b * sqb + h * sqh + n_q[:, None] * sqn + rd[None, :] * sqd,
                            mask=q_ok[:, None] & d_ok[None, :], other=0.0)
                m = tl.full([BMQ], NEG_INF, tl.float32)
                lsum = tl.zeros([BMQ], tl.float32)
                acc = tl.zeros([BMQ, DVP], tl.float32)
                for s in range(R):
                    jb = tl.load(IDX + (bh * MQ + i) * R + s)
                    ok = tl.load(VALID + (bh * MQ + i) * R + s)
                    if ok != 0:
                        for c0 in range(0, BS, BNK):
                            rc = c0 + tl.arange(0, BNK)
                            n_k = jb * BS + rc
                            k_ok = (rc < BS) & (n_k < NK)
                            kt = tl.load(k_base + n_k[:, None] * skn + rd[None, :] * skd,
                                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                            x = tl.dot(q, tl.trans(kt), input_precision=DOT) * scale
                            if HAS_MOD:   # the site's generated score_mod on the exact scores
                                x = SCORE_MOD(x, b, h, n_q[:, None], n_k[None, :],
                                              T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
                                              T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
                                              T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
                                              T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3)
                            if HAS_BIAS:
                                bias = tl.load(BIAS + b * sbb + h * sbh + n_k * sbn, mask=k_ok, other=0.0)
                                x = x + bias[None, :]
                            keep = k_ok[None, :]
                            if CAUSAL:
                                keep = keep & (n_k[None, :] <= n_q[:, None])
                            if WINDOWED:  # WL / WR: the window's bounds (a huge value when unbounded)
                                keep = keep & (n_k[None, :] >= n_q[:, None] - WL) & (n_k[None, :] <= n_q[:, None] + WR)
                            x = tl.where(keep, x, NEG_INF)
                            m, alpha, p, lsum = online_softmax(m, lsum, x)
                            vt = tl.load(v_base + n_k[:, None] * svn + rdv[None, :] * svd,
                                         mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
                            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT)
                # log-sum-exp merge of the exact (selected) and pooled partial softmaxes
                mt = tl.maximum(m, mlo)
                mt_safe = tl.where(mt == NEG_INF, 0.0, mt)
                w_hi = tl.exp(m - mt_safe)
                w_lo = tl.exp(mlo - mt_safe)
                num = acc * w_hi[:, None] + olo[None, :] * w_lo[:, None]
                den = lsum * w_hi + llo * w_lo
                # den = 0: no finite logit in either branch (output 0); a NaN den stays NaN
                out = num * inverse_or_zero(den)[:, None]
                tl.store(OUT + b * sob + h * soh + n_q[:, None] * son + rdv[None, :] * sod,
                         out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & dv_ok[None, :])


def supports(q, k, v, attn_mask, is_causal, params, mods=NO_MODS) -> Optional[str]:
    """Run-time check of the kernels on concrete inputs (reached through the kernel dispatch): why
    they cannot take them, or None. Score modifications: a constant scale and key-only biases
    (``common.fold_key_bias``) reach the kernels as their key-padding bias; any other expression
    is generated into the forward kernel (``scoremod.triton_gen``: at most its KERNEL_TENSORS
    captured tensors of at most KERNEL_DIMS dims) with the selection from the torch path."""
    reason = input_reason(q, v)
    if reason:
        return reason
    if key_bias_mods_reason("mra", mods) is not None:
        reason = _mod_reason(mods)
        if reason:
            return reason
    if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        return "mra supports key-padding and causal masks only"
    if params.variant not in VARIANTS:
        return f"unknown variant {params.variant!r}"
    if params.block_size < 1 or params.blocks_per_row < 1:
        return "block_size and blocks_per_row must be >= 1"
    return None


def _mod_reason(mods) -> Optional[str]:
    """Why the generated score_mod cannot carry ``mods``' expression into the kernel, or None."""
    from ...scoremod.triton_gen import KERNEL_DIMS, KERNEL_TENSORS, source

    if len(mods.tensors) > KERNEL_TENSORS or any(t.dim() > KERNEL_DIMS for t in mods.tensors):
        return (f"the mra kernel passes at most {KERNEL_TENSORS} captured tensors of at most {KERNEL_DIMS} dims "
                f"to a score_mod; got {[tuple(t.shape) for t in mods.tensors]}; the torch path applies it")
    try:
        source(mods.text)
    except ValueError as e:
        return f"the mra kernel cannot generate score_mod {mods.text!r}: {e}; the torch path applies it"
    return None


def _per_head3(t: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """[Bm, Hm, N] (Bm in {1,B}, Hm in {1,H}) -> [B, H, N] view."""
    return t.expand(B, H, t.shape[-1])


#: "triton": pooling + selection in three Triton launches (``select``; falls back to "eager" for
#: rows of more than MAX_BLOCKS key blocks); "eager": the torch path's ``mra_select`` as is (~40
#: small torch launches); "compiled": that function through ``torch.compile``. A near-tie between
#: two key blocks' low-resolution scores may resolve differently from the eager selection in
#: "triton" and "compiled".
SELECT_IMPL = "triton"
_COMPILED_SELECT = {}


def select_blocks(q, k, attn_mask, scale, is_causal, params) -> MraSelection:
    """The ``MraSelection`` of these inputs by the ``SELECT_IMPL`` implementation."""
    if SELECT_IMPL == "triton" and supports_selection(q, k, clamp_block(params, q.shape[2], k.shape[2])):
        return select(q, k, attn_mask, scale, is_causal, params)
    if SELECT_IMPL == "compiled" and q.is_cuda:
        fn = _COMPILED_SELECT.get("fn")
        if fn is None:
            fn = _COMPILED_SELECT["fn"] = torch.compile(mra_select)
        return fn(q, k, attn_mask, scale, is_causal, params)
    return mra_select(q, k, attn_mask, scale, is_causal, params)


def pool_v(v: torch.Tensor, sel, heads: int, mk: int) -> torch.Tensor:
    """vhat [B*H, Mk, Dv] fp32: each block's values weighted by ``exp(bias - block_lse)`` of the
    selection ``sel`` (block means when it has no key bias)."""
    B, Hk, NK, Dv = v.shape
    has_bias = sel.key_bias is not None
    if has_bias:
        bias = _per_head3(sel.key_bias.to(torch.float32), B, heads)
        lse = sel.block_lse.to(torch.float32).expand(B, heads, mk).contiguous()
        sb = bias.stride()
    else:
        bias = lse = v
        sb = (0, 0, 0)
    vhat = torch.empty(B * heads, mk, Dv, device=v.device, dtype=torch.float32)
    _pool_v_kernel[(mk, B * heads)](
        v, bias, lse, vhat, *v.stride(), *sb, heads, heads // Hk, NK, mk, sel.block, Dv,
        DVP=next_pow2(Dv), BB=min(128, next_pow2(sel.block)), HAS_BIAS=has_bias,
    )
    return vhat


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def forward(q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS, *, selection=None, out=None):
    """MRA-2 / MRA-2-s (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*]; ``selection``
    reuses a precomputed ``MraSelection`` (made with the same modifications); writes ``out`` when
    given. A key bias of ``mods`` is evaluated once into the key-padding bias; any other
    modification keeps its key-only summands there, selects on the torch path
    (``torch.mra_select``, which applies it to the pooled logits) and runs the rest as the
    generated score_mod of the forward kernel, with the window as a mask."""
    from ...scoremod.triton_gen import kernel_args, triton_score_mod
    from . import split_mods

    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    if key_bias_mods_reason("mra", mods) is None:
        attn_mask, scale = fold_key_bias(q, k, attn_mask, scale, mods, torch.float32, "mra")
        rest = NO_MODS
    else:
        attn_mask, rest = split_mods(q, k, attn_mask, mods, torch.float32)
    B, H, _, NQ, NK, D, Dv, G = sizes(q, k, v)
    if selection is not None:
        sel = selection
    elif rest.empty:
        sel = select_blocks(q, k, attn_mask, scale, is_causal, params)
    else:
        sel = mra_select(q, k, attn_mask, scale, is_causal, params, rest)
    bs = sel.block
    MQ, MK = ceil_div(NQ, bs), ceil_div(NK, bs)
    R = sel.block_idx.shape[-1]
    BH = B * H
    mra2 = params.variant == "mra2"
    idx = sel.block_idx.reshape(BH, MQ, R)  # int64, read as is (no conversion launch)
    valid = sel.block_valid.reshape(BH, MQ, R).view(torch.uint8) if sel.block_valid.is_contiguous() else \
        sel.block_valid.reshape(BH, MQ, R).to(torch.uint8)
    if mra2:
        pooled = sel.pooled_logits.to(torch.float32).reshape(BH, MQ, MK)
        vhat = pool_v(v, sel, H, MK)
    else:
        pooled = vhat = q  # unused
    has_bias = sel.key_bias is not None
    if has_bias:
        bias = _per_head3(sel.key_bias.to(torch.float32), B, H)
        sb = bias.stride()
    else:
        bias, sb = q, (0, 0, 0)
    if out is None:
        out = torch.empty(B, H, NQ, Dv, device=q.device, dtype=q.dtype)

    DP, DVP = next_pow2(D), next_pow2(Dv)
    BMQ = min(64, next_pow2(bs))
    BNK = min(64, next_pow2(bs))
    if DP > 64 or DVP > 64:
        BNK = min(BNK, 32)
    # query blocks per program: enough programs to fill the GPU, and vhat read once per QB blocks
    if mra2:
        target = max(1, (MQ * BH) // (2 * _num_sms(q.device)))
        QB = 1
        while QB * 2 <= min(16, target):
            QB *= 2
    else:
        QB = 1
    QB16 = max(16, QB)
    BJ = 64 if DVP <= 64 else 32
    grid = (triton.cdiv(MQ, QB), BH)
    has_mod, windowed = bool(rest.text), rest.windowed
    big = NQ + NK + 1
    wl = rest.window_left if rest.window_left >= 0 else big
    wr = rest.window_right if rest.window_right >= 0 else big
    tk = (q.dtype, bs, R, MK, D, Dv, QB, mra2, bool(is_causal), has_bias, rest.text, windowed)
    launch(
        _mra_kernel, grid, tk,
        q, k, v, bias, idx, valid, pooled, vhat, out,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
        H, G, NQ, NK, MQ, MK, bs, R, D, Dv, float(scale), wl, wr, *kernel_args(rest.tensors, like=q),
        DP=DP, DVP=DVP, QB=QB, QB16=QB16, MRA2=mra2, CAUSAL=bool(is_causal), HAS_BIAS=has_bias,
        DOT=dot_precision(q.dtype), BMQ=BMQ, BNK=BNK, BJ=BJ,
        SCORE_MOD=triton_score_mod(rest.text), HAS_MOD=has_mod, WINDOWED=windowed,
    )
    return out
