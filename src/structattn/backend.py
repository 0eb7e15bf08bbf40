"""The ``structattn`` torch.compile backend: options -> Config, rewrite, compile.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="structattn", options={...})`` works without importing structattn.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule

from .config import Config
from .passes import rewrite_attention
from .passes.fqn import all_module_paths
from .report import GraphRecord, Report, set_last

# explain() collects every graph of one compile here; the backend appends to it when set
_COLLECTING: list = []


def structattn_backend(gm: GraphModule, example_inputs: list, options: Optional[dict] = None, **kwargs: Any) -> Callable:
    """Dynamo backend: rewrite attention sites of ``gm`` per ``options`` and compile the result."""
    if kwargs:
        raise ValueError(f"structattn backend: unexpected arguments {sorted(kwargs)}; pass settings in options={{...}}")
    config = Config.from_options(copy.deepcopy(dict(options or {})))
    report = _COLLECTING[-1] if _COLLECTING else Report(options=dict(options or {}))
    before = _copy_graph_module(gm)
    sites = rewrite_attention(gm, config, graph_index=len(report.graphs))
    report.graphs.append(GraphRecord(before, _copy_graph_module(gm), sites))
    _warn_unmatched(config, gm, sites, report)
    set_last(report)
    return _compile(gm, example_inputs, config.compiler)


def _compile(gm: GraphModule, example_inputs: list, compiler: str) -> Callable:
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    """A structural copy of ``gm`` (nodes and subgraph modules; parameters shared, meta shallow)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    root = torch.nn.Module()
    for name, child in gm.named_children():
        setattr(root, name, _copy_graph_module(child) if isinstance(child, GraphModule) else child)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for node in gm.graph.nodes:  # plain tensor attributes referenced by get_attr
        if node.op == "get_attr" and not hasattr(root, node.target.split(".")[0]):
            try:
                setattr(root, node.target, getattr(gm, node.target))
            except AttributeError:
                pass
    return GraphModule(root, graph, gm.__class__.__name__)


def _warn_unmatched(config: Config, gm: GraphModule, sites: list, report: Report) -> None:
    layers = [s.layer for s in sites] + sorted(all_module_paths(gm.graph))
    for pattern in config.unmatched_globs(layers):
        msg = f"structattn: options['layers'] glob {pattern!r} matches no layer in the compiled graph"
        if msg not in report.warnings:
            report.warnings.append(msg)
            warnings.warn(msg, stacklevel=2)


def register() -> None:
    """Register ``backend="structattn"`` with dynamo by hand (only needed when the package is not
    installed, so its entry point is missing). Safe to call more than once."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "structattn" not in _BACKENDS or _BACKENDS.get("structattn") is None:
        register_backend(structattn_backend, name="structattn")
