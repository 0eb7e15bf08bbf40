"""A mask tensor that holds a bias and a mask at once (``bias + causal_mask``, ``where(keep, bias,
fill)``, as T5's decoder builds it) is split by the pass: the bias joins the score modification
(its kind read from its producer graph), the mask is proven like any mask. Where the mask is not
provably causal or key padding, it stays a general mask; every variant computes eager's output."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import structattn
from testlib import Fn, qkv, rel_err

N = 10
H = 3
MIN = torch.finfo(torch.float64).min


def relative_bias(table, n):
    """T5-style: a learned [2n-1, H] table read at k - q, as [1, H, Q, K]."""
    pos = torch.arange(n)
    rel = pos[None, :] - pos[:, None] + n - 1
    return F.embedding(rel, table).permute(2, 0, 1)[None]


def _scores(q, k):
    return q @ k.transpose(-2, -1) * 0.5


def sum_causal(q, k, v, table):
    n = q.shape[-2]
    pos = torch.arange(n)
    mask = torch.where(pos[None, :] <= pos[:, None], torch.zeros((), dtype=q.dtype), MIN)[None, None]
    return torch.softmax(_scores(q, k) + (relative_bias(table, n) + mask), -1) @ v


def sum_causal_triu(q, k, v, table):
    n = q.shape[-2]
    mask = torch.triu(torch.full((n, n), MIN, dtype=q.dtype), 1)
    return torch.softmax(_scores(q, k) + (mask + relative_bias(table, n)), -1) @ v


def sum_indicator_causal(q, k, v, table):
    # the mask of transformers 4.x's T5 decoder: (1 - keep) * finfo.min, added to the bias first
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    return torch.softmax(_scores(q, k) + (relative_bias(table, n) + (1.0 - keep.to(q.dtype)) * MIN), -1) @ v


def where_causal(q, k, v, table):
    n = q.shape[-2]
    keep = (torch.arange(n)[:, None] >= torch.arange(n)[None, :]).view(1, 1, n, n)
    return torch.softmax(_scores(q, k) + torch.where(keep, relative_bias(table, n), MIN).contiguous(), -1) @ v


def where_causal_small_fill(q, k, v, table):
    # -1e4 is a hard mask on rows that keep a key, and a causal mask leaves none fully masked
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(_scores(q, k) + torch.where(keep, relative_bias(table, n), -1e4), -1) @ v


def sum_shifted(q, k, v, table):
    # keys up to one AFTER the query: not causal
    n = q.shape[-2]
    pos = torch.arange(n)
    mask = torch.where(pos[None, :] <= pos[:, None] + 1, torch.zeros((), dtype=q.dtype), MIN)[None, None]
    return torch.softmax(_scores(q, k) + (relative_bias(table, n) + mask), -1) @ v


def where_anticausal(q, k, v, table):
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).triu()
    return torch.softmax(_scores(q, k) + torch.where(keep, relative_bias(table, n), MIN), -1) @ v


def where_input_mask(q, k, v, table, keep):
    # a [Q, K] keep mask from outside with a fully masked query row: eager gives it the mean of v
    n = q.shape[-2]
    return torch.softmax(_scores(q, k) + torch.where(keep, relative_bias(table, n), MIN), -1) @ v


def where_padding_small_fill(q, k, v, table, keep):
    # -1e4 written where keys are padded: not split (a padded row then differs from eager's)
    n = q.shape[-2]
    return torch.softmax(_scores(q, k) + torch.where(keep[:, None, None, :], relative_bias(table, n), -1e4), -1) @ v


def _keep_with_dead_row():
    keep = torch.rand(N, N, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:, 0] = True
    keep[4] = False
    return keep


def _padding():
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 6:] = False
    keep[0, :] = False     # a batch item with every key padded
    return keep


#: case -> (function, extra args, the report's mask kind, its terms column)
CASES = {
    "sum_causal": (sum_causal, (), "causal", "bias(relative), causal"),
    "sum_causal_triu": (sum_causal_triu, (), "causal", "bias(relative), causal"),
    "sum_indicator_causal": (sum_indicator_causal, (), "causal", "bias(relative), causal"),
    "where_causal": (where_causal, (), "causal", "bias(relative), causal"),
    "where_causal_small_fill": (where_causal_small_fill, (), "causal", "bias(relative), causal"),
    # keys up to one after the query: proven a window (unbounded left, one right), not causal
    "sum_shifted": (sum_shifted, (), "none", "bias(relative), window(inf,1)"),
    "where_anticausal": (where_anticausal, (), "general", "bias(relative), general"),
    "where_input_mask": (where_input_mask, (_keep_with_dead_row(),), "general", "bias(relative), general"),
    "where_padding_small_fill": (where_padding_small_fill, (_padding(),), "general", "general"),
}


def _run(case, method, params):
    fn, extra, _, _ = CASES[case]
    q, k, v = qkv(N, N, heads=H, kv_heads=H, dtype=torch.float64)
    table = torch.randn(2 * N - 1, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    args = (q, k, v, table, *extra)
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    options = {"method": method, "compiler": "eager", "exact_when_cheaper": False}
    if params:
        options[method] = params
    return structattn.explain(module, *args, options=options), ref


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method,params", [("exact", None), ("topk", {"k": N})])
def test_split_terms_and_eager_output(case, method, params):
    report, ref = _run(case, method, params)
    [site] = report.sites
    _, _, mask, terms = CASES[case]
    assert site.rewritten and site.method == method, str(report)
    assert (site.mask, site.terms) == (mask, terms), str(report)
    assert torch.isfinite(report.output).all()
    assert rel_err(report.output, ref) < 1e-10, str(report)


def test_split_gives_mra_a_causal_mask_and_a_relative_bias():
    # MRA serves causal masks with relative biases: at all blocks chosen it equals eager
    report, ref = _run("sum_causal", "mra", {"block_size": 2, "blocks_per_row": N})
    [site] = report.sites
    assert site.method == "mra" and site.mask == "causal" and "bias(relative)" in site.terms, str(report)
    assert rel_err(report.output, ref) < 1e-10


def test_causal_part_reaches_the_op_as_is_causal():
    report, _ = _run("where_causal", "topk", {"k": N})
    code = report.graphs[0].after.code
    assert "topk_attention" in code and "True" in code.split("topk_attention", 1)[1].split("\n")[0], code
