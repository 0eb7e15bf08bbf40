"""The generated Triton kernels with score modifications (TRITON_INTERPRET=1, float32, tiny shapes).

For each term kind (soft-capping, key-only ALiBi, relative ALiBi, a T5-style bucket table read
through an index tensor and through a bucket expression, a general bias tensor with broadcast
dims, sliding windows, a composed chain no rule names) the exact kernel and the top-k kernel
(at its exact limit k >= N, and at a small k) run with the site's generated ``score_mod`` and are
checked against the method's torch path and against a float64 reference: hand-written eager torch
for the exact results, top-k's float64 ``naive`` for small k. Then the dispatch: which kernel a
site gets (``get_kernel``), what each kernel refuses and why, and CPU tensors without the
interpreter. Tolerances: ``testlib.TOL`` (one table for every kernel).
"""
from __future__ import annotations

import math

import pytest
import torch

import structattn.functional as SF
from structattn.lowering.ops import _pick_kernel, get_kernel, run_method
from structattn.methods import get_method
from structattn.methods.base import NO_MODS, ScoreMods
from structattn.methods.exact import ExactParams
from structattn.methods.exact import triton as exact_kernel
from structattn.methods.topk import TopkParams
from structattn.methods.topk import naive as topk_naive
from structattn.methods.topk import triton as topk_kernel
from structattn.methods.triton_common import SCORE_MOD_ARGS, score_mod_args
from structattn.scoremod.triton_gen import triton_score_mod

from testlib import TOL, check_rows, eager_mod_attention, make_qkv, poisoned, rel_err

B, H, HK, NQ, NK, D = 2, 2, 1, 37, 37, 16
SCALE = 1.0 / math.sqrt(D)       # eager_mod_attention's scale
FP32 = torch.float32
_G = torch.Generator().manual_seed(7)
SLOPES = torch.rand(H, generator=_G, dtype=torch.float64) * 0.5 + 0.1
TABLE = torch.randn(16, H, generator=_G, dtype=torch.float64)
REL = (torch.arange(NK)[None, :] - torch.arange(NQ)[:, None]).clamp(-7, 8) + 7       # [NQ, NK] in 0..15
BIAS_H = torch.randn(1, H, NQ, NK, generator=_G, dtype=torch.float64)
BIAS_B = torch.randn(B, 1, NQ, NK, generator=_G, dtype=torch.float64)


def _grids(nq=NQ, nk=NK):
    return dict(b=torch.arange(B).view(B, 1, 1, 1), h=torch.arange(H).view(1, H, 1, 1),
                q=torch.arange(nq).view(1, 1, nq, 1), k=torch.arange(nk).view(1, 1, 1, nk))


def _bucket(q, k):
    return torch.where(k > q, 8, 0) + torch.clamp(torch.div((k - q).abs(), 2, rounding_mode="floor"), max=7)


#: id -> (score_mod text, captured tensors (float64), eager logits fn(s, b, h, q, k), window, causal, mask kind)
CASES = {
    "softcap": ("3.0 * tanh(s / 3.0)", (), lambda s, b, h, q, k: 3.0 * torch.tanh(s / 3.0), None, False, "none"),
    "softcap-causal": ("3.0 * tanh(s / 3.0)", (), lambda s, b, h, q, k: 3.0 * torch.tanh(s / 3.0), None, True,
                       "bool"),
    "alibi-key-only": ("s + t0[h] * k", (SLOPES,), lambda s, b, h, q, k: s + SLOPES[h] * k, None, True, "none"),
    "alibi-relative": ("s - t0[h] * abs(q - k)", (SLOPES,),
                       lambda s, b, h, q, k: s - SLOPES[h] * (q - k).abs(), None, False, "additive"),
    "t5-table": ("s + t0[t1[q, k], h]", (TABLE, REL), lambda s, b, h, q, k: s + TABLE[REL[q, k], h], None, False,
                 "bool"),
    "t5-bucket-expr": ("s + t0[where(k > q, 8, 0) + min(abs(k - q) // 2, 7), h]", (TABLE,),
                       lambda s, b, h, q, k: s + TABLE[_bucket(q, k), h], None, True, "none"),
    "bias-head-broadcast": ("s + t0[0, h, q, k]", (BIAS_H,), lambda s, b, h, q, k: s + BIAS_H, None, False,
                            "bool"),
    "bias-batch-broadcast": ("s + t0[b, 0, q, k]", (BIAS_B,), lambda s, b, h, q, k: s + BIAS_B, None, True,
                             "additive"),
    "window-left": ("", (), lambda s, b, h, q, k: s, (5, None), False, "none"),
    "window-left-right": ("", (), lambda s, b, h, q, k: s, (4, 3), False, "bool"),
    "window-causal-alibi": ("s + t0[h] * k", (SLOPES,), lambda s, b, h, q, k: s + SLOPES[h] * k, (6, None), True,
                            "additive"),
    "composed-chain": ("where(k % 3 == 0, s * 0.5, tanh(s)) + h", (),
                       lambda s, b, h, q, k: torch.where(k % 3 == 0, s * 0.5, torch.tanh(s)) + h, None, False,
                       "additive"),
}


