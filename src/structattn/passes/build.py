"""Inserting FX nodes that carry the site's module metadata and fake example values."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten, tree_map

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


class NodeBuilder:
    """Inserts nodes before ``anchor`` with the site's metadata and fake example values."""

    def __init__(self, graph: Graph, before: Node, meta_from: Node):
        self.graph, self.before, self.meta_from = graph, before, meta_from

    def call(self, target: Any, *args: Any, method: bool = False, **kwargs: Any) -> Node:
        with self.graph.inserting_before(self.before):
            if method:
                node = self.graph.call_method(target, args, kwargs)
            else:
                node = self.graph.call_function(target, args, kwargs)
        for key in _META_KEYS:
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        node.meta["example_value"] = _fake_value(node)
        return node


def _fake_value(node: Node) -> Any:
    """The node's fake value, computed from its inputs' (metadata only; None if unavailable)."""
    args, kwargs = tree_map(
        lambda a: a.meta.get("example_value", a.meta.get("val")) if isinstance(a, Node) else a, (node.args, node.kwargs)
    )
    flat, _ = tree_flatten((args, kwargs))
    modes = [getattr(t, "fake_mode", None) for t in flat if isinstance(t, torch.Tensor)]
    mode = next((m for m in modes if m is not None), None)
    if mode is None:
        return None
    try:
        with mode:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
    except Exception:  # metadata is a convenience; the compiler re-traces anyway
        return None
