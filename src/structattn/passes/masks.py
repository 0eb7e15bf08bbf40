"""Mask provenance: prove that a materialised [B, 1, Q, K] mask is causal and/or key padding.

HF transformers (and most code) builds masks as ``and(q_idx >= kv_idx, padding[b, kv_idx])`` over
broadcast ``arange`` index tensors, then materialises them (``where(mask, 0, min)``). The methods
need to know the structure: Monarch supports key padding only, MRA causal + key padding, and a
materialised mask costs O(N^2) memory. This module interprets the mask's producer graph
abstractly: index tensors (``arange`` + offset, placed on the query or key axis), comparisons
between them (causal when ``kv_idx <= q_idx``), constants that are always true, conjunctions, and
any tensor whose query axis has size 1 (a key-padding term). The result lists the terms, so the
rewrite can hand the op ``is_causal`` and a compact ``[B, 1, 1, K]`` mask instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import sympy
import torch
from torch.fx import Node

from .table import canonical, constant_number, example

#: an additive value at or below this masks its entry (finfo.min, -inf, -1e9, -1e4 all qualify)
NEG_THRESHOLD = -1e4
Offset = Union[int, sympy.Expr, tuple]


@dataclass(frozen=True)
class MaskTerm:
    """One mask tensor as it enters the scores: ``keep`` (bool, True = attend), ``masked`` (bool,
    True = drop) or ``additive`` (float added to the scores, times ``coef``)."""

    node: Node
    kind: str
    coef: float = 1.0


@dataclass(frozen=True)
class Facts:
    """A keep-mask known to be AND(causal if ``causal``, every key-padding term in ``keypad``)."""

    causal: bool = False
    keypad: tuple[MaskTerm, ...] = ()

    def __and__(self, other: "Facts") -> "Facts":
        return Facts(self.causal or other.causal, self.keypad + other.keypad)


@dataclass(frozen=True)
class MaskPlan:
    """What the op gets: ``kind`` (none | key_padding | causal | causal+key_padding | general),
    the key-padding terms to combine into a [.., 1, K] mask, or the raw terms of a general mask."""

    kind: str
    causal: bool = False
    keypad: tuple[MaskTerm, ...] = ()
    general: tuple[MaskTerm, ...] = field(default=())


@dataclass(frozen=True)
class _Index:
    """An index tensor: positions ``arange + offset`` of ``length``, on axis ``axis`` counted from
    the right (0 = key axis, 1 = query axis) once placed."""

    offset: Offset
    length: Any
    axis: Optional[int] = None


def plan_mask(terms: list[MaskTerm], is_causal: bool) -> MaskPlan:
    """Classify the mask made of ``terms`` (all applied to one scores tensor) plus ``is_causal``."""
    facts = Facts(causal=is_causal)
    for term in terms:
        found = _term_facts(term)
        if found is None:
            return MaskPlan("general", is_causal, (), tuple(terms))
        facts = facts & found
    if facts.causal:
        kind = "causal+key_padding" if facts.keypad else "causal"
    else:
        kind = "key_padding" if facts.keypad else "none"
    return MaskPlan(kind, facts.causal, facts.keypad)


def _term_facts(term: MaskTerm) -> Optional[Facts]:
    if term.kind == "additive":
        return _additive(term.node, term.coef)
    return _boolean(term.node, positive=term.kind == "keep")


def _is_broadcast_view(call) -> bool:
    """A view that only adds or drops size-1 leading axes ([N, N] -> [1, 1, N, N]): the query and
    key axes (the last two) keep their positions and values."""
    if call.name not in ("getitem", "unsqueeze", "reshape"):
        return False
    src, out = example(call.get("input")), example(call.node)
    if src is None or out is None or src.dim() < 2 or out.dim() < 2:
        return False
    if call.name == "getitem":
        idx = call.get("index")
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(i is None or i is Ellipsis or i == slice(None) for i in idx):
            return False
    if call.name == "unsqueeze":
        dim = call.get("dim")
        if not isinstance(dim, int) or dim % (src.dim() + 1) >= src.dim() - 1:
            return False
    return tuple(src.shape[-2:]) == tuple(out.shape[-2:]) and src.numel() == out.numel()


def _query_independent(node: Node) -> bool:
    val = example(node)
    return val is not None and (val.dim() < 2 or val.shape[-2] == 1)


def _additive(node: Any, coef: float) -> Optional[Facts]:
    call = canonical(node)
    if call is not None:
        if call.name in ("cast", "contiguous", "expand") or _is_broadcast_view(call):
            return _additive(call.get("input"), coef)
        if call.name == "where":
            cond, a, b = call.get("condition"), call.get("input"), call.get("other")
            if _is_zero(a) and _is_neg(b):
                return _boolean(cond, positive=True)
            if _is_neg(a) and _is_zero(b):
                return _boolean(cond, positive=False)
        if call.name == "add" and isinstance(call.get("input"), Node) and isinstance(call.get("other"), Node):
            left, right = _additive(call.get("input"), coef), _additive(call.get("other"), coef)
            return None if left is None or right is None else left & right
    if isinstance(node, Node) and _query_independent(node):
        return Facts(keypad=(MaskTerm(node, "additive", coef),))
    return None


def _boolean(node: Any, positive: bool) -> Optional[Facts]:
    """Facts of the keep-mask equal to ``node`` (positive) or to NOT ``node`` (negative)."""
    call = canonical(node)
    if call is not None:
        name = call.name
        if name in ("cast", "contiguous", "expand") or _is_broadcast_view(call):
            return _boolean(call.get("input"), positive)
        if name == "not":
            return _boolean(call.get("input"), not positive)
        if name == "and" and positive:
            left, right = _boolean(call.get("input"), True), _boolean(call.get("other"), True)
            return None if left is None or right is None else left & right
        if name in ("ones", "new_ones") and positive:
            return Facts()
        if name.startswith("compare_"):
            facts = _comparison(name[len("compare_"):], call.get("input"), call.get("other"), positive)
            if facts is not None:
                return facts
    if _triangle_kind(node) is not None:
        return _triangle(node, positive)
    if isinstance(node, Node) and _query_independent(node):
        return Facts(keypad=(MaskTerm(node, "keep" if positive else "masked"),))
    return None


_INVERT = {"le": "gt", "gt": "le", "lt": "ge", "ge": "lt"}
_FLIP = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt"}


def _comparison(op: str, lhs: Any, rhs: Any, positive: bool) -> Optional[Facts]:
    if not positive:
        op = _INVERT[op]
    a, b = _index(lhs), _index(rhs)
    if a is None and b is None:
        return None
    if a is None:  # put the index on the left
        a, b, op = b, _const(lhs), _FLIP[op]
    else:
        b = b if b is not None else _const(rhs)
    if b is None:
        return None
    if isinstance(b, _Index):
        return _index_vs_index(op, a, b)
    return Facts() if _always(op, a, b) else None


def _index_vs_index(op: str, a: _Index, b: _Index) -> Optional[Facts]:
    # normalise to "kv <= q + d" (top-left causal iff d == 0)
    if op in ("ge", "gt"):
        a, b, op = b, a, _FLIP[op]
    if a.axis != 0 or b.axis != 1 or isinstance(a.offset, tuple) or isinstance(b.offset, tuple):
        return None
    d = sympy.sympify(b.offset) - sympy.sympify(a.offset) - (1 if op == "lt" else 0)
    return Facts(causal=True) if sympy.simplify(d) == 0 else None


def _always(op: str, a: _Index, c: Any) -> bool:
    """Is ``a op c`` true for every position of index ``a``?"""
    if isinstance(a.offset, tuple):
        return False
    lo = sympy.sympify(a.offset)
    hi = lo + sympy.sympify(a.length) - 1
    test = {"ge": lo - c, "gt": lo - c - 1, "le": c - hi, "lt": c - hi - 1}[op]
    try:
        return bool(sympy.simplify(test) >= 0)
    except TypeError:
        return False


def _const(value: Any) -> Optional[Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    num = constant_number(value)
    return num


def _index(node: Any) -> Optional[_Index]:
    call = canonical(node)
    if call is None:
        return None
    name = call.name
    if name == "arange":
        args = [a for a in (call.get("start"), call.get("end"), call.get("step")) if a is not None]
        if len(args) == 1:
            start, end = 0, args[0]
        elif len(args) == 2 or (len(args) == 3 and args[2] == 1):
            start, end = args[0], args[1]
        else:
            return None
        length = _symbolic(end) - _symbolic(start)
        return _Index(_offset(start), length)
    if name == "add":
        base, other = call.get("input"), call.get("other")
        idx = _index(base)
        if idx is None:
            idx, other = _index(other), base
        if idx is None:
            return None
        off = _offset(other)
        if isinstance(idx.offset, tuple) or isinstance(off, tuple):
            return _Index(("opaque", call.node), idx.length, idx.axis)
        return _Index(sympy.sympify(idx.offset) + sympy.sympify(off), idx.length, idx.axis)
    if name in ("cast", "contiguous"):
        return _index(call.get("input"))
    if name in ("getitem", "unsqueeze", "reshape", "expand"):
        inner = _index(call.get("input"))
        if inner is None:
            return None
        val = example(call.node)
        if val is None:
            return None
        big = [i for i, s in enumerate(val.shape) if s != 1]
        if len(big) != 1:
            return None
        return _Index(inner.offset, inner.length, val.dim() - 1 - big[0])
    return None


def _symbolic(value: Any) -> Any:
    if isinstance(value, Node):
        val = value.meta.get("example_value")
        if isinstance(val, torch.SymInt):
            return val.node.expr
        return sympy.Symbol(f"opaque_{value.name}")
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return value


def _offset(value: Any) -> Offset:
    if isinstance(value, (int, sympy.Expr)) and not isinstance(value, bool):
        return value
    if isinstance(value, Node):
        val = value.meta.get("example_value")
        if isinstance(val, torch.SymInt):
            return val.node.expr
    return ("opaque", value)


def _triangle_kind(node: Any) -> Optional[str]:
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target in (torch.tril, torch.triu):
        return node.target.__name__
    if node.op == "call_method" and node.target in ("tril", "triu"):
        return node.target
    return None


def _triangle(node: Node, positive: bool) -> Optional[Facts]:
    """``tril(ones)`` keeps causal entries; ``triu(ones, 1)`` marks the non-causal ones."""
    kind = _triangle_kind(node)
    source = node.args[0] if node.args else node.kwargs.get("input")
    diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
    src = canonical(source)
    while src is not None and src.name in ("cast", "contiguous"):
        src = canonical(src.get("input"))
    if src is None or src.name not in ("ones", "new_ones"):
        return None
    if kind == "tril" and diagonal == 0 and positive:
        return Facts(causal=True)
    if kind == "triu" and diagonal == 1 and not positive:
        return Facts(causal=True)
    return None


def _is_zero(value: Any) -> bool:
    if constant_number(value) == 0.0:
        return True
    call = canonical(value)
    if isinstance(value, Node) and value.op == "call_function" and value.target in (torch.zeros, torch.zeros_like):
        return True
    return call is not None and call.name == "cast" and _is_zero(call.get("input"))


def _is_neg(value: Any) -> bool:
    num = constant_number(value)
    if num is None and isinstance(value, Node):
        call = canonical(value)
        if call is not None and call.name == "cast":
            return _is_neg(call.get("input"))
    return num is not None and num <= NEG_THRESHOLD
