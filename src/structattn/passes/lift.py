"""Lift a tensor's producer graph into a score-modification expression over (b, h, q, k).

A bias added to the scores is often computed in the graph from positions: ALiBi from ``arange``
and per-head slopes, T5's relative buckets from ``arange(K) - arange(Q)`` looked up in a
parameter table, Swin's table gathered through a relative-position index buffer. ``lift`` reads
that producer graph abstractly: every node becomes a function from an index tuple (one int
expression per dim of the node) to an expression (``scoremod.expr`` trees); ``arange`` becomes
its index, views move indices around, element-wise ops combine expressions, gathers
(``embedding``, advanced indexing) read a captured tensor at a computed index, and anything else
(a parameter, a buffer, an input, an op the table does not know) is captured as a tensor read at
its own index. The result says which positions the bias depends on: only (h, k) is key-only,
only (h, k - q) is relative (``classify``), so methods can compute it where they need it instead
of reading an N x N tensor.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Node

from ..scoremod import expr as E
from .table import canonical, constant_number, example

#: index tuple -> expression
Indexed = Callable[[list], E.Node]


@dataclass
class Lifted:
    """``expr`` reads the tensors ``captured`` (t0, t1, ... in order) at index expressions."""

    expr: E.Node
    captured: list = field(default_factory=list)

    def text(self) -> str:
        return E.unparse(self.expr)


class _Lifter:
    def __init__(self, max_nodes: int = 200):
        self.captured: list[Node] = []
        self.budget = max_nodes

    def operand(self, node: Any) -> Optional[Indexed]:
        """``lift(node)`` read with the index of a broadcasting consumer: right-aligned, size-1
        dims at 0 (numbers need no index)."""
        fn = self.lift(node)
        val = example(node)
        if fn is None or val is None:
            return fn
        shape = tuple(val.shape)

        def read(idx):
            own = idx[len(idx) - len(shape):] if shape else []
            return fn([E.Const(0) if s == 1 else i for s, i in zip(shape, own)])
        return read

    def capture(self, node: Node) -> Indexed:
        if node not in self.captured:
            self.captured.append(node)
        index = self.captured.index(node)
        shape = example(node).shape

        def read(idx):
            # broadcast dims of size 1 read index 0
            at = tuple(E.Const(0) if s == 1 else i for s, i in zip(shape, idx[len(idx) - len(shape):]))
            return E.Load(index, at)
        return read

    def lift(self, node: Any) -> Optional[Indexed]:
        number = constant_number(node)
        if number is not None:
            value = int(number) if float(number).is_integer() and not isinstance(node, float) else number
            return lambda idx, v=value: E.Const(v)
        if not isinstance(node, Node) or example(node) is None:
            return None
        self.budget -= 1
        if self.budget < 0:
            return None
        found = self._rule(node)
        return found if found is not None else self.capture(node)

    def _rule(self, node: Node) -> Optional[Indexed]:
        call = canonical(node)
        val = example(node)
        if call is None:
            return self._gather(node)
        name = call.name
        if name == "arange":
            args = [a for a in (call.get("start"), call.get("end"), call.get("step")) if a is not None]
            if not all(isinstance(a, int) for a in args):
                return None
            start, step = (0, 1) if len(args) == 1 else (args[0], args[2] if len(args) == 3 else 1)
            return lambda idx: _affine(idx[-1], start, step)
        if name == "contiguous":
            return self.lift(call.get("input"))
        if name == "cast":
            inner = self.lift(call.get("input"))
            src = example(call.get("input"))
            if inner is None or src is None:
                return None
            if src.dtype == torch.bool and val.dtype != torch.bool and not val.is_floating_point():
                return lambda idx: E.Call("int", (inner(idx),))       # bools add as 0 / 1, not as `or`
            if src.is_floating_point() and not val.is_floating_point() and val.dtype != torch.bool:
                return lambda idx: E.Call("int", (inner(idx),))       # truncation, as .long()
            if not src.is_floating_point() and val.is_floating_point():
                return lambda idx: E.Call("float", (inner(idx),))
            if src.dtype != torch.bool and val.dtype == torch.bool:
                if _from_bool(call.get("input")):   # bool -> int / float (-> views) -> bool: the bool itself
                    return lambda idx: _strip_numeric_casts(inner(idx))
                return lambda idx: E.BinOp("!=", inner(idx), E.Const(0))   # a number as a truth value
            return inner
        if name in ("unsqueeze", "getitem", "reshape", "expand", "expand_as") or name == "permute" or name == "transpose":
            return self._view(call, val)
        if name in ("add", "sub", "mul", "div"):
            if call.get("alpha") is not None:
                return None
            a, c = self.operand(call.get("input")), self.operand(call.get("other"))
            if a is None or c is None:
                return None
            op = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[name]
            return lambda idx: E.BinOp(op, a(idx), c(idx))
        if name.startswith("compare_"):
            a, c = self.operand(call.get("input")), self.operand(call.get("other"))
            if a is None or c is None:
                return None
            op = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">", "eq": "=="}[name[len("compare_"):]]
            return lambda idx: E.BinOp(op, a(idx), c(idx))
        if name == "where":
            c, a, d = (self.operand(call.get(x)) for x in ("condition", "input", "other"))
            if c is None or a is None or d is None:
                return None
            return lambda idx: E.Call("where", (c(idx), a(idx), d(idx)))
        if name == "masked_fill":
            a, c, d = (self.operand(call.get(x)) for x in ("input", "mask", "value"))
            if c is None or a is None or d is None:
                return None
            return lambda idx: E.Call("where", (c(idx), d(idx), a(idx)))
        if name in ("full", "full_like", "new_full", "zeros", "zeros_like", "ones", "ones_like", "new_ones", "scalar_tensor"):
            v = {"zeros": 0, "zeros_like": 0, "ones": 1, "ones_like": 1, "new_ones": 1}.get(name)
            if v is None:
                v = constant_number(call.get("fill_value", call.get("value")))
            if v is None:
                return None
            return lambda idx, v=v: E.Const(v)
        if name in ("and", "or"):
            a, c = self.operand(call.get("input")), self.operand(call.get("other"))
            if a is None or c is None:
                return None
            return lambda idx: E.BoolOp(name, (a(idx), c(idx)))
        if name == "not":
            a = self.lift(call.get("input"))
            return None if a is None else (lambda idx: E.Not(a(idx)))
        return None

    def _gather(self, node: Node) -> Optional[Indexed]:
        """``embedding(idx, weight)`` / ``F.embedding`` and element-wise torch functions."""
        target = node.target
        args = node.args
        if target in (torch.nn.functional.embedding, torch.embedding) or \
                getattr(target, "overloadpacket", None) is torch.ops.aten.embedding:
            idx_node, weight = (args[0], args[1]) if target is torch.nn.functional.embedding else (args[1], args[0])
            index = self.lift(idx_node)
            if index is None or not isinstance(weight, Node):
                return None
            table = self.capture(weight)
            rank = example(idx_node).dim()

            def read(idx):
                row = index(idx[:rank])
                return table([row, idx[rank]])
            return read
        unary = {torch.abs: "abs", torch.log: "log", torch.exp: "exp", torch.tanh: "tanh", torch.sqrt: "sqrt",
                 torch.sigmoid: "sigmoid", torch.floor: "floor", torch.ceil: "ceil"}
        method = node.target if node.op == "call_method" else None
        fn = unary.get(target) or (method if method in unary.values() else None)
        if fn is not None and args:
            a = self.lift(args[0])
            return None if a is None else (lambda idx: E.Call(fn, (a(idx),)))
        if target in (torch.min, torch.max, torch.minimum, torch.maximum) and len(args) == 2:
            a, c = self.operand(args[0]), self.operand(args[1])
            fn = "min" if target in (torch.min, torch.minimum) else "max"
            return None if a is None or c is None else (lambda idx: E.Call(fn, (a(idx), c(idx))))
        if target in (operator.ne, torch.ne) or method in ("ne", "__ne__"):
            if len(args) != 2:
                return None
            a, c = self.operand(args[0]), self.operand(args[1])
            return None if a is None or c is None else (lambda idx: E.BinOp("!=", a(idx), c(idx)))
        if target is torch.neg or method == "neg" or target is operator.neg:
            a = self.lift(args[0])
            return None if a is None else (lambda idx: E.Neg(a(idx)))
        if method in ("float", "long", "int", "to", "type_as") and args:
            inner = self.lift(args[0])
            if inner is None:
                return None
            if method in ("long", "int"):
                return lambda idx: E.Call("int", (inner(idx),))
            return inner
        return None

    def _view(self, call, val) -> Optional[Indexed]:
        src = call.get("input")
        sv = example(src)
        inner = self.lift(src)
        if inner is None or sv is None:
            return None
        out_shape, in_shape = tuple(val.shape), tuple(sv.shape)
        if call.name in ("permute", "transpose"):
            from .match import _as_permutation   # the one reading of permute / transpose args

            found = _as_permutation(call.node)
            if found is None:
                return None
            perm = found[1]
            return lambda idx: inner([idx[perm.index(d)] for d in range(len(perm))])
        # views that only add / drop / broadcast size-1 dims, or slice a dim: map the non-1 dims
        if call.name == "getitem":
            return self._getitem(call.get("index"), inner, in_shape, out_shape)
        kept_out = [i for i, s in enumerate(out_shape) if s != 1]
        kept_in = [i for i, s in enumerate(in_shape) if s != 1]
        if call.name in ("expand", "expand_as"):
            # right-aligned broadcast: input dim d matches output dim d + offset; size-1 dims read 0
            off = len(out_shape) - len(in_shape)
            return lambda idx: inner([E.Const(0) if in_shape[d] == 1 else idx[d + off] for d in range(len(in_shape))])
        if [out_shape[i] for i in kept_out] != [in_shape[i] for i in kept_in]:
            return _regroup(inner, in_shape, out_shape)   # a real reshape: merges and splits dims
        mapping = dict(zip(kept_in, kept_out))
        return lambda idx: inner([idx[mapping[d]] if d in mapping else E.Const(0) for d in range(len(in_shape))])

    def _getitem(self, index, inner, in_shape, out_shape) -> Optional[Indexed]:
        items = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in items):
            pos = items.index(Ellipsis)
            fill = len(in_shape) - (len(items) - 1 - sum(1 for i in items if i is None))
            items = items[:pos] + (slice(None),) * fill + items[pos + 1:]
        tensors = [it for it in items if isinstance(it, Node)]
        if tensors:
            # one integer index tensor among plain slices: numpy puts its dims where it stands
            ex = example(tensors[0])
            if len(tensors) != 1 or ex is None or ex.dtype == torch.bool or ex.is_floating_point() \
                    or not all(isinstance(it, slice) or it is tensors[0] for it in items):
                return None
        plan, d_in = [], 0
        for it in items:
            if it is None:
                plan.append(("new", None))
            elif isinstance(it, slice):
                start = it.start or 0
                if it.step not in (None, 1) or not isinstance(start, int) or start < 0:
                    return None
                plan.append(("slice", (d_in, start)))
                d_in += 1
            elif isinstance(it, int):
                plan.append(("int", (d_in, it)))
                d_in += 1
            elif isinstance(it, Node) and len(tensors) == 1 and tensors[0] is it:
                # an integer index tensor (a gather, ``table[index]``): its dims replace dim d_in
                rank = example(it).dim()
                plan.append(("gather", (d_in, self.lift(it), rank)))
                if plan[-1][1][1] is None:
                    return None
                d_in += 1
            else:
                return None
        while d_in < len(in_shape):
            plan.append(("slice", (d_in, 0)))
            d_in += 1

        def read(idx):
            src = [None] * len(in_shape)
            o = 0
            for kind, arg in plan:
                if kind == "new":
                    o += 1
                elif kind == "slice":
                    d, start = arg
                    src[d] = _affine(idx[o], start, 1)
                    o += 1
                elif kind == "gather":
                    d, index, rank = arg
                    src[d] = index(list(idx[o:o + rank]))
                    o += rank
                else:
                    d, value = arg
                    src[d] = E.Const(value % in_shape[d] if value < 0 else value)
            return inner(src)
        return read


def _regroup(inner: Indexed, in_shape: tuple, out_shape: tuple) -> Optional[Indexed]:
    """A row-major reshape that merges and splits dims (static sizes only): the dims form groups
    of equal size on both sides; in each group the output index is flattened and unflattened
    into the input's dims (``[N*N, H] -> [N, N, H]`` reads ``(i * N + j, h)``)."""
    if not all(isinstance(s, int) for s in in_shape + out_shape) or _prod(in_shape) != _prod(out_shape):
        return None
    groups, i, o = [], 0, 0
    while i < len(in_shape) or o < len(out_shape):
        gi, go = [i] if i < len(in_shape) else [], [o] if o < len(out_shape) else []
        pi = in_shape[i] if gi else 1
        po = out_shape[o] if go else 1
        i, o = i + len(gi), o + len(go)
        while pi != po:
            if pi < po and i < len(in_shape):
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            elif po < pi and o < len(out_shape):
                po *= out_shape[o]
                go.append(o)
                o += 1
            else:
                return None
        groups.append((gi, go))

    def read(idx):
        src: list = [E.Const(0)] * len(in_shape)
        for gi, go in groups:
            flat, stride = None, 1
            for d in reversed(go):
                if out_shape[d] != 1:
                    term = idx[d] if stride == 1 else E.BinOp("*", idx[d], E.Const(stride))
                    flat = term if flat is None else E.BinOp("+", term, flat)
                stride *= out_shape[d]
            flat = E.Const(0) if flat is None else flat
            live = [d for d in gi if in_shape[d] != 1]
            stride = 1
            for d in reversed(gi):
                if in_shape[d] == 1:
                    continue
                part = flat if stride == 1 else E.BinOp("//", flat, E.Const(stride))
                src[d] = part if d == live[0] else E.BinOp("%", part, E.Const(in_shape[d]))
                stride *= in_shape[d]
        return inner(src)
    return read


