"""model.generate() with structattn: prefill approximated per the options, decode steps exact
(the cost rule: at q_len 1 an approximation costs more than exact attention), no recompile per
token, and tokens equal to the uncompiled model with method exact."""
from __future__ import annotations

import pytest
import torch

import structattn

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 6


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=100, hidden_size=32,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompt(n=40):
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(1))


def _reports_during(fn):
    """``fn()`` and the sites of every graph the compile produced while it ran (one report per
    compile holds them all), one per (layer, q_len, kv_len)."""
    out = fn()
    sites = {}
    for s in structattn.last_report().sites:
        sites[(s.layer, s.q_len if isinstance(s.q_len, int) else "sym", str(s.kv_len))] = s
    return out, list(sites.values())


def test_compiled_forward_generates_the_same_tokens_with_exact():
    model = _llama()
    ids = _prompt()
    ref = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    model.forward = torch.compile(model.forward, backend="structattn",
                                  options={"method": "exact", "compiler": "aot_eager"})
    torch._dynamo.utils.counters.clear()
    out, sites = _reports_during(lambda: model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert torch.equal(out, ref)
    assert sites and all(s.rewritten and s.method == "exact" for s in sites)
    # prefill, the first decode step and one dynamic decode graph: no recompile per token
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_prefill_approximated_decode_exact_with_reason():
    model = _llama()
    ids = _prompt()
    model.forward = torch.compile(model.forward, backend="structattn", options={
        "method": "mra", "mra": {"block_size": 8, "blocks_per_row": 2}, "compiler": "aot_eager"})
    out, sites = _reports_during(lambda: model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert out.shape == (1, ids.shape[1] + NEW_TOKENS)
    prefill = [s for s in sites if s.q_len == ids.shape[1]]
    decode = [s for s in sites if s.q_len == 1]
    assert prefill and all(s.method == "mra" for s in prefill), sites
    assert decode and all(s.method == "exact" and "exact is cheaper" in s.reason for s in decode), sites


def test_static_cache_with_transformers_compile_config():
    model = _llama()
    ids = _prompt()
    ref = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    cc = transformers.CompileConfig(backend="structattn", mode=None, fullgraph=False,
                                    options={"method": "exact", "compiler": "aot_eager"})
    cc._compile_all_devices = True   # transformers compiles only on accelerators unless told
    out, sites = _reports_during(lambda: model.generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static", compile_config=cc))
    assert torch.equal(out, ref)
    assert sites and all(s.rewritten for s in sites)
