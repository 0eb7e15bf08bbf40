"""Score terms from the graph: the element-wise chain between QK^T and softmax as one expression.

The matcher (``match._walk_scores``) walks from the softmax back to QK^T through scales, masks and
casts. When it meets an op that is none of those (``tanh`` of Gemma-2's soft-capping, any unseen
element-wise composition), ``lift_chain`` reads the rest of the chain, down to the QK^T product,
as a ``scoremod`` expression over the score ``s`` and the positions (b, h, q, k): the FX ops
become expression nodes by the rules of ``passes.lift`` (a table keyed by the canonical op name),
the QK^T product becomes ``s``, tensors the chain reads (slopes, bias tables, per-head factors)
are captured. ``fold_scale`` moves a constant factor that multiplies every ``s`` into the op's
``scale``. Additive mask terms that are biases rather than masks (``bias_mods``) join the
expression too, so methods see a key-only / relative bias instead of a general mask.

What the terms ARE (Scale, Mask, Bias, Softcap, ScoreMod) is read off the final expression by the
rule table in ``scoremod.terms``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch.fx import Node

from ..scoremod import expr as E
from ..scoremod.expr import MAX_TENSORS
from .lift import _Lifter, simplify
from .table import canonical, constant_number, example

#: QK^T: the ops that make the raw scores
_QK = ("matmul", "einsum", "baddbmm")


@dataclass
class Chain:
    """The lifted chain: ``text`` maps the scaled score ``s`` (``scale * q.k``) of the QK^T node
    ``root`` to the value of the chain's top node; it reads ``captured`` as t0, t1, ..."""

    root: Node
    text: str
    scale: float
    captured: list = field(default_factory=list)


class _ChainLifter(_Lifter):
    """``passes.lift``'s rules, with the QK^T node read as ``s`` and nothing else that depends
    on it captured (that would keep the N x N scores alive): ``failed`` names the op then."""

    def __init__(self, root: Node, scores: set):
        super().__init__(max_nodes=400)
        self.root = root
        self.scores = scores
        self.failed: Optional[Node] = None

    def lift(self, node: Any):
        if node is self.root:
            return self._root()
        return super().lift(node)

    def _root(self):
        call = canonical(self.root)
        if call.name != "baddbmm":
            return lambda idx: E.Var("s")
        # beta * bias + alpha * (a @ b)
        alpha, beta = constant_number(call.get("alpha", 1.0)), constant_number(call.get("beta", 1.0))
        if alpha is None or beta is None:
            self.failed = self.root
            return None
        bias = self.operand(call.get("bias")) if isinstance(call.get("bias"), Node) and beta != 0 else None

        def read(idx):
            s = E.BinOp("*", E.Const(float(alpha)), E.Var("s"))
            return s if bias is None else E.BinOp("+", E.BinOp("*", E.Const(float(beta)), bias(idx)), s)
        return read

    def capture(self, node: Node):
        if node in self.scores:
            self.failed = self.failed or node
            return None
        return super().capture(node)


def find_root(top: Node, qk: tuple, depth: int = 64) -> tuple[Optional[Node], set]:
    """The one QK^T node (a matmul / einsum / baddbmm whose last two dims are the scores' ``qk``)
    that ``top`` is computed from, and the nodes on the way (``top`` included); (None, ..) when
    there is none or more than one."""
    roots: list = []
    on_path: dict = {}

    def visit(node: Any, d: int) -> bool:
        if not isinstance(node, Node):
            return False
        if node in on_path:
            return on_path[node]
        call = canonical(node)
        val = example(node)
        if call is not None and call.name in _QK and val is not None and val.dim() >= 2 \
                and tuple(val.shape[-2:]) == tuple(qk):
            roots.append(node)
            on_path[node] = True
            return True
        found = False
        if d > 0:
            for arg in node.all_input_nodes:
                found = visit(arg, d - 1) or found
        on_path[node] = found
        return found

    visit(top, depth)
    unique = list(dict.fromkeys(roots))
    if len(unique) != 1:
        return None, set()
    return unique[0], {n for n, hit in on_path.items() if hit}


