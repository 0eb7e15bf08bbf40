"""Sliding windows proven from a mask's producer graph.

HF's Mistral and Gemma-2 build a sliding layer's mask as ``where(kv > q - w & kv <= q [& padding[b,
kv]], 0, min)``. ``window_plan`` proves such a general mask to be EXACTLY causality, a window and
key padding, so the op gets ``is_causal``, ``window_left / window_right`` and a ``[B, 1, 1, K]``
keep mask instead of an N x N mask (methods that need causal or key-padding masks can then serve
the layer). ``implied_window`` only reads the window off a mask that stays general, so methods can
skip keys outside it. Both work on the lifted expression of the mask (``terms.lift_bias``):
conjunctions of comparisons of ``k - q`` with constants.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from ..scoremod import expr as E
from .table import example
from .terms import lift_bias


def implied_window(plan) -> tuple[int, int]:
    """A sliding window ``(left, right)`` (-1 = unbounded) that a general mask implies: every term
    whose producer graph lifts to ``where(C, 0, fill)`` (additive, fill <= -1e4) or to a keep
    condition ``C``, with ``C`` a conjunction holding a comparison of ``k - q`` with a constant
    (Mistral's and Gemma-2's ``kv_idx > q_idx - w``). The mask stays: the window only tells the
    methods which keys can be skipped, so it never changes a logit. (-1, -1) when none is found."""
    from .masks import NEG_THRESHOLD

    lo, hi = None, None
    for t in plan.general:
        lifted = lift_bias(t.node, 1.0, 4, 0) if t.kind != "masked" else None
        if lifted is None:
            continue
        tree = E.parse(lifted[0])
        if t.kind == "additive":
            if not (isinstance(tree, E.Call) and tree.fn == "where" and tree.args[1] == E.Const(0)
                    and _number(tree.args[2]) is not None and _number(tree.args[2]) <= NEG_THRESHOLD):
                continue
            tree = tree.args[0]
        for c in _conjuncts(tree):
            bound = _difference_bound(c)
            if bound is not None:
                side, value = bound
                if side == "lo":
                    lo = value if lo is None else max(lo, value)
                else:
                    hi = value if hi is None else min(hi, value)
    left = -lo if lo is not None and lo <= 0 else -1
    right = hi if hi is not None and hi >= 0 else -1
    return (left, right) if left >= 0 else (-1, -1)


def window_plan(plan) -> Optional[tuple]:
    """``(plan', (left, right))`` when the general mask of ``plan`` is PROVEN to be exactly a sliding
    window, causality and key padding: ``plan'`` is the causal / key-padding (or unmasked) plan the
    op then gets, the window goes to the op as its ``window_left`` / ``window_right``; None
    otherwise (the general mask stays).

    Proven means every mask term is explained:
    - a BAND term: ``where(C, 0, fill)`` added (fill <= -1e4), a keep condition ``C`` or
      ``masked_fill(not C, fill)``, whose producer graph lifts to a conjunction of comparisons of
      ``k - q`` with constants, constants that are true, and key-padding reads: a captured tensor
      read at (b, k) only (``t[b, k]``, ``t[b, 0, 0, k]``), bare or compared with a constant
      (``t[b, k] != 0``, ``> 0.5``); those become the plan's key-padding keep terms;
    - a KEY-PADDING term (``masks`` proves it reads no query position).
    At least one band term bounds ``k - q``. With one term a finite fill becomes the dead-row
    program over causally masked (c), out-of-window (w) and padded (m) entries, so rows whose every
    key is masked still get eager's answer. With several terms every fill must be -inf (the op's
    one key mask could not keep their fills apart); other forms (a bound the op's window cannot
    express, a conjunct reading q and k otherwise, factors computed at run time) keep the general
    mask (``implied_window`` then still tells the methods which keys can be skipped)."""
    from .masks import MaskPlan, NEG_THRESHOLD, _term_steps

    if not plan.general or plan.dead_rows and plan.causal:
        return None
    lo = hi = None
    keypad: list = []
    reads: list = []        # (term, tensor, index, comparison) of the bands' key-padding conjuncts
    bands: list = []        # per band term: (reads key padding, op, effective fill)
    hard = True             # every term masks with -inf
    for t in plan.general:
        band = _band(t, NEG_THRESHOLD)
        if band is None:
            steps = _term_steps(t) if not t.factors else None
            if not steps or any(st.causal or not st.keypad or st.witnesses for st in steps):
                return None
            hard = hard and all(st.op == "bias" or st.fill == float("-inf") for st in steps)
            keypad += [k for st in steps for k in st.keypad if all(k is not x for x in keypad)]
            continue
        t_lo, t_hi, pads, op, effective = band
        for value in (t_lo,) if t_lo is not None else ():
            lo = value if lo is None else max(lo, value)
        for value in (t_hi,) if t_hi is not None else ():
            hi = value if hi is None else min(hi, value)
        reads += [(t, *read) for read in pads]
        hard = hard and effective == float("-inf")
        bands.append((bool(pads), op, effective))
    if not bands or lo is None and hi is None:
        return None
    if plan.causal:
        hi = 0 if hi is None else min(hi, 0)
    if lo is not None and lo > 0 or hi is not None and hi < 0:
        return None
    causal = hi == 0
    window = (-1 if lo is None else -lo, -1 if hi is None else hi)     # (causal keeps right = 0: the same keys)
    if causal and lo is None:
        window = (-1, -1)                                                 # causal alone: no window
    dead_rows = ""
    if not hard:
        if len(plan.general) != 1:
            return None
        pads, op, effective = bands[0]
        scope = ("c" if causal else "") + ("w" if window != (-1, -1) else "") + ("m" if pads else "")
        dead_rows = f"{scope}:{op}:{effective!r}" if scope else ""
    # the keep masks are built only now, for a plan the op gets
    for t, tensor, at, how in reads:
        keep = _keep_node(t.node, tensor, at, how)
        if keep is None:
            return None
        keypad.append(keep)
    kind = ("causal+key_padding" if keypad else "causal") if causal else ("key_padding" if keypad else "none")
    return MaskPlan(kind, causal, tuple(keypad), (), dead_rows), window


def _band(t, neg_threshold: float) -> Optional[tuple]:
    """A band term: ``(lo, hi, padding reads, op, effective fill)`` with ``lo <= k - q <= hi`` (None =
    unbounded) and the key-padding conjuncts its condition ANDs in, each ``(tensor node, index,
    comparison)``; None when ``t`` is not one."""
    if t.factors or t.lead is not None or t.coef != 1.0:
        return None
    lifted = lift_bias(t.node, 1.0, 4, 0)
    if lifted is None:
        return None
    tree, fill, captured = E.parse(lifted[0]), t.fill, lifted[1]
    if t.kind == "masked":          # masked_fill(not C, fill): C keeps
        if not isinstance(tree, E.Not):
            return None
        tree = tree.value
    if t.kind == "additive":
        if not (isinstance(tree, E.Call) and tree.fn == "where" and tree.args[1] == E.Const(0)):
            return None
        fill = _number(tree.args[2])
        if fill is None or fill > neg_threshold:
            return None
        tree = tree.args[0]
    lo = hi = None
    reads: list = []
    for c in _conjuncts(tree):
        if isinstance(c, E.Const) and c.value not in (0, False):
            continue
        bound = _difference_bound(c)
        if bound is None:
            read = _padding_read(c)
            if read is None:
                return None
            reads.append(read)
            continue
        side, value = bound
        if side == "lo":
            lo = value if lo is None else max(lo, value)
        else:
            hi = value if hi is None else min(hi, value)
    if lo is None and hi is None:
        return None
    pads = [(captured[load.index], load.at, how) for load, how in reads]
    return lo, hi, pads, "add" if t.kind == "additive" else "set", t.effective(fill)


_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}


def _padding_read(c: E.Node) -> Optional[tuple]:
    """A conjunct that reads a captured tensor at (b, k) only: ``(load, (op, constant) | None)``
    (None = the tensor's truth value, ``t != 0``), or None."""
    negate = False
    while isinstance(c, E.Not):
        c, negate = c.value, not negate
    how = None
    if isinstance(c, E.BinOp) and c.op in _FLIPPED:
        left, right, op = c.left, c.right, c.op
        if not isinstance(_uncast(left), E.Load) and isinstance(_uncast(right), E.Load):
            left, right, op = right, left, _FLIPPED[op]
        value = _number(right)
        if not isinstance(_uncast(left), E.Load) or value is None:
            return None
        c, how = left, (op, value)
    c = _uncast(c)
    if not isinstance(c, E.Load) or not all(isinstance(i, E.Var) and i.name in ("b", "k") or i == E.Const(0)
                                            for i in c.at):
        return None
    names = [i.name for i in c.at if isinstance(i, E.Var)]
    if len(set(names)) != len(names) or names == ["k", "b"]:
        return None
    if negate:
        how = ("==", 0) if how is None else (_NEGATED[how[0]], how[1])
    return c, how


def _uncast(c: E.Node) -> E.Node:
    """``float(x)`` -> ``x``: a cast to float keeps the truth value of a bool / int / float tensor
    and its order against a constant (``int(x)`` truncates, so it stays)."""
    while isinstance(c, E.Call) and c.fn == "float" and len(c.args) == 1:
        c = c.args[0]
    return c


_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
            "!=": operator.ne}


