"""MonarchAttention forward in Triton: tiled R-steps and L-steps, any N, T steps.

Notation (docs/methods/monarch.md): block size b, M = ceil(N/b) blocks, padded length N' = M*b,
token n = m*b + j (block m, position j). R_k is a b x b matrix per block k, L_j an M x M matrix
per position j. Block sizes are ``monarch_blocks``'s: keys in M blocks of bk = min(block_size or
ceil(sqrt(Nk)), Nk); queries in the same M blocks of bq = bk for self attention and ceil(Nq / M)
for cross attention (R_k is then bq x bk). Below, b means bq for query-side indices and bk for
key-side ones.

The work splits into three kernels; everything is computed in tiles, so nothing of size b^2 or M^2
per row lives in registers and N = 64K (b = M = 256) compiles like N = 256:

* ``_r_kernel``   (grid: row tiles of a block x M blocks x B*H). The R-step of block k for rows j:
  a flash-style pass over the b keys of block k with query ``qr_kj`` (q itself in the first step,
  alpha^R / c^R later), producing
      A_kj = s * sum_i R_k[j,i] k_ki           (alpha^L, stored [B*H, N', D])
      E_kj = H(R_k[j,:]) + sum_i R_k[j,i] bias_ki = lse_kj - sum_i R_k[j,i] raw_kji   (fp32)
      Y_kj = sum_i R_k[j,i] v_ki               (only in the last step)
  The identity for E (raw = s qr.k without the bias) needs no 0 * -inf guard; a row whose keys are
  all masked gets E = -inf, so its block gets no weight in the L-step and never a NaN.
* ``_l_kernel``   (grid: row tiles over l x b positions x B*H). For position j, an M x M
  flash-style pass with queries q_lj, keys A_kj, logit bias E_kj: MODE 0 writes the output
  z_lj = sum_k L_j[k,l] Y_kj; MODE 1 writes only lse_lj (the column normaliser of L_j).
* ``_lalpha_kernel`` (grid: row tiles over k x b positions x B*H). With lse known, accumulates
  alpha^R_kj = sum_l L_j[k,l] q_lj and c^R_kj = sum_l L_j[k,l] over valid l, and stores
  alpha^R / c^R (0 where c^R = 0: padded rows of the first step and fully masked blocks), the
  query of the next R-step.

Launches: T = 1 -> R, L(out) (2 launches); each further step adds L(lse), L(alpha), R: 3T - 1.
Scratch (A, Y, alpha^R/c) is kept in the input dtype for fp16/bf16 (tensor-core operands, like
FlashAttention's P) and in fp32 for fp32 inputs, where every tl.dot runs in IEEE fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..base import NO_MODS
from ..common import fold_key_bias, key_bias_mods_reason, sizes
from ..triton_common import (NEG_INF, configs, dot_precision, empty_output, input_reason, inverse_or_zero,
                             key_bias_view, launch, log_sum, next_pow2, online_softmax, split_head)
from . import monarch_blocks


@triton.autotune(configs=configs([(4, 2), (8, 2)]), key=["BQ", "BK", "DP", "DVP", "WRITE_Y", "BM", "BN"])
@triton.jit
def _r_kernel(
    QR, K, V, BIAS, A, Y, E,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn,
    H, G, NK, QROWS, NP, BQ, BK, D, DV, scale,
    DP: tl.constexpr, DVP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr,
    DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SINGLE: tl.constexpr,
):
    pid_j = tl.program_id(0)
    kb = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, hk = split_head(bh, H, G)
    rj = pid_j * BM + tl.arange(0, BM)
    n_q = kb * BQ + rj
    row_ok = rj < BQ
    q_ok = row_ok & (n_q < QROWS)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    d_ok = rd < D
    dv_ok = rdv < DV
    qr = tl.load(QR + b * sqb + h * sqh + n_q[:, None] * sqn + rd[None, :] * sqd,
                 mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BM], NEG_INF, tl.float32)
    lsum = tl.zeros([BM], tl.float32)
    t = tl.zeros([BM], tl.float32)
    acc_a = tl.zeros([BM, DP], tl.float32)
    acc_y = tl.zeros([BM, DVP], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for i0 in range(0, BK, BN):
        ri = i0 + tl.arange(0, BN)
        n_k = kb * BK + ri
        k_ok = (ri < BK) & (n_k < NK)
        kt = tl.load(k_base + n_k[:, None] * skn + rd[None, :] * skd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        raw = tl.dot(qr, tl.trans(kt), input_precision=DOT) * scale
        x = raw
        if HAS_BIAS:
            bias = tl.load(BIAS + b * sbb + h * sbh + n_k * sbn, mask=k_ok, other=NEG_INF)
            x = x + bias[None, :]
        x = tl.where(k_ok[None, :], x, NEG_INF)
        if SINGLE:
            # one key per block (BK = 1): R = 1 whatever the logit, H(R) + <R, bias> = bias
            # (padded query rows too: their R row is softmax(bias) = 1, as in the reference)
            p = tl.where(k_ok[None, :] & (rj >= 0)[:, None], 1.0, 0.0)
            alpha = tl.full([BM], 1.0, tl.float32)
            lsum = lsum + tl.sum(p, 1)
            if HAS_BIAS:
                t = t + tl.sum(tl.where(k_ok[None, :] & (rj >= 0)[:, None], bias[None, :], 0.0), 1)
        else:
            m, alpha, p, lsum = online_softmax(m, lsum, x)
            t = t * alpha + tl.sum(p * raw, 1)
        pc = p.to(kt.dtype)
        acc_a = acc_a * alpha[:, None] + tl.dot(pc, kt, input_precision=DOT)
        if WRITE_Y:
            vt = tl.load(v_base + n_k[:, None] * svn + rdv[None, :] * svd, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
            acc_y = acc_y * alpha[:, None] + tl.dot(pc, vt, input_precision=DOT)
    # lsum = 0: no finite logit in the block (E = -inf: no weight in the L-step); NaN stays NaN
    inv = inverse_or_zero(lsum)
    if SINGLE:
        e = t  # the key's bias (0 without a mask)
    else:
        e = log_sum(m, lsum) - t * inv
    a = acc_a * (inv * scale)[:, None]
    tl.store(A + bh * NP * D + n_q[:, None] * D + rd[None, :], a.to(A.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(E + bh * NP + n_q, e, mask=row_ok)
    if WRITE_Y:
        y = acc_y * inv[:, None]
        tl.store(Y + bh * NP * DV + n_q[:, None] * DV + rdv[None, :], y.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])


@triton.autotune(configs=configs([(4, 2), (8, 2)]), key=["M", "DP", "DVP", "MODE", "BL", "BK"])
@triton.jit
def _l_kernel(
    Q, A, E, Y, OUT, LSE,
    sqb, sqh, sqn, sqd,
    sob, soh, son, sod,
    H, NQ, NP, BQ, M, D, DV,
    DP: tl.constexpr, DVP: tl.constexpr, MODE: tl.constexpr, DOT: tl.constexpr,
    BL: tl.constexpr, BK: tl.constexpr, SINGLE: tl.constexpr,
):
    pid_l = tl.program_id(0)
    j = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, _ = split_head(bh, H, 1)
    rl = pid_l * BL + tl.arange(0, BL)
    n_l = rl * BQ + j
    l_ok = (rl < M) & (n_l < NQ)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    d_ok = rd < D
    dv_ok = rdv < DV
    q = tl.load(Q + b * sqb + h * sqh + n_l[:, None] * sqn + rd[None, :] * sqd,
                mask=l_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BL], NEG_INF, tl.float32)
    lsum = tl.zeros([BL], tl.float32)
    acc = tl.zeros([BL, DVP], tl.float32)
    for k0 in range(0, M, BK):
        rk = k0 + tl.arange(0, BK)
        n_k = rk * BQ + j
        k_ok = rk < M
        a = tl.load(A + bh * NP * D + n_k[:, None] * D + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        e = tl.load(E + bh * NP + n_k, mask=k_ok, other=NEG_INF)
        g = tl.dot(q, tl.trans(a), input_precision=DOT)
        g = g + e[None, :]
        if SINGLE:
            # one key block (M = 1): L = 1 whatever the logit
            p = tl.where(k_ok[None, :] & l_ok[:, None], 1.0, 0.0)
            alpha = tl.full([BL], 1.0, tl.float32)
            m_new = tl.zeros([BL], tl.float32)
            lsum = lsum + tl.sum(p, 1)
        else:
            m_new, alpha, p, lsum = online_softmax(m, lsum, g)
        if MODE == 0:
            y = tl.load(Y + bh * NP * DV + n_k[:, None] * DV + rdv[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(y.dtype), y, input_precision=DOT)
        m = m_new
    # lsum = 0: no finite logit (output 0, lse -inf); a NaN lsum stays NaN
    if MODE == 0:
        out = acc * inverse_or_zero(lsum)[:, None]
        tl.store(OUT + b * sob + h * soh + n_l[:, None] * son + rdv[None, :] * sod, out.to(OUT.dtype.element_ty),
                 mask=l_ok[:, None] & dv_ok[None, :])
    else:
        tl.store(LSE + bh * NP + n_l, log_sum(m, lsum), mask=l_ok)


@triton.autotune(configs=configs([(4, 2), (8, 2)]), key=["M", "DP", "BL", "BK"])
@triton.jit
def _lalpha_kernel(
    Q, A, E, LSE, QR,
    sqb, sqh, sqn, sqd,
    H, NQ, NP, BQ, M, D,
    DP: tl.constexpr, DOT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, SINGLE: tl.constexpr,
):
    pid_k = tl.program_id(0)
    j = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, _ = split_head(bh, H, 1)
    rk = pid_k * BK + tl.arange(0, BK)
    n_k = rk * BQ + j
    k_ok = rk < M
    rd = tl.arange(0, DP)
    d_ok = rd < D
    a = tl.load(A + bh * NP * D + n_k[:, None] * D + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    e = tl.load(E + bh * NP + n_k, mask=k_ok, other=NEG_INF)
    acc = tl.zeros([BK, DP], tl.float32)
    c = tl.zeros([BK], tl.float32)
    for l0 in range(0, M, BL):
        rl = l0 + tl.arange(0, BL)
        n_l = rl * BQ + j
        l_ok = (rl < M) & (n_l < NQ)
        q = tl.load(Q + b * sqb + h * sqh + n_l[:, None] * sqn + rd[None, :] * sqd,
                    mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + bh * NP + n_l, mask=l_ok, other=NEG_INF)
        g = tl.dot(a, tl.trans(q), input_precision=DOT)
        g = g + e[:, None]
        if SINGLE:
            p = tl.where(k_ok[:, None] & l_ok[None, :], 1.0, 0.0)  # one key block: L = 1
        else:
            # rows l with lse -inf (no finite L-logit) get no weight; a NaN lse stays NaN
            use = l_ok & (lse != NEG_INF)
            lse_safe = tl.where(use, lse, 0.0)
            p = tl.where(use[None, :], tl.exp(g - lse_safe[None, :]), 0.0)
        c += tl.sum(p, 1)
        acc += tl.dot(p.to(q.dtype), q, input_precision=DOT)
    qr = acc * inverse_or_zero(c)[:, None]  # c = 0: no valid query row weighs this block, alpha^R / c = 0
    tl.store(QR + bh * NP * D + n_k[:, None] * D + rd[None, :], qr.to(QR.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------

def supports(q, k, v, attn_mask, is_causal, params, mods=NO_MODS) -> Optional[str]:
    """Run-time check of the kernel on concrete inputs (reached through the kernel dispatch): why it
    cannot take them, or None. Score modifications: a constant scale and key-only biases
    (``common.fold_key_bias``), which reach the kernel as its key-padding bias."""
    reason = input_reason(q, v) or key_bias_mods_reason("monarch", mods)
    if reason:
        return reason
    if is_causal:
        return "MonarchAttention has no causal form"
    if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        return "MonarchAttention supports key-padding masks only"
    if params.num_steps < 1:
        return "num_steps must be >= 1"
    if params.block_size is not None and params.block_size < 1:
        return "block_size must be >= 1"
    return None


def _tile(x: int, lo: int, hi: int) -> int:
    return min(hi, next_pow2(x, lo))


def forward(q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS, *, out=None):
    """MonarchAttention (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*]; writes ``out``
    when given. A key bias of ``mods`` is evaluated once into the key-padding bias."""
    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    attn_mask, scale = fold_key_bias(q, k, attn_mask, scale, mods, torch.float32, "monarch")
    B, H, _, NQ, NK, D, Dv, G = sizes(q, k, v)
    T = int(params.num_steps)
    M, BQ, BK = monarch_blocks(NQ, NK, params.block_size)
    NP = M * BQ  # padded query length: scratch rows (k, j) live at k*BQ + j
    BH = B * H
    dev = q.device
    sdt = q.dtype  # scratch dtype (fp32 stays fp32)
    dot = dot_precision(q.dtype)
    DP, DVP = next_pow2(D), next_pow2(Dv)

    bias = key_bias_view(attn_mask, B, H, NK)
    has_bias = bias is not None
    bias_arg = bias if has_bias else q
    sb = bias.stride() if has_bias else (0, 0, 0)

    alloc = _poisoned if POISON_SCRATCH else torch.empty
    A = alloc((BH, NP, D), device=dev, dtype=sdt)
    E = alloc((BH, NP), device=dev, dtype=torch.float32)
    Y = alloc((BH, NP, Dv), device=dev, dtype=sdt)
    if out is None:
        out = torch.empty(B, H, NQ, Dv, device=dev, dtype=q.dtype)
    if T > 1:
        LSE = alloc((BH, NP), device=dev, dtype=torch.float32)
        QR = alloc((BH, NP, D), device=dev, dtype=sdt)

    # tiles: query rows of a block and its keys for the R-step; rows over blocks for the L-step
    BM = _tile(BQ, 16, 64)
    BN = _tile(BK, 16, 64)
    BL = _tile(M, 16, 64)
    BKT = _tile(M, 16, 64)
    if DP > 64 or DVP > 64:  # keep register tiles bounded at head_dim 128
        BN = min(BN, 32)
        BKT = min(BKT, 32)

    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    qr_strides = (H * NP * D, NP * D, D, 1)

    tk = (q.dtype, D, Dv, BQ, BK, M, has_bias, BM, BN, BL, BKT)

    def r_step(qr, qr_strides_, qrows, write_y):
        launch(
            _r_kernel, (triton.cdiv(BQ, BM), M, BH), tk + (write_y,),
            qr, k, v, bias_arg, A, Y, E,
            *qr_strides_, *sk, *sv, *sb,
            H, G, NK, qrows, NP, BQ, BK, D, Dv, float(scale),
            DP=DP, DVP=DVP, HAS_BIAS=has_bias, WRITE_Y=write_y, DOT=dot, BM=BM, BN=BN, SINGLE=BK == 1,
        )

    grid_l = (triton.cdiv(M, BL), BQ, BH)
    r_step(q, sq, NQ, T == 1)
    for step in range(1, T):
        launch(
            _l_kernel, grid_l, tk + (1,),
            q, A, E, Y, out, LSE, *sq, *so, H, NQ, NP, BQ, M, D, Dv,
            DP=DP, DVP=DVP, MODE=1, DOT=dot, BL=BL, BK=BKT, SINGLE=M == 1,
        )
        launch(
            _lalpha_kernel, (triton.cdiv(M, BKT), BQ, BH), tk,
            q, A, E, LSE, QR, *sq, H, NQ, NP, BQ, M, D,
            DP=DP, DOT=dot, BL=BL, BK=BKT, SINGLE=M == 1,
        )
        r_step(QR, qr_strides, NP, step == T - 1)
    launch(
        _l_kernel, grid_l, tk + (0,),
        q, A, E, Y, out, E, *sq, *so, H, NQ, NP, BQ, M, D, Dv,
        DP=DP, DVP=DVP, MODE=0, DOT=dot, BL=BL, BK=BKT, SINGLE=M == 1,
    )
    return out


#: tests set this to fill the scratch buffers with NaN, so that a read of an unwritten row shows
POISON_SCRATCH = False


def _poisoned(shape, device, dtype):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)
