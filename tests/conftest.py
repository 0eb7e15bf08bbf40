"""Shared fixtures: a poison method that proves a site really runs through structattn's op."""
from __future__ import annotations

import os

# The suite runs on the CPU, where Triton kernels can only run interpreted. Triton decides at
# import time (for its own @jit library functions too) whether it interprets, so the variable is
# set before anything imports triton (torch._dynamo does, and structattn imports torch._dynamo).
# Only impl="triton" on CPU tensors reaches the kernels; everything else is unaffected.
os.environ.setdefault("TRITON_INTERPRET", "1")

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

    def flops(self, site, params):
        return 0  # a poison method is free in the FLOP model: the cost rule never keeps it out


if "doubled" not in REGISTRY:
    register(DoubledMethod())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
