"""A score modification is read whichever side of a binary op the scores are written on: the pass
follows the operand computed from QK^T, also when it reaches it through an element-wise op that
is not a scale or a mask (``20.0 * tanh(s / 20.0)`` used to be refused as "multiplied by a
tensor"). Each spelling is rewritten, reports its term, and equals eager at top-k's exact limit."""
from __future__ import annotations

import math

import pytest
import torch

import structattn
from testlib import rel_err

BIAS = torch.randn(1, 2, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

SPELLINGS = {
    "const * tanh": (lambda s: 20.0 * torch.tanh(s / 20.0), "softcap(20)"),
    "tanh * const": (lambda s: torch.tanh(s / 20.0) * 20.0, "softcap(20)"),
    "torch.mul(const, tanh)": (lambda s: torch.mul(20.0, torch.tanh(s / 20.0)), "softcap(20)"),
    "bias + tanh": (lambda s: BIAS + torch.tanh(s), "score_mod"),
    "const * sigmoid * s": (lambda s: 2.0 * (torch.sigmoid(s) * s), "score_mod"),
    "const - (-tanh)": (lambda s: 1.0 - (-torch.tanh(s)), "score_mod"),
}


class _Site(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(self.fn(s), -1) @ v


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_the_chain_is_the_operand_computed_from_the_scores(name):
    fn, label = SPELLINGS[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64, generator=g) * 2 for _ in range(3))
    model = _Site(fn)
    report = structattn.explain(model, q, k, v, options={"method": "topk", "topk": {"k": 64},
                                                          "exact_when_cheaper": False})
    site, = report.sites
    assert site.rewritten and site.method == "topk", str(report)
    assert label in site.terms, str(report)
    assert rel_err(report.output, model(q, k, v)) < 1e-12


@pytest.mark.parametrize("fn", [lambda s: 1.0 / (1.0 + s.abs()), lambda s: 3.0 - s], ids=["c / scores", "c - scores"])
def test_scores_on_the_right_of_div_and_sub_are_a_chain(fn):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64, generator=g) for _ in range(3))
    model = _Site(fn)
    report = structattn.explain(model, q, k, v, options={"method": "exact", "exact_when_cheaper": False})
    site, = report.sites
    assert site.rewritten and "score_mod" in site.terms, str(report)
    assert rel_err(report.output, model(q, k, v)) < 1e-12
