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


@pytest.mark.parametrize("method", ["monarch"])
def test_methods_without_score_mods_stay_exact_with_the_reason(method):
    report, ref = _run(unseen_chain, *qkv(64, 64, dtype=torch.float64), method=method)
    [site] = report.sites
    assert site.rewritten and site.method == "exact", str(report)
    assert "score modification" in site.reason or "score_mod" in site.reason, site.reason
    assert rel_err(report.output, ref) < 1e-10


@pytest.mark.parametrize("case", sorted(CASES))
def test_mra_applies_every_chain_and_equals_eager_at_its_limit(case):
    fn, extra, labels = CASES[case]
    q, k, v = qkv(N, N, heads=3, kv_heads=3, dtype=torch.float64)
    report, ref = _run(fn, q, k, v, *extra, method="mra", params={"block_size": 4, "blocks_per_row": N // 4})
    [site] = report.sites
    assert site.rewritten and site.method == "mra", str(report)
    assert all(label in site.terms for label in labels), str(report)
    assert rel_err(report.output, ref) < 1e-10
    # below the limit (2 of 6 blocks exact) it approximates: random q, k give near-uniform rows
    # (plain MRA measured 0.46 here); the method tests check it against its reference
    report, _ = _run(fn, q, k, v, *extra, method="mra", params={"block_size": 4, "blocks_per_row": 2})
    assert report.sites[0].method == "mra" and torch.isfinite(report.output).all()
    assert 1e-6 < rel_err(report.output, ref) < 1.0


def test_materialised_general_bias_stays_a_mask():
    bias = torch.randn(N, N, dtype=torch.float64)
    report, ref = _run(lambda q, k, v, b: torch.softmax(q @ k.transpose(-2, -1) + b, -1) @ v,
                       *qkv(N, N, dtype=torch.float64), bias)
    [site] = report.sites
    assert site.mask == "general" and "bias" not in site.terms, str(report)
    assert rel_err(report.output, ref) < 1e-10


# ------------------------------------------------------------------------------------------------
# a sliding-window mask proven causal & window reaches the op as is_causal plus the window
# ------------------------------------------------------------------------------------------------
def banded(q, k, v):
    """Mistral's spelling: where((kv > q - 4) & (kv <= q), 0, finfo.min) added to the scores."""
    qi, ki = torch.arange(q.shape[-2]).view(-1, 1), torch.arange(k.shape[-2]).view(1, -1)
    fill = torch.tensor(torch.finfo(q.dtype).min, dtype=q.dtype)
    mask = torch.where((ki > qi - 4) & (ki <= qi), torch.zeros((), dtype=q.dtype), fill)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v


def two_sided_keep(q, k, v):
    """A non-causal band as a bool keep mask, with more queries than keys: rows 15.. see no key
    (eager: masked_fill with finfo.min -> the uniform average of v)."""
    qi, ki = torch.arange(q.shape[-2]).view(-1, 1), torch.arange(k.shape[-2]).view(1, -1)
    keep = (ki - qi >= -2) & (ki - qi <= 3)
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, torch.finfo(q.dtype).min)
    return torch.softmax(s, -1) @ v


def band_and_bias(q, k, v, bias):
    """The band plus a materialised bias: not every mask term is a window, the mask stays general."""
    qi, ki = torch.arange(q.shape[-2]).view(-1, 1), torch.arange(k.shape[-2]).view(1, -1)
    mask = torch.where((ki > qi - 4) & (ki <= qi), 0.0, float("-inf"))
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask + bias, -1) @ v


@pytest.mark.parametrize("method,params", [("exact", None), ("topk", {"k": 5}), ("mra", {"block_size": 4, "blocks_per_row": 6})])
def test_a_proven_window_reaches_the_op_as_causal_and_window(method, params):
    report, ref = _run(banded, *qkv(N, N, dtype=torch.float64), method=method, params=params)
    [site] = report.sites
    assert site.rewritten and site.method == method, str(report)
    assert site.mask == "causal" and "window(3,0)" in site.terms and "general" not in site.terms, str(report)
    assert rel_err(report.output, ref) < 1e-10


def test_a_proven_two_sided_window_keeps_eagers_dead_rows():
    q, k, v = qkv(N, 12, dtype=torch.float64)
    report, ref = _run(two_sided_keep, q, k, v)
    [site] = report.sites
    assert site.mask == "none" and "window(2,3)" in site.terms, str(report)
    assert rel_err(report.output, ref) < 1e-10
    assert rel_err(ref[..., 20, :], v.mean(-2)) < 1e-10          # a dead row: eager's uniform average


def test_monarch_refuses_a_proven_window_with_its_reason():
    report, ref = _run(two_sided_keep, *qkv(N, 12, dtype=torch.float64), method="monarch", params={"block_size": 4})
    [site] = report.sites
    assert site.method == "exact" and "monarch has no sliding-window form (window(2,3))" in site.reason, str(report)
    assert rel_err(report.output, ref) < 1e-10


def test_a_window_with_another_mask_term_stays_general():
    bias = torch.randn(N, N, dtype=torch.float64)
    report, ref = _run(band_and_bias, *qkv(N, N, dtype=torch.float64), bias)
    [site] = report.sites
    assert site.mask == "general", str(report)
    assert rel_err(report.output, ref) < 1e-10
