"""Numerics shared by every method, against SDPA (float64) as the reference:

* finite additive biases are biases (no "masked below" threshold), at each method's exact limits;
* a +-inf / NaN planted in one query, key or value row poisons what it poisons in SDPA, no more;
* empty tensors give SDPA's result (also through the op, its backward and torch.compile);
* masks of 1 to 4 dims are accepted wherever SDPA's broadcasting accepts them.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import structattn.functional as SF
from structattn.lowering.ops import run_method
from structattn.methods import get_method
from structattn.methods.base import empty_result
from structattn.methods.common import as_4d

from testlib import TOL, make_qkv, rel_err, sdpa_reference

INF, NAN = float("inf"), float("nan")

#: (method, params at an exact limit, supports is_causal)
EXACT_LIMITS = [
    ("exact", {}, True),
    ("monarch", {"block_size": 1}, False),
    ("monarch", {"block_size": 1, "num_steps": 2}, False),
    ("monarch", {"block_size": 10**6}, False),
    ("monarch", {"block_size": 10**6, "num_steps": 2}, False),
    ("mra", {"block_size": 4, "blocks_per_row": 10**3}, True),
    ("mra", {"block_size": 4, "blocks_per_row": 10**3, "variant": "mra2s"}, True),
    ("mra", {"block_size": 5, "blocks_per_row": 10**3, "sink_blocks": 1}, True),
    ("topk", {"k": 10**6}, True),
    ("topk", {"k": 10**6, "chunk_size": 3}, True),
]
LIMIT_IDS = [f"{m}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for m, p, _ in EXACT_LIMITS]


def _run(name, params, q, k, v, mask, scale, causal):
    method = get_method(name)
    return method.forward(q, k, v, mask, scale, causal, method.make_params(params))


# ----------------------------------------------------------------------------------------------
# finite biases are biases
# ----------------------------------------------------------------------------------------------
def _bias_masks(nk: int, dtype: torch.dtype, g: torch.Generator) -> dict:
    """Key-padding additive masks [1, 2, 1, Nk] that a threshold rule would get wrong."""
    low = torch.finfo(dtype).min
    mixed = torch.zeros(1, 2, 1, nk, dtype=dtype)
    mixed[..., ::3] = -1e4                                     # some keys -1e4, the rest 0
    mixed[:, 1] = -2e4                                         # head 1: every key -2e4
    signed = torch.randn(1, 2, 1, nk, generator=g, dtype=torch.float64).to(dtype) * 3
    signed[:, 0, :, 2:5] = -1e4                                # soft negative bias next to signed ones
    some_min = torch.zeros(1, 2, 1, nk, dtype=dtype)
    some_min[:, 0, :, 1::2] = low                              # finfo.min next to 0: weight ~0, not dropped
    some_min[:, 1, :, :] = low                                 # head 1: every key finfo.min -> mean of v
    return {
        "all_minus_1e4": torch.full((1, 2, 1, nk), -1e4, dtype=dtype),
        "all_minus_2e4": torch.full((1, 2, 1, nk), -2e4, dtype=dtype),
        "all_finfo_min": torch.full((1, 2, 1, nk), low, dtype=dtype),
        "mixed_1e4_2e4": mixed,
        "signed": signed,
        "positive": torch.full((1, 2, 1, nk), 50.0, dtype=dtype),
        "finfo_min_and_minus_inf": some_min.masked_fill(torch.arange(nk) == 0, -INF),
        "finfo_min_beside_zero": some_min,
    }


@pytest.mark.parametrize("name,params,causal_ok", EXACT_LIMITS, ids=LIMIT_IDS)
def test_finite_biases_at_exact_limits_match_sdpa(seed, name, params, causal_ok):
    """Rows whose keys all carry -1e4, -2e4 or finfo.min are ordinary softmax rows (shift invariance;
    s + finfo.min rounds to finfo.min, so that row is the mean of v), exactly as SDPA computes them."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=13, D=4, Dv=3, seed=seed)
    for (label, mask), causal in itertools.product(_bias_masks(13, torch.float64, g).items(), (False, True)):
        if causal and not causal_ok:
            continue
        ref = sdpa_reference(q, k, v, mask, 0.4, causal)
        out = _run(name, params, q, k, v, mask, 0.4, causal)
        assert torch.isfinite(out).all() and torch.isfinite(ref).all(), label
        assert rel_err(out, ref) < 1e-10, (label, causal)
    mean_v = v.mean(2, keepdim=True).expand(1, 2, 13, 3)
    low = _run(name, params, q, k, v, torch.full((1, 1, 1, 13), torch.finfo(torch.float64).min, dtype=torch.float64), 0.4,
               False)
    assert rel_err(low, mean_v) < 1e-12


