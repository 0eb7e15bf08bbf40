"""MRA-2 multi-resolution attention (Zeng et al. 2022), written from DESIGN.md section 6 / METHODS.md.

Queries and keys are cut into blocks of ``b`` (padded separately: Nq -> Mq*b, Nk -> Mk*b). Each
block is pooled (mean over its valid tokens); the low-resolution scores
``Lhat = s * qhat khat^T`` pick, per query block, the ``r = min(blocks_per_row, #candidates)``
key blocks with the largest score. Selected blocks get exact scores (with every mask); in variant
``"mra2"`` each unselected candidate block contributes one pooled key with logit
``Lhat_ij + log(count_j)`` and value ``vhat_j`` shared by the queries of block i; ``"mra2s"`` keeps
only the selected blocks. The two partial softmaxes are merged by log-sum-exp. With every key
block selected the result is exact softmax attention.

Decisions and deviations (the Triton kernel implements the same; keep them in sync):

1. The budget is per query-block row, computed from the actual Nk (the paper uses a global
   per-head budget from the config's maximum length).
2. Candidates are key blocks with at least one valid key (``count_j > 0``); a key counts as valid
   when its additive bias is above ``masks.MASKED_BELOW`` (-1e4), so HF's ``finfo.min`` masks
   behave like bool masks for pooling and selection. Causal (top-left, as SDPA): candidates are
   ``j <= i`` and the diagonal block ``i`` is always selected when it is a candidate (it counts
   toward r). Fewer candidates than r leave slots unused (``MraSelection.block_valid``).
3. A finite key bias (e.g. a soft float key-padding mask) also enters the low resolution: the
   pooled logit of block j adds the mean bias of its valid keys (0 for bool / 0-or-min masks), so
   ``Lhat`` stays "the exponential of the average logit". Selected blocks use the bias exactly.
4. General masks (varying along queries) are refused by ``supports``; ``forward`` accepts a mask
   with a query axis whose rows are all equal and raises ValueError otherwise.
5. A query with no valid key (all masked) gets output 0, like torch 2.13's SDPA.
6. ``block_size`` larger than both lengths is clamped to ``max(Nq, Nk)`` (same result, less padding).
7. fp16 / bf16 inputs are computed in fp32; float64 stays float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .base import Dim, Method, SiteShape
from .masks import MASKED_BELOW
from .monarch import (MASK_VALUE, _check_heads, _pad_rows, ceil_div, compute_dtype, finite_bias,
                      key_padding_bias, softmax_and_lse, sym_min)

__all__ = ["MraParams", "MraMethod", "MraSelection", "mra_select", "mra_pool", "mra_forward", "mra_flops", "VARIANTS"]

VARIANTS = ("mra2", "mra2s")

#: target size (elements) of the largest temporary of one chunk of (kv heads, query blocks)
CHUNK_ELEMS = 1 << 21


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
    lowres: [B, H, Mq, Mk] low-resolution logits ``s * qhat khat^T + mean valid key bias`` for
        candidate blocks, -inf for non-candidates (differentiable in q and k).
    pooled_logits: [B, H, Mq, Mk] the "mra2" low-resolution branch: ``lowres + log(count)`` for
        unselected candidates, -inf for selected blocks and non-candidates.
    key_bias: additive key bias [Bm, Hm, Mk*b] (Bm in {1,B}, Hm in {1,H}; padded keys -inf), or
        None when there is neither a mask nor padding.
    key_keep: float 0/1 weights of valid keys, [Bm, Hm, Mk*b] (1 x 1 x Mk*b without a mask).
    count: [Bm, Hm, Mk] number of valid keys per key block (float).
    """

    block: int
    block_idx: torch.Tensor
    block_valid: torch.Tensor
    lowres: torch.Tensor
    pooled_logits: torch.Tensor
    key_bias: Optional[torch.Tensor]
    key_keep: torch.Tensor
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


def mra_pool(x: torch.Tensor, keep: torch.Tensor, count: torch.Tensor, block: int, heads: int) -> torch.Tensor:
    """Masked block means of keys/values ``x`` [B, Hk, Nk, E] with 0/1 weights ``keep`` [Bm, Hm, >= Nk].

    Returns [B, heads, ceil(Nk/b), E] (empty blocks give 0). ``count`` [Bm, Hm, Mk] is the block
    sum of ``keep``. ``x`` is not padded (the last block may be partial).
    """
    B, Hk, n, E = x.shape
    G = heads // Hk
    bm, hm = keep.shape[0], keep.shape[1]
    keep = keep[..., :n]
    w = keep.reshape(bm, Hk, G, n) if hm == heads else keep.reshape(bm, 1, 1, n)
    s = _block_sums(x.unsqueeze(2), block, w)                        # [B, Hk, G|1, Mk, E]
    mk = s.shape[-2]
    c = count.reshape(bm, Hk, G, mk, 1) if hm == heads else count.reshape(bm, 1, 1, mk, 1)
    s = s / c.clamp_min(1)
    return s.expand(B, Hk, G, mk, E).reshape(B, heads, mk, E)


