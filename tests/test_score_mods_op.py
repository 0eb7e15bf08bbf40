"""The op contract's score modifications (score_mod, score_tensors, window_left / window_right):
exact attention applies them as eager would (SDPA on the materialised logits as the reference),
score tensors get gradients, dead rows see the window and the expression, malformed arguments
are refused by name, and methods without a ``mods`` parameter keep working without them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from structattn import functional as SF
from structattn.lowering.dead_rows import apply_dead_rows
from structattn.methods.base import ScoreMods
from structattn.methods.exact.naive import dense_attention

from testlib import TOL, make_qkv, rel_err
from testlib import eager_mod_attention as eager

B, H, Hk, N, D = 2, 4, 2, 12, 8


def _qkv(seed=0, dtype=torch.float64, n=N, nk=None):
    return make_qkv(B, H, Hk, n, nk or n, D, D, dtype, seed=seed, spread=1.5)


def band(nq, nk, left, right, causal=False):
    """Bool [nq, nk] keep mask of a window (None = unbounded) and causality, materialised."""
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    if causal:
        keep &= j <= i
    return keep



SLOPES = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64).view(H, 1)
IDX = torch.arange(N)


@pytest.mark.parametrize("name,text,tensors,fn", [
    ("softcap", "20.0 * tanh(s / 20.0)", [], lambda s: 20.0 * torch.tanh(s / 20.0)),
    ("alibi", "s + t0[h, 0] * k", [SLOPES], lambda s: s + SLOPES.view(1, H, 1, 1) * IDX),
    ("relative", "s - t0[h, 0] * abs(q - k)", [SLOPES],
     lambda s: s - SLOPES.view(1, H, 1, 1) * (IDX[:, None] - IDX[None, :]).abs()),
    ("chain", "where(k % 2 == 0, s * 0.5, s) + float(h) * 0.1", [],
     lambda s: torch.where(IDX % 2 == 0, s * 0.5, s) + torch.arange(H).view(1, H, 1, 1) * 0.1),
])
@pytest.mark.parametrize("window,causal", [(None, False), (None, True), ((3, 0), True), ((2, 4), False)])
def test_exact_applies_every_modification_like_eager(name, text, tensors, fn, window, causal):
    q, k, v = _qkv()
    keep = band(N, N, *(window or (None, None)), causal=causal)
    ref = eager(q, k, v, fn, keep)
    out = SF.exact_attention(q, k, v, is_causal=causal, score_mod=text, score_tensors=tensors, sliding_window=window)
    assert rel_err(out, ref) < TOL[torch.float64]
    mods = ScoreMods(text, tuple(tensors), *(w if w is not None else -1 for w in (window or (None, None))))
    assert rel_err(dense_attention(q, k, v, None, None, causal, mods), ref) < TOL[torch.float64]


def test_window_alone_equals_sdpa_with_the_band_mask_fp32_and_cross_lengths():
    q, k, v = _qkv(dtype=torch.float32, n=9, nk=14)
    keep = band(9, 14, 4, 2)
    pad = torch.ones(B, 1, 1, 14, dtype=torch.bool)
    pad[1, ..., 10:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep & pad, enable_gqa=True)
    out = SF.exact_attention(q, k, v, attn_mask=pad, sliding_window=(4, 2))
    assert rel_err(out, ref) < TOL[torch.float32]


def test_a_materialised_bias_runs_through_sdpa_as_its_mask():
    q, k, v = _qkv()
    bias = torch.randn(B, 1, N, N, dtype=torch.float64)
    pad = torch.rand(B, 1, 1, N) > 0.3
    pad[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~pad, float("-inf")), enable_gqa=True)
    out = SF.exact_attention(q, k, v, attn_mask=pad, score_mod="s + t0[b, 0, q, k]", score_tensors=[bias])
    assert rel_err(out, ref) < TOL[torch.float64]


def test_score_tensors_get_gradients_like_eager():
    """A T5-style learned table read through a relative-position index: gradients for q, k, v and
    the table equal eager's; the int index tensor gets none."""
    q, k, v = (t.clone().requires_grad_() for t in _qkv())
    table = torch.randn(2 * N - 1, H, dtype=torch.float64, requires_grad=True)
    rel = IDX[None, :] - IDX[:, None] + N - 1
    out = SF.exact_attention(q, k, v, is_causal=True, score_mod="s + t0[t1[q, k], h]", score_tensors=[table, rel])
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, table])
    ref = eager(q, k, v, lambda s: s + table[rel].permute(2, 0, 1)[None], band(N, N, None, None, True))
    ref_grads = torch.autograd.grad(ref.square().sum(), [q, k, v, table])
    assert rel_err(out, ref) < TOL[torch.float64]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-9


def test_gradients_through_an_approximation_reach_the_table():
    """The op's backward differentiates the method's torch path: top-k at k >= N is exact, so the
    table's gradient equals eager's."""
    q, k, v = _qkv()
    table = torch.randn(H, 1, dtype=torch.float64, requires_grad=True)
    out = SF.topk_attention(q, k, v, k=N, score_mod="s + t0[h, 0] * k", score_tensors=[table])
    ref = eager(q, k, v, lambda s: s + table.view(1, H, 1, 1) * IDX)
    g, = torch.autograd.grad(out.sum(), [table])
    r, = torch.autograd.grad(ref.sum(), [table])
    assert rel_err(g, r) < 1e-9 and g.abs().sum() > 0


