"""Score-modification expressions: what a site does to its scores between QK^T and softmax.

A score modification is one expression in a small, Python-like language, carried as a string
(so it is an op argument: part of the graph and of the compile cache key) together with the
tensors it reads. It maps the scaled score of one (query, key) entry to the logit the softmax
sees::

    50.0 * tanh(s / 50.0)                      # Gemma-2 soft-capping
    s + t0[h, 0] * k                           # a key-only ALiBi bias (t0: per-head slopes)
    s - t0[h, 0] * abs(q - k)                  # symmetric ALiBi (a relative bias)
    s + t0[t1[q, k], h]                        # a relative-position table lookup (T5, Swin)

Names: ``s`` (the score ``scale * q . k``, float), ``b``, ``h``, ``q``, ``k`` (batch, query head,
query position, key position: ints), ``t0`` .. ``t7`` (captured tensors, always indexed with as
many int expressions as they have dims). Functions: ``tanh exp log abs sqrt sigmoid floor ceil``,
``min(a, b)``, ``max(a, b)``, ``where(c, a, b)``, ``float(x)``, ``int(x)`` (truncation),
``clamp(x, lo, hi)``. Operators: ``+ - * / // % **`` (``**`` with a constant exponent),
comparisons, ``and or not`` (element-wise). Every evaluator (``evaluate.py`` in torch,
``triton_gen.py`` in Triton) reads the same parsed tree, so the CPU path and the kernels agree.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

#: variables an expression may read
VARIABLES = ("s", "b", "h", "q", "k")
#: captured tensors are named t0 .. t{MAX_TENSORS-1}
MAX_TENSORS = 8
#: function name -> number of arguments
FUNCTIONS = {
    "tanh": 1, "exp": 1, "log": 1, "abs": 1, "sqrt": 1, "sigmoid": 1, "floor": 1, "ceil": 1,
    "float": 1, "int": 1, "min": 2, "max": 2, "where": 3, "clamp": 3,
}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
_CMPOPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


# -- the tree -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Const:
    value: Union[int, float]


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Load:
    """``t{index}[i0, i1, ...]``: an element of captured tensor ``index``."""

    index: int
    at: tuple


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple


@dataclass(frozen=True)
class BinOp:
    op: str
    left: object
    right: object


@dataclass(frozen=True)
class Neg:
    value: object


@dataclass(frozen=True)
class Not:
    value: object


@dataclass(frozen=True)
class BoolOp:
    op: str   # "and" | "or"
    values: tuple


Node = Union[Const, Var, Load, Call, BinOp, Neg, Not, BoolOp]


class ScoreModError(ValueError):
    """A score-modification expression outside the language (the message says what and where)."""


@lru_cache(maxsize=256)
def parse(text: str) -> Node:
    """Parse ``text`` into the expression tree; ScoreModError names what is not allowed."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ScoreModError(f"score_mod {text!r} is not an expression: {exc.msg}") from None
    return _convert(tree, text)


