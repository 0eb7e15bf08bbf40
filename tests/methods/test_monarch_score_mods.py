"""MonarchAttention with score modifications: key-only biases (ALiBi included) ride in the R-step
like key padding, so Monarch with a key-only expression equals Monarch with the same bias given as
an additive key-padding mask; at its exact limits it equals eager; what it cannot keep (soft-capping,
relative and general biases, other chains, sliding windows) is refused with a reason."""
from __future__ import annotations

import math

import pytest
import torch

from structattn import functional as SF
from structattn.methods import SiteShape, get_method
from structattn.methods.base import ScoreMods
from structattn.methods.monarch import MonarchParams, monarch_forward
from structattn.methods.monarch import naive as monarch_naive
from structattn.scoremod.terms import terms_of

from testlib import TOL, make_qkv, rel_err
from testlib import eager_mod_attention as eager

B, H, Hk, N, D = 2, 4, 2, 12, 8
METHOD = get_method("monarch")
SLOPES = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64).view(H, 1)
IDX = torch.arange(N, dtype=torch.float64)
TABLE = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

#: (expression, tensors, its key bias [B, H, 1, N] up to per-row constants, its full logits fn)
KEY_ONLY = {
    "alibi": ("s + t0[h, 0] * (k - q)", [SLOPES],
              SLOPES.view(1, H, 1, 1) * IDX, lambda s: s + SLOPES.view(1, H, 1, 1) * (IDX - IDX[:, None])),
    "key_table": ("s + t0[b, k]", [TABLE],
                  TABLE.view(B, 1, 1, N), lambda s: s + TABLE.view(B, 1, 1, N)),
    "scaled_bloom": ("s * 0.5 + t0[h, 0] * k", [SLOPES],
                     None, lambda s: 0.5 * s + SLOPES.view(1, H, 1, 1) * IDX),
}


def _qkv(seed=0, dtype=torch.float64):
    return make_qkv(B, H, Hk, N, N, D, D, dtype, seed=seed, spread=1.5)


def _padding():
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[0, ..., 8:] = False
    return keep



@pytest.mark.parametrize("name", ["alibi", "key_table"])
@pytest.mark.parametrize("block,steps", [(3, 1), (4, 2), (5, 2)])
def test_key_only_mod_equals_the_same_bias_as_a_key_padding_mask(name, block, steps):
    q, k, v = _qkv()
    text, tensors, bias, _ = KEY_ONLY[name]
    keep = _padding()
    mask = torch.where(keep, bias, float("-inf"))                        # [B, H, 1, N] additive
    params = MonarchParams(block_size=block, num_steps=steps)
    ref = monarch_forward(q, k, v, mask, 1 / math.sqrt(D), params)
    out = SF.monarch_attention(q, k, v, keep, block_size=block, num_steps=steps, score_mod=text,
                               score_tensors=tensors)
    assert rel_err(out, ref) < 1e-12
    oracle = monarch_naive.forward(q, k, v, keep, 1 / math.sqrt(D), False, params,
                                   ScoreMods(text, tuple(tensors)))
    assert rel_err(out, oracle) < TOL[torch.float64]
    # an approximation: the modification changes the answer, and it is not eager's
    assert rel_err(out, SF.monarch_attention(q, k, v, keep, block_size=block, num_steps=steps)) > 1e-3


@pytest.mark.parametrize("name", sorted(KEY_ONLY))
def test_at_its_exact_limits_monarch_with_mods_equals_eager(name):
    q, k, v = _qkv()
    text, tensors, _, fn = KEY_ONLY[name]
    keep = _padding()
    ref = eager(q, k, v, fn, keep)
    for block in (1, N):
        out = SF.monarch_attention(q, k, v, keep, block_size=block, num_steps=2, score_mod=text,
                                   score_tensors=tensors)
        assert rel_err(out, ref) < TOL[torch.float64], (block, rel_err(out, ref))


def test_slopes_get_eagers_gradient_at_the_exact_limit():
    q, k, v = _qkv()
    slopes = SLOPES.clone().requires_grad_(True)
    out = SF.monarch_attention(q, k, v, block_size=N, score_mod="s + t0[h, 0] * (k - q)", score_tensors=[slopes])
    ref = eager(q, k, v, lambda s: s + slopes.view(1, H, 1, 1) * (IDX - IDX[:, None]))
    g, = torch.autograd.grad(out.square().sum(), [slopes])
    r, = torch.autograd.grad(ref.square().sum(), [slopes])
    assert g.abs().sum() > 0 and rel_err(g, r) < 1e-9


def test_kernel_takes_the_key_bias_like_the_torch_path():
    q, k, v = _qkv(dtype=torch.float32)
    text, tensors, _, _ = KEY_ONLY["alibi"]
    kw = dict(block_size=4, num_steps=2, score_mod=text, score_tensors=[SLOPES.float()])
    out = SF.monarch_attention(q, k, v, _padding(), impl="triton", **kw)
    ref = SF.monarch_attention(q, k, v, _padding(), impl="torch", **kw)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("text,window,match", [
    ("30.0 * tanh(s / 30.0)", None, r"monarch cannot apply soft-capping \(softcap\(30\)\)"),
    ("s - t0[h, 0] * abs(q - k)", None, r"monarch takes only key-only biases .*bias\(relative\)"),
    ("s + t0[h, 0] * q * k", None, r"monarch takes only key-only biases .*bias\(general\)"),
    ("where(k % 2 == 0, s * 0.5, s)", None, "monarch cannot apply the element-wise score modification"),
    ("", (3, 0), r"monarch has no sliding-window form \(window\(3,0\)\)"),
])
def test_what_monarch_cannot_keep_is_refused_with_its_reason(text, window, match):
    q, k, v = _qkv()
    tensors = [SLOPES] if "t0" in text else []
    with pytest.raises(ValueError, match=match):
        SF.monarch_attention(q, k, v, score_mod=text, score_tensors=tensors, sliding_window=window)
    site = SiteShape(batch=B, num_heads=H, num_kv_heads=Hk, q_len=N, kv_len=N, head_dim=D, v_head_dim=D,
                     terms=terms_of(text, *(window or (-1, -1))))
    assert METHOD.supports(site, MonarchParams()) is not None
    # the op's run-time check says the same for a modification supports() never saw
    with pytest.raises(ValueError, match="monarch"):
        METHOD.forward(q, k, v, None, 0.3, False, MonarchParams(), ScoreMods(text, tuple(tensors),
                                                                            *(window or (-1, -1))))


def test_supports_takes_a_scale_and_key_only_biases():
    for text in ("s + t0[h, 0] * (k - q)", "s * 0.5 + t0[h, 0] * k", "s + t0[b, k]", "s / 4.0"):
        site = SiteShape(batch=B, num_heads=H, num_kv_heads=Hk, q_len=N, kv_len=N, head_dim=D, v_head_dim=D,
                         mask="key_padding", terms=terms_of(text))
        assert METHOD.supports(site, MonarchParams()) is None, text
