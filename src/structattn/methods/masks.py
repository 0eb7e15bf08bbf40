"""Mask helpers shared by the methods: SDPA mask semantics in one place.

An ``attn_mask`` follows ``F.scaled_dot_product_attention``: a bool tensor (True = keep, False a
hard mask) or an additive float tensor, broadcastable to ``[B, H, Nq, Nk]``. Float values are
biases added to the scores as they are (a row whose keys all carry -1e4 or ``finfo.min`` is an
ordinary softmax row); only -inf is a hard mask. ``is_causal`` is SDPA's top-left aligned causal
mask (query i sees keys j <= i). A query row with no finite logit gets output 0.
"""
from __future__ import annotations

from typing import Optional

import torch

#: No method uses this: an additive value is a bias applied as is, and only -inf is a hard mask.
#: ``calibrate`` uses it as a heuristic to spot padded query positions when it weights errors.
MASKED_BELOW = -1e4


def as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    """``attn_mask`` viewed as 4-D ``[B|1, H|1, Nq|1, Nk|1]`` by prepending size-1 dims (SDPA's
    broadcasting), e.g. ``[Nk]`` -> ``[1, 1, 1, Nk]``. A view, never a copy.

    Raises ValueError for a mask with more than 4 dims (it cannot broadcast to [B, H, Nq, Nk]).
    """
    if attn_mask.dim() > 4:
        raise ValueError(
            f"attn_mask must have at most 4 dims (broadcastable to [B, H, Nq, Nk]); got shape "
            f"{tuple(attn_mask.shape)}"
        )
    return attn_mask[(None,) * (4 - attn_mask.dim())]


def as_additive(attn_mask: Optional[torch.Tensor], dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Return the mask as an additive float tensor (0 keep, -inf drop), or None."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.tensor(float("-inf"), dtype=dtype, device=attn_mask.device))
    return attn_mask.to(dtype)


def causal_keep(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Bool [Nq, Nk] keep mask of SDPA's ``is_causal`` (top-left aligned)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def combined_additive(
    attn_mask: Optional[torch.Tensor], is_causal: bool, nq: int, nk: int, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """One additive mask holding both ``attn_mask`` and ``is_causal``, or None if neither."""
    add = as_additive(attn_mask, dtype)
    if is_causal:
        causal = as_additive(causal_keep(nq, nk, device), dtype)
        add = causal if add is None else add + causal
    return add


def is_key_padding(attn_mask: Optional[torch.Tensor]) -> bool:
    """True when the mask does not vary along queries (it has no query axis, or one of size 1)."""
    return attn_mask is None or attn_mask.dim() < 2 or attn_mask.shape[-2] == 1


def key_bias(attn_mask: Optional[torch.Tensor], batch: int, heads: int, nk: int, what: str) -> Optional[torch.Tensor]:
    """A key-padding mask as an additive float32 bias of shape [B, H, Nk] (0 / -inf for bools).

    Raises ValueError (naming ``what``) when the mask varies along the query axis.
    """
    if attn_mask is None:
        return None
    if not is_key_padding(attn_mask):
        raise ValueError(
            f"{what} supports only key-padding masks (broadcastable to [B, H, 1, Nk]); got a mask of "
            f"shape {tuple(attn_mask.shape)} that varies along queries. Use method 'topk' or 'exact' "
            f"for general masks."
        )
    m = as_4d(attn_mask)[..., 0, :].expand(batch, heads, nk)
    return as_additive(m, torch.float32)


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads [B, Hk, N, D] to [B, H, N, D] (GQA: head h uses h // (H/Hk))."""
    hk = t.shape[1]
    if hk == heads:
        return t
    if heads % hk:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({hk})")
    return t.repeat_interleave(heads // hk, dim=1)
