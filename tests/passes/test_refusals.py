"""Attention-like graphs the pass must NOT rewrite: zero rewrites, a reason, eager output."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from testlib import Fn, explain_doubled, qkv, rel_err


def refused(fn, *args, reason):
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    report = explain_doubled(module, *args)
    assert len(report.sites) >= 1, "the site must still be reported"
    assert sum(s.rewritten for s in report.sites) == 0, str(report)
    assert all(reason in (s.reason or "") for s in report.sites), str(report)
    out = report.output[0] if isinstance(report.output, tuple) else report.output
    expected = ref[0] if isinstance(ref, tuple) else ref
    assert rel_err(out, expected) < 1e-6
    return report


def test_attention_weights_returned():
    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), -1)
        return p @ v, p

    refused(fn, *qkv(), reason="attention probabilities")


def test_scores_returned():
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.3
        return torch.softmax(s, -1) @ v, s

    refused(fn, *qkv(), reason="attention scores")


def test_head_mask_on_probabilities():
    head_mask = torch.rand(1, 3, 1, 1)
    refused(lambda q, k, v, hm: (torch.softmax(q @ k.transpose(-2, -1), -1) * hm) @ v, *qkv(), head_mask,
            reason="probabilities are multiplied")


def test_softmax_over_query_axis():
    refused(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v, *qkv(), reason="not the key axis")


def test_channel_attention():
    # XCiT-style cross-covariance attention: softmax over channels, not tokens
    refused(lambda q, k, v: torch.softmax(q.transpose(-2, -1) @ k, -1) @ v.transpose(-2, -1), *qkv(),
            reason="attention over channels")


def test_non_elementwise_op_on_scores():
    refused(lambda q, k, v: torch.softmax(torch.roll(q @ k.transpose(-2, -1), 1, -1), -1) @ v, *qkv(),
            reason="scores pass through")


def test_softcapping_tanh_on_scores():
    refused(lambda q, k, v: torch.softmax(torch.tanh(q @ k.transpose(-2, -1) / 30) * 30, -1) @ v, *qkv(),
            reason="scores pass through")


def test_active_dropout_in_training():
    refused(lambda q, k, v: F.dropout(torch.softmax(q @ k.transpose(-2, -1), -1), p=0.0 + 0.5, training=True) @ v * 0
            + 1.0, *qkv(), reason="dropout is active")


def test_sdpa_with_dropout():
    refused(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5) * 0 + 1, *qkv(), reason="dropout_p")


def test_key_not_transposed_is_not_guessed():
    # q @ W with a plain matrix (e.g. a learned [D, N] table): no transpose says which axis is keys
    table = torch.randn(8, 10)
    refused(lambda q, k, v, t: torch.softmax(q @ t, -1) @ v, *qkv(), table, reason="not a transpose")


def test_mha_returning_weights():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            out, weights = self.attn(x, x, x, need_weights=True)
            return out + weights.sum()

    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = M()(x)
    report = explain_doubled(M(), x)
    assert [s.rewritten for s in report.sites] == [False]
    assert "attention weights" in report.sites[0].reason and report.sites[0].layer == "attn"
    assert rel_err(report.output, ref) < 1e-6
