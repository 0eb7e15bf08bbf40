"""MonarchAttention: exact limits, an independent float64 implementation, masks, dtypes, FLOPs."""
from __future__ import annotations

import pytest
import sympy
import torch

from structattn.methods import SiteShape, get_method
from structattn.methods.common import key_bias_1d
from structattn.methods.exact.naive import dense_attention
from structattn.methods.monarch import MonarchParams, monarch_blocks, monarch_forward
from structattn.methods.monarch.naive import monarch_attention as naive_monarch
from structattn.methods.monarch.naive import monarch_head, objective

from testlib import TOL, key_padding, make_qkv, rel_err

METHOD = get_method("monarch")


@pytest.mark.parametrize("N", [1, 5, 16, 23])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_exact_limits_block_1_and_N(seed, N, steps, mask):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=N, D=6, Dv=5, seed=seed)
    am = None if mask is None else key_padding(2, N, seed, float_mask=(mask == "float"), heads=4)
    scale = 0.7
    ref = dense_attention(q, k, v, am, scale)
    for b in (1, N):
        out = monarch_forward(q, k, v, am, scale, MonarchParams(block_size=b, num_steps=steps))
        assert out.dtype == torch.float64 and out.shape == (2, 4, N, 5)
        assert rel_err(out, ref) < 1e-12, (b, rel_err(out, ref))


@pytest.mark.parametrize("Nq,Nk", [(5, 12), (12, 5), (9, 16)])
def test_exact_limits_cross_attention(seed, Nq, Nk):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=Nq, Nk=Nk, D=4, Dv=3, seed=seed)
    am = key_padding(1, Nk, seed)
    ref = dense_attention(q, k, v, am, 0.5)
    for b in (1, Nk, Nk + 7):  # block_size beyond N is clamped to N
        for steps in (1, 2):
            out = monarch_forward(q, k, v, am, 0.5, MonarchParams(block_size=b, num_steps=steps))
            assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("N,b,steps", [(16, 4, 1), (16, 4, 3), (13, 4, 2), (10, 3, 1), (10, 3, 2), (7, None, 2),
                                       (12, 5, 3)])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_matches_independent_float64_implementation(seed, N, b, steps, mask):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=N, D=5, Dv=3, seed=seed, spread=2.0)
    am = None if mask is None else key_padding(1, N, seed, float_mask=(mask == "float"), heads=2)
    out = monarch_forward(q, k, v, am, 0.6, MonarchParams(block_size=b, num_steps=steps))
    ref = naive_monarch(q, k, v, am, 0.6, b, steps)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("Nq,Nk,b", [(7, 12, 4), (12, 7, 3)])
def test_cross_attention_matches_independent_implementation(seed, Nq, Nk, b):
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=Nq, Nk=Nk, D=4, Dv=2, seed=seed, spread=2.0)
    am = key_padding(1, Nk, seed)
    for steps in (1, 2):
        out = monarch_forward(q, k, v, am, 0.5, MonarchParams(block_size=b, num_steps=steps))
        ref = naive_monarch(q, k, v, am, 0.5, b, steps)
        assert rel_err(out, ref) < 1e-10


def test_steps_are_block_coordinate_ascent(seed):
    """The objective <A, S + bias> + H(A) never decreases with more (R, L) steps."""
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=14, D=4, seed=seed, spread=2.0)
    bias = key_bias_1d(key_padding(1, 14, seed), 1, 1, 0, 0, 14)
    values = []
    for steps in range(1, 5):
        _, A, S = monarch_head(q[0, 0], k[0, 0], v[0, 0], bias, 0.8, 4, steps)
        values.append(objective(A, S).item())
        assert torch.allclose(A.sum(-1), torch.ones(14, dtype=torch.float64))  # rows stochastic
        assert (A[:, torch.isinf(bias)] == 0).all()
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_key_block_gets_no_weight(seed, dtype):
    """A block whose keys are all masked gets exactly zero mass (the reference leaks ~1.4%)."""
    N, b = 16, 4
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=N, D=8, Dv=1, seed=seed, dtype=dtype)
    keep = torch.ones(1, 1, 1, N, dtype=torch.bool)
    keep[..., 4:8] = False     # a whole block
    keep[..., 13] = False      # and one key elsewhere
    # value = indicator of masked keys: the output is the probability mass on masked keys
    v = (~keep[0, 0, 0]).to(dtype).view(1, 1, N, 1).expand(1, 2, N, 1).contiguous()
    for steps in (1, 2, 3):
        out = monarch_forward(q, k, v, keep, 1.0, MonarchParams(block_size=b, num_steps=steps))
        assert not out.isnan().any()
        assert out.abs().max().item() == 0.0
    # and huge values on masked keys change nothing
    _, _, v2 = make_qkv(B=1, H=2, Hk=2, Nq=N, D=8, Dv=3, seed=seed + 1, dtype=dtype)
    v3 = v2.clone()
    v3[..., ~keep[0, 0, 0], :] = 1e6
    o2 = monarch_forward(q, k, v2, keep, 1.0, MonarchParams(block_size=b, num_steps=2))
    o3 = monarch_forward(q, k, v3, keep, 1.0, MonarchParams(block_size=b, num_steps=2))
    assert torch.equal(o2, o3)