def mra_select(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
               is_causal: bool, params: MraParams) -> MraSelection:
    """Low-resolution scores and per-query-block key-block selection of MRA-2.

    q [B, H, Nq, D], k [B, Hk, Nk, D] (Hk divides H), ``attn_mask`` key padding (bool keep or
    additive float, broadcastable to [B, H, 1, Nk]; a query axis with equal rows is accepted),
    ``is_causal`` SDPA's top-left causal flag. Computation in fp32 (float64 for float64 inputs).
    The selection itself (``torch.topk`` on detached scores) is not differentiable; ``lowres`` and
    ``pooled_logits`` are. See ``MraSelection`` for the outputs and the module docstring for the
    rules (candidates, causal diagonal, mean key bias).
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = _check_heads(q, k)
    cdt = compute_dtype(q.dtype)
    b = _block(params, Nq, Nk)
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)
    nkp = mk * b
    dev = q.device

    bias = key_padding_bias(attn_mask, Nk, nkp, cdt, dev, "mra attention")
    if bias is None:
        keep = torch.ones(1, 1, nkp, dtype=cdt, device=dev)
        mean_bias = None
    else:
        keep_b = bias > MASKED_BELOW
        keep = keep_b.to(cdt)
    count = keep.reshape(keep.shape[0], keep.shape[1], mk, b).sum(-1)  # [Bm, Hm, Mk]
    if bias is not None:
        fin = torch.where(keep_b, bias, torch.zeros_like(bias))
        mean_bias = fin.reshape(fin.shape[0], fin.shape[1], mk, b).sum(-1) / count.clamp_min(1)
        if not bool(mean_bias.any()):
            mean_bias = None

    qcount = (Nq - torch.arange(mq, device=dev) * b).clamp(max=b).to(cdt)  # valid queries per block
    qhat = _block_sums(q.to(cdt), b) / qcount.unsqueeze(-1)              # [B, H, Mq, D]
    khat = mra_pool(k.to(cdt), keep, count, b, H)                         # [B, H, Mk, D]
    lowres = (qhat @ khat.transpose(-1, -2)) * scale                      # [B, H, Mq, Mk]
    if mean_bias is not None:
        lowres = lowres + _per_head(mean_bias, H).unsqueeze(-2)

    cand = (count > 0).unsqueeze(-2)                                      # [Bm, Hm, 1, Mk]
    cand = _per_head(cand, H).expand(B, H, mq, mk)
    iq = torch.arange(mq, device=dev).unsqueeze(-1)
    jk = torch.arange(mk, device=dev)
    if is_causal:
        cand = cand & (jk <= iq)
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=dev)
    lowres = torch.where(cand, lowres, neg_inf)
    score = lowres.detach()
    if params.sink_blocks:
        # below +inf so the causal diagonal stays slot 0
        big = torch.tensor(torch.finfo(cdt).max, dtype=cdt, device=dev)
        score = torch.where(cand & (jk < params.sink_blocks), big, score)
    if is_causal:
        score = torch.where(cand & (jk == iq), torch.tensor(float("inf"), dtype=cdt, device=dev), score)
    r = min(params.blocks_per_row, mk)
    top, idx = torch.topk(score, r, dim=-1)
    valid = top > float("-inf")
    selected = torch.zeros(B, H, mq, mk, dtype=torch.bool, device=dev).scatter_(-1, idx, valid)
    logcount = _per_head(count.clamp_min(1).log(), H).unsqueeze(-2)
    pooled = torch.where(cand & ~selected, lowres + logcount, neg_inf)
    return MraSelection(b, idx, valid, lowres, pooled, bias, keep, count)


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Broadcast [Bm, Hm, ...] (Hm in {1, heads}) to have ``heads`` on dim 1 (a view)."""
    if t.shape[1] == heads:
        return t
    return t.expand(t.shape[0], heads, *t.shape[2:])


