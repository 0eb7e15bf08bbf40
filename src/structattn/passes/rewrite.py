"""Replace a matched attention site by one ``structattn::<method>_attention`` call."""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

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
                 min_seq_len: int, impl: str, declared_causal: bool, route_key: Optional[str] = None,
                 tensors: Sequence[torch.Tensor] = (), owner: Optional[torch.nn.Module] = None) -> Node:
    """Insert the op for site ``m`` and route the site's output users to it. Returns the op node.

    With ``route_key`` the op is ``structattn::routed_attention`` (calibration), not the method's.
    ``tensors``: the site's constants (``Method.bind``), stored as buffers of ``owner`` (the
    GraphModule that holds ``graph``) and passed to the op through ``get_attr`` nodes.
    """
    b = NodeBuilder(graph, m.output, m.anchor)
    rank = len(m.scores_shape)
    q = _operand(b, m.q, rank)
    for factor, how in m.scale_nodes:
        q = b.call(operator.mul if how == "mul" else operator.truediv, q, factor)
    k, v = _operand(b, m.k, rank), _operand(b, m.v, rank)
    dead_rows = plan.dead_rows
    # the score modification: its tensors are read at site indices, so they need no view
    mods = (m.score_mod, list(m.score_tensors), int(m.window[0]), int(m.window[1]))
    if declared_causal and plan.kind == "general":
        mask, is_causal, dead_rows = None, True, ""
    else:
        mask, is_causal = _mask(b, m, plan, rank), plan.causal
    if route_key is not None:
        out = b.call(ROUTED_OP, q, k, v, mask, float(m.scale), bool(is_causal), route_key, dead_rows, *mods)
    else:
        consts = _constants(graph, owner, tensors, m) if method.takes_tensors else ()
        out = b.call(op_for(method), q, k, v, mask, float(m.scale), bool(is_causal), int(min_seq_len), impl,
                     dead_rows, *mods, *op_args(method, params, consts))
    out_val = example(m.output)
    if rank == 4 and out_val is not None and out_val.dim() == 3:
        out = b.call(torch.flatten, out, 0, 1)   # the P V product was taken in a [B*H, ..] view
    else:
        for _ in range(4 - rank):
            out = b.call(torch.squeeze, out, 0)
    m.output.replace_all_uses_with(out)
    return out


def _constants(graph: Graph, owner: Optional[torch.nn.Module], tensors: Sequence[torch.Tensor], m: Match) -> list:
    """``get_attr`` nodes for ``tensors``, each stored as a new buffer ``_structattn_const_<i>``
    of ``owner`` (a constant of the graph, no gradient)."""
    if tensors and owner is None:
        raise ValueError("rewrite_site: constant tensors need the GraphModule that owns the graph")
    q_val = example(m.q.node)
    fake_mode = getattr(q_val, "fake_mode", None)
    nodes = []
    for t in tensors:
        index = getattr(owner, "_structattn_constants", 0)
        owner._structattn_constants = index + 1
        name = f"_structattn_const_{index}"
        _register_constant(owner, name, t.detach())
        with graph.inserting_before(m.anchor):
            node = graph.get_attr(name)
        if fake_mode is not None:
            node.meta["example_value"] = fake_mode.from_tensor(t)
        nodes.append(node)
    return nodes