@pytest.mark.parametrize("float_mask", [False, True])
def test_fully_masked_query_rows_match_sdpa(seed, float_mask):
    q, k, v = make_qkv(B=3, H=2, Hk=1, Nq=10, D=4, seed=seed, dtype=torch.float32)
    am = key_padding(3, 10, seed, dead_batch=1, float_mask=float_mask)
    if float_mask:
        am = am.float()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am, enable_gqa=True)
    for b in (1, 3, 10):
        out = monarch_forward(q, k, v, am, 0.5, MonarchParams(block_size=b, num_steps=2))
        assert not out.isnan().any()
        assert out[1].abs().max().item() == 0.0 and sdpa[1].abs().max().item() == 0.0


def test_padded_query_rows_do_not_dilute(seed):
    """N not a block multiple: padded query rows must not enter alpha / c of the R-step (the
    independent implementation sums over valid rows only)."""
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=11, D=4, seed=seed, spread=2.0)
    out = monarch_forward(q, k, v, None, 0.5, MonarchParams(block_size=4, num_steps=3))
    ref = naive_monarch(q, k, v, None, 0.5, 4, 3)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_exact_limits(seed, dtype):
    q, k, v = make_qkv(B=1, H=4, Hk=2, Nq=20, D=16, Dv=8, seed=seed, dtype=dtype)
    am = key_padding(1, 20, seed)
    ref = dense_attention(q, k, v, am, 0.25)
    for b in (1, 20):
        out = monarch_forward(q, k, v, am, 0.25, MonarchParams(block_size=b, num_steps=2))
        assert out.dtype == dtype and not out.isnan().any()
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_float64_of_same_method(seed, dtype):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=30, D=16, seed=seed, dtype=dtype)
    out = monarch_forward(q, k, v, None, 0.25, MonarchParams(num_steps=2))
    ref = monarch_forward(q.double(), k.double(), v.double(), None, 0.25, MonarchParams(num_steps=2))
    assert rel_err(out, ref) < TOL[dtype]


def test_approximation_is_not_exact_in_between(seed):
    """Sanity: with 1 < b < N the result is an approximation (the tests above can fail)."""
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=16, D=4, seed=seed, spread=2.0)
    ref = dense_attention(q, k, v, None, 1.0)
    out = monarch_forward(q, k, v, None, 1.0, MonarchParams(block_size=4))
    assert rel_err(out, ref) > 1e-3 and torch.isfinite(out).all()


def test_default_block_size_is_about_sqrt_n():
    assert monarch_blocks(16, 16, None) == (4, 4, 4)
    assert monarch_blocks(17, 17, None) == (4, 5, 5)
    assert monarch_blocks(8192, 8192, None) == (91, 91, 91)
    assert monarch_blocks(10, 10, 100) == (1, 10, 10)
    assert monarch_blocks(7, 12, 4) == (3, 3, 4)


def test_supports_reasons():
    site = dict(batch=1, num_heads=2, num_kv_heads=2, q_len=64, kv_len=64, head_dim=8, v_head_dim=8)
    p = METHOD.make_params({})
    assert METHOD.supports(SiteShape(**site), p) is None
    assert METHOD.supports(SiteShape(**site, mask="key_padding"), p) is None
    for kind in ("causal", "causal+key_padding"):
        assert "causal" in METHOD.supports(SiteShape(**site, mask=kind), p)
    assert "general" in METHOD.supports(SiteShape(**site, mask="general"), p)
    assert METHOD.supports(SiteShape(**{**site, "q_len": 10}), p) is None  # cross attention


