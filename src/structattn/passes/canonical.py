"""Canonicalize spellings before matching: in-place score updates become out-of-place.

``s.masked_fill_(m, -inf); softmax(s)`` leaves ``softmax`` reading ``s`` with the mutation hidden in
a user-less node. When ``s`` is a fresh (non-view) result and the in-place call is its first user,
the call is turned into its out-of-place twin and ``s``'s later users read it, which is what the
program computes. Aten-level graphs (``make_fx``, ``torch.export``) keep in-place overloads
(``aten.mul_.Tensor``) whose result the later users already read: when that call is the only user
of a fresh tensor, it becomes its out-of-place overload (``aten.mul.Tensor``). Anything else is
left alone (and then refused by the matcher, never misread).
"""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

from .table import canonical

_INPLACE_METHODS = {"masked_fill_": "masked_fill", "add_": "add", "mul_": "mul", "div_": "div"}
# producers whose result owns its storage (no view of another tensor)
_FRESH = ("matmul", "einsum", "mul", "div", "add", "masked_fill", "where", "softmax")


def functionalize_inplace(graph: Graph) -> int:
    """Rewrite safe in-place tensor methods out of place; returns how many were rewritten."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        twin = _aten_out_of_place(node)
        if twin is not None:
            src = node.args[0]
            produced = canonical(src)
            if isinstance(src, Node) and produced is not None and produced.name in _FRESH and list(src.users) == [node]:
                node.target = twin
                count += 1
            continue
        if node.op != "call_method" or node.target not in _INPLACE_METHODS or node.users:
            continue
        src = node.args[0] if node.args else None
        produced = canonical(src)
        if not isinstance(src, Node) or produced is None or produced.name not in _FRESH:
            continue
        if any(order[u] < order[node] for u in src.users if u is not node):
            continue  # something read the tensor before the mutation
        later = [u for u in src.users if u is not node]
        node.target = _INPLACE_METHODS[node.target]
        for user in later:
            user.replace_input_with(src, node)
        count += 1
    return count


def _aten_out_of_place(node: Node):
    """``aten.mul.Tensor`` for an ``aten.mul_.Tensor`` call (of the ops in _INPLACE_METHODS), else None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    name = target.overloadpacket.__name__
    if name not in _INPLACE_METHODS:
        return None
    packet = getattr(torch.ops.aten, _INPLACE_METHODS[name], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def erase_dead(nodes) -> None:
    """Erase ``nodes`` and, transitively, their inputs once nothing uses them, if they are pure
    calls (never placeholders, in-place methods or side-effecting functions)."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op not in ("call_function", "call_method"):
            continue
        if (n.op == "call_method" and n.target.endswith("_")) or (n.op == "call_function" and n.is_impure()):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        stack.extend(inputs)