def _mask(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "bool":        # key padding, key 0 always kept
        m = torch.rand(B, 1, 1, NK, generator=g) > 0.25
        m[..., 0] = True
        return m
    if kind == "additive":    # a finite per-key bias
        return torch.randn(B, 1, 1, NK, generator=g)
    return None


def _mods(case, dtype):
    text, tensors, _, window, _, _ = case
    left, right = window if window else (None, None)
    cast = tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
    return ScoreMods(text, cast, -1 if left is None else left, -1 if right is None else right)


def _eager(q, k, v, case, mask):
    """Float64 eager attention with the case's hand-written logits, the mask, causality and window;
    a row with no visible key gives 0."""
    _, _, fn, window, causal, _ = case
    g = _grids()
    q64, k64, v64 = q.double(), k.double(), v.double()

    def logits(s):
        s = fn(s, g["b"], g["h"], g["q"], g["k"])
        if mask is not None and mask.dtype != torch.bool:
            s = s + mask.double()
        return s

    qi, kj = g["q"][0, 0], g["k"][0, 0]
    keep = torch.ones(B, H, NQ, NK, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    if causal:
        keep = keep & (kj <= qi)
    if window:
        left, right = window
        if left is not None:
            keep = keep & (kj >= qi - left)
        if right is not None:
            keep = keep & (kj <= qi + right)
    return eager_mod_attention(q64, k64, v64, logits, keep).nan_to_num(0.0)


def _inputs(case):
    q, k, v = make_qkv(B, H, HK, NQ, NK, D, D, FP32, seed=11, spread=3.0)   # peaky: the soft-cap bites
    return q, k, v, _mask(case[5])


@pytest.mark.parametrize("name", list(CASES))
def test_exact_kernel(name):
    case = CASES[name]
    q, k, v, mask = _inputs(case)
    causal, mods = case[4], _mods(case, FP32)
    out = exact_kernel.forward(q, k, v, mask, SCALE, causal, ExactParams(), out=poisoned(B, H, NQ, D, FP32),
                               mods=mods)
    assert not torch.isnan(out).any()
    assert rel_err(out, _eager(q, k, v, case, mask)) < TOL[FP32]
    torch_path = get_method("exact").forward(q, k, v, mask, SCALE, causal, ExactParams(), mods)
    assert rel_err(out, torch_path) < TOL[FP32]


@pytest.mark.parametrize("name", list(CASES))
def test_topk_kernel_at_its_exact_limit(name):
    case = CASES[name]
    q, k, v, mask = _inputs(case)
    causal, mods, params = case[4], _mods(case, FP32), TopkParams(k=64)
    out = topk_kernel.forward(q, k, v, mask, SCALE, causal, params, out=poisoned(B, H, NQ, D, FP32), mods=mods)
    assert not torch.isnan(out).any()
    assert rel_err(out, _eager(q, k, v, case, mask)) < TOL[FP32]
    assert rel_err(out, get_method("topk").forward(q, k, v, mask, SCALE, causal, params, mods)) < TOL[FP32]


@pytest.mark.parametrize("name", list(CASES))
def test_topk_kernel_small_k(name):
    case = CASES[name]
    q, k, v, mask = _inputs(case)
    causal, params = case[4], TopkParams(k=5)
    out = topk_kernel.forward(q, k, v, mask, SCALE, causal, params, mods=_mods(case, FP32))
    mods64 = _mods(case, torch.float64)
    ref = topk_naive.forward(q, k, v, mask, SCALE, causal, params, mods64)
    check_rows(out, ref, FP32)
    torch_path = get_method("topk").forward(q.double(), k.double(), v.double(), mask, SCALE, causal, params, mods64)
    check_rows(out, torch_path, FP32)


def test_cross_attention_grouped_heads_and_wide_value_dim():
    """Nq != Nk, 4 query heads on 2 kv heads (h // 2), value dim 24 padded to 32."""
    q, k, v = make_qkv(1, 4, 2, 21, 40, 16, 24, FP32, seed=5)
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mods = ScoreMods("s - t0[h] * abs(q - k) + 0.1 * b", (slopes,), 3, 9)
    ref = get_method("exact").forward(q.double(), k.double(), v.double(), None, 0.3, False, ExactParams(),
                                      ScoreMods(mods.text, (slopes.double(),), 3, 9))
    out = exact_kernel.forward(q, k, v, None, 0.3, False, ExactParams(), mods=mods)
    assert out.shape == (1, 4, 21, 24) and rel_err(out, ref) < TOL[FP32]
    out = topk_kernel.forward(q, k, v, None, 0.3, False, TopkParams(k=40), mods=mods)
    assert rel_err(out, ref) < TOL[FP32]


def test_rows_without_a_visible_key_are_zero():
    """A window of the query itself, with that key masked, leaves the row nothing: 0 (as the torch path)."""
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, FP32, seed=2)
    keep = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    keep[..., [3, 11]] = False
    mods = ScoreMods("s * 2.0", (), 0, 0)
    for kernel, params in ((exact_kernel, ExactParams()), (topk_kernel, TopkParams(k=4))):
        out = kernel.forward(q, k, v, keep, 0.5, True, params, out=poisoned(1, 2, 20, 16, FP32), mods=mods)
        assert out[:, :, [3, 11]].abs().max() == 0
        assert out[:, :, [0, 4, 19]].abs().min() > 0
        torch_path = get_method(kernel.__name__.split(".")[-2]).forward(q, k, v, keep, 0.5, True, params, mods)
        assert rel_err(out, torch_path) < TOL[FP32]


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
ALIBI = ScoreMods("s + t0[h] * k", (SLOPES.float(),))


def test_no_modifications_compile_the_identity_with_constexpr_none_arguments():
    fn, args = score_mod_args(NO_MODS, torch.zeros(1))
    assert fn is triton_score_mod("") and args == [None] * SCORE_MOD_ARGS
    fn, args = score_mod_args(ALIBI, torch.zeros(1))
    assert fn is triton_score_mod(ALIBI.text) and len(args) == SCORE_MOD_ARGS and args[0] is ALIBI.tensors[0]


def test_which_kernel_serves_a_site():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, FP32)
    exact = get_method("exact")
    assert get_kernel(exact, q, k, v, None, False, ExactParams(), strict=False, mods=ALIBI) is exact_kernel.forward
    assert get_kernel("topk", q, k, v, None, False, TopkParams(k=4), strict=False, mods=ALIBI) is topk_kernel.forward
    assert get_kernel("topk", q, k, v, None, False, TopkParams(k=4), strict=False) is topk_kernel.forward
    # exact without modifications: SDPA, whatever impl asks
    assert get_kernel(exact, q, k, v, None, False, ExactParams(), strict=False) is None
    with pytest.raises(ValueError, match="no score modifications: SDPA serves this site"):
        get_kernel(exact, q, k, v, None, False, ExactParams(), strict=True)
    assert _pick_kernel(exact, q, k, v, None, False, "triton", ExactParams()) is None
    assert _pick_kernel(exact, q, k, v, None, False, "torch", ExactParams(), ALIBI) is None


