"""An additive mask turned back into a bool (MPT in transformers 5: ``where(causal, 0, min)
.to(torch.bool)``, True where masked, then ``masked_fill(mask, min)``) is read as ``not C``: the
site is proven causal. Casts whose truth the pass cannot know stay a general mask, still exact."""
from __future__ import annotations

import math

import pytest
import torch

import structattn
from testlib import rel_err

N = 10
MIN = torch.finfo(torch.float64).min


def _keep(n):
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def mpt_style(s, n):
    masked = torch.where(_keep(n), torch.zeros((), dtype=s.dtype), MIN).to(torch.bool)
    return s.masked_fill(masked, MIN)


def reversed_where(s, n):
    keep = torch.where(_keep(n), torch.ones((), dtype=s.dtype), 0.0).bool()   # where(C, 1, 0) != 0 = C
    return s.masked_fill(~keep, MIN)


def unknown_float(s, n):
    # a float tensor cast to bool whose values the pass cannot see: stays general (still exact)
    w = torch.tril(torch.full((n, n), 0.5, dtype=s.dtype))
    return s.masked_fill(~w.to(torch.bool), MIN)


def both_nonzero(s, n):
    # where(C, 1, 2) is never zero: the cast keeps everything, which is not "not C"
    masked = torch.where(_keep(n), torch.ones((), dtype=s.dtype), 2.0).to(torch.bool)
    return s.masked_fill(~masked, MIN)


CASES = {"mpt_style": (mpt_style, "causal"), "reversed_where": (reversed_where, "causal"),
         "unknown_float": (unknown_float, "general"), "both_nonzero": (both_nonzero, None)}


class _Site(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(self.fn(s, q.shape[-2]), -1) @ v


@pytest.mark.parametrize("name", sorted(CASES))
def test_bool_casts_of_masks(name):
    fn, mask = CASES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 8, dtype=torch.float64, generator=g) for _ in range(3))
    model = _Site(fn)
    method = "mra" if mask == "causal" else "topk"
    params = {"block_size": 2, "blocks_per_row": N} if method == "mra" else {"k": 64}
    report = structattn.explain(model, q, k, v, options={"method": method, method: params, "exact_when_cheaper": False})
    site, = report.sites
    assert site.rewritten and site.method == method, str(report)
    if mask is not None:
        assert site.mask == mask, str(report)
    else:
        assert site.mask in ("none", "general"), str(report)
    assert rel_err(report.output, model(q, k, v)) < 1e-12