def lift_chain(top: Node, qk: tuple, site_rank: int, post_scale: float, factors: tuple,
               users_ok) -> tuple[Optional[Chain], Optional[str]]:
    """The chain from QK^T up to ``top`` (then times ``post_scale`` and the graph-computed
    ``factors`` applied after it) as a ``Chain``, or (None, reason naming the op that is not
    element-wise). ``users_ok(node, path)`` says whether every value user of a chain node lies on
    the chain (else the scores escape and cannot be replaced)."""
    root, path = find_root(top, qk)
    if root is None:
        return None, f"the scores pass through `{_op_name(top)}` and the chain below it does not lead to one QK^T product"
    for node in path:
        if node is not top and not users_ok(node, path):
            return None, f"the scores at `{node.name}` ({_op_name(node)}) have users outside the attention"
    lifter = _ChainLifter(root, path)
    fn = lifter.lift(top)
    if fn is None or lifter.failed is not None:
        bad = lifter.failed if lifter.failed is not None else top
        return None, (f"the scores pass through `{_op_name(bad)}`, which is not an element-wise op of the score "
                      f"language (scale, mask, bias, tanh soft-capping, exp/log/abs/min/max/where ...)")
    val = example(top)
    names = ["b", "h", "q", "k"][4 - val.dim():]
    idx = [E.Const(0) if s == 1 else E.Var(n) for s, n in zip(val.shape, names)]
    tree = fn(idx)
    for factor, how in factors:
        f = lifter.operand(factor)
        if f is None or lifter.failed is not None:
            return None, f"a scale `{_op_name(factor)}` computed in the graph after the score modification"
        tree = E.BinOp("*" if how == "mul" else "/", tree, f(idx))
    if post_scale != 1.0:
        tree = E.BinOp("*", tree, E.Const(float(post_scale)))
    if len(lifter.captured) > MAX_TENSORS:
        return None, f"the score modification reads {len(lifter.captured)} tensors (at most {MAX_TENSORS})"
    tree, scale = fold_scale(simplify(tree))
    return Chain(root, E.unparse(tree), scale, list(lifter.captured)), None


def fold_scale(tree: E.Node) -> tuple[E.Node, float]:
    """``(tree', c)`` with ``tree`` == ``tree'`` evaluated at ``s = c * s``: when every read of
    ``s`` is ``s * c`` / ``c * s`` / ``s / (1/c)`` with one constant ``c > 0``, those become
    ``s`` (the op's ``scale`` takes ``c``); else ``(tree, 1.0)``."""
    found: set = set()

    def scan(t: E.Node) -> bool:
        c = _scaled_s(t)
        if c is not None:
            found.add(c)
            return True
        if isinstance(t, E.Var) and t.name == "s":
            return False
        return all(scan(x) for x in E.children(t))

    if not scan(tree) or len(found) != 1:
        return tree, 1.0
    c = found.pop()
    if not c > 0:
        return tree, 1.0

    def swap(t: E.Node) -> E.Node:
        return E.Var("s") if _scaled_s(t) is not None else E.map_children(t, swap)
    return swap(tree), c


def _scaled_s(t: E.Node) -> Optional[float]:
    if not isinstance(t, E.BinOp) or t.op not in ("*", "/"):
        return None
    for s, c in ((t.left, t.right), (t.right, t.left) if t.op == "*" else (None, None)):
        if isinstance(s, E.Var) and s.name == "s" and isinstance(c, E.Const) and float(c.value) != 0:
            return float(c.value) if t.op == "*" else 1.0 / float(c.value)
    return None


def lift_bias(node: Node, coef: float, site_rank: int, first_index: int) -> Optional[tuple[str, list]]:
    """An additive mask term ``coef * node`` as an expression whose captured tensors are numbered
    from ``first_index``: (text, captured nodes), or None when its producer graph cannot be read."""
    lifter = _Lifter(max_nodes=400)
    fn = lifter.lift(node)
    val = example(node)
    if fn is None or val is None or val.dim() > site_rank:
        return None
    names = ["b", "h", "q", "k"][4 - val.dim():]
    tree = fn([E.Const(0) if s == 1 else E.Var(n) for s, n in zip(val.shape, names)])
    if coef != 1.0:
        tree = E.BinOp("*", E.Const(float(coef)), tree)
    tree = _renumber(simplify(tree), first_index)
    return E.unparse(tree), list(lifter.captured)