def test_the_op_runs_the_exact_kernel_for_a_site_with_modifications(monkeypatch):
    calls = []
    real = exact_kernel.forward

    def spy(*args, mods, **kwargs):
        calls.append(mods.text)
        return real(*args, mods=mods, **kwargs)

    monkeypatch.setattr(exact_kernel, "forward", spy)
    q, k, v = make_qkv(1, 2, 1, 24, 24, 16, 16, FP32, seed=4)
    kw = dict(is_causal=True, score_mod="3.0 * tanh(s / 3.0)", sliding_window=(5, 0))
    a = SF.exact_attention(q, k, v, impl="triton", **kw)
    assert calls == ["3.0 * tanh(s / 3.0)"]
    b = SF.exact_attention(q, k, v, impl="torch", **kw)
    assert len(calls) == 1 and rel_err(a, b) < TOL[FP32]
    SF.exact_attention(q, k, v, is_causal=True, impl="triton")   # no modifications: SDPA
    assert len(calls) == 1


@pytest.mark.parametrize("kernel,params", [(exact_kernel, ExactParams()), (topk_kernel, TopkParams(k=4))])
def test_what_the_kernels_refuse_is_named(kernel, params):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, FP32)
    five = ScoreMods("s + t0[0] + t1[0] + t2[0] + t3[0] + t4[0]", tuple(torch.zeros(1) for _ in range(5)))
    assert "at most 4" in kernel.supports(q, k, v, None, False, params, mods=five)
    wide = ScoreMods("s + t0[0, 0, 0, 0, 0]", (torch.zeros(1, 1, 1, 1, 1),))
    assert "t0 has 5 dims" in kernel.supports(q, k, v, None, False, params, mods=wide)
    q64, k64, v64 = make_qkv(1, 2, 2, 16, 16, 16, 16, torch.float64)
    assert "not torch.float64" in kernel.supports(q64, k64, v64, None, False, params, mods=ALIBI)
    big = torch.zeros(1, 1, 4, 512)
    assert "limit of" in kernel.supports(big, big, big, None, False, params, mods=ALIBI)
    if kernel is exact_kernel:   # head dims up to 256 (top-k's kernel stops at 128)
        q2, k2, v2 = make_qkv(1, 2, 2, 8, 8, 256, 200, FP32)
        assert kernel.supports(q2, k2, v2, None, False, params, mods=ALIBI) is None


