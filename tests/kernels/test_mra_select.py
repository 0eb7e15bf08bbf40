"""MRA pooling + block selection in Triton vs the reference's ``mra_select`` (TRITON_INTERPRET=1)."""
import pytest
import torch

from structattn.methods.mra import MraParams, mra_select
from structattn.methods.mra import triton as K

from testlib import make_qkv


def _selected(sel):
    """Selected block ids per query block, -1 for unused slots, as sorted rows."""
    return torch.where(sel.block_valid, sel.block_idx, -1).sort(-1).values


@pytest.mark.parametrize(
    "B,H,Hk,nq,nk,b,r,causal,mask,sink",
    [
        (1, 2, 2, 70, 70, 8, 3, False, None, 0),      # padding in the last block
        (2, 4, 2, 64, 64, 8, 4, True, "bool", 0),     # GQA, causal + key padding
        (1, 2, 1, 50, 90, 16, 2, False, "float", 0),  # cross attention, additive bias, masked block
        (1, 1, 1, 33, 33, 8, 10, True, None, 0),      # budget above the number of blocks
        (1, 2, 1, 64, 64, 8, 3, True, None, 2),       # sink blocks after the causal diagonal
        (1, 2, 1, 50, 90, 16, 3, False, "float", 2),  # a sink block with no valid key is skipped
        (1, 2, 1, 50, 90, 16, 3, True, "large", 0),   # -1e4 / finfo.min biases are keys, -inf is not
    ],
)
def test_selection_matches_reference(B, H, Hk, nq, nk, b, r, causal, mask, sink):
    q, k, _ = make_qkv(B, H, Hk, nq, nk, 16, 16, torch.float32, transposed=True)
    if mask == "bool":
        mask = torch.ones(B, 1, 1, nk, dtype=torch.bool)
        mask[-1, ..., nk - 20:] = False
    elif mask == "float":
        mask = torch.randn(B, 1, 1, nk)
        mask[..., :b] = float("-inf")  # a fully masked key block: never a candidate
    elif mask == "large":
        low = torch.finfo(torch.float32).min
        mask = torch.randn(B, H, 1, nk)
        mask[:, 0, :, :b] = float("-inf")             # block 0: no candidate
        mask[:, 0, :, b:2 * b] = -1e4                 # block 1: a candidate ranked low
        mask[:, 0, :, 2 * b:3 * b:2] = low            # block 2: half its keys at finfo.min
        mask[:, 0, :, 3 * b:4 * b] = low              # block 3: every key at finfo.min
        mask[:, 1] -= 64.0                            # head 1: a shift shared by every key
    p = MraParams(block_size=b, blocks_per_row=r, sink_blocks=sink)
    got, ref = K.select(q, k, mask, 0.3, causal, p), mra_select(q, k, mask, 0.3, causal, p)
    assert torch.equal(_selected(got), _selected(ref))
    assert torch.equal(got.block_valid, ref.block_valid)
    assert torch.equal(got.pooled_logits.isinf(), ref.pooled_logits.isinf())
    finite = ~ref.pooled_logits.isinf()
    torch.testing.assert_close(got.pooled_logits[finite], ref.pooled_logits.float()[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.count, ref.count.expand_as(got.count))
    if ref.block_lse is not None:
        torch.testing.assert_close(got.block_lse, ref.block_lse.expand_as(got.block_lse), rtol=1e-6, atol=1e-5)
    if causal:  # the diagonal block comes first wherever it has a valid key
        diag = torch.arange(got.block_idx.shape[2]).view(1, 1, -1).expand_as(got.block_idx[..., 0])
        has_keys = got.count.gather(-1, diag) > 0
        assert torch.equal(got.block_idx[..., 0][has_keys], diag[has_keys])
