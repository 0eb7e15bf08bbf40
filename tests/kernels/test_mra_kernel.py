"""MRA Triton kernel vs the plain-torch reference under TRITON_INTERPRET=1."""
import pytest
import torch

from structattn.methods.exact.naive import dense_attention
from structattn.methods.mra import MraParams
from structattn.methods.mra import triton as K

from testlib import TOL, check_close, make_qkv, poisoned, rel_err, torch_path_f64


@pytest.mark.parametrize(
    "nq,nk,b,r,variant,causal,mask,dtype,sink",
    [
        (70, 70, 16, 2, "mra2", False, None, torch.float32, 0),      # N % b != 0, GQA
        (70, 70, 8, 3, "mra2", True, "bool", torch.float32, 0),      # causal + key padding
        (40, 60, 10, 2, "mra2", False, "float", torch.float16, 0),   # cross, additive mask, fp16
        (70, 70, 16, 2, "mra2s", True, None, torch.float16, 0),      # sparse variant, causal
        (70, 70, 8, 3, "mra2", True, None, torch.float32, 1),        # causal with a sink block
    ],
)
def test_matches_reference(nq, nk, b, r, variant, causal, mask, dtype, sink):
    q, k, v = make_qkv(1, 4, 2, nq, nk, 16, 32, dtype)
    if mask == "bool":
        mask = torch.rand(1, 1, 1, nk) > 0.3
    elif mask == "float":
        mask = torch.randn(1, 4, 1, nk)
    p = MraParams(block_size=b, blocks_per_row=r, variant=variant, sink_blocks=sink)
    out = K.forward(q, k, v, mask, 0.3, causal, p, out=poisoned(1, 4, nq, 32, dtype))
    check_close(out, torch_path_f64("mra", q, k, v, mask, 0.3, causal, p), dtype)


def test_all_blocks_selected_is_exact_with_causal_and_bias():
    """Every block selected -> exact attention, also with is_causal and a soft key bias."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, 16, torch.float32, transposed=True)
    mask = torch.randn(1, 2, 1, 40)
    out = K.forward(q, k, v, mask, 0.3, True, MraParams(block_size=8, blocks_per_row=5))
    assert rel_err(out, dense_attention(q, k, v, mask, 0.3, True)) < TOL[torch.float32]


def test_fully_masked_rows_give_zero():
    q, k, v = make_qkv(2, 2, 2, 48, 48, 16, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 48, dtype=torch.bool)
    mask[1] = False
    mask[0, ..., 16:32] = False
    p = MraParams(block_size=16, blocks_per_row=1)
    out = K.forward(q, k, v, mask, 0.3, False, p)
    assert not torch.isnan(out).any() and out[1].abs().max() == 0
    check_close(out[:1], torch_path_f64("mra", q, k, v, mask, 0.3, False, p)[:1], torch.float32)
