"""Tiny Hugging Face models built from configs (random weights): every attention layer is found
with its FQN, rewritten, and the compiled model matches eager."""
from __future__ import annotations

import warnings

import pytest
import torch

import structattn
from testlib import rel_err

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


# ------------------------------------------------------------------------------------------------
# layer names are the model's own module names, for every family and through every entry point
# ------------------------------------------------------------------------------------------------
DECODER = dict(SMALL, num_hidden_layers=2, vocab_size=100, num_key_value_heads=2, max_position_embeddings=64)


def _family(name):
    """(model, example input) of a tiny, randomly initialised model of one family (default attention)."""
    t = transformers
    builders = {
        "bert": lambda: t.BertModel(t.BertConfig(num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, **SMALL)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(num_hidden_layers=2, vocab_size=100,
                                                          max_position_embeddings=64, **SMALL)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=100, dim=32, n_heads=4, hidden_dim=64,
                                                                   n_layers=2, max_position_embeddings=64)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)),
        "llama": lambda: t.LlamaModel(t.LlamaConfig(**DECODER)),
        "mistral": lambda: t.MistralModel(t.MistralConfig(**DECODER)),
        "qwen2": lambda: t.Qwen2Model(t.Qwen2Config(**DECODER)),
        "gemma": lambda: t.GemmaModel(t.GemmaConfig(**DECODER, head_dim=8)),
        "gemma2": lambda: t.Gemma2Model(t.Gemma2Config(**DECODER, head_dim=8)),
        "t5_encoder": lambda: t.T5EncoderModel(t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_heads=4)),
        "vit": lambda: t.ViTModel(t.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **SMALL)),
        "opt": lambda: t.OPTModel(t.OPTConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                              num_hidden_layers=2, max_position_embeddings=64, word_embed_proj_dim=32)),
        "gpt_neox": lambda: t.GPTNeoXModel(t.GPTNeoXConfig(num_hidden_layers=2, vocab_size=100,
                                                           max_position_embeddings=64, **SMALL)),
        "falcon": lambda: t.FalconModel(t.FalconConfig(vocab_size=100, hidden_size=32, num_attention_heads=4,
                                                       num_hidden_layers=2)),
        "bart_encoder": lambda: t.BartModel(t.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).encoder,
        "albert": lambda: t.AlbertModel(t.AlbertConfig(num_hidden_layers=2, vocab_size=100, embedding_size=16,
                                                       max_position_embeddings=64, **SMALL)),
    }
    torch.manual_seed(0)
    model = builders[name]().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g) if name == "vit" else torch.randint(1, 100, (2, 12), generator=g)
    return model, x


FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "t5_encoder",
            "vit", "opt", "gpt_neox", "falcon", "bart_encoder", "albert"]


def _attention_modules(model):
    """Oracle: names (from ``named_modules``) of the innermost modules whose class is an attention."""
    def is_attention(m):
        return "attention" in type(m).__name__.lower()

    return [n for n, m in model.named_modules()
            if is_attention(m) and not any(is_attention(c) for c in m.modules() if c is not m)]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_layer_names_are_named_modules_through_explain_and_compile(name):
    model, x = _family(name)
    attention = _attention_modules(model)
    assert attention, "the oracle found no attention module"
    with torch.no_grad():
        ref = model(x)[0]

    # explain: the root module is known
    report = structattn.explain(model, x, options={"method": "exact"})
    names = [s.layer for s in report.sites]
    assert set(names) == set(attention) and len(names) >= len(attention), str(report)
    assert rel_err(report.output[0], ref) < 1e-5

    # a plain torch.compile by backend name, read back with last_report(); a rule on the first
    # layer's exact FQN reaches that layer only, and raises no 'matches no layer' warning
    first = attention[0]
    options = {"method": "exact", "compiler": "eager", "layers": {first: "doubled"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled = torch.compile(model, backend="structattn", options=options)
        with torch.no_grad():
            out = compiled(x)[0]
    report = structattn.last_report()
    assert [s.layer for s in report.sites] == names, str(report)
    for s in report.sites:
        if s.reason is None:
            assert s.method == ("doubled" if s.layer == first else "exact"), str(report)
    if report.sites[0].reason is None:
        assert rel_err(out, ref) > 1e-3        # the doubled layer really ran


def test_llama_layer_glob_matches_under_transformers_forward_wrapper():
    # transformers wraps forward in a decorator: dynamo reaches the model as L['args'][0]
    model, x = _family("llama")
    options = {"method": "exact", "compiler": "eager", "layers": {"layers.0.*": "doubled", "layers.1.*": "exact"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = structattn.explain(model, x, options=options)
    assert [(s.layer, s.method) for s in report.sites] == [("layers.0.self_attn", "doubled"),
                                                           ("layers.1.self_attn", "exact")]
    assert not report.warnings
