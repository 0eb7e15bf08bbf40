"""Tiny Hugging Face models built from configs (random weights): every attention layer is found
with its FQN, rewritten, and the compiled model matches eager."""
from __future__ import annotations

import pytest
import torch

import structattn
from support import rel_err

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)


def bert(impl):
    cfg = transformers.BertConfig(num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, **SMALL,
                                  attn_implementation=impl)
    return transformers.BertModel(cfg), [f"encoder.layer.{i}.attention.self" for i in range(2)]


def gpt2(impl):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
                                  attn_implementation=impl)
    return transformers.GPT2Model(cfg), [f"h.{i}.attn" for i in range(2)]


def llama(impl):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64, **SMALL, attn_implementation=impl)
    return transformers.LlamaModel(cfg), [f"layers.{i}.self_attn" for i in range(2)]


def vit(impl):
    cfg = transformers.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **SMALL, attn_implementation=impl)
    return transformers.ViTModel(cfg), [f"layers.{i}.attention" for i in range(2)]


CAUSAL = {"gpt2", "llama"}


def _inputs(name, with_mask):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return (torch.randn(2, 3, 32, 32, generator=g),), {}
    ids = torch.randint(0, 100, (2, 12), generator=g)
    if not with_mask:
        return (ids,), {}
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return (ids,), {"attention_mask": mask}


CASES = [(n, impl, m) for n in ("bert", "gpt2", "llama") for impl in ("eager", "sdpa") for m in (False, True)]
CASES += [("vit", "eager", False), ("vit", "sdpa", False)]


@pytest.mark.parametrize("name,impl,with_mask", CASES)
def test_every_layer_found_and_exact_matches(name, impl, with_mask):
    torch.manual_seed(0)
    model, layers = globals()[name](impl)
    model.eval()
    args, kwargs = _inputs(name, with_mask)
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
    report = structattn.explain(model, *args, options={"method": "exact"}, **kwargs)
    assert [s.layer for s in report.sites] == layers, str(report)
    assert set(layers) <= {n for n, _ in model.named_modules()}
    assert all(s.rewritten and s.reason is None for s in report.sites), str(report)
    expected_mask = ("causal+key_padding" if with_mask else "causal") if name in CAUSAL else (
        "key_padding" if with_mask else "none")
    assert {s.mask for s in report.sites} == {expected_mask}, str(report)
    if name == "llama":
        assert {(s.num_heads, s.num_kv_heads) for s in report.sites} == {(4, 2)}
    out = report.output.last_hidden_state
    keep = kwargs["attention_mask"].bool() if with_mask else torch.ones(out.shape[:2], dtype=torch.bool)
    assert rel_err(out[keep], ref[keep]) < 1e-5


def test_approximation_rewrites_per_layer_globs():
    model, layers = bert("eager")
    model.eval()
    args, kwargs = _inputs("bert", True)
    options = {"method": "doubled", "layers": {"encoder.layer.0.*": "exact"}}
    report = structattn.explain(model, *args, options=options, **kwargs)
    assert [(s.layer, s.method) for s in report.sites] == [(layers[0], "exact"), (layers[1], "doubled")]


def test_output_attentions_refuses_every_layer():
    model, layers = bert("eager")
    model.eval()
    args, kwargs = _inputs("bert", False)
    report = structattn.explain(model, *args, options={"method": "exact"}, output_attentions=True, **kwargs)
    assert [s.layer for s in report.sites] == layers
    assert not any(s.rewritten for s in report.sites)
    assert all("escapes" in s.reason for s in report.sites)
