"""Helpers shared by the tests (importable because tests/ is on sys.path via conftest)."""
from __future__ import annotations

import torch

import structattn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def explain_doubled(module, *args, **kwargs):
    """Explain ``module`` with every site on the 'doubled' poison method (eager compiler)."""
    return structattn.explain(module, *args, options={"method": "doubled", "compiler": "eager"}, **kwargs)
