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
import operator
from typing import Any, Optional

import torch
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