def _prod(shape: tuple) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _affine(i: E.Node, start: int, step: int) -> E.Node:
    out = i if step == 1 else E.BinOp("*", i, E.Const(step))
    return out if start == 0 else E.BinOp("+", E.Const(start), out)


def lift(node: Node, site_rank: int = 4, max_nodes: int = 200) -> Optional[Lifted]:
    """The expression of tensor ``node`` at site index (b, h, q, k), broadcast right-aligned
    against a [B, H, Q, K] score tensor (None when the graph cannot be read, e.g. too large)."""
    lifter = _Lifter(max_nodes)
    fn = lifter.lift(node)
    val = example(node)
    if fn is None or val is None or val.dim() > site_rank:
        return None
    names = ["b", "h", "q", "k"][4 - val.dim():]
    idx = [E.Const(0) if s == 1 else E.Var(n) for s, n in zip(val.shape, names)]
    return Lifted(simplify(fn(idx)), lifter.captured)


def simplify(tree: E.Node) -> E.Node:
    """Fold constants and drop identities (x + 0, x * 1, x - 0, x / 1)."""
    if isinstance(tree, E.BinOp):
        a, c = simplify(tree.left), simplify(tree.right)
        if isinstance(a, E.Const) and isinstance(c, E.Const) and tree.op in ("+", "-", "*"):
            return E.Const({"+": a.value + c.value, "-": a.value - c.value, "*": a.value * c.value}[tree.op])
        if tree.op in ("+", "-") and isinstance(c, E.Const) and c.value == 0:
            return a
        if tree.op == "+" and isinstance(a, E.Const) and a.value == 0:
            return c
        if tree.op in ("*", "/") and isinstance(c, E.Const) and c.value == 1:
            return a
        if tree.op == "*" and isinstance(a, E.Const) and a.value == 1:
            return c
        return E.BinOp(tree.op, a, c)
    return E.map_children(tree, simplify)