def _renumber(t: E.Node, offset: int) -> E.Node:
    if offset == 0:
        return t
    t = E.map_children(t, lambda c: _renumber(c, offset))
    return E.Load(t.index + offset, t.at) if isinstance(t, E.Load) else t


def _op_name(node: Any) -> str:
    if not isinstance(node, Node):
        return repr(node)
    call = canonical(node)
    if call is not None:
        return call.name
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return str(target)


def biases_into_mod(m, plan):
    """``plan`` (a ``masks.MaskPlan``) with the additive terms of a general mask moved into the
    site's score modification ``m.score_mod`` when their producer graphs lift to expressions over
    positions (ALiBi, T5 buckets, Swin tables): methods then see a key-only / relative / general
    bias, not a general [Q, K] mask.

    A term that is a sum (``bias + causal_mask``) or ``where(keep, bias, fill)`` is split first
    (``split_pieces``); each piece is then a mask the mask plan proves (causal, key padding),
    a constant zero (dropped), a bias that lifts to an expression (moved), or a hard mask the
    plan cannot prove (a fill <= -1e4, e.g. a sliding window: it stays in the mask). Done only
    where it is exact: every moved piece is plain ``coef * tensor`` added in the site's own view,
    and the mask that remains gives eager's fully masked rows too (``_rows_exact``). A tensor read
    at its own index (a materialised bias) stays in the mask: as an expression it would gain no
    method anything. Otherwise the plan is returned unchanged."""
    from .masks import plan_mask

    if plan.kind != "general" or plan.reason is not None:
        return plan
    rank = len(m.scores_shape)
    qk = tuple(m.scores_shape[-2:])
    texts, captured, rest, moved = [], list(m.score_tensors), [], False
    for term in plan.general:
        for piece in split_pieces(term, qk):
            if piece.kind != "additive" or _proven_mask(piece, qk):
                rest.append(piece)
                continue
            if piece.factors or piece.lead is not None:
                return plan
            lifted = lift_bias(piece.node, piece.coef, rank, len(captured))
            if lifted is None or _bare_load(lifted[0]):
                return plan
            tree = E.parse(lifted[0])
            if _has_mask_fill(tree):
                rest.append(piece)   # a hard mask (sliding window...): the mask plan keeps it
                continue
            moved = True
            if isinstance(tree, E.Const) and tree.value == 0:
                continue             # a zero bias (T5's cross-attention): nothing to add
            texts.append(lifted[0])
            captured += lifted[1]
    if not moved or len(captured) > MAX_TENSORS:
        return plan
    new = plan_mask(rest, m.is_causal, qk)
    if new.reason is not None or not _rows_exact(new):
        return plan
    if texts:
        core = m.score_mod or "s"
        m.score_mod = E.unparse(E.parse(" + ".join([f"({core})"] + [f"({x})" for x in texts])))
        m.score_tensors = captured
    m.masks = rest
    return new


def split_pieces(term, qk: Optional[tuple] = None) -> list:
    """The additive mask ``term`` as the pieces eager sums (listed from the softmax backwards,
    like the mask terms): ``a + b`` -> pieces of b, then of a; ``where(keep, x, fill)`` (or
    ``where(masked, fill, x)``) with a constant mask fill -> ``x`` plus a keep (masked) term
    with that fill, since ``s + where(keep, x, fill)`` is ``s + x`` with the masked entries set
    to ``s + fill``, which rounds to the fill (|fill| >= 1e30), or, for a smaller fill, when no
    query row is fully masked (``keep`` is causal over the scores' ``qk`` = (Q, K)), masks as a
    hard mask does (exp(fill - max) = 0). Anything else is one piece."""
    from dataclasses import replace

    from .masks import _is_broadcast_view, _is_float, is_mask_fill

    if term.kind != "additive":
        return [term]
    call = canonical(term.node)
    if call is not None and (call.name in ("contiguous", "expand", "expand_as") or _is_broadcast_view(call)
                             or (call.name == "cast" and _is_float(call.get("input")) and _is_float(call.node))):
        inner = split_pieces(replace(term, node=call.get("input")), qk)
        return [term] if len(inner) == 1 else inner
    if call is not None and call.name == "add" and call.get("alpha") is None \
            and isinstance(call.get("input"), Node) and isinstance(call.get("other"), Node):
        return split_pieces(replace(term, node=call.get("other")), qk) + split_pieces(replace(term, node=call.get("input")), qk)
    if call is not None and call.name == "where":
        cond, a, b = call.get("condition"), call.get("input"), call.get("other")
        for kind, value, fill in (("keep", a, b), ("masked", b, a)):
            number = constant_number(fill)
            if isinstance(value, Node) and isinstance(cond, Node) and is_mask_fill(number, term.coef) \
                    and (abs(number) >= 1e30 or _rows_never_dead(cond, qk)):
                return [replace(term, node=cond, kind=kind, fill=float(number))] + \
                    split_pieces(replace(term, node=value), qk)
    return [term]


