"""Replace a matched attention site by one ``structattn::<method>_attention`` call."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch.fx import Graph, Node

from ..lowering.ops import op_args, op_for
from ..lowering.routed import ROUTED_OP
from ..methods import Method
from .build import NodeBuilder
from .match import Match, Operand
from .masks import MaskPlan, MaskTerm
from .table import example



def rewrite_site(graph: Graph, m: Match, plan: MaskPlan, method: Method, params: Any,
                 min_seq_len: int, impl: str, declared_causal: bool, route_key: Optional[str] = None) -> Node:
    """Insert the op for site ``m`` and route the site's output users to it. Returns the op node.

    With ``route_key`` the op is ``structattn::routed_attention`` (calibration), not the method's.
    """
    b = NodeBuilder(graph, m.output, m.anchor)
    rank = example(m.q.node).dim()
    q = _operand(b, m.q, rank)
    for factor, how in m.scale_nodes:
        q = b.call(operator.mul if how == "mul" else operator.truediv, q, factor)
    k, v = _operand(b, m.k, rank), _operand(b, m.v, rank)
    if declared_causal and plan.kind == "general":
        mask, is_causal = None, True
    else:
        mask, is_causal = _mask(b, plan), plan.causal
    if route_key is not None:
        out = b.call(ROUTED_OP, q, k, v, mask, float(m.scale), bool(is_causal), route_key)
    else:
        out = b.call(op_for(method), q, k, v, mask, float(m.scale), bool(is_causal), int(min_seq_len), impl,
                     *op_args(method, params))
    for _ in range(4 - rank):
        out = b.call(torch.squeeze, out, 0)
    m.output.replace_all_uses_with(out)
    return out


def _operand(b: NodeBuilder, op: Operand, rank: int) -> Node:
    node = op.gqa_source if op.gqa_source is not None else op.node
    if op.permute is not None:
        node = b.call("permute", node, *op.permute, method=True)
    if op.swap_last:
        node = b.call(torch.transpose, node, -2, -1)
    for _ in range(4 - rank):
        node = b.call(torch.unsqueeze, node, 0)
    return node


def _mask(b: NodeBuilder, plan: MaskPlan) -> Optional[Node]:
    terms = plan.general if plan.kind == "general" else plan.keypad
    if not terms:
        return None
    if all(t.kind in ("keep", "masked") for t in terms):
        keep = None
        for t in terms:
            node = t.node if t.kind == "keep" else b.call(torch.logical_not, t.node)
            if example(node) is not None and example(node).dtype != torch.bool:
                node = b.call("to", node, torch.bool, method=True)
            keep = node if keep is None else b.call(torch.logical_and, keep, node)
        return keep
    total = None
    for t in terms:
        node = _additive(b, t)
        total = node if total is None else b.call(operator.add, total, node)
    return total


def _additive(b: NodeBuilder, t: MaskTerm) -> Node:
    if t.kind == "additive":
        return t.node if t.coef == 1.0 else b.call(operator.mul, t.node, t.coef)
    keep = t.node if t.kind == "keep" else b.call(torch.logical_not, t.node)
    return b.call(torch.where, keep, 0.0, float("-inf"))