def classify(lifted: Lifted) -> str:
    """``key_only`` (depends on b/h and k only), ``relative`` (on q and k only through k - q),
    or ``general``."""
    used = E.variables(lifted.expr)
    if "q" not in used:
        return "key_only"
    return "relative" if _only_difference(lifted.expr) else "general"


def _only_difference(tree: E.Node) -> bool:
    """Do q and k appear only inside ``k - q`` / ``q - k`` sub-expressions?"""
    if isinstance(tree, E.BinOp) and tree.op == "-" and {_name(tree.left), _name(tree.right)} == {"q", "k"}:
        return True
    if isinstance(tree, E.Var):
        return tree.name not in ("q", "k")
    return all(_only_difference(c) for c in E.children(tree))


def _name(tree: E.Node) -> Optional[str]:
    return tree.name if isinstance(tree, E.Var) else None


def _from_bool(node) -> bool:
    """Whether ``node`` holds a bool tensor's values through casts and views only (``keep.long()
    [:, None, None, :]``), so that casting it back to bool gives the bool itself."""
    views = ("cast", "contiguous", "unsqueeze", "getitem", "reshape", "expand", "expand_as", "permute", "transpose")
    for _ in range(16):
        call = canonical(node)
        if call is not None and call.name in views:
            node = call.get("input")
        elif isinstance(node, Node) and node.op == "call_method" and node.target in ("long", "int", "short") \
                and node.args:
            node = node.args[0]
        else:
            return False
        val = example(node)
        if val is not None and val.dtype == torch.bool:
            return True
    return False


def _strip_numeric_casts(tree: E.Node) -> E.Node:
    """``int(float(x))`` -> ``x`` (only where ``x`` is known to be a bool: see ``_from_bool``)."""
    while isinstance(tree, E.Call) and tree.fn in ("int", "float") and len(tree.args) == 1:
        tree = tree.args[0]
    return tree
