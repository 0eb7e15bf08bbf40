"""Eager is the semantics of every mask spelling, including rows whose keys are all masked.

Masks filled with a finite value (finfo.min, -1e9, -1e4) give a fully masked query row eager's
answer (a uniform average of v, or a softmax over the keys with the largest fill), not SDPA's 0;
only a real -inf gives SDPA's 0. A bool or int tensor ADDED to the scores is a number (0/1), not a
keep mask. Every check compares all rows (dead ones included) with the uncompiled function, for
method "exact" and for approximations at their exact limits."""
from __future__ import annotations

import pytest
import torch

import structattn
from testlib import B, D, H, N, Fn, qkv, rel_err

FMIN = torch.finfo(torch.float32).min
EXACT_LIMITS = [("exact", {}), ("topk", {"k": N}), ("mra", {"block_size": 4, "blocks_per_row": 8})]


def keep_with_dead_rows():
    """Key padding: sample 0 right-padded, sample 1 entirely padding (every row dead)."""
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, N - 3:] = False
    keep[1, :] = False
    return keep


def left_padded():
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, :4] = False   # rows 0..3 of sample 1 see only padding under causality
    return keep


def run(fn, *args, method="exact", params=None, causal_ok=True):
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    options = {"method": method, "compiler": "eager", "exact_when_cheaper": False}
    if params:
        options[method] = params
    report = structattn.explain(module, *args, options=options)
    assert [s.rewritten for s in report.sites] == [True], str(report)
    assert report.sites[0].method == method, str(report)
    assert torch.isfinite(report.output).all() == torch.isfinite(ref).all()
    assert rel_err(report.output, ref) < 1e-5, str(report)
    return report


SPELLINGS = {
    "additive_where_min": lambda q, k, v, keep: torch.softmax(q @ k.mT * 0.3 + torch.where(keep, 0.0, FMIN)[:, None, None, :], -1) @ v,
    "additive_one_minus_mask_min": lambda q, k, v, keep: torch.softmax(q @ k.mT * 0.3 + (1.0 - keep.float())[:, None, None, :] * FMIN, -1) @ v,
    "additive_minus_1e4": lambda q, k, v, keep: torch.softmax(q @ k.mT * 0.3 + (1.0 - keep.float())[:, None, None, :] * -10000.0, -1) @ v,
    "masked_fill_min": lambda q, k, v, keep: torch.softmax((q @ k.mT * 0.3).masked_fill(~keep[:, None, None, :], FMIN), -1) @ v,
    "masked_fill_minus_1e9": lambda q, k, v, keep: torch.softmax((q @ k.mT).masked_fill(~keep[:, None, None, :], -1e9) * 0.3, -1) @ v,
    "where_min": lambda q, k, v, keep: torch.softmax(torch.where(keep[:, None, None, :], q @ k.mT * 0.3, FMIN), -1) @ v,
}


@pytest.mark.parametrize("method,params", EXACT_LIMITS)
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_key_padding_dead_rows_follow_eager(name, method, params):
    run(SPELLINGS[name], *qkv(), keep_with_dead_rows(), method=method, params=params)


def _causal(n):
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


CAUSAL_SPELLINGS = {
    # transformers' masks: one fill over causal AND padding (dead rows: uniform over ALL keys)
    "hf_conjunction": lambda q, k, v, keep: torch.softmax(
        q @ k.mT * 0.3 + torch.where(_causal(N)[None, None] & keep[:, None, None, :], 0.0, FMIN), -1) @ v,
    # legacy GPT-2: causal where with a graph-built fill, then an additive padding mask
    "gpt2_legacy": lambda q, k, v, keep: torch.softmax(
        torch.where(_causal(N)[None, None], q @ k.mT * 0.3, torch.full([], FMIN))
        + (1.0 - keep.float())[:, None, None, :] * FMIN, -1) @ v,
    "masked_fill_twice": lambda q, k, v, keep: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(~_causal(N), -1e9).masked_fill(~keep[:, None, None, :], -1e9), -1) @ v,
}


@pytest.mark.parametrize("method,params", [EXACT_LIMITS[0], EXACT_LIMITS[1], ("mra", {"block_size": 2, "blocks_per_row": 8})])
@pytest.mark.parametrize("name", sorted(CAUSAL_SPELLINGS))
def test_causal_with_left_padding_dead_rows_follow_eager(name, method, params):
    report = run(CAUSAL_SPELLINGS[name], *qkv(), left_padded(), method=method, params=params)
    assert report.sites[0].mask == "causal+key_padding"


def test_real_minus_inf_gives_sdpa_zero_rows():
    fn = lambda q, k, v, keep: torch.softmax((q @ k.mT).masked_fill(~keep[:, None, None, :], float("-inf")), -1) @ v
    module = Fn(fn)
    keep = keep_with_dead_rows()
    args = (*qkv(), keep)
    with torch.no_grad():
        ref = module(*args)
    assert torch.isnan(ref[1]).all()  # eager: 0/0
    report = structattn.explain(module, *args, options={"method": "exact", "compiler": "eager"})
    out = report.output
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # SDPA's convention (documented)
    assert rel_err(out[0], ref[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_bool_or_int_tensor_added_to_scores_is_a_number(dtype):
    masks = [torch.zeros(B, 1, N, N, dtype=dtype),                      # all False / 0
             _causal(N).to(dtype)[None, None].expand(B, 1, N, N),       # lower triangle of ones
             keep_with_dead_rows().to(dtype)[:, None, None, :]]
    for mask in masks:
        report = run(lambda q, k, v, m: torch.softmax(q @ k.mT * 0.3 + m, -1) @ v, *qkv(), mask)
        assert report.sites[0].mask in ("general", "key_padding")


def test_sdpa_float_mask_of_finfo_min_rows():
    import torch.nn.functional as F

    keep = keep_with_dead_rows()
    bias = torch.where(keep, 0.0, FMIN)[:, None, None, :]
    run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *qkv(), bias)