def test_impl_triton_names_the_refusal_and_a_short_sequence_falls_back_quietly():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, FP32)
    five = ScoreMods("s + t0[0] + t1[0] + t2[0] + t3[0] + t4[0]", tuple(torch.zeros(1) for _ in range(5)))
    with pytest.raises(ValueError, match=r"impl='triton' for method 'exact': 5 captured score tensors"):
        run_method(get_method("exact"), q, k, v, None, 0.25, False, 0, "triton", ExactParams(), mods=five)
    # top-k's short-sequence fallback to exact is not the kernel that was asked for: no error
    out = run_method(get_method("topk"), q, k, v, None, 0.25, False, 100, "triton", TopkParams(k=4), mods=five)
    ref = get_method("exact").forward(q, k, v, None, 0.25, False, ExactParams(), five)
    assert rel_err(out, ref) < TOL[FP32]


@pytest.mark.parametrize("fn,kw", [(SF.exact_attention, {}), (SF.topk_attention, {"k": 4})])
def test_triton_on_cpu_without_the_interpreter_raises(fn, kw, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, FP32)
    mods = dict(score_mod="s + t0[h] * k", score_tensors=[SLOPES.float()])
    with pytest.raises(ValueError, match="tensors are on the CPU; set TRITON_INTERPRET=1"):
        fn(q, k, v, impl="triton", **mods, **kw)
    # impl="auto" on the CPU takes the torch path
    assert rel_err(fn(q, k, v, **mods, **kw), fn(q, k, v, impl="torch", **mods, **kw)) == 0
