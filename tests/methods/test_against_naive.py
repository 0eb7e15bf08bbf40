"""Every registered method that has a ``naive.py``, with its default parameters, its calibration
grid and every mask kind it supports: the plain-torch path equals the float64 reference.

The cases come from the registry (``Method.candidates`` and ``Method.supports``), so a new method
folder is checked here without an edit to this file."""
from __future__ import annotations

import pytest
import torch

from structattn.methods import REGISTRY

from testlib import TOL, case_id, case_mask, case_qkv, naive_module, registry_cases, rel_err

CASES = registry_cases()


def test_every_method_with_a_reference_is_covered():
    assert {"exact", "monarch", "mra", "topk"} <= {name for name, _, _ in CASES}
    for name in ("monarch", "mra", "topk"):   # away from their exact limits too
        assert any(p for n, _, p in CASES if n == name), name


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_torch_path_equals_naive_in_float64(seed, case):
    name, kind, values = case
    method = REGISTRY[name]
    params = method.make_params(values)
    q, k, v = case_qkv(seed=seed)
    mask, causal = case_mask(kind, seed), kind.startswith("causal")
    out = method.forward(q, k, v, mask, 0.4, causal, params)
    ref = naive_module(method).forward(q, k, v, mask, 0.4, causal, params)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[torch.float64]
