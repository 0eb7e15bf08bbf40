"""MRA-2 multi-resolution attention (Zeng et al. 2022), written from DESIGN.md section 6 / METHODS.md.

Queries and keys are cut into blocks of ``b`` (padded separately: Nq -> Mq*b, Nk -> Mk*b). Each
block is pooled; the low-resolution scores pick, per query block, the
``r = min(blocks_per_row, #candidates)`` key blocks with the largest score. Selected blocks get
exact scores (with every mask); in variant ``"mra2"`` each unselected candidate block contributes
one pooled key with value ``vhat_j`` shared by the queries of block i; ``"mra2s"`` keeps only the
selected blocks. The two partial softmaxes are merged by log-sum-exp. With every key block
selected the result is exact softmax attention.

Key biases in the low resolution. A key-padding mask gives each key k an additive bias ``b_k``
(0 / -inf for bool masks; any float for additive masks, -inf being the only hard mask). The exact
contribution of key block j to query n is ``sum_k exp(s q_n.k_k + b_k) v_k``. With the block's
bias softmax ``w_k = exp(b_k - beta_j)``, ``beta_j = logsumexp_k b_k`` (so ``sum_k w_k = 1``), it
equals ``exp(beta_j) sum_k w_k exp(s q_n.k_k) v_k``; MRA replaces the exponentials by the
exponential of their w-weighted average logit, ``s qhat_i.khat_j`` with ``khat_j = sum_k w_k k_k``
and ``qhat_i`` the mean query of block i, giving one pooled key of logit
``s qhat_i.khat_j + beta_j`` and value ``vhat_j = sum_k w_k v_k``. For 0 / -inf biases w is uniform
over the c_j unmasked keys and ``beta_j = log c_j``: MRA-2's block means and ``log(count)``.

Decisions and deviations (the Triton kernels implement the same; keep them in sync):

1. The budget is per query-block row, computed from the actual Nk (the paper uses a global
   per-head budget from the config's maximum length).
2. Candidates are key blocks with at least one key whose bias is not -inf (``count_j > 0``,
   count_j = number of such keys); finite biases, however negative (-1e4, ``finfo.min``), are keys
   like any other. Causal (top-left, as SDPA): candidates are ``j <= i`` and the diagonal block
   ``i`` is always selected when it is a candidate (it counts toward r). Fewer candidates than r
   leave slots unused (``MraSelection.block_valid``); unused slots read a block of zeros with
   bias -inf, never another block's keys or values.
3. Pooling and pooled logits follow the derivation above (``beta_j`` is ``MraSelection.block_lse``).
   The selection score is the per-key average of the pooled approximation,
   ``s qhat_i.khat_j + beta_j - log(count_j)``: the paper's average logit ``s qhat_i.khat_j`` for
   0 / -inf biases, shifted by a bias shared by the whole block. Selected blocks add every bias
   exactly (s + bias in the compute dtype, like SDPA), so with all blocks selected the result is
   SDPA's also for finite biases (-1e4 rows are ordinary rows; rows whose keys all carry
   ``finfo.min`` give the uniform average of v, since s + min rounds to min).
4. General masks (varying along queries) are refused by ``supports``; ``forward`` accepts a mask
   with a query axis whose rows are all equal and raises ValueError otherwise.
5. A query with no finite logit (all its keys -inf / False) gets output 0, like torch 2.13's SDPA;
   there is no threshold on finite values.
6. Non-finite inputs. The selection ranks a NaN score below every real one and clamps +-inf
   scores to +-1e38, so a candidate stays a candidate whatever q and k hold: with every block
   selected the output is exact, and a +-inf / NaN in q, k or v poisons exactly the rows SDPA
   poisons (its own query row; the rows whose logit with a poisoned key is +inf or NaN; the value
   column of a poisoned value row), except that a row which cannot see a poisoned key (above the
   causal diagonal) stays finite where SDPA's additive causal mask turns ``+inf - inf`` into NaN.
   Below the exact limit the pooled quantities carry it further. A poisoned query row makes
   ``qhat`` of its query block non-finite: that block's selection becomes arbitrary and, in
   ``mra2``, its pooled branch NaN, so every row of that query block is NaN; other query blocks
   are untouched. A poisoned key makes ``khat`` of its key block non-finite: the block's scores
   become +-inf / NaN (ranked at +-1e38 / last) and, in ``mra2``, the rows of the query blocks that
   pool it turn NaN (or give it weight 0 when its pooled logit is -inf). A poisoned value makes
   ``vhat`` of its block NaN in that column for the query blocks that pool it.
7. ``block_size`` larger than both lengths is clamped to ``max(Nq, Nk)`` (same result, less padding).
8. fp16 / bf16 inputs are computed in fp32; float64 stays float64. Empty inputs (a dimension of
   size 0) return SDPA's result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import mra_cpu
from .base import Dim, Method, SiteShape, empty_result
from .monarch import _check_heads, _pad_rows, ceil_div, compute_dtype, key_padding_bias, sym_min
from .softmax import softmax_and_lse

__all__ = ["MraParams", "MraMethod", "MraSelection", "mra_select", "mra_pool", "block_bias_softmax",
           "mra_forward", "mra_flops", "VARIANTS"]

VARIANTS = ("mra2", "mra2s")

#: target size (elements) of the largest temporary of one chunk of (kv heads, query blocks)
CHUNK_ELEMS = 1 << 21

#: selection ranks: real scores are clamped to [-RANK_LIMIT, RANK_LIMIT] (NaN -> -RANK_LIMIT),
#: sink blocks rank at SINK_RANK, the causal diagonal at +inf, non-candidates at -inf
RANK_LIMIT = 1e38
SINK_RANK = 3e38

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class MraParams:
    """``block_size`` b; ``blocks_per_row`` r (exact key blocks per query block); ``variant``;
    ``sink_blocks``: the first key blocks always selected (within the r), for causal LMs whose
    heads park mass on the first tokens ("attention sinks"), which mean pooling dilutes."""

    block_size: int = 32
    blocks_per_row: int = 4
    variant: str = "mra2"
    sink_blocks: int = 0


class MraSelection(NamedTuple):
    """What ``mra_select`` computes (all shapes for query heads H; Mq/Mk = number of blocks).

    block: the block size used (after clamping).
    block_idx: int64 [B, H, Mq, r], selected key blocks per query block (by descending score; the
        causal diagonal first). Slots with ``block_valid`` False are unused (their index is some
        in-range block and must be ignored).
    block_valid: bool [B, H, Mq, r].
    lowres: [B, H, Mq, Mk] selection scores ``s * qhat khat^T + block_lse - log(count)`` of
        candidate blocks, -inf for non-candidates (differentiable in q and k); None from the
        Triton selection.
    pooled_logits: [B, H, Mq, Mk] the "mra2" low-resolution branch: ``s * qhat khat^T + block_lse``
        for unselected candidates, -inf for selected blocks and non-candidates.
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


