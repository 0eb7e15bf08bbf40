"""MRA-2: exact limit, an independent float64 implementation, selection rules, masks, dtypes, FLOPs."""
from __future__ import annotations

import pytest
import sympy
import torch

from structattn.methods import SiteShape, get_method
from structattn.methods.exact.naive import dense_attention
from structattn.methods.mra import MraParams, mra_forward, mra_select
from structattn.methods.mra.naive import mra_attention as naive_mra

from testlib import TOL, key_padding, make_qkv, rel_err

METHOD = get_method("mra")


@pytest.mark.parametrize("Nq,Nk", [(16, 16), (23, 23), (5, 18), (18, 5), (1, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["mra2", "mra2s"])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_all_blocks_selected_is_exact(seed, Nq, Nk, causal, variant, mask):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=Nq, Nk=Nk, D=6, Dv=5, seed=seed)
    am = None if mask is None else key_padding(2, Nk, seed, float_mask=(mask == "float"), heads=4)
    ref = dense_attention(q, k, v, am, 0.7, causal)
    out = mra_forward(q, k, v, am, 0.7, causal, MraParams(block_size=4, blocks_per_row=8, variant=variant))
    assert out.shape == (2, 4, Nq, 5) and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_all_blocks_selected_is_exact_with_signed_key_bias(seed, causal):
    """A finite key bias of either sign (not just 0 / -inf) is added as is, also in causal slots
    that are partly unused (a positive bias once got clamped to 0 there)."""
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=40, Nk=40, D=6, Dv=5, seed=seed)
    bias = torch.randn(1, 2, 1, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = dense_attention(q, k, v, bias, 0.3, causal)
    out = mra_forward(q, k, v, bias, 0.3, causal, MraParams(block_size=8, blocks_per_row=5))
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("Nq,Nk,b,r", [(16, 16, 4, 2), (23, 23, 4, 3), (10, 21, 3, 2), (21, 10, 3, 1), (32, 32, 4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["mra2", "mra2s"])
def test_matches_independent_float64_implementation(seed, Nq, Nk, b, r, causal, variant):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=Nq, Nk=Nk, D=5, Dv=3, seed=seed, spread=2.0)
    am = key_padding(1, Nk, seed, heads=2, p_keep=0.6)
    if Nk > 2 * b:
        am[0, 0, 0, b:2 * b] = False  # one fully masked key block in head 0
    out = mra_forward(q, k, v, am, 0.6, causal, MraParams(block_size=b, blocks_per_row=r, variant=variant))
    ref = naive_mra(q, k, v, am, 0.6, causal, b, r, variant)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("sink", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_sink_blocks_match_independent_implementation(seed, sink, causal):
    Nq = Nk = 29
    b, r = 4, 3
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=Nq, Nk=Nk, D=5, Dv=3, seed=seed, spread=2.0)
    am = key_padding(1, Nk, seed, heads=2, p_keep=0.7)
    am[0, 0, 0, :b] = False  # head 0: the sink block has no valid key, so it is not a candidate
    params = MraParams(block_size=b, blocks_per_row=r, sink_blocks=sink)
    out = mra_forward(q, k, v, am, 0.6, causal, params)
    ref = naive_mra(q, k, v, am, 0.6, causal, b, r, "mra2", sink)
    assert rel_err(out, ref) < 1e-10
    sel = mra_select(q, k, am, 0.6, causal, params)
    chosen = torch.where(sel.block_valid, sel.block_idx, -1)
    for i in range(chosen.shape[2]):
        for j in range(min(sink, i + 1 if causal else sink)):
            assert (j in chosen[0, 1, i].tolist()) == (sel.count[0, 1 % sel.count.shape[1], j] > 0)
        assert 0 not in chosen[0, 0, i].tolist()
    # the sinks change the answer: without them the selection differs somewhere
    assert rel_err(mra_forward(q, k, v, am, 0.6, causal, MraParams(b, r)), ref) > 1e-6


def test_soft_float_key_bias_enters_low_resolution(seed):
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=16, D=4, seed=seed)
    am = torch.randn(1, 1, 1, 16, dtype=torch.float64)  # a finite per-key bias
    out = mra_forward(q, k, v, am, 0.5, False, MraParams(block_size=4, blocks_per_row=1))
    ref = naive_mra(q, k, v, am, 0.5, False, 4, 1, "mra2")
    assert rel_err(out, ref) < 1e-10


def test_selection_rules(seed):
    B, H, N, b = 2, 2, 40, 4
    q, k, _ = make_qkv(B=B, H=H, Hk=1, Nq=N, D=4, seed=seed)
    am = key_padding(B, N, seed, heads=1, p_keep=0.8)
    am[0, 0, 0, 8:12] = False  # key block 2 of batch 0 has no valid key
    for causal in (False, True):
        sel = mra_select(q, k, am, 0.5, causal, MraParams(block_size=b, blocks_per_row=3))
        mq = mk = N // b
        assert sel.block_idx.shape == (B, H, mq, 3) and sel.block_valid.shape == (B, H, mq, 3)
        for i in range(mq):
            chosen = sel.block_idx[0, 0, i][sel.block_valid[0, 0, i]].tolist()
            cand = [j for j in range(mk) if sel.count[0, 0, j] > 0 and (not causal or j <= i)]
            assert 2 not in chosen and 2 not in cand
            assert len(chosen) == min(3, len(cand)) and len(set(chosen)) == len(chosen)
            assert set(chosen) <= set(cand)
            if causal and i in cand:
                assert chosen[0] == i  # diagonal always selected, in slot 0
            others = [j for j in cand if j not in chosen]
            lowest_chosen = min(sel.lowres[0, 0, i, j].item() for j in chosen if j != i or not causal) \
                if [j for j in chosen if j != i or not causal] else float("inf")
            assert all(sel.lowres[0, 0, i, j].item() <= lowest_chosen for j in others)
            # pooled branch: exactly the unselected candidates, with log(count)
            pooled = torch.isfinite(sel.pooled_logits[0, 0, i])
            assert sorted(torch.nonzero(pooled).flatten().tolist()) == sorted(others)


def test_budget_follows_actual_length(seed):
    q, k, _ = make_qkv(B=1, H=1, Hk=1, Nq=12, D=4, seed=seed)
    sel = mra_select(q, k, None, 0.5, False, MraParams(block_size=4, blocks_per_row=8))
    assert sel.block_idx.shape[-1] == 3 and bool(sel.block_valid.all())


def test_fully_masked_key_block_gets_no_weight(seed):
    N, b = 24, 4
    q, k, _ = make_qkv(B=1, H=2, Hk=2, Nq=N, D=6, seed=seed)
    keep = torch.ones(1, 1, 1, N, dtype=torch.bool)
    keep[..., 8:12] = False
    keep[..., 17] = False
    v = (~keep[0, 0, 0]).double().view(1, 1, N, 1).expand(1, 2, N, 1).contiguous()
    for variant in ("mra2", "mra2s"):
        for causal in (False, True):
            for r in (1, 2, 6):
                out = mra_forward(q, k, v, keep, 1.0, causal, MraParams(b, r, variant))
                assert not out.isnan().any() and out.abs().max().item() == 0.0


@pytest.mark.parametrize("float_mask", [False, True])
def test_fully_masked_rows_match_sdpa(seed, float_mask):
    q, k, v = make_qkv(B=2, H=2, Hk=1, Nq=12, D=4, seed=seed, dtype=torch.float32)
    am = key_padding(2, 12, seed, dead_batch=1, float_mask=float_mask)
    am[0, 0, 0, :5] = False if not float_mask else float("-inf")  # causal rows 0..4 of batch 0 see nothing
    if float_mask:
        am = am.float()
    for causal in (False, True):
        sdpa = dense_attention(q, k, v, am, 0.5, causal)
        for variant in ("mra2", "mra2s"):
            for r in (1, 4):
                out = mra_forward(q, k, v, am, 0.5, causal, MraParams(4, r, variant))
                assert not out.isnan().any()
                assert out[1].abs().max().item() == 0.0
                if causal:
                    assert out[0, :, :5].abs().max().item() == 0.0 and sdpa[0, :, :5].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_exact_limit(seed, dtype):
    q, k, v = make_qkv(B=1, H=4, Hk=2, Nq=40, D=16, Dv=8, seed=seed, dtype=dtype)
    am = key_padding(1, 40, seed)
    for causal in (False, True):
        ref = dense_attention(q, k, v, am, 0.25, causal)
        out = mra_forward(q, k, v, am, 0.25, causal, MraParams(8, 5))
        assert out.dtype == dtype and not out.isnan().any()
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_float64_of_same_method(seed, dtype):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=64, D=16, seed=seed, dtype=dtype)
    p = MraParams(8, 2)
    out = mra_forward(q, k, v, None, 0.25, True, p)
    ref = mra_forward(q.double(), k.double(), v.double(), None, 0.25, True, p)
    assert rel_err(out, ref) < TOL[dtype]