def test_forward_refuses_what_supports_refuses(seed):
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=8, D=4, seed=seed)
    general = torch.rand(1, 1, 8, 8) > 0.5
    with pytest.raises(ValueError, match="key-padding"):
        METHOD.forward(q, k, v, general, 0.5, False, MonarchParams())
    with pytest.raises(ValueError, match="causal"):
        METHOD.forward(q, k, v, None, 0.5, True, MonarchParams())
    # a materialised padding mask (rows all equal) is accepted and equals its key-padding form
    kp = key_padding(1, 8, seed)
    full = kp.expand(1, 1, 8, 8)
    assert torch.equal(METHOD.forward(q, k, v, full, 0.5, False, MonarchParams(2)),
                       METHOD.forward(q, k, v, kp, 0.5, False, MonarchParams(2)))


def test_flops_formula_and_sympy():
    p = MonarchParams(block_size=None, num_steps=2)
    site = SiteShape(batch=2, num_heads=3, num_kv_heads=3, q_len=100, kv_len=100, head_dim=8, v_head_dim=4)
    b = M = 10
    per_head = 100 * ((2 - 1) * 2 * (b + M) * 8 + 2 * b * 8 + b * 4 + M * 8 + M * 4)
    assert METHOD.flops(site, p) == 2 * 2 * 3 * per_head
    # far below exact at long N
    long = SiteShape(batch=1, num_heads=1, num_kv_heads=1, q_len=16384, kv_len=16384, head_dim=64, v_head_dim=64)
    assert METHOD.flops(long, MonarchParams()) < 0.05 * (2 * 16384 * 16384 * 128)
    n = sympy.Symbol("s0", positive=True, integer=True)
    sym = SiteShape(batch=1, num_heads=4, num_kv_heads=4, q_len=n, kv_len=n, head_dim=16, v_head_dim=16)
    expr = METHOD.flops(sym, MonarchParams(num_steps=1))
    assert isinstance(expr, sympy.Expr)
    for value in (10, 64, 99):
        concrete = SiteShape(batch=1, num_heads=4, num_kv_heads=4, q_len=value, kv_len=value, head_dim=16,
                             v_head_dim=16)
        assert int(expr.subs(n, value)) == METHOD.flops(concrete, MonarchParams(num_steps=1))


def test_head_groups_give_the_same_result(seed, monkeypatch):
    """Long inputs are processed in groups of heads; the split must not change values or grads."""
    import structattn.methods.monarch.torch as mon

    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=13, D=4, seed=seed)
    am = key_padding(2, 13, seed, heads=4)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    one = monarch_forward(*leaves, am, 0.5, MonarchParams(4, 2))
    g_one = torch.autograd.grad(one.square().sum(), leaves)
    monkeypatch.setattr(mon, "GROUP_ELEMS", 1)
    assert len(mon.head_groups(4, 10)) == 4
    many = monarch_forward(*leaves, am, 0.5, MonarchParams(4, 2))
    g_many = torch.autograd.grad(many.square().sum(), leaves)
    assert rel_err(many, one) < 1e-13
    for a, b in zip(g_many, g_one):
        assert rel_err(a, b) < 1e-12


def test_finite_min_masks_behave_like_sdpa(seed):
    """HF-style additive masks (finfo.min, not -inf) are used as given: a row whose keys are all
    masked that way averages all keys in SDPA, and so do the exact limits here (padding excluded)."""
    q, k, v = make_qkv(B=2, H=2, Hk=2, Nq=10, D=4, seed=seed, dtype=torch.float32)
    keep = key_padding(2, 10, seed, dead_batch=1)
    am = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am)
    for b in (1, 10):
        out = monarch_forward(q, k, v, am, 0.5, MonarchParams(block_size=b))
        assert rel_err(out, dense_attention(q, k, v, am, 0.5)) < TOL[torch.float32]
        assert rel_err(out[1], sdpa[1]) < TOL[torch.float32] and sdpa[1].abs().max() > 0
    out = monarch_forward(q, k, v, am, 0.5, MonarchParams(block_size=3, num_steps=2))  # padded
    assert torch.isfinite(out).all()
