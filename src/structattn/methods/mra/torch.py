"""MRA-2's plain-torch path: pooling, block selection, and the differentiable block-batched
forward (the CPU path with autograd, and what the backward differentiates). Inference on the CPU
goes through ``fused_cpu.py`` (same results). Derivation and decisions: docs/methods/mra.md.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..base import NO_MODS, ScoreMods, empty_result
from ..common import (MASKED, block_sums, ceil_div, check_heads, compute_dtype, key_padding_bias, pad_rows, row_shift,
                      sizes, softmax_and_lse)
from . import MraParams, clamp_block, fused_cpu


#: target size (elements) of the largest temporary of one chunk of (kv heads, query blocks)
CHUNK_ELEMS = 1 << 21

#: selection ranks: real scores are clamped to [-RANK_LIMIT, RANK_LIMIT] (NaN -> -RANK_LIMIT),
#: sink blocks rank at SINK_RANK, blocks a sliding window cuts at CUT_RANK minus CUT_STEP per
#: step of distance from the query block, the causal diagonal at +inf, non-candidates at -inf
RANK_LIMIT = 1e38
SINK_RANK = 3e38
CUT_RANK = 3.3e38
CUT_STEP = 1e33


class MraSelection(NamedTuple):
    """What ``mra_select`` computes (all shapes for query heads H; Mq/Mk = number of blocks).

    block: the block size used (after clamping).
    block_idx: int64 [B, H, Mq, r], selected key blocks per query block (by descending score; the
        causal diagonal first). Slots with ``block_valid`` False are unused (their index is some
        in-range block and must be ignored).
    block_valid: bool [B, H, Mq, r].
    lowres: [B, H, Mq, Mk] selection scores ``g(s * qhat khat^T) + block_lse - log(count)`` of
        candidate blocks, -inf for non-candidates (differentiable in q and k); ``g`` is the score
        modification at the blocks' mean positions (identity without one); None from the Triton
        selection.
    pooled_logits: [B, H, Mq, Mk] the "mra2" low-resolution branch: ``g(s * qhat khat^T) +
        block_lse`` for unselected candidates that no window cuts, -inf for selected blocks, cut
        blocks and non-candidates.
    key_bias: additive key bias [Bm, Hm, Mk*b] (Bm in {1,B}, Hm in {1,H}; padded keys -inf), or
        None when there is neither a mask nor padding.
    block_lse: [Bm, Hm, Mk] logsumexp of each block's key biases (``log(count)`` for 0 / -inf
        biases; -inf for a block without candidates' keys), or None when ``key_bias`` is None
        (then every block holds b keys of bias 0).
    count: [Bm, Hm, Mk] number of keys per block whose bias is not -inf (float).
    """

    block: int
    block_idx: torch.Tensor
    block_valid: torch.Tensor
    lowres: Optional[torch.Tensor]
    pooled_logits: torch.Tensor
    key_bias: Optional[torch.Tensor]
    block_lse: Optional[torch.Tensor]
    count: torch.Tensor


def block_bias_softmax(bias: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key block of ``bias`` [Bm, Hm, Mk*b]: ``(weight, block_lse, count)``.

    ``weight`` [Bm, Hm, Mk*b] is the softmax of the biases within each block (0 in a block whose
    biases are all -inf), ``block_lse`` [Bm, Hm, Mk] their logsumexp (-inf there) and ``count``
    [Bm, Hm, Mk] the number of keys whose bias is not -inf. NaN biases make their block NaN.
    """
    bm, hm, n = bias.shape
    bb = bias.reshape(bm, hm, n // block, block)
    m = row_shift(bb.amax(-1, keepdim=True))
    e = torch.exp(bb - m)
    total = e.sum(-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)
    weight = (e / total.masked_fill(total == 0, 1.0)).reshape(bm, hm, n)
    count = (bb != MASKED).sum(-1).to(bias.dtype)
    return weight, lse, count


def mra_pool(x: torch.Tensor, weight: Optional[torch.Tensor], block: int, heads: int) -> torch.Tensor:
    """Weighted block sums of keys/values ``x`` [B, Hk, Nk, E] -> [B, heads, ceil(Nk/b), E].

    ``weight`` [Bm, Hm, >= Nk] (Bm in {1, B}, Hm in {1, heads}) sums to 1 over each block (see
    ``block_bias_softmax``); None means plain block means (every block full: Nk is a multiple of
    b). ``x`` is not padded.
    """
    B, Hk, n, E = x.shape
    G = heads // Hk
    if weight is None:
        s = block_sums(x, block) / block                                  # [B, Hk, Mk, E]
        mk = s.shape[-2]
        return s.unsqueeze(2).expand(B, Hk, G, mk, E).reshape(B, heads, mk, E)
    bm, hm = weight.shape[0], weight.shape[1]
    weight = weight[..., :n]
    w = weight.reshape(bm, Hk, G, n) if hm == heads else weight.reshape(bm, 1, 1, n)
    s = block_sums(x.unsqueeze(2), block, w)                        # [B, Hk, G|1, Mk, E]
    mk = s.shape[-2]
    return s.expand(B, Hk, G, mk, E).reshape(B, heads, mk, E)


def mra_select(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
               is_causal: bool, params: MraParams, mods: ScoreMods = NO_MODS) -> MraSelection:
    """Low-resolution scores and per-query-block key-block selection of MRA-2.

    q [B, H, Nq, D], k [B, Hk, Nk, D] (Hk divides H; Nq, Nk >= 1), ``attn_mask`` key padding
    (bool keep or additive float, broadcastable to [B, H, 1, Nk]; a query axis with equal rows is
    accepted), ``is_causal`` SDPA's top-left causal flag. Computation in fp32 (float64 for float64
    inputs). The selection itself (``torch.topk`` on detached, sanitised scores) is not
    differentiable; ``lowres`` and ``pooled_logits`` are. See ``MraSelection`` for the outputs and
    docs/methods/mra.md for the rules.

    ``mods``: a score modification WITHOUT key-only summands (those belong in ``attn_mask``): its
    expression makes the pooled logits of the pooled scores at each block's mean positions; its
    window limits the candidates to blocks some query of the block sees and selects the blocks it
    cuts first (they are never pooled).
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    check_heads(q, k)
    if not (B and H and Nq and Nk):
        raise ValueError(f"mra_select needs non-empty q and k; got shapes {tuple(q.shape)}, {tuple(k.shape)} "
                         f"(mra_forward returns SDPA's empty result for these)")
    cdt = compute_dtype(q.dtype)
    b = clamp_block(params, Nq, Nk)
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)
    nkp = mk * b
    dev = q.device

    bias = key_padding_bias(attn_mask, Nk, nkp, cdt, dev, "mra attention")
    if bias is None:
        weight = block_lse = None
        count = torch.full((1, 1, mk), float(b), dtype=cdt, device=dev)
    else:
        weight, block_lse, count = block_bias_softmax(bias, b)

    qcount = (Nq - torch.arange(mq, device=dev) * b).clamp(max=b).to(cdt)  # valid queries per block
    qhat = block_sums(q.to(cdt), b) / qcount.unsqueeze(-1)              # [B, H, Mq, D]
    khat = mra_pool(k.to(cdt), weight, b, H)                              # [B, H, Mk, D]
    qk = (qhat @ khat.transpose(-1, -2)) * scale                          # [B, H, Mq, Mk]
    if mods.text:
        qpos = torch.arange(mq, device=dev).to(cdt) * b + (qcount - 1) / 2   # mean query position
        qk = mods.logits(qk, b=torch.arange(B, device=dev).view(B, 1, 1, 1),
                         h=torch.arange(H, device=dev).view(1, H, 1, 1), q=qpos.view(1, 1, mq, 1),
                         k=_key_positions(weight, b, mk, cdt, dev).unsqueeze(-2))

    cand = (count > 0).unsqueeze(-2)                                      # [Bm, Hm, 1, Mk]
    cand = _per_head(cand, H).expand(B, H, mq, mk)
    iq = torch.arange(mq, device=dev).unsqueeze(-1)
    jk = torch.arange(mk, device=dev)
    if is_causal:
        cand = cand & (jk <= iq)
    cut = None
    if mods.windowed:
        see_any, see_all = window_blocks(Nq, Nk, b, is_causal, mods, dev)
        cand = cand & see_any
        cut = see_any & ~see_all
    if block_lse is None:
        lowres, pooled = qk, qk + torch.log(count).unsqueeze(-2)
    else:
        lse = _per_head(block_lse, H).unsqueeze(-2)
        # -log(count) only where count > 0 (elsewhere lse is -inf and the block no candidate)
        mean_bias = block_lse - torch.log(count.clamp_min(1))
        lowres, pooled = qk + _per_head(mean_bias, H).unsqueeze(-2), qk + lse
    lowres = torch.where(cand, lowres, MASKED)

    # ranks: a candidate keeps a rank above -inf whatever its score holds (NaN, +-inf)
    rank = lowres.detach().nan_to_num(nan=-RANK_LIMIT).clamp(-RANK_LIMIT, RANK_LIMIT)
    rank = torch.where(cand, rank, MASKED)
    if params.sink_blocks:
        rank = torch.where(cand & (jk < params.sink_blocks), SINK_RANK, rank)
    if cut is not None:
        near = (2 * (jk - iq).abs() + (jk > iq).long()).to(cdt)
        rank = torch.where(cand & cut, CUT_RANK - CUT_STEP * near, rank)
    if is_causal:
        rank = torch.where(cand & (jk == iq), float("inf"), rank)
    r = min(params.blocks_per_row, mk)
    top, idx = torch.topk(rank, r, dim=-1)
    valid = top > MASKED
    selected = torch.zeros(B, H, mq, mk, dtype=torch.bool, device=dev).scatter_(-1, idx, valid)
    keep = cand & ~selected if cut is None else cand & ~selected & ~cut
    pooled = torch.where(keep, pooled, MASKED)
    return MraSelection(b, idx, valid, lowres, pooled, bias, block_lse, count)


def _key_positions(weight: Optional[torch.Tensor], block: int, mk: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """The mean key position of every key block, weighted as its keys are pooled: [Bm, Hm, Mk]
    (``weight`` [Bm, Hm, Mk*b] from ``block_bias_softmax``; 0 in a block without weight), or
    [1, 1, Mk] block centres when ``weight`` is None (plain means of full blocks)."""
    if weight is None:
        return (torch.arange(mk, device=device).to(dtype) * block + (block - 1) / 2).view(1, 1, mk)
    pos = torch.arange(mk * block, device=device).to(dtype)
    bm, hm = weight.shape[0], weight.shape[1]
    return (weight * pos).reshape(bm, hm, mk, block).sum(-1)


def window_blocks(nq: int, nk: int, block: int, is_causal: bool, mods: ScoreMods,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(see_any, see_all)`` bool [Mq, Mk]: whether some / every query of query block i sees some
    / every key of key block j under the window of ``mods`` and ``is_causal`` (real positions
    only: queries < Nq, keys < Nk). A pair visible iff ``-left <= key - query <= right`` (and
    ``<= 0`` when causal)."""
    mq, mk = ceil_div(nq, block), ceil_div(nk, block)
    i = torch.arange(mq, device=device).view(-1, 1)
    j = torch.arange(mk, device=device).view(1, -1)
    n0, n1 = i * block, ((i + 1) * block).clamp(max=nq) - 1
    m0, m1 = j * block, ((j + 1) * block).clamp(max=nk) - 1
    big = nq + nk + 1
    lo = -mods.window_left if mods.window_left >= 0 else -big
    hi = mods.window_right if mods.window_right >= 0 else big
    if is_causal:
        hi = min(hi, 0)
    dmin, dmax = m0 - n1, m1 - n0                                          # key - query over the pair
    see_any = (dmax >= lo) & (dmin <= hi) & (lo <= hi)
    see_all = (dmin >= lo) & (dmax <= hi)
    return see_any, see_all


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Broadcast [Bm, Hm, ...] (Hm in {1, heads}) to have ``heads`` on dim 1 (a view)."""
    if t.shape[1] == heads:
        return t
    return t.expand(t.shape[0], heads, *t.shape[2:])


def key_weights(sel: MraSelection) -> Optional[torch.Tensor]:
    """The per-key pooling weights ``exp(bias - block_lse)`` [Bm, Hm, Mk*b] of a selection (0 in
    blocks without candidates' keys), or None for plain block means."""
    if sel.key_bias is None:
        return None
    return block_bias_softmax(sel.key_bias, sel.block)[0]


def merge_partial(o_hi: torch.Tensor, lse_hi: torch.Tensor, o_lo: torch.Tensor, lse_lo: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp merge of two normalised partial softmax outputs ``o`` [.., Dv] with their
    log-sum-exps ``lse`` [.., 1]. Rows where both are -inf (no finite logit) give 0; NaN stays NaN.
    Every intermediate is finite for finite inputs, so the gradient is too."""
    m = row_shift(torch.maximum(lse_hi, lse_lo).detach())   # the result does not depend on the shift
    w_hi = torch.exp(lse_hi - m)
    w_lo = torch.exp(lse_lo - m)
    den = w_hi + w_lo
    return torch.addcmul(o_hi * w_hi, o_lo, w_lo) / den.masked_fill(den == 0, 1.0)


def mra_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                scale: float, is_causal: bool, params: MraParams, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """MRA-2 / MRA-2-s on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv].

    Block-batched: the selected key blocks of each query block are gathered (``index_select``)
    into [.., Mq, r*b, D] and scored with one batched matmul; the low-resolution branch is
    [Mq, Mk] per head. No N x N tensor. Groups of (batch, kv-head) slices run one after another
    only to keep temporaries small. ``mods`` (no key-only summands: see ``mra_select``) goes to
    ``scored.mra_forward_mods``.
    """
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    if not mods.empty:
        from .scored import mra_forward_mods

        return mra_forward_mods(q, k, v, attn_mask, scale, is_causal, params, mods)
    B, H, Hk, Nq, Nk, D, Dv, G = sizes(q, k, v)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    sel = mra_select(q, k, attn_mask, scale, is_causal, params)
    b = sel.block
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)
    nqp = mq * b
    r = sel.block_idx.shape[-1]
    BH = B * Hk

    o_lo, lse_lo = low_resolution(sel, v, params, cdt, H)
    if fused_cpu.usable(q, k, v, is_causal, attn_mask) is None:
        lowres = None if o_lo is None else (o_lo, lse_lo)
        return fused_cpu.high_res_cpu(q, k, v, sel, scale, is_causal, lowres, cdt).to(q.dtype)
    if o_lo is not None:
        lse_lo = lse_lo.reshape(BH, G, mq, 1, 1)
        o_lo = o_lo.reshape(BH, G, mq, 1, Dv)

    q4 = q.reshape(BH, G, Nq, D)                # padding, scaling and casts happen per group
    k3 = k.reshape(BH, Nk, D)
    v3 = v.reshape(BH, Nk, Dv)
    # unused slots read block mk, a block of zeros appended to every head's keys and values
    unused = not bool(sel.block_valid.all())
    blocks_per_head = mk + 1 if unused else mk
    idx = sel.block_idx if not unused else torch.where(sel.block_valid, sel.block_idx, mk)
    idx = idx.reshape(BH, G, mq, r)

    slot_bias, slot_void, diag = _slot_masks(sel, B, H, Nk, G, unused, is_causal)
    chunks = _chunks(BH, mq, G * r * b * max(b, D, Dv))
    z = None
    qs = kf = vf = None
    for a0, a1, i0, i1 in chunks:
        n, nb = a1 - a0, i1 - i0
        if i0 == 0:  # new head group: scale / pad / cast its q, k, v once
            qs = pad_rows(q4[a0:a1].to(cdt) * scale, nqp).view(n, G, mq, b, D)
            kf = pad_rows(k3[a0:a1].to(cdt), blocks_per_head * b).view(n * blocks_per_head, b * D)
            vf = pad_rows(v3[a0:a1].to(cdt), blocks_per_head * b).view(n * blocks_per_head, b * Dv)
        head_base = (torch.arange(n, device=dev) * blocks_per_head).view(n, 1, 1, 1)
        flat = (idx[a0:a1, :, i0:i1] + head_base).reshape(-1)
        k_sel = kf.index_select(0, flat).view(n, G, nb, r * b, D)
        v_sel = vf.index_select(0, flat).view(n, G, nb, r * b, Dv)
        s = qs[:, :, i0:i1] @ k_sel.transpose(-1, -2)                     # [n, G, nb, b, r*b]
        if slot_bias is not None:
            s.add_(slot_bias[a0:a1, :, i0:i1])
        if slot_void is not None:
            s.masked_fill_(slot_void[a0:a1, :, i0:i1], MASKED)
        if diag is not None:
            s[..., :b].masked_fill_(diag[a0:a1, :, i0:i1], MASKED)
        p, lse_hi = softmax_and_lse(s)                                    # a row of all -inf: p = 0
        o = p @ v_sel                                                     # [n, G, nb, b, Dv]
        if lse_lo is not None:
            o = merge_partial(o, lse_hi.unsqueeze(-1), o_lo[a0:a1, :, i0:i1], lse_lo[a0:a1, :, i0:i1])
        if len(chunks) == 1:
            z = o
        else:
            if z is None:
                z = o.new_empty(BH, G, mq, b, Dv)
            z[a0:a1, :, i0:i1] = o
    out = z.reshape(B, H, nqp, Dv)
    if nqp > Nq:
        out = out[:, :, :Nq]
    return out.to(q.dtype)


def low_resolution(sel: MraSelection, v: torch.Tensor, params: MraParams, cdt: torch.dtype, H: int) -> tuple:
    """MRA-2's pooled branch: ``(o_lo [B, H, Mq, Dv], lse_lo [B, H, Mq])``, the softmax of the
    pooled logits over the pooled values and its log-sum-exp; ``(None, None)`` for ``mra2s``."""
    if params.variant != "mra2":
        return None, None
    p_lo, lse_lo = softmax_and_lse(sel.pooled_logits)                       # [B, H, Mq, Mk]
    vhat = mra_pool(v.to(cdt), key_weights(sel), sel.block, H)              # [B, H, Mk, Dv]
    return p_lo @ vhat, lse_lo


def _slot_masks(sel: MraSelection, B: int, H: int, Nk: int, G: int, unused: bool, is_causal: bool) -> tuple:
    """What the gathered slots of every query block add to its scores, each None when not needed:
    ``slot_bias`` [BH, G, Mq, 1, r*b], the mask's bias of the gathered keys (added as is);
    ``slot_void`` [BH, G, Mq, 1, r*b], slots that hold no key (block padding past Nk, unused
    slots: hard-masked by masked_fill, since adding -inf to their zero keys would give NaN for a
    query holding +-inf); ``diag`` [BH, G, Mq, b, b], the keys after each query in the causal
    diagonal block (always slot 0 when selected)."""
    b, dev = sel.block, sel.block_idx.device
    mq, r = sel.block_idx.shape[2], sel.block_idx.shape[3]
    mk = ceil_div(Nk, b)
    BH = B * H // G
    slot_bias = slot_void = diag = None
    if sel.key_bias is not None:
        kb = _per_head(sel.key_bias, H).expand(B, H, mk * b).reshape(B, H, mk, b)
        bb = torch.arange(B, device=dev).view(B, 1, 1, 1)
        hh = torch.arange(H, device=dev).view(1, H, 1, 1)
        slot_bias = kb[bb, hh, sel.block_idx].reshape(BH, G, mq, 1, r * b)
    if unused or mk * b > Nk:
        void = (sel.block_idx == mk - 1).unsqueeze(-1) & (torch.arange(b, device=dev) >= Nk - (mk - 1) * b)
        if unused:
            void = void | ~sel.block_valid.unsqueeze(-1)
        slot_void = void.reshape(BH, G, mq, 1, r * b)
    if is_causal:
        on_diag = (sel.block_idx[..., 0] == torch.arange(mq, device=dev)) & sel.block_valid[..., 0]  # [B, H, Mq]
        upper = torch.ones(b, b, dtype=torch.bool, device=dev).triu(1)
        diag = on_diag.reshape(BH, G, mq, 1, 1) & upper
    return slot_bias, slot_void, diag


def _chunks(BH: int, mq: int, per_qblock: int) -> list[tuple[int, int, int, int]]:
    """``(head0, head1, qblock0, qblock1)`` ranges: work is independent per (kv head, query block),
    and chunks of about CHUNK_ELEMS elements in the largest temporary (``per_qblock`` elements per
    query block: the gathered keys) keep every temporary small and allocator-friendly."""
    heads_per = max(1, CHUNK_ELEMS // max(1, per_qblock * mq))
    qblocks_per = mq if heads_per > 1 else max(1, min(mq, CHUNK_ELEMS // max(1, per_qblock)))
    return [(a0, min(a0 + heads_per, BH), i0, min(i0 + qblocks_per, mq))
            for a0 in range(0, BH, heads_per) for i0 in range(0, mq, qblocks_per)]
