"""Shared helpers of the kernel tests: inputs, error measure, tolerances."""
from __future__ import annotations

import torch

#: relative-error bounds ||out - ref|| / ||ref|| per input dtype (DESIGN.md section 7)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def qkv(B, H, Hk, nq, nk, D, Dv, dtype, *, transposed=False, seed=None):
    """Fresh random q, k, v; ``transposed`` builds them as HF does: [B, N, H, D] viewed as [B, H, N, D]."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None

    def make(h, n, d):
        if transposed:
            return torch.randn(B, n, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, d, generator=g).to(dtype)

    return make(H, nq, D), make(Hk, nk, D), make(Hk, nk, Dv)


def poisoned(B, H, n, Dv, dtype):
    return torch.full((B, H, n, Dv), float("nan"), dtype=dtype)


def check(out, ref, dtype):
    assert not torch.isnan(out).any(), "NaN in the kernel output (unwritten or 0/0)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} above {TOL[dtype]:.0e} for {dtype}"


def check_rows(out, ref, dtype, max_bad_rows=1):
    """Top-k is discontinuous where a row's k-th and (k+1)-th scores nearly tie: fp32 rounding may
    then keep the other key. Allow ``max_bad_rows`` such rows; every other row must match."""
    assert not torch.isnan(out).any(), "NaN in the kernel output (unwritten or 0/0)"
    o, r = out.double().flatten(0, -2), ref.double().flatten(0, -2)
    row_err = (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)
    bad = int((row_err > 10 * TOL[dtype]).sum())
    assert bad <= max_bad_rows, f"{bad} rows off by more than {10 * TOL[dtype]:.0e} (max row err {row_err.max():.2e})"
    good = row_err <= 10 * TOL[dtype]
    err = ((o - r)[good].norm() / r[good].norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} above {TOL[dtype]:.0e} for {dtype}"
