"""Routing attention: the plan against a loop reference, the attention against a per-query float64
definition, exact limits against dense attention, the fused CPU path, gradients, masks, FLOPs."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn.functional as F

import structattn
from structattn import functional as SF
from structattn.calibrate import default_candidates
from structattn.methods import SiteShape, exact_flops, get_method
from structattn.methods.exact.naive import dense_attention
from structattn.methods.routing import RoutingParams, make_plan, plan_sizes, routing_flops
from structattn.methods.routing import cpu as routing_cpu
from structattn.methods.routing.naive import local_keep, naive_attention, naive_plan
from structattn.methods.routing.plan import block_stats, normalise
from structattn.methods.routing.torch import attend

from testlib import key_padding, make_qkv, rel_err

METHOD = get_method("routing")
NEG_INF = float("-inf")


def _mask(kind, B, H, Nk, seed):
    """None, a bool key-padding mask [B,1,1,Nk], or an additive per-head bias [B,H,1,Nk] with -inf holes."""
    if kind is None:
        return None
    keep = key_padding(B, Nk, seed, heads=H if kind == "float" else 1)
    if kind == "bool":
        return keep
    g = torch.Generator().manual_seed(seed + 7)
    return torch.where(keep, torch.randn(keep.shape, generator=g, dtype=torch.float64), NEG_INF)


CASES = [  # (B, H, Hk, Nq, Nk, D, Dv, causal, mask)
    (2, 4, 2, 37, 37, 8, 8, False, None),
    (2, 4, 2, 37, 37, 8, 6, True, "bool"),
    (1, 3, 1, 30, 30, 8, 8, True, "float"),      # GQA 3:1, per-head biases
    (2, 2, 2, 20, 33, 8, 5, False, "float"),     # cross attention
    (1, 2, 1, 12, 29, 6, 6, True, "bool"),       # causal cross attention (top-left)
    (1, 2, 2, 1, 25, 8, 8, False, None),         # one query (a decode step)
]


@pytest.mark.parametrize("B,H,Hk,Nq,Nk,D,Dv,causal,mask", CASES)
@pytest.mark.parametrize("pooled", [True, False])
def test_torch_path_equals_per_query_definition(seed, B, H, Hk, Nq, Nk, D, Dv, causal, mask, pooled):
    q, k, v = make_qkv(B, H, Hk, Nq, Nk, D, Dv, seed=seed)
    am = _mask(mask, B, H, Nk, seed)
    p = RoutingParams(clusters=3, window=5, routes=2, iterations=2, local_window=3, sink_tokens=2, pooled=pooled)
    plan = make_plan(q, k, am, 0.4, causal, p.clusters, p.window, p.routes, p.iterations, p.sink_tokens)
    out = attend(q, k, v, am, 0.4, causal, plan, p.local_window, p.sink_tokens, p.pooled)
    ref = naive_attention(q, k, v, am, 0.4, causal, plan, p.local_window, p.sink_tokens, p.pooled)
    assert rel_err(out, ref) < 1e-12
    # the method's forward computes the same plan (deterministic) and the same attention
    assert rel_err(METHOD.forward(q, k, v, am, 0.4, causal, p), ref) < 1e-12


@pytest.mark.parametrize("B,H,Hk,Nq,Nk,D,Dv,causal,mask", CASES)
@pytest.mark.parametrize("norm", ["center", "unit", "layer"])
def test_plan_equals_loop_reference(seed, B, H, Hk, Nq, Nk, D, Dv, causal, mask, norm):
    q, k, _ = make_qkv(B, H, Hk, Nq, Nk, D, Dv, seed=seed)
    am = _mask(mask, B, H, Nk, seed)
    fast = make_plan(q, k, am, 0.4, causal, 4, 4, 3, 2, 1, norm)
    slow = naive_plan(q, k, am, 0.4, causal, 4, 4, 3, 2, 1, norm)
    assert (fast.wq, fast.wk) == (slow.wq, slow.wk)
    assert torch.equal(fast.q_order, slow.q_order)
    assert torch.equal(fast.k_order, slow.k_order)
    assert torch.equal(fast.route_valid, slow.route_valid)
    assert torch.equal(torch.where(fast.route_valid, fast.routes, -1), torch.where(slow.route_valid, slow.routes, -1))


@pytest.mark.parametrize("B,H,Hk,Nq,Nk,D,Dv,causal,mask", CASES)
def test_plan_invariants(seed, B, H, Hk, Nq, Nk, D, Dv, causal, mask):
    q, k, _ = make_qkv(B, H, Hk, Nq, Nk, D, Dv, seed=seed)
    am = _mask(mask, B, H, Nk, seed)
    sink = 2
    plan = make_plan(q, k, am, 0.4, causal, 3, 4, 2, 2, sink)
    again = make_plan(q, k, am, 0.4, causal, 3, 4, 2, 2, sink)
    assert torch.equal(plan.q_order, again.q_order) and torch.equal(plan.routes, again.routes)   # deterministic
    G = H // Hk
    live = torch.ones(B, H, Nk, dtype=torch.bool) if am is None else \
        (am if am.dtype == torch.bool else am > NEG_INF)[:, :, 0].expand(B, H, Nk)
    joins = live.reshape(B, Hk, G, Nk).any(2)
    joins[..., :sink] = False
    for b in range(B):
        for hk in range(Hk):
            members = plan.k_order[b, hk]
            real = members[members < Nk]
            # every joining key in exactly one block, nothing else; blocks filled from the front
            assert sorted(real.tolist()) == joins[b, hk].nonzero().flatten().tolist()
            assert bool((members[: real.numel()] < Nk).all())
        for h in range(H):
            order = plan.q_order[b, h]
            assert sorted(order[order < Nq].tolist()) == list(range(Nq))          # every query exactly once
            assert bool((order[:Nq] < Nq).all())
            if Nq == Nk and am is not None:
                # queries whose key is masked for their head come after every live query
                flags = live[b, h][order[:Nq]].int()
                assert bool((flags[:-1] >= flags[1:]).all())
    assert bool(((plan.routes >= 0) & (plan.routes < plan.k_blocks)).all())
    # a valid route never repeats within a query block
    for row, ok in zip(plan.routes.reshape(-1, plan.routes.shape[-1]), plan.route_valid.reshape(-1, plan.routes.shape[-1])):
        chosen = row[ok].tolist()
        assert len(chosen) == len(set(chosen))


EXACT_LIMITS = [dict(window=10**6), dict(window=4, routes=10**6), dict(clusters=1), dict(clusters=1, pooled=False)]


@pytest.mark.parametrize("B,H,Hk,Nq,Nk,D,Dv,causal,mask", CASES)
@pytest.mark.parametrize("limit", EXACT_LIMITS)
def test_exact_limits(seed, B, H, Hk, Nq, Nk, D, Dv, causal, mask, limit):
    """One cluster (its default window is every key), one block holding every key, or every block
    routed, is softmax attention (float64 oracle)."""
    q, k, v = make_qkv(B, H, Hk, Nq, Nk, D, Dv, seed=seed)
    am = _mask(mask, B, H, Nk, seed)
    p = METHOD.make_params({"local_window": 3, "sink_tokens": 1, **limit})
    assert rel_err(METHOD.forward(q, k, v, am, 0.4, causal, p), dense_attention(q, k, v, am, 0.4, causal)) < 1e-12


def test_exact_limit_through_the_op_equals_sdpa(seed):
    q, k, v = make_qkv(2, 4, 2, 48, 48, 16, 16, dtype=torch.float32, seed=seed)
    am = key_padding(2, 48, seed)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=am,
                                         is_causal=False)
    out = SF.routing_attention(q, k, v, attn_mask=am, window=64)
    assert rel_err(out, ref) < 1e-6
    causal = SF.routing_attention(q, k, v, is_causal=True, window=8, routes=6, local_window=4)
    assert rel_err(causal, F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)) < 1e-6


def test_local_window_definition():
    keep = local_keep(6, 6, 3, True)
    assert keep[4].tolist() == [False, False, True, True, True, False]
    keep = local_keep(6, 6, 4, False)                 # 2 before, 1 after
    assert keep[3].tolist() == [False, True, True, True, True, False]
    assert not local_keep(4, 4, 0, True).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,mask,Nq", [(False, None, 40), (True, "bool", 40), (False, "float", 23), (True, None, 40)])
@pytest.mark.parametrize("pooled,local,sink", [(True, 5, 1), (False, 0, 2), (True, 40, 0)])
def test_fused_cpu_path_equals_torch_path(seed, dtype, causal, mask, Nq, pooled, local, sink):
    if causal and local == 0 and sink == 0:
        pytest.skip("refused configuration")
    q, k, v = make_qkv(2, 4, 2, Nq, 40, 16, 8, dtype=dtype, seed=seed)
    am = _mask(mask, 2, 4, 40, seed)
    am = am if am is None or am.dtype == torch.bool else am.float()
    plan = make_plan(q, k, am, 0.3, causal, 4, 6, 3, 2, sink)
    with torch.inference_mode():
        assert routing_cpu.usable(q, k, v) is None
        fast = routing_cpu.attend(q, k, v, am, 0.3, causal, plan, local, sink, pooled)
    ref = attend(q.double(), k.double(), v.double(), am, 0.3, causal, plan, local, sink, pooled)
    assert fast.dtype == torch.float32
    assert rel_err(fast, ref) < 2e-6


def test_fused_path_is_used_only_without_autograd(seed):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, dtype=torch.float32, seed=seed)
    assert routing_cpu.usable(q.requires_grad_(), k, v) is not None
    with torch.no_grad():
        assert routing_cpu.usable(q, k, v) is None
    assert routing_cpu.usable(q.detach().double(), k.double(), v.double()) is not None
    k2 = k.clone()
    k2[0, 0, 3, 0] = float("nan")
    with torch.no_grad():
        assert "non-finite" in routing_cpu.usable(q, k2, v)


@pytest.mark.parametrize("causal,mask", [(False, "float"), (True, "bool")])
def test_gradients_with_a_fixed_plan(seed, causal, mask):
    """Routing is piecewise constant: with the plan fixed, the torch path is differentiable and its
    gradient is the finite-difference one."""
    q, k, v = make_qkv(1, 2, 1, 14, 14, 4, 3, seed=seed)
    am = _mask(mask, 1, 2, 14, seed)
    plan = make_plan(q, k, am, 0.5, causal, 3, 4, 2, 1, 1)
    fn = lambda q_, k_, v_: attend(q_, k_, v_, am, 0.5, causal, plan, 3, 1, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (q, k, v)), fast_mode=True)


def test_gradients_through_the_op(seed):
    q, k, v = make_qkv(2, 4, 2, 24, 24, 8, dtype=torch.float32, seed=seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = SF.routing_attention(*leaves, is_causal=True, window=6, routes=2, local_window=4)
    g = torch.randn_like(out)
    out.backward(g)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    plan = make_plan(q, k, None, 8 ** -0.5, True, None, 6, 2, 2, 1)
    attend(*ref_leaves, None, 8 ** -0.5, True, plan, 4, 1, True).backward(g)
    for a, b in zip(leaves, ref_leaves):
        assert torch.isfinite(a.grad).all() and rel_err(a.grad, b.grad) < 1e-5


def test_shared_key_offset_changes_nothing(seed):
    """Centring the keys before clustering makes the routing invariant to an offset shared by all
    keys, and softmax attention is invariant to it: so is routing attention."""
    q, k, v = make_qkv(2, 4, 2, 40, 40, 8, seed=seed)
    shifted = k + 3.0 * torch.randn(1, 1, 1, 8, dtype=torch.float64)
    p = RoutingParams(window=6, routes=2, local_window=4)
    a = METHOD.forward(q, k, v, None, 0.4, True, p)
    b = METHOD.forward(q, shifted, v, None, 0.4, True, p)
    assert rel_err(a, b) < 1e-10


def test_normalise_rules():
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0], [1.0, 1.0]]])
    u = normalise(x, "unit")
    assert torch.allclose(u[0, 0], torch.tensor([0.6, 0.8])) and not u[0, 1].any() and not u[0, 2].any()
    c = normalise(x, "center", torch.tensor([[True, True, True, False]]))
    assert torch.isfinite(c).all()                   # the NaN row is left out of the mean and becomes 0
    assert torch.allclose(c[0, 0], torch.tensor([0.6, 0.8]) * 0 + (torch.tensor([3.0, 4.0]) - 1.5 * torch.tensor([1.0, 4 / 3])).div(
        (torch.tensor([3.0, 4.0]) - 1.5 * torch.tensor([1.0, 4 / 3])).norm()))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        normalise(x, "rms")


def test_block_stats_match_their_definition(seed):
    k = torch.randn(1, 10, 3, dtype=torch.float64)
    bias = torch.randn(1, 1, 10, dtype=torch.float64)
    bias[0, 0, 4] = NEG_INF
    order = torch.tensor([[3, 4, 7, 1, 0, 10]])           # blocks of 3: {3, 4, 7}, {1, 0, empty}
    kbar, beta, count = block_stats(k, bias, order, 3)
    w = torch.softmax(bias[0, 0, [3, 7]], 0)
    assert torch.allclose(kbar[0, 0, 0], w @ k[0, [3, 7]])
    assert torch.allclose(beta[0, 0, 0], torch.logsumexp(bias[0, 0, [3, 7]], 0))
    assert count[0, 0].tolist() == [2.0, 2.0]


def test_fully_masked_rows_and_batches_give_zero(seed):
    q, k, v = make_qkv(2, 2, 2, 20, 20, 8, seed=seed)
    am = key_padding(2, 20, seed, dead_batch=1)
    for causal in (False, True):
        out = METHOD.forward(q, k, v, am, 0.4, causal, RoutingParams(window=4, routes=2, local_window=3))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


def test_a_nan_query_poisons_only_its_row(seed):
    q, k, v = make_qkv(1, 2, 2, 24, 24, 8, seed=seed)
    q[0, 1, 5, 2] = float("nan")
    p = RoutingParams(window=6, routes=2, local_window=4)
    out = METHOD.forward(q, k, v, None, 0.4, False, p)
    assert torch.isnan(out[0, 1, 5]).all()
    nan_rows = torch.isnan(out).any(-1)
    nan_rows[0, 1, 5] = False
    assert not nan_rows.any()


def test_non_finite_keys_at_the_exact_limit_poison_what_sdpa_poisons(seed):
    q, k, v = make_qkv(1, 2, 2, 20, 20, 8, dtype=torch.float32, seed=seed)
    k[0, 0, 7, 1] = float("inf")
    v[0, 1, 3, 0] = float("nan")
    out = METHOD.forward(q, k, v, None, 0.4, True, RoutingParams(window=100, local_window=2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    assert torch.allclose(out[finite], ref[finite], atol=1e-6)


def test_empty_inputs():
    for shape_q, shape_k in [((0, 2, 5, 4), (0, 2, 5, 4)), ((1, 2, 0, 4), (1, 2, 5, 4)), ((1, 2, 5, 4), (1, 2, 0, 4))]:
        q, k = torch.randn(shape_q), torch.randn(shape_k)
        out = METHOD.forward(q, k, k, None, 0.5, False, RoutingParams())
        assert out.shape == shape_q and not out.any()


def test_plan_sizes():
    assert plan_sizes(100, 100, None, None, 4) == (10, 10, 10, 4)
    assert plan_sizes(5, 100, None, None, 4) == (10, 5, 10, 4)        # query blocks never exceed Nq
    assert plan_sizes(100, 100, 500, 7, 100) == (100, 7, 7, 15)        # clusters <= Nk, routes <= blocks


def test_flops_model():
    site = SiteShape(batch=2, num_heads=6, num_kv_heads=3, q_len=64, kv_len=64, head_dim=8, v_head_dim=4)
    p = RoutingParams(clusters=8, window=8, routes=2, iterations=3, local_window=4, sink_tokens=2, pooled=True)
    c, wq, wk, r, mq, mk = 8, 8, 8, 2, 8, 8
    expected = 2 * 2 * (3 * 4 * 64 * c * 8 + 6 * 64 * c * 8                    # k-means + query assignment
                        + 6 * (mq * mk * 8 + 64 * r * wk * 12 + 64 * mk * 12)  # block scores, routed, pooled
                        + 6 * 64 * (7 + 2) * 12)                               # band (2L - 1) + sinks
    assert routing_flops(site, p) == expected
    assert METHOD.flops(site, p) == expected
    n = sympy.Symbol("s0", positive=True, integer=True)
    sym = METHOD.flops(SiteShape(1, 12, 12, n, n, 64, 64), RoutingParams())
    big = {n: 16384}
    assert float(sym.subs(big)) == METHOD.flops(SiteShape(1, 12, 12, 16384, 16384, 64, 64), RoutingParams())
    # sub-quadratic: the defaults' share of exact attention falls with N (about 6% at 16K)
    shares = [float(sym.subs({n: m})) / float(exact_flops(SiteShape(1, 12, 12, m, m, 64, 64)))
              for m in (1024, 4096, 16384)]
    assert shares[0] > shares[1] > shares[2] and shares[2] < 0.07


def test_validation_and_refusals():
    with pytest.raises(ValueError, match=r"routing.routes must be an int >= 1"):
        METHOD.make_params({"routes": 0})
    with pytest.raises(ValueError, match=r"routing.window must be None or an int >= 1"):
        METHOD.make_params({"window": 0})
    with pytest.raises(ValueError, match="unknown parameter 'blocks'"):
        METHOD.make_params({"blocks": 3})
    site = SiteShape(1, 2, 2, 64, 64, 8, 8, mask="general")
    assert "general" in METHOD.supports(site, RoutingParams())
    causal = SiteShape(1, 2, 2, 64, 64, 8, 8, mask="causal")
    assert METHOD.supports(causal, RoutingParams()) is None
    assert "local_window" in METHOD.supports(causal, RoutingParams(local_window=0, sink_tokens=0))
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="local_window >= 1 or sink_tokens >= 1"):
        SF.routing_attention(q, k, v, is_causal=True, local_window=0, sink_tokens=0)
    with pytest.raises(ValueError, match="varies along queries"):
        METHOD.forward(q, k, v, torch.rand(16, 16) > 0.5, 0.3, False, RoutingParams())
    # without causality, no window and no sink is allowed (every query attends its routed blocks)
    out = SF.routing_attention(q, k, v, local_window=0, sink_tokens=0, window=4, routes=1)
    assert torch.isfinite(out).all()


def test_functional_signature_and_registry():
    import inspect

    sig = inspect.signature(SF.routing_attention)
    assert list(sig.parameters)[:6] == ["q", "k", "v", "attn_mask", "scale", "is_causal"]
    defaults = {name: sig.parameters[name].default for name in
                ("clusters", "window", "routes", "iterations", "local_window", "sink_tokens", "pooled", "impl")}
    params = RoutingParams()
    assert defaults == {"clusters": params.clusters, "window": params.window, "routes": params.routes,
                        "iterations": params.iterations, "local_window": params.local_window,
                        "sink_tokens": params.sink_tokens, "pooled": params.pooled, "impl": "auto"}
    assert hasattr(torch.ops.structattn, "routing_attention")
    assert METHOD.kernel_module == "structattn.methods.routing.triton"


def test_calibration_grid_comes_from_the_method():
    shape = SiteShape(1, 9, 3, 1024, 1024, 64, 64, mask="causal")
    grid = default_candidates("routing", shape)
    assert grid == METHOD.candidates(shape) and len(grid) >= 4
    for values in grid:
        params = METHOD.make_params(values)
        assert METHOD.supports(shape, params) is None
        assert METHOD.flops(shape, params) < exact_flops(shape)
    assert default_candidates("routing", SiteShape(1, 2, 2, 16, 16, 8, 8)) == []


def test_backend_rewrites_a_site_to_routing(seed):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = make_qkv(1, 2, 2, 256, 256, 16, dtype=torch.float32, seed=seed)
    opts = {"method": "routing", "routing": {"window": 16, "routes": 2, "local_window": 8}, "compiler": "eager"}
    out = torch.compile(Attn(), backend="structattn", options=opts)(q, k, v)
    report = structattn.last_report()
    assert [s.method for s in report.sites] == ["routing"]
    direct = SF.routing_attention(q, k, v, is_causal=True, window=16, routes=2, local_window=8)
    assert torch.equal(out, direct)


def test_kmeans_fit_on_a_strided_subset_equals_loop_reference(seed):
    """With more than 32 keys per centroid the fit uses every s-th position (here s = 2)."""
    from structattn.methods.routing.plan import fit_stride

    q, k, _ = make_qkv(1, 2, 1, 150, 150, 6, seed=seed)
    assert fit_stride(150, 2) == 2
    am = key_padding(1, 150, seed)
    fast = make_plan(q, k, am, 0.4, True, 2, 20, 2, 3, 1)
    slow = naive_plan(q, k, am, 0.4, True, 2, 20, 2, 3, 1, "center")
    assert torch.equal(fast.k_order, slow.k_order) and torch.equal(fast.q_order, slow.q_order)
    assert torch.equal(torch.where(fast.route_valid, fast.routes, -1), torch.where(slow.route_valid, slow.routes, -1))
