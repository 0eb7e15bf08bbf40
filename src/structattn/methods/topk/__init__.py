"""Top-k attention (Gupta et al. 2021): per query, softmax over its k largest scores only.

Scores stay dense (no FLOP saving: ``saves = "memory"``), but no N x N matrix is ever held: the
torch path scores ``chunk_size`` query rows at a time, the Triton kernel a tile at a time. Exact
for ``k >= Nk``; every mask kind (bool, additive, ``is_causal``, general [Q, K]). Decisions:
docs/methods/topk.md. Paths: ``torch.py`` (CPU, autograd), ``triton.py`` (CUDA), ``naive.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import Method, SiteShape
from ..common import Dim, sym_min

__all__ = ["TopkParams", "TopkMethod", "topk_flops", "topk_forward", "topk_pieces"]


@dataclass(frozen=True)
class TopkParams:
    """``k``: keys kept per query; ``chunk_size``: query rows scored at once (memory bound)."""

    k: int = 64
    chunk_size: int = 1024


def topk_flops(site: SiteShape, params: TopkParams) -> Dim:
    """FLOPs: 2*B*H*(Nq*Nk*d + Nq*min(k, Nk)*dv) (QK^T stays dense, PV only over the kept keys)."""
    kk = sym_min(params.k, site.kv_len)
    return 2 * site.batch * site.num_heads * (site.q_len * site.kv_len * site.head_dim
                                              + site.q_len * kk * site.v_head_dim)


class TopkMethod(Method):
    """Top-k attention: softmax over each query's k largest scores, chunked over queries."""

    name = "topk"
    Params = TopkParams
    saves = "memory"
    description = "top-k attention (Gupta et al. 2021), chunked over queries"
    kernel_module = f"{__name__}.triton"

    def validate(self, params: TopkParams, *, where: str) -> None:
        self.require_at_least(params, where=where, k=1, chunk_size=1)

    def supports(self, site: SiteShape, params: TopkParams) -> Optional[str]:
        return None

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return topk_forward(q, k, v, attn_mask, scale, is_causal, params)

    def flops(self, site: SiteShape, params: TopkParams) -> Dim:
        return topk_flops(site, params)

    def candidates(self, shape: SiteShape) -> list[dict]:
        """k in {N/32, N/16, N/8, N/4} (k >= 4, k < N)."""
        n = int(shape.kv_len)
        ks = sorted({n // d for d in (32, 16, 8, 4) if 4 <= n // d < n})
        return [{"k": k, "chunk_size": 1024} for k in ks]


from .torch import topk_forward, topk_pieces  # noqa: E402  (the torch path imports TopkParams above)