def _rows_never_dead(cond, qk) -> bool:
    """A keep mask proven causal alone, over the scores' own [Q, K]: every query row keeps key 0."""
    from .masks import _boolean, _spans

    facts = _boolean(cond, positive=True)
    return facts is not None and facts.causal and not facts.keypad and all(_spans(w, qk) for w in facts.witnesses)


def _proven_mask(piece, qk) -> bool:
    """Does the mask plan prove the additive ``piece`` alone a causal / key-padding mask (fills,
    not a bias tensor it would add as it is)?"""
    from .masks import _spans, _term_steps

    steps = _term_steps(piece)
    return steps is not None and all(s.op != "bias" for s in steps) and \
        all(_spans(w, qk) for s in steps for w in s.witnesses)


def _has_mask_fill(tree: E.Node) -> bool:
    """Does the expression hold a constant that masks (<= -1e4, -inf included)?"""
    from .masks import NEG_THRESHOLD

    if isinstance(tree, E.Const):
        return not isinstance(tree.value, bool) and float(tree.value) <= NEG_THRESHOLD
    if isinstance(tree, E.Neg) and isinstance(tree.value, E.Const) and not isinstance(tree.value.value, bool):
        return -float(tree.value.value) <= NEG_THRESHOLD
    return any(_has_mask_fill(c) for c in E.children(tree))


def _rows_exact(plan) -> bool:
    """Does the op reproduce eager's fully masked rows once biases were moved out of the mask?
    The program starts from the logits with the moved biases added (eager adds them before or
    after the mask, which changes only rounding) and adds fills to them; a FINITE fill that
    overwrites the entries (``set``) would drop a bias eager may have added after it, unless the
    fill is so large that the bias vanishes in its rounding. A causal mask alone has no dead rows."""
    if not plan.dead_rows or (plan.kind == "causal" and not plan.keypad):
        return True
    for item in plan.dead_rows.split(";"):
        _, op, fill = item.split(":")
        if op == "set" and float(fill) > float("-inf") and abs(float(fill)) < 1e30:
            return False
    return True


def _bare_load(text: str) -> bool:
    """A tensor read at its own index (times a constant): a materialised mask, not a bias made
    from positions."""
    tree = E.parse(text)
    if isinstance(tree, E.BinOp) and tree.op == "*" and isinstance(tree.left, E.Const):
        tree = tree.right
    return isinstance(tree, E.Load) and all(isinstance(i, (E.Var, E.Const)) for i in tree.at)


def site_terms(m, mask_kind: str, plan=None) -> tuple:
    """The site's terms in eager's order: a per-head scale, the score modification's terms
    (``scoremod.terms.terms_of``: bias, soft-cap, other chains, the window), a key bias the mask
    plan carries as an additive key-padding term (BLOOM's ALiBi), then the mask."""
    from ..scoremod.terms import Bias, Mask, Scale, terms_of
    from .masks import _term_steps

    out: list = []
    if m.scale_nodes:
        out.append(Scale("per-head"))
    out.extend(terms_of(m.score_mod, *m.window))
    if plan is not None and any(t.kind == "additive" and any(st.op == "bias" for st in (_term_steps(t) or ()))
                                for t in plan.keypad):
        out.append(Bias("key_only"))
    masks = {"causal": ("causal",), "key_padding": ("key_padding",), "causal+key_padding": ("causal", "key_padding"),
             "general": ("general",)}.get(mask_kind, ())
    out.extend(Mask(kind) for kind in masks)
    return tuple(out)
