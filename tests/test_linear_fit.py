"""Fitted linear attention end to end on a (tiny, random) transformers Llama: fit, save, compile
from the options in a NEW process (same outputs), the transformers entry point, and
``calibrate(..., methods=[..., "linear"])`` choosing linear only where it meets the budget."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import structattn

transformers = pytest.importorskip("transformers")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_llama(path: Path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                   intermediate_size=64, vocab_size=96, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def samples(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (1, length), generator=g)} for _ in range(n)]


def test_fitted_file_round_trips_into_a_new_process(tmp_path):
    model = tiny_llama(tmp_path / "model")
    fit = structattn.fit_linear(model, samples(2, 48, 0), layers=["model.layers.[12].*"], feature_map="hedgehog",
                                loss="ce", steps=20, rows=16, local_window=8, sink_tokens=2, seed=1,
                                progress=False, verbose=False)
    options = fit.options(str(tmp_path / "phi.pt"), compiler="aot_eager", exact_when_cheaper=False)
    (tmp_path / "options.json").write_text(json.dumps(options))
    ids = samples(1, 40, 5)[0]["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    torch._dynamo.reset()
    with torch.no_grad():
        here = torch.compile(model, backend="structattn", options=options)(input_ids=ids).logits
        exact = model(input_ids=ids).logits
    torch._dynamo.reset()
    assert (here - exact).abs().max() > 1e-3           # the fitted layers really run linear attention
    script = textwrap.dedent(f"""
        import json, sys, torch, transformers
        sys.path.insert(0, {SRC!r})
        import structattn
        model = transformers.LlamaForCausalLM.from_pretrained({str(tmp_path / 'model')!r}).eval()
        options = json.load(open({str(tmp_path / 'options.json')!r}))
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            out = torch.compile(model, backend="structattn", options=options)(input_ids=ids).logits
        report = structattn.last_report()
        torch.save({{"out": out, "methods": sorted({{s.layer: s.method for s in report.sites}}.items())}},
                   {str(tmp_path / 'there.pt')!r})
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    there = torch.load(tmp_path / "there.pt")
    assert there["methods"] == [("model.layers.0.self_attn", "exact"), ("model.layers.1.self_attn", "linear"),
                                ("model.layers.2.self_attn", "linear")]
    assert torch.allclose(there["out"], here, rtol=1e-5, atol=1e-5)


def test_transformers_entry_point_uses_the_fitted_maps(tmp_path):
    model = tiny_llama(tmp_path / "model")
    fit = structattn.fit_linear(model, samples(1, 32, 0), layers=["model.layers.0.*"], feature_map="gated",
                                loss="mse", steps=10, rows=16, progress=False, verbose=False)
    options = fit.options(str(tmp_path / "phi.pt"), exact_when_cheaper=False)
    ids = samples(1, 32, 3)[0]["input_ids"]
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "eager"})(input_ids=ids)
    torch._dynamo.reset()
    structattn.hf.register()
    structattn.hf.apply(model, options)
    with torch.no_grad():
        eager = model(input_ids=ids)
    report = structattn.hf.report(model)
    assert {s.layer: s.method for s in report.sites}["model.layers.0.self_attn"] == "linear"
    assert torch.allclose(eager.logits, compiled.logits, rtol=1e-4, atol=1e-5)


def test_calibrate_fits_linear_and_uses_it_only_within_budget(tmp_path):
    model = tiny_llama(tmp_path / "model")
    calib = samples(2, 128, 1)
    weights = str(tmp_path / "cal.pt")
    # chunks of 16 and a window of 8: cheaper than exact attention at 128 tokens (else not a candidate)
    base = {"linear": {"weights": weights, "feature_map": "hedgehog", "local_window": 8, "sink_tokens": 1,
                       "chunk_size": 16}, "exact_when_cheaper": False}
    fit = {"linear": {"steps": 30, "rows": 32, "loss": "ce"}}
    options = structattn.calibrate(model, calib, budget=0.5, methods=["linear"], options=base, fit_options=fit,
                                   progress=False, verbose=False)
    summary = options.summary
    assert {l.layer for l in summary.layers} == {f"model.layers.{i}.self_attn" for i in range(3)}
    maps = structattn.methods.linear.load_maps(weights)
    assert set(maps) == {l.layer for l in summary.layers}     # every layer was fitted into the file
    errors = {}
    for layer in summary.layers:
        lin = next(c for c in layer.candidates if c.method == "linear")
        errors[layer.layer] = lin.error
        assert lin.params["local_window"] == 8 and lin.params["weights"] == weights
        # the measured error is the fit's own (deployed path, same calls)
        assert lin.error == pytest.approx(maps[layer.layer].info["error"], rel=1e-4)
        if lin.error <= 0.5:
            assert layer.chosen.method == "linear"
        else:
            assert layer.chosen.method == "exact"
    assert any(c.chosen.method == "linear" for c in summary.layers)
    # a budget below every layer's error keeps them all exact
    tight = min(errors.values()) / 2
    strict = structattn.calibrate(model, calib, budget=tight, methods=["linear"], options=base, fit_options=fit,
                                  progress=False, verbose=False)
    assert all(l.chosen.method == "exact" for l in strict.summary.layers)
    # the options compile, and the layers given linear run it
    ids = samples(1, 128, 9)[0]["input_ids"]
    report = structattn.explain(model, input_ids=ids, options={**options, "compiler": "eager"})
    chosen = {l.layer: l.chosen.method for l in summary.layers}
    assert {s.layer: s.method for s in report.sites} == chosen


def test_calibrate_with_linear_needs_a_weights_file():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=50, max_position_embeddings=512)).eval()
    with pytest.raises(ValueError, match=r"options=\{'linear': \{'weights'"):
        structattn.calibrate(model, samples(1, 256, 0)[0]["input_ids"] % 50, budget=0.5, methods=["linear"],
                             progress=False, verbose=False)