def _convert(node: ast.AST, text: str) -> Node:
    def fail(what: str):
        raise ScoreModError(f"score_mod {text!r}: {what} is not allowed; allowed: numbers, "
                            f"{', '.join(VARIABLES)}, t0..t{MAX_TENSORS - 1}[...], {', '.join(FUNCTIONS)}, "
                            f"+ - * / // % **, comparisons, and/or/not")

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            fail(f"the constant {node.value!r}")
        return Const(node.value)
    if isinstance(node, ast.Name):
        if node.id not in VARIABLES:
            fail(f"the name {node.id!r}" + (" without an index" if _tensor_index(node.id) is not None else ""))
        return Var(node.id)
    if isinstance(node, ast.Subscript):
        if not isinstance(node.value, ast.Name) or _tensor_index(node.value.id) is None:
            fail("indexing anything but a captured tensor t0..t7")
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return Load(_tensor_index(node.value.id), tuple(_convert(i, text) for i in items))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            fail(f"the call {ast.unparse(node)!r}")
        if len(node.args) != FUNCTIONS[node.func.id]:
            fail(f"{node.func.id} with {len(node.args)} arguments (it takes {FUNCTIONS[node.func.id]})")
        return Call(node.func.id, tuple(_convert(a, text) for a in node.args))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        op = _BINOPS[type(node.op)]
        right = _convert(node.right, text)
        if op == "**" and not isinstance(right, Const):
            fail("a non-constant exponent")
        return BinOp(op, _convert(node.left, text), right)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return Neg(_convert(node.operand, text))
        if isinstance(node.op, ast.UAdd):
            return _convert(node.operand, text)
        if isinstance(node.op, ast.Not):
            return Not(_convert(node.operand, text))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
        return BinOp(_CMPOPS[type(node.ops[0])], _convert(node.left, text), _convert(node.comparators[0], text))
    if isinstance(node, ast.BoolOp):
        return BoolOp("and" if isinstance(node.op, ast.And) else "or", tuple(_convert(v, text) for v in node.values))
    if isinstance(node, ast.IfExp):
        return Call("where", (_convert(node.test, text), _convert(node.body, text), _convert(node.orelse, text)))
    fail(f"`{ast.unparse(node)}`")


def _tensor_index(name: str):
    if len(name) >= 2 and name[0] == "t" and name[1:].isdigit() and int(name[1:]) < MAX_TENSORS:
        return int(name[1:])
    return None


def variables(tree: Node) -> frozenset:
    """The variables (``s b h q k``) the expression reads, directly or in an index."""
    if isinstance(tree, Var):
        return frozenset({tree.name})
    return frozenset().union(*(variables(c) for c in children(tree))) if children(tree) else frozenset()


def tensors(tree: Node) -> frozenset:
    """Indices of the captured tensors the expression reads."""
    own = {tree.index} if isinstance(tree, Load) else set()
    return frozenset(own).union(*(tensors(c) for c in children(tree)))


def children(tree: Node) -> tuple:
    if isinstance(tree, Load):
        return tree.at
    if isinstance(tree, Call):
        return tree.args
    if isinstance(tree, BinOp):
        return (tree.left, tree.right)
    if isinstance(tree, (Neg, Not)):
        return (tree.value,)
    if isinstance(tree, BoolOp):
        return tree.values
    return ()


def map_children(tree: Node, fn) -> Node:
    """``tree`` with ``fn`` applied to each direct child (``children``); leaves are returned as they
    are. The one rebuild every tree rewrite (substitution, renumbering, folding) recurses through."""
    if isinstance(tree, Load):
        return Load(tree.index, tuple(fn(i) for i in tree.at))
    if isinstance(tree, Call):
        return Call(tree.fn, tuple(fn(a) for a in tree.args))
    if isinstance(tree, BinOp):
        return BinOp(tree.op, fn(tree.left), fn(tree.right))
    if isinstance(tree, Neg):
        return Neg(fn(tree.value))
    if isinstance(tree, Not):
        return Not(fn(tree.value))
    if isinstance(tree, BoolOp):
        return BoolOp(tree.op, tuple(fn(v) for v in tree.values))
    return tree


def unparse(tree: Node) -> str:
    """Canonical text of a tree (``parse(unparse(t)) == t``)."""
    if isinstance(tree, Const):
        if isinstance(tree.value, float) and math.isinf(tree.value):
            return "1e999" if tree.value > 0 else "(-1e999)"   # parses back to +-inf
        return repr(tree.value)
    if isinstance(tree, Var):
        return tree.name
    if isinstance(tree, Load):
        return f"t{tree.index}[{', '.join(unparse(i) for i in tree.at)}]"
    if isinstance(tree, Call):
        return f"{tree.fn}({', '.join(unparse(a) for a in tree.args)})"
    if isinstance(tree, BinOp):
        return f"({unparse(tree.left)} {tree.op} {unparse(tree.right)})"
    if isinstance(tree, Neg):
        return f"(-{unparse(tree.value)})"
    if isinstance(tree, Not):
        return f"(not {unparse(tree.value)})"
    return "(" + f" {tree.op} ".join(unparse(v) for v in tree.values) + ")"