@pytest.mark.parametrize("name,params,causal_ok", EXACT_LIMITS, ids=LIMIT_IDS)
def test_finfo_min_rows_in_float32_are_the_mean_of_v(seed, name, params, causal_ok):
    """HF's all-padding sample: fp32 inputs, keys all at float32's finfo.min -> uniform average."""
    q, k, v = make_qkv(B=2, H=2, Hk=2, Nq=9, D=4, seed=seed, dtype=torch.float32)
    mask = torch.zeros(2, 1, 1, 9)
    mask[1] = torch.finfo(torch.float32).min
    out = _run(name, params, q, k, v, mask, 0.5, False)
    ref = sdpa_reference(q, k, v, mask, 0.5, False)
    assert rel_err(out[1], v[1].mean(1, keepdim=True).expand(2, 9, 4)) < 1e-6
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("variant", ["mra2", "mra2s"])
@pytest.mark.parametrize("shift", [-1e4, -2e4, 37.0])
def test_mra_approximation_is_shift_invariant(seed, variant, shift):
    """Below the exact limit too: a bias shared by every key changes nothing (no key counts as
    masked because its bias is low), with and without is_causal."""
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=40, D=4, seed=seed, spread=2.0)
    p = get_method("mra").make_params({"block_size": 4, "blocks_per_row": 2, "variant": variant})
    for causal in (False, True):
        plain = get_method("mra").forward(q, k, v, None, 0.5, causal, p)
        shifted = get_method("mra").forward(q, k, v, torch.full((40,), shift, dtype=torch.float64), 0.5, causal, p)
        assert rel_err(shifted, plain) < 1e-9
        assert rel_err(plain, sdpa_reference(q, k, v, None, 0.5, causal)) > 1e-4  # really an approximation


@pytest.mark.parametrize("name,params,causal", [
    ("monarch", {"block_size": 2, "num_steps": 2}, False),
    ("monarch", {"block_size": 1}, False),
    ("mra", {"block_size": 2, "blocks_per_row": 100}, True),
    ("mra", {"block_size": 2, "blocks_per_row": 1}, False),
    ("topk", {"k": 3}, True),
])
def test_gradients_with_hard_masks_and_large_biases(seed, name, params, causal):
    """-inf now reaches the methods' softmaxes as -inf (a fully masked key block, a fully masked
    batch row): the backward stays finite and matches finite differences."""
    q, k, v = make_qkv(B=2, H=2, Hk=1, Nq=7, D=3, Dv=2, seed=seed)
    bias = torch.randn(2, 1, 1, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 100.0
    bias[0, ..., 2:4] = -INF                             # a whole key block of 2
    bias[0, ..., 5] = torch.finfo(torch.float64).min     # a key of weight 0 that is not masked
    bias[1] = -INF                                       # batch 1 sees no key: output 0
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    fn = lambda *t: _run(name, params, *t, bias, 0.7, causal)  # noqa: E731
    out = fn(*leaves)
    assert out[1].abs().max() == 0
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# non-finite inputs poison what they poison in SDPA
# ----------------------------------------------------------------------------------------------
def _poisoned_inputs(seed, where: str, value: float, mask_kind):
    """Tiny inputs (Nk = 13: a partial last block) with ``value`` planted in one element of one
    query, key or value row, and a mask of the given kind."""
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=13, D=4, Dv=3, seed=seed)
    {"q": q, "k": k, "v": v}[where][0, 0, 6, 1] = value
    g = torch.Generator().manual_seed(seed + 7)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, 1, 13, generator=g) > 0.3
        mask[..., [0, 6]] = True
    elif mask_kind == "float":
        mask = torch.randn(1, 2, 1, 13, generator=g, dtype=torch.float64)
        mask[..., 9] = -INF
    return q, k, v, mask


