"""Exact softmax attention: the baseline every approximation is measured against, and the
fallback of every site a method cannot serve (docs/methods/exact.md)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import NO_MODS, Method
from .torch import exact_forward, sdpa

__all__ = ["ExactParams", "ExactMethod", "exact_forward", "sdpa"]


@dataclass(frozen=True)
class ExactParams:
    """Exact attention has no parameters."""


class ExactMethod(Method):
    """``F.scaled_dot_product_attention`` with GQA and causal+mask combined, and every score
    modification applied exactly. Sites without modifications run SDPA on every device (its own
    fused kernels); sites with some run the Triton flash kernel ``exact/triton.py`` on CUDA, with
    the site's generated score_mod, and the chunked torch path on the CPU and in the backward."""

    name = "exact"
    Params = ExactParams
    description = "exact softmax attention (SDPA)"
    kernel_module = f"{__name__}.triton"

    def forward(self, q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS):
        return exact_forward(q, k, v, attn_mask, scale, is_causal, mods)