def test_mra2_beats_mra2s_on_diffuse_attention(seed):
    """The pooled remainder helps when attention is spread out; a test that can fail."""
    q, k, v = make_qkv(B=1, H=4, Hk=4, Nq=128, D=16, seed=seed, spread=0.3)
    ref = dense_attention(q, k, v, None, 0.25)
    e2 = rel_err(mra_forward(q, k, v, None, 0.25, False, MraParams(16, 2, "mra2")), ref)
    e2s = rel_err(mra_forward(q, k, v, None, 0.25, False, MraParams(16, 2, "mra2s")), ref)
    assert e2 < e2s


def test_supports_and_forward_refusal(seed):
    site = dict(batch=1, num_heads=2, num_kv_heads=2, q_len=64, kv_len=64, head_dim=8, v_head_dim=8)
    p = METHOD.make_params({})
    for kind in ("none", "key_padding", "causal", "causal+key_padding"):
        assert METHOD.supports(SiteShape(**site, mask=kind), p) is None
    assert "general" in METHOD.supports(SiteShape(**site, mask="general"), p)
    q, k, v = make_qkv(B=1, H=1, Hk=1, Nq=8, D=4, seed=seed)
    with pytest.raises(ValueError, match="key-padding"):
        METHOD.forward(q, k, v, torch.rand(1, 1, 8, 8) > 0.5, 0.5, False, p)


