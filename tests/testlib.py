"""Helpers shared by the whole suite (tests/ is on sys.path; test modules import this, never each
other). References live in the package: each method's ``naive.py`` (float64 oracles) and
``exact.naive.dense_attention``; here are inputs, error measures, tolerances and the matcher
tests' small modules."""
from __future__ import annotations

import importlib
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import structattn
from structattn.methods import REGISTRY, SiteShape
from structattn.methods.common import as_4d

#: relative-error bound ||out - ref|| / ||ref|| of a computation in each input dtype against its
#: float64 reference (the same method in float64, or exact attention at a method's exact limit),
#: for every path: the plain-torch one and the Triton kernels
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute error when ``ref`` is 0)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num if den == 0 else num / den


def make_qkv(B=2, H=4, Hk=2, Nq=16, Nk=None, D=8, Dv=None, dtype=torch.float64, seed=0, spread=1.0,
             transposed=False):
    """Seeded random q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] in ``dtype``. ``spread`` scales q
    (peakier attention); ``transposed`` builds them as HF does: [B, N, H, D] viewed as [B, H, N, D]."""
    g = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv

    def make(h, n, d, factor=1.0):
        if transposed:
            return (torch.randn(B, n, h, d, generator=g, dtype=torch.float64) * factor).to(dtype).transpose(1, 2)
        return (torch.randn(B, h, n, d, generator=g, dtype=torch.float64) * factor).to(dtype)

    return make(H, Nq, D, spread), make(Hk, Nk, D), make(Hk, Nk, Dv)


def key_padding(B, Nk, seed=0, p_keep=0.7, heads=1, float_mask=False, dead_batch=None):
    """Random key-padding mask [B, heads, 1, Nk]; ``dead_batch`` masks every key of that batch."""
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(B, heads, 1, Nk, generator=g) < p_keep
    m[..., 0] = True
    if dead_batch is not None:
        m[dead_batch] = False
    if float_mask:
        return torch.where(m, 0.0, float("-inf")).double()
    return m


def sdpa_reference(q, k, v, mask, scale, causal, dtype=None):
    """torch's SDPA itself (GQA by enable_gqa; a mask of fewer dims viewed as 4-D), in ``dtype``
    when given. SDPA takes no mask together with is_causal: then the causal mask joins the mask as
    SDPA applies it itself, an additive -inf (so a +inf / NaN logit above the diagonal still makes
    its row NaN)."""
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    m = None if mask is None else as_4d(mask)
    if causal and m is not None:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        m = m & keep if m.dtype == torch.bool else m + torch.zeros(keep.shape, dtype=m.dtype).masked_fill(~keep, -math.inf)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])



def eager_mod_attention(q, k, v, logits_fn, keep=None):
    """Eager attention with a score modification: ``logits_fn`` on the scaled scores, then the hard
    ``keep`` mask (True = keep) as -inf, softmax, P V (GQA by repeating k and v)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = logits_fn(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v

# ------------------------------------------------------------------------------------------------
# cases from the registry: every method folder with a naive.py is checked without a test edit
# ------------------------------------------------------------------------------------------------
MASK_KINDS = ("none", "key_padding", "causal", "causal+key_padding", "general")
#: (B, H, Hk, N, D, Dv) of the registry cases
CASE_SIZES = (1, 2, 1, 24, 8, 6)


def naive_module(method):
    """The method folder's naive.py (the float64 reference), or None when it has none."""
    package = importlib.import_module(type(method).__module__)
    if not hasattr(package, "__path__"):          # a method defined in a plain module
        return None
    name = f"{package.__name__}.naive"
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


def case_mask(kind: str, seed: int):
    """An attn_mask of the kind for ``CASE_SIZES`` (None for none / causal); key padding as
    float biases (-inf for dropped keys, random finite values elsewhere)."""
    B, H, _, N, _, _ = CASE_SIZES
    if kind in ("none", "causal"):
        return None
    if kind == "general":
        keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(seed)) > 0.4
        keep[..., 0] = True
        return keep
    bias = key_padding(B, N, seed, heads=H, float_mask=True)
    return bias + torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def case_shape(kind: str) -> SiteShape:
    """The ``SiteShape`` of the registry cases for a mask kind."""
    B, H, Hk, N, D, Dv = CASE_SIZES
    return SiteShape(B, H, Hk, N, N, D, Dv, kind, torch.float64)


def case_qkv(dtype=torch.float64, seed=0):
    """q, k, v of ``CASE_SIZES`` (queries a bit peaky: spread 1.5)."""
    B, H, Hk, N, D, Dv = CASE_SIZES
    return make_qkv(B, H, Hk, N, N, D, Dv, dtype, seed=seed, spread=1.5)


