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


# -- the op's one mask against eager's order of mask terms, biases and scales --------------------
def _key_bias():
    return torch.randn(B, 1, 1, N, generator=torch.Generator().manual_seed(7))


def test_bias_then_finite_masked_fill_is_rewritten_exactly():
    # the fill overwrites the (bias + -inf) the op's mask holds: eager's dead rows are reproducible
    fn = lambda q, k, v, keep, b: torch.softmax(((q @ k.mT) + b).masked_fill(~keep[:, None, None, :], -1e4), -1) @ v
    run(fn, *qkv(), keep_with_dead_rows(), _key_bias())


def test_finite_masked_fill_then_bias_is_declined():
    # eager: a fully masked row is softmax(-1e4 + bias); the op's mask holds -inf where the fill
    # was, so the bias would be lost there: the site stays as it is, with the reason
    fn = lambda q, k, v, keep, b: torch.softmax((q @ k.mT).masked_fill(~keep[:, None, None, :], -1e4) + b, -1) @ v
    module, args = Fn(fn), (*qkv(), keep_with_dead_rows(), _key_bias())
    with torch.no_grad():
        ref = module(*args)
    report = structattn.explain(module, *args, options={"method": "exact", "compiler": "eager"})
    assert [s.rewritten for s in report.sites] == [False]
    assert "finite fill" in report.sites[0].reason
    assert torch.equal(report.output, ref)


@pytest.mark.parametrize("method,params", EXACT_LIMITS[:2])
def test_alibi_bias_with_hf_conjunction_mask(method, params):
    # BLOOM-like: a per-key bias, then HF's where(causal & padding, 0, min): left-padded rows see
    # only masked keys, where eager adds min to every entry once (a uniform row)
    fn = lambda q, k, v, keep, b: torch.softmax(
        q @ k.mT * 0.3 + b + torch.where(_causal(N)[None, None] & keep[:, None, None, :], 0.0, FMIN), -1) @ v
    run(fn, *qkv(), left_padded(), _key_bias(), method=method, params=params)


def test_two_biases_are_added_once_in_dead_rows():
    # a padding bias given as a float input, a second bias, and a causal -1e4 added: the
    # recomputed dead rows add the op's (summed) mask once, not once per bias
    pad = torch.zeros(B, 1, 1, N).masked_fill(~left_padded()[:, None, None, :], FMIN)
    fn = lambda q, k, v, pad, b: torch.softmax(q @ k.mT + pad + b + torch.full((N, N), -1e4).triu(1), -1) @ v
    assert run(fn, *qkv(), pad, _key_bias()).sites[0].mask == "causal+key_padding"


def test_triangle_broadcast_over_queries_is_not_causal():
    # tril(ones(1, K)) keeps key 0 only, in EVERY query row: not the causal mask of N rows
    fn = lambda q, k, v: torch.softmax((q @ k.mT).masked_fill(~torch.ones(1, N, dtype=torch.bool).tril(), float("-inf")), -1) @ v
    assert run(fn, *qkv()).sites[0].mask != "causal"


@pytest.mark.parametrize("spelling", ["min_then_times_2", "two_min_adds_then_half"])
def test_fills_that_overflow_on_the_way_to_softmax(spelling):
    # eager: min * 2 and min + min are -inf, so a fully masked row is NaN (structattn: 0); the
    # dead-row program must not leave such entries finite (which gave the uniform average)
    if spelling == "min_then_times_2":
        fn = lambda q, k, v, keep: torch.softmax((q @ k.mT).masked_fill(~keep[:, None, None, :], FMIN) * 2.0, -1) @ v
    else:
        fn = lambda q, k, v, keep: torch.softmax(
            (q @ k.mT + (1.0 - keep[:, None, None, :].float()) * FMIN + (1.0 - keep[:, None, None, :].float()) * FMIN)
            * 0.5, -1) @ v
    module, args = Fn(fn), (*qkv(), keep_with_dead_rows())
    with torch.no_grad():
        ref = module(*args)
    assert torch.isnan(ref[1]).all()
    report = structattn.explain(module, *args, options={"method": "exact", "compiler": "eager"})
    assert [s.rewritten for s in report.sites] == [True]
    assert torch.equal(report.output[1], torch.zeros_like(report.output[1]))
    assert rel_err(report.output[0], ref[0]) < 1e-5


def test_fill_scaled_down_is_not_a_mask():
    # -1e4 then * 1e-3 is -10: masked keys keep a weight of about e^-10 in eager
    fn = lambda q, k, v, keep: torch.softmax((q @ k.mT * 1e3).masked_fill(~keep[:, None, None, :], -1e4) * 1e-3, -1) @ v
    module, args = Fn(fn), (*qkv(), left_padded())
    report = structattn.explain(module, *args, options={"method": "exact", "compiler": "eager"})
    assert [s.rewritten for s in report.sites] == [False]
    assert "not a mask" in report.sites[0].reason


def test_subtracted_fill_is_a_bonus_not_a_mask():
    # s - where(keep, 0, -1e9) ADDS 1e9 to the padded keys: eager puts all the weight there
    fn = lambda q, k, v, keep: torch.softmax(q @ k.mT - torch.where(keep[:, None, None, :], 0.0, -1e9), -1) @ v
    run(fn, *qkv(), left_padded())