def _keep_node(before: Node, tensor: Node, at: tuple, how: Optional[tuple]):
    """A key-padding keep term: a bool ``[B|1, 1, 1, K]`` node (inserted before ``before``) equal
    to ``tensor`` read at ``at`` (b, k or 0 per dim), compared by ``how`` (None: ``!= 0``)."""
    from .build import NodeBuilder
    from .masks import MaskTerm

    val = example(tensor)
    if val is None or val.dim() != len(at):
        return None
    index: list = []
    for i in at:
        if isinstance(i, E.Var) and i.name == "k":
            index += [None, None, slice(None)]          # the key axis last, query and head axes 1
        else:
            index.append(slice(None) if isinstance(i, E.Var) else 0)
    names = [i.name for i in at if isinstance(i, E.Var)]
    if "k" not in names:
        index += [None] * (3 if "b" in names else 1)
    b = NodeBuilder(before.graph, before, before)
    node = tensor
    plain = "b" in names and "k" in names and val.dim() == 4 and tuple(index) == (slice(None), 0, 0, None, None, slice(None))
    if plain and val.shape[1] == 1 and val.shape[2] == 1:
        node = tensor                   # already [B, 1, 1, K]
    else:
        node = b.call(operator.getitem, tensor, tuple(index))
    if how is None and val.dtype != torch.bool:
        how = ("!=", 0)
    if how is not None:
        node = b.call(_COMPARE[how[0]], node, how[1])
    out = example(node)
    if out is None or out.dtype != torch.bool:
        return None
    return MaskTerm(node, "keep")