@pytest.mark.parametrize("name,params,causal_ok", EXACT_LIMITS, ids=LIMIT_IDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_non_finite_inputs_at_exact_limits_poison_like_sdpa(seed, name, params, causal_ok, where):
    checked = 0
    for value, mask_kind, causal in itertools.product((INF, -INF, NAN), (None, "bool", "float"), (False, True)):
        if causal and not causal_ok:
            continue
        q, k, v, mask = _poisoned_inputs(seed, where, value, mask_kind)
        ref = sdpa_reference(q, k, v, mask, 0.5, causal)
        out = _run(name, params, q, k, v, mask, 0.5, causal)
        case = (value, mask_kind, causal)
        finite = torch.isfinite(ref)
        assert torch.isfinite(out[finite]).all(), case
        assert torch.allclose(out[finite], ref[finite], rtol=0, atol=1e-10), case
        if where == "q":
            # a poisoned query makes exactly SDPA's rows non-finite (its own row, unless SDPA
            # finds no finite logit there and returns 0)
            assert torch.equal(torch.isfinite(out), finite), case
        elif where == "k":
            # SDPA applies is_causal and masks additively, so a +inf / NaN logit poisons even a
            # row that cannot see the key; ours leaves those rows finite. Every row that sees the
            # poisoned key (key 6: kept by every mask here) is non-finite wherever SDPA's is.
            sees = torch.ones(1, 2, 13, 3, dtype=torch.bool)
            if causal:
                sees[:, :, :6] = False
            assert torch.equal(torch.isfinite(out)[sees], finite[sees]), case
        else:
            # SDPA's 0 * NaN poisons the whole value column; ours stays within that column
            outside = torch.ones_like(finite)
            outside[0, :, :, 1] = False
            assert torch.isfinite(out[outside]).all(), case
        checked += int((~finite).any())
    assert checked > 0  # the planted values really poisoned something


@pytest.mark.parametrize("name,params", [
    ("mra", {"block_size": 4, "blocks_per_row": 1}),
    ("mra", {"block_size": 4, "blocks_per_row": 2, "variant": "mra2s"}),
    ("topk", {"k": 3}),
])
@pytest.mark.parametrize("value", [INF, NAN])
def test_non_finite_query_stays_in_its_query_block_below_the_limit(seed, name, params, value):
    """Away from the exact limit MRA pools queries per block, so a poisoned query reaches at most
    its own query block (its whole block in mra2, through the pooled branch); top-k only its row.
    Every other row is bit-for-bit the unpoisoned answer."""
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=16, D=4, seed=seed)
    clean = _run(name, params, q, k, v, None, 0.5, True)
    q[0, 1, 6, 2] = value
    out = _run(name, params, q, k, v, None, 0.5, True)
    own = slice(4, 8) if name == "mra" else slice(6, 7)
    keep = torch.ones(1, 2, 16, 1, dtype=torch.bool)
    keep[0, 1, own] = False
    assert torch.equal(out.masked_select(keep), clean.masked_select(keep))
    assert not torch.isfinite(out[0, 1, 6]).all()


# ----------------------------------------------------------------------------------------------
# empty tensors
# ----------------------------------------------------------------------------------------------
EMPTY_SHAPES = {  # B, H, Hk, Nq, Nk, D, Dv
    "batch0": (0, 4, 2, 5, 5, 8, 6),
    "q_len0": (1, 4, 2, 0, 5, 8, 6),
    "k_len0": (2, 4, 2, 5, 0, 8, 6),
    "both_len0": (1, 4, 2, 0, 0, 8, 6),
    "heads0": (1, 0, 0, 5, 5, 8, 6),
    "q_heads0": (1, 0, 2, 5, 5, 8, 6),
    "v_dim0": (1, 2, 2, 5, 5, 8, 0),
}
METHOD_CALLS = [("exact", {}), ("monarch", {}), ("mra", {"block_size": 2}), ("topk", {"k": 2})]


def _empty_inputs(shape, requires_grad=False):
    B, H, Hk, Nq, Nk, D, Dv = shape
    q, k, v = torch.randn(B, H, Nq, D), torch.randn(B, Hk, Nk, D), torch.randn(B, Hk, Nk, Dv)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
def test_empty_inputs_give_sdpas_result(shape):
    q, k, v = _empty_inputs(shape)
    nk = k.shape[2]
    for (name, params), causal, masked in itertools.product(METHOD_CALLS, (False, True), (False, True)):
        if causal and name == "monarch":
            continue
        mask = torch.ones(nk, dtype=torch.bool) if masked else None
        ref = sdpa_reference(q, k, v, mask, 0.3, causal)
        for out in (_run(name, params, q, k, v, mask, 0.3, causal),
                    SF.attention(name, q, k, v, mask, None, causal, impl="torch", **params)):
            assert out.shape == ref.shape and out.dtype == ref.dtype, (name, causal)
            assert torch.equal(out, ref), (name, causal)   # empty, or zeros when Nk = 0


@pytest.mark.parametrize("shape", [EMPTY_SHAPES["batch0"], EMPTY_SHAPES["k_len0"], EMPTY_SHAPES["heads0"]],
                         ids=["batch0", "k_len0", "heads0"])