def _register_constant(owner: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """A buffer of ``owner``, declared the way dynamo declares its own graph constants: AOT
    autograd lifts every buffer of a dynamo graph (subgraph modules' too, by qualified name) to an
    input and looks up its source in the root's ``_param_name_to_source``; a ``ConstantSource``
    gets no guard."""
    owner.register_buffer(name, tensor)
    sources, prefix = getattr(owner, "_structattn_scope", (getattr(owner, "_param_name_to_source", None), ""))
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[prefix + name] = ConstantSource(f"{prefix}{name}_{id(owner)}".replace(".", "_"))


def _to_site(b: NodeBuilder, node: Node, rank: int, split: Optional[int]) -> Node:
    """Move a tensor of the site's rank (or its [B*H, ..] view when ``split``) to 4-D."""
    if split is not None:
        return b.call("unflatten", node, 0, (-1, split), method=True)
    for _ in range(4 - rank):
        node = b.call(torch.unsqueeze, node, 0)
    return node


def _operand(b: NodeBuilder, op: Operand, rank: int) -> Node:
    node = op.gqa_source if op.gqa_source is not None else op.node
    if op.permute is not None:
        node = b.call("permute", node, *op.permute, method=True)
    if op.swap_last:
        node = b.call(torch.transpose, node, -2, -1)
    if op.merge_heads:
        node = b.call(torch.flatten, node, 0, 1)
    return _to_site(b, node, rank, op.split_heads)


def _place_term(b: NodeBuilder, m: Match, t: MaskTerm, node: Node, rank: int) -> Node:
    """A mask term's tensor, broadcastable against the site's 4-D scores."""
    val = example(node)
    if t.lead is None or val is None:
        return node
    if len(t.lead) == 1:
        # added in the [B*H, ..] view of a [B, H, ..] site
        if val.dim() >= 3 and val.shape[-3] != 1:
            return b.call("unflatten", node, -3, (-1, m.scores_shape[1]), method=True)
        return node  # broadcast over the merged batch*heads axis: broadcasts the same in site space
    # added in a [B, H, ..] view of a [B*H, ..] site: broadcast over B and H, then merge them
    if val.dim() <= 2:
        return node
    node = b.call("expand", node, *t.lead, -1, -1, method=True)
    return b.call(torch.flatten, node, 0, 1)


def _mask(b: NodeBuilder, m: Match, plan: MaskPlan, rank: int) -> Optional[Node]:
    """The op's ``attn_mask``: the plan's terms combined into one bool keep mask or one additive
    float mask, always 4-D like the op's q/k/v (a term of the scores' rank, or a ``[K]`` key
    vector, broadcasts against them only from the right; SDPA rejects masks under 2-D)."""
    mask = _combined_mask(b, m, plan, rank)
    val = example(mask)
    for _ in range(4 - (val.dim() if val is not None else 4)):
        mask = b.call(torch.unsqueeze, mask, 0)
    return mask


def _combined_mask(b: NodeBuilder, m: Match, plan: MaskPlan, rank: int) -> Optional[Node]:
    terms = plan.general if plan.kind == "general" else plan.keypad
    if not terms:
        return None
    if all(t.kind in ("keep", "masked") for t in terms):
        keep = None
        for t in terms:
            node = _place_term(b, m, t, t.node, rank)
            node = node if t.kind == "keep" else b.call(torch.logical_not, node)
            if example(node) is not None and example(node).dtype != torch.bool:
                node = b.call("to", node, torch.bool, method=True)
            keep = node if keep is None else b.call(torch.logical_and, keep, node)
        return keep
    total = None
    for t in terms:
        node = _additive(b, m, t, rank)
        total = node if total is None else b.call(operator.add, total, node)
    limit = min(t.limit for t in terms)
    q = example(m.q.node) if m.q is not None else None
    dtype = q.dtype if q is not None and q.dtype.is_floating_point else m.scores_dtype
    if dtype is not None and dtype.is_floating_point and limit < torch.finfo(dtype).max:
        # the scores are cast to a narrower dtype than the op computes in before the softmax (HF:
        # float64 scores plus a finfo(float64).min mask, then softmax(dtype=float32)): there
        # eager's masked entries overflow to -inf, so they are hard-masked here too
        total = b.call("masked_fill", total, b.call(operator.lt, total, -limit), float("-inf"), method=True)
    return total


def _additive(b: NodeBuilder, m: Match, t: MaskTerm, rank: int) -> Node:
    """The term as a float tensor added to the scores (bool/int tensors added are numbers)."""
    node = _place_term(b, m, t, t.node, rank)
    if t.kind != "additive":
        keep = node if t.kind == "keep" else b.call(torch.logical_not, node)
        return b.call(torch.where, keep, 0.0, float("-inf"))
    val = example(node)
    if val is not None and not val.is_floating_point():
        node = b.call("to", node, m.scores_dtype or torch.float32, method=True)
    if t.coef != 1.0:
        node = b.call(operator.mul, node, t.coef)
    for factor, how in t.factors:
        node = b.call(operator.mul if how == "mul" else operator.truediv, node, factor)
    return node
