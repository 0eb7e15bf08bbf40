"""Routing attention's Triton forward vs the plain-torch reference under TRITON_INTERPRET=1
(tiny shapes; bf16 is not run by the interpreter)."""
import pytest
import torch

import structattn.functional as SF
from structattn.lowering.ops import get_kernel
from structattn.methods.exact.naive import dense_attention
from structattn.methods.routing import RoutingParams, make_plan
from structattn.methods.routing import triton as K
from structattn.methods.routing.torch import attend

from testlib import check_close, make_qkv, poisoned, rel_err


def qkv(B, H, Hk, nq, nk, D, Dv, dtype, *, transposed=False, seed=0):
    return make_qkv(B, H, Hk, nq, nk, D, Dv, dtype, seed=seed, transposed=transposed)


def _ref(q, k, v, mask, scale, causal, p):
    """The torch path in float64 on the plan the kernel computes (the same inputs give the same plan)."""
    plan = make_plan(q, k, mask, scale, causal, p.clusters, p.window, p.routes, p.iterations, p.sink_tokens)
    return attend(q.double(), k.double(), v.double(), mask, scale, causal, plan, p.local_window, p.sink_tokens, p.pooled)


@pytest.mark.parametrize(
    "nq,nk,causal,mask,dtype,pooled,local,sink",
    [
        (37, 37, False, None, torch.float32, True, 3, 1),       # GQA, Dv != D, pooled
        (37, 37, True, "bool", torch.float32, True, 4, 2),      # causal + key padding + sinks
        (20, 33, False, "float", torch.float16, False, 0, 1),   # cross attention, per-head biases, fp16
        (40, 40, True, None, torch.float16, False, 5, 0),       # causal, no sink
    ],
)
def test_matches_reference_and_writes_every_row(nq, nk, causal, mask, dtype, pooled, local, sink):
    q, k, v = qkv(1, 4, 2, nq, nk, 16, 32, dtype, seed=nq + nk)
    if mask == "bool":
        mask = torch.rand(1, 1, 1, nk, generator=torch.Generator().manual_seed(1)) > 0.3
    elif mask == "float":
        g = torch.Generator().manual_seed(2)
        mask = torch.randn(1, 4, 1, nk, generator=g).masked_fill(torch.rand(1, 4, 1, nk, generator=g) < 0.2,
                                                                  float("-inf"))
    p = RoutingParams(clusters=4, window=6, routes=2, local_window=local, sink_tokens=sink, pooled=pooled)
    out = K.forward(q, k, v, mask, 0.3, causal, p, out=poisoned(1, 4, nq, 32, dtype), scratch_fill=float("nan"))
    check_close(out, _ref(q, k, v, mask, 0.3, causal, p), dtype)


def test_exact_limit_with_causal_and_bias():
    """One block holding every key is exact attention, also with is_causal and a soft key bias."""
    q, k, v = qkv(1, 2, 1, 40, 40, 16, 16, torch.float32, transposed=True, seed=3)
    mask = torch.randn(1, 2, 1, 40)
    out = K.forward(q, k, v, mask, 0.3, True, RoutingParams(window=64, local_window=3))
    assert rel_err(out, dense_attention(q, k, v, mask, 0.3, True)) < 2e-5


def test_fully_masked_rows_give_zero():
    q, k, v = qkv(2, 2, 2, 24, 24, 16, 16, torch.float32, seed=4)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1] = False
    out = K.forward(q, k, v, mask, 0.3, False, RoutingParams(window=6, routes=2, local_window=3),
                    out=poisoned(2, 2, 24, 16, torch.float32))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_supports_refusals():
    q, k, v = qkv(1, 2, 2, 16, 16, 16, 16, torch.float32)
    p = RoutingParams()
    assert "key-padding" in K.supports(q, k, v, torch.rand(16, 16) > 0.5, False, p)
    assert "float64" in K.supports(q.double(), k.double(), v.double(), None, False, p)
    assert "local_window" in K.supports(q, k, v, None, True, RoutingParams(local_window=0, sink_tokens=0))
    assert K.supports(q, k, v, None, True, p) is None


def test_functional_triton_matches_torch():
    q, k, v = qkv(1, 2, 2, 40, 40, 16, 16, torch.float32, seed=5)
    mask = torch.rand(1, 1, 1, 40, generator=torch.Generator().manual_seed(6)) > 0.2
    kw = dict(window=8, routes=2, local_window=4)
    a = SF.routing_attention(q, k, v, mask, impl="triton", **kw)
    b = SF.routing_attention(q, k, v, mask, impl="torch", **kw)
    assert rel_err(a, b) < 2e-5
    assert get_kernel("routing", q, k, v, mask, False, RoutingParams(), strict=False) is K.forward
