"""``attn_implementation="structattn"``: transformers models run structattn's methods eagerly.

Tiny models from configs (random weights). Method "exact" must give what the uncompiled model
gives; an approximation must give what ``torch.compile(model, backend="structattn")`` gives with
the same options, and make the same per-layer decisions (method, mask kind, reason)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import structattn
from structattn import hf
from structattn.methods.exact import sdpa
from testlib import rel_err

transformers = pytest.importorskip("transformers")

# a wide initialisation makes attention far from uniform, so approximations visibly differ from exact
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, initializer_range=0.3)
SEQ = 16


def bert(impl="sdpa", **extra):
    cfg = transformers.BertConfig(num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, **SMALL,
                                  attn_implementation=impl, **extra)
    return transformers.BertModel(cfg), [f"encoder.layer.{i}.attention.self" for i in range(2)]


def gpt2(impl="sdpa", **extra):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=impl, **extra)
    return transformers.GPT2Model(cfg), [f"h.{i}.attn" for i in range(2)]


def llama(impl="sdpa", **extra):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64, **SMALL, attn_implementation=impl, **extra)
    return transformers.LlamaModel(cfg), [f"layers.{i}.self_attn" for i in range(2)]


def mistral(impl="sdpa", **extra):
    # a window shorter than the inputs, so the sliding-window mask really restricts attention
    cfg = transformers.MistralConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100,
                                     max_position_embeddings=64, sliding_window=6, **SMALL,
                                     attn_implementation=impl, **extra)
    return transformers.MistralModel(cfg), [f"layers.{i}.self_attn" for i in range(2)]


def vit(impl="sdpa", **extra):
    cfg = transformers.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **SMALL, attn_implementation=impl,
                                 **extra)
    return transformers.ViTModel(cfg), [f"layers.{i}.attention" for i in range(2)]


FAMILIES = {"bert": bert, "gpt2": gpt2, "llama": llama, "mistral": mistral, "vit": vit}
CAUSAL = {"gpt2", "llama", "mistral"}


def build(name, impl="sdpa", **extra):
    torch.manual_seed(0)
    model, layers = FAMILIES[name](impl, **extra)
    return model.eval(), layers


def inputs(name, padding=None):
    """(args, kwargs, keep): keep marks the positions whose outputs are compared."""
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return (torch.randn(2, 3, 32, 32, generator=g),), {}, None
    ids = torch.randint(0, 100, (2, SEQ), generator=g)
    if padding is None:
        return (ids,), {}, None
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, 11:] = 0
    else:
        mask[1, :5] = 0
    return (ids,), {"attention_mask": mask}, mask.bool()


def hidden(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).last_hidden_state


def applied(model, options):
    return hf.apply(copy.deepcopy(model), options)


def decisions(sites):
    return [(s.method, s.mask, s.reason) for s in sites]


# ------------------------------------------------------------------------------------------------
# method "exact" equals the uncompiled model
# ------------------------------------------------------------------------------------------------
EXACT_CASES = [(n, impl, pad) for n in ("bert", "gpt2", "llama", "mistral") for impl in ("sdpa", "eager")
               for pad in (None, "right")]
EXACT_CASES += [("llama", "sdpa", "left"), ("gpt2", "eager", "left"), ("vit", "sdpa", None), ("vit", "eager", None)]


@pytest.mark.parametrize("name,impl,padding", EXACT_CASES)
def test_exact_equals_uncompiled_model(name, impl, padding):
    model, layers = build(name, impl)
    args, kwargs, keep = inputs(name, padding)
    ref = hidden(model, args, kwargs)
    fast = applied(model, {"method": "exact"})
    assert fast.config._attn_implementation == "structattn"
    out = hidden(fast, args, kwargs)
    rows = out[keep] if padding == "left" else out
    assert rel_err(rows, ref[keep] if padding == "left" else ref) < 1e-5

    report = hf.report(fast)
    assert [s.layer for s in report.sites] == layers, str(report)
    assert set(layers) <= {n for n, _ in fast.named_modules()}
    assert all(s.method == "exact" and s.rewritten and s.reason is None and s.calls == 1 for s in report.sites)
    if name in CAUSAL:
        expected = "causal+key_padding" if padding else "causal"
    else:
        expected = "key_padding" if padding else "none"
    assert {s.mask for s in report.sites} == {expected}, str(report)
    if name == "mistral":  # the 6-token window: the banded mask was proven to be causal & window (& padding)
        assert all("window(5,0)" in s.terms for s in report.sites), str(report)
    if name in ("llama", "mistral"):  # grouped k/v reach the op as they are (no repeat_kv copies)
        assert {(s.num_heads, s.num_kv_heads) for s in report.sites} == {(4, 2)}


# ------------------------------------------------------------------------------------------------
# approximations equal the compiled path, with the same decisions
# ------------------------------------------------------------------------------------------------
MRA = {"method": "mra", "mra": {"block_size": 4, "blocks_per_row": 1}}
MONARCH = {"method": "monarch", "monarch": {"block_size": 4}}
TOPK = {"method": "topk", "topk": {"k": 3}}
APPROX_CASES = [
    ("bert", MONARCH, "right"), ("bert", MRA, "right"), ("bert", TOPK, None),
    ("gpt2", MRA, "right"), ("gpt2", MONARCH, None),                       # monarch refuses causal
    ("llama", MRA, "right"), ("llama", TOPK, None),
    # (both paths prove Mistral's banded mask to be causal & window (& padding): MRA serves it)
    ("mistral", TOPK, "right"), ("mistral", MRA, "right"), ("mistral", MRA, None),
    ("mistral", {**MRA, "causal": True}, None),   # a declared causal mask: the proven window still applies
    ("vit", MONARCH, None), ("vit", MRA, None),
]


@pytest.mark.parametrize("name,options,padding", APPROX_CASES)
def test_approximation_equals_compiled_path(name, options, padding):
    model, layers = build(name)
    args, kwargs, _ = inputs(name, padding)
    exact = hidden(model, args, kwargs)
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "aot_eager"})
    expected = hidden(compiled, args, kwargs)
    compiled_sites = structattn.last_report().sites

    fast = applied(model, options)
    out = hidden(fast, args, kwargs)
    report = hf.report(fast)
    assert rel_err(out, expected) < 1e-5, str(report)
    assert [s.layer for s in report.sites] == layers
    hf_decisions = [(m, k, r.split(" (sliding_window=")[0] if r else r) for m, k, r in decisions(report.sites)]
    assert hf_decisions == decisions(compiled_sites), f"{report}\n{structattn.last_report()}"
    if any(s.method != "exact" for s in report.sites):
        assert rel_err(out, exact) > 1e-4  # the approximation really ran
    else:
        assert all(s.reason for s in report.sites) and rel_err(out, exact) < 1e-5


def test_refusal_reasons_name_method_and_sliding_window():
    model, _ = build("mistral")
    args, kwargs, _ = inputs("mistral")
    report = hf.report(hf.apply(model, MONARCH))
    hidden(model, args, kwargs)
    assert all(s.method == "exact" and s.requested == "monarch" for s in report.sites)
    assert all(s.reason.startswith("monarch: ") and "window(5,0)" in s.terms for s in report.sites), str(report)
    model, _ = build("gpt2")
    hidden(hf.apply(model, MONARCH), *inputs("gpt2")[:2])
    assert all("monarch has no causal form" in s.reason for s in hf.report(model).sites)


def test_per_layer_globs_and_calibrated_options_as_is():
    model, layers = build("gpt2")
    args, kwargs, _ = inputs("gpt2", "right")
    options = {**MRA, "layers": {"h.0.*": "exact", "h.1.*": {"method": "topk", "k": 4}}}
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "aot_eager"})
    expected = hidden(compiled, args, kwargs)
    fast = applied(model, options)
    assert rel_err(hidden(fast, args, kwargs), expected) < 1e-5
    assert [(s.layer, s.method, s.params) for s in hf.report(fast).sites] == [
        (layers[0], "exact", {}), (layers[1], "topk", {"k": 4, "chunk_size": 1024})]

    model, layers = build("bert")
    samples = [{"input_ids": torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    options = structattn.calibrate(model, samples, budget=0.3, methods=("mra", "monarch"), progress=False,
                                   verbose=False)
    assert set(options["layers"]) == set(layers)
    args, kwargs = (samples[0]["input_ids"],), {}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "aot_eager"})
    expected = hidden(compiled, args, kwargs)
    fast = applied(model, options)
    assert rel_err(hidden(fast, args, kwargs), expected) < 1e-5
    assert [s.method for s in hf.report(fast).sites] == [options["layers"][n]["method"] for n in layers]


def test_unmatched_glob_warns():
    model, _ = build("bert")
    with pytest.warns(UserWarning, match="'decoder.*' matches no module"):
        hf.apply(model, {"method": "exact", "layers": {"decoder.*": "mra"}})
    assert hf.report(model).warnings


def test_min_seq_len_keeps_short_inputs_exact():
    model, _ = build("llama")
    args, kwargs, _ = inputs("llama", "right")
    exact = hidden(model, args, kwargs)
    fast = applied(model, {**MRA, "min_seq_len": 64})
    assert rel_err(hidden(fast, args, kwargs), exact) < 1e-5
    assert {(s.method, s.requested, s.reason) for s in hf.report(fast).sites} == {
        ("exact", "mra", "kv length below min_seq_len 64")}


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def test_register_is_idempotent_and_registers_both_interfaces():
    from transformers import AttentionInterface, AttentionMaskInterface

    hf.register()
    hf.register()
    assert AttentionInterface._global_mapping["structattn"] is hf.attention_forward
    assert AttentionMaskInterface._global_mapping["structattn"] is hf.build_mask


def test_from_pretrained_and_config_entry_points(tmp_path):
    hf.register()
    model, layers = build("llama")
    model.save_pretrained(tmp_path)
    args, kwargs, _ = inputs("llama", "right")
    compiled = torch.compile(model, backend="structattn", options={**MRA, "compiler": "aot_eager"})
    expected = hidden(compiled, args, kwargs)

    loaded = transformers.LlamaModel.from_pretrained(tmp_path, attn_implementation="structattn").eval()
    assert loaded.config._attn_implementation == "structattn"
    with pytest.raises(RuntimeError, match=r"structattn.hf.apply\(model, options\)"):
        hidden(loaded, args, kwargs)
    hf.apply(loaded, MRA)
    assert rel_err(hidden(loaded, args, kwargs), expected) < 1e-5

    torch.manual_seed(0)
    built = transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=2, num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, **SMALL,
        attn_implementation="structattn")).eval()
    assert built.config._attn_implementation == "structattn"
    hf.apply(built, MRA)
    assert rel_err(hidden(built, args, kwargs), expected) < 1e-5
    assert [s.method for s in hf.report(built).sites] == ["mra", "mra"]

    switched, _ = build("llama")
    switched.set_attn_implementation("structattn")
    hf.apply(switched, {"method": "exact"})
    assert rel_err(hidden(switched, args, kwargs), hidden(model, args, kwargs)) < 1e-5


# ------------------------------------------------------------------------------------------------
# what the HF attention call passes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_output_attentions_runs_exact_eager_and_returns_weights(name):
    model, _ = build(name, "eager")
    args, kwargs, _ = inputs(name, "right")
    with torch.no_grad():
        ref = model(*args, **kwargs, output_attentions=True)
        fast = applied(model, MRA)
        out = fast(*args, **kwargs, output_attentions=True)
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
    report = hf.report(fast)
    assert all(not s.rewritten and s.reason.startswith("output_attentions") for s in report.sites)


def gemma2(impl="eager"):
    torch.manual_seed(0)
    return transformers.Gemma2Model(transformers.Gemma2Config(
        num_hidden_layers=2, num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, head_dim=8,
        attn_logit_softcapping=5.0, sliding_window=6, final_logit_softcapping=None, **SMALL,
        attn_implementation=impl)).eval()


#: every block of the 16 tokens selected (MRA's exact limit), every key kept (top-k's)
LIMITS = [{"method": "mra", "mra": {"block_size": 4, "blocks_per_row": 4}, "exact_when_cheaper": False},
          {"method": "topk", "topk": {"k": SEQ}, "exact_when_cheaper": False}]


@pytest.mark.parametrize("options", LIMITS, ids=["mra", "topk"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_gemma2_softcap_and_window_reach_the_methods(options, padding):
    # softcap=5 reaches the op as its score modification, the sliding layer's band as the window:
    # at their exact limits MRA and top-k equal the uncompiled eager model
    model = gemma2()
    args, kwargs, keep = inputs("llama", padding)
    ref = hidden(model, args, kwargs)
    fast = applied(model, options)
    out = hidden(fast, args, kwargs)
    report = hf.report(fast)
    rows = (lambda x: x[keep]) if padding == "left" else (lambda x: x)   # left-padded rows: SDPA's 0 vs eager's average
    assert rel_err(rows(out), rows(ref)) < 1e-5, str(report)
    assert [s.method for s in report.sites] == [options["method"]] * 2, str(report)
    sliding, full = report.sites
    assert "softcap(5)" in sliding.terms and "window(5,0)" in sliding.terms, str(report)
    assert "softcap(5)" in full.terms and "window" not in full.terms, str(report)
    assert {s.mask for s in report.sites} == {"causal+key_padding" if padding else "causal"}, str(report)


@pytest.mark.parametrize("options", [MRA, TOPK], ids=["mra", "topk"])
def test_gemma2_approximation_equals_compiled_path(options):
    model = gemma2()
    args, kwargs, _ = inputs("llama", "right")
    exact = hidden(model, args, kwargs)
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "aot_eager"})
    expected = hidden(compiled, args, kwargs)
    compiled_sites = structattn.last_report().sites
    fast = applied(model, options)
    out = hidden(fast, args, kwargs)
    report = hf.report(fast)
    assert rel_err(out, expected) < 1e-5, f"{report}\n{structattn.last_report()}"
    assert rel_err(out, exact) > 1e-4     # the approximation really ran
    assert [(s.method, s.terms) for s in report.sites] == [(s.method, s.terms) for s in compiled_sites], \
        f"{report}\n{structattn.last_report()}"


def test_monarch_refuses_softcap_with_its_reason():
    model = gemma2()
    args, kwargs, _ = inputs("llama")
    ref = hidden(model, args, kwargs)
    fast = applied(model, MONARCH)
    assert rel_err(hidden(fast, args, kwargs), ref) < 1e-5
    assert all(s.method == "exact" and s.reason.startswith("monarch: ") for s in hf.report(fast).sites)


def test_plan_window_mask_drops_the_band_only_when_exact():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, :3] = False
    band = sdpa_mask(2, 8, 8, mask_function=sliding_window_causal_mask_function(3), attention_mask=pad)
    planned, is_causal, kind, window = hf.plan_window_mask(band, True, 8, 8, 3)
    assert (is_causal, kind, window) == (True, "causal+key_padding", (2, 0))
    assert torch.equal(planned[:, 0, 0], pad)
    # a wrong window, a cache offset (bottom-right band) and no window keep the mask as it is
    assert hf.plan_window_mask(band, True, 8, 8, 4)[2:] == ("general", (-1, -1))
    shifted = sdpa_mask(2, 8, 12, q_offset=4, mask_function=sliding_window_causal_mask_function(3),
                        attention_mask=torch.ones(2, 12, dtype=torch.bool))
    assert hf.plan_window_mask(shifted, True, 8, 12, 3)[2:] == ("general", (-1, -1))
    assert hf.plan_window_mask(band, True, 8, 8, None)[2:] == ("general", (-1, -1))


def test_training_dropout_runs_exact_with_dropout():
    model, _ = build("bert", attention_probs_dropout_prob=0.5)
    args, kwargs, _ = inputs("bert", "right")
    model.train()
    fast = applied(model, MONARCH)
    torch.manual_seed(3)
    ref = model(*args, **kwargs).last_hidden_state
    torch.manual_seed(3)
    out = fast(*args, **kwargs).last_hidden_state
    assert rel_err(out, ref) < 1e-5
    fast.eval()
    torch.manual_seed(4)
    assert rel_err(fast(*args, **kwargs).last_hidden_state, ref) > 1e-3  # dropout was active above
    sites = hf.report(fast).sites
    assert [s.reason.startswith("dropout p=0.5 in training") for s in sites if not s.rewritten] == [True, True]
    assert [s.method for s in sites if s.rewritten] == ["monarch", "monarch"]  # eval: no dropout


def test_backward_through_approximation_equals_compiled_path():
    model, _ = build("llama")
    model.train()  # attention_dropout is 0: the method serves training too
    args, kwargs, _ = inputs("llama", "right")

    def grads(run, owner):
        owner.zero_grad()
        run(*args, **kwargs).last_hidden_state.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in owner.named_parameters() if p.grad is not None}

    fast = applied(model, MRA)
    compiled = torch.compile(model, backend="structattn", options={**MRA, "compiler": "aot_eager"})
    expected, got = grads(compiled, model), grads(fast, fast)
    assert set(got) == set(expected) and any("q_proj" in n for n in got)
    for n in expected:
        assert rel_err(got[n], expected[n]) < 1e-4, n
    assert [s.method for s in hf.report(fast).sites] == ["mra", "mra"]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_exact_tokens_equal_uncompiled(cache):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64, **SMALL, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache)
    ref = model.generate(ids, **gen)
    fast = applied(model, {"method": "exact"})
    assert torch.equal(fast.generate(ids, **gen), ref)
    report = hf.report(fast)
    assert sum(s.calls for s in report.sites) == 2 * 6  # one prefill and five decode steps per layer
    assert {s.layer for s in report.sites} == {f"model.layers.{i}.self_attn" for i in range(2)}


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def test_mask_function_is_compact_where_transformers_allows():
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    pad = torch.ones(2, 6, dtype=torch.bool)
    assert hf.build_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=pad,
                         allow_is_causal_skip=True) is None
    assert hf.build_mask(2, 6, 6, mask_function=bidirectional_mask_function, attention_mask=pad,
                         allow_is_bidirectional_skip=True) is None
    pad[1, 4:] = False
    compact = hf.build_mask(2, 6, 6, mask_function=bidirectional_mask_function, attention_mask=pad,
                            allow_is_bidirectional_skip=True)
    assert compact.shape == (2, 1, 1, 6) and torch.equal(compact[:, 0, 0], pad)
    full = sdpa_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=pad)
    assert torch.equal(hf.build_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=pad), full)


def test_plan_mask_splits_exactly_or_keeps_general():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g) for _ in range(3))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    pad = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    pad[1, ..., 5:] = False
    pad[0, ..., :2] = False  # left padding: fully masked query rows
    band = causal & ~torch.ones(7, 7, dtype=torch.bool).tril(-3)
    cases = {
        "causal+key_padding": (causal & pad).expand(2, 1, 7, 7),
        "key_padding": pad.expand(2, 1, 7, 7),
        "causal": causal.expand(2, 1, 7, 7),
        "none": torch.ones(2, 1, 7, 7, dtype=torch.bool),
        "general": (band & pad).expand(2, 1, 7, 7),
    }
    for kind, mask in cases.items():
        mask = mask.contiguous()
        planned, is_causal, got = hf.plan_mask(mask, False, 7, 7)
        assert got == kind
        if kind != "general":
            assert planned is None or planned.shape[-2] == 1
        out = sdpa(q.double(), k.double(), v.double(), planned, 0.5, is_causal)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.5)
        torch.testing.assert_close(out, ref, equal_nan=True)
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~pad, float("-inf"))
    assert hf.plan_mask(additive, False, 7, 7)[2] == "key_padding"
    assert hf.plan_mask(additive.masked_fill(~causal, float("-inf")), False, 7, 7)[2] == "general"
    assert hf.plan_mask(None, True, 1, 7) == (None, False, "none")  # a decode step is not causal
    assert hf.plan_mask(None, True, 7, 7) == (None, True, "causal")
