"""Exact attention forward in Triton, for sites with score modifications (flash attention with the
site's generated ``score_mod``).

Each program owns BM query rows of one (batch, query head) and streams over the key tiles it can
see, keeping a running row max, row sum and P V accumulator in fp32 (an online softmax): no
N x N matrix is held. Per key tile the logits are the scaled scores, then the site's generated
``score_mod`` (``scoremod.triton_gen``: a ``tl.constexpr`` function with its captured tensors'
pointers, strides and sizes; query head ``h``, batch ``b``, index vectors ``q`` / ``k``), then the
mask: bool (True = keep) or additive, any broadcast of [B, H, Nq, Nk] read through strides;
SDPA's top-left ``is_causal`` and the sliding window (``WL`` / ``WR``, -1 unbounded) are hard
masks, and key tiles wholly outside them are skipped (a window of width w costs O(N w)). Grouped
k/v heads are read as kv head ``h // G``; head dims up to 256 are padded to a power of two. A row
with no visible key gives 0 (SDPA's fully masked row); the output has q's dtype.

Without modifications SDPA serves exact sites (its fused kernels are faster than this one), so
``supports`` refuses them; ``forward`` itself takes them (the identity score_mod).
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

#: largest head dim (q/k and v) the kernel takes
MAX_HEAD_DIM = 256


@triton.autotune(configs=configs([(4, 2), (8, 3)]),
                 key=["NK", "DP", "DVP", "CAUSAL", "MASK_KIND", "HAS_WL", "HAS_WR", "BM", "BN"])
@triton.jit
def _exact_kernel(
    Q, K, V, MASK, OUT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smq, smk,
    sob, soh, son, sod,
    H, G, NQ, NK, D, DV, scale, WL, WR,
    SCORE_MOD: tl.constexpr,
    T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
    T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
    T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
    T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr,
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
        m, alpha, p, lsum = online_softmax(m, lsum, s)
        vt = tl.load(v_base + rn[:, None] * svn + rdv[None, :] * svd, mask=n_ok[:, None] & (rdv < DV)[None, :],
                     other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT)
    # lsum = 0: no visible key (output 0); a NaN lsum (NaN / +inf logits) stays NaN
    out = acc * inverse_or_zero(lsum)[:, None]
    tl.store(OUT + b * sob + h * soh + rm[:, None] * son + rdv[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & (rdv < DV)[None, :])


def supports(q, k, v, attn_mask, is_causal, params, mods=NO_MODS) -> Optional[str]:
    """Run-time check on concrete inputs (reached through the kernel dispatch): why the kernel does
    not take them, or None. Sites without score modifications are refused: SDPA serves them."""
    if mods.empty:
        return "no score modifications: SDPA serves this site"
    return input_reason(q, v, head_dim_limit=MAX_HEAD_DIM) or mods_reason(q, mods)


def tiles(dp: int, dvp: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BM, BN): query rows and keys per tile for padded head dims ``dp`` / ``dvp``."""
    if interpreting():
        return 16, 16
    widest = max(dp, dvp)
    if widest > 128:
        return 64, 32
    if widest > 64 and dtype == torch.float32:
        return 64, 64
    return 128, 64


def forward(q, k, v, attn_mask, scale, is_causal, params=None, out=None, mods=NO_MODS):
    """Exact attention (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*] with the score
    modifications ``mods``; writes ``out`` when given."""
    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    B, H, _, NQ, NK, D, Dv, G = sizes(q, k, v)
    DP, DVP = next_pow2(D), next_pow2(Dv)
    BM, BN = tiles(DP, DVP, q.dtype)
    mview, kind = general_mask_view(attn_mask, B, H, NQ, NK)
    margs = mview if mview is not None else q
    sm = mview.stride() if mview is not None else (0, 0, 0, 0)
    if out is None:
        out = torch.empty(B, H, NQ, Dv, device=q.device, dtype=q.dtype)
    score_mod, mod_args = score_mod_args(mods, q)
    window = window_meta(mods)
    grid = (triton.cdiv(NQ, BM), B * H)
    tk = (q.dtype, NK, D, Dv, bool(is_causal), kind, BM, BN, mods.text, window["HAS_WL"], window["HAS_WR"])
    launch(
        _exact_kernel, grid, tk,
        q, k, v, margs, out,
        *q.stride(), *k.stride(), *v.stride(), *sm, *out.stride(),
        H, G, NQ, NK, D, Dv, float(scale), window["WL"], window["WR"], score_mod, *mod_args,
        HAS_WL=window["HAS_WL"], HAS_WR=window["HAS_WR"], DP=DP, DVP=DVP, MASK_KIND=kind,
        CAUSAL=bool(is_causal), DOT=dot_precision(q.dtype), BM=BM, BN=BN,
    )
    return out
