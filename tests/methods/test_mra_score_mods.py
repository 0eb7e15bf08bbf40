"""MRA with score modifications: key-only biases (ALiBi included, up to its per-row constant) are
taken like key padding (pooled with their softmax weights, exact in the selected blocks), so MRA
with a key-only expression equals MRA with the same bias as an additive key-padding mask, on the
general torch path and the fused CPU path alike. Every other term (soft-capping, relative and
general biases, chains, sliding windows) runs on the torch path, which matches the float64
reference below the exact limit and eager at it (every candidate block selected); the Triton
forward kernel runs them as a generated score_mod (interpreter tests)."""
from __future__ import annotations

import math

import pytest
import torch

from structattn import functional as SF
from structattn.methods import SiteShape, get_method
from structattn.methods.base import ScoreMods
from structattn.methods.mra import MraParams, mra_forward
from structattn.methods.mra import naive as mra_naive
from structattn.scoremod.terms import terms_of

from testlib import TOL, make_qkv, rel_err
from testlib import eager_mod_attention as eager

B, H, Hk, N, D = 2, 4, 2, 16, 8
METHOD = get_method("mra")
SLOPES = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64).view(H, 1)
IDX = torch.arange(N, dtype=torch.float64)
ALIBI = "s + t0[h, 0] * (k - q)"


def _qkv(seed=0, dtype=torch.float64):
    return make_qkv(B, H, Hk, N, N, D, D, dtype, seed=seed, spread=1.5)


def _padding():
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[0, ..., 11:] = False
    return keep


def _key_mask(dtype=torch.float64):
    return torch.where(_padding(), SLOPES.view(1, H, 1, 1) * IDX, float("-inf")).to(dtype)



@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["mra2", "mra2s"])
def test_alibi_equals_the_same_bias_as_a_key_padding_mask_and_the_reference(causal, variant):
    q, k, v = _qkv()
    params = MraParams(block_size=4, blocks_per_row=2, variant=variant)
    ref = mra_forward(q, k, v, _key_mask(), 1 / math.sqrt(D), causal, params)
    out = SF.mra_attention(q, k, v, _padding(), is_causal=causal, block_size=4, blocks_per_row=2, variant=variant,
                           score_mod=ALIBI, score_tensors=[SLOPES])
    assert rel_err(out, ref) < 1e-12
    oracle = mra_naive.forward(q, k, v, _padding(), 1 / math.sqrt(D), causal, params, ScoreMods(ALIBI, (SLOPES,)))
    assert rel_err(out, oracle) < TOL[torch.float64]
    assert rel_err(out, SF.mra_attention(q, k, v, _padding(), is_causal=causal, block_size=4, blocks_per_row=2,
                                         variant=variant)) > 1e-3


def test_fused_cpu_path_and_general_path_agree_with_mods():
    q, k, v = _qkv(dtype=torch.float32)
    kw = dict(is_causal=True, block_size=4, blocks_per_row=2, score_mod=ALIBI, score_tensors=[SLOPES.float()])
    with torch.no_grad():                                              # float32, no autograd: fused path
        fused = SF.mra_attention(q, k, v, _padding(), **kw)
    slopes = SLOPES.float().requires_grad_(True)                       # the bias records autograd: general path
    general = SF.mra_attention(q, k, v, _padding(), **{**kw, "score_tensors": [slopes]})
    assert rel_err(fused, general) < TOL[torch.float32]
    g, = torch.autograd.grad(general.square().sum(), [slopes])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_at_its_exact_limit_mra_with_alibi_equals_eager(causal):
    q, k, v = _qkv()
    keep = _padding() & (torch.ones(N, N, dtype=torch.bool).tril() if causal else True)
    ref = eager(q, k, v, lambda s: s + SLOPES.view(1, H, 1, 1) * (IDX - IDX[:, None]), keep)
    out = SF.mra_attention(q, k, v, _padding(), is_causal=causal, block_size=4, blocks_per_row=4,
                           score_mod=ALIBI, score_tensors=[SLOPES])
    assert rel_err(out, ref) < TOL[torch.float64]


def test_kernel_takes_the_key_bias_like_the_torch_path():
    q, k, v = _qkv(dtype=torch.float32)
    kw = dict(is_causal=True, block_size=4, blocks_per_row=2, score_mod=ALIBI, score_tensors=[SLOPES.float()])
    out = SF.mra_attention(q, k, v, _padding(), impl="triton", **kw)
    ref = SF.mra_attention(q, k, v, _padding(), impl="torch", **kw)
    assert rel_err(out, ref) < 1e-5


