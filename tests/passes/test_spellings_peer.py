"""Spellings from real models and peer compilers' tests that the matcher must find (issue classes:
metadata-only uses of the scores, views around the mask, graph-built fill values, index-difference
and triangular causal masks, per-head temperatures, keys transposed before the GQA repeat, a
mask before a tensor scale, BLOOM's baddbmm). Each runs on the 'doubled' poison method, so the
compiled output equals 2 x eager only if the op replaced the whole chain correctly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from testlib import B, D, H, N, check_doubled as check, padding, qkv

FMIN = torch.finfo(torch.float32).min


def test_t5_softmax_float_type_as_scores():
    # T5: the scores' only other use is reading their dtype
    check(lambda q, k, v: F.softmax((q @ k.transpose(3, 2)).float(), dim=-1).type_as(q @ k.transpose(3, 2)) @ v, *qkv())

    def t5(q, k, v, bias):
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += bias
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        weights = F.dropout(weights, p=0.1, training=False)
        return torch.matmul(weights, v)

    report = check(t5, *qkv(), torch.randn(1, H, N, N))
    assert report.sites[0].mask == "general"


def test_mask_expand_as_scores():
    keep = padding()[:, None, None, :]

    def fn(q, k, v, m):
        s = q @ k.transpose(-2, -1) * 0.3
        return torch.softmax(s.masked_fill(~m.expand_as(s), FMIN), -1) @ v

    assert check(fn, *qkv(), keep).sites[0].mask == "key_padding"


def test_clone_of_probabilities():
    check(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1).clone() @ v, *qkv())


def test_views_around_the_mask_add():
    keep = padding()

    def fn(q, k, v, keep):
        q3, k3, v3 = (t.reshape(B * H, -1, t.shape[-1]) for t in (q, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2)) * 0.3
        s = s.view(B, H, N, N) + torch.where(keep, 0.0, FMIN)[:, None, None, :]
        p = torch.softmax(s, -1).view(B * H, N, N)
        return torch.bmm(p, v3).view(B, H, N, D)

    report = check(fn, *qkv(), keep)
    assert report.sites[0].mask == "key_padding"
    assert (report.sites[0].batch, report.sites[0].num_heads) == (B, H)


def test_bloom_baddbmm_alibi_then_view():
    keep = padding()
    slopes = torch.tensor([0.5, 0.25, 0.125])
    alibi = (slopes[None, :, None] * torch.arange(N)[None, None, :]).expand(B, H, N).reshape(B * H, 1, N)

    def fn(q, k, v, keep, alibi):
        q3, k3, v3 = (t.reshape(B * H, -1, t.shape[-1]) for t in (q, k, v))
        s = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=1 / math.sqrt(D))
        s = s.view(B, H, N, -1) + torch.where(keep[:, None, None, :], 0.0, FMIN)
        p = F.softmax(s, dim=-1, dtype=torch.float32).view(B * H, N, -1)
        return torch.bmm(p, v3)

    check(fn, *qkv(), keep, alibi)


def test_where_with_fill_built_in_the_graph():
    # legacy GPT-2: mask_value = torch.full([], finfo.min, dtype=..., device=...)
    def fn(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        n = s.shape[-1]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        fill = torch.full([], torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device)
        return torch.softmax(torch.where(causal, s.to(s.dtype), fill), -1) @ v

    assert check(fn, *qkv()).sites[0].mask == "causal"


@pytest.mark.parametrize("spelling", ["diff_ge_0", "diff_le_0", "full_inf_triu", "one_minus_tril_times_big"])
def test_causal_spellings(spelling):
    def fn(q, k, v):
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        s = q @ k.transpose(-2, -1) * 0.3
        if spelling == "diff_ge_0":
            s = s.masked_fill(~((i - j) >= 0), float("-inf"))
        elif spelling == "diff_le_0":
            s = s.masked_fill((j - i) > 0, FMIN)
        elif spelling == "full_inf_triu":
            s = s + torch.full((n, n), float("-inf")).triu(1)
        else:
            s = s + (1.0 - torch.tril(torch.ones(n, n, dtype=torch.bool)).float()) * -10000.0
        return torch.softmax(s, -1) @ v

    assert check(fn, *qkv()).sites[0].mask == "causal"


def test_per_head_temperature_folds_into_q():
    temp = torch.rand(H, 1, 1) + 0.5
    report = check(lambda q, k, v, t: torch.softmax((q @ k.transpose(-2, -1)) * t, -1) @ v, *qkv(), temp)
    assert report.sites[0].rewritten


def test_key_transposed_before_gqa_repeat():
    q, k, v = qkv(heads=4, kv_heads=2)

    def repeat(x):
        b, h, n, d = x.shape
        return x[:, :, None].expand(b, h, 2, n, d).reshape(b, h * 2, n, d)

    report = check(lambda q, k, v: torch.softmax(q @ repeat(k.transpose(-1, -2)) * 0.3, -1) @ repeat(v), q, k, v)
    assert (report.sites[0].num_heads, report.sites[0].num_kv_heads) == (4, 2)


def test_key_permuted_before_gqa_repeat_value_not_repeated_the_same_way():
    q, k, v = qkv(heads=4, kv_heads=2)

    def repeat(x):
        b, h, n, d = x.shape
        return x[:, :, None].expand(b, h, 2, n, d).reshape(b, h * 2, n, d)

    # v repeated with repeat_interleave (same grouping), k transposed first: both un-repeated
    check(lambda q, k, v: torch.softmax(q @ repeat(k.permute(0, 1, 3, 2)), -1) @ v.repeat_interleave(2, dim=1), q, k, v)


def test_mask_before_a_buffer_scale():
    keep = padding()
    scale = torch.tensor(0.3)

    def fn(q, k, v, keep, scale):
        s = (q @ k.transpose(-2, -1) + torch.where(keep, 0.0, -1e4)[:, None, None, :]) * scale
        return torch.softmax(s, -1) @ v

    check(fn, *qkv(), keep, scale)

    bias = torch.randn(1, H, N, N)
    check(lambda q, k, v, b, s: torch.softmax((q @ k.transpose(-2, -1) + b) * s, -1) @ v, *qkv(), bias, scale)


@pytest.mark.parametrize("scaled", [False, True])
def test_older_bloom_key_permuted_then_reshaped(scaled):
    # transformers 4.2x BLOOM: k.permute(0, 2, 3, 1).reshape(B*H, D, N), from [B, N, H, D]
    def fn(q, k, v):
        kt = k.permute(0, 2, 3, 1)
        kt = kt * 0.5 if scaled else kt
        s = torch.bmm(q.reshape(B * H, N, D), kt.reshape(B * H, D, N)) * 0.3
        return torch.bmm(torch.softmax(s, -1), v.reshape(B * H, N, D))

    q, k, v = qkv()
    check(fn, q, k.transpose(1, 2).contiguous(), v)


def test_mask_added_in_split_view_softmax_in_merged_view():
    # bmm on [B*H, N, D] -> view [B, H, N, N] -> + mask -> view back -> softmax -> bmm
    def fn(q, k, v, keep):
        s = torch.bmm(q.reshape(B * H, N, D), k.reshape(B * H, N, D).transpose(1, 2)).view(B, H, N, N)
        s = (s + torch.where(keep, 0.0, FMIN)[:, None, None, :]).view(B * H, N, N)
        return torch.bmm(torch.softmax(s, -1), v.reshape(B * H, N, D))

    assert check(fn, *qkv(), padding()).sites[0].mask == "key_padding"


def test_causal_index_comparison_with_one_query():
    # arange(1)[:, None] is [1, 1]: on either axis alike; the comparison still spans [Q, K]
    q, k, v = qkv(n_q=1, n_k=1)

    def fn(q, k, v):
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
        return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(j > i, float("-inf")), -1) @ v

    assert check(fn, q, k, v).sites[0].mask == "causal"
