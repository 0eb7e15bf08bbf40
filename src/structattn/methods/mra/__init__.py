"""MRA-2 multi-resolution attention (Zeng et al. 2022): exact scores in the key blocks that a
low-resolution (block-pooled) score ranks highest for each query block, pooled blocks elsewhere.

Queries and keys are cut into blocks of ``b``; each query block keeps the ``blocks_per_row``
best candidate key blocks exactly (the causal diagonal always), and in variant ``mra2`` every
other candidate block contributes one pooled key (its bias-softmax-weighted mean), merged by
log-sum-exp; ``mra2s`` keeps only the selected blocks. Exact when every key block is selected.
Key-padding and causal masks and every score modification: key-only biases (ALiBi included)
are taken like key padding (``common.fold_key_bias``); the rest of an expression (soft-capping,
relative and general biases, any chain) is exact in the selected blocks and evaluated at the
blocks' mean positions for pooled ones; a sliding window limits the candidate blocks. Cost
O(N r b d). Derivation, limits and decisions: docs/methods/mra.md. Paths: ``torch.py``
(selection and the differentiable path), ``scored.py`` (the differentiable path with score
modifications other than key-only ones), ``fused_cpu.py`` (CPU inference), ``triton.py`` (CUDA:
selection and forward kernels; key-only modifications), ``naive.py`` (float64 loops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import NO_MODS, Method, ScoreMods, SiteShape
from ..common import Dim, ceil_div, compute_dtype, fold_key_bias, key_bias_mods_reason, sym_min, with_key_bias

__all__ = ["MraParams", "MraMethod", "MraSelection", "VARIANTS", "CANDIDATE_FRACTIONS", "clamp_block",
           "mra_flops", "mra_forward", "mra_select"]

VARIANTS = ("mra2", "mra2s")
#: shares of the key blocks kept exactly (``blocks_per_row``) in calibration's candidate grid
CANDIDATE_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 7 / 16, 1 / 2, 5 / 8, 3 / 4)


@dataclass(frozen=True)
class MraParams:
    """``block_size`` b; ``blocks_per_row`` r (exact key blocks per query block); ``variant``;
    ``sink_blocks``: the first key blocks always selected (within the r), for causal LMs whose
    heads park mass on the first tokens ("attention sinks"), which mean pooling dilutes."""

    block_size: int = 32
    blocks_per_row: int = 4
    variant: str = "mra2"
    sink_blocks: int = 0


def clamp_block(params: MraParams, nq: int, nk: int) -> int:
    """The block size used: ``block_size`` clamped to ``max(Nq, Nk)`` (same result, less padding)."""
    return max(1, min(params.block_size, max(nq, nk)))


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
    kernel_module = f"{__name__}.triton"

    def validate(self, params: MraParams, *, where: str) -> None:
        self.require_at_least(params, where=where, block_size=1, blocks_per_row=1, sink_blocks=0)
        if params.variant not in VARIANTS:
            raise ValueError(f"{where}.variant must be one of {list(VARIANTS)}; got {params.variant!r}")

    def supports(self, site: SiteShape, params: MraParams) -> Optional[str]:
        if site.general_mask:
            return ("mra supports key-padding and causal masks only, not a general [Q, K] mask; "
                    "use 'topk' for general masks")
        return None   # every score term: scale, biases, soft-capping, chains, sliding windows

    def forward(self, q, k, v, attn_mask, scale, is_causal, params, mods=NO_MODS):
        """Key-only modifications (a constant factor on ``s`` plus a key bias) fold into the scale
        and the key-padding bias; any other keeps its key-only summands in the bias and goes to
        the torch path as an expression (``scored.py``)."""
        if key_bias_mods_reason("mra", mods) is None:
            attn_mask, scale = fold_key_bias(q, k, attn_mask, scale, mods, compute_dtype(q.dtype), "mra")
            return mra_forward(q, k, v, attn_mask, scale, is_causal, params)
        attn_mask, rest = split_mods(q, k, attn_mask, mods, compute_dtype(q.dtype))
        return mra_forward(q, k, v, attn_mask, scale, is_causal, params, rest)

    def flops(self, site: SiteShape, params: MraParams) -> Dim:
        return mra_flops(site, params)

    def candidates(self, shape: SiteShape) -> list[dict]:
        """Variant mra2 with blocks b in {8, 16} for N <= 512 and {16, 32} above (smaller blocks had
        lower error at equal FLOPs on every real layer we measured); ``blocks_per_row`` r giving
        about 1/32 .. 3/4 of the key blocks (r < number of key blocks); on causal sites also with
        ``sink_blocks=1`` (the first key block always exact: on SmolLM2 at 1K tokens, b=32 r=4 on
        all layers went from perplexity 63.8 to 34.2 with it, exact 30.2)."""
        n = int(shape.kv_len)
        out = []
        for b in ((8, 16) if n <= 512 else (16, 32)):
            mk = ceil_div(n, b)
            if mk < 2:
                continue
            rs = sorted({max(1, round(f * mk)) for f in CANDIDATE_FRACTIONS})
            sinks = (0, 1) if shape.causal and mk > 2 else (0,)
            out += [{"block_size": b, "blocks_per_row": r, "variant": "mra2", "sink_blocks": s}
                    for r in rs if r < mk for s in sinks if s < r]
        return out


def split_mods(q, k, attn_mask, mods: ScoreMods, dtype) -> tuple:
    """``(attn_mask, rest)``: the key-only summands of ``mods``' expression (per-row constants
    dropped) evaluated into the key-padding bias, and the ``ScoreMods`` of what remains (the
    window kept)."""
    from ...scoremod.analysis import split_key_bias

    split = split_key_bias(mods.text)
    attn_mask = with_key_bias(q, k, attn_mask, split.key_bias, mods.tensors, dtype, "mra")
    return attn_mask, ScoreMods(split.rest, mods.tensors, mods.window_left, mods.window_right)


from .torch import MraSelection, mra_forward, mra_select  # noqa: E402  (the torch path imports the above)
