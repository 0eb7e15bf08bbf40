"""Exact attention forward in Triton, for sites with score modifications (flash attention with the
site's generated ``score_mod``).

Each program owns BM query rows of one (batch, query head) and streams over the key tiles it can
see, keeping a running row max, row sum and P V accumulator in fp32 (an online softmax): no
N x N matrix is held. Per key tile the logits are the scaled scores, then the site's generated
``score_mod`` (``scoremod.triton_gen``: a ``tl.constexpr`` function with its captured tensors'
pointers, strides and sizes; query head ``h``, batch ``b``, index vectors ``q`` / ``k``), then the
mask: bool (True = keep) or additive, any broadcast of [B, H, Nq, Nk] read through strides;
SDPA's top-left ``is_causal`` and the sliding window (``WL`` / ``WR``, -1 unbounded) are hard
masks, and key tiles wholly outside them are skipped (a window of width w costs O(N w)). Grouped
k/v heads are read as kv head ``h // G``; head dims up to 256 are padded to a power of two. A row
with no visible key gives 0 (SDPA's fully masked row); the output has q's dtype.

The kernel is top-k's (``topk/triton.py: _topk_kernel``) compiled without its selection pass
(``SELECT=False``): the same streaming loop, so both methods share one score tile, one mask and one
window code path; exact only chooses its own tiles (head dims up to 256).

Without modifications SDPA serves exact sites (its fused kernels are faster than this one), so
``supports`` refuses them; ``forward`` itself takes them (the identity score_mod).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..base import NO_MODS
from ..common import interpreting
from ..topk.triton import stream
from ..triton_common import empty_output, input_reason, mods_reason, next_pow2

#: largest head dim (q/k and v) the kernel takes
MAX_HEAD_DIM = 256


def supports(q, k, v, attn_mask, is_causal, params, mods=NO_MODS) -> Optional[str]:
    """Run-time check on concrete inputs (reached through the kernel dispatch): why the kernel does
    not take them, or None. Sites without score modifications are refused: SDPA serves them."""
    if mods.empty:
        return "no score modifications: SDPA serves this site"
    return input_reason(q, v, head_dim_limit=MAX_HEAD_DIM) or mods_reason(q, mods)


def tiles(dp: int, dvp: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BM, BN): query rows and keys per tile for padded head dims ``dp`` / ``dvp``."""
    if interpreting():
        return 16, 16
    widest = max(dp, dvp)
    if widest > 128:
        return 64, 32
    if widest > 64 and dtype == torch.float32:
        return 64, 64
    return 128, 64


def forward(q, k, v, attn_mask, scale, is_causal, params=None, out=None, mods=NO_MODS):
    """Exact attention (see the module docstring) on q [B,H,Nq,D], k/v [B,Hk,Nk,*] with the score
    modifications ``mods``; writes ``out`` when given."""
    done = empty_output(q, k, v, out)
    if done is not None:
        return done
    NK, D, Dv = k.shape[2], q.shape[-1], v.shape[-1]
    BM, BN = tiles(next_pow2(D), next_pow2(Dv), q.dtype)
    return stream(q, k, v, attn_mask, scale, is_causal, out, mods, ksel=NK, select=False, KP=2, BM=BM, BN=BN, SEL=0)
