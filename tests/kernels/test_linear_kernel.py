"""Linear-attention Triton kernels vs the float64 quadratic form under TRITON_INTERPRET=1.

Every buffer the kernels write is NaN-filled first (``_alloc`` replaced), so an element a kernel
forgets to write shows up as NaN in the output. bf16 is not tested here (the interpreter's bf16
dots are wrong, triton#11584)."""
import importlib
import os
import sys

import pytest
import torch

from structattn.methods.linear import LinearParams
from structattn.methods.linear.maps import FeatureMaps
from structattn.methods.linear.naive import linear_attention_naive

from testlib import make_qkv, rel_err


def qkv(B, H, Hk, nq, nk, D, Dv, dtype, seed=0):
    """Seeded random q, k, v in ``dtype``."""
    return make_qkv(B, H, Hk, nq, nk, D, Dv, dtype, seed=seed)


@pytest.fixture(scope="module")
def K():
    """The kernel module, (re)imported while TRITON_INTERPRET=1 (``@triton.jit`` decides at import)."""
    name = "structattn.methods.linear.triton"
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev
    return module


@pytest.fixture
def poison(K, monkeypatch):
    monkeypatch.setattr(K, "_alloc", lambda *shape, device: torch.full(shape, float("nan"), device=device))


def maps_for(kind, H, Hk, D, window, sinks, seed=0):
    maps = FeatureMaps.init(kind, H, Hk, D, local_window=window, sink_tokens=sinks, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    maps.gamma = torch.randn(H, generator=g)
    maps.key = [t + 0.2 * torch.randn(t.shape, generator=g) for t in maps.key]
    return maps


def params_of(maps, chunk=16):
    return LinearParams(feature_map=maps.kind, num_features=maps.num_features, local_window=maps.local_window,
                        sink_tokens=maps.sink_tokens, chunk_size=chunk)


@pytest.mark.parametrize(
    "kind,causal,window,sinks,nq,nk,mask,dtype",
    [
        ("hedgehog", False, 0, 0, 37, 37, None, torch.float32),       # one state per kv head, GQA
        ("hedgehog", True, 0, 0, 37, 37, "bool", torch.float32),      # chunked prefix sums + key padding
        ("gated", True, 5, 2, 37, 37, None, torch.float32),           # window + sinks, one normaliser
        ("mlp", False, 6, 1, 33, 33, "additive", torch.float32),      # non-causal window: both directions
        ("hedgehog", True, 4, 0, 20, 29, None, torch.float16),        # cross lengths, fp16 inputs
        ("hedgehog", False, 5, 0, 29, 20, "per_head", torch.float32),  # per-query-head bias: per-head states
    ],
)
def test_matches_quadratic_form(K, poison, kind, causal, window, sinks, nq, nk, mask, dtype):
    q, k, v = qkv(2, 4, 2, nq, nk, 16, 8, dtype)
    if mask == "bool":
        mask = torch.rand(2, 1, 1, nk) > 0.3
    elif mask == "additive":
        mask = torch.randn(2, 1, 1, nk)
        mask[0, ..., 3] = float("-inf")
    elif mask == "per_head":
        mask = torch.rand(2, 4, 1, nk) > 0.3
    maps = maps_for(kind, 4, 2, 16, window, sinks)
    out = K.forward(q, k, v, mask, 0.3, causal, params_of(maps), *maps.tensors())
    ref = linear_attention_naive(q, k, v, mask, 0.3, causal, maps)
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert rel_err(out, ref) < (3e-3 if dtype == torch.float16 else 2e-5)


def test_window_covering_every_key_is_exact(K, poison):
    q, k, v = qkv(1, 2, 1, 40, 40, 16, 16, torch.float32)
    mask = torch.randn(1, 1, 1, 40)
    maps = maps_for("gated", 2, 1, 16, 40, 0)
    out = K.forward(q, k, v, mask, 0.3, True, params_of(maps), *maps.tensors())
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=mask + torch.zeros(40, 40).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf")),
        scale=0.3)
    assert rel_err(out, ref) < 2e-5


def test_fully_masked_rows_give_zero(K, poison):
    q, k, v = qkv(2, 2, 2, 24, 24, 16, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1] = False
    maps = maps_for("hedgehog", 2, 2, 16, 3, 1)
    out = K.forward(q, k, v, mask, 0.3, False, params_of(maps), *maps.tensors())
    assert not torch.isnan(out).any() and out[1].abs().max() == 0
    assert rel_err(out[:1], linear_attention_naive(q, k, v, mask, 0.3, False, maps)[:1]) < 2e-5


def test_dispatch_through_the_op(K):
    """impl="triton" on CPU tensors runs these kernels under the interpreter (same result)."""
    import structattn

    q, k, v = qkv(1, 2, 1, 20, 20, 16, 16, torch.float32)
    maps = maps_for("hedgehog", 2, 1, 16, 4, 1)
    a = structattn.functional.linear_attention(q, k, v, is_causal=True, maps=maps, impl="triton", chunk_size=16)
    b = structattn.functional.linear_attention(q, k, v, is_causal=True, maps=maps, impl="torch", chunk_size=16)
    assert rel_err(a, b) < 2e-5


def test_supports_names_the_limit(K):
    q, k, v = qkv(1, 2, 1, 8, 8, 16, 16, torch.float32)
    p = LinearParams(feature_map="hedgehog", num_features=1024, local_window=0, sink_tokens=0)
    assert "num_features" in K.supports(q, k, v, None, False, p)
    general = torch.rand(1, 1, 8, 8) > 0.5
    assert "key-padding" in K.supports(q, k, v, general, False, params_of(maps_for("hedgehog", 2, 1, 16, 0, 0)))
