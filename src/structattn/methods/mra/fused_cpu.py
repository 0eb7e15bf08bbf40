"""The fast CPU path of MRA-2's high-resolution branch (inference).

The reference (``torch.mra_forward``) scores the gathered key blocks with batched matmuls and an
explicit softmax: several passes over ``[.., b, r*b]`` score tensors. Here every (query head,
query block) gets its r selected key blocks gathered into one contiguous ``[r*b, D]`` slice and
PyTorch's fused CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``,
which returns the row log-sum-exp) attends over them: scores never reach memory. Then:

* causal: the first ``r`` query blocks have at most ``r`` candidate key blocks, all selected, so
  they are exact causal attention over the first ``r*b`` keys (one SDPA call); later blocks split
  into the diagonal block (a causal call) and the off-diagonal slots (a plain call);
* the pooled remainder (variant ``mra2``) and the high-resolution part are merged by log-sum-exp.

Temporaries are cut into chunks of about ``_CHUNK_BYTES`` and gathered into reused buffers: large
fresh allocations cost page faults on every call (measured: a 141 MB gather took 10x longer into
a fresh tensor than into a reused one). The flash kernel has no gradient for its log-sum-exp, so
this path serves calls without autograd; ``torch.mra_forward`` uses it only then (same results).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..common import MASKED, ceil_div

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
#: target size of the gathered keys (and values) of one chunk
_CHUNK_BYTES = 4 << 20


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
           attn_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when this path can serve the call, else why not. ``attn_mask``: the key bias, which
    needs the differentiable path when it records autograd (a score modification's tensors)."""
    if q.device.type != "cpu":
        return "not a CPU tensor"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, attn_mask)):
        return "autograd is recording (the fused kernel has no log-sum-exp gradient)"
    if is_causal and q.shape[-2] != k.shape[-2]:
        return "causal cross attention"
    if q.shape[-1] == 0:
        return "head_dim 0 (SDPA's infinite default scale)"
    if q.dtype == torch.float64:
        return "float64 (the reference path is the oracle there)"
    # one reduction per tensor: a sum is finite iff every element is (barring an overflow, which
    # only sends a finite call to the reference path)
    if not all(bool(torch.isfinite(t.sum())) for t in (q, k, v)):
        # masked slots are -inf biases here: a query holding inf would turn them into NaN
        return "non-finite inputs (the reference path poisons exactly what SDPA poisons)"
    return None


def _merge(parts: list) -> torch.Tensor:
    """Merge partial softmax results ``[(o [n, b, Dv] normalised, lse [n, b]), ...]`` into one
    output; rows with no finite logit in any part give 0."""
    if len(parts) == 1:
        o, lse = parts[0]
        return torch.where(torch.isfinite(lse).unsqueeze(-1), o, 0.0)
    lses = torch.stack([l for _, l in parts])                                # [P, n, b]
    total = torch.logsumexp(lses, 0)
    w = torch.exp(lses - total).nan_to_num_(0.0).unsqueeze(-1)               # dead rows: 0 weights
    out = parts[0][0] * w[0]
    for i in range(1, len(parts)):
        out.addcmul_(parts[i][0], w[i])
    return out


def high_res_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel, scale: float, is_causal: bool,
                 lowres: Optional[tuple], cdt: torch.dtype) -> torch.Tensor:
    """MRA output [B, H, Nq, Dv] (in ``cdt``) from the selection ``sel`` (a ``MraSelection``).

    ``lowres`` is ``(o_lo [B, H, Mq, Dv], lse_lo [B, H, Mq])`` of the pooled branch, or None
    (variant mra2s). Key biases (``sel.key_bias``, padding -inf) are applied exactly; unused slots
    are masked; a row that sees no key with a finite logit gets 0.
    """
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    b = sel.block
    mq, mk = ceil_div(Nq, b), ceil_div(Nk, b)

    # the fused kernel needs one head size for q, k and v: zero columns change no dot product
    E = max(D, Dv)
    qp = _pad(q.to(cdt), E - D, mq * b - Nq)
    kp = _pad(k.to(cdt), E - D, mk * b - Nk)
    vp = _pad(v.to(cdt), E - Dv, mk * b - Nk)
    if E != Dv:
        return high_res_cpu_padded(qp, kp, vp, sel, scale, is_causal, lowres, cdt, (B, H, Nq, Nk, Hk))[..., :Dv]
    return high_res_cpu_padded(qp, kp, vp, sel, scale, is_causal, lowres, cdt, (B, H, Nq, Nk, Hk))


