"""The backend end to end: entry point, options, compilers, dynamic shapes, backward, report."""
from __future__ import annotations

import importlib.metadata
import json

import networkx as nx
import pytest
import torch
import torch.nn as nn

import structattn
from structattn.backend import structattn_backend
from testlib import rel_err

transformers = pytest.importorskip("transformers")


class Attention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, -1))


class Stack(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Attention() for _ in range(layers))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


def test_entry_point_registers_backend():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "structattn" and ep.value == "structattn.backend:structattn_backend" for ep in eps)
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("structattn") is structattn_backend


def test_compile_by_name_with_options_and_last_report():
    model = Stack().eval()
    x = torch.randn(2, 9, 32)
    compiled = torch.compile(model, backend="structattn",
                             options={"method": "doubled", "layers": {"blocks.0": "exact"}, "compiler": "eager"})
    with torch.no_grad():
        compiled(x)
    report = structattn.last_report()
    assert [(s.layer, s.method) for s in report.sites] == [("blocks.0", "exact"), ("blocks.1", "doubled")]


def test_inductor_end_to_end_matches_eager():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(2, 16, 32)
    compiled = torch.compile(model, backend="structattn", options={"method": "exact", "compiler": "inductor"})
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert rel_err(out, ref) < 1e-5
    assert sum(s.rewritten for s in structattn.last_report().sites) == 2


def test_one_compile_serves_many_lengths():
    torch.manual_seed(0)
    model = Stack().eval()
    calls = []

    def counting(gm, example_inputs, **kwargs):
        calls.append(gm)
        return structattn_backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=counting, options={"method": "exact", "compiler": "aot_eager"}, dynamic=True)
    with torch.no_grad():
        for n in (8, 13, 40, 97):
            x = torch.randn(2, n, 32)
            assert rel_err(compiled(x), model(x)) < 1e-5
    assert len(calls) == 1
    report = structattn.last_report()
    assert all(s.rewritten for s in report.sites)
    assert not isinstance(report.sites[0].q_len, int)  # symbolic length


def test_mark_dynamic_bert_one_compile():
    cfg = transformers.BertConfig(num_hidden_layers=2, vocab_size=100, hidden_size=32, num_attention_heads=4,
                                  intermediate_size=64, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    calls = []

    def counting(gm, example_inputs, **kwargs):
        calls.append(1)
        return structattn_backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=counting, options={"method": "exact", "compiler": "eager"})
    with torch.no_grad():
        for n in (10, 17, 33):
            ids = torch.randint(0, 100, (2, n))
            mask = torch.ones(2, n, dtype=torch.long)
            mask[0, n // 2:] = 0
            torch._dynamo.mark_dynamic(ids, 1)
            torch._dynamo.mark_dynamic(mask, 1)
            out = compiled(ids, attention_mask=mask).last_hidden_state
            ref = model(ids, attention_mask=mask).last_hidden_state
            keep = mask.bool()
            assert rel_err(out[keep], ref[keep]) < 1e-5
    assert len(calls) == 1
    assert {s.mask for s in structattn.last_report().sites} == {"key_padding"}


def test_backward_through_rewritten_model_matches_eager():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(2, 11, 32)
    weights = torch.randn(2, 11, 32)

    def grads(fn):
        model.zero_grad()
        (fn(x) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads(model)
    got = grads(torch.compile(model, backend="structattn", options={"method": "exact", "compiler": "aot_eager"}))
    assert sum(s.rewritten for s in structattn.last_report().sites) == 2
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-5, name


def test_min_seq_len_keeps_short_sequences_exact_at_run_time():
    torch.manual_seed(0)
    model = Stack().eval()
    compiled = torch.compile(model, backend="structattn",
                             options={"method": "doubled", "min_seq_len": 20, "compiler": "eager"}, dynamic=True)
    with torch.no_grad():
        short, long = torch.randn(1, 12, 32), torch.randn(1, 30, 32)
        assert rel_err(compiled(short), model(short)) < 1e-5     # below min_seq_len: exact
        assert rel_err(compiled(long), model(long)) > 1e-2       # above: the doubled method runs


def test_static_short_sequence_reported_exact():
    report = structattn.explain(Stack().eval(), torch.randn(1, 6, 32), options={"method": "doubled", "min_seq_len": 64})
    assert all(s.method == "exact" and "min_seq_len" in s.reason for s in report.sites)


def test_report_views():
    report = structattn.explain(Stack().eval(), torch.randn(1, 6, 32), options={"method": "doubled"})
    text = str(report)
    assert "blocks.0" in text and "blocks.1" in text and "GFLOP" in text
    d = report.to_dict()
    json.dumps(d)
    assert [s["layer"] for s in d["sites"]] == ["blocks.0", "blocks.1"]
    g = report.to_networkx()
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    ops = [n for n, a in g.nodes(data=True) if a.get("method") == "doubled"]
    assert len(ops) == 2
    before = report.to_networkx("before")
    assert not any("structattn" in a["target"] for _, a in before.nodes(data=True))
    assert any("softmax" in a["target"] for _, a in before.nodes(data=True))
    assert report.to_dot().startswith("digraph") and report.to_dot().count("fillcolor") == 2
    assert isinstance(report.graph_before, torch.fx.GraphModule) and isinstance(report.graph_after, torch.fx.GraphModule)


def test_inductor_dynamic_bert_with_symbolic_scale():
    # dynamic=True turns BERT's float `scaling` attribute into a graph input read by .item():
    # the scale is folded into q and the site is still rewritten
    cfg = transformers.BertConfig(num_hidden_layers=1, vocab_size=100, hidden_size=32, num_attention_heads=4,
                                  intermediate_size=64, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    compiled = torch.compile(model, backend="structattn", options={"method": "exact", "compiler": "aot_eager"}, dynamic=True)
    with torch.no_grad():
        for n in (9, 21):
            ids = torch.randint(0, 100, (2, n))
            mask = torch.ones(2, n, dtype=torch.long)
            mask[1, n // 2:] = 0
            keep = mask.bool()
            out = compiled(ids, attention_mask=mask).last_hidden_state
            ref = model(ids, attention_mask=mask).last_hidden_state
            assert rel_err(out[keep], ref[keep]) < 1e-5
    assert [s.rewritten for s in structattn.last_report().sites] == [True]


class CausalSdpa(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_mra_sink_blocks_reach_the_op_through_options():
    """options['mra'] params (here the attention-sink block) reach the rewritten op unchanged."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    k[..., :4, :] *= 3.0          # a strong first key block, as a causal LM's sink
    params = {"block_size": 4, "blocks_per_row": 2}
    from structattn import functional as SF
    outs = {}
    for sink in (0, 1):
        torch._dynamo.reset()
        compiled = torch.compile(CausalSdpa(), backend="structattn",
                                 options={"method": "mra", "mra": {**params, "sink_blocks": sink}, "compiler": "eager"})
        outs[sink] = compiled(q, k, v)
        assert structattn.last_report().sites[0].params["sink_blocks"] == sink
        ref = SF.mra_attention(q, k, v, is_causal=True, **params, sink_blocks=sink)
        assert rel_err(outs[sink], ref) < 1e-6
    assert rel_err(outs[0], outs[1]) > 1e-3
