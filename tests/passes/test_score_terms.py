"""Score terms read from the graph (passes/terms.py): element-wise chains between QK^T and softmax
become the op's score_mod, biases built from positions join it, each site's terms are reported,
and the rewritten graph computes eager's output (float64) with exact and with top-k at k >= N."""
from __future__ import annotations

import pytest
import torch

import structattn
from testlib import Fn, qkv, rel_err

N = 24


def _run(fn, *args, method="exact", params=None):
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    options = {"method": method, "compiler": "eager", "exact_when_cheaper": False}
    if params:
        options[method] = params
    report = structattn.explain(module, *args, options=options)
    return report, ref


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def softcap(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s = torch.tanh(s / 30.0) * 30.0
    return torch.softmax(s.masked_fill(~_causal(q.shape[-2]), float("-inf")), -1) @ v


def relative_alibi(q, k, v, slopes):
    s = q @ k.transpose(-2, -1) * 0.25
    pos = torch.arange(q.shape[-2])
    bias = -slopes.view(-1, 1, 1) * (pos.view(1, 1, -1) - pos.view(1, -1, 1)).abs()
    return torch.softmax(s + bias, -1) @ v


def unseen_chain(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s = s + 0.5 * torch.sigmoid(s) - torch.exp(-s.abs())
    return torch.softmax(s, -1) @ v


def per_head_after_cap(q, k, v, temp):
    s = torch.tanh(q @ k.transpose(-2, -1) / 10.0) * temp
    return torch.softmax(s, -1) @ v


CASES = {
    "softcap": (softcap, (), ("softcap(30)", "causal")),
    "relative_alibi": (relative_alibi, (torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64),), ("bias(relative)",)),
    "unseen_chain": (unseen_chain, (), ("score_mod(",)),
    "per_head_after_cap": (per_head_after_cap, (torch.rand(1, 3, 1, 1, dtype=torch.float64) + 0.5,), ("score_mod(",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method,params", [("exact", None), ("topk", {"k": N})])
def test_chain_rewritten_and_exact(case, method, params):
    fn, extra, labels = CASES[case]
    report, ref = _run(fn, *qkv(N, N, heads=3, kv_heads=3, dtype=torch.float64), *extra, method=method, params=params)
    [site] = report.sites
    assert site.rewritten and site.method == method, str(report)
    for label in labels:
        assert label in site.terms, (site.terms, str(report))
    assert "terms" in str(report).splitlines()[0]
    assert rel_err(report.output, ref) < 1e-10


def test_softcap_scale_goes_to_the_op():
    report, _ = _run(softcap, *qkv(N, N, dtype=torch.float64))
    [site] = report.sites
    assert site.scale == pytest.approx(0.25)
    code = report.graphs[0].after.code
    assert "tanh" in code and "'(tanh((s / 30.0)) * 30.0)'" in code, code


def test_topk_small_k_keeps_the_softcap():
    # eager's soft-capped softmax restricted to the k largest logits, from the float64 reference
    from structattn.methods.base import ScoreMods
    from structattn.methods.topk.naive import topk_attention

    q, k, v = qkv(N, N, heads=3, kv_heads=3, dtype=torch.float64)
    report, _ = _run(softcap, q, k, v, method="topk", params={"k": 5})
    ref = topk_attention(q, k, v, None, 0.25, True, 5, ScoreMods("(tanh((s / 30.0)) * 30.0)"))
    assert rel_err(report.output, ref) < 1e-10


@pytest.mark.parametrize("method", ["mra", "monarch"])
def test_methods_without_score_mods_stay_exact_with_the_reason(method):
    report, ref = _run(unseen_chain, *qkv(64, 64, dtype=torch.float64), method=method)
    [site] = report.sites
    assert site.rewritten and site.method == "exact", str(report)
    assert "score modification" in site.reason or "score_mod" in site.reason, site.reason
    assert rel_err(report.output, ref) < 1e-10


def test_materialised_general_bias_stays_a_mask():
    bias = torch.randn(N, N, dtype=torch.float64)
    report, ref = _run(lambda q, k, v, b: torch.softmax(q @ k.transpose(-2, -1) + b, -1) @ v,
                       *qkv(N, N, dtype=torch.float64), bias)
    [site] = report.sites
    assert site.mask == "general" and "bias" not in site.terms, str(report)
    assert rel_err(report.output, ref) < 1e-10