def _number(tree: E.Node) -> Optional[float]:
    if isinstance(tree, E.Const):
        return float(tree.value)
    if isinstance(tree, E.Neg) and isinstance(tree.value, E.Const):
        return -float(tree.value.value)
    return None


def _conjuncts(tree: E.Node) -> list:
    if isinstance(tree, E.BoolOp) and tree.op == "and":
        return [c for v in tree.values for c in _conjuncts(v)]
    return [tree]


def _linear(tree: E.Node) -> Optional[dict]:
    """``tree`` as {"q": a, "k": b, "": c} (a q + b k + c), or None when it is not linear in
    q and k with integer constants."""
    if isinstance(tree, E.Const) and isinstance(tree.value, int) and not isinstance(tree.value, bool):
        return {"": tree.value}
    if isinstance(tree, E.Var) and tree.name in ("q", "k"):
        return {tree.name: 1}
    if isinstance(tree, E.Neg):
        inner = _linear(tree.value)
        return None if inner is None else {n: -c for n, c in inner.items()}
    if isinstance(tree, E.BinOp) and tree.op in ("+", "-"):
        a, c = _linear(tree.left), _linear(tree.right)
        if a is None or c is None:
            return None
        sign = 1 if tree.op == "+" else -1
        return {n: a.get(n, 0) + sign * c.get(n, 0) for n in set(a) | set(c)}
    return None


def _difference_bound(tree: E.Node) -> Optional[tuple[str, int]]:
    """A comparison that bounds d = k - q: ("lo", L) for d >= L, ("hi", H) for d <= H."""
    if not (isinstance(tree, E.BinOp) and tree.op in ("<", "<=", ">", ">=")):
        return None
    a, c = _linear(tree.left), _linear(tree.right)
    if a is None or c is None:
        return None
    diff = {n: a.get(n, 0) - c.get(n, 0) for n in set(a) | set(c)}   # diff OP 0
    kq = diff.get("k", 0)
    if kq not in (1, -1) or diff.get("q", 0) != -kq:
        return None
    const = diff.get("", 0) * kq                                        # kq * diff = d + const
    op = tree.op if kq == 1 else {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[tree.op]
    # d + const OP 0
    if op == ">":
        return "lo", -const + 1
    if op == ">=":
        return "lo", -const
    if op == "<":
        return "hi", -const - 1
    return "hi", -const
