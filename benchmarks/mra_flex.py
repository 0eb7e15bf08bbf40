"""MRA-2 with FlexAttention for the selected blocks: the alternative to the own Triton kernel,
measured by benchmarks/gpu.py (benchmarks/RESULTS.md; the own kernel was faster, so the library
uses it). ``BlockMask.from_kv_blocks`` with the selected blocks as *full* blocks (no mask_mod),
torch for the pooled branch and the log-sum-exp merge; no mask, no causal flag, block-aligned N.
FlexAttention needs ``kernel_options={"BLOCK_M": 32, "BLOCK_N": 32}`` for 32-wide blocks.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from structattn.methods.common import softmax_and_lse  # noqa: E402
from structattn.methods.mra import triton as KR  # noqa: E402
from structattn.methods.mra.torch import merge_partial  # noqa: E402

_FLEX = {}


def flex_supports(q, k, attn_mask, is_causal, params) -> Optional[str]:
    """Why the FlexAttention variant cannot take these inputs, or None."""
    if attn_mask is not None or is_causal:
        return "the FlexAttention path takes no mask and no causal flag (full blocks only)"
    if q.shape[2] % params.block_size or k.shape[2] % params.block_size:
        return "the FlexAttention path needs sequence lengths that are multiples of the block size"
    return None


def forward_flex(q, k, v, attn_mask, scale, is_causal, params, *, selection=None, compiled=True,
                 kernel_options=None):
    """MRA-2 with FlexAttention for the selected blocks (full blocks, no mask_mod) + torch for the rest."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    reason = flex_supports(q, k, attn_mask, is_causal, params)
    if reason:
        raise ValueError(reason)
    B, H, NQ, D = q.shape
    Hk, NK, Dv = k.shape[1], k.shape[2], v.shape[-1]
    sel = selection if selection is not None else KR.select_blocks(q, k, attn_mask, scale, is_causal, params)
    bs = sel.block
    MQ, MK = NQ // bs, NK // bs
    full_num = sel.block_valid.sum(-1).to(torch.int32)
    # from_kv_blocks reads the number of kv blocks off the indices' last dim: pad the r slots to MK
    full_idx = torch.zeros(B, H, MQ, MK, dtype=torch.int32, device=q.device)
    full_idx[..., : sel.block_idx.shape[-1]] = sel.block_idx.to(torch.int32)
    zeros_num = torch.zeros_like(full_num)
    zeros_idx = torch.zeros_like(full_idx)
    bm = BlockMask.from_kv_blocks(zeros_num, zeros_idx, full_num, full_idx, BLOCK_SIZE=bs, seq_lengths=(NQ, NK))
    if compiled:
        fn = _FLEX.get("fn")
        if fn is None:
            fn = _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    else:
        fn = flex_attention
    kw = {"kernel_options": kernel_options} if kernel_options else {}
    o_hi, lse_hi = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=H != Hk, return_lse=True, **kw)
    if params.variant == "mra2s":
        return o_hi
    # pooled branch per query block, then the log-sum-exp merge (natural-log lse)
    vhat = KR.pool_v(v, sel, H, MK).view(B, H, MK, Dv)
    merge = _FLEX.get("merge") if compiled else None
    if merge is None:
        merge = torch.compile(_flex_merge, dynamic=False) if compiled else _flex_merge
        if compiled:
            _FLEX["merge"] = merge
    return merge(o_hi, lse_hi, sel.pooled_logits, vhat, bs)


def _flex_merge(o_hi, lse_hi, pooled, vhat, bs: int):
    B, H, NQ, Dv = o_hi.shape
    MQ = NQ // bs
    p_lo, lse_lo = softmax_and_lse(pooled.float())                      # [B, H, MQ, MK], [B, H, MQ]
    o_lo = (p_lo @ vhat)[:, :, :, None, :]
    out = merge_partial(o_hi.view(B, H, MQ, bs, Dv).float(), lse_hi.float().view(B, H, MQ, bs, 1),
                        o_lo, lse_lo[..., None, None])
    return out.reshape(B, H, NQ, Dv).to(o_hi.dtype)
