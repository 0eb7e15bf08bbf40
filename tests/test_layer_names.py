"""Layer names equal ``model.named_modules()`` names however dynamo reaches the module, and one
Report covers every graph of one ``torch.compile`` call (graph breaks, new shapes)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import structattn
from structattn.passes.fqn import names_by_id, normalize
from testlib import rel_err


class Attn(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.proj(x)
        return torch.softmax(h @ h.transpose(-2, -1) * 0.5, -1) @ h


def attn_eager(blk, x, factor=1.0):
    """One block computed by hand; ``factor`` scales the attention output (2.0: 'doubled')."""
    h = blk.proj(x)
    return factor * (torch.softmax(h @ h.transpose(-2, -1) * 0.5, -1) @ h)


class Unrolled(nn.Module):
    """Two layers with a graph break between them in the top-level forward."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Attn() for _ in range(2))

    def forward(self, x):
        x = self.blocks[0](x)
        torch._dynamo.graph_break()
        return self.blocks[1](x)


class LoopBreak(nn.Module):
    """A graph break inside the loop over layers: dynamo runs the loop eagerly and traces each
    layer's forward as its own frame (the layer, not the model, is the frame's ``self``)."""

    def __init__(self, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Attn() for _ in range(n))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
            torch._dynamo.graph_break()
        return x


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Attn() for _ in range(4))
        self.named = nn.ModuleDict({"extra": Attn()})

    def forward(self, x):
        for blk in self.blocks[1:3]:
            x = blk(x)
        x = self.blocks[-1](x)
        x = self._modules["named"]["extra"](x)
        return getattr(self, "blocks")[0](x)


def x_of(n=5, batch=2):
    return torch.randn(batch, n, 8, generator=torch.Generator().manual_seed(n))


def unmatched(caught):
    return [str(w.message) for w in caught if "matches no layer" in str(w.message)]


# ------------------------------------------------------------------------------------------------
# reading dynamo sources (the fallback when no root module is known)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,name", [
    ("L['self'].encoder.layer[0].attention", "encoder.layer.0.attention"),
    ("L['self']._modules['encoder']._modules['layer']._modules['0']", "encoder.layer.0"),
    ("L['args'][0].layers.0.self_attn", "layers.0.self_attn"),
    ("L['kwargs']['model'].h[1].attn", "h.1.attn"),
    ("L['self']", ""),
    ("G['model'].encoder.layer[2]", "model.encoder.layer.2"),
    ("G['models'][1].enc", "models.1.enc"),
    ("L['self'].layers[slice(1, 3, None)][1]", "layers.2"),
    ("L['self'].layers[slice(None, None, 2)][1].attn", "layers.2.attn"),
    ("L['self'].blocks['a'].attn", "blocks.a.attn"),
])
def test_normalize_reads_dynamo_sources(source, name):
    assert normalize(source) == name


def test_names_by_id_prefers_the_compiled_root_then_the_outermost_frame_module():
    model = LoopBreak()
    inner = model.blocks[1]
    # frame modules: the outer one names the inner one's submodules
    ids = names_by_id([], [(inner, ""), (model, ""), (nn.Linear(2, 2), "helper")])
    assert ids[id(inner.proj)] == "blocks.1.proj" and ids[id(model)] == ""
    assert sorted(n for n in ids.values() if n.startswith("helper")) == ["helper"]
    # the compiled model wins even over a global container that holds it
    container = nn.ModuleDict({"model": model, "other": nn.Linear(2, 2)})
    ids = names_by_id([(model, "")], [(container, "pipeline")])
    assert ids[id(inner.proj)] == "blocks.1.proj" and ids[id(container["other"])] == "pipeline.other"


# ------------------------------------------------------------------------------------------------
# names through explain and torch.compile
# ------------------------------------------------------------------------------------------------
def test_slices_module_dicts_and_getattr_give_named_modules_names():
    model = Sliced().eval()
    report = structattn.explain(model, x_of(), options={"method": "exact"})
    assert [s.layer for s in report.sites] == ["blocks.1", "blocks.2", "blocks.3", "named.extra", "blocks.0"]
    assert {s.layer for s in report.sites} <= {n for n, _ in model.named_modules()}


