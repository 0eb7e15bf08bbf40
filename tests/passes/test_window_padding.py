"""A banded mask with key padding inside it (passes/windows.py ``window_plan``): the mask
``window & causal & keep[b, k]`` reaches the op as is_causal, the window and a [B, 1, 1, K]
key-padding keep mask; a finite fill becomes the dead-row program over causal (c), window (w) and
padded (m) entries, so rows whose every key is masked get eager's answer. float64 against eager,
left / right padding and a fully padded batch item, exact, top-k at k >= N and MRA with every
block selected (their exact limits)."""
from __future__ import annotations

import pytest
import torch

import structattn
from structattn.lowering.dead_rows import apply_dead_rows, dead_row_mask
from structattn.methods.base import ScoreMods
from testlib import Fn, make_qkv, rel_err

N = 16
MIN = torch.finfo(torch.float64).min
METHODS = [("exact", None), ("topk", {"k": 64}), ("mra", {"block_size": 4, "blocks_per_row": 4})]


def keep_mask():
    """[4, N]: all ones, 5 left-padded keys, 4 right-padded keys, every key padded."""
    keep = torch.ones(4, N, dtype=torch.bool)
    keep[1, :5] = False
    keep[2, N - 4:] = False
    keep[3] = False
    return keep


def _band(q, k):
    qi, ki = torch.arange(q.shape[-2]).view(-1, 1), torch.arange(k.shape[-2]).view(1, -1)
    return (ki > qi - 4) & (ki <= qi)


def hf_additive(fill):
    """HF's spelling: where(band & keep[:, None, None, :], 0, fill) added to the scores."""
    def fn(q, k, v, keep):
        mask = torch.where(_band(q, k) & keep[:, None, None, :], torch.zeros((), dtype=q.dtype),
                           torch.tensor(fill, dtype=q.dtype))
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v
    return fn


def gathered_masked_fill(fill):
    """masked_fill(not (band & keep[b_idx, k_idx]), fill) with arange index tensors (a gather)."""
    def fn(q, k, v, keep):
        b_idx = torch.arange(q.shape[0]).view(-1, 1, 1, 1)
        k_idx = torch.arange(k.shape[-2]).view(1, 1, 1, -1)
        s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~(_band(q, k) & keep[b_idx, k_idx]), fill)
        return torch.softmax(s, -1) @ v
    return fn


def float_keep_compared(fill):
    """A float keep vector compared with 0.5 inside the condition."""
    def fn(q, k, v, keep):
        cond = _band(q, k) & (keep.to(q.dtype)[:, None, None, :] > 0.5)
        return torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~cond, fill), -1) @ v
    return fn


def int_keep_cast(fill):
    """An int keep vector cast with .bool() inside the condition."""
    def fn(q, k, v, keep):
        cond = _band(q, k) & keep.long()[:, None, None, :].bool()
        bias = torch.where(cond, torch.zeros((), dtype=q.dtype), torch.tensor(fill, dtype=q.dtype))
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, -1) @ v
    return fn


def band_then_padding_term(fill):
    """The band and the padding as two terms: where(band, 0, fill) added, then masked_fill(~keep, fill)."""
    def fn(q, k, v, keep):
        band = torch.where(_band(q, k), torch.zeros((), dtype=q.dtype), torch.tensor(fill, dtype=q.dtype))
        s = q @ k.transpose(-2, -1) * 0.25 + band
        return torch.softmax(s.masked_fill(~keep[:, None, None, :], fill), -1) @ v
    return fn


def two_sided(fill):
    """A non-causal band (-2 <= k - q <= 3) with padding, as a masked_fill keep condition."""
    def fn(q, k, v, keep):
        qi, ki = torch.arange(q.shape[-2]).view(-1, 1), torch.arange(k.shape[-2]).view(1, -1)
        cond = (ki - qi >= -2) & (ki - qi <= 3) & keep[:, None, None, :]
        return torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~cond, fill), -1) @ v
    return fn


SPELLINGS = {"hf_additive": hf_additive, "gathered_masked_fill": gathered_masked_fill,
             "float_keep_compared": float_keep_compared, "int_keep_cast": int_keep_cast}


