"""Find attention sites in an FX graph: decomposed softmax(QK^T)V and SDPA calls.

The matcher anchors on ``softmax`` (or an SDPA call), walks back through the score chain (casts,
scales, masks, biases, views of the leading dims) to ``QK^T`` and forward through casts, views
and eval dropout to ``P V``. Every refusal keeps the site in the report with a reason; nothing
is rewritten unless the whole chain is understood. Torch-level (dynamo) and aten-level graphs
are read through the same table (``table.canonical``).

The site lives in "site space": the shape of the softmax input, ``[.., Q, K]`` with leading dims
``lead``. Operands and mask terms computed in another view of the same leading dims (``[B*H, ..]``
next to a ``[B, H, ..]`` softmax, as BLOOM and aten's decomposed matmuls write it) are moved into
site space by the rewrite (``split_heads``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fqn import module_path
from .masks import NEG_THRESHOLD, SCALED_MASK_LIMIT, MaskTerm, is_mask_fill
from .table import Call, canonical, constant_number, example, reads_only_metadata


@dataclass
class Operand:
    """A q/k/v input to the op: ``node`` plus the views to apply first (in this order: ``permute``,
    ``swap_last`` (transpose of the last two dims), ``split_heads`` (``unflatten(0, (-1, h))``) or
    ``merge_heads`` (``flatten(0, 1)``: a [B, H, ..] operand of a [B*H, ..] site).
    ``gqa_source`` is the un-repeated ``[B, Hk, N, D]`` tensor when a repeat_kv was undone;
    ``grouped`` means ``node`` itself is already un-repeated (the repeat sat before the transpose),
    with ``fallback`` the repeated operand to use if the other of k/v cannot be un-repeated."""

    node: Node
    swap_last: bool = False
    permute: Optional[tuple] = None
    gqa_source: Optional[Node] = None
    split_heads: Optional[int] = None
    merge_heads: bool = False
    grouped: bool = False
    fallback: Optional["Operand"] = None


@dataclass
class Match:
    """One attention site: where it is, its inputs, and why it cannot be rewritten (if so)."""

    form: str                       # "decomposed" | "sdpa"
    anchor: Node                    # the softmax or SDPA node
    output: Optional[Node] = None   # node whose uses the op replaces
    q: Optional[Operand] = None
    k: Optional[Operand] = None
    v: Optional[Operand] = None
    scale: float = 1.0
    scale_nodes: tuple = ()         # (node, "mul" | "div"): graph-computed factors (scalars or per head), folded into q
    masks: list = field(default_factory=list)   # MaskTerm, from the softmax backwards
    is_causal: bool = False
    safe_softmax: bool = False      # aten._safe_softmax: rows of all -inf give 0 (as the op does)
    reason: Optional[str] = None
    layer: str = ""
    scores_shape: Optional[tuple] = None
    scores_dtype: Optional[torch.dtype] = None
    #: the dtype softmax computes in (its ``dtype=`` argument; None = the scores' own)
    softmax_dtype: Optional[torch.dtype] = None
    #: the element-wise chain between QK^T and the masks, as a ``scoremod`` expression of the
    #: scaled score (``passes.terms``; '' = none) and the tensor nodes it reads (t0, t1, ...)
    score_mod: str = ""
    score_tensors: list = field(default_factory=list)
    #: a sliding window proven from the mask: (left, right), -1 = unbounded (see ``ScoreMods``)
    window: tuple = (-1, -1)

    def operand_shape(self, name: str) -> Optional[tuple]:
        """Shape of operand ``name`` (q, k or v) as the op receives it, before the 4-D unsqueeze:
        permuted / transposed / split into heads, and un-repeated where a repeat_kv was undone."""
        op = getattr(self, name)
        if op is None:
            return None
        val = example(op.gqa_source if op.gqa_source is not None else op.node)
        if val is None:
            return None
        shape = _operand_shape(op, val)
        if op.split_heads is not None:
            shape = (shape[0] // op.split_heads, op.split_heads) + tuple(shape[1:])
        if op.merge_heads:
            shape = (shape[0] * shape[1],) + tuple(shape[2:])
        return shape

    def refuse(self, reason: str) -> "Match":
        self.reason = reason
        return self


_PASS_THROUGH = ("cast", "contiguous")


def find_sites(graph: Graph) -> list[Match]:
    """Every softmax-attention site in ``graph`` (one level; subgraphs are handled by the caller)."""
    out = []
    for node in graph.nodes:
        call = canonical(node)
        if call is None:
            continue
        if call.name in ("softmax", "safe_softmax"):
            out.append(_decomposed(call))
        elif call.name == "sdpa":
            out.append(_sdpa(call))
    return out


# -- decomposed softmax(QK^T)V ----------------------------------------------------------------
def _decomposed(sm: Call) -> Match:
    m = Match("decomposed", sm.node, layer=module_path(sm.node), safe_softmax=sm.name == "safe_softmax")
    x = sm.get("input")
    val = example(x)
    if val is None or val.dim() < 2:
        return m.refuse("softmax input has no recorded shape (or is not a matrix)")
    m.scores_shape = tuple(val.shape)
    m.scores_dtype = val.dtype
    m.softmax_dtype = sm.get("dtype") if isinstance(sm.get("dtype"), torch.dtype) else None
    dim = sm.get("dim")
    if dim is None or dim not in (-1, val.dim() - 1):
        return m.refuse(f"softmax is over dim {dim}, not the key axis (last dim)")
    reason = _walk_scores(m, x)
    if reason:
        return m.refuse(reason)
    reason = _walk_probs(m, sm.node)
    if reason:
        return m.refuse(reason)
    return _check_shapes(m)


def value_users(node: Node) -> list[Node]:
    """Users of ``node`` that read its values (not only its dtype or shape, and not only to find
    its rows of all -inf for a safe softmax)."""
    return [u for u in node.users if not reads_only_metadata(u, node) and _safe_softmax_guard(u, node) is None]


def _safe_softmax_guard(user: Node, scores: Node) -> Optional[Node]:
    """aten's safe-softmax decomposition ``where(all(scores == -inf, -1), 0, softmax(scores))``
    (spelled with ``not(any(not(..)))`` too): for the ``scores == -inf`` user, the ``where`` node
    it guards (rows of all -inf give 0, as the op does), else None."""
    call = canonical(user)
    if call is None or call.name != "compare_eq" or call.get("input") is not scores \
            or constant_number(call.get("other")) != float("-inf"):
        return None
    node, negated, reduced = user, False, False
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        step = canonical(node)
        if step is None:
            return None
        if step.name == "not":
            negated = not negated
        elif step.name in ("any", "all") and not reduced:
            if step.get("dim") not in (-1, example(scores).dim() - 1):
                return None
            # all(eq) is "dead row"; any(not eq) is "live row"; anything else is another test
            if (step.name == "all") == negated:
                return None
            negated, reduced = step.name == "any", True
        elif step.name == "where" and reduced:
            zero, prob = (step.get("input"), step.get("other")) if not negated else (step.get("other"), step.get("input"))
            zc, pc = canonical(zero), canonical(prob)
            if pc is None or pc.name != "softmax" or pc.get("input") is not scores:
                return None
            if zc is None or zc.name not in ("full_like", "zeros_like") or \
                    (zc.name == "full_like" and constant_number(zc.get("fill_value")) != 0.0):
                return None
            return node
        else:
            return None


def _single_user(node: Node, what: str) -> Optional[str]:
    users = value_users(node)
    if len(users) != 1:
        names = ", ".join(u.name for u in users)
        return f"the {what} `{node.name}` has {len(users)} users ({names}): it escapes the attention (e.g. output_attentions), so it cannot be replaced"
    return None


def _only_user(node: Node) -> Node:
    return value_users(node)[0]


def _lead(node: Any) -> Optional[tuple]:
    val = example(node)
    return None if val is None else tuple(val.shape[:-2])


def _is_lead_view(call: Call) -> bool:
    """A reshape that keeps the last two dims and only splits / merges the leading ones."""
    src, out = example(call.get("input")), example(call.node)
    if src is None or out is None or src.dim() < 2 or out.dim() < 2:
        return False
    return _same(tuple(src.shape[-2:]), tuple(out.shape[-2:])) and statically_known_true(src.numel() == out.numel())


def _walk_scores(m: Match, x: Any) -> Optional[str]:
    """Walk from the softmax input back to QK^T, collecting scales and mask terms."""
    post_scale = 1.0   # product of the constant scale factors applied after the current point
    factors: tuple = ()  # graph-computed factors applied after the current point
    # the largest product of a run of the constant factors after the current point, in eager's
    # order: a fill times it overflowing the scores' dtype is -inf in eager (finfo.min, then * 2)
    post_peak = 1.0
    # the largest finite value on the way from a fill to the softmax: the smallest of the dtypes
    # the scores pass through after it (a float64 finfo.min is -inf once softmax(dtype=float32),
    # or a .float(), casts it)
    big = _finite_max(m.scores_dtype, m.softmax_dtype)
    lead = m.scores_shape[:-2]
    while True:
        if not isinstance(x, Node):
            return "softmax input is not a tensor computed in the graph"
        why = _single_user(x, "attention scores")
        if why:
            return why
        value = example(x)
        if value is not None:
            big = min(big, _finite_max(value.dtype))
        call = canonical(x)
        if call is None:
            return _score_chain(m, x, post_scale, factors)
        name = call.name

        def term(node: Any, kind: str, coef: float = 1.0, fill: float = float("-inf"), first: float = 1.0) -> None:
            view = tuple(lead) if tuple(lead) != tuple(m.scores_shape[:-2]) else None
            m.masks.append(MaskTerm(node, kind, coef, fill, factors, view, max(1.0, abs(first) * post_peak), big))

        if name in ("matmul", "einsum"):
            m.scale = post_scale
            m.scale_nodes = factors
            return _scores_operands(m, call)
        if name == "baddbmm":
            # beta * bias + alpha * (a @ b)
            beta, alpha = constant_number(call.get("beta", 1.0)), constant_number(call.get("alpha", 1.0))
            if beta is None or alpha is None:
                return "baddbmm on the scores with a beta or alpha that is not a constant"
            if not alpha > 0:
                return f"the scores are scaled by alpha={alpha}, not a positive number"
            if isinstance(call.get("bias"), Node) and beta != 0:
                term(call.get("bias"), "additive", post_scale * beta, first=beta)
            m.scale = post_scale * alpha
            m.scale_nodes = factors
            return _scores_operands(m, Call("matmul", {"a": call.get("a"), "b": call.get("b")}, x))
        if name in _PASS_THROUGH:
            x = call.get("input")
            continue
        if name == "reshape" and _is_lead_view(call):
            lead = _lead(call.get("input"))
            x = call.get("input")
            continue
        if name in ("mul", "div", "add", "sub") and _both_scores(m, call):
            # s * sigmoid(s), s + f(s): one element-wise chain over the scores
            return _score_chain(m, x, post_scale, factors)
        if name in ("mul", "div"):
            a, b = call.get("input"), call.get("other")
            chain, factor = (a, b) if a is _prev(m, a, b) else (b, a)
            if name == "div" and chain is not a:
                return _score_chain(m, x, post_scale, factors)     # c / scores: an element-wise chain
            number = constant_number(factor)
            if number is not None:
                number = 1.0 / number if name == "div" else number
                if not number > 0:
                    return f"the scores are scaled by {number}, not a positive number"
                post_scale *= number
                post_peak = max(1.0, number * post_peak)
            elif _is_scale_tensor(factor, lead):
                val = example(factor)
                if val is not None and val.numel() != 1 and tuple(lead) != tuple(m.scores_shape[:-2]):
                    return "a per-head scale applied in a reshaped view of the scores is not supported"
                # a symbolic, tensor-valued or per-head scale: folded into q (s q.k == (s q).k)
                factors += ((factor, name),)
            else:
                return f"the scores are multiplied by a tensor of shape {_shape(factor)} (not a scalar or per-head scale)"
            x = chain
            continue
        if name in ("add", "sub"):
            # add(input, other, alpha) = input + alpha * other; sub likewise with a minus
            a, b = call.get("input"), call.get("other")
            chain, mask = (a, b) if a is _prev(m, a, b) else (b, a)
            alpha = constant_number(call.get("alpha", 1.0))
            if alpha is None:
                return f"torch.{name} on the scores with a non-constant alpha"
            if name == "sub" and chain is not a:
                return _score_chain(m, x, post_scale, factors)     # c - scores: an element-wise chain
            if chain is b:
                if not alpha > 0:
                    return f"the scores are scaled by alpha={alpha}, not a positive number"
                mask_coef, post_scale = post_scale, post_scale * alpha
                mask_first, post_peak = 1.0, max(1.0, alpha * post_peak)
            else:
                mask_coef = post_scale * alpha * (-1.0 if name == "sub" else 1.0)
                mask_first = alpha
            if isinstance(mask, Node) and constant_number(mask) is None:
                term(mask, "additive", mask_coef, first=mask_first)
            x = chain  # (adding a constant does not change softmax)
            continue
        # a fill masks when it is very negative and stays so once the constant scales after it
        # apply (masked_fill(m, -1e4) followed by * 1e-3 leaves -10: a number, not a mask)
        if name == "masked_fill":
            value = constant_number(call.get("value"))
            if not is_mask_fill(value, post_scale):
                return (f"masked_fill on the scores with {_describe(call.get('value'))} (then scaled by {post_scale:g}) "
                        f"is not a mask (needs -inf, or a fill <= {NEG_THRESHOLD:g} that stays <= {SCALED_MASK_LIMIT:g} once scaled)")
            term(call.get("mask"), "masked", coef=post_scale, fill=value)
            x = call.get("input")
            continue
        if name == "where":
            cond, a, b = call.get("condition"), call.get("input"), call.get("other")
            na, nb = constant_number(a), constant_number(b)
            if is_mask_fill(nb, post_scale) and isinstance(a, Node):
                term(cond, "keep", coef=post_scale, fill=nb)
                x = a
                continue
            if is_mask_fill(na, post_scale) and isinstance(b, Node):
                term(cond, "masked", coef=post_scale, fill=na)
                x = b
                continue
            return (f"torch.where on the scores is not a mask (needs a fill of -inf, or <= {NEG_THRESHOLD:g} that "
                    f"stays <= {SCALED_MASK_LIMIT:g} once scaled by {post_scale:g})")
        return _score_chain(m, x, post_scale, factors)


def _finite_max(*dtypes) -> float:
    """The smallest ``finfo.max`` of the floating ``dtypes`` (float32's when there is none)."""
    floats = [torch.finfo(d).max for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return min(floats) if floats else torch.finfo(torch.float32).max


def _both_scores(m: Match, call: Call) -> bool:
    """Do both operands of the binary op ``call`` read the scores?"""
    from .terms import find_root

    qk = tuple(m.scores_shape[-2:])
    return all(isinstance(x, Node) and find_root(x, qk)[0] is not None for x in (call.get("input"), call.get("other")))


def _score_chain(m: Match, top: Node, post_scale: float, factors: tuple) -> Optional[str]:
    """The scores reach ``top``, an op that is not a scale, mask or cast: read the chain from QK^T
    up to it as a score modification (``passes.terms``), or say which op is not element-wise."""
    from .terms import lift_chain

    chain, reason = lift_chain(top, tuple(m.scores_shape[-2:]), len(m.scores_shape), post_scale, factors,
                               lambda node, path: all(u in path for u in value_users(node)))
    if chain is None:
        return reason
    m.score_mod, m.score_tensors, m.scale, m.scale_nodes = chain.text, chain.captured, chain.scale, ()
    call = canonical(chain.root)
    if call.name == "baddbmm":   # its bias is inside the expression
        call = Call("matmul", {"a": call.get("a"), "b": call.get("b")}, chain.root)
    return _scores_operands(m, call)


_CHAIN_OPS = ("matmul", "einsum", "baddbmm", "mul", "div", "add", "sub", "masked_fill", "where", "reshape") + _PASS_THROUGH


def _prev(m: Match, a: Any, b: Any) -> Any:
    """Which argument ``a`` or ``b`` of a binary op on the scores continues the score chain: the
    one from which single-user scale/mask/cast steps lead back to a matmul (the other is a mask or
    a factor); else the one computed from the scores through other element-wise ops (``20 *
    tanh(s / 20)``: the chain is the tanh, whichever side it is written on)."""
    if _leads_to_scores(a):
        return a
    if _leads_to_scores(b):
        return b
    from .terms import find_root

    qk = tuple(m.scores_shape[-2:])
    if not (isinstance(a, Node) and find_root(a, qk)[0] is not None) and isinstance(b, Node) \
            and find_root(b, qk)[0] is not None:
        return b
    return a


def _leads_to_scores(node: Any, depth: int = 16) -> bool:
    call = canonical(node)
    if call is None or depth == 0 or call.name not in _CHAIN_OPS or len(value_users(call.node)) != 1:
        return False
    if call.name in ("matmul", "einsum", "baddbmm"):
        return True
    if call.name in _PASS_THROUGH or call.name in ("masked_fill", "reshape"):
        return _leads_to_scores(call.get("input"), depth - 1)
    return _leads_to_scores(call.get("input"), depth - 1) or _leads_to_scores(call.get("other"), depth - 1)


def _is_scale_tensor(node: Any, lead: tuple) -> bool:
    """A factor that scales whole (batch, head) score matrices: a symbolic number, a one-element
    tensor, or a tensor whose last two dims are 1 and that broadcasts over the leading dims."""
    if not isinstance(node, Node):
        return False
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, (torch.SymFloat, torch.SymInt)):
        return True
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return False
    if val.numel() == 1:
        return True
    if val.dim() < 2 or tuple(val.shape[-2:]) != (1, 1) or val.dim() - 2 > len(lead):
        return False
    head = tuple(val.shape[:-2])
    return all(statically_known_true(h == 1) or _same((h,), (l,)) for h, l in zip(reversed(head), reversed(lead)))


def _scores_operands(m: Match, call: Call) -> Optional[str]:
    if call.name == "einsum":
        return _einsum_scores(m, call)
    a, b = call.get("a"), call.get("b")
    b = _peel_constant_scale(m, b)
    if _is_last_two_transpose(a):
        return "the left operand of QK^T is transposed on its last two dims: attention over channels (q^T k), not over tokens"
    k = _untranspose(b)
    if k is None:
        k = _grouped_key(b)
    if k is None and _key_transposed(b):
        k = Operand(b, swap_last=True)
    if k is None:
        return "the key operand of QK^T is not a transpose of the last two dims of a tensor, so the token axis is unknown"
    m.q, m.k = Operand(a), k
    return None


def _key_transposed(node: Any, depth: int = 8) -> bool:
    """Is ``node`` a key transposed on its last two dims, possibly then scaled by a scalar and/or
    reshaped to merge its leading dims ([B, H, D, N] -> [B*H, D, N]: older BLOOM's
    ``k.permute(0, 2, 3, 1).reshape(B*H, D, N)``)? The transpose is the evidence that the last
    axis holds the tokens; neither a scalar factor nor merging leading dims moves it."""
    if depth == 0 or not isinstance(node, Node):
        return False
    if _untranspose(node) is not None or _grouped_key(node) is not None:
        return True
    call = canonical(node)
    if call is not None and (call.name == "contiguous" or (call.name == "reshape" and _is_lead_view(call))):
        return _key_transposed(call.get("input"), depth - 1)
    if call is not None and call.name in ("mul", "div"):
        pairs = [(call.get("input"), call.get("other"))]
        if call.name == "mul":
            pairs.append((call.get("other"), call.get("input")))
        return any(isinstance(chain, Node) and (constant_number(factor) is not None or _is_scale_tensor(factor, ()))
                   and _key_transposed(chain, depth - 1) for chain, factor in pairs)
    return False


def _peel_constant_scale(m: Match, node: Any) -> Any:
    """``K^T * c`` (aten's SDPA decomposition scales both operands): fold c into the scale."""
    while True:
        call = canonical(node)
        if call is None or call.name not in ("mul", "div") or len(value_users(node)) != 1:
            return node
        c = constant_number(call.get("other"))
        if c is None or not c > 0 or not isinstance(call.get("input"), Node):
            return node
        m.scale *= (1.0 / c) if call.name == "div" else c
        node = call.get("input")


def _grouped_key(b: Any) -> Optional[Operand]:
    """``repeat_kv(K^T)``: a key transposed (or permuted) BEFORE the grouped-query repeat."""
    rep = _repeat_source(b)
    if rep is None:
        return None
    inner = _untranspose(rep[0])
    if inner is None:
        return None
    inner.grouped = True
    inner.fallback = Operand(b, swap_last=True)
    return inner


def _as_permutation(node: Any) -> Optional[tuple]:
    """``(source, perm)`` when ``node`` is ``source`` transposed / permuted (``.mT`` included)."""
    call = canonical(node)
    val = example(node)
    if call is None or val is None or call.name not in ("transpose", "permute"):
        return None
    rank = val.dim()
    if call.name == "permute":
        perm = tuple(p % rank for p in call.get("dims", ()) if isinstance(p, int))
        return (call.get("input"), perm) if sorted(perm) == list(range(rank)) else None
    d0, d1 = call.get("dim0"), call.get("dim1")
    if not isinstance(d0, int) or not isinstance(d1, int):
        return None
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return call.get("input"), tuple(perm)


def _is_last_two_transpose(node: Any) -> bool:
    """Does ``node`` move its source's last axis away from the last position (q^T)?"""
    found = _as_permutation(node)
    return found is not None and found[1][-1] != len(found[1]) - 1


def _untranspose(node: Any) -> Optional[Operand]:
    """If ``node`` = X permuted so that its last two axes are swapped relative to some K
    (``node = K^T``), the operand that yields K: X itself, or X with the complementary permute."""
    found = _as_permutation(node)
    if found is None:
        return None
    src, perm = found
    rank = len(perm)
    if perm[-1] == rank - 1:
        return None  # the contracted axis of the key operand did not move: not a transpose of K
    if perm == tuple(range(rank - 2)) + (rank - 1, rank - 2):
        return Operand(src)
    return Operand(src, permute=perm[:-2] + (perm[-1], perm[-2]))


def _einsum_scores(m: Match, call: Call) -> Optional[str]:
    eq, ops = call.get("equation"), call.get("operands")
    parsed = _parse_einsum(eq, 2)
    if parsed is None or len(ops) != 2:
        return f"einsum {eq!r} is not a two-operand contraction we understand"
    (sa, sb), so = parsed
    if len(so) < 2:
        return f"einsum {eq!r} does not produce a [.., Q, K] score matrix"
    x, y, batch = so[-2], so[-1], so[:-2]
    for first, second, qa, kb in ((sa, sb, ops[0], ops[1]), (sb, sa, ops[1], ops[0])):
        if len(first) >= 2 and first[-2] == x and first[:-2] == batch:
            c = first[-1]
            if c in so or second[:-2] != batch:
                continue
            if second[-2:] == y + c:
                m.q, m.k = Operand(qa), Operand(kb)
                return None
            if second[-2:] == c + y:
                m.q, m.k = Operand(qa), Operand(kb, swap_last=True)
                return None
    return f"einsum {eq!r} is not q k^T over the last axis of both operands"


def _parse_einsum(eq: str, n: int):
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != n:
        return None
    return parts, out


def _walk_probs(m: Match, sm: Node) -> Optional[str]:
    """Walk from softmax forward through casts, views and eval dropout to P V."""
    p = sm
    while True:
        why = _single_user(p, "attention probabilities")
        if why:
            return why
        user = _only_user(p)
        call = canonical(user)
        if call is None:
            return f"the probabilities pass through `{_describe(user)}` before P V"
        name = call.name
        if name in ("expand", "reshape"):
            folded = _decomposed_pv(p, user)
            if folded is not None:
                m.v, m.output = Operand(folded.get("b")), folded.node
                return None
        if name in _PASS_THROUGH or (name == "reshape" and _is_lead_view(call)):
            p = user
            continue
        if name == "where" and _guards_rows_of(user, sm):
            m.safe_softmax = True   # rows of all -inf give 0: what the op does
            p = user
            continue
        if name == "dropout":
            prob = call.get("p", 0.5)
            training = call.get("training", call.get("train", True))
            if prob == 0 or prob == 0.0 or training is False:
                p = user
                continue
            return f"attention dropout is active (p={prob}, training): rewriting would drop it"
        if name == "matmul":
            if call.get("a") is not p:
                return "the probabilities are the right operand of the output matmul (V^T P^T form)"
            m.v, m.output = Operand(call.get("b")), user
            return None
        if name == "einsum":
            return _einsum_pv(m, call, p)
        if name in ("mul", "div"):
            return f"the probabilities are multiplied by `{_describe(call.get('other'))}` (e.g. a head mask) before P V"
        return f"the probabilities pass through `{name}` before P V"


def _guards_rows_of(where: Node, sm: Node) -> bool:
    """Is ``where`` the zeroing step of a safe softmax of ``sm``'s input?"""
    scores = canonical(sm).get("input")
    return any(_safe_softmax_guard(u, scores) is where for u in scores.users)


def _decomposed_pv(p: Node, first: Node) -> Optional[Call]:
    """aten's ``view(bmm(view(expand(p)), ..))``: the canonical matmul it spells, if ``p`` is its left operand."""
    node = first
    for _ in range(3):
        users = value_users(node)
        if len(users) != 1:
            return None
        node = users[0]
        call = canonical(node)
        if call is not None and call.name == "matmul" and call.get("a") is p and call.node is not first:
            return call
    return None


def _einsum_pv(m: Match, call: Call, p: Node) -> Optional[str]:
    eq, ops = call.get("equation"), call.get("operands")
    parsed = _parse_einsum(eq, 2)
    if parsed is None or len(ops) != 2 or ops[0] is not p:
        return f"einsum {eq!r} is not P V with P first"
    (sp, sv), so = parsed
    if len(sp) < 2 or len(so) != len(sp) or so[:-1] != sp[:-1]:
        return f"einsum {eq!r} is not P V"
    y, e = sp[-1], so[-1]
    if sv[:-2] != sp[:-2]:
        return f"einsum {eq!r}: batch axes of P and V differ"
    if sv[-2:] == y + e:
        m.v, m.output = Operand(ops[1]), call.node
        return None
    if sv[-2:] == e + y:
        m.v, m.output = Operand(ops[1], swap_last=True), call.node
        return None
    return f"einsum {eq!r} is not P V over the key axis"


# -- F.scaled_dot_product_attention ----------------------------------------------------------
def _sdpa(call: Call) -> Match:
    m = Match("sdpa", call.node, output=call.node, layer=module_path(call.node))
    if not isinstance(call.node.meta.get("val", call.node.meta.get("example_value")), torch.Tensor):
        # a fused kernel returning (output, logsumexp, ..): the site's output is its item 0
        outputs = [u for u in call.node.users if u.op == "call_function" and u.target is operator.getitem]
        first = [u for u in outputs if u.args[1] == 0]
        if len(first) != 1 or len(outputs) != len(call.node.users) or any(u.users for u in outputs if u.args[1] != 0):
            return m.refuse("the fused SDPA kernel's other outputs (logsumexp, ..) are used (e.g. saved for the "
                            "backward), so it cannot be replaced")
        m.output = first[0]
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    qv = example(q)
    if qv is not None and example(k) is not None:
        m.scores_shape = tuple(qv.shape[:-1]) + (example(k).shape[-2],)
        m.scores_dtype = qv.dtype
    dropout = call.get("dropout_p", 0.0)
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        return m.refuse(f"SDPA dropout_p={dropout!r} is not 0: rewriting would drop it")
    scale = call.get("scale")
    if scale is None:
        if qv is None or not isinstance(qv.shape[-1], int):
            return m.refuse("SDPA without scale and with a symbolic head_dim")
        scale = 1.0 / math.sqrt(qv.shape[-1])
    elif constant_number(scale) is None:
        return m.refuse("SDPA scale is not a constant")
    m.scale = float(constant_number(scale))
    is_causal = call.get("is_causal", False)
    if not isinstance(is_causal, bool):
        return m.refuse("SDPA is_causal is not a constant")
    m.is_causal = is_causal
    mask = call.get("attn_mask")
    if mask is not None:
        mv = example(mask)
        kind = "keep" if mv is not None and mv.dtype == torch.bool else "additive"
        m.masks.append(MaskTerm(mask, kind))
    m.q, m.k, m.v = Operand(q), Operand(k), Operand(v)
    return _check_shapes(m)


# -- shared checks -----------------------------------------------------------------------------
def _check_shapes(m: Match) -> Match:
    if m.scores_shape is None:
        return m.refuse("the scores have no recorded shape")
    site_rank = len(m.scores_shape)
    if site_rank not in (2, 3, 4):
        return m.refuse(f"attention of rank {site_rank} (only [N, D], [BH, N, D] and [B, H, N, D] are rewritten)")
    lead = tuple(m.scores_shape[:-2])
    shapes = {}
    for name in ("q", "k", "v"):
        op = getattr(m, name)
        val = example(op.node)
        if val is None:
            return m.refuse("q/k/v have no recorded shapes")
        shape = _operand_shape(op, val)
        why = _place_operand(op, shape, lead, name)
        if why:
            return m.refuse(why)
        if op.split_heads is not None:
            shape = (shape[0] // op.split_heads if isinstance(shape[0], int) else shape[0], op.split_heads) + shape[1:]
        if op.merge_heads:
            shape = (shape[0] * shape[1],) + shape[2:]
        shapes[name] = shape
    q, k, v = (example(getattr(m, n).node) for n in ("q", "k", "v"))
    if not (q.dtype == k.dtype == v.dtype):
        return m.refuse(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    qs, ks, vs = shapes["q"], shapes["k"], shapes["v"]
    if len(ks) != len(qs) or len(vs) != len(qs):
        return m.refuse("q, k, v ranks differ")
    rank = len(qs)
    if rank == 4:
        if not _same(qs[:1], ks[:1]) or not _same(ks[:1], vs[:1]):
            return m.refuse(f"q and k batch dims differ ({tuple(qs)} vs {tuple(ks)}): broadcast batch is not rewritten")
        if not m.k.grouped and (not _divides(ks[1], qs[1]) or not _same(ks[1:2], vs[1:2])):
            return m.refuse(f"key/value heads ({ks[1]}, {vs[1]}) do not divide query heads ({qs[1]})")
    elif not (_same(ks[:-2], qs[:-2]) and _same(vs[:-2], qs[:-2])):
        return m.refuse("q, k, v leading dims differ")
    # QK^T and PV ran in eager, so these sizes are equal at run time even when two symbols spell
    # them (a dynamic KV cache): refuse only what is provably different
    if _differ(ks[-1], qs[-1]):
        return m.refuse(f"q and k head_dim differ ({qs[-1]} vs {ks[-1]})")
    if _differ(ks[-2], vs[-2]):
        return m.refuse(f"k and v sequence lengths differ ({ks[-2]} vs {vs[-2]})")
    for term in m.masks:
        split = term.lead
        if split is not None and not _term_placeable(term, split, lead):
            return m.refuse(f"a mask term of shape {_shape(term.node)} is added in a [{', '.join(map(str, split))}, ..] view of the scores that cannot be moved to [{', '.join(map(str, lead))}, ..]")
    _find_gqa(m)
    if m.k.grouped and m.v.gqa_source is None:
        m.k = m.k.fallback
    return m


def _divides(small: Any, big: Any) -> bool:
    try:
        return statically_known_true(big % small == 0)
    except ZeroDivisionError:
        return False


def _place_operand(op: Operand, shape: tuple, lead: tuple, name: str) -> Optional[str]:
    """Check that operand ``shape`` lives in site space, or in its [B*H, ..] view (set split_heads),
    or is the [B, H, ..] tensor of a [B*H, ..] site (set merge_heads: aten's decomposed matmul reads
    ``bmm(q.reshape(B*H, ..), ..)`` of a 4-D q as a 4-D matmul, and the softmax may be in 3-D)."""
    olead = tuple(shape[:-2])
    if len(olead) == len(lead):
        return None
    if len(lead) == 2 and len(olead) == 1 and isinstance(lead[1], int) and _same(olead, (lead[0] * lead[1],)):
        op.split_heads = lead[1]
        return None
    if len(lead) == 1 and len(olead) == 2 and _same((olead[0] * olead[1],), lead):
        op.merge_heads = True
        return None
    return f"{name} of shape {tuple(shape)} is not in the scores' [{', '.join(map(str, lead))}, ..] layout or its [B*H, ..] view"


def _term_placeable(term: MaskTerm, term_lead: tuple, lead: tuple) -> bool:
    """Can a mask term added in the ``term_lead`` view of the scores move to the site's ``lead``?
    Either the site is [B, H, ..] and the term was added in its [B*H, ..] view (the rewrite
    unflattens it), or the site is [B*H, ..] and the term was added in a [B, H, ..] view (the
    rewrite broadcasts it over B and H, then merges them)."""
    val = example(term.node)
    if val is None:
        return False
    if len(lead) == 2 and len(term_lead) == 1 and isinstance(lead[1], int):
        if val.dim() < 3 or statically_known_true(val.shape[-3] == 1):
            return True
        return _same((val.shape[-3],), term_lead) and val.dim() == 3
    if len(lead) == 1 and len(term_lead) == 2 and all(isinstance(x, int) for x in term_lead) \
            and _same((term_lead[0] * term_lead[1],), lead) and val.dim() <= 4:
        head = tuple(val.shape[:-2])
        return all(statically_known_true(x == 1) or _same((x,), (y,)) for x, y in zip(reversed(head), reversed(term_lead)))
    return False


def _differ(a: Any, b: Any) -> bool:
    """Sizes provably different (symbolic sizes compared without adding guards)."""
    return statically_known_true(a != b)


def _same(a: tuple, b: tuple) -> bool:
    """Shapes provably equal (symbolic sizes compared without adding guards)."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def _operand_shape(op: Operand, val: torch.Tensor) -> tuple:
    shape = tuple(val.shape)
    if op.permute is not None:
        shape = tuple(shape[i] for i in op.permute)
    if op.swap_last:
        shape = shape[:-2] + (shape[-1], shape[-2])
    return shape


def _find_gqa(m: Match) -> None:
    """Undo ``repeat_kv`` (expand + reshape, or repeat_interleave) on k and v, if both have it."""
    if len(m.scores_shape) != 4 or m.q.split_heads is not None or m.q.merge_heads:
        return
    found = []
    for op in (m.k, m.v):
        if op.grouped:
            found.append(("grouped", None))
            continue
        if op.swap_last or op.permute or op.split_heads is not None:
            found.append(None)
            continue
        found.append(_repeat_source(op.node))
    ks, vs = found
    if ks is None or vs is None:
        return
    if ks[0] == "grouped":
        if vs[0] != "grouped":
            m.v.gqa_source = vs[0]
        return
    if vs[0] == "grouped" or ks[1] != vs[1]:
        return
    m.k.gqa_source, m.v.gqa_source = ks[0], vs[0]


def _repeat_source(node: Node) -> Optional[tuple]:
    call = canonical(node)
    val = example(node)
    if call is None or val is None or val.dim() != 4:
        return None
    if call.name == "repeat_interleave":
        src, reps, dim = call.get("input"), call.get("repeats"), call.get("dim")
        sv = example(src)
        if isinstance(reps, int) and dim in (1, -3) and sv is not None and sv.dim() == 4:
            return src, reps
        return None
    if call.name != "reshape":
        return None
    exp = canonical(call.get("input"))
    if exp is not None and exp.name == "contiguous":   # aten: view(clone(expand(..)))
        exp = canonical(exp.get("input"))
    if exp is None or exp.name != "expand":
        return None
    ev = example(exp.node)
    ins = canonical(exp.get("input"))
    if ev is None or ev.dim() != 5 or ins is None:
        return None
    src = None
    if ins.name == "getitem":
        idx = ins.get("index")
        full = slice(None, None, None)
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None \
                and all(i == full or i is Ellipsis for i in idx[:2] + idx[3:]):
            src = ins.get("input")
    elif ins.name == "unsqueeze" and ins.get("dim") in (2, -3):
        src = ins.get("input")
    sv = example(src)
    if src is None or sv is None or sv.dim() != 4:
        return None
    groups = ev.shape[2]
    if not _same(tuple(val.shape), (sv.shape[0], sv.shape[1] * groups, sv.shape[2], sv.shape[3])):
        return None
    return src, groups


def _describe(node: Any) -> str:
    if not isinstance(node, Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _shape(node: Any) -> Any:
    val = example(node)
    return tuple(val.shape) if val is not None else "?"