def test_graph_break_between_layers_one_report_all_sites_no_false_warning():
    model = Unrolled().eval()
    x = x_of()
    options = {"method": "exact", "compiler": "eager", "layers": {"blocks.1": "doubled"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="structattn", options=options)
        with torch.no_grad():
            out = compiled(x)
        report = structattn.last_report()
        explained = structattn.explain(model, x, options=options)
    assert len(report.graphs) == 2
    assert [(s.layer, s.method) for s in report.sites] == [("blocks.0", "exact"), ("blocks.1", "doubled")]
    assert [(s.layer, s.method) for s in explained.sites] == [("blocks.0", "exact"), ("blocks.1", "doubled")]
    assert unmatched(caught) == [] and report.warnings == [] and explained.warnings == []
    with torch.no_grad():
        ref = attn_eager(model.blocks[1], attn_eager(model.blocks[0], x), factor=2.0)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("grad", [False, True])
def test_layers_traced_as_their_own_frames_get_their_own_names_and_rules(grad):
    # Dynamo guards a layer traced as its own frame by type only: without an identity guard one
    # graph (rewritten for blocks.0) would serve every block. Each block must get its own rule.
    model = LoopBreak().eval()
    x = x_of()
    options = {"method": "exact", "compiler": "eager", "layers": {"blocks.1": "doubled"}}
    compiled = torch.compile(model, backend="structattn", options=options)
    with torch.set_grad_enabled(grad):
        out = compiled(x)
        ref = x
        for i, blk in enumerate(model.blocks):
            ref = attn_eager(blk, ref, factor=2.0 if i == 1 else 1.0)
    report = structattn.last_report()
    assert [(s.layer, s.method) for s in report.sites] == [("blocks.0", "exact"), ("blocks.1", "doubled"),
                                                           ("blocks.2", "exact")]
    assert rel_err(out.detach(), ref.detach()) < 1e-5


def test_compiled_function_names_global_model_by_its_name_and_argument_model_relative():
    global MODEL
    MODEL = Unrolled().eval()
    x = x_of()

    def uses_global(x):
        return MODEL(x)

    def takes_model(model, x):
        return model(x)

    with torch.no_grad():
        torch.compile(uses_global, backend="structattn", options={"method": "exact", "compiler": "eager"})(x)
        assert [s.layer for s in structattn.last_report().sites] == ["MODEL.blocks.0", "MODEL.blocks.1"]
        torch._dynamo.reset()   # equal backends share compiled frames: start over for the next spelling
        torch.compile(takes_model, backend="structattn", options={"method": "exact", "compiler": "eager"})(MODEL, x)
        assert [s.layer for s in structattn.last_report().sites] == ["blocks.0", "blocks.1"]


# ------------------------------------------------------------------------------------------------
# one Report per torch.compile call
# ------------------------------------------------------------------------------------------------
def test_report_accumulates_recompiles_and_each_compile_has_its_own():
    model = Unrolled().eval()
    first = torch.compile(model, backend="structattn", options={"method": "exact", "compiler": "eager"},
                          dynamic=False)
    with torch.no_grad():
        first(x_of(5))
        report = structattn.last_report()
        first(x_of(7))                         # new static shape: recompiles, same report
        assert structattn.last_report() is report
        assert len(report.graphs) == 4 and [s.q_len for s in report.sites] == [5, 5, 7, 7]
        second = torch.compile(model, backend="structattn", options={"method": "exact", "compiler": "eager"})
        second(x_of(5))
        assert structattn.last_report() is not report and len(structattn.last_report().graphs) == 2
        first(x_of(5))                         # cached graphs: nothing new
        assert len(report.graphs) == 4
        torch._dynamo.reset()                  # compiled code dropped: the next compile starts over
        first(x_of(5))
        assert structattn.last_report() is not report and len(structattn.last_report().graphs) == 2


def test_unmatched_glob_warns_once_across_graphs_and_recompiles():
    model = LoopBreak().eval()
    options = {"method": "exact", "compiler": "eager",
               "layers": {"blocks.2": "doubled", "decoder.*": "exact", "blocks.0.proj": "exact"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="structattn", options=options)
        with torch.no_grad():
            compiled(x_of(5))
            compiled(x_of(6, batch=3))
    msgs = unmatched(caught)
    # 'blocks.2' only matches in the third graph and 'blocks.0.proj' is a module without attention:
    # neither is unmatched; 'decoder.*' is, once, for every graph of the compile
    assert len(msgs) == 1 and "'decoder.*'" in msgs[0], msgs
    assert structattn.last_report().warnings == msgs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = structattn.explain(model, x_of(5), options=options)
    assert len(unmatched(caught)) == 1 and report.warnings == unmatched(caught)


def test_summary_line_stays_short_with_many_symbolic_sizes():
    model = LoopBreak(n=6).eval()
    options = {"method": "exact", "compiler": "eager", "layers": {"blocks.*": "exact"}}
    compiled = torch.compile(model, backend="structattn", options=options, dynamic=True)
    with torch.no_grad():
        for n, b in ((5, 2), (9, 3), (13, 4)):
            compiled(x_of(n, batch=b))
    report = structattn.last_report()
    assert len(report.sites) >= 6
    summary = str(report).splitlines()[len(report.sites) + 1]
    assert "attention site(s)" in summary and len(summary) < 250, summary
    assert report.flop_fraction() == pytest.approx(1.0)


def test_layer_frames_shared_without_rules_are_reported_as_shared():
    model = LoopBreak().eval()
    compiled = torch.compile(model, backend="structattn", options={"method": "doubled", "compiler": "eager"})
    x = x_of()
    with torch.no_grad():
        out = compiled(x)
        ref = x
        for blk in model.blocks:
            ref = attn_eager(blk, ref, factor=2.0)
    report = structattn.last_report()
    assert rel_err(out, ref) < 1e-5                      # every layer ran the rewritten graph
    assert {s.layer for s in report.sites} <= {"blocks.0", "blocks.1", "blocks.2"}
    if len(report.sites) < 3:
        assert any("one graph may serve several" in w for w in report.warnings), str(report)