SCALE = 1 / math.sqrt(D)
TABLE = torch.randn(H, 2 * N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
GENERAL = torch.randn(B, H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
POS = torch.arange(N)
REL = POS.view(1, N) - POS.view(N, 1)                                  # [q, k]: k - q

#: name -> (score_mod, tensors, window, the eager logits of the scaled scores)
TERMS = {
    "softcap": ("5.0 * tanh(s / 5.0)", (), None, lambda s: 5.0 * torch.tanh(s / 5.0)),
    "alibi": (ALIBI, (SLOPES,), None, lambda s: s + SLOPES.view(1, H, 1, 1) * REL),
    "relative_table": ("s + t0[h, k - q + 16]", (TABLE,), None, lambda s: s + TABLE[:, REL + 16].unsqueeze(0)),
    "general_bias": ("s + t0[b, h, q, k]", (GENERAL,), None, lambda s: s + GENERAL),
    "softcap_of_biased": ("5.0 * tanh((s + t0[h, 0] * (k - q)) / 5.0)", (SLOPES,), None,
                          lambda s: 5.0 * torch.tanh((s + SLOPES.view(1, H, 1, 1) * REL) / 5.0)),
    "window_left": ("", (), (9, 0), lambda s: s),
    "window_both": ("", (), (6, 5), lambda s: s),
    "softcap_window": ("5.0 * tanh(s / 5.0)", (), (6, 2), lambda s: 5.0 * torch.tanh(s / 5.0)),
    "alibi_window": (ALIBI, (SLOPES,), (9, 0), lambda s: s + SLOPES.view(1, H, 1, 1) * REL),
}


def _keep(window, causal):
    keep = _padding()
    if window is not None:
        keep = keep & (REL >= -window[0]) & (REL <= window[1])
    if causal:
        keep = keep & (REL <= 0)
    return keep


def _mra(q, k, v, name, causal, r, variant="mra2", **kw):
    text, tensors, window, _ = TERMS[name]
    return SF.mra_attention(q, k, v, kw.pop("mask", _padding()), is_causal=causal, block_size=4, blocks_per_row=r,
                            variant=variant, score_mod=text, score_tensors=list(tensors), sliding_window=window, **kw)


@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r,variant", [(1, "mra2"), (2, "mra2"), (2, "mra2s")])
def test_below_the_limit_the_torch_path_matches_the_reference(name, causal, r, variant):
    q, k, v = _qkv(seed=1)
    text, tensors, window, _ = TERMS[name]
    out = _mra(q, k, v, name, causal, r, variant)
    params = MraParams(block_size=4, blocks_per_row=r, variant=variant)
    oracle = mra_naive.forward(q, k, v, _padding(), SCALE, causal, params, ScoreMods(text, tensors, *(window or (-1, -1))))
    assert rel_err(out, oracle) < TOL[torch.float64]
    at_limit = _mra(q, k, v, name, causal, 4, variant)
    assert rel_err(out, at_limit) > 1e-4            # the approximation really ran


@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("causal", [False, True])
def test_at_the_all_blocks_limit_mra_equals_eager(name, causal):
    q, k, v = _qkv(seed=2)
    ref = eager(q, k, v, TERMS[name][3], _keep(TERMS[name][2], causal))
    for variant in ("mra2", "mra2s"):
        assert rel_err(_mra(q, k, v, name, causal, 4, variant), ref) < TOL[torch.float64], variant


def test_float32_general_path_matches_the_reference():
    q, k, v = _qkv(seed=5, dtype=torch.float32)
    out = _mra(q, k, v, "softcap_window", True, 2)
    oracle = mra_naive.forward(q, k, v, _padding(), SCALE, True, MraParams(block_size=4, blocks_per_row=2),
                               ScoreMods("5.0 * tanh(s / 5.0)", (), 6, 2))
    assert out.dtype == torch.float32 and rel_err(out, oracle) < TOL[torch.float32]


def test_cut_blocks_are_never_pooled():
    # window (1, 0) with blocks of 4: every query block sees the diagonal block and part of the
    # previous one, both cut by the window. With r = 1 the previous block is dropped, not pooled:
    # no query sees a key outside its window, so the rows equal exact attention over their
    # in-block keys only.
    q, k, v = _qkv(seed=6)
    v = v.clone()
    out = SF.mra_attention(q, k, v, is_causal=True, block_size=4, blocks_per_row=1, sliding_window=(1, 0))
    keep = (REL <= 0) & (REL >= -1) & (POS.view(N, 1) // 4 == POS.view(1, N) // 4)
    assert rel_err(out, eager(q, k, v, lambda s: s, keep)) < TOL[torch.float64]


def test_non_finite_inputs_and_dead_rows_as_the_exact_method():
    q, k, v = _qkv(seed=7)
    q, k = q.clone(), k.clone()
    q[0, 1, 5] = float("nan")                        # poisons its own row
    k[1, 0, 9] = float("inf")                        # poisons the rows that see key 9 of batch 1
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[0, ..., 8:15] = False                       # window (3, 0): rows 11..14 of batch 0 see no key
    kw = dict(score_mod="5.0 * tanh(s / 5.0)", sliding_window=(3, 0), is_causal=True)
    out = SF.mra_attention(q, k, v, keep, block_size=4, blocks_per_row=4, **kw)
    ref = SF.exact_attention(q, k, v, keep, **kw)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    assert (out[0, :, 11:15] == 0).all() and (out[0, :, 15] != 0).any()
    live = ~ref.isnan()
    assert rel_err(out[live], ref[live]) < TOL[torch.float64]


def test_gradients_reach_the_expression_tensors_and_equal_eager_at_the_limit():
    q, k, v = _qkv(seed=8)
    table = TABLE.clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    out = SF.mra_attention(q, k, v, _padding(), is_causal=True, block_size=4, blocks_per_row=4,
                           score_mod="s + t0[h, k - q + 16]", score_tensors=[table], sliding_window=(6, 0))
    g_mra = torch.autograd.grad(out.square().sum(), [q, table])
    table2 = TABLE.clone().requires_grad_(True)
    q2 = q.detach().clone().requires_grad_(True)
    ref = eager(q2, k, v, lambda s: s + table2[:, REL + 16].unsqueeze(0), _keep((6, 0), True))
    g_ref = torch.autograd.grad(ref.square().sum(), [q2, table2])
    for a, b in zip(g_mra, g_ref):
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("name,causal", [("softcap_window", True), ("relative_table", False)])
def test_the_kernel_generates_the_score_mod_like_the_torch_path(name, causal):
    # selection on the torch path, the rest of the expression generated into the forward kernel
    q, k, v = _qkv(dtype=torch.float32)
    out = _mra(q, k, v, name, causal, 2, impl="triton")
    assert rel_err(out, _mra(q, k, v, name, causal, 2, impl="torch")) < 1e-5


def test_the_kernel_refuses_what_it_cannot_generate_with_the_reason():
    q, k, v = _qkv(dtype=torch.float32)
    text = "s + t0[h, 0] * t1[h, 0] * t2[h, 0] * t3[h, 0] * t4[h, 0] * (k - q) * s"
    kw = dict(is_causal=True, block_size=4, blocks_per_row=2, score_mod=text, score_tensors=[SLOPES.float()] * 5)
    with pytest.raises(ValueError, match="mra kernel passes at most 4 captured tensors"):
        SF.mra_attention(q, k, v, impl="triton", **kw)
    assert rel_err(SF.mra_attention(q, k, v, impl="auto", **kw), SF.mra_attention(q, k, v, impl="torch", **kw)) == 0


@pytest.mark.parametrize("text,window", [("30.0 * tanh(s / 30.0)", None), ("s - t0[h, 0] * abs(q - k)", None),
                                         ("s + t0[b, h, q, k]", None), ("s + 0.5 * sigmoid(s)", None),
                                         ("", (3, 0))])
def test_supports_every_term(text, window):
    site = SiteShape(batch=B, num_heads=H, num_kv_heads=Hk, q_len=N, kv_len=N, head_dim=D, v_head_dim=D,
                     mask="causal", terms=terms_of(text, *(window or (-1, -1))))
    assert METHOD.supports(site, MraParams()) is None
    general = SiteShape(batch=B, num_heads=H, num_kv_heads=Hk, q_len=N, kv_len=N, head_dim=D, v_head_dim=D,
                        mask="general", terms=terms_of(text, *(window or (-1, -1))))
    assert "general [Q, K] mask" in METHOD.supports(general, MraParams())