def registry_cases(mask_kinds=MASK_KINDS, per_kind=None, defaults=True) -> list:
    """(method name, mask kind, params dict) for every registered method with a naive.py: its
    default params (``defaults``), then its calibration candidates at ``CASE_SIZES``
    (``per_kind`` in all at most), wherever it supports the mask kind."""
    B, H, Hk, N, D, Dv = CASE_SIZES
    out = []
    for name, method in REGISTRY.items():
        if naive_module(method) is None:
            continue
        for kind in mask_kinds:
            shape = SiteShape(B, H, Hk, N, N, D, Dv, kind, torch.float64)
            grid = ([{}] if defaults else []) + method.candidates(shape)
            grid = [p for p in grid if method.supports(shape, method.make_params(p)) is None]
            out += [(name, kind, p) for p in grid[:per_kind]]
    return out


def case_id(case) -> str:
    """A readable test id of a registry case."""
    name, kind, params = case
    return f"{name}-{kind}-" + ("-".join(f"{k}{v}" for k, v in params.items()) or "defaults")


# ------------------------------------------------------------------------------------------------
# kernel outputs
# ------------------------------------------------------------------------------------------------
def torch_path_f64(name: str, q, k, v, mask, scale, causal, params):
    """Method ``name``'s plain-torch path on the float64 upcast of the inputs (the kernels' reference:
    a reference that rounds its scores to fp16 could keep another key on a near-tie)."""
    return REGISTRY[name].forward(q.double(), k.double(), v.double(), mask, scale, causal, params)


def poisoned(B, H, n, Dv, dtype):
    """An output buffer full of NaN: a row the kernel forgets to write shows."""
    return torch.full((B, H, n, Dv), float("nan"), dtype=dtype)


def check_close(out, ref, dtype):
    """No NaN, and relative error within ``TOL[dtype]``."""
    assert not torch.isnan(out).any(), "NaN in the kernel output (unwritten or 0/0)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} above {TOL[dtype]:.0e} for {dtype}"


def check_rows(out, ref, dtype, max_bad_rows=1):
    """Top-k is discontinuous where a row's k-th and (k+1)-th scores nearly tie: fp32 rounding may
    then keep the other key. Allow ``max_bad_rows`` such rows; every other row must match."""
    tol = TOL[dtype]
    assert not torch.isnan(out).any(), "NaN in the kernel output (unwritten or 0/0)"
    o, r = out.double().flatten(0, -2), ref.double().flatten(0, -2)
    row_err = (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)
    bad = int((row_err > 10 * tol).sum())
    assert bad <= max_bad_rows, f"{bad} rows off by more than {10 * tol:.0e} (max row err {row_err.max():.2e})"
    good = row_err <= 10 * tol
    err = ((o - r)[good].norm() / r[good].norm()).item()
    assert err < tol, f"relative error {err:.2e} above {tol:.0e} for {dtype}"


# ------------------------------------------------------------------------------------------------
# the matcher's tests: small modules whose every site runs the 'doubled' poison method
# ------------------------------------------------------------------------------------------------
B, H, N, D = 2, 3, 10, 8


def qkv(n_q=N, n_k=N, heads=H, kv_heads=H, d=D, dv=D, dtype=torch.float32):
    """Fixed float32 q, k, v of the matcher tests' default sizes."""
    return make_qkv(B, heads, kv_heads, n_q, n_k, d, dv, dtype, seed=1234)


def padding(n=N):
    """Bool key-padding [B, n]: batch item 1 pads its last 3 keys."""
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[1, n - 3:] = False
    return keep


class Fn(nn.Module):
    """Wraps a function so each spelling is a module with an FQN."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def explain_doubled(module, *args, **kwargs):
    """Explain ``module`` with every site on the 'doubled' poison method (eager compiler)."""
    return structattn.explain(module, *args, options={"method": "doubled", "compiler": "eager"}, **kwargs)


def check_doubled(fn, *args, sites=1):
    """``fn`` as a module: ``sites`` sites rewritten onto 'doubled', output 2 x eager."""
    module = Fn(fn)
    with torch.no_grad():
        ref = module(*args)
    report = explain_doubled(module, *args)
    assert sum(s.rewritten for s in report.sites) == sites, str(report)
    assert all(s.method == "doubled" for s in report.sites if s.rewritten), str(report)
    assert rel_err(report.output, 2 * ref) < 1e-5
    return report
