"""The attention spellings a peer compiler's own fusion patterns target (inductor's SDPA
patterns: plain, scaled by mul/div, masked by add / masked_fill / where, permuted inputs, fp32
softmax with casts back, T5's type_as, DistilBERT's `(mask == 0).view(..).expand_as(scores)`,
GPT-2's `torch.full` scale and fill, MBart's bmm + view around the mask, dropout that is off at
inference), written as modules of our own. Each must be rewritten (1 site, output 2x eager on the
'doubled' poison method) -- or, for active training dropout, refused with eager's output."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from testlib import Fn, explain_doubled, rel_err

B, N, H, D = 2, 6, 3, 8


def inputs(dtype=torch.float32, layout="bhnd"):
    g = torch.Generator().manual_seed(7)
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    return tuple(torch.randn(*shape, generator=g).to(dtype) for _ in range(3))


def additive_mask():
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[1, ..., 4:] = False
    return torch.zeros(B, 1, 1, N).masked_fill(~keep, torch.finfo(torch.float32).min)


def int_mask():
    m = torch.ones(B, N, dtype=torch.long)
    m[1, 4:] = 0
    return m


def causal_bool():
    return torch.tril(torch.ones(N, N, dtype=torch.bool))[None, None]


def _perm(t):
    return t.permute(0, 2, 1, 3)


SPELLINGS = {
    "matmul_div_softmax": (lambda q, k, v: torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(D)).softmax(dim=-1).matmul(v), inputs),
    "matmul_mul_softmax": (lambda q, k, v: torch.matmul(q, k.transpose(-2, -1)).mul(0.3).softmax(dim=-1).matmul(v), inputs),
    "eval_dropout": (lambda q, k, v: F.dropout(torch.matmul(q, k.transpose(-2, -1)).div(2.0).softmax(dim=-1), p=0.2, training=False).matmul(v), inputs),
    "additive_mask": (lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + m, dim=-1) @ v,
                      lambda: inputs() + (additive_mask(),)),
    "dropout_zero_p": (lambda q, k, v, m: torch.dropout(torch.softmax(q @ k.transpose(-2, -1) / 3.0 + m, dim=-1), 0.0, True) @ v,
                       lambda: inputs() + (additive_mask(),)),
    "permuted_fp32_softmax_cast_back": (
        lambda q, k, v: (torch.softmax((_perm(q) @ _perm(k).transpose(-2, -1) / 2.0).to(torch.float32), dim=-1)
                         .to(torch.float16) @ _perm(v).to(torch.float16)),
        lambda: inputs(torch.float16, "bnhd")),
    "q_prescaled_permuted": (
        lambda q, k, v: torch.softmax(((_perm(q) / 2.0) @ _perm(k).transpose(-2, -1)).to(torch.float32), dim=-1)
        .to(torch.float16) @ _perm(v).to(torch.float16),
        lambda: inputs(torch.float16, "bnhd")),
    "hf_permuted_div": (lambda q, k, v: torch.matmul(_perm(q), _perm(k).transpose(-2, -1)).div(2.5).softmax(dim=-1).matmul(_perm(v)),
                        lambda: inputs(layout="bnhd")),
    "bmm_3d": (lambda q, k, v: torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1), v),
               lambda: tuple(t.reshape(B * H, N, D) for t in inputs())),
    "bert_permuted_mask": (
        lambda q, k, v, m: (torch.matmul(_perm(q), _perm(k).transpose(-2, -1)).div(2.0) + m).softmax(dim=-1).matmul(_perm(v)),
        lambda: inputs(layout="bnhd") + (additive_mask(),)),
    "distilbert_eq_zero_expand_as": (
        lambda q, k, v, m: torch.softmax(
            (_perm(q) @ _perm(k).transpose(-2, -1)).div(2.0).masked_fill(
                (m == 0).view((B, 1, 1, N)).expand_as(_perm(q) @ _perm(k).transpose(-2, -1)),
                torch.full((), -float("inf"))), dim=-1) @ _perm(v),
        lambda: inputs(layout="bnhd") + (int_mask(),)),
    "distilbert_q_prescaled": (
        lambda q, k, v, m: F.dropout(torch.softmax(
            (_perm(q).div(2.0) @ _perm(k).transpose(-2, -1)).masked_fill((m == 0).view((B, 1, 1, N)), -float("inf")),
            dim=-1), 0.1, training=False) @ _perm(v),
        lambda: inputs(layout="bnhd") + (int_mask(),)),
    "gpt2_full_scale_where_fill": (
        lambda q, k, v, c: F.dropout(torch.where(
            c, torch.matmul(q, k.permute(0, 1, 3, 2)).div(torch.full([], 2.0)),
            torch.full((), torch.finfo(torch.float32).min)).softmax(dim=-1), 0.1, training=False).matmul(v),
        lambda: inputs() + (causal_bool(),)),
    "t5_type_as_float_softmax": (
        lambda q, k, v, m: (torch.matmul(_perm(q), _perm(k).permute(0, 1, 3, 2)) + m).type_as(q).float()
        .softmax(dim=-1).type_as(q).matmul(_perm(v)),
        lambda: inputs(layout="bnhd") + (torch.randn(1, H, N, N),)),
    "t5_no_mask_float_roundtrip": (
        lambda q, k, v: torch.matmul(_perm(q), _perm(k).permute(0, 1, 3, 2)).float().type_as(q).float()
        .softmax(dim=-1).type_as(q).matmul(_perm(v)),
        lambda: inputs(layout="bnhd")),
    "mbart_bmm_views_around_mask": (
        lambda q, k, v, m: torch.bmm(F.softmax(
            (torch.bmm(q.reshape(B * H, -1, D), k.reshape(B * H, -1, D).transpose(1, 2)).view(B, H, N, -1) + m)
            .view(B * H, N, -1), dim=-1), v.reshape(B * H, -1, D)).view(B, H, N, D),
        lambda: inputs() + (additive_mask(),)),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_peer_pattern_is_rewritten(name):
    fn, make = SPELLINGS[name]
    args = make()
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    report = explain_doubled(module, *args)
    assert sum(s.rewritten for s in report.sites) == 1, str(report)
    tol = 2e-3 if args[0].dtype == torch.float16 else 1e-5
    assert rel_err(report.output, 2 * ref) < tol


def test_gpt2_where_with_finite_fill_then_additive_mask_is_declined():
    """GPT-2's inductor pattern: ``where(causal, s, finfo.min) + additive_mask`` with a causal mask
    given at run time (not provable from the graph). The op holds one mask, so it cannot tell
    the entries eager filled with finfo.min from those the additive mask pushed down; a row whose
    keys are all masked would differ. Declined with that reason, and eager's output kept."""
    fn = lambda q, k, v, c, m: (torch.where(c, torch.matmul(q, k.permute(0, 1, 3, 2)).div(torch.full([], 2.0)),  # noqa: E731
                                            torch.full((), torch.finfo(torch.float32).min)) + m) \
        .softmax(dim=-1).type(v.dtype).matmul(v)
    args = inputs() + (causal_bool(), additive_mask())
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    report = explain_doubled(module, *args)
    assert [s.rewritten for s in report.sites] == [False], str(report)
    assert "finite fill" in report.sites[0].reason
    assert rel_err(report.output, ref) < 1e-6


@pytest.mark.parametrize("dropout", ["F.dropout", "torch.dropout"])
def test_training_dropout_is_refused(dropout):
    def fn(q, k, v):
        p = torch.matmul(q, k.transpose(-2, -1)).div(2.0).softmax(dim=-1)
        p = F.dropout(p, p=0.3) if dropout == "F.dropout" else torch.dropout(p, 0.3, True)
        return p.matmul(v) * 0 + 1.0   # the random mask must not decide the comparison

    module = Fn(fn)
    args = inputs()
    report = explain_doubled(module, *args)
    assert [s.rewritten for s in report.sites] == [False] and "dropout" in report.sites[0].reason
    assert torch.equal(report.output, torch.ones_like(report.output))
