"""Monarch Triton kernel vs the plain-torch reference (and a float64 oracle) under TRITON_INTERPRET=1."""
import pytest
import torch

from structattn.methods.exact.naive import dense_attention
from structattn.methods.monarch import MonarchParams
from structattn.methods.monarch import naive
from structattn.methods.monarch import triton as K

from testlib import TOL, check_close, make_qkv, poisoned, rel_err, torch_path_f64


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(K, "POISON_SCRATCH", True)


@pytest.mark.parametrize(
    "nq,nk,H,Hk,steps,mask,dtype",
    [
        (37, 37, 4, 2, 1, None, torch.float32),      # N not a multiple of b (b=7), GQA
        (37, 37, 2, 1, 2, "bool", torch.float32),     # T = 2 with key padding
        (29, 45, 2, 2, 1, "float", torch.float16),    # cross attention, additive mask, fp16
        (40, 40, 2, 1, 3, "bool", torch.float16),     # T = 3, fp16
    ],
)
def test_matches_reference(nq, nk, H, Hk, steps, mask, dtype, poison):
    q, k, v = make_qkv(1, H, Hk, nq, nk, 16, 32, dtype)
    if mask == "bool":
        mask = torch.rand(1, 1, 1, nk) > 0.3
    elif mask == "float":
        mask = torch.randn(1, H, 1, nk)
    p = MonarchParams(block_size=None, num_steps=steps)
    out = K.forward(q, k, v, mask, 0.3, False, p, out=poisoned(1, H, nq, 32, dtype))
    check_close(out, torch_path_f64("monarch", q, k, v, mask, 0.3, False, p), dtype)


def test_hf_transposed_views_and_oracle(poison):
    """Non-contiguous [B, N, H, D] -> [B, H, N, D] views are read through strides."""
    q, k, v = make_qkv(2, 2, 2, 30, 30, 16, 16, torch.float32, transposed=True)
    assert not q.is_contiguous()
    p = MonarchParams(block_size=4, num_steps=2)
    out = K.forward(q, k, v, None, 0.25, False, p)
    check_close(out, naive.forward(q, k, v, None, 0.25, False, p), torch.float32)


def test_fully_masked_block_and_row(poison):
    """A key block whose keys are all masked gets no weight (no NaN); all keys masked gives 0."""
    N, b = 36, 6
    q, k, v = make_qkv(2, 2, 2, N, N, 16, 16, torch.float32)
    mask = torch.ones(2, 1, 1, N, dtype=torch.bool)
    mask[0, ..., b:2 * b] = False        # batch 0: block 1 entirely masked
    mask[1] = False                      # batch 1: every key masked
    p = MonarchParams(block_size=b, num_steps=2)
    out = K.forward(q, k, v, mask, 0.25, False, p)
    assert not torch.isnan(out).any()
    assert out[1].abs().max() == 0
    check_close(out[:1], torch_path_f64("monarch", q, k, v, mask, 0.25, False, p)[:1], torch.float32)


@pytest.mark.parametrize("block_size", [1, 50])
def test_exact_limits(block_size):
    """b = 1 and b = N are exact softmax attention."""
    q, k, v = make_qkv(1, 2, 2, 23, 23, 16, 16, torch.float32)
    out = K.forward(q, k, v, None, 0.3, False, MonarchParams(block_size=block_size))
    assert rel_err(out, dense_attention(q, k, v, None, 0.3)) < TOL[torch.float32]
