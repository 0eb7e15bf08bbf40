"""A finite fill is what eager has at the softmax, in the dtype the softmax computes in: HF's eager
attention adds ``finfo(float64).min`` to float64 scores and then takes ``softmax(dtype=float32)``,
where the fill is -inf. A row whose keys are all masked is then a hard-masked row (the op's 0, the
contract for rows with no finite logit), not the uniform average a float64 fill would give."""
from __future__ import annotations

import math

import pytest
import torch

import structattn
from testlib import rel_err

MIN64 = torch.finfo(torch.float64).min


class _Padded(torch.nn.Module):
    def __init__(self, softmax_dtype, cast_first):
        super().__init__()
        self.softmax_dtype, self.cast_first = softmax_dtype, cast_first

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s + torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, MIN64)[:, None, None, :]
        if self.cast_first:
            return torch.softmax(s.float(), -1).to(q.dtype) @ v
        return torch.softmax(s, -1, dtype=self.softmax_dtype).to(q.dtype) @ v


@pytest.mark.parametrize("softmax_dtype,cast_first,overflows", [
    (torch.float32, False, True), (None, True, True), (None, False, False)])
def test_a_fill_that_overflows_in_the_softmax_dtype_is_a_hard_mask(softmax_dtype, cast_first, overflows):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, dtype=torch.float64, generator=g) for _ in range(3))
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False                                   # batch item 1: every key padded
    model = _Padded(softmax_dtype, cast_first)
    ref = model(q, k, v, keep)
    report = structattn.explain(model, q, k, v, keep, options={"method": "exact", "exact_when_cheaper": False})
    site, = report.sites
    assert site.rewritten, str(report)
    out = report.output
    assert rel_err(out[0], ref[0]) < 1e-6                # live rows: eager (float32 softmax)
    if overflows:
        assert torch.isnan(ref[1]).all()                 # eager: -inf everywhere -> NaN
        assert (out[1] == 0).all()                       # the op: no finite logit -> 0
    else:
        assert rel_err(out[1], ref[1]) < 1e-12           # float64 fill: the uniform average of v
        assert rel_err(out[1], v[1].mean(-2, keepdim=True).expand_as(out[1])) < 1e-12
