"""Shared fixtures: a poison method that proves a site really runs through structattn's op."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from structattn.methods import REGISTRY, Method, register
from structattn.methods.exact import sdpa


@dataclass(frozen=True)
class DoubledParams:
    """No parameters."""


class DoubledMethod(Method):
    """Exact attention times two: a rewritten site's output changes in a predictable way, so a
    test can tell the op ran (with the right scale and mask) rather than the original graph."""

    name = "doubled"
    Params = DoubledParams

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return 2 * sdpa(q, k, v, attn_mask, scale, is_causal)


if "doubled" not in REGISTRY:
    register(DoubledMethod())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
