"""Exact softmax attention: the baseline every approximation is measured against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Method
from .masks import as_4d, as_additive, causal_keep


@dataclass(frozen=True)
class ExactParams:
    """Exact attention has no parameters."""


class ExactMethod(Method):
    """``F.scaled_dot_product_attention`` with GQA and causal+mask combined."""

    name = "exact"
    Params = ExactParams
    description = "exact softmax attention (SDPA)"

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return sdpa(q, k, v, attn_mask, scale, is_causal)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
         scale: float, is_causal: bool) -> torch.Tensor:
    """SDPA that also accepts ``attn_mask`` together with ``is_causal``, grouped k/v heads and a
    mask of fewer than 4 dims (``[Nk]`` included, which SDPA itself rejects)."""
    if attn_mask is not None:
        attn_mask = as_4d(attn_mask)
    if is_causal and attn_mask is not None:
        keep = causal_keep(q.shape[-2], k.shape[-2], q.device)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.to(q.dtype) + as_additive(keep, q.dtype)
        is_causal = False
    elif attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )
