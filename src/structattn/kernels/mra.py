"""MRA-2 / MRA-2-s forward in Triton.

Pipeline (``forward``):

1. **pooling + selection**: three Triton launches in ``kernels/mra_select.py`` (pooled q/k
   means, low-resolution logits, per query block the r highest-scoring candidate key blocks with
   the causal diagonal first, and the pooled branch's logits ``Lhat_ij + log count_j``, -inf for
   selected blocks and non-candidates). It computes what the reference's ``methods.mra.mra_select``
   computes (identical selections on every row in the H100 runs); ``SELECT_IMPL = "eager"`` uses
   the reference itself (~40 small torch launches: 1 ms at 16K, which kept MRA-2 under 4x).
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

So a call is five Triton launches (plus a few small torch ops when a mask is given). Mask
conventions follow the reference (``methods/mra.py``): key biases are added as they are (-inf is
the only hard mask), block padding, the causal upper triangle and unused slots are excluded (never
loaded or set to -inf), and a row with no finite logit in either branch gets 0 (the merged
denominator is 0) while a NaN denominator stays NaN.

``forward_flex`` is the FlexAttention alternative for the selected blocks (``BlockMask.from_kv_blocks``
with the selected blocks as *full* blocks, no mask_mod; torch for the pooled branch and the merge).
It serves the measurement in benchmarks/gpu.py only (no mask, no causal, block-aligned N).
Decision, measured on an H100 (benchmarks/RESULTS.md, bf16, 12 heads, d = 64, same selection given
to both): the own kernel took 0.185 ms at N = 16K and 0.654 ms at 64K, FlexAttention (it needs
``kernel_options={"BLOCK_M": 32, "BLOCK_N": 32}`` for 32-wide blocks) 1.84 ms and 11.5 ms, so
``forward`` uses the own kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import configs, device_reason, dtype_reason, empty_output, head_dim_reason, launch, next_pow2

NEG_INF = tl.constexpr(float("-inf"))


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
    b = bh // H
    h = bh % H
    hk = h // G
    rdv = tl.arange(0, DVP)
    acc = tl.zeros([DVP], tl.float32)
    cnt = tl.zeros([BB], tl.float32)
    if HAS_BIAS:
        lse = tl.load(LSE + bh * MK + j)
        lse_safe = tl.where(lse == NEG_INF, 0.0, lse)  # such a block has weights 0 (bias -inf)
    for c0 in range(0, BS, BB):
        rc = c0 + tl.arange(0, BB)
        n = j * BS + rc
        ok = (rc < BS) & (n < NK)
        if HAS_BIAS:
            bias = tl.load(BIAS + b * sbb + h * sbh + n * sbn, mask=ok, other=NEG_INF)
            w = tl.where(ok, tl.exp(bias - lse_safe), 0.0)
        else:
            w = tl.where(ok, 1.0, 0.0)
        vt = tl.load(V + b * svb + hk * svh + n[:, None] * svn + rdv[None, :] * svd,
                     mask=ok[:, None] & (rdv < DV)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(vt * w[:, None], 0)
        cnt += w
    if HAS_BIAS:
        out = acc  # the weights already sum to 1 over the block
    else:
        out = acc / tl.maximum(tl.sum(cnt, 0), 1.0)
    tl.store(VHAT + (bh * MK + j) * DV + rdv, out, mask=rdv < DV)


@triton.autotune(configs=configs([triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 2), (2, 2)]]),
                 key=["BS", "R", "MK", "DP", "DVP", "QB", "MRA2", "CAUSAL", "HAS_BIAS"])
@triton.jit
def _mra_kernel(
    Q, K, V, BIAS, IDX, VALID, POOLED, VHAT, OUT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn,
    sob, soh, son, sod,
    H, G, NQ, NK, MQ, MK, BS, R, D, DV, scale,
    DP: tl.constexpr, DVP: tl.constexpr, QB: tl.constexpr, QB16: tl.constexpr,
    MRA2: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BMQ: tl.constexpr, BNK: tl.constexpr, BJ: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
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
            m_new = tl.maximum(m_lo, tl.max(pl, 1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            alpha = tl.exp(m_lo - m_safe)
            p = tl.exp(pl - m_safe[:, None])
            l_lo = l_lo * alpha + tl.sum(p, 1)
            vh = tl.load(VHAT + (bh * MK + rj[:, None]) * DV + rdv[None, :], mask=j_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            if IEEE:
                acc_lo = acc_lo * alpha[:, None] + tl.dot(p, vh, input_precision="ieee")
            else:
                acc_lo = acc_lo * alpha[:, None] + tl.dot(p, vh)
            m_lo = m_new

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
                            if IEEE:
                                x = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
                            else:
                                x = tl.dot(q, tl.trans(kt)) * scale
                            if HAS_BIAS:
                                bias = tl.load(BIAS + b * sbb + h * sbh + n_k * sbn, mask=k_ok, other=0.0)
                                x = x + bias[None, :]
                            keep = k_ok[None, :]
                            if CAUSAL:
                                keep = keep & (n_k[None, :] <= n_q[:, None])
                            x = tl.where(keep, x, NEG_INF)
                            m_new = tl.maximum(m, tl.max(x, 1))
                            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                            alpha = tl.exp(m - m_safe)
                            p = tl.exp(x - m_safe[:, None])
                            lsum = lsum * alpha + tl.sum(p, 1)
                            vt = tl.load(v_base + n_k[:, None] * svn + rdv[None, :] * svd,
                                         mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
                            if IEEE:
                                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
                            else:
                                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
                            m = m_new
                # log-sum-exp merge of the exact (selected) and pooled partial softmaxes
                mt = tl.maximum(m, mlo)
                mt_safe = tl.where(mt == NEG_INF, 0.0, mt)
                w_hi = tl.exp(m - mt_safe)
                w_lo = tl.exp(mlo - mt_safe)
                num = acc * w_hi[:, None] + olo[None, :] * w_lo[:, None]
                den = lsum * w_hi + llo * w_lo
                # den = 0: no finite logit in either branch (output 0); a NaN den stays NaN
                dead = den == 0.0
                out = num * tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, den))[:, None]
                tl.store(OUT + b * sob + h * soh + n_q[:, None] * son + rdv[None, :] * sod,
                         out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & dv_ok[None, :])


def supports(q, k, v, attn_mask, is_causal, params) -> Optional[str]:
    for reason in (device_reason(q), dtype_reason(q), head_dim_reason(q, v)):
        if reason:
            return reason
    if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        return "mra supports key-padding and causal masks only"
    if params.variant not in ("mra2", "mra2s"):
        return f"unknown variant {params.variant!r}"
    if params.block_size < 1 or params.blocks_per_row < 1:
        return "block_size and blocks_per_row must be >= 1"
    return None


def _per_head3(t: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """[Bm, Hm, N] (Bm in {1,B}, Hm in {1,H}) -> [B, H, N] view."""
    return t.expand(B, H, t.shape[-1])


#: "triton": pooling + selection in three Triton launches (``kernels/mra_select.py``; falls back
#: to "eager" for rows of more than MAX_BLOCKS key blocks); "eager": the reference's ``mra_select``
#: as is (~40 small torch launches); "compiled": that function through ``torch.compile``. A
#: near-tie between two key blocks' low-resolution scores may resolve differently from the
#: eager reference in "triton" and "compiled".
SELECT_IMPL = "triton"
_COMPILED_SELECT = {}


def _select(q, k, attn_mask, scale, is_causal, params):
    from ..methods.mra import _block, mra_select
    from . import mra_select as triton_select

    if SELECT_IMPL == "triton" and triton_select.supports_selection(q, k, _block(params, q.shape[2], k.shape[2])):
        return triton_select.select(q, k, attn_mask, scale, is_causal, params)
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


def forward(q, k, v, attn_mask, scale, is_causal, params, *, selection=None, out=None):
    """MRA-2 / MRA-2-s (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*]; ``selection``
    reuses a precomputed ``MraSelection``; writes ``out`` when given."""
    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    B, H, NQ, D = q.shape
    Hk, NK, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hk
    sel = selection if selection is not None else _select(q, k, attn_mask, scale, is_causal, params)
    bs = sel.block
    MQ, MK = -(-NQ // bs), -(-NK // bs)
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
    tk = (q.dtype, bs, R, MK, D, Dv, QB, mra2, bool(is_causal), has_bias)
    launch(
        _mra_kernel, grid, tk,
        q, k, v, bias, idx, valid, pooled, vhat, out,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
        H, G, NQ, NK, MQ, MK, bs, R, D, Dv, float(scale),
        DP=DP, DVP=DVP, QB=QB, QB16=QB16, MRA2=mra2, CAUSAL=bool(is_causal), HAS_BIAS=has_bias,
        IEEE=q.dtype == torch.float32, BMQ=BMQ, BNK=BNK, BJ=BJ,
    )
    return out


# ------------------------------------------------------------------------------------------------
# FlexAttention alternative (measured in benchmarks/gpu.py; not used by ``forward``)
# ------------------------------------------------------------------------------------------------
_FLEX = {}


def flex_supports(q, k, attn_mask, is_causal, params) -> Optional[str]:
    if attn_mask is not None or is_causal:
        return "the FlexAttention path takes no mask and no causal flag (full blocks only)"
    if q.shape[2] % params.block_size or k.shape[2] % params.block_size:
        return "the FlexAttention path needs sequence lengths that are multiples of the block size"
    return None


def forward_flex(q, k, v, attn_mask, scale, is_causal, params, *, selection=None, compiled=True,
                 kernel_options=None):
    """MRA-2 with FlexAttention for the selected blocks (full blocks, no mask_mod) + torch for the rest."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    reason = flex_supports(q, k, attn_mask, is_causal, params)
    if reason:
        raise ValueError(reason)
    B, H, NQ, D = q.shape
    Hk, NK, Dv = k.shape[1], k.shape[2], v.shape[-1]
    sel = selection if selection is not None else _select(q, k, attn_mask, scale, is_causal, params)
    bs = sel.block
    MQ, MK = NQ // bs, NK // bs
    full_num = sel.block_valid.sum(-1).to(torch.int32)
    # from_kv_blocks reads the number of kv blocks off the indices' last dim: pad the r slots to MK
    full_idx = torch.zeros(B, H, MQ, MK, dtype=torch.int32, device=q.device)
    full_idx[..., : sel.block_idx.shape[-1]] = sel.block_idx.to(torch.int32)
    zeros_num = torch.zeros_like(full_num)
    zeros_idx = torch.zeros_like(full_idx)
    bm = BlockMask.from_kv_blocks(zeros_num, zeros_idx, full_num, full_idx, BLOCK_SIZE=bs, seq_lengths=(NQ, NK))
    if compiled:
        fn = _FLEX.get("fn")
        if fn is None:
            fn = _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    else:
        fn = flex_attention
    kw = {"kernel_options": kernel_options} if kernel_options else {}
    o_hi, lse_hi = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=H != Hk, return_lse=True, **kw)
    if params.variant == "mra2s":
        return o_hi
    # pooled branch per query block, then the log-sum-exp merge (natural-log lse)
    vhat = pool_v(v, sel, H, MK).view(B, H, MK, Dv)
    merge = _FLEX.get("merge") if compiled else None
    if merge is None:
        merge = torch.compile(_flex_merge, dynamic=False) if compiled else _flex_merge
        if compiled:
            _FLEX["merge"] = merge
    return merge(o_hi, lse_hi, sel.pooled_logits, vhat, bs)


def _flex_merge(o_hi, lse_hi, pooled, vhat, bs: int):
    from ..methods.mra import merge_partial
    from ..methods.softmax import softmax_and_lse

    B, H, NQ, Dv = o_hi.shape
    MQ = NQ // bs
    p_lo, lse_lo = softmax_and_lse(pooled.float())                      # [B, H, MQ, MK], [B, H, MQ]
    o_lo = (p_lo @ vhat)[:, :, :, None, :]
    out = merge_partial(o_hi.view(B, H, MQ, bs, Dv).float(), lse_hi.float().view(B, H, MQ, bs, 1),
                        o_lo, lse_lo[..., None, None])
    return out.reshape(B, H, NQ, Dv).to(o_hi.dtype)
