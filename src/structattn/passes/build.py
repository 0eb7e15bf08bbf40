"""Inserting FX nodes that carry the site's module metadata and fake example values."""
from __future__ import annotations

import contextlib
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
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    modes = {id(m): m for m in (getattr(t, "fake_mode", None) for t in tensors)}
    mode = next(iter(modes.values())) if len(modes) == 1 else None
    if mode is None:
        # real example values, or fakes of several modes (make_fx gives its inputs and outputs
        # different ones): compute on the meta device instead, when the shapes are static
        if not tensors or not all(isinstance(x, int) for t in tensors for x in (*t.shape, *t.stride())):
            return None
        args, kwargs = tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                                if isinstance(t, torch.Tensor) else t, (args, kwargs))
    try:
        with mode if mode is not None else contextlib.nullcontext():
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
    except Exception:  # metadata is a convenience; the compiler re-traces anyway
        return None
