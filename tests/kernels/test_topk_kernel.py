"""Top-k Triton kernel vs the plain-torch reference under TRITON_INTERPRET=1.

References run on the float64 upcast of the kernel's inputs: the kernel scores in fp32, so a
reference rounding its scores to fp16 could pick a different k-th key on a near-tie.
"""
import pytest
import torch

from structattn.methods.topk import TopkParams
from structattn.methods.topk import naive
from structattn.methods.topk import triton as K

from testlib import check_rows, make_qkv, poisoned, rel_err, torch_path_f64


@pytest.mark.parametrize(
    "nq,nk,kk,causal,mask,dtype",
    [
        (70, 70, 5, False, None, torch.float32),       # k not a power of two, 2 row tiles
        (50, 70, 16, True, "bool", torch.float32),     # causal + general bool mask, Nq != Nk
        (40, 40, 7, False, "float", torch.float16),    # additive [1, H, 1, Nk] mask, fp16
        (30, 30, 64, True, None, torch.float32),       # k >= Nk: exact, selection compiled out
    ],
)
def test_matches_reference(nq, nk, kk, causal, mask, dtype):
    q, k, v = make_qkv(1, 4, 2, nq, nk, 16, 32, dtype)
    if mask == "bool":
        mask = torch.rand(1, 1, nq, nk) > 0.3
    elif mask == "float":
        mask = torch.randn(1, 4, 1, nk)
    p = TopkParams(k=kk)
    out = K.forward(q, k, v, mask, 0.3, causal, p, out=poisoned(1, 4, nq, 32, dtype))
    check_rows(out, torch_path_f64("topk", q, k, v, mask, 0.3, causal, p), dtype)


def test_transposed_views_and_dead_rows():
    q, k, v = make_qkv(2, 2, 1, 33, 33, 16, 16, torch.float32, transposed=True)
    mask = torch.rand(2, 1, 33, 33) > 0.5
    mask[:, :, 3] = False  # query row 3 sees no key: output 0
    p = TopkParams(k=4)
    out = K.forward(q, k, v, mask, 0.25, False, p)
    assert out[:, :, 3].abs().max() == 0
    check_rows(out, naive.forward(q, k, v, mask, 0.25, False, p), torch.float32)
    ref = naive.forward(q, k, v, mask, 0.25, False, p)
    assert rel_err(torch_path_f64("topk", q, k, v, mask, 0.25, False, p), ref) < 1e-12


def test_k_above_the_register_limit_is_refused_only_when_it_selects():
    q, k, v = make_qkv(1, 2, 2, 8, 600, 16, 16, torch.float32)
    assert "in-register limit of 512" in K.supports(q, k, v, None, False, TopkParams(k=513))
    assert K.supports(q, k, v, None, False, TopkParams(k=600)) is None     # k >= Nk: exact, no selection
    assert K.supports(q, k, v, None, False, TopkParams(k=512)) is None
