"""Lifting through gathers and real reshapes: an integer index tensor among slices
(``table[index]``, ``table[:, index]``), reshapes that split and merge dims (``[N*N, H] ->
[N, N, H]``, ``[B, W, 1, N, N] -> [B*W, 1, N, N]``), ``masked_fill`` and ``!=``, and bools
cast to integers (they add as 0 / 1). Each lifted expression, evaluated with the captured
tensors' real values, equals the tensor the graph computes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from structattn.passes.lift import classify
from test_lift import _check, _qkv, lifted_and_real

N = 6


class FlatIndexTable(torch.nn.Module):
    """Swin's layout: a flat index buffer, the gather viewed back to [N, N, H]."""

    def __init__(self, heads=4):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn((2 * 2 - 1) * (2 * 3 - 1), heads))
        ch, cw = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
        coords = torch.stack([ch.flatten(), cw.flatten()])                # 2, N (a 2 x 3 window)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        self.register_buffer("index", ((rel[..., 0] + 1) * 5 + rel[..., 1] + 2).flatten())

    def forward(self, q, k, v):
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class TableAlongHeads(torch.nn.Module):
    """The index tensor in the second position: ``table[:, index]`` puts its dims there."""

    def __init__(self, heads=4):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(heads, 2 * N - 1))

    def forward(self, q, k, v):
        pos = torch.arange(N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.table[:, pos[None, :] - pos[:, None] + N - 1])


class ShiftedWindowMask(torch.nn.Module):
    """Swin's shifted-window mask in small: regions from positions, split into windows by a view,
    compared pairwise with ``!=``, filled with ``masked_fill``, and merged into the batch dim."""

    windows = 2

    def forward(self, q, k, v):
        pos = torch.arange(self.windows * N)
        region = ((pos >= 4).long() + (pos >= 9).long()).to(q.dtype).view(self.windows, N)
        diff = region[:, None, :] - region[:, :, None]                    # [W, Q, K]
        mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        batch = q.shape[0] // self.windows
        mask = mask.unsqueeze(1).unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(-1, 1, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class BoolCounts(torch.nn.Module):
    """``a.to(int64) + b.to(int64)`` counts (bools): 2 where both hold (a bool `or` would give 1)."""

    def forward(self, q, k, v):
        pos = torch.arange(N)
        count = (pos[None, :] >= 2).to(torch.int64) + (pos[:, None] >= pos[None, :]).to(torch.int64)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=count.to(q.dtype) * 0.5)


def test_flat_index_buffer_viewed_back_is_a_nested_gather():
    lf, real, captured = lifted_and_real(FlatIndexTable(), *_qkv())
    _check(lf, real, captured)
    assert lf.text() == "t0[t1[((q * 6) + k)], h]"
    assert classify(lf) == "general"


def test_index_tensor_in_second_position():
    lf, real, captured = lifted_and_real(TableAlongHeads(), *_qkv())
    _check(lf, real, captured)
    assert classify(lf) == "relative"
    assert len(captured) == 1   # the table only: the index is made of positions


def test_shifted_window_mask_splits_and_merges_dims():
    q, k, v = (x.repeat(4, 1, 1, 1) for x in _qkv())   # 2 images x 2 windows
    lf, real, captured = lifted_and_real(ShiftedWindowMask(), q, k, v)
    _check(lf, real, captured)
    assert captured == [] and "b % 2" in lf.text()   # the window is the batch index modulo 2
    assert bool((real == -100).any()) and bool((real == 0).any())


def test_bools_cast_to_long_add_as_integers():
    lf, real, captured = lifted_and_real(BoolCounts(), *_qkv())
    _check(lf, real, captured)
    assert bool((real == 1.0).any())   # both comparisons hold: 2 * 0.5
