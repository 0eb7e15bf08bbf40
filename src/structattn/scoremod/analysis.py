"""Read the structure of a score-modification expression: its additive terms, soft-capping, and
which positions a bias depends on.

The methods use this to treat each part where it is cheapest: a bias that depends only on the key
(per batch and head) is a key bias like a padding mask; a term that depends only on the query is a
per-row constant that softmax ignores (ALiBi written as ``slope * (k - q)`` is key-only up to one);
what remains (soft-capping, relative or general biases, unseen chains) is evaluated where it is
needed. Everything here is exact algebra on the tree: a term is only moved or dropped when the
expression is a sum in which it appears as a summand (after distributing a factor that reads no
position over a sum).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .expr import BinOp, Call, Const, Neg, Node, Var, parse, unparse, variables

#: positions an expression may read
_POSITIONS = frozenset({"q", "k"})


def summands(tree: Node) -> list[Node]:
    """The expression as a list of summands (their sum is ``tree``): ``a + b - c`` -> [a, b, -c];
    a factor that reads neither s nor a position is distributed over a sum it multiplies
    (``t0[h] * (k - q)`` -> [t0[h] * k, -(t0[h] * q)]), so that key and query parts separate."""
    if isinstance(tree, BinOp) and tree.op == "+":
        return summands(tree.left) + summands(tree.right)
    if isinstance(tree, BinOp) and tree.op == "-":
        return summands(tree.left) + [_negate(t) for t in summands(tree.right)]
    if isinstance(tree, Neg):
        return [_negate(t) for t in summands(tree.value)]
    if isinstance(tree, BinOp) and tree.op in ("*", "/"):
        left, right = tree.left, tree.right
        if tree.op == "*" and _is_coefficient(left):
            parts = summands(right)
            if len(parts) > 1:
                return [BinOp("*", left, p) for p in parts]
        if _is_coefficient(right):
            parts = summands(left)
            if len(parts) > 1:
                return [BinOp(tree.op, p, right) for p in parts]
    return [tree]


def _is_coefficient(tree: Node) -> bool:
    """Reads no score and no position (constants, b, h and tensors read at those)."""
    return not (variables(tree) & {"s", "q", "k"})


def _negate(tree: Node) -> Node:
    return tree.value if isinstance(tree, Neg) else Neg(tree)


def join(terms: list[Node]) -> Optional[Node]:
    """The sum of ``terms`` (None for an empty list)."""
    out = None
    for t in terms:
        if out is None:
            out = t
        elif isinstance(t, Neg):
            out = BinOp("-", out, t.value)
        else:
            out = BinOp("+", out, t)
    return out


def softcap_of(tree: Node) -> Optional[tuple[float, Node]]:
    """``(c, x)`` when ``tree`` is ``c * tanh(x / c)`` (or ``tanh(x / c) * c``, ``x * (1 / c)``
    inside), else None."""
    if not (isinstance(tree, BinOp) and tree.op == "*"):
        return None
    for cap, inner in ((tree.left, tree.right), (tree.right, tree.left)):
        if not (isinstance(cap, Const) and isinstance(inner, Call) and inner.fn == "tanh"):
            continue
        arg = inner.args[0]
        c = float(cap.value)
        if c <= 0 or not isinstance(arg, BinOp):
            continue
        if arg.op == "/" and isinstance(arg.right, Const) and _close(float(arg.right.value), c):
            return c, arg.left
        if arg.op == "*":
            for x, f in ((arg.left, arg.right), (arg.right, arg.left)):
                if isinstance(f, Const) and float(f.value) != 0 and _close(1.0 / float(f.value), c):
                    return c, x
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def bias_form(tree: Node) -> str:
    """How a bias (an expression without ``s``) depends on positions: ``key_only`` (on b, h and
    k, up to summands that read only the query: per-row constants), ``relative`` (q and k only
    through ``k - q``), or ``general``."""
    if key_only_part(tree) is not None:
        return "key_only"
    return "relative" if _only_difference(tree) else "general"


def key_only_part(tree: Node) -> Optional[Node]:
    """The bias ``tree`` without its summands that read only the query (per-row constants), when
    what remains reads no query position; None when some summand reads both q and k. Returns
    ``Const(0)`` when nothing remains."""
    kept = []
    for t in summands(tree):
        used = variables(t)
        if "q" in used and "k" in used:
            return None
        if "q" not in used:
            kept.append(t)
    return join(kept) if kept else Const(0)


def _only_difference(tree: Node) -> bool:
    """Do q and k appear only inside ``k - q`` / ``q - k`` sub-expressions?"""
    if isinstance(tree, BinOp) and tree.op == "-" and isinstance(tree.left, Var) and isinstance(tree.right, Var) \
            and {tree.left.name, tree.right.name} == _POSITIONS:
        return True
    if isinstance(tree, Var):
        return tree.name not in _POSITIONS
    from .expr import children

    return all(_only_difference(c) for c in children(tree))


@dataclass(frozen=True)
class KeySplit:
    """An expression split for methods that handle key biases natively: ``logits = rest(s) +
    key_bias + (per-row constants)``. ``rest`` is '' when it is the identity (``s``);
    ``key_bias`` '' when there is none."""

    rest: str
    key_bias: str

    @property
    def exact_key_only(self) -> bool:
        """Whether everything besides ``s`` itself is a key bias (and per-row constants)."""
        return not self.rest


def split_key_bias(text: str) -> KeySplit:
    """Split ``text`` into a key bias (the summands that read neither s nor q, plus the key part of
    summands separable into key and query parts) and the rest. Per-row constants (summands that
    read only b, h and q) are dropped from both: softmax ignores them."""
    if not text:
        return KeySplit("", "")
    keys, rest = [], []
    for t in summands(parse(text)):
        used = variables(t)
        if "s" in used:
            rest.append(t)
        elif "q" not in used:
            keys.append(t)
        elif "k" in used:
            rest.append(t)
        # else: reads q (and maybe b, h) only: a per-row constant
    core = join(rest) if rest else Const(0)
    rest_text = "" if isinstance(core, Var) and core.name == "s" else unparse(core)
    return KeySplit(rest_text, unparse(join(keys)) if keys else "")


def is_additive(text: str) -> bool:
    """Whether ``text`` is ``s + bias`` with a bias that does not read ``s`` (ALiBi, T5 buckets,
    any tensor or position expression): its logits at ``s = 0`` are the bias, so a kernel can take
    them as an additive mask."""
    if not text:
        return False
    parts = summands(parse(text))
    bare = [t for t in parts if isinstance(t, Var) and t.name == "s"]
    return len(bare) == 1 and all("s" not in variables(t) for t in parts if t is not bare[0])


def additive_tensor(text: str) -> Optional[tuple[int, tuple]]:
    """``(i, index)`` when ``text`` is ``s + t{i}[...]`` with the tensor read at the site's own
    index (each index ``b``/``h``/``q``/``k`` in order over its trailing dims, or 0 for a
    broadcast dim): a bias tensor SDPA can take as its additive mask. Else None."""
    from .expr import Load

    tree = parse(text) if text else None
    if not (isinstance(tree, BinOp) and tree.op == "+"):
        return None
    for s, load in ((tree.left, tree.right), (tree.right, tree.left)):
        if isinstance(s, Var) and s.name == "s" and isinstance(load, Load):
            names = ("b", "h", "q", "k")[4 - len(load.at):] if len(load.at) <= 4 else None
            if names is None:
                return None
            for i, name in zip(load.at, names):
                if not ((isinstance(i, Var) and i.name == name) or (isinstance(i, Const) and i.value == 0)):
                    return None
            return load.index, load.at
    return None
