"""Hide declined sites from inductor's attention patterns (see ``lowering/opaque.py``)."""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..lowering.opaque import OPAQUE_SOFTMAX
from .build import NodeBuilder
from .table import canonical


def shield_softmax(graph: Graph, node: Node) -> bool:
    """Replace the torch-level softmax ``node`` by ``structattn::softmax`` (same value, same
    dtype handling). Returns False, changing nothing, when ``node`` is not a plain softmax."""
    call = canonical(node)
    if call is None or call.name != "softmax" or getattr(node.target, "overloadpacket", None) is not None:
        return False
    x, dim, dtype = call.get("input"), call.get("dim"), call.get("dtype")
    if not isinstance(dim, int):
        return False
    b = NodeBuilder(graph, node, node)
    if dtype is not None:
        x = b.call("to", x, dtype, method=True)
    out = b.call(OPAQUE_SOFTMAX, x, dim)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True
