"""The public functional API of the three approximations: signatures, defaults, errors, autograd."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import structattn
from structattn import functional as SF
from structattn.methods import REGISTRY
from structattn.methods.exact.naive import dense_attention

from testlib import TOL, key_padding, make_qkv, rel_err


def test_registry_and_ops():
    for name in ("exact", "monarch", "mra", "topk"):
        assert name in REGISTRY
        assert hasattr(torch.ops.structattn, f"{name}_attention")


def test_signatures_follow_design():
    sig = inspect.signature(SF.monarch_attention)
    assert list(sig.parameters)[:5] == ["q", "k", "v", "attn_mask", "scale"]
    assert sig.parameters["block_size"].default is None and sig.parameters["num_steps"].default == 1
    assert sig.parameters["block_size"].kind is inspect.Parameter.KEYWORD_ONLY
    sig = inspect.signature(SF.mra_attention)
    assert list(sig.parameters)[:6] == ["q", "k", "v", "attn_mask", "scale", "is_causal"]
    assert (sig.parameters["block_size"].default, sig.parameters["blocks_per_row"].default,
            sig.parameters["variant"].default, sig.parameters["sink_blocks"].default) == (32, 4, "mra2", 0)
    sig = inspect.signature(SF.topk_attention)
    assert list(sig.parameters)[:6] == ["q", "k", "v", "attn_mask", "scale", "is_causal"]
    assert sig.parameters["chunk_size"].default == 1024


CALLS = {
    "monarch": lambda *qkv, **kw: SF.monarch_attention(*qkv, **kw),
    "mra": lambda *qkv, **kw: SF.mra_attention(*qkv, **kw),
    "topk": lambda *qkv, **kw: SF.topk_attention(*qkv, **kw),   # the budget ``k`` is a keyword
}
EXACT_PARAMS = {"monarch": {"block_size": 1}, "mra": {"block_size": 4, "blocks_per_row": 100},
                "topk": {"k": 10**6}}


@pytest.mark.parametrize("name", ["monarch", "mra", "topk"])
def test_default_scale_and_exact_limit_through_the_op(seed, name):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=18, D=9, Dv=5, seed=seed, dtype=torch.float32)
    am = key_padding(2, 18, seed)
    ref = dense_attention(q, k, v, am, 1 / math.sqrt(9))
    out = CALLS[name](q, k, v, attn_mask=am, **EXACT_PARAMS[name])
    assert out.shape == (2, 4, 18, 5) and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL[torch.float32]
    explicit = CALLS[name](q, k, v, attn_mask=am, scale=1 / math.sqrt(9), **EXACT_PARAMS[name])
    assert torch.equal(out, explicit)
    other = CALLS[name](q, k, v, attn_mask=am, scale=0.9, **EXACT_PARAMS[name])
    assert rel_err(other, dense_attention(q, k, v, am, 0.9)) < TOL[torch.float32]


@pytest.mark.parametrize("name", ["monarch", "mra", "topk"])
def test_default_params_run_and_are_finite(seed, name):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=70, D=8, seed=seed, dtype=torch.bfloat16)
    out = CALLS[name](q, k, v, attn_mask=key_padding(1, 70, seed, dead_batch=0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and out.abs().max() == 0
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=70, D=8, seed=seed, dtype=torch.float16)
    out = CALLS[name](q, k, v)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("call,key", [
    (lambda q: SF.monarch_attention(q, q, q, block_size=0), "block_size"),
    (lambda q: SF.monarch_attention(q, q, q, num_steps=0), "num_steps"),
    (lambda q: SF.monarch_attention(q, q, q, block_size=2.5), "block_size"),
    (lambda q: SF.mra_attention(q, q, q, block_size=0), "block_size"),
    (lambda q: SF.mra_attention(q, q, q, blocks_per_row=0), "blocks_per_row"),
    (lambda q: SF.mra_attention(q, q, q, variant="mra3"), "variant"),
    (lambda q: SF.mra_attention(q, q, q, sink_blocks=-1), "sink_blocks"),
    (lambda q: SF.topk_attention(q, q, q, k=0), ".k"),
    (lambda q: SF.topk_attention(q, q, q, chunk_size=0), "chunk_size"),
])
def test_bad_params_name_the_key(call, key):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        call(q)
    if key == "variant":
        assert "mra2" in str(info.value) and "mra2s" in str(info.value)


def test_unsupported_sites_raise_with_reason():
    q = torch.randn(1, 2, 8, 4)
    general = torch.rand(1, 2, 8, 8) > 0.5
    with pytest.raises(ValueError, match="general"):
        SF.monarch_attention(q, q, q, attn_mask=general)
    with pytest.raises(ValueError, match="general"):
        SF.mra_attention(q, q, q, attn_mask=general)
    assert SF.topk_attention(q, q, q, attn_mask=general, k=3).shape == (1, 2, 8, 4)
    assert SF.mra_attention(q, q, q, is_causal=True, block_size=2).shape == (1, 2, 8, 4)


@pytest.mark.parametrize("name,kw", [
    ("monarch", {"block_size": 2, "num_steps": 2}),
    ("monarch", {"block_size": 3, "num_steps": 1}),      # N = 7: padding
    ("mra", {"block_size": 2, "blocks_per_row": 2, "is_causal": True}),
    ("mra", {"block_size": 3, "blocks_per_row": 1, "variant": "mra2s"}),
    ("topk", {"k": 3, "chunk_size": 2, "is_causal": True}),
])
def test_gradcheck_float64(seed, name, kw):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=7, D=3, Dv=2, seed=seed)
    am = key_padding(1, 7, seed, p_keep=0.6)
    am[..., 3] = False
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    fn = lambda q_, k_, v_: CALLS[name](q_, k_, v_, attn_mask=am, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("name", ["monarch", "mra", "topk"])
def test_backward_finite_with_fully_masked_rows(seed, name):
    q, k, v = make_qkv(B=2, H=2, Hk=2, Nq=10, D=4, seed=seed, dtype=torch.float32)
    am = key_padding(2, 10, seed, dead_batch=1)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = CALLS[name](*leaves, attn_mask=am, **({"block_size": 3} if name != "topk" else {"k": 4}))
    out.square().sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
        assert t.grad[1].abs().max() == 0  # batch 1 sees no key: no gradient, like SDPA


def test_compiles_with_the_op(seed):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=16, D=4, seed=seed, dtype=torch.float32)

    def f(q, k, v):
        return SF.monarch_attention(q, k, v, block_size=4) + SF.mra_attention(q, k, v, block_size=4) \
            + SF.topk_attention(q, k, v, k=4)

    eager = f(q, k, v)
    compiled = torch.compile(f, backend="aot_eager")(q, k, v)  # fullgraph: see report (make_params)
    assert torch.allclose(eager, compiled, atol=1e-6)
    assert structattn.functional is SF


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name,kw,bound", [
    ("monarch", {}, lambda n: 2 * n * 32),                        # O(N^1.5): N*b with b = 32 here
    ("monarch", {"num_steps": 2}, lambda n: 2 * n * 32),
    ("mra", {}, lambda n: n * 4 * 32),                            # O(N * r * b)
    ("topk", {"k": 16, "chunk_size": 128}, lambda n: 128 * n),    # O(chunk * N)
])
def test_no_dense_n_by_n_intermediate(seed, name, kw, bound):
    """The fast formulations never build an N x N tensor (forward and backward)."""
    n = 1024
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=n, D=16, seed=seed, dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    method = REGISTRY[name]
    mode = _LargestTensor()
    with mode:  # the plain-torch forward and its autograd backward (what the op's backward runs)
        out = method.forward(*leaves, None, 0.25, False, method.make_params(kw))
        out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert mode.largest <= bound(n) < n * n, mode.largest


@pytest.mark.parametrize("name,kwargs", [("monarch_attention", {"num_steps": 2}), ("mra_attention", {"block_size": 4}),
                                         ("topk_attention", {"k": 4})])
def test_functional_compiles_without_graph_breaks(name, kwargs):
    import structattn.functional as SF

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    fn = getattr(SF, name)
    compiled = torch.compile(lambda q, k, v: fn(q, k, v, **kwargs), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v, **kwargs))
