"""Eager's answer for query rows whose every key is masked ("dead rows").

The op computes with hard masks (``is_causal``, bool keep masks, ``-inf``), as SDPA does: a dead
row gets 0. Eager code that masks with a finite fill (``finfo.min``, ``-1e9``, ``-1e4``) gives those
rows something else: ``softmax`` of equal fills is the uniform average of v, and fills added to
the scores leave a plain softmax over the keys with the largest fill. Every other row is the same
under both conventions (a finite fill far below the live scores gets weight exp(-1e4) = 0).

The pass describes what eager does to masked entries as a small program (``passes.masks``):
``scope:op:fill`` items joined by ';', in eager's order. Scope ``c`` = causally masked entries
(key after query, top-left), ``m`` = entries the op's ``attn_mask`` masks (bool False, or an
additive value <= -1e4), ``cm`` = either, ``all`` = every entry; op ``set`` writes ``fill``,
``add`` adds it, ``bias`` adds the op's additive mask. ``apply_dead_rows`` finds the dead rows and
recomputes exactly those with the program, starting from the scores ``scale * q k^T``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..methods.common import FILL_MASKED_AT, as_4d
#: most score entries materialised at once while recomputing dead rows
_CHUNK_ELEMS = 1 << 22


def parse_program(program: str) -> list[tuple[str, str, float]]:
    """``"cm:add:-3.4e38;all:bias:0"`` -> ``[("cm", "add", -3.4e38), ("all", "bias", 0.0)]``.

    Raises ValueError naming the bad item; the scopes are c | m | cm | all and the ops set | add | bias.
    """
    steps = []
    for item in filter(None, program.split(";")):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ("c", "m", "cm", "all") or parts[1] not in ("set", "add", "bias"):
            raise ValueError(f"dead_rows program item {item!r} is not scope:op:fill with scope in c|m|cm|all "
                             f"and op in set|add|bias")
        steps.append((parts[0], parts[1], float(parts[2])))
    return steps


def _masked(attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool [.., Q|1, K] (4-D, broadcast dims kept at 1): True where the op's mask masks the entry."""
    if attn_mask is None:
        return None
    m = as_4d(attn_mask)
    return ~m if m.dtype == torch.bool else m <= FILL_MASKED_AT


def dead_row_mask(q_len: int, k_len: int, attn_mask: Optional[torch.Tensor], is_causal: bool,
                  batch: int, heads: int) -> Optional[torch.Tensor]:
    """Bool [B, H, Q]: rows whose every key is masked by ``is_causal`` or ``attn_mask``; None if none."""
    masked = _masked(attn_mask)
    if masked is None:
        return None
    live = ~masked
    if is_causal:
        if live.shape[-2] == 1:
            # key padding: row i is dead iff none of keys 0..min(i, K-1) is live
            seen = live.cumsum(-1) > 0                                        # [.., 1, K]
            idx = torch.arange(q_len, device=live.device).clamp(max=max(k_len - 1, 0))
            alive = seen[..., 0, :].index_select(-1, idx) if k_len else torch.zeros(
                *seen.shape[:-2], q_len, dtype=torch.bool, device=live.device)
        else:
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=live.device).tril()
            alive = (live & causal).any(-1)
    else:
        alive = live.any(-1)
    dead = ~alive.expand(batch, heads, q_len)
    return dead if bool(dead.any()) else None


def apply_dead_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor], scale: float, is_causal: bool, program: str) -> torch.Tensor:
    """``out`` with its dead rows recomputed by ``program`` (unchanged when the program is empty or
    no row is dead). q [B,H,Q,D], k [B,Hk,K,D], v [B,Hk,K,Dv], out [B,H,Q,Dv]."""
    if not program or out.numel() == 0:
        return out
    steps = parse_program(program)
    B, H, Q, _ = q.shape
    K = k.shape[-2]
    dead = dead_row_mask(Q, K, attn_mask, is_causal, B, H)
    if dead is None:
        return out
    b, h, i = dead.nonzero(as_tuple=True)
    group = H // k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    masked = _masked(attn_mask)
    bias = None if attn_mask is None or attn_mask.dtype == torch.bool else as_4d(attn_mask)
    rows = []
    per = max(1, _CHUNK_ELEMS // max(1, K))
    keys = torch.arange(K, device=q.device)
    for lo in range(0, b.numel(), per):
        bb, hh, ii = b[lo:lo + per], h[lo:lo + per], i[lo:lo + per]
        kk = k[bb, hh // group].to(cdt)                                          # [n, K, D]
        s = torch.einsum("nd,nkd->nk", q[bb, hh, ii].to(cdt), kk) * scale
        scopes = {"all": torch.ones_like(s, dtype=torch.bool)}
        scopes["c"] = (keys.unsqueeze(0) > ii.unsqueeze(1)) if is_causal else torch.zeros_like(scopes["all"])
        scopes["m"] = _rows(masked, bb, hh, ii) if masked is not None else torch.zeros_like(scopes["all"])
        scopes["cm"] = scopes["c"] | scopes["m"]
        for scope, op, fill in steps:
            where = scopes[scope]
            if op == "set":
                s = torch.where(where, torch.tensor(fill, dtype=cdt, device=s.device), s)
            elif op == "add":
                s = torch.where(where, s + fill, s)
            elif bias is not None:
                s = s + _rows(bias, bb, hh, ii).to(cdt)
        top = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)
        rows.append(torch.einsum("nk,nkd->nd", p, v[bb, hh // group].to(cdt)))
    return out.index_put((b, h, i), torch.cat(rows).to(out.dtype))


def _rows(t: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Rows [n, K] of a broadcastable [B|1, H|1, Q|1, K] tensor at (b, h, i)."""
    bi = b if t.shape[0] > 1 else torch.zeros_like(b)
    hi = h if t.shape[1] > 1 else torch.zeros_like(h)
    qi = i if t.shape[2] > 1 else torch.zeros_like(i)
    return t[bi, hi, qi]
