"""Every registered method with a Triton module and a ``naive.py``: the kernel (interpreted on
the CPU) against the float64 reference, on its first calibration candidate per mask kind.

The cases come from the registry, so a new method folder is checked here without an edit."""
from __future__ import annotations

import importlib

import pytest
import torch

from structattn.methods import REGISTRY

from testlib import case_id, case_mask, case_qkv, check_rows, naive_module, registry_cases

CASES = [c for c in registry_cases(("key_padding", "causal"), per_kind=1, defaults=False) if REGISTRY[c[0]].kernel_module]


def test_every_kernel_is_covered():
    assert {"monarch", "mra", "topk"} <= {name for name, _, _ in CASES}


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_kernel_equals_naive(case):
    name, kind, values = case
    method = REGISTRY[name]
    params = method.make_params(values)
    q, k, v = case_qkv(torch.float32, seed=3)
    mask, causal = case_mask(kind, 3), kind.startswith("causal")
    mask = None if mask is None else mask.float()
    out = importlib.import_module(method.kernel_module).forward(q, k, v, mask, 0.4, causal, params)
    ref = naive_module(method).forward(q, k, v, mask, 0.4, causal, params)
    # top-k may keep another k-th key where two scores nearly tie in fp32: one row may differ
    check_rows(out, ref, torch.float32)