def _pad(t: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    return F.pad(t, (0, cols, 0, rows)) if cols or rows else t


def high_res_cpu_padded(qp, kp, vp, sel, scale, is_causal, lowres, cdt, sizes) -> torch.Tensor:
    """``high_res_cpu`` on q/k/v already padded to whole blocks and one head size."""
    B, H, Nq, Nk, Hk = sizes
    D = Dv = qp.shape[-1]
    G = H // Hk
    b = sel.block
    mq, mk = qp.shape[-2] // b, kp.shape[-2] // b
    r = sel.block_idx.shape[-1]
    dev = qp.device
    if lowres is not None and lowres[0].shape[-1] != Dv:
        lowres = (F.pad(lowres[0], (0, Dv - lowres[0].shape[-1])), lowres[1])
    bias = None
    if sel.key_bias is not None:
        bias = sel.key_bias.to(cdt).expand(B, H, mk * b)                     # [B, H, Mk*b], -inf padding
    out = torch.empty(B, H, mq * b, Dv, dtype=cdt, device=dev)   # every row is written below
    first = 0
    if is_causal:
        # query blocks 0..r-1: every candidate selected -> exact causal attention over the prefix
        first = min(r, mq)
        n0 = first * b
        mask = None if bias is None else bias[:, :, None, :n0]
        o, _ = _FLASH(qp[:, :, :n0], _kv_heads(kp[:, :, :n0], G), _kv_heads(vp[:, :, :n0], G), 0.0, True,
                      attn_mask=mask, scale=scale)
        out[:, :, :n0] = _zero_dead(o, mask, True)
        if first == mq:
            return out[:, :, :Nq]

    # (batch, head, query block) triples from block ``first`` on, processed in chunks. Under
    # causality slot 0 holds the diagonal block (attended with a causal call of its own), except
    # for query blocks whose diagonal block is entirely masked: there all r slots are off-diagonal.
    m_rest = mq - first
    slots = sel.block_idx[:, :, first:].reshape(-1, r)                        # [T, r]
    valid = sel.block_valid[:, :, first:].reshape(-1, r)
    qblock = torch.arange(first, mq, device=dev).view(1, 1, m_rest)
    kv_base = (torch.arange(B, device=dev).view(B, 1) * Hk + torch.arange(H, device=dev).view(1, H) // G) * mk
    head_base = torch.arange(B * H, device=dev).view(B, H) * mk
    ctx = _Blocks(
        q=qp.view(B, H, mq, b, D)[:, :, first:].reshape(-1, 1, b, D),
        k=kp.reshape(B * Hk * mk, b * D), v=vp.reshape(B * Hk * mk, b * Dv),
        bias=None if bias is None else bias.reshape(B * H * mk, b),
        kv_base=kv_base.view(B, H, 1).expand(B, H, m_rest).reshape(-1),
        head_base=head_base.view(B, H, 1).expand(B, H, m_rest).reshape(-1),
        qblock=qblock.expand(B, H, m_rest).reshape(-1), b=b, scale=scale, cdt=cdt)
    lo_o = lo_l = None
    if lowres is not None:
        lo_o = lowres[0][:, :, first:].reshape(-1, Dv)
        lo_l = lowres[1][:, :, first:].reshape(-1)
    rest = torch.empty(slots.shape[0], b, Dv, dtype=cdt, device=dev)
    ctx.dest = rest
    if is_causal:
        on_diag = (slots[:, 0] == ctx.qblock) & valid[:, 0]
        if bool(on_diag.all()):
            groups = [(None, 1, True)]
        else:
            groups = [(on_diag.nonzero().flatten(), 1, True), ((~on_diag).nonzero().flatten(), 0, False)]
    else:
        groups = [(None, 0, False)]
    for rows, skip, diag in groups:
        if rows is not None and rows.numel() == 0:
            continue
        take = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        o = _attend(ctx, take, take(slots)[:, skip:], take(valid)[:, skip:], diag,
                    None if lo_o is None else (take(lo_o), take(lo_l)), into=rest if rows is None else None)
        if rows is not None:
            rest.index_copy_(0, rows, o)
    out.view(B, H, mq, b, Dv)[:, :, first:] = rest.view(B, H, m_rest, b, Dv)
    return out[:, :, :Nq]


class _Blocks:
    """What ``_attend`` reads: query blocks [T, 1, b, D], key/value blocks as rows [*, b*D], the
    per-head key bias as rows [*, b] (or None), and per triple t the base row of its kv head in
    ``k`` / of its head in ``bias`` and its query block index."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _attend(c: _Blocks, take, slots: torch.Tensor, valid: torch.Tensor, diag: bool,
            lowres: Optional[tuple], into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the triples ``take`` selects over their ``slots`` (and, with ``diag``, their
    causal diagonal block, attended as one more slot under a causal triangle), merged with
    ``lowres`` = (o_lo [T', Dv], lse_lo [T']). -> [T', b, Dv], written into ``into`` when given."""
    b, cdt = c.b, c.cdt
    q_blocks, kv_base, head_base, qblock = take(c.q), take(c.kv_base), take(c.head_base), take(c.qblock)
    if diag:   # the diagonal block goes last: one kernel call per chunk, its triangle in the mask
        slots = torch.cat([slots, qblock[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
    total, rr = slots.shape
    D, Dv = q_blocks.shape[-1], c.v.shape[-1] // b
    dev = q_blocks.device
    kv_idx = slots + kv_base[:, None]
    bias_idx = slots + head_base[:, None]
    keyed = c.bias is not None or not bool(valid.all())   # a per-key mask is needed
    tri = None
    if diag:
        tri = torch.zeros(b, rr * b, dtype=cdt, device=dev)
        tri[:, (rr - 1) * b:] = torch.full((b, b), MASKED, dtype=cdt, device=dev).triu(1)
        tri = tri.view(1, 1, b, rr * b)
    per = max(1, _CHUNK_BYTES // max(1, max(rr, 1) * b * max(D, Dv) * (torch.finfo(cdt).bits // 8)))
    kbuf = torch.empty(per * rr, b * D, dtype=cdt, device=dev)
    vbuf = torch.empty(per * rr, b * Dv, dtype=cdt, device=dev)
    dest = into if into is not None else torch.empty(total, b, Dv, dtype=cdt, device=dev)
    for lo in range(0, total, per):
        hi = min(lo + per, total)
        n = hi - lo
        qc = q_blocks[lo:hi]
        parts = []
        if rr:
            ks = torch.index_select(c.k, 0, kv_idx[lo:hi].reshape(-1), out=kbuf[: n * rr]).view(n, 1, rr * b, D)
            vs = torch.index_select(c.v, 0, kv_idx[lo:hi].reshape(-1), out=vbuf[: n * rr]).view(n, 1, rr * b, Dv)
            mask = tri
            if keyed:
                keys = torch.zeros(n, 1, 1, rr * b, dtype=cdt, device=dev) if c.bias is None else \
                    c.bias.index_select(0, bias_idx[lo:hi].reshape(-1)).view(n, 1, 1, rr * b)
                unused = (~valid[lo:hi]).repeat_interleave(b, dim=-1).view(n, 1, 1, rr * b)
                keys = keys.masked_fill(unused, MASKED)
                mask = keys if tri is None else keys + tri
            o, lse = _FLASH(qc, ks, vs, 0.0, False, attn_mask=mask, scale=c.scale)
            o, lse = o[:, 0], lse[:, 0]                                       # [n, b, Dv], [n, b]
            if keyed:   # the kernel reports lse 0 for a row that saw no key: make it -inf
                alive = (mask > MASKED).any(-1)[:, 0]                          # [n, 1 or b]
                lse = torch.where(alive, lse, MASKED)
            parts.append((o, lse))
        if lowres is not None:
            parts.append((lowres[0][lo:hi, None].expand(n, b, Dv), lowres[1][lo:hi, None].expand(n, b)))
        if not parts:
            parts = [(qc.new_zeros(n, b, Dv), qc.new_full((n, b), MASKED))]
        dest[lo:hi] = _merge(parts)
    return dest


def _kv_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _alive(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Rows that see at least one key with a finite bias: [.., 1 or b] from a key-only mask."""
    live = mask > MASKED                                               # [.., 1, K]
    if not causal:
        return live.any(-1)
    return live.cumsum(-1)[..., 0, :] > 0                                     # row t sees keys <= t


def _zero_dead(o: torch.Tensor, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
    if mask is None:
        return o
    alive = _alive(mask, causal)                                              # [B, H|1, n]
    return o * alive.unsqueeze(-1).to(o.dtype)