def test_flops_formula_and_sympy():
    site = SiteShape(batch=2, num_heads=3, num_kv_heads=3, q_len=256, kv_len=256, head_dim=8, v_head_dim=4)
    p = MraParams(32, 4, "mra2")
    mq = mk = 8
    macs = 256 * 4 * 32 * 12 + mq * mk * 8 + mq * mk * 4 + 256 * 8 + 256 * 12
    assert METHOD.flops(site, p) == 2 * 2 * 3 * macs
    assert METHOD.flops(site, MraParams(32, 4, "mra2s")) == 2 * 2 * 3 * (macs - mq * mk * 4)
    n = sympy.Symbol("s0", positive=True, integer=True)
    sym = SiteShape(batch=1, num_heads=2, num_kv_heads=2, q_len=n, kv_len=n, head_dim=8, v_head_dim=8)
    expr = METHOD.flops(sym, p)
    assert isinstance(expr, sympy.Expr)
    for value in (50, 96, 4096):
        conc = SiteShape(batch=1, num_heads=2, num_kv_heads=2, q_len=value, kv_len=value, head_dim=8, v_head_dim=8)
        assert int(expr.subs(n, value)) == METHOD.flops(conc, p)


@pytest.mark.parametrize("chunk", [1, 200, 700])  # 1 block, 3 of 5 blocks, 2 of 4 heads
def test_chunks_give_the_same_result(seed, monkeypatch, chunk):
    import structattn.methods.mra.torch as mra_module

    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=19, D=4, seed=seed)
    am = key_padding(2, 19, seed, heads=4)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    p = MraParams(4, 2)
    one = mra_forward(*leaves, am, 0.5, True, p)
    g_one = torch.autograd.grad(one.square().sum(), leaves)
    monkeypatch.setattr(mra_module, "CHUNK_ELEMS", chunk)  # 1: one (head, query block) per chunk
    many = mra_forward(*leaves, am, 0.5, True, p)
    g_many = torch.autograd.grad(many.square().sum(), leaves)
    assert rel_err(many, one) < 1e-13
    for a, b in zip(g_many, g_one):
        assert rel_err(a, b) < 1e-12


_FAST_SHAPES = [(2, 4, 2, 100, 100), (1, 3, 3, 64, 64), (2, 2, 1, 37, 37)]


@pytest.mark.parametrize("variant", ["mra2", "mra2s"])
@pytest.mark.parametrize("mask", ["none", "bool", "padding_bias", "soft_bias"])
@pytest.mark.parametrize("causal,shape", [(c, s) for c in (False, True) for s in _FAST_SHAPES]
                         + [(False, (1, 2, 2, 20, 53))])   # causal cross attention runs the reference
def test_fast_cpu_path_equals_the_reference(causal, variant, mask, shape):
    """The fused CPU path (inference, no autograd) computes what the differentiable reference does."""
    from structattn.methods.mra import fused_cpu

    B, H, Hk, Nq, Nk = shape
    g = torch.Generator().manual_seed(hash((causal, variant, mask, shape)) % 2**31)
    q = torch.randn(B, H, Nq, 16, generator=g)
    k = torch.randn(B, Hk, Nk, 16, generator=g)
    v = torch.randn(B, Hk, Nk, 12, generator=g)
    keep = torch.ones(B, Nk, dtype=torch.bool)
    keep[0, -min(Nk // 3, 17):] = False
    keep[-1, 5:9] = False
    attn_mask = {"none": None, "bool": keep[:, None, None, :],
                 "padding_bias": torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :],
                 "soft_bias": torch.randn(B, 1, 1, Nk, generator=g) * 3}[mask]
    params = MraParams(block_size=8, blocks_per_row=3, variant=variant, sink_blocks=1)
    assert fused_cpu.usable(q, k, v, causal) is None
    with torch.no_grad():
        fast = mra_forward(q, k, v, attn_mask, 0.3, causal, params)
    ref = mra_forward(q.requires_grad_(), k, v, attn_mask, 0.3, causal, params)   # autograd: the reference
    assert torch.isfinite(fast).all()
    assert rel_err(fast, ref.detach()) < TOL[torch.float32]
