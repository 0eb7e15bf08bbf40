"""Score modifications on tiny T5 and Swin models built from configs (random weights, float64),
eager and sdpa: every attention site is found and rewritten, the report shows the terms read
from the graph (T5: a relative bucket bias, the decoder's causal mask split out of its mask
tensor, no bias in cross-attention; Swin: a table gathered through its relative-position index,
plus the shifted windows' mask, as a general bias), exact and top-k at k >= N (its exact limit)
equal eager, MRA serves every site (equal to eager at its exact limit), and Monarch keeps the sites
it cannot serve exact with the reason."""
from __future__ import annotations

import warnings

import pytest
import torch

import structattn
from testlib import rel_err

transformers = pytest.importorskip("transformers")

#: T5's three sites (encoder self, decoder self, cross) -> (terms column, mask kind)
T5_SITES = [("bias(relative)", "none"), ("bias(relative), causal", "causal"), ("-", "none")]
T5_PADDED = [("bias(relative), padding", "key_padding"), ("bias(relative), causal, padding", "causal+key_padding"),
             ("padding", "key_padding")]


def _quiet(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build().eval().double()


def t5(impl):
    return _quiet(lambda: transformers.T5Model(transformers.T5Config(
        num_layers=1, num_decoder_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=100,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, attn_implementation=impl)))


def t5_inputs(padded):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "decoder_input_ids": ids[:, :10]}
    if padded:
        kw["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
        kw["attention_mask"][1, 8:] = 0
        kw["decoder_attention_mask"] = torch.ones(2, 10, dtype=torch.long)
        kw["decoder_attention_mask"][1, 7:] = 0
    return kw


#: (window, depths, heads, image): 4 windows of 16 then one of 16 (stage 2 unshifted); windows of
#: 4 tokens; a 6 x 6 patch grid padded to 8 x 8 before windowing
SWIN_CONFIGS = {"w4": (4, [2, 2], [2, 4], 32), "w2": (2, [2], [2], 32), "w4_padded": (4, [2], [2], 24)}


def swin(impl, config):
    window, depths, heads, image = SWIN_CONFIGS[config]
    return _quiet(lambda: transformers.SwinModel(transformers.SwinConfig(
        image_size=image, patch_size=4, num_channels=3, embed_dim=16, depths=depths, num_heads=heads,
        window_size=window, attn_implementation=impl)))


def swin_input(config):
    image = SWIN_CONFIGS[config][3]
    return torch.randn(2, 3, image, image, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _explain(model, args, kw, method, params):
    with torch.no_grad():
        ref = model(*args, **kw)[0]
    report = structattn.explain(model, *args, **kw, options={
        "method": method, method: params, "exact_when_cheaper": False})
    return report, report.output[0], ref


LIMITS = [("exact", {}), ("topk", {"k": 64})]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method,params", LIMITS)
def test_t5_sites_terms_and_exact_limits(impl, method, params):
    report, out, ref = _explain(t5(impl), (), t5_inputs(False), method, params)
    assert [(s.terms, s.mask) for s in report.sites] == T5_SITES, str(report)
    assert all(s.rewritten and s.method == method for s in report.sites), str(report)
    assert rel_err(out, ref) < 1e-12, str(report)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_t5_with_padding_keeps_bias_causal_and_padding_apart(impl):
    report, out, ref = _explain(t5(impl), (), t5_inputs(True), "topk", {"k": 64})
    assert [(s.terms, s.mask) for s in report.sites] == T5_PADDED, str(report)
    assert all(s.rewritten and s.method == "topk" for s in report.sites), str(report)
    assert rel_err(out, ref) < 1e-12, str(report)


def test_t5_mra_serves_every_site_with_its_terms_at_its_exact_limit():
    # 3 blocks of 4 keys per row with 3 chosen: MRA's exact limit, relative bias and causal kept
    report, out, ref = _explain(t5("eager"), (), t5_inputs(False), "mra", {"block_size": 4, "blocks_per_row": 3})
    enc, dec, cross = report.sites
    assert all(s.rewritten and s.method == "mra" and s.reason is None for s in report.sites), str(report)
    assert "bias(relative)" in enc.terms and "bias(relative)" in dec.terms and dec.mask == "causal", str(report)
    assert rel_err(out, ref) < 1e-10, str(report)


def test_t5_mra_with_few_blocks_is_finite_and_close():
    report, out, ref = _explain(t5("eager"), (), t5_inputs(False), "mra", {"block_size": 2, "blocks_per_row": 2})
    assert all(s.method == "mra" for s in report.sites), str(report)
    assert torch.isfinite(out).all() and 0 < rel_err(out, ref) < 0.2


def test_t5_monarch_refuses_relative_bias_and_causal_with_reasons():
    report, out, ref = _explain(t5("eager"), (), t5_inputs(False), "monarch", {"block_size": 4, "num_steps": 2})
    enc, dec, cross = report.sites
    assert enc.method == "exact" and "bias(relative)" in enc.reason, enc.reason
    assert dec.method == "exact" and "no causal form" in dec.reason, dec.reason
    assert cross.method == "monarch", str(report)
    # Monarch with 4-key blocks approximates the cross-attention: finite, not equal
    assert torch.isfinite(out).all() and rel_err(out, ref) > 1e-6


#: (impl, config, method): every config and implementation under both exact limits, not all combinations
SWIN_RUNS = [(impl, "w4", method) for impl in ("eager", "sdpa") for method in ("exact", "topk")] + [
    ("eager", "w2", "topk"), ("sdpa", "w2", "exact"), ("eager", "w4_padded", "exact"), ("sdpa", "w4_padded", "topk")]


@pytest.mark.parametrize("impl,config,method", SWIN_RUNS)
def test_swin_sites_terms_and_exact_limits(impl, config, method):
    params = dict(LIMITS)[method]
    report, out, ref = _explain(swin(impl, config), (swin_input(config),), {}, method, params)
    assert report.sites and all(s.rewritten and s.method == method for s in report.sites), str(report)
    assert all((s.terms, s.mask) == ("bias(general)", "none") for s in report.sites), str(report)
    texts = [t.text for s in report.sites for t in s.shape.terms if t.kind == "bias"]
    # the table is read through the relative-position index, not captured as an N x N tensor
    assert all("t0[t1[" in t for t in texts), texts
    # the shifted blocks (every second one of stage 1) add the cyclic-shift mask's -100
    assert "-100" in texts[1] and "-100" not in texts[0], texts
    # eager runs its softmax in float32: compiled and eager differ at float32 rounding
    assert rel_err(out, ref) < (1e-6 if impl == "eager" else 1e-12), str(report)


def test_swin_mra_serves_the_table_bias_at_its_exact_limit():
    # windows of 16 tokens: 4 blocks of 4 keys, all chosen
    report, out, ref = _explain(swin("eager", "w4"), (swin_input("w4"),), {}, "mra", {"block_size": 4, "blocks_per_row": 4})
    assert report.sites and all(s.rewritten and s.method == "mra" for s in report.sites), str(report)
    assert all("bias(general)" in s.terms for s in report.sites), str(report)
    assert rel_err(out, ref) < 1e-6


def test_swin_monarch_stays_exact_naming_the_general_bias():
    report, out, ref = _explain(swin("eager", "w4"), (swin_input("w4"),), {}, "monarch", {"block_size": 16, "num_steps": 2})
    for s in report.sites:
        assert s.rewritten and s.method == "exact", str(report)
        assert "takes only key-only biases" in s.reason and "bias(general)" in s.reason, s.reason
    assert rel_err(out, ref) < 1e-6