@pytest.mark.parametrize("name,params", METHOD_CALLS, ids=[m for m, _ in METHOD_CALLS])
def test_empty_inputs_backward_and_compile(shape, name, params):
    """Gradients are zeros of the inputs' shapes (as SDPA's); torch.compile traces the op's fake impl."""
    q, k, v = _empty_inputs(shape, requires_grad=True)
    fn = torch.compile(lambda q, k, v: SF.attention(name, q, k, v, None, None, False, **params),
                       backend="aot_eager", fullgraph=True)
    out = fn(q, k, v)
    assert out.shape == sdpa_reference(q, k, v, None, None, False).shape and not out.any()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.any()
    direct = _run(name, params, *[t.detach().requires_grad_(True) for t in (q, k, v)], None, 0.3, False)
    assert direct.shape == out.shape  # the method itself also returns SDPA's empty result


def test_empty_result_is_zero_even_with_non_finite_inputs():
    q = torch.full((1, 2, 3, 4), NAN)
    k, v = torch.full((1, 2, 0, 4), NAN), torch.full((1, 2, 0, 5), INF)
    out = empty_result(q, k, v)
    assert out.shape == (1, 2, 3, 5) and torch.equal(out, torch.zeros(1, 2, 3, 5))
    assert empty_result(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)) is None


def test_zero_head_dim_uses_sdpas_default_scale():
    q, k, v = torch.randn(1, 2, 5, 0), torch.randn(1, 2, 6, 0), torch.randn(1, 2, 6, 3)
    ref = F.scaled_dot_product_attention(q, k, v)
    for name, params, _ in EXACT_LIMITS:
        assert rel_err(SF.attention(name, q, k, v, impl="torch", **params), ref) < 1e-6


# ----------------------------------------------------------------------------------------------
# masks of any rank that broadcasts to [B, H, Nq, Nk]
# ----------------------------------------------------------------------------------------------
def _mask_variants(nq, nk, g):
    """(label, mask, varies along queries) for bool and float masks of 1 to 4 dims."""
    keep_k = torch.rand(nk, generator=g) > 0.3
    keep_k[0] = True
    keep_qk = torch.rand(nq, nk, generator=g) > 0.3
    keep_qk[:, 0] = True
    bias_k = torch.randn(nk, generator=g, dtype=torch.float64)
    return [
        ("bool[Nk]", keep_k, False), ("float[Nk]", bias_k, False),
        ("bool[1,Nk]", keep_k[None], False), ("float[H,1,Nk]", torch.stack([bias_k, -bias_k])[:, None], False),
        ("bool[1,1,Nk]", keep_k[None, None], False), ("float[Nq,Nk] equal rows", bias_k.expand(nq, nk), False),
        ("bool[Nq,Nk]", keep_qk, True), ("float[H,Nq,Nk]", torch.randn(2, nq, nk, generator=g, dtype=torch.float64), True),
        ("bool[B,1,Nq,Nk]", keep_qk[None, None], True),
    ]


@pytest.mark.parametrize("name,params,causal_ok", EXACT_LIMITS, ids=LIMIT_IDS)
def test_masks_of_every_rank(seed, name, params, causal_ok):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=11, D=4, seed=seed)
    method = get_method(name)
    for (label, mask, general), causal in itertools.product(_mask_variants(11, 11, g), (False, True)):
        if (causal and not causal_ok) or (general and name in ("monarch", "mra")):
            continue
        ref = sdpa_reference(q, k, v, mask.expand(1, 2, 11, 11), 0.5, causal)
        out = _run(name, params, q, k, v, mask, 0.5, causal)
        assert rel_err(out, ref) < 1e-10, (label, causal)
    # through the op with min_seq_len routing this short input to exact attention
    mask = torch.rand(11, generator=g) > 0.2
    routed = run_method(method, q, k, v, mask, 0.5, True, 1000, "torch", method.make_params(params))
    assert rel_err(routed, sdpa_reference(q, k, v, mask.expand(11, 11), 0.5, True)) < 1e-12


def test_exact_accepts_a_1d_mask_through_functional_and_compile(seed):
    q, k, v = make_qkv(B=2, H=2, Hk=2, Nq=7, D=4, seed=seed, dtype=torch.float32)
    bias = torch.randn(7, generator=torch.Generator().manual_seed(seed))
    ref = sdpa_reference(q, k, v, bias.expand(7, 7), 0.5, False)
    assert rel_err(SF.exact_attention(q, k, v, bias, 0.5), ref) < 1e-6
    fn = torch.compile(lambda q, k, v, m: SF.exact_attention(q, k, v, m, 0.5), backend="aot_eager", fullgraph=True)
    assert rel_err(fn(q, k, v, bias), ref) < 1e-6


def test_as_4d_views_and_refuses_more_dims():
    m = torch.rand(5) > 0.5
    assert as_4d(m).shape == (1, 1, 1, 5) and as_4d(m).data_ptr() == m.data_ptr()
    assert as_4d(torch.zeros(3, 4, 5)).shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="at most 4 dims"):
        as_4d(torch.zeros(1, 1, 1, 1, 5))