def _block(params: MraParams, nq: int, nk: int) -> int:
    return max(1, min(params.block_size, max(nq, nk)))


def _block_sums(x: torch.Tensor, block: int, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sums of consecutive ``block`` rows of ``x`` [..., N, E] -> [..., ceil(N/block), E], rows
    weighted by ``w`` [..., N] (broadcast against x's leading dims) when given. No padded copy."""
    n, e = x.shape[-2], x.shape[-1]
    full, rem = n // block, n % block
    parts = []
    for lo, nb, bs in ((0, full, block), (full * block, 1 if rem else 0, rem)):
        if nb == 0:
            continue
        xs = x[..., lo:lo + nb * bs, :].reshape(*x.shape[:-2], nb, bs, e)
        if w is None:
            parts.append(xs.sum(-2))
        else:
            ws = w[..., lo:lo + nb * bs].reshape(*w.shape[:-1], nb, 1, bs)
            parts.append((ws @ xs).squeeze(-2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def block_bias_softmax(bias: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key block of ``bias`` [Bm, Hm, Mk*b]: ``(weight, block_lse, count)``.

    ``weight`` [Bm, Hm, Mk*b] is the softmax of the biases within each block (0 in a block whose
    biases are all -inf), ``block_lse`` [Bm, Hm, Mk] their logsumexp (-inf there) and ``count``
    [Bm, Hm, Mk] the number of keys whose bias is not -inf. NaN biases make their block NaN.
    """
    bm, hm, n = bias.shape
    bb = bias.reshape(bm, hm, n // block, block)
    m = bb.amax(-1, keepdim=True)
    m = m.masked_fill(m == _NEG_INF, 0.0)
    e = torch.exp(bb - m)
    total = e.sum(-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)
    weight = (e / total.masked_fill(total == 0, 1.0)).reshape(bm, hm, n)
    count = (bb != _NEG_INF).sum(-1).to(bias.dtype)
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
        s = _block_sums(x, block) / block                                  # [B, Hk, Mk, E]
        mk = s.shape[-2]
        return s.unsqueeze(2).expand(B, Hk, G, mk, E).reshape(B, heads, mk, E)
    bm, hm = weight.shape[0], weight.shape[1]
    weight = weight[..., :n]
    w = weight.reshape(bm, Hk, G, n) if hm == heads else weight.reshape(bm, 1, 1, n)
    s = _block_sums(x.unsqueeze(2), block, w)                        # [B, Hk, G|1, Mk, E]
    mk = s.shape[-2]
    return s.expand(B, Hk, G, mk, E).reshape(B, heads, mk, E)


def mra_select(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
               is_causal: bool, params: MraParams) -> MraSelection:
    """Low-resolution scores and per-query-block key-block selection of MRA-2.

    q [B, H, Nq, D], k [B, Hk, Nk, D] (Hk divides H; Nq, Nk >= 1), ``attn_mask`` key padding
    (bool keep or additive float, broadcastable to [B, H, 1, Nk]; a query axis with equal rows is
    accepted), ``is_causal`` SDPA's top-left causal flag. Computation in fp32 (float64 for float64
    inputs). The selection itself (``torch.topk`` on detached, sanitised scores) is not
    differentiable; ``lowres`` and ``pooled_logits`` are. See ``MraSelection`` for the outputs and
    the module docstring for the rules.
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    _check_heads(q, k)
    if not (B and H and Nq and Nk):
        raise ValueError(f"mra_select needs non-empty q and k; got shapes {tuple(q.shape)}, {tuple(k.shape)} "
                         f"(mra_forward returns SDPA's empty result for these)")
    cdt = compute_dtype(q.dtype)
    b = _block(params, Nq, Nk)
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
    qhat = _block_sums(q.to(cdt), b) / qcount.unsqueeze(-1)              # [B, H, Mq, D]
    khat = mra_pool(k.to(cdt), weight, b, H)                              # [B, H, Mk, D]
    qk = (qhat @ khat.transpose(-1, -2)) * scale                          # [B, H, Mq, Mk]

    cand = (count > 0).unsqueeze(-2)                                      # [Bm, Hm, 1, Mk]
    cand = _per_head(cand, H).expand(B, H, mq, mk)
    iq = torch.arange(mq, device=dev).unsqueeze(-1)
    jk = torch.arange(mk, device=dev)
    if is_causal:
        cand = cand & (jk <= iq)
    if block_lse is None:
        lowres, pooled = qk, qk + torch.log(count).unsqueeze(-2)
    else:
        lse = _per_head(block_lse, H).unsqueeze(-2)
        # -log(count) only where count > 0 (elsewhere lse is -inf and the block no candidate)
        mean_bias = block_lse - torch.log(count.clamp_min(1))
        lowres, pooled = qk + _per_head(mean_bias, H).unsqueeze(-2), qk + lse
    lowres = torch.where(cand, lowres, _NEG_INF)

    # ranks: a candidate keeps a rank above -inf whatever its score holds (NaN, +-inf)
    rank = lowres.detach().nan_to_num(nan=-RANK_LIMIT).clamp(-RANK_LIMIT, RANK_LIMIT)
    rank = torch.where(cand, rank, _NEG_INF)
    if params.sink_blocks:
        rank = torch.where(cand & (jk < params.sink_blocks), SINK_RANK, rank)
    if is_causal:
        rank = torch.where(cand & (jk == iq), float("inf"), rank)
    r = min(params.blocks_per_row, mk)
    top, idx = torch.topk(rank, r, dim=-1)
    valid = top > _NEG_INF
    selected = torch.zeros(B, H, mq, mk, dtype=torch.bool, device=dev).scatter_(-1, idx, valid)
    pooled = torch.where(cand & ~selected, pooled, _NEG_INF)
    return MraSelection(b, idx, valid, lowres, pooled, bias, block_lse, count)


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
    m = torch.maximum(lse_hi, lse_lo).detach()       # the result does not depend on the shift
    m = m.masked_fill(m == _NEG_INF, 0.0)
    w_hi = torch.exp(lse_hi - m)
    w_lo = torch.exp(lse_lo - m)
    den = w_hi + w_lo
    return torch.addcmul(o_hi * w_hi, o_lo, w_lo) / den.masked_fill(den == 0, 1.0)


def mra_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                scale: float, is_causal: bool, params: MraParams) -> torch.Tensor:
    """MRA-2 / MRA-2-s on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv].

    Block-batched: the selected key blocks of each query block are gathered (``index_select``)
    into [.., Mq, r*b, D] and scored with one batched matmul; the low-resolution branch is
    [Mq, Mk] per head. No N x N tensor. Groups of (batch, kv-head) slices run one after another
    only to keep temporaries small.
    """
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = _check_heads(q, k)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    sel = mra_select(q, k, attn_mask, scale, is_causal, params)
    b = sel.block
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)
    nqp, nkp = mq * b, mk * b
    r = sel.block_idx.shape[-1]
    BH = B * Hk

    lse_lo = o_lo = None
    if params.variant == "mra2":
        p_lo, lse_lo = softmax_and_lse(sel.pooled_logits)                   # [B, H, Mq, Mk]
        vhat = mra_pool(v.to(cdt), key_weights(sel), b, H)                  # [B, H, Mk, Dv]
        o_lo = p_lo @ vhat                                                  # [B, H, Mq, Dv]
    if mra_cpu.usable(q, k, v, is_causal) is None:
        lowres = None if o_lo is None else (o_lo, lse_lo)
        return mra_cpu.high_res_cpu(q, k, v, sel, scale, is_causal, lowres, cdt).to(q.dtype)
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

    # per-slot key bias [BH, G, Mq, 1, r*b]: the mask's bias of the gathered keys, added as is
    # (small: N*r per head)
    slot_bias = None
    if sel.key_bias is not None:
        kb = _per_head(sel.key_bias, H).expand(B, H, nkp).reshape(B, H, mk, b)
        bb = torch.arange(B, device=dev).view(B, 1, 1, 1)
        hh = torch.arange(H, device=dev).view(1, H, 1, 1)
        slot_bias = kb[bb, hh, sel.block_idx].reshape(BH, G, mq, 1, r * b)
    # slots that hold no key (block padding past Nk, unused slots) are hard-masked by masked_fill:
    # adding -inf to their zero keys would give NaN for a query holding +-inf (0 * inf)
    slot_void = None
    if unused or nkp > Nk:
        void = (sel.block_idx == mk - 1).unsqueeze(-1) & (torch.arange(b, device=dev) >= Nk - (mk - 1) * b)
        if unused:
            void = void | ~sel.block_valid.unsqueeze(-1)
        slot_void = void.reshape(BH, G, mq, 1, r * b)
    diag = None
    if is_causal:
        # the diagonal block is always slot 0 when selected: mask keys after the query there
        iq = torch.arange(mq, device=dev)
        on_diag = (sel.block_idx[..., 0] == iq) & sel.block_valid[..., 0]    # [B, H, Mq]
        upper = torch.ones(b, b, dtype=torch.bool, device=dev).triu(1)
        diag = (on_diag.reshape(BH, G, mq, 1, 1) & upper)                   # [BH, G, Mq, b, b]


    # work is independent per (kv head, query block): chunks of about CHUNK_ELEMS elements in the
    # largest temporary (the gathered keys) keep every temporary small and allocator-friendly
    per_qblock = G * r * b * max(b, D, Dv)
    heads_per = max(1, CHUNK_ELEMS // max(1, per_qblock * mq))
    qblocks_per = mq if heads_per > 1 else max(1, min(mq, CHUNK_ELEMS // max(1, per_qblock)))
    chunks = [(a0, min(a0 + heads_per, BH), i0, min(i0 + qblocks_per, mq))
              for a0 in range(0, BH, heads_per) for i0 in range(0, mq, qblocks_per)]
    z = None
    qs = kf = vf = None
    for a0, a1, i0, i1 in chunks:
        n, nb = a1 - a0, i1 - i0
        if i0 == 0:  # new head group: scale / pad / cast its q, k, v once
            qs = _pad_rows(q4[a0:a1].to(cdt) * scale, nqp).view(n, G, mq, b, D)
            kf = _pad_rows(k3[a0:a1].to(cdt), blocks_per_head * b).view(n * blocks_per_head, b * D)
            vf = _pad_rows(v3[a0:a1].to(cdt), blocks_per_head * b).view(n * blocks_per_head, b * Dv)
        head_base = (torch.arange(n, device=dev) * blocks_per_head).view(n, 1, 1, 1)
        flat = (idx[a0:a1, :, i0:i1] + head_base).reshape(-1)
        k_sel = kf.index_select(0, flat).view(n, G, nb, r * b, D)
        v_sel = vf.index_select(0, flat).view(n, G, nb, r * b, Dv)
        s = qs[:, :, i0:i1] @ k_sel.transpose(-1, -2)                     # [n, G, nb, b, r*b]
        if slot_bias is not None:
            s.add_(slot_bias[a0:a1, :, i0:i1])
        if slot_void is not None:
            s.masked_fill_(slot_void[a0:a1, :, i0:i1], _NEG_INF)
        if diag is not None:
            s[..., :b].masked_fill_(diag[a0:a1, :, i0:i1], _NEG_INF)
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


def mra_flops(site: SiteShape, params: MraParams) -> Dim:
    """FLOPs: 2*B*H*[Nq*r*b*(d+dv) + Mq*Mk*d (+ Mq*Mk*dv for mra2) + pooling (Nq*d + Nk*(d+dv))]."""
    nq, nk, d, dv = site.q_len, site.kv_len, site.head_dim, site.v_head_dim
    b = params.block_size
    mq, mk = ceil_div(nq, b), ceil_div(nk, b)
    r = sym_min(params.blocks_per_row, mk)
    macs = nq * r * b * (d + dv) + mq * mk * d + nq * d + nk * (d + dv)
    if params.variant == "mra2":
        macs = macs + mq * mk * dv
    return 2 * site.batch * site.num_heads * macs


class MraMethod(Method):
    """MRA-2: exact attention in the top-scoring blocks, pooled blocks elsewhere."""

    name = "mra"
    Params = MraParams
    description = "MRA-2 multi-resolution attention (Zeng et al. 2022)"

    def validate(self, params: MraParams, *, where: str) -> None:
        self.require_at_least(params, where=where, block_size=1, blocks_per_row=1, sink_blocks=0)
        if params.variant not in VARIANTS:
            raise ValueError(f"{where}.variant must be one of {list(VARIANTS)}; got {params.variant!r}")

    def supports(self, site: SiteShape, params: MraParams) -> Optional[str]:
        if site.general_mask:
            return ("mra supports key-padding and causal masks only, not a general [Q, K] mask; "
                    "use 'topk' for general masks")
        return None

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return mra_forward(q, k, v, attn_mask, scale, is_causal, params)

    def flops(self, site: SiteShape, params: MraParams) -> Dim:
        return mra_flops(site, params)