def test_under_torch_compile_fullgraph():
    q, k, v = _qkv(dtype=torch.float32)
    slopes = SLOPES.float()
    fn = torch.compile(lambda q, k, v, t: SF.exact_attention(q, k, v, is_causal=True, sliding_window=(3, 0),
                                                              score_mod="s + t0[h, 0] * k", score_tensors=[t]),
                       backend="aot_eager", fullgraph=True)
    ref = SF.exact_attention(q, k, v, is_causal=True, sliding_window=(3, 0), score_mod="s + t0[h, 0] * k",
                             score_tensors=[slopes])
    assert rel_err(fn(q, k, v, slopes), ref) < TOL[torch.float32]


def test_dead_rows_see_the_window_and_the_expression():
    """Eager with a finite fill (finfo.min) on window-masked and padded entries: a row whose every
    key is masked is the uniform average of v there; the op gives 0, and the dead-row program
    gives eager's answer back, with the soft-capped logits."""
    q, k, v = _qkv()
    keep = band(N, N, 2, 0, causal=True)
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool)
    pad[0, ..., 3:8] = False                         # batch 0: queries 5..7 see no kept key
    fill = torch.finfo(torch.float64).min
    ref = eager(q, k, v, lambda s: torch.where(keep & pad, 5.0 * torch.tanh(s / 5.0), fill))
    mods = ScoreMods("5.0 * tanh(s / 5.0)", (), 2, 0)
    out = SF.exact_attention(q, k, v, attn_mask=pad, is_causal=True, score_mod=mods.text, sliding_window=(2, 0))
    dead = torch.zeros(B, H, N, dtype=torch.bool)
    dead[0, :, 5:8] = True
    assert (out[dead] == 0).all() and rel_err(out[~dead], ref[~dead]) < TOL[torch.float64]
    fixed = apply_dead_rows(out, q, k, v, pad, 1 / math.sqrt(D), True, f"cwm:set:{fill!r}", mods)
    assert rel_err(fixed, ref) < TOL[torch.float64]


@pytest.mark.parametrize("window,causal", [(None, False), (None, True), ((3, 0), True), ((2, 4), False)])
def test_additive_biases_through_sdpa_equal_the_math_path_with_dead_rows_and_chunks(window, causal, monkeypatch):
    """An additive bias (ALiBi-like plus a table with -inf entries) goes chunk by chunk to SDPA as
    its mask; the same logits written as a non-additive expression take the softmax path. Both
    equal eager, dead rows (every key padded or -inf) give 0, in several query chunks."""
    from structattn.methods.exact import torch as exact_torch

    monkeypatch.setattr(exact_torch, "CHUNK_ELEMS", B * H * N * 3)
    q, k, v = _qkv()
    table = torch.randn(N, dtype=torch.float64)
    table[[1, 4]] = float("-inf")
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool)
    pad[1] = False
    pad[1, ..., [1, 4, 9 if causal else 4]] = True   # batch 1: key 9 (finite) only under causality
    keep = band(N, N, *(window or (None, None)), causal=causal) & pad
    logits = lambda s: s + SLOPES.view(1, H, 1, 1) * IDX + table  # noqa: E731
    keep_all = keep & (table > float("-inf"))
    ref = eager(q, k, v, lambda s: logits(s).masked_fill(~keep_all, 0.0), keep_all)
    dead = ~keep_all.expand(B, H, N, N).any(-1)
    ref[dead] = 0.0
    outs = [SF.exact_attention(q, k, v, attn_mask=pad, is_causal=causal, score_mod=text,
                               score_tensors=[SLOPES, table], sliding_window=window)
            for text in ("s + t0[h, 0] * k + t1[k]", "1.0 * s + t0[h, 0] * k + t1[k]")]
    for out in outs:
        assert torch.isfinite(out).all() and (out[dead] == 0).all()
        assert rel_err(out, ref) < TOL[torch.float64]
    assert dead.any() and not dead[0].any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(score_mod="s + x"), "the name 'x'"),
    (dict(score_mod="s + t1[h]", score_tensors=[SLOPES]), "reads t1 but only 1"),
    (dict(score_tensors=[SLOPES]), "without a score_mod"),
    (dict(sliding_window=(-2, 0)), "sliding_window left must be an int >= 0 or None"),
    (dict(sliding_window=3), "sliding_window must be None or a pair"),
])
def test_malformed_modifications_are_refused_by_name(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        SF.exact_attention(q, k, v, **kwargs)


def test_a_method_without_mods_works_without_them_and_refuses_them():
    q, k, v = _qkv()
    doubled = SF.attention("doubled", q, k, v)
    assert rel_err(doubled, 2 * F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) < TOL[torch.float64]
    with pytest.raises(ValueError, match="'doubled' takes no score modifications"):
        SF.attention("doubled", q, k, v, score_mod="s * 2.0")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_with_a_finite_key_bias_mask_runs_in_chunks_like_sdpa(dtype, monkeypatch):
    """BLOOM's form: ALiBi carried as a finite [B, H, 1, K] key bias in the mask, with is_causal.
    It runs chunk by chunk (no N x N mask) and equals SDPA given the materialised mask, also with
    -inf keys and a query row (0) whose only key is -inf (a dead row: 0, as SDPA)."""
    from structattn.methods.exact import torch as exact_torch

    monkeypatch.setattr(exact_torch, "CHUNK_ELEMS", B * H * N * 4)
    q, k, v = _qkv(dtype=dtype)
    bias = (SLOPES.view(1, H, 1, 1) * IDX).to(dtype).expand(B, H, 1, N).clone()
    bias[0, ..., 0] = float("-inf")
    bias[1, ..., 4] = float("-inf")
    full = bias + torch.full((N, N), float("-inf"), dtype=dtype).triu(1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True)
    ref = torch.nan_to_num(ref, nan=0.0)            # torch versions differ on fully masked rows
    out = SF.exact_attention(q, k, v, attn_mask=bias, is_causal=True)
    assert (out[0, :, 0] == 0).all()
    assert rel_err(out, ref) < TOL[dtype]