def mra_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                scale: float, is_causal: bool, params: MraParams) -> torch.Tensor:
    """MRA-2 / MRA-2-s on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv].

    Block-batched: the selected key blocks of each query block are gathered (``index_select``)
    into [.., Mq, r*b, D] and scored with one batched matmul; the low-resolution branch is
    [Mq, Mk] per head. No N x N tensor. Groups of (batch, kv-head) slices run one after another
    only to keep temporaries small.
    """
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    cdt = compute_dtype(q.dtype)
    dev = q.device
    sel = mra_select(q, k, attn_mask, scale, is_causal, params)
    b = sel.block
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)
    nqp, nkp = mq * b, mk * b
    r = sel.block_idx.shape[-1]
    BH = B * Hk

    q4 = q.reshape(BH, G, Nq, D)                # padding, scaling and casts happen per group
    k3 = k.reshape(BH, Nk, D)
    v3 = v.reshape(BH, Nk, Dv)
    idx = sel.block_idx.reshape(BH, G, mq, r)

    # per-slot key bias [BH, G, Mq, r*b]: the mask's bias of the gathered keys, MASK_VALUE for
    # padded keys and unused slots (small: N*r per head)
    slot_bias = None
    if sel.key_bias is not None:
        kb = finite_bias(_per_head(sel.key_bias, H)).expand(B, H, nkp).reshape(B, H, mk, b)
        bb = torch.arange(B, device=dev).view(B, 1, 1, 1)
        hh = torch.arange(H, device=dev).view(1, H, 1, 1)
        slot_bias = kb[bb, hh, sel.block_idx]                              # [B, H, Mq, r, b]
    if not bool(sel.block_valid.all()):
        # unused slots get MASK_VALUE; used slots keep their bias (positive biases included)
        valid = sel.block_valid.unsqueeze(-1)
        if slot_bias is None:
            slot_bias = torch.where(valid, 0.0, MASK_VALUE).to(cdt)
        else:
            slot_bias = torch.where(valid, slot_bias, torch.tensor(MASK_VALUE, dtype=cdt, device=dev))
    if slot_bias is not None:
        slot_bias = slot_bias.expand(B, H, mq, r, b).reshape(BH, G, mq, 1, r * b)
    diag = None
    if is_causal:
        # the diagonal block is always slot 0 when selected: mask keys after the query there
        iq = torch.arange(mq, device=dev)
        on_diag = (sel.block_idx[..., 0] == iq) & sel.block_valid[..., 0]    # [B, H, Mq]
        upper = torch.ones(b, b, dtype=torch.bool, device=dev).triu(1)
        diag = (on_diag.reshape(BH, G, mq, 1, 1) & upper)                   # [BH, G, Mq, b, b]

    lse_lo = o_lo = None
    if params.variant == "mra2":
        lo = sel.pooled_logits.clamp_min(MASK_VALUE)                         # [B, H, Mq, Mk]
        lse_lo = torch.logsumexp(lo, dim=-1).reshape(BH, G, mq, 1, 1)
        vhat = mra_pool(v.to(cdt), sel.key_keep, sel.count, b, H)        # [B, H, Mk, Dv]
        o_lo = (torch.softmax(lo, dim=-1) @ vhat).reshape(BH, G, mq, 1, Dv)

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
            kf = _pad_rows(k3[a0:a1].to(cdt), nkp).view(n * mk, b * D)
            vf = _pad_rows(v3[a0:a1].to(cdt), nkp).view(n * mk, b * Dv)
        flat = (idx[a0:a1, :, i0:i1] + (torch.arange(n, device=dev) * mk).view(n, 1, 1, 1)).reshape(-1)
        k_sel = kf.index_select(0, flat).view(n, G, nb, r * b, D)
        v_sel = vf.index_select(0, flat).view(n, G, nb, r * b, Dv)
        s = qs[:, :, i0:i1] @ k_sel.transpose(-1, -2)                     # [n, G, nb, b, r*b]
        if slot_bias is not None:
            s.add_(slot_bias[a0:a1, :, i0:i1])
        if diag is not None:
            s[..., :b].masked_fill_(diag[a0:a1, :, i0:i1], MASK_VALUE)
        p, lse_hi = softmax_and_lse(s)
        lse_hi = lse_hi.unsqueeze(-1)                                     # [n, G, nb, b, 1]
        o = p @ v_sel                                                     # [n, G, nb, b, Dv]
        # A row that saw no unmasked key at all (every logit at MASK_VALUE) gets 0: SDPA's fully
        # masked row, and MRA-2-s's 0/0. Weights are per row ([.., b, 1]), so this is cheap.
        if lse_lo is not None:
            # log-sum-exp merge of the exact (selected) and pooled partial softmaxes
            ll = lse_lo[a0:a1, :, i0:i1]
            lse = torch.logaddexp(lse_hi, ll)
            alive = lse > MASK_VALUE / 2
            w_hi = torch.where(alive, torch.exp(lse_hi - lse), 0.0)
            w_lo = torch.where(alive, torch.exp(ll - lse), 0.0)
            o = torch.addcmul(o * w_hi, o_lo[a0:a1, :, i0:i1], w_lo)
        else:
            alive = lse_hi > MASK_VALUE / 2
            if not bool(alive.all()):
                o = o * alive
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
