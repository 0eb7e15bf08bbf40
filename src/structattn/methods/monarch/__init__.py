"""MonarchAttention (Yaras et al. 2025): softmax attention projected onto Monarch matrices.

Keys and queries are cut into M blocks; the attention matrix is restricted to
``A[(l,j),(k,i)] = L_j[k,l] R_k[j,i]`` and ``<A, S + bias> + H(A)`` is maximised by exact
alternating (R, L) steps starting from ``L = I``. Cost O(N^1.5 d) at ``b = sqrt(N)``; exact at
``block_size = 1`` and ``block_size >= Nk``. No causal form; key-padding masks only; of the score modifications a
constant scale and key-only biases (ALiBi included), taken in the R-step like key padding
(``common.fold_key_bias``). Math,
limits and decisions: docs/methods/monarch.md. Paths: ``torch.py`` (CPU, autograd),
``triton.py`` (CUDA), ``naive.py`` (float64 loops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import NO_MODS, Method, SiteShape
from ..common import (Dim, ceil_div, ceil_sqrt, compute_dtype, fold_key_bias, is_symbolic, key_bias_terms_reason,
                      same_size, sym_min)

__all__ = ["MonarchParams", "MonarchMethod", "monarch_blocks", "monarch_flops", "monarch_forward"]


@dataclass(frozen=True)
class MonarchParams:
    """``block_size``: keys per block (None = ceil(sqrt(Nk))); ``num_steps``: (R, L) step pairs."""

    block_size: Optional[int] = None
    num_steps: int = 1


def monarch_blocks(nq: Dim, nk: Dim, block_size: Optional[int]) -> tuple[Dim, Dim, Dim]:
    """``(M, bq, bk)``: number of blocks, query and key block sizes, for ints or sympy sizes.

    ``bk = min(block_size or ceil(sqrt(Nk)), Nk)`` (at least 1), ``M = ceil(Nk / bk)``; self
    attention uses ``bq = bk``, cross attention the same M query blocks of ``bq = ceil(Nq / M)``.
    Every path (torch, Triton, the FLOP model) uses this one formula.
    """
    bk = sym_min(block_size if block_size is not None else ceil_sqrt(nk), nk)
    if not is_symbolic(bk):
        bk = max(1, int(bk))
    m = ceil_div(nk, bk)
    bq = bk if same_size(nq, nk) else ceil_div(nq, m)
    return m, bq, bk


def monarch_flops(site: SiteShape, params: MonarchParams) -> Dim:
    """FLOPs (2 x MACs) of ``monarch_forward``: per head Nq'[(T-1)2(bk+M)d + 2 bk d + bk dv + M d + M dv]."""
    d, dv, T = site.head_dim, site.v_head_dim, params.num_steps
    m, bq, bk = monarch_blocks(site.q_len, site.kv_len, params.block_size)
    macs = m * bq * ((T - 1) * 2 * (bk + m) * d + 2 * bk * d + bk * dv + m * d + m * dv)
    return 2 * site.batch * site.num_heads * macs


def _pow2_between(lo: float, hi: float) -> list[int]:
    out, p = [], 1
    while p <= hi:
        if p >= lo:
            out.append(p)
        p *= 2
    return out


class MonarchMethod(Method):
    """MonarchAttention: alternating exact (R, L) steps of entropy-regularised softmax on Monarch matrices."""

    name = "monarch"
    Params = MonarchParams
    description = "MonarchAttention (Yaras et al. 2025): softmax projected onto Monarch matrices"
    kernel_module = f"{__name__}.triton"

    def validate(self, params: MonarchParams, *, where: str) -> None:
        if params.block_size is not None and params.block_size < 1:
            raise ValueError(
                f"{where}.block_size must be None (about sqrt(N)) or an int >= 1; got {params.block_size!r}"
            )
        self.require_at_least(params, where=where, num_steps=1)

    def supports(self, site: SiteShape, params: MonarchParams) -> Optional[str]:
        if site.causal:
            return "monarch has no causal form (is_causal / causal mask); use 'mra' or 'topk' for causal attention"
        if site.general_mask:
            return "monarch supports only key-padding masks, not a general [Q, K] mask; use 'topk' for general masks"
        return key_bias_terms_reason("monarch", site.terms)

    def forward(self, q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS):
        if is_causal:
            raise ValueError("monarch attention has no causal form; use method 'mra', 'topk' or 'exact'")
        attn_mask, scale = fold_key_bias(q, k, attn_mask, scale, mods, compute_dtype(q.dtype), "monarch")
        return monarch_forward(q, k, v, attn_mask, scale, params)

    def flops(self, site: SiteShape, params: MonarchParams) -> Dim:
        return monarch_flops(site, params)

    def candidates(self, shape: SiteShape) -> list[dict]:
        """Block sizes b a power of two in [N/32, N/4] (and >= 2) plus ceil(sqrt(N)); steps T in
        1..2 (T = 3 was never on a measured Pareto front)."""
        n = int(shape.kv_len)
        blocks = sorted(set(_pow2_between(max(2, n / 32), n / 4)) | ({ceil_sqrt(n)} if n >= 4 else set()))
        return [{"block_size": b, "num_steps": t} for t in (1, 2) for b in blocks if 2 <= b < n]


from .torch import monarch_forward  # noqa: E402  (the torch path imports the block formula above)
