"""Forms the pass lifts from real models, through the torch evaluator and the generated Triton
function alike (interpreter): T5's bucket index computed through ``abs`` (a float in both
evaluators, truncated to read the table) and Swin's shift mask ``where(c, 0.0, -100.0)`` (two
constant branches) next to a table read through an index tensor."""
from __future__ import annotations

import os

import pytest
import torch

import test_expr as harness
from structattn.scoremod.evaluate import apply_score_mod, index_grids

FORMS = {
    # T5 encoder buckets, small: the index is abs(k - q) (float) capped, plus a direction offset
    "s + t0[((int(((k - q) > 0)) * 4) + where((abs((k - q)) < 2), abs((k - q)), 3)), h]":
        lambda s, rel: s + harness.TABLE[((rel > 0).long() * 4 + torch.where(rel.abs() < 2, rel.abs(), 3))].permute(2, 0, 1),
    # Swin: a table read through an index tensor plus a constant-branch shift mask
    "s + t1[t0[q, k], h] + where(((q // 2) == (k // 2)), 0.0, -100.0)":
        lambda s, rel: s + harness.TABLE[harness.REL].permute(2, 0, 1)
        + torch.where(harness.qi // 2 == harness.ki // 2, 0.0, -100.0),
}


def _tensors(text):
    return [harness.REL, harness.TABLE] if "t1[t0" in text else [harness.TABLE]


@pytest.mark.parametrize("text", sorted(FORMS))
def test_torch_evaluator_on_lifted_forms(text):
    rel = harness.ki - harness.qi
    out = apply_score_mod(text, harness.S, tensors=_tensors(text),
                          **index_grids(harness.B, harness.H, torch.arange(harness.Q), harness.K, "cpu"))
    assert torch.allclose(out, FORMS[text](harness.S, rel).to(out.dtype), atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("text", sorted(FORMS))
def test_generated_triton_on_lifted_forms(text, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "_tensors", _tensors)
    harness.test_generated_triton_matches_torch(text, tmp_path, monkeypatch)
