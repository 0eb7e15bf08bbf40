"""structattn.functional.*(impl=...) reaches the kernels on CPU only under TRITON_INTERPRET=1."""
import pytest
import torch

import structattn.functional as F
from structattn.lowering.ops import get_kernel
from structattn.methods import REGISTRY

from testlib import TOL, check_rows, make_qkv, rel_err


def test_registry():
    kernels = {name: m.kernel_module for name, m in REGISTRY.items() if m.kernel_module}
    assert kernels == {name: f"structattn.methods.{name}.triton"
                       for name in ("exact", "monarch", "mra", "topk", "linear", "routing")}


@pytest.mark.parametrize("fn,kw", [
    (F.monarch_attention, {"num_steps": 2}),
    (F.mra_attention, {"block_size": 8, "blocks_per_row": 2}),
    (F.topk_attention, {"k": 6}),
])
def test_functional_triton_matches_torch(fn, kw):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, torch.float32)
    mask = torch.rand(1, 1, 1, 40) > 0.2
    a = fn(q, k, v, mask, impl="triton", **kw)
    b = fn(q, k, v, mask, impl="torch", **kw)
    if fn is F.topk_attention:  # discontinuous at near-ties: compare row by row
        check_rows(a, b, torch.float32)
    else:
        assert rel_err(a, b) < TOL[torch.float32]


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        F.monarch_attention(q, k, v, impl="triton")
    # impl="auto" on CPU stays on the reference path
    assert get_kernel("monarch", q, k, v, None, False, None, strict=False) is None
