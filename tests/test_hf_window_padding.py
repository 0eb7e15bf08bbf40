"""Sliding-window layers called with an ``attention_mask`` (tiny Mistral and Gemma-2 from configs,
random weights): the model's mask ``window & causal & padding[b, k]`` reaches the op as is_causal,
the window and a [B, 1, 1, K] key-padding mask (mask ``causal+key_padding``, term ``window(3,0)``),
so MRA and top-k serve the sliding layers; at their exact limits they equal eager on every row,
the left-padded rows (every key masked: eager's uniform average of v) included.

The padded runs are float32: in a float64 model HF's eager attention adds finfo(float64).min and
takes the softmax in float32, where that fill is -inf, so eager's fully padded rows are NaN (and
spread to the whole item in the next layer); float64 runs use an all-ones mask."""
from __future__ import annotations

import warnings

import pytest
import torch

import structattn
from testlib import rel_err

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100)
N = 12
PAD = 5      # left padding of the second item


def gemma2():
    return transformers.Gemma2Model(transformers.Gemma2Config(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        attn_logit_softcapping=30.0, final_logit_softcapping=None, attn_implementation="eager", **SMALL))


def mistral():
    return transformers.MistralModel(transformers.MistralConfig(
        num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
        attn_implementation="eager", **SMALL))


#: model -> (builder, the sliding layers' indices)
MODELS = {"gemma2": (gemma2, [0]), "mistral": (mistral, [0, 1])}


def _run(name, method, params, padded, dtype):
    torch.manual_seed(0)
    build, sliding = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build().eval().to(dtype)
    ids = torch.randint(0, 100, (2, N), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, N, dtype=torch.long)
    if padded:
        mask[1, :PAD] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)[0]
    report = structattn.explain(model, input_ids=ids, attention_mask=mask,
                                options={"method": method, method: params, "exact_when_cheaper": False})
    return report, report.output[0], ref, sliding


CASES = [(name, method, params, padded)
         for name in sorted(MODELS)
         for method, params in (("mra", {"block_size": 4, "blocks_per_row": 3}), ("topk", {"k": 64}))
         for padded in (True, False)]


@pytest.mark.parametrize("name,method,params,padded", CASES)
def test_sliding_layers_with_an_attention_mask_equal_eager_at_the_exact_limit(name, method, params, padded):
    # float32 with padding (eager's padded rows are well defined there), float64 with all ones
    dtype = torch.float32 if padded else torch.float64
    report, out, ref, sliding = _run(name, method, params, padded, dtype)
    assert all(s.rewritten and s.method == method for s in report.sites), str(report)
    for i in sliding:
        site = report.sites[i]
        assert site.mask == "causal+key_padding", str(report)
        assert "window(3,0)" in site.terms and "general" not in site.terms, str(report)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert rel_err(out[0], ref[0]) < 1e-5, str(report)
    if padded:
        assert rel_err(out[1, PAD:], ref[1, PAD:]) < 1e-5, str(report)     # the real tokens
        assert rel_err(out[1, :PAD], ref[1, :PAD]) < 1e-5, str(report)     # the padded rows, as eager
    else:
        # (the models softmax in float32: float64 eager and compiled differ at float32 rounding)
        assert rel_err(out, ref) < 1e-5, str(report)


def test_mra_small_budget_with_padding_finite_and_close():
    # blocks of 2, two exact blocks per query block: the sliding layers' window cuts blocks that
    # are then selected; the padded rows still get eager's answer (the dead-row program)
    report, out, ref, sliding = _run("mistral", "mra", {"block_size": 2, "blocks_per_row": 2}, True, torch.float32)
    assert all(s.rewritten and s.method == "mra" for s in report.sites), str(report)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.05, rel_err(out, ref)
