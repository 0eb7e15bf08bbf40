"""Every spelling of softmax(QK^T)V the matcher must find, one small module each.

Each module's output is the attention output itself, and every site runs the 'doubled' poison
method (exact attention x 2, see conftest.py): the compiled output must equal 2 x eager, which
proves the op replaced the whole chain with the right scale, mask and operands.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from testlib import B, D, H, N, Fn, check_doubled as check, explain_doubled, padding, qkv, rel_err

SPELLINGS = {
    "matmul_transpose_mul": lambda q, k, v: torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * D**-0.5, dim=-1), v),
    "at_operator_div": lambda q, k, v: (q @ k.transpose(2, 3) / math.sqrt(D)).softmax(-1) @ v,
    "mT_no_scale": lambda q, k, v: F.softmax(q @ k.mT, dim=-1) @ v,
    "permute_key": lambda q, k, v: F.softmax(q @ k.permute(0, 1, 3, 2) * 0.3, dim=3) @ v,
    "einsum_both": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.2).softmax(-1), v),
    "einsum_swapped_operands": lambda q, k, v: torch.einsum("bhkd,bhqd->bhqk", k, q).softmax(-1).matmul(v),
    "scale_on_q": lambda q, k, v: torch.softmax((q * D**-0.5) @ k.transpose(-1, -2), -1) @ v,
    "scale_both_sides": lambda q, k, v: torch.softmax((q * 0.7) @ (k * 0.6).transpose(-1, -2) * 0.5, -1) @ v,
    "softmax_dtype_and_casts": lambda q, k, v: F.softmax((q @ k.transpose(-2, -1)).float(), dim=-1, dtype=torch.float32).type_as(q).to(v.dtype) @ v,
    "eval_dropout": lambda q, k, v: F.dropout(F.softmax(q @ k.transpose(-2, -1) * 0.1, -1), p=0.3, training=False) @ v,
    "zero_p_dropout_training": lambda q, k, v: F.dropout(F.softmax(q @ k.transpose(-2, -1), -1), p=0.0, training=True) @ v,
    "contiguous_in_chain": lambda q, k, v: F.softmax((q @ k.transpose(-2, -1)).contiguous(), -1) @ v,
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_is_rewritten(name):
    check(SPELLINGS[name], *qkv())


def test_bmm_three_d():
    q, k, v = (t.reshape(B * H, N, D) for t in qkv())
    report = check(lambda q, k, v: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, -1), v), q, k, v)
    assert report.sites[0].num_heads == B * H and report.sites[0].q_len == N


def test_single_head_two_d():
    q, k, v = (t[0, 0] for t in qkv())
    check(lambda q, k, v: torch.softmax(q @ k.T * 0.3, -1) @ v, q, k, v)


def test_cross_attention_and_value_dim():
    q, k, v = qkv(n_q=6, n_k=13, dv=5)
    report = check(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.4, -1) @ v, q, k, v)
    site = report.sites[0]
    assert (site.q_len, site.kv_len, site.head_dim, site.v_head_dim) == (6, 13, D, 5)


def _additive(keep):
    return torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, torch.finfo(torch.float32).min)[:, None, None, :]


def test_additive_key_padding_mask():
    keep = padding()
    report = check(lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1) * 0.35 + m, -1) @ v, *qkv(), _additive(keep))
    assert report.sites[0].mask == "key_padding"


def test_mask_added_before_scale():
    keep = padding()
    report = check(lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1) + m) * 0.35, -1) @ v, *qkv(), _additive(keep))
    assert report.sites[0].mask == "key_padding"


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min, -1e9])
def test_masked_fill(fill):
    keep = padding()[:, None, None, :]
    report = check(lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~m, fill) * 0.3, -1) @ v, *qkv(), keep)
    assert report.sites[0].mask == "key_padding"


def test_where_mask():
    keep = padding()[:, None, None, :]
    fill = torch.finfo(torch.float32).min
    check(lambda q, k, v, m: torch.softmax(torch.where(m, q @ k.transpose(-2, -1), fill), -1) @ v, *qkv(), keep)


def test_general_mask_is_carried():
    mask = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    report = check(lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~m, float("-inf")), -1) @ v, *qkv(), mask)
    assert report.sites[0].mask == "general"


def test_causal_mask_built_in_forward_is_recognised():
    def fn(q, k, v):
        n = q.shape[-2]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        return torch.softmax((q @ k.transpose(-2, -1) * 0.3).masked_fill(~causal, float("-inf")), -1) @ v

    report = check(fn, *qkv())
    assert report.sites[0].mask == "causal"


def test_causal_from_index_comparison_with_padding():
    def fn(q, k, v, keep):
        n = q.shape[-2]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = (j <= i)[None, None] & keep[:, None, None, :]
        bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias, -1) @ v

    report = check(fn, *qkv(), padding())
    assert report.sites[0].mask == "causal+key_padding"


def test_bottom_right_causal_is_not_claimed_causal():
    def fn(q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        i = torch.arange(nq)[:, None] + (nk - nq)
        j = torch.arange(nk)[None, :]
        return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(j > i, float("-inf")), -1) @ v

    report = check(fn, *qkv(n_q=4, n_k=N))
    assert report.sites[0].mask == "general"


def _repeat_kv(x, groups):
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


@pytest.mark.parametrize("spelling", ["expand_reshape", "repeat_interleave"])
def test_gqa_repeat_is_undone(spelling):
    q, k, v = qkv(heads=4, kv_heads=2)
    rep = (lambda x: _repeat_kv(x, 2)) if spelling == "expand_reshape" else (lambda x: x.repeat_interleave(2, dim=1))
    report = check(lambda q, k, v: torch.softmax(q @ rep(k).transpose(-2, -1) * 0.3, -1) @ rep(v), q, k, v)
    assert (report.sites[0].num_heads, report.sites[0].num_kv_heads) == (4, 2)


class TestSDPA:
    def test_plain(self):
        report = check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv())
        assert report.sites[0].form == "sdpa"
        assert report.sites[0].scale == pytest.approx(1 / math.sqrt(D))

    def test_bool_mask_scale(self):
        keep = padding()[:, None, None, :]
        report = check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.2), *qkv(), keep)
        assert report.sites[0].mask == "key_padding" and report.sites[0].scale == pytest.approx(0.2)

    def test_float_general_mask(self):
        bias = torch.randn(1, H, N, N, generator=torch.Generator().manual_seed(5))
        report = check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *qkv(), bias)
        assert report.sites[0].mask == "general"

    def test_is_causal(self):
        report = check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), *qkv())
        assert report.sites[0].mask == "causal"

    def test_enable_gqa(self):
        q, k, v = qkv(heads=6, kv_heads=2)
        report = check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v)
        assert (report.sites[0].num_heads, report.sites[0].num_kv_heads) == (6, 2)


def test_inside_activation_checkpoint():
    class Inner(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, q, k, v):
            return checkpoint(self.inner, q, k, v, use_reentrant=False)

    args = qkv()
    with torch.no_grad():
        ref = Outer()(*args)
    report = explain_doubled(Outer(), *args)
    assert [s.rewritten for s in report.sites] == [True]
    assert report.sites[0].layer == "inner"
    assert rel_err(report.output, 2 * ref) < 1e-5


def test_two_sites_in_one_module_get_their_own_fqns():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Attn(), Attn()

        def forward(self, q, k, v):
            return self.second(self.first(q, k, v), k, v)

    args = qkv()
    report = explain_doubled(Two(), *args)
    assert [s.layer for s in report.sites] == ["first", "second"]
    with torch.no_grad():
        ref = Two()(*args)
    # doubled twice: the second layer sees 2x queries, so compare against a doubled eager model
    class TwoDoubled(Two):
        def forward(self, q, k, v):
            a = 2 * self.first(q, k, v)
            return 2 * self.second(a, k, v)

    with torch.no_grad():
        expected = TwoDoubled()(*args)
    assert rel_err(report.output, expected) < 1e-5


def test_in_place_updates_on_scores():
    def fn(q, k, v, bias):
        s = q @ k.transpose(-2, -1)
        s *= 0.3
        s += bias
        s.masked_fill_(bias < -1, float("-inf"))
        return torch.softmax(s, -1) @ v

    keep = padding()
    report = check(fn, *qkv(), _additive(keep))
    assert report.sites[0].mask == "key_padding"


def test_in_place_after_another_read_is_not_misread():
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1)
        first = torch.softmax(s, -1) @ v       # reads s before the mutation
        s.mul_(2.0)
        return first + torch.softmax(s, -1) @ v

    module = Fn(fn)
    args = qkv()
    with torch.no_grad():
        ref = module(*args)
    report = explain_doubled(module, *args)
    assert sum(s.rewritten for s in report.sites) == 0
    assert rel_err(report.output, ref) < 1e-6


def test_one_d_key_bias_at_rank_two():
    # a [Nk] bias broadcasts against [Nq, Nk] scores; the op gets it as [1, 1, 1, Nk] (SDPA
    # rejects masks under 2-D)
    q, k, v = (t[0, 0] for t in qkv())
    check(lambda q, k, v, b: torch.softmax(q @ k.T * 0.3 + b, -1) @ v, q, k, v, torch.randn(N))


@pytest.mark.filterwarnings("ignore:The use of `x.T`")   # deprecated for rank != 2, still valid code
def test_dot_T_reverses_every_dim():
    # at rank 3, k.T is k.permute(2, 1, 0), not a transpose of the last two dims
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(4, 5, 4, generator=g), torch.randn(4, 4, 4, generator=g), torch.randn(4, 4, 3, generator=g)
    check(lambda q, k, v: torch.softmax(q @ k.T, -1) @ v, q, k, v)