def _run(fn, method, params, keep):
    q, k, v = make_qkv(4, 2, 2, N, N, 8, dtype=torch.float64, seed=3)
    module = Fn(fn)
    with torch.no_grad():
        ref = module(q, k, v, keep)
    options = {"method": method, "compiler": "eager", "exact_when_cheaper": False}
    if params:
        options[method] = params
    report = structattn.explain(module, q, k, v, keep, options=options)
    return report, report.output, ref, v


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_finite_fill_band_with_padding_equals_eager_on_every_row(spelling, method, params):
    report, out, ref, v = _run(SPELLINGS[spelling](MIN), method, params, keep_mask())
    [site] = report.sites
    assert site.rewritten and site.method == method, str(report)
    assert site.mask == "causal+key_padding" and "window(3,0)" in site.terms, str(report)
    assert "general" not in site.terms, str(report)
    assert rel_err(out, ref) < 1e-10, str(report)
    # the dead rows are eager's: item 1's first 5 rows and item 3 average v uniformly over all keys
    assert rel_err(ref[3], v[3].mean(-2, keepdim=True).expand_as(ref[3])) < 1e-12
    assert rel_err(out[1, :, :5], ref[1, :, :5]) < 1e-10 and rel_err(out[3], ref[3]) < 1e-10


@pytest.mark.parametrize("method,params", METHODS)
def test_inf_fill_band_with_padding_gives_sdpas_dead_rows(method, params):
    # -inf everywhere: eager's dead rows are NaN, the op's are 0 (SDPA's convention, the op
    # contract); every live row equals eager
    report, out, ref, _ = _run(hf_additive(float("-inf")), method, params, keep_mask())
    [site] = report.sites
    assert site.rewritten and site.method == method and site.mask == "causal+key_padding", str(report)
    dead = torch.isnan(ref).all(-1)
    assert dead[3].all() and dead[1, :, :5].all() and not dead[0].any()
    assert (out[dead] == 0).all()
    assert rel_err(out[~dead], ref[~dead]) < 1e-10


@pytest.mark.parametrize("method,params", METHODS)
def test_band_and_a_separate_padding_term_with_inf_fills(method, params):
    report, out, ref, _ = _run(band_then_padding_term(float("-inf")), method, params, keep_mask())
    [site] = report.sites
    assert site.rewritten and site.method == method, str(report)
    assert site.mask == "causal+key_padding" and "window(3,0)" in site.terms, str(report)
    dead = torch.isnan(ref).all(-1)
    assert rel_err(out[~dead], ref[~dead]) < 1e-10 and (out[dead] == 0).all()


def test_two_finite_fill_terms_stay_general_and_equal_eager():
    # where(band, 0, min) + masked_fill(~keep, min): the op's one key mask cannot keep the two
    # fills apart on dead rows, so the mask stays general (top-k serves it exactly)
    report, out, ref, _ = _run(band_then_padding_term(MIN), "topk", {"k": 64}, keep_mask())
    [site] = report.sites
    assert site.mask == "general", str(report)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("method,params", [("exact", None), ("topk", {"k": 64})])
def test_two_sided_band_with_padding_keeps_eagers_dead_rows(method, params):
    # item 2 pads its last 4 keys: its rows 15.. see only padded keys in their window (dead)
    report, out, ref, _ = _run(two_sided(MIN), method, params, keep_mask())
    [site] = report.sites
    assert site.rewritten and site.method == method, str(report)
    assert site.mask == "key_padding" and "window(2,3)" in site.terms, str(report)
    assert rel_err(out, ref) < 1e-10


def test_padding_read_at_the_query_stays_general():
    # keep[b, q] masks queries, not keys: not key padding, the mask stays general
    def fn(q, k, v, keep):
        cond = _band(q, k) & keep[:, None, :, None]
        return torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~cond, MIN), -1) @ v
    report, out, ref, _ = _run(fn, "exact", None, keep_mask())
    [site] = report.sites
    assert site.mask == "general", str(report)
    assert rel_err(out, ref) < 1e-10


def test_dead_row_program_with_causal_window_and_padding():
    # the lowering alone: rows whose every key is out of window, above the diagonal or padded are
    # found and recomputed as eager's where(band & keep, 0, min) added
    q, k, v = make_qkv(4, 2, 2, N, N, 8, dtype=torch.float64, seed=5)
    keep = keep_mask()
    mods = ScoreMods("", [], 3, 0)
    mask = keep[:, None, None, :]
    dead = dead_row_mask(N, N, mask, True, 4, 2, mods)
    expect = torch.zeros(4, 2, N, dtype=torch.bool)
    expect[1, :, :5] = True
    expect[2, :, N - 1] = True          # its window (keys 12..15) is all padding
    expect[3] = True
    assert torch.equal(dead, expect)
    cond = _band(q, k) & mask
    s = q @ k.transpose(-2, -1) * 0.25 + torch.where(cond, 0.0, torch.tensor(MIN, dtype=torch.float64))
    ref = torch.softmax(s, -1) @ v
    poisoned = torch.full_like(ref, float("nan")).where(dead[..., None], ref)
    out = apply_dead_rows(poisoned, q, k, v, mask, 0.25, True, f"cwm:add:{MIN!r}", mods)
    assert rel_err(out, ref) < 1e-12
