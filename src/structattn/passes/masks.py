"""Mask provenance: prove that a materialised [B, 1, Q, K] mask is causal and/or key padding, and
record how eager fills the masked entries.

HF transformers (and most code) builds masks as ``and(q_idx >= kv_idx, padding[b, kv_idx])`` over
broadcast ``arange`` index tensors, then materialises them (``where(mask, 0, min)``). The methods
need to know the structure: Monarch supports key padding only, MRA causal + key padding, and a
materialised mask costs O(N^2) memory. This module interprets the mask's producer graph
abstractly: index tensors (``arange`` + offset, placed on the query or key axis), comparisons
between them (causal when ``kv_idx <= q_idx``), constants that are always true, conjunctions, and
any tensor whose query axis has size 1 (a key-padding term).

Every mask term becomes a ``Step`` of a small program that says, in eager's order, what happens to
the masked entries: ``set`` them to a fill value (``masked_fill`` / ``where``), ``add`` a fill value
(``where(m, 0, c)`` or ``(1 - m) * c`` added), or add a ``bias`` tensor as it is. The op receives a
compact HARD mask (``is_causal`` plus a ``[B, 1, 1, K]`` keep mask or bias); the two agree with eager
on every query row that keeps at least one key. A row whose keys are all masked ("dead") is where
they differ: eager gives, e.g., the uniform average of v when the fill is ``finfo.min``. The
``dead_rows`` program (``MaskPlan.dead_rows``) lets the op recompute exactly those rows as eager
would; it is empty when every fill is ``-inf`` (then the op follows SDPA: a dead row gives 0).
Fills are what eager has at the softmax: times the constant scales after them, and -inf where
eager overflows on the way (``finfo.min`` then ``* 2``, or two ``finfo.min`` added, then scaled).
A causal claim needs its triangle or index comparison to span the scores' own [Q, K].

The op has ONE mask, so not every order of terms is reproducible: a finite fill written before a
bias is added (the bias would add -inf there), padding terms with different keys and fills, or
fills scaled at run time. Then the mask goes to the op as eager's own additive terms when every
term adds to the scores (every row is then eager's softmax), or the site is declined with the
reason (``MaskPlan.reason``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .table import canonical, constant_number, example

#: a fill at or below this masks its entry (finfo.min, -inf, -1e9, -1e4 all qualify)
NEG_THRESHOLD = -1e4
#: ... provided the scales applied after it leave it at or below this: exp(-1e3) is 0 in float64
#: too, so a hard mask is then exactly what eager computes for every row with a live key
SCALED_MASK_LIMIT = -1e3
Offset = Union[int, sympy.Expr, tuple]


@dataclass(frozen=True)
class MaskTerm:
    """One mask tensor as it enters the scores: ``keep`` (bool, True = attend), ``masked`` (bool,
    True = drop) or ``additive`` (a tensor added to the scores, times ``coef`` and the graph-computed
    ``factors`` ((node, "mul" | "div"), applied after it)). ``fill`` is the value ``keep``/``masked``
    terms write into masked entries (``-inf`` = a hard mask)."""

    node: Node
    kind: str
    coef: float = 1.0
    fill: float = float("-inf")
    factors: tuple = ()
    #: leading dims of the scores view the term was added in, when that is not the site's own
    #: (a ``[B*H, ..]`` view of a ``[B, H, ..]`` site); None = the site's
    lead: Optional[tuple] = None
    #: the largest product of a run of the constant scales applied after the term (in eager's
    #: order), and the largest finite value of the scores' dtype: a fill whose magnitude times
    #: ``peak`` exceeds ``limit`` overflows on its way to the softmax (finfo.min, then * 2)
    peak: float = 1.0
    limit: float = float("inf")

    def effective(self, fill: float) -> float:
        """What eager has on an entry this term fills with ``fill``, at the softmax."""
        return float("-inf") if abs(fill) * self.peak > self.limit else fill * self.coef


@dataclass(frozen=True)
class Facts:
    """A keep-mask known to be AND(causal if ``causal``, every key-padding term in ``keypad``)."""

    causal: bool = False
    keypad: tuple[MaskTerm, ...] = ()
    #: the triangles / index comparisons that prove ``causal``: each must span the scores' own
    #: [Q, K] (a [1, K] triangle broadcast over Q query rows is not causal for Q > 1)
    witnesses: tuple[Node, ...] = ()

    def __and__(self, other: "Facts") -> "Facts":
        return Facts(self.causal or other.causal, self.keypad + other.keypad, self.witnesses + other.witnesses)


@dataclass(frozen=True)
class Step:
    """What one mask term does to the scores, in eager's order: ``op`` ``set``/``add`` writes or
    adds ``fill`` on the entries masked by its causal part and/or its key-padding terms; ``bias``
    adds its key-padding tensor(s) as they are."""

    causal: bool
    keypad: tuple[MaskTerm, ...]
    op: str
    fill: float = float("-inf")
    witnesses: tuple[Node, ...] = ()   # see Facts.witnesses
    #: the scales computed at run time that multiply the fill afterwards (their value is not
    #: known here): the ids of their nodes
    scaled: tuple = ()
    #: the fill as written in the graph and the term that writes it (its constant scales after)
    raw: float = float("-inf")
    origin: Optional[MaskTerm] = None

    def scope(self) -> str:
        return ("c" if self.causal else "") + ("m" if self.keypad else "")


@dataclass(frozen=True)
class MaskPlan:
    """What the op gets: ``kind`` (none | key_padding | causal | causal+key_padding | general),
    the key-padding terms to combine into a [.., 1, K] mask, or the raw terms of a general mask,
    and the ``dead_rows`` program (see the module docstring; '' = SDPA's dead rows)."""

    kind: str
    causal: bool = False
    keypad: tuple[MaskTerm, ...] = ()
    general: tuple[MaskTerm, ...] = field(default=())
    dead_rows: str = ""
    #: why the op cannot reproduce eager's fully masked rows for this mask (the site then stays
    #: as it is); None when it can
    reason: Optional[str] = None


_ANY_AXIS = -1   # a placed one-element index: on the query or the key axis alike


@dataclass(frozen=True)
class _Index:
    """An index tensor: positions ``arange + offset`` of ``length``, on axis ``axis`` counted from
    the right (0 = key axis, 1 = query axis) once placed."""

    offset: Offset
    length: Any
    axis: Optional[int] = None


def plan_mask(terms: list[MaskTerm], is_causal: bool, qk: Optional[tuple] = None) -> MaskPlan:
    """Classify the mask made of ``terms`` (all applied to one scores tensor, listed from the
    softmax backwards) plus SDPA's hard ``is_causal``; ``qk`` is the scores' (Q, K)."""
    ordered = list(reversed(terms))  # eager's order: from QK^T to softmax
    steps: list[Step] = [Step(True, (), "set")] if is_causal else []
    for term in ordered:
        found = _term_steps(term)
        if found is None or not all(_spans(w, qk) for step in found for w in step.witnesses):
            return _general_plan(ordered, is_causal)
        steps.extend(found)
    causal = any(s.causal for s in steps)
    keypad: tuple[MaskTerm, ...] = ()
    for s in steps:
        keypad += tuple(t for t in s.keypad if all(t is not k for k in keypad))
    if causal:
        kind = "causal+key_padding" if keypad else "causal"
    else:
        kind = "key_padding" if keypad else "none"
    return _faithful(MaskPlan(kind, causal, keypad, (), dead_row_program(steps)), steps, ordered, is_causal)


def _spans(node: Node, qk: Optional[tuple]) -> bool:
    """Does the causal witness ``node`` have the scores' own last two dims?"""
    val = example(node)
    if qk is None or val is None or val.dim() < 2:
        return False
    return all(statically_known_true(a == b) for a, b in zip(tuple(val.shape[-2:]), tuple(qk)))


def _general_plan(ordered: list[MaskTerm], is_causal: bool) -> MaskPlan:
    steps = [Step(True, (), "set")] if is_causal else []
    for t in ordered:
        steps.append(Step(False, (t,), "bias") if t.kind == "additive"
                     else Step(False, (t,), "set", t.effective(t.fill), scaled=_factor_ids(t), raw=t.fill, origin=t))
    plan = MaskPlan("general", is_causal, (), tuple(reversed(ordered)), dead_row_program(steps))
    return _faithful(plan, steps, ordered, is_causal)


def _faithful(plan: MaskPlan, steps: list[Step], ordered: list[MaskTerm], is_causal: bool) -> MaskPlan:
    """``plan`` if its dead-row program reproduces eager; else the same mask passed as eager's own
    additive terms (when every term adds to the scores, or writes -inf); else a refusal."""
    if not plan.dead_rows or _program_exact(steps):
        return plan
    # (a term then scaled up could overflow where eager's sum does not, or the reverse)
    if all((t.kind == "additive" or t.effective(t.fill) == float("-inf")) and t.peak <= 1.0 for t in ordered):
        # the op gets sum(terms) exactly as eager adds them: every row, dead or not, is eager's
        # softmax(scores + mask); nothing to recompute
        terms = tuple(reversed(ordered))
        if all(_query_independent(t.node) for t in terms):
            return MaskPlan("key_padding", is_causal, terms, (), "")
        return MaskPlan("general", is_causal, (), terms, "")
    fills = sorted({repr(s.fill) for s in steps if s.op in ("set", "add") and s.fill > float("-inf")})
    return replace(plan, reason=(
        f"the mask writes the finite fill {', '.join(fills)} (masked_fill / where) and also adds a bias or another "
        "mask, or scales it at run time; the op cannot reproduce what eager gives a query row whose keys are all "
        "masked, so the site is left as it is (fill with -inf, or add the mask, to have it rewritten)"))


def _program_exact(steps: list[Step]) -> bool:
    """Does the dead-row program, run against the op's ONE mask, compute eager's masked scores?

    The op's mask merges every masked-key term: its scope ``m`` is their union, and when any term
    is additive it holds the biases (added once, where the first one is) plus -inf on the entries
    the other terms mask. So the program is exact when
    - fills scaled at run time are one value under the same scales (masked entries tie as in
      eager) that cannot overflow once scaled;
    - no finite ``set`` lies between two biases (the one bias item cannot be on both sides);
    - every step that masks keys covers the same keys, or they all ``set`` one fill;
    - with a bias, no finite fill masks keys before the last bias (the bias adds -inf there, where
      eager adds a number), and the first masking step after it overwrites (``set``) or is -inf.
    """
    inf = float("-inf")
    finite = [s for s in steps if s.op in ("set", "add") and s.fill > inf]
    if any(s.scaled for s in finite) and (len({s.scaled for s in finite}) > 1 or len({s.fill for s in finite}) > 1
                                           or any(abs(s.fill) >= 1e30 for s in finite)):
        return False
    biases = [i for i, s in enumerate(steps) if s.op == "bias"]
    if biases and any(s.op == "set" and s.fill > inf for s in steps[biases[0] + 1:biases[-1]]):
        return False
    masking = [s for s in steps if s.keypad and s.op != "bias"]
    keys = {frozenset((same_value_key(t.node), t.kind) for t in s.keypad) for s in masking}
    if len(keys) > 1 and not (all(s.op == "set" for s in masking) and len({s.fill for s in masking}) == 1):
        return False
    if not biases or not masking:
        return True
    last = biases[-1]
    if any(s.keypad and s.op != "bias" and s.fill > inf for s in steps[:last]):
        return False
    after = [s for s in steps[last + 1:] if s.keypad and s.op != "bias"]
    return not after or after[0].op == "set" or after[0].fill == inf


def dead_row_program(steps: list[Step]) -> str:
    """The ``dead_rows`` op argument: '' when no step writes a finite fill (SDPA semantics), else
    ``scope:op:fill`` items joined by ';' (scope c = causally masked entries, m = entries the op's
    mask masks, cm = either; op set | add | bias)."""
    if not any(s.op in ("set", "add") and s.fill > float("-inf") for s in steps):
        return ""
    # where eager's value on the c (or m) entries overflows to -inf: after the last fill step there
    marks = {scope: _last_fill(steps, scope) for scope in ("c", "m") if _overflows(steps, scope)}
    items = []
    for i, s in enumerate(steps):
        if s.op == "bias":
            if "all:bias:0" not in items:   # the op's mask holds every bias: add it once
                items.append("all:bias:0")
        elif s.scope():
            items.append(f"{s.scope()}:{s.op}:{s.fill!r}")
        items.extend(f"{scope}:set:-inf" for scope, at in marks.items() if at == i)
    return ";".join(items)


def _last_fill(steps: list[Step], scope: str) -> int:
    return max((i for i, s in enumerate(steps) if s.op in ("set", "add") and scope in s.scope()), default=-1)


def _overflows(steps: list[Step], scope: str) -> bool:
    """Does eager's value on the entries of ``scope`` (c or m) overflow to -inf where the program's
    does not? Every such entry gets every fill step whose scope includes it, with the constant
    scales between them: two finfo.min fills add up to -inf BEFORE a later scale by 0.5 would have
    kept them finite, while the program adds the fills already scaled."""
    eager, program, coef, limit = 0.0, 0.0, None, float("inf")
    for s in steps:
        if s.op not in ("set", "add") or scope not in s.scope() or s.origin is None:
            continue
        if coef is not None:
            eager *= coef / s.origin.coef   # the scales between the previous fill and this one
        eager = s.raw if s.op == "set" else eager + s.raw
        program = s.fill if s.op == "set" else program + s.fill
        coef, limit = s.origin.coef, s.origin.limit
        if abs(eager) > limit:
            eager = float("-inf")   # until a later step sets the entries again
        if abs(program) > limit:
            program = float("-inf")
    if coef is None or program == float("-inf"):
        return False
    return eager == float("-inf") or abs(eager) * coef > limit


def same_value_key(node: Any, depth: int = 32) -> Any:
    """A key equal for two nodes that compute the same value: the same pure call on the same
    inputs (``keep[:, None, None, :]`` spelled twice in a graph that was not deduplicated)."""
    if isinstance(node, (tuple, list)):
        return tuple(same_value_key(x, depth) for x in node)
    if isinstance(node, slice):
        return ("slice", same_value_key(node.start, depth), same_value_key(node.stop, depth),
                same_value_key(node.step, depth))
    if not isinstance(node, Node):
        return ("const", repr(node))
    pure = node.op == "call_method" and not node.target.endswith("_") or \
        node.op == "call_function" and not node.is_impure()
    if not pure or depth == 0:
        return ("node", node)
    kwargs = tuple(sorted((k, same_value_key(v, depth - 1)) for k, v in node.kwargs.items()))
    return (node.op, node.target, same_value_key(tuple(node.args), depth - 1), kwargs)


def _factor_ids(term: MaskTerm) -> tuple:
    return tuple(id(node) for node, _ in term.factors)


def _term_steps(term: MaskTerm) -> Optional[list[Step]]:
    if term.kind == "additive":
        steps = _additive(term.node, term)
    else:
        facts = _boolean(term.node, positive=term.kind == "keep")
        steps = None if facts is None else [Step(facts.causal, facts.keypad, "set", term.effective(term.fill), facts.witnesses,
                                                  raw=term.fill, origin=term)]
    if steps is not None and term.factors:
        steps = [replace(s, scaled=_factor_ids(term)) for s in steps]
    if steps is None or term.lead is None:
        return steps
    # pieces of a term added in another view of the scores live in that view too
    return [replace(s, keypad=tuple(replace(t, lead=term.lead) for t in s.keypad)) for s in steps]


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


def _is_float(node: Any) -> bool:
    val = example(node)
    return val is not None and val.is_floating_point()


def _additive(node: Any, term: MaskTerm) -> Optional[list[Step]]:
    """Steps of an additive mask tensor (values added to the scores), or None if unknown."""
    coef = term.coef
    call = canonical(node)
    if call is not None:
        if call.name in ("contiguous", "expand", "expand_as") or _is_broadcast_view(call):
            return _additive(call.get("input"), term)
        if call.name == "cast" and _is_float(call.get("input")) and _is_float(call.node):
            return _additive(call.get("input"), term)
        if call.name == "where":
            cond, a, b = call.get("condition"), call.get("input"), call.get("other")
            for zero, neg, positive in ((a, b, True), (b, a, False)):
                fill = _mask_fill(constant_number(neg), term)
                if _is_zero(zero) and fill is not None:
                    facts = _boolean(cond, positive=positive)
                    return None if facts is None else [Step(facts.causal, facts.keypad, "add", fill, facts.witnesses,
                                                            raw=constant_number(neg), origin=term)]
        if call.name == "mul":
            steps = _scaled_indicator(call.get("input"), call.get("other"), term)
            if steps is None:
                steps = _scaled_indicator(call.get("other"), call.get("input"), term)
            if steps is not None:
                return steps
        if call.name in ("triu", "tril"):
            filled = _filled_with(call.get("input"))
            fill = _mask_fill(filled if filled is not True else None, term)
            if fill is not None and call.name == "triu" and call.get("diagonal", 0) == 1:
                return [Step(True, (), "add", fill, (call.node,), raw=filled, origin=term)]
        if call.name == "add" and isinstance(call.get("input"), Node) and isinstance(call.get("other"), Node) \
                and call.get("alpha") is None:
            left, right = _additive(call.get("input"), term), _additive(call.get("other"), term)
            return None if left is None or right is None else left + right
    if isinstance(node, Node) and _query_independent(node):
        return [Step(False, (replace(term, node=node, kind="additive", lead=None),), "bias")]
    return None


def _scaled_indicator(indicator: Any, factor: Any, term: MaskTerm) -> Optional[list[Step]]:
    """``(1 - keep) * c`` or ``masked.float() * c`` with c very negative: an additive fill."""
    raw = constant_number(factor)
    c = _mask_fill(raw, term)
    if c is None:
        return None
    call = canonical(indicator)
    positive = False  # the indicator is 1 where the entry is masked
    if call is not None and call.name == "sub" and constant_number(call.get("input")) == 1.0 and call.get("alpha") is None:
        indicator, positive = call.get("other"), True
    elif call is not None and call.name == "rsub" and constant_number(call.get("other")) == 1.0 and call.get("alpha") is None:
        indicator, positive = call.get("input"), True   # aten.rsub(keep, 1.0) = 1 - keep
    inner = canonical(indicator)
    while inner is not None and inner.name in ("cast", "contiguous"):
        indicator = inner.get("input")
        inner = canonical(indicator)
    val = example(indicator)
    if val is None or val.dtype != torch.bool:
        return None  # a 0/1 float tensor could hold other values: keep it a plain bias
    facts = _boolean(indicator, positive=positive)
    return None if facts is None else [Step(facts.causal, facts.keypad, "add", c, facts.witnesses, raw=raw, origin=term)]


def _nonzero(node: Any, positive: bool) -> Optional[Facts]:
    """Facts of ``node != 0`` (positive) or ``node == 0`` (negative) for a float tensor cast to bool:
    an additive mask ``where(C, 0, fill)`` turned back into a bool (MPT: ``mask.to(torch.bool)``,
    True where masked) is ``not C``; other float tensors are not known."""
    call = canonical(node)
    while call is not None and (call.name in ("contiguous", "expand", "expand_as") or _is_broadcast_view(call)):
        node = call.get("input")
        call = canonical(node)
    if call is None or call.name != "where":
        return None
    cond, a, b = call.get("condition"), call.get("input"), call.get("other")
    for zero, fill, keep_is_cond in ((a, b, False), (b, a, True)):
        value = constant_number(fill)
        if value is None:   # a constant tensor: ones(()), full((), c)
            value = _filled_with(fill)
            value = 1.0 if value is True else value
        if _is_zero(zero) and isinstance(value, (int, float)) and value != 0:
            # where(C, 0, f) != 0  <=>  not C ;  where(C, f, 0) != 0  <=>  C
            return _boolean(cond, positive if keep_is_cond else not positive)
    return None


def _boolean(node: Any, positive: bool) -> Optional[Facts]:
    """Facts of the keep-mask equal to ``node`` (positive) or to NOT ``node`` (negative)."""
    call = canonical(node)
    if call is not None:
        name = call.name
        if name == "cast" and _is_float(call.get("input")):
            return _nonzero(call.get("input"), positive)
        if name in ("cast", "contiguous", "expand", "expand_as") or _is_broadcast_view(call):
            return _boolean(call.get("input"), positive)
        if name == "not":
            return _boolean(call.get("input"), not positive)
        if name == "and" and positive:
            left, right = _boolean(call.get("input"), True), _boolean(call.get("other"), True)
            return None if left is None or right is None else left & right
        if name in ("ones", "new_ones", "ones_like") and positive:
            return Facts()
        if name in ("full", "new_full") and positive and call.get("fill_value") is True:
            return Facts()
        if name in ("compare_le", "compare_lt", "compare_ge", "compare_gt"):
            facts = _comparison(name[len("compare_"):], call.get("input"), call.get("other"), positive)
            if facts is not None:
                return replace(facts, witnesses=(node,)) if facts.causal else facts
        if name in ("tril", "triu"):
            facts = _triangle(call, positive)
            if facts is not None:
                return replace(facts, witnesses=(node,))
    if isinstance(node, Node) and _query_independent(node):
        return Facts(keypad=(MaskTerm(node, "keep" if positive else "masked"),))
    return None


_INVERT = {"le": "gt", "gt": "le", "lt": "ge", "ge": "lt"}
_FLIP = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt"}


def _comparison(op: str, lhs: Any, rhs: Any, positive: bool) -> Optional[Facts]:
    if not positive:
        op = _INVERT[op]
    for first, second, how in ((lhs, rhs, op), (rhs, lhs, _FLIP[op])):
        diff = _difference(first)
        const = _const(second)
        if diff is not None and const is not None:
            # a - b (op) c  <=>  a (op) b + c
            a, b = diff
            if isinstance(b.offset, tuple):
                return None
            return _index_vs_index(how, a, _Index(sympy.sympify(b.offset) + const, b.length, b.axis))
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


def _difference(node: Any) -> Optional[tuple[_Index, _Index]]:
    """``(a, b)`` when ``node`` is ``a - b`` for two placed index tensors."""
    call = canonical(node)
    if call is None or call.name != "sub" or call.get("alpha") is not None:
        return None
    a, b = _index(call.get("input")), _index(call.get("other"))
    if a is None or b is None:
        return None
    return a, b


def _index_vs_index(op: str, a: _Index, b: _Index) -> Optional[Facts]:
    # normalise to "kv <= q + d" (top-left causal iff d == 0)
    if op in ("ge", "gt"):
        a, b, op = b, a, _FLIP[op]
    # a length-1 index placed on no particular axis (arange(1)[:, None] is [1, 1]) is a constant:
    # it goes on the axis the other side does not use (the causal witness check then makes sure
    # the comparison spans the scores' own [Q, K])
    if a.axis == _ANY_AXIS:
        a = replace(a, axis=0 if b.axis in (1, _ANY_AXIS) else None)
    if b.axis == _ANY_AXIS:
        b = replace(b, axis=1 if a.axis == 0 else None)
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
    if num is not None and float(num).is_integer():
        return int(num)
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
    if name == "add" and call.get("alpha") is None:
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
        if not big:
            return _Index(inner.offset, inner.length, _ANY_AXIS)   # one element: fits either axis
        if len(big) != 1:
            return None
        return _Index(inner.offset, inner.length, val.dim() - 1 - big[0])
    return None


def _symbolic(value: Any) -> Any:
    if isinstance(value, Node):
        val = value.meta.get("example_value", value.meta.get("val"))
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
        val = value.meta.get("example_value", value.meta.get("val"))
        if isinstance(val, torch.SymInt):
            return val.node.expr
    return ("opaque", value)


def _filled_with(node: Any) -> Optional[Any]:
    """The constant a ``ones`` / ``full`` / ``full_like`` tensor holds (True for ``ones``), or None."""
    call = canonical(node)
    while call is not None and call.name in ("cast", "contiguous"):
        call = canonical(call.get("input"))
    if call is None:
        return None
    if call.name in ("ones", "new_ones", "ones_like"):
        return True
    if call.name in ("full", "new_full", "full_like"):
        value = call.get("fill_value")
        return True if value is True else constant_number(value)
    return None


def _triangle(call, positive: bool) -> Optional[Facts]:
    """``tril(ones)`` keeps causal entries; ``triu(ones, 1)`` marks the non-causal ones."""
    fill = _filled_with(call.get("input"))
    if fill is not True and fill != 1.0:
        return None
    diagonal = call.get("diagonal", 0)
    if call.name == "tril" and diagonal == 0 and positive:
        return Facts(causal=True)
    if call.name == "triu" and diagonal == 1 and not positive:
        return Facts(causal=True)
    return None


def _is_zero(value: Any) -> bool:
    if constant_number(value) == 0.0:
        return True
    if isinstance(value, Node) and value.op == "call_function" and value.target in (torch.zeros, torch.zeros_like):
        return True
    call = canonical(value)
    return call is not None and call.name in ("zeros", "zeros_like")


def is_mask_fill(value: Optional[float], coef: float) -> bool:
    """Does writing (or adding) ``value``, then scaling by ``coef``, mask an entry? The fill must
    be very negative (<= NEG_THRESHOLD) and stay so once scaled (<= SCALED_MASK_LIMIT); a negative
    coef (``s - where(m, 0, -1e9)``) makes it a huge bonus, not a mask."""
    if value is None or isinstance(value, bool):
        return False
    return value <= NEG_THRESHOLD and value * coef <= SCALED_MASK_LIMIT


def _mask_fill(value: Optional[float], term: MaskTerm) -> Optional[float]:
    """What eager adds to an entry ``term`` masks with ``value`` (at the softmax) when that masks
    the entry, else None."""
    return term.effective(value) if is_mask_fill(value, term.coef) else None
