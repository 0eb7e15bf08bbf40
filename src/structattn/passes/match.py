"""Find attention sites in a dynamo FX graph: decomposed softmax(QK^T)V and SDPA calls.

The matcher anchors on ``softmax`` (or an SDPA call), walks back through the score chain (casts,
scale, masks) to ``QK^T`` and forward through casts and eval dropout to ``P V``. Every refusal keeps
the site in the report with a reason; nothing is rewritten unless the whole chain is understood.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fqn import module_path
from .masks import NEG_THRESHOLD, MaskTerm
from .table import Call, canonical, constant_number, example


@dataclass
class Operand:
    """A q/k/v input to the op: ``node`` plus a view to apply first (transpose, repeat_kv undone)."""

    node: Node
    swap_last: bool = False          # insert .transpose(-2, -1)
    permute: Optional[tuple] = None  # insert .permute(perm)
    gqa_source: Optional[Node] = None  # un-repeated [B, Hk, N, D] tensor, if repeat_kv was found


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
    scale_nodes: tuple = ()         # (node, "mul" | "div"): graph-computed scale factors, folded into q
    masks: list = field(default_factory=list)   # MaskTerm
    is_causal: bool = False
    reason: Optional[str] = None
    layer: str = ""
    scores_shape: Optional[tuple] = None

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
        if call.name == "softmax":
            out.append(_decomposed(call))
        elif call.name == "sdpa":
            out.append(_sdpa(call))
    return out


# -- decomposed softmax(QK^T)V ----------------------------------------------------------------
def _decomposed(sm: Call) -> Match:
    m = Match("decomposed", sm.node, layer=module_path(sm.node))
    x = sm.get("input")
    val = example(x)
    if val is None or val.dim() < 2:
        return m.refuse("softmax input has no recorded shape (or is not a matrix)")
    m.scores_shape = tuple(val.shape)
    dim = sm.get("dim")
    if dim is None or dim not in (-1, val.dim() - 1):
        return m.refuse(f"softmax is over dim {dim}, not the key axis (last dim)")
    reason = _walk_scores(m, x, sm.node)
    if reason:
        return m.refuse(reason)
    reason = _walk_probs(m, sm.node)
    if reason:
        return m.refuse(reason)
    return _check_shapes(m)


def _single_user(node: Node, what: str) -> Optional[str]:
    if len(node.users) != 1:
        users = ", ".join(u.name for u in node.users)
        return f"the {what} `{node.name}` has {len(node.users)} users ({users}): it escapes the attention (e.g. output_attentions), so it cannot be replaced"
    return None


def _walk_scores(m: Match, x: Any, consumer: Node) -> Optional[str]:
    """Walk from the softmax input back to QK^T, collecting scale and masks."""
    post_scale = 1.0   # product of the scale factors applied after the current point
    while True:
        if not isinstance(x, Node):
            return "softmax input is not a tensor computed in the graph"
        why = _single_user(x, "attention scores")
        if why:
            return why
        call = canonical(x)
        if call is None:
            return f"the scores pass through `{_describe(x)}`, which is not a scale, mask or cast"
        name = call.name
        if name in ("matmul", "einsum"):
            m.scale = post_scale
            return _scores_operands(m, call)
        if name in _PASS_THROUGH:
            x = call.get("input")
            continue
        if name in ("mul", "div"):
            a, b = call.get("input"), call.get("other")
            chain, factor = (a, b) if a is _prev(x, a, b) else (b, a)
            if name == "div" and chain is not a:
                return "the scores are a divisor (c / scores), not scaled"
            number = constant_number(factor)
            if number is not None:
                number = 1.0 / number if name == "div" else number
                if not number > 0:
                    return f"the scores are scaled by {number}, not a positive number"
                post_scale *= number
            elif _is_scalar(factor):
                # a symbolic or tensor-valued scale: folded into q (softmax(s q.k) is the same)
                m.scale_nodes += ((factor, name),)
            else:
                return f"the scores are multiplied by a tensor of shape {_shape(factor)} (not a scalar scale)"
            x = chain
            continue
        if name == "add":
            if "alpha" in call.args:
                return "torch.add with alpha on the scores is not supported"
            a, b = call.get("input"), call.get("other")
            chain, mask = (a, b) if a is _prev(x, a, b) else (b, a)
            if not isinstance(mask, Node):
                x = chain  # adding a constant does not change softmax
                continue
            if m.scale_nodes:
                return "an additive mask applied before a scale computed in the graph is not supported"
            m.masks.append(MaskTerm(mask, "additive", post_scale))
            x = chain
            continue
        if name == "masked_fill":
            value = constant_number(call.get("value"))
            if value is None or value > NEG_THRESHOLD:
                return f"masked_fill on the scores with {call.get('value')!r} is not a mask (needs -inf or a very negative number)"
            m.masks.append(MaskTerm(call.get("mask"), "masked"))
            x = call.get("input")
            continue
        if name == "where":
            cond, a, b = call.get("condition"), call.get("input"), call.get("other")
            na, nb = constant_number(a), constant_number(b)
            if nb is not None and nb <= NEG_THRESHOLD and isinstance(a, Node):
                m.masks.append(MaskTerm(cond, "keep"))
                x = a
                continue
            if na is not None and na <= NEG_THRESHOLD and isinstance(b, Node):
                m.masks.append(MaskTerm(cond, "masked"))
                x = b
                continue
            return "torch.where on the scores does not fill with -inf or a very negative number"
        return f"the scores pass through `{name}` ({_describe(x)}), which is not elementwise scale/mask"


_CHAIN_OPS = ("matmul", "einsum", "mul", "div", "add", "masked_fill", "where") + _PASS_THROUGH


def _prev(x: Node, a: Any, b: Any) -> Any:
    """Which argument of the binary op ``x`` continues the score chain: the one from which
    single-user scale/mask/cast steps lead back to a matmul (the other is a mask or a factor)."""
    if _leads_to_scores(a):
        return a
    if _leads_to_scores(b):
        return b
    return a


def _leads_to_scores(node: Any, depth: int = 12) -> bool:
    call = canonical(node)
    if call is None or depth == 0 or call.name not in _CHAIN_OPS or len(call.node.users) != 1:
        return False
    if call.name in ("matmul", "einsum"):
        return True
    if call.name in _PASS_THROUGH or call.name == "masked_fill":
        return _leads_to_scores(call.get("input"), depth - 1)
    if call.name == "where":
        return _leads_to_scores(call.get("input"), depth - 1) or _leads_to_scores(call.get("other"), depth - 1)
    return _leads_to_scores(call.get("input"), depth - 1) or _leads_to_scores(call.get("other"), depth - 1)


def _is_scalar(node: Any) -> bool:
    """A one-element tensor or a symbolic number (dynamo's dynamic float attributes)."""
    if not isinstance(node, Node):
        return False
    val = node.meta.get("example_value")
    if isinstance(val, (torch.SymFloat, torch.SymInt)):
        return True
    return isinstance(val, torch.Tensor) and val.numel() == 1


def _scores_operands(m: Match, call: Call) -> Optional[str]:
    if call.name == "einsum":
        return _einsum_scores(m, call)
    a, b = call.get("a"), call.get("b")
    if _is_last_two_transpose(a):
        return "the left operand of QK^T is transposed on its last two dims: attention over channels (q^T k), not over tokens"
    k = _untranspose(b)
    if k is None:
        return "the key operand of QK^T is not a transpose of the last two dims of a tensor, so the token axis is unknown"
    m.q, m.k = Operand(a), k
    return None


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
    """Walk from softmax forward through casts and eval dropout to P V."""
    p = sm
    while True:
        why = _single_user(p, "attention probabilities")
        if why:
            return why
        user = next(iter(p.users))
        call = canonical(user)
        if call is None:
            return f"the probabilities pass through `{_describe(user)}` before P V"
        name = call.name
        if name in _PASS_THROUGH:
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
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    qv = example(q)
    if qv is not None and example(k) is not None:
        m.scores_shape = tuple(qv.shape[:-1]) + (example(k).shape[-2],)
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
    m.scale = float(scale)
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
    q, k, v = (example(o.node) for o in (m.q, m.k, m.v))
    if q is None or k is None or v is None:
        return m.refuse("q/k/v have no recorded shapes")
    if not (q.dtype == k.dtype == v.dtype):
        return m.refuse(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() not in (2, 3, 4):
        return m.refuse(f"attention of rank {q.dim()} (only [N, D], [BH, N, D] and [B, H, N, D] are rewritten)")
    kshape = _operand_shape(m.k, k)
    vshape = _operand_shape(m.v, v)
    if len(kshape) != q.dim() or len(vshape) != q.dim():
        return m.refuse("q, k, v ranks differ")
    lead = q.dim() - 3 if q.dim() == 4 else q.dim() - 2
    if not _same(q.shape[:lead], kshape[:lead]):
        return m.refuse(f"q and k batch dims differ ({tuple(q.shape)} vs {tuple(kshape)}): broadcast batch is not rewritten")
    if q.dim() == 4 and (q.shape[1] % kshape[1] != 0 or kshape[1] != vshape[1]):
        return m.refuse(f"key/value heads ({kshape[1]}, {vshape[1]}) do not divide query heads ({q.shape[1]})")
    if q.dim() < 4 and not (_same(kshape[:-2], q.shape[:-2]) and _same(vshape[:-2], q.shape[:-2])):
        return m.refuse("q, k, v leading dims differ")
    if not _same(kshape[-2:-1], vshape[-2:-1]):
        return m.refuse("k and v sequence lengths differ")
    _find_gqa(m)
    return m


def _same(a: tuple, b: tuple) -> bool:
    """Shapes provably equal (symbolic sizes compared without adding guards)."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def _operand_shape(op: Operand, val: torch.Tensor) -> tuple:
    shape = tuple(val.shape)
    if op.swap_last:
        shape = shape[:-2] + (shape[-1], shape[-2])
    if op.permute is not None:
        shape = tuple(shape[i] for i in op.permute)
    return shape


def _find_gqa(m: Match) -> None:
    """Undo ``repeat_kv`` (expand + reshape, or repeat_interleave) on k and v, if both have it."""
    if example(m.q.node).dim() != 4 or m.k.swap_last or m.k.permute or m.v.swap_last or m.v.permute:
        return
    ks, vs = _repeat_source(m.k.node), _repeat_source(m.v.node)
    if ks is None or vs is None or ks[1] != vs[1]:
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
        if isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None and all(i == full for i in idx[:2] + idx[3:]):
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
