"""Top-k attention forward in Triton: one fused kernel, no N x N score matrix in memory.

Each program owns BM query rows of one (batch, head) and makes two passes over the keys:

1. **selection**: scores of a BN-key tile (BN >= KP = next power of two >= k) are reduced to their
   KP largest per row (``tl.topk``), joined with the running top-KP list and reduced again; after
   the last tile the k-th largest masked score of each row is the threshold ``thr``;
2. **flash pass**: the scores are recomputed and an online softmax runs over those with
   ``score >= thr`` (masked scores are -inf and never count), accumulating P V.

Score modifications: the generated ``score_mod`` of the site (``scoremod.triton_gen``, a
``tl.constexpr`` argument with its captured tensors' pointers, strides and sizes) maps each scaled
score to its logit before the mask, so both passes rank and softmax the modified logits. Without
modifications it is the identity and its arguments are ``None``: the kernel compiles as before.

Masks: none, bool (True = keep) or additive, any broadcast of [B, H, Nq, Nk] (read through strides,
never expanded), plus SDPA's top-left ``is_causal`` and the sliding window ``WL`` / ``WR`` (hard
masks; key tiles wholly outside them are skipped, so a band of width w costs O(N w)). When
k >= Nk the selection pass is compiled out (exact attention).

Tie rule: every key whose score equals the threshold is kept, so a row with ties at its k-th
largest score keeps more than k keys (torch.topk keeps an arbitrary k of them). The comparison has a
relative slack of 2^-22 so that the scores recomputed in pass 2 (same code, same tiles) select the
same keys as pass 1 even if the compiler rounds them differently (2^-22, a couple of fp32 ulps);
on continuous random data both events have probability ~1e-6 per row. Top-k is discontinuous at
such near-ties: a kernel and a reference that round scores differently may keep a different k-th
key there, so tests compare row by row and allow a rare mismatched row. A row with fewer than k
unmasked keys keeps all of them; a row with none gives 0. Non-finite inputs follow the torch
reference: a NaN score is always kept and makes its row NaN, a +inf score makes its row NaN
(inf - inf), a -inf score is a masked key. One difference below k = Nk: a non-finite value row of
v reaches every row of its (batch, head) in that value column, as in SDPA (``0 * NaN`` in P V),
while the torch path gathers only the kept values and reaches only the rows that keep that key.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..base import NO_MODS
from ..common import interpreting, sizes
from ..triton_common import (NEG_INF, configs, dot_precision, empty_output, general_mask_view, input_reason,
                             inverse_or_zero, launch, mods_reason, next_pow2, online_softmax, score_mod_args,
                             score_tile, split_head, window_meta, window_tiles)
#: largest k the kernel selects in registers (a row holds the running top-KP and a tile of BN >= KP)
MAX_K = 512
HAS_TL_TOPK = hasattr(tl, "topk")


def selection_mode() -> int:
    """0: tl.topk, 1: tl.sort, 2: rank counting (interpreter); see ``_top``."""
    if interpreting():
        return 2
    return 0 if HAS_TL_TOPK else 1


@triton.jit
def _top(x, KP: tl.constexpr, SEL: tl.constexpr):
    """The KP largest entries of each row of x [BM, W] (W a power of two >= KP), in some order.

    SEL 0: ``tl.topk`` (bitonic network; the GPU path). SEL 1: ``tl.sort`` and keep the last KP
    (GPUs whose triton has no ``tl.topk``). SEL 2: rank counting with a [BM, W, W] comparison,
    used under TRITON_INTERPRET=1 only, where the bitonic networks' xor-reductions run element by
    element in Python (seconds per tile); it selects the same multiset.
    """
    if SEL == 0:
        return tl.topk(x, KP)
    elif SEL == 1:
        xs = tl.sort(x)  # ascending: the largest KP are the last KP
        xs = tl.reshape(xs, [x.shape[0], x.shape[1] // KP, KP])
        keep = (tl.arange(0, x.shape[1] // KP) == x.shape[1] // KP - 1)[None, :, None]
        return tl.max(tl.where(keep, xs, NEG_INF), 1)
    else:
        ii = tl.arange(0, x.shape[1])
        xi = x[:, :, None]
        xj = x[:, None, :]
        before = (xj > xi) | ((xj == xi) & (ii[None, None, :] < ii[None, :, None]))
        rank = tl.sum(before.to(tl.int32), 2)  # [BM, W]: distinct ranks 0..W-1
        slot = tl.arange(0, KP)
        hit = rank[:, :, None] == slot[None, None, :]  # [BM, W, KP]
        return tl.max(tl.where(hit, xi, NEG_INF), 1)


@triton.autotune(configs=configs([(4, 2), (8, 2)]),
                 key=["NK", "DP", "DVP", "KP", "CAUSAL", "MASK_KIND", "SELECT", "BM", "BN", "HAS_WL", "HAS_WR"])
@triton.jit
def _topk_kernel(
    Q, K, V, MASK, OUT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smq, smk,
    sob, soh, son, sod,
    H, G, NQ, NK, D, DV, KSEL, scale, WL, WR,
    SCORE_MOD: tl.constexpr,
    T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
    T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
    T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
    T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
    SELECT: tl.constexpr, KP: tl.constexpr, SEL: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = split_head(bh, H, G)
    rm = pid_m * BM + tl.arange(0, BM)
    m_ok = rm < NQ
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :] * sqd,
                mask=m_ok[:, None] & (rd < D)[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh
    lo, hi = window_tiles(pid_m * BM, BM, NK, WL, WR, CAUSAL, HAS_WL, HAS_WR, BN)

    thr = tl.full([BM], NEG_INF, tl.float32)
    if SELECT:
        cur = tl.full([BM, KP], NEG_INF, tl.float32)
        for n0 in range(lo, hi, BN):
            s, rn, n_ok = score_tile(q, k_base, m_base, b, h, rm, m_ok, n0, skn, skd, smq, smk, NK, D, scale, WL, WR,
                                     SCORE_MOD,
                                     T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
                                     T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
                                     T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
                                     T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3,
                                     DP, MASK_KIND, CAUSAL, HAS_WL, HAS_WR, DOT, BN)
            # a tile changes the running top-KP only if some score beats the row's current KP-th
            if tl.max(tl.sum((s > tl.min(cur, 1)[:, None]).to(tl.int32), 1), 0) > 0:
                if BN > KP:
                    cur = _top(tl.reshape(tl.join(cur, _top(s, KP, SEL)), [BM, 2 * KP]), KP, SEL)
                else:
                    cur = _top(tl.reshape(tl.join(cur, s), [BM, 2 * KP]), KP, SEL)
        srt = tl.sort(cur)  # ascending: the k-th largest sits at KP - k
        thr = tl.max(tl.where((tl.arange(0, KP) == KP - KSEL)[None, :], srt, NEG_INF), 1)
        # relative slack 2^-22 (see the tie rule); an infinite threshold stays as it is (inf - inf)
        thr = tl.where(tl.abs(thr) < float("inf"), thr - tl.abs(thr) * 2.384185791015625e-07, thr)

    m = tl.full([BM], NEG_INF, tl.float32)
    lsum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DVP], tl.float32)
    for n0 in range(lo, hi, BN):
        s, rn, n_ok = score_tile(q, k_base, m_base, b, h, rm, m_ok, n0, skn, skd, smq, smk, NK, D, scale, WL, WR,
                                 SCORE_MOD,
                                 T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
                                 T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
                                 T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
                                 T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3,
                                 DP, MASK_KIND, CAUSAL, HAS_WL, HAS_WR, DOT, BN)
        if SELECT:   # NaN scores always count (they make the row NaN, like torch.topk ranking NaN first)
            s = tl.where((s >= thr[:, None]) | (s != s), s, NEG_INF)
        m, alpha, p, lsum = online_softmax(m, lsum, s)
        vt = tl.load(v_base + rn[:, None] * svn + rdv[None, :] * svd, mask=n_ok[:, None] & (rdv < DV)[None, :],
                     other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT)
    # lsum = 0: no finite score (output 0); a NaN lsum (NaN / +inf scores) stays NaN
    out = acc * inverse_or_zero(lsum)[:, None]
    tl.store(OUT + b * sob + h * soh + rm[:, None] * son + rdv[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & (rdv < DV)[None, :])


def supports(q, k, v, attn_mask, is_causal, params, mods=NO_MODS) -> Optional[str]:
    """Run-time check of the kernel on concrete inputs (reached through the kernel dispatch): why it
    cannot take them, or None."""
    reason = input_reason(q, v) or (mods_reason(q, mods) if not mods.empty else None)
    if reason:
        return reason
    if params.k < 1:
        return "k must be >= 1"
    if MAX_K < params.k < k.shape[2]:   # k >= Nk selects nothing (exact): any k is fine
        return f"k = {params.k} above the kernel's in-register limit of {MAX_K} (Nk = {k.shape[2]})"
    return None


def forward(q, k, v, attn_mask, scale, is_causal, params, out=None, mods=NO_MODS):
    """Top-k attention (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*] with the score
    modifications ``mods``; writes ``out`` when given."""
    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    NK, D, Dv = k.shape[2], q.shape[-1], v.shape[-1]
    ksel = min(int(params.k), NK)
    select = ksel < NK
    KP = next_pow2(ksel, 2) if select else 2   # unused without selection: one compiled kernel for every k >= Nk
    DP, DVP = next_pow2(D), next_pow2(Dv)
    BN = max(KP, 64 if DP <= 64 else 32) if select else 64
    BN = max(BN, 16)
    # registers: the running list [BM, KP] plus the joined [BM, 2 KP] and a score tile [BM, BN]
    BM = 64 if BN <= 64 else (32 if BN <= 128 else 16)
    if DP > 64 or DVP > 64:
        BM = min(BM, 64)
    return stream(q, k, v, attn_mask, scale, is_causal, out, mods, ksel=ksel, select=select, KP=KP, BM=BM, BN=BN)


def stream(q, k, v, attn_mask, scale, is_causal, out, mods, *, ksel, select, KP, BM, BN, SEL=None):
    """Launch ``_topk_kernel`` over q's row tiles (``select`` False: exact attention, every key a
    tile reaches) and return ``out`` (allocated when None). The one launch both top-k and exact use."""
    B, H, _, NQ, NK, D, Dv, G = sizes(q, k, v)
    DP, DVP = next_pow2(D), next_pow2(Dv)
    mview, kind = general_mask_view(attn_mask, B, H, NQ, NK)
    margs = mview if mview is not None else q
    sm = mview.stride() if mview is not None else (0, 0, 0, 0)
    if out is None:
        out = torch.empty(B, H, NQ, Dv, device=q.device, dtype=q.dtype)
    score_mod, mod_args = score_mod_args(mods, q)
    window = window_meta(mods)
    grid = (triton.cdiv(NQ, BM), B * H)
    tk = (q.dtype, NK, D, Dv, KP, bool(is_causal), kind, select, BM, BN, mods.text, window["HAS_WL"],
          window["HAS_WR"])
    launch(
        _topk_kernel, grid, tk,
        q, k, v, margs, out,
        *q.stride(), *k.stride(), *v.stride(), *sm, *out.stride(),
        H, G, NQ, NK, D, Dv, ksel, float(scale), window["WL"], window["WR"], score_mod, *mod_args,
        HAS_WL=window["HAS_WL"], HAS_WR=window["HAS_WR"], DP=DP, DVP=DVP, MASK_KIND=kind,
        CAUSAL=bool(is_causal), SELECT=select, KP=KP, SEL=selection_mode() if SEL is None else SEL,
        DOT=dot_precision(q.dtype), BM=BM, BN=BN,
    )
    return out
