"""Exact softmax attention: the baseline every approximation is measured against, and the
fallback of every site a method cannot serve (docs/methods/exact.md)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import Method
from .torch import sdpa

__all__ = ["ExactParams", "ExactMethod", "sdpa"]


@dataclass(frozen=True)
class ExactParams:
    """Exact attention has no parameters."""


class ExactMethod(Method):
    """``F.scaled_dot_product_attention`` with GQA and causal+mask combined. It has no Triton
    module: SDPA brings its own fused kernels on every device."""

    name = "exact"
    Params = ExactParams
    description = "exact softmax attention (SDPA)"

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return sdpa(q, k, v, attn_mask, scale, is_causal)
