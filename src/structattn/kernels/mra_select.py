"""MRA-2 pooling and block selection in Triton (three launches instead of ~40 small torch ones).

Computes exactly what ``methods.mra.mra_select`` computes for the forward kernel (block indices,
their validity, the pooled-branch logits, key bias, per-block bias logsumexp and key counts), with
the same rules (the module docstring of ``methods/mra.py`` derives them):

1. ``_pool_qk_kernel`` (grid max(Mq, Mk) x B*H): per block, the mean of its queries (q_hat); per
   key block, in two passes over its keys, the max of their biases and then the bias-softmax
   weighted mean of the keys (k_hat), the logsumexp of the biases (``block_lse``; log(count)
   without a mask) and the number of keys whose bias is not -inf (count).
2. ``_lowres_kernel`` (grid Mq/BM x Mk/BN x B*H): ``qk = s * q_hat k_hat^T`` on candidates
   (count > 0; causal: key block <= query block), written twice: as the selection rank
   ``qk + block_lse - log(count)`` (NaN -> -1e38, clamped to +-1e38; the ``sink_blocks`` first
   blocks at 3e38, the causal diagonal at +inf so it is always chosen first) and as the pooled
   branch's logit ``qk + block_lse`` (-inf off candidates).
   The product is an IEEE fp32 ``tl.dot`` so the scores match torch's fp32 matmul to rounding.
3. ``_topr_kernel`` (grid Mq x B*H): each row's r best blocks by r rounds of max / first argmax
   over the row held in registers; chosen blocks get pooled logit -inf.

Ties: the lowest block index wins (``torch.topk`` leaves ties unspecified); only exact ties can
differ from the reference, which random data does not produce (ranks clamped to +-1e38 or a NaN
score tie by construction: only inputs holding +-inf / NaN produce them). Rows up to
``MAX_BLOCKS`` key blocks (N = 256K at b = 32); longer rows use the reference's torch selection.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

#: key blocks per row the top-r kernel holds in registers
MAX_BLOCKS = 8192
#: selection ranks, as ``methods.mra.RANK_LIMIT`` / ``SINK_RANK`` (literals: tl.constexpr floats)
RANK_LIMIT = tl.constexpr(1e38)
SINK_RANK = tl.constexpr(3e38)


@triton.jit
def _pool_qk_kernel(
    Q, K, BIAS, QHAT, KHAT, COUNT, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn,
    H, G, NQ, NK, MQ, MK, BS, D,
    DP: tl.constexpr, BB: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
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
        mb = 0.0
        if HAS_BIAS:
            mv = tl.full([BB], float("-inf"), tl.float32)
            for c0 in range(0, BS, BB):
                rc = c0 + tl.arange(0, BB)
                n = j * BS + rc
                ok = (rc < BS) & (n < NK)
                bias = tl.load(BIAS + b * sbb + h * sbh + n * sbn, mask=ok, other=float("-inf"))
                mv = tl.maximum(mv, bias)
            mb = tl.max(mv, 0)
            mb = tl.where(mb == float("-inf"), 0.0, mb)
        # pass 2: bias-softmax weights exp(bias - mb), weighted key sum, weight sum, key count
        acc = tl.zeros([DP], tl.float32)
        wsum = tl.zeros([BB], tl.float32)
        nsum = tl.zeros([BB], tl.float32)
        for c0 in range(0, BS, BB):
            rc = c0 + tl.arange(0, BB)
            n = j * BS + rc
            ok = (rc < BS) & (n < NK)
            if HAS_BIAS:
                bias = tl.load(BIAS + b * sbb + h * sbh + n * sbn, mask=ok, other=float("-inf"))
                w = tl.where(ok, tl.exp(bias - mb), 0.0)
                nsum += tl.where(ok & (bias != float("-inf")), 1.0, 0.0)
            else:
                w = tl.where(ok, 1.0, 0.0)
                nsum += w
            x = tl.load(K + b * skb + hk * skh + n[:, None] * skn + rd[None, :] * skd,
                        mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * w[:, None], 0)
            wsum += w
        total = tl.sum(wsum, 0)
        none = total == 0.0  # every bias -inf: no candidate (lse -inf, k_hat 0); NaN stays NaN
        safe = tl.where(none, 1.0, total)
        tl.store(KHAT + (bh * MK + j) * D + rd, acc / safe, mask=dmask)
        tl.store(COUNT + bh * MK + j, tl.sum(nsum, 0))
        tl.store(LSE + bh * MK + j, tl.where(none, float("-inf"), mb + tl.log(safe)))


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
    lse = tl.load(LSE + bh * MK + rj, mask=rj < MK, other=float("-inf"))
    cand = (count > 0)[None, :] & (ri < MQ)[:, None] & (rj < MK)[None, :]
    if CAUSAL:
        cand = cand & (rj[None, :] <= ri[:, None])
    lowres = s + (lse - tl.log(tl.maximum(count, 1.0)))[None, :]
    # ranks: a candidate stays above -inf whatever its score holds (NaN, +-inf)
    rank = tl.where(lowres != lowres, -RANK_LIMIT, lowres)
    rank = tl.minimum(tl.maximum(rank, -RANK_LIMIT), RANK_LIMIT)
    rank = tl.where(cand, rank, float("-inf"))
    rank = tl.where(cand & (rj[None, :] < SINK), SINK_RANK, rank)
    if CAUSAL:
        rank = tl.where(cand & (rj[None, :] == ri[:, None]), float("inf"), rank)
    pooled = tl.where(cand, s + lse[None, :], float("-inf"))
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
    row = tl.load(SCORE + row_off + rj, mask=rj < MK, other=float("-inf"))
    for t in tl.static_range(R):
        mx = tl.max(row, 0)
        am = tl.min(tl.where(row == mx, rj, MKP), 0)
        ok = mx > float("-inf")
        am = tl.where(ok, am, 0)
        tl.store(IDX + (bh * MQ + i) * R + t, am.to(tl.int64))
        tl.store(VALID + (bh * MQ + i) * R + t, ok.to(tl.int8))
        tl.store(POOLED + row_off + am, float("-inf"), mask=ok)
        row = tl.where(rj == am, float("-inf"), row)


def supports_selection(q: torch.Tensor, k: torch.Tensor, block: int) -> bool:
    """Whether the Triton selection handles these shapes (else use the torch reference)."""
    mk = -(-k.shape[2] // block)
    return mk <= MAX_BLOCKS and q.shape[-1] <= 128


def select(q, k, attn_mask, scale, is_causal, params):
    """Triton version of ``methods.mra.mra_select`` (same ``MraSelection``; ``lowres`` is None)."""
    from ..methods.monarch import key_padding_bias
    from ..methods.mra import MraSelection, _block

    B, H, NQ, D = q.shape
    Hk, NK = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    bs = _block(params, NQ, NK)
    MQ, MK = -(-NQ // bs), -(-NK // bs)
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
