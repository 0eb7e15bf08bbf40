"""MRA with score modifications: key-only biases (ALiBi included, up to its per-row constant) are
taken like key padding (pooled with their softmax weights, exact in the selected blocks), so MRA
with a key-only expression equals MRA with the same bias as an additive key-padding mask, on the
general torch path and the fused CPU path alike; at its exact limit (every block selected) it
equals eager; what it cannot keep is refused with a reason."""
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


@pytest.mark.parametrize("text,window,match", [
    ("30.0 * tanh(s / 30.0)", None, r"mra cannot apply soft-capping \(softcap\(30\)\)"),
    ("s - t0[h, 0] * abs(q - k)", None, r"mra takes only key-only biases .*bias\(relative\)"),
    ("", (3, 0), r"mra has no sliding-window form \(window\(3,0\)\)"),
])
def test_what_mra_cannot_keep_is_refused_with_its_reason(text, window, match):
    q, k, v = _qkv()
    tensors = [SLOPES] if "t0" in text else []
    with pytest.raises(ValueError, match=match):
        SF.mra_attention(q, k, v, is_causal=True, score_mod=text, score_tensors=tensors, sliding_window=window)
    with pytest.raises(ValueError, match="mra"):
        METHOD.forward(q, k, v, None, 0.3, True, MraParams(), ScoreMods(text, tuple(tensors), *(window or (-1, -1))))
    site = SiteShape(batch=B, num_heads=H, num_kv_heads=Hk, q_len=N, kv_len=N, head_dim=D, v_head_dim=D,
                     mask="causal", terms=terms_of(text, *(window or (-1, -1))))
    assert METHOD.supports(site, MraParams()) is not None
