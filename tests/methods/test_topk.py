"""Top-k attention: exact limit, an independent float64 implementation, masks, chunking, dtypes, FLOPs."""
from __future__ import annotations

import pytest
import sympy
import torch

from structattn.methods import SiteShape, get_method
from structattn.methods.exact.naive import dense_attention
from structattn.methods.topk import TopkParams, topk_forward, topk_pieces
from structattn.methods.topk.naive import topk_attention as naive_topk

from testlib import TOL, key_padding, make_qkv, rel_err

METHOD = get_method("topk")


def _mask(kind, B, H, Nq, Nk, seed):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "key_padding":
        return key_padding(B, Nk, seed)
    if kind == "general_bool":
        m = torch.rand(B, H, Nq, Nk, generator=g) < 0.6
        m[..., 0, :] = False  # one fully masked query row
        return m
    if kind == "general_float":
        return torch.randn(1, H, Nq, Nk, generator=g, dtype=torch.float64)
    raise AssertionError(kind)


@pytest.mark.parametrize("mask", [None, "key_padding", "general_bool", "general_float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(13, 13), (6, 17), (17, 6)])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_k_at_least_n_is_exact(seed, mask, causal, Nq, Nk, chunk):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=Nq, Nk=Nk, D=6, Dv=5, seed=seed)
    am = _mask(mask, 2, 4, Nq, Nk, seed)
    ref = dense_attention(q, k, v, am, 0.7, causal)
    for kk in (Nk, Nk + 10):
        out = topk_forward(q, k, v, am, 0.7, causal, TopkParams(k=kk, chunk_size=chunk))
        assert out.shape == (2, 4, Nq, 5)
        assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("mask", [None, "key_padding", "general_bool", "general_float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kk", [1, 3, 7])
def test_matches_independent_float64_implementation(seed, mask, causal, kk):
    q, k, v = make_qkv(B=1, H=4, Hk=2, Nq=15, Nk=15, D=5, Dv=3, seed=seed)
    am = _mask(mask, 1, 4, 15, 15, seed)
    out = topk_forward(q, k, v, am, 0.6, causal, TopkParams(k=kk, chunk_size=4))
    ref = naive_topk(q, k, v, am, 0.6, causal, kk)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-12


def test_chunking_does_not_change_the_result(seed):
    q, k, v = make_qkv(B=2, H=6, Hk=3, Nq=33, Nk=40, D=8, seed=seed, dtype=torch.float32)
    am = _mask("general_bool", 2, 6, 33, 40, seed)
    outs = [topk_forward(q, k, v, am, 0.3, True, TopkParams(k=5, chunk_size=c)) for c in (1, 7, 64, 200, 10**6)]
    for o in outs[1:]:  # same selection; only matmul blocking (float rounding) may differ
        assert rel_err(o, outs[0]) < 1e-6


def test_pieces_respect_chunk_size():
    for bh, g, nq, c in [(24, 1, 8192, 1024), (8, 4, 100, 1024), (96, 1, 197, 1024), (4, 8, 3, 2), (3, 2, 5, 1)]:
        heads, qper = topk_pieces(bh, g, nq, c)
        assert 1 <= heads <= bh and 1 <= qper <= nq
        assert heads * g * qper <= max(c, g)


def test_masked_keys_never_get_weight(seed):
    """Rows with fewer unmasked keys than k: the extra picks are masked and carry zero mass."""
    N = 12
    q, k, _ = make_qkv(B=1, H=2, Hk=2, Nq=N, D=4, seed=seed)
    keep = torch.zeros(1, 1, 1, N, dtype=torch.bool)
    keep[..., [1, 5]] = True
    v = (~keep[0, 0, 0]).double().view(1, 1, N, 1).expand(1, 2, N, 1).contiguous()
    for causal in (False, True):
        out = topk_forward(q, k, v, keep, 1.0, causal, TopkParams(k=6, chunk_size=5))
        assert not out.isnan().any() and out.abs().max().item() == 0.0


def test_fully_masked_rows_match_sdpa(seed):
    q, k, v = make_qkv(B=2, H=2, Hk=2, Nq=9, D=4, seed=seed, dtype=torch.float32)
    am = torch.rand(2, 2, 9, 9) < 0.5
    am[0, 1, 3] = False
    am[1, :, :, :] = False
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am)
    out = topk_forward(q, k, v, am, 0.5, False, TopkParams(k=3))
    assert not out.isnan().any()
    assert out[0, 1, 3].abs().max().item() == 0.0 and sdpa[0, 1, 3].abs().max().item() == 0.0
    assert out[1].abs().max().item() == 0.0 and sdpa[1].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_exact_limit(seed, dtype):
    q, k, v = make_qkv(B=1, H=4, Hk=2, Nq=40, D=16, Dv=8, seed=seed, dtype=dtype)
    ref = dense_attention(q, k, v, None, 0.25, True)
    out = topk_forward(q, k, v, None, 0.25, True, TopkParams(k=40, chunk_size=16))
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


def test_supports_everything():
    site = dict(batch=1, num_heads=2, num_kv_heads=1, q_len=64, kv_len=30, head_dim=8, v_head_dim=4)
    for kind in ("none", "key_padding", "causal", "causal+key_padding", "general"):
        assert METHOD.supports(SiteShape(**site, mask=kind), METHOD.make_params({})) is None


def test_flops_formula_and_sympy():
    site = SiteShape(batch=2, num_heads=3, num_kv_heads=3, q_len=100, kv_len=50, head_dim=8, v_head_dim=4)
    assert METHOD.flops(site, TopkParams(k=10)) == 2 * 6 * (100 * 50 * 8 + 100 * 10 * 4)
    assert METHOD.flops(site, TopkParams(k=500)) == 2 * 6 * (100 * 50 * 8 + 100 * 50 * 4)
    n = sympy.Symbol("s0", positive=True, integer=True)
    sym = SiteShape(batch=1, num_heads=1, num_kv_heads=1, q_len=n, kv_len=n, head_dim=8, v_head_dim=8)
    expr = METHOD.flops(sym, TopkParams(k=64))
    assert int(expr.subs(n, 32)) == 2 * (32 * 32 * 8 + 32 * 32 * 8)
    assert int(expr.subs(n, 1000)) == 2 * (1000 * 1000 * 8 + 1000 * 64 * 8)
