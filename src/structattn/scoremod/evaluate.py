"""Evaluate a score-modification expression on torch tensors (the CPU path and the oracle)."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .expr import BinOp, BoolOp, Call, Const, Load, Neg, Node, Not, Var, parse

Value = Union[torch.Tensor, int, float, bool]

_UNARY = {
    "tanh": torch.tanh, "exp": torch.exp, "log": torch.log, "abs": torch.abs, "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid, "floor": torch.floor, "ceil": torch.ceil,
}


def apply_score_mod(text: str, s: torch.Tensor, *, b, h, q, k, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logits ``text`` makes of the scaled scores ``s``; ``b h q k`` are int64 index tensors
    (or ints) broadcastable against ``s`` (batch, query head, query and key positions)."""
    if not text:
        return s
    out = evaluate(parse(text), {"s": s, "b": b, "h": h, "q": q, "k": k}, tensors)
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(out, dtype=s.dtype, device=s.device)
    return out.to(s.dtype).expand(s.shape) if out.shape != s.shape else out.to(s.dtype)


def evaluate(tree: Node, env: dict, tensors: Sequence[torch.Tensor]) -> Value:
    """Value of ``tree`` with variables from ``env`` and captured ``tensors``."""
    if isinstance(tree, Const):
        return tree.value
    if isinstance(tree, Var):
        return env[tree.name]
    if isinstance(tree, Load):
        t = tensors[tree.index]
        idx = tuple(_as_index(evaluate(i, env, tensors), t.device) for i in tree.at)
        if len(idx) != t.dim():
            raise IndexError(f"score_mod reads t{tree.index} with {len(idx)} indices; it has {t.dim()} dims")
        return t[idx]
    if isinstance(tree, Neg):
        return -evaluate(tree.value, env, tensors)
    if isinstance(tree, Not):
        v = evaluate(tree.value, env, tensors)
        return torch.logical_not(v) if isinstance(v, torch.Tensor) else not v
    if isinstance(tree, BoolOp):
        vals = [evaluate(v, env, tensors) for v in tree.values]
        out = vals[0]
        for v in vals[1:]:
            fn = torch.logical_and if tree.op == "and" else torch.logical_or
            out = fn(_tensor(out), _tensor(v))
        return out
    if isinstance(tree, BinOp):
        return _binop(tree.op, evaluate(tree.left, env, tensors), evaluate(tree.right, env, tensors))
    return _call(tree.fn, [evaluate(a, env, tensors) for a in tree.args])


def _tensor(v: Value) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(v)


def _as_index(v: Value, device) -> Value:
    if isinstance(v, torch.Tensor):
        return v.to(torch.long) if v.is_floating_point() or v.dtype == torch.bool else v
    return int(v)


def _binop(op: str, a: Value, c: Value) -> Value:
    if op == "+":
        return a + c
    if op == "-":
        return a - c
    if op == "*":
        return a * c
    if op == "/":
        if not isinstance(a, torch.Tensor) and not isinstance(c, torch.Tensor):
            return a / c
        return torch.true_divide(_tensor(a), c) if isinstance(a, torch.Tensor) or isinstance(c, torch.Tensor) else a / c
    if op == "//":
        return torch.div(_tensor(a), c, rounding_mode="floor") if isinstance(a, torch.Tensor) or isinstance(c, torch.Tensor) else a // c
    if op == "%":
        return torch.remainder(_tensor(a), c) if isinstance(a, torch.Tensor) or isinstance(c, torch.Tensor) else a % c
    if op == "**":
        return a ** c
    return {"<": lambda: a < c, "<=": lambda: a <= c, ">": lambda: a > c, ">=": lambda: a >= c,
            "==": lambda: a == c, "!=": lambda: a != c}[op]()


def _call(fn: str, args: list) -> Value:
    if fn in _UNARY:
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return float(_UNARY[fn](torch.tensor(float(x))).item())
        return _UNARY[fn](x if x.is_floating_point() else x.float())
    if fn == "float":
        x = args[0]
        return x.float() if isinstance(x, torch.Tensor) else float(x)
    if fn == "int":
        x = args[0]
        return x.to(torch.long) if isinstance(x, torch.Tensor) else int(x)   # truncation, as Python's int()
    if fn in ("min", "max"):
        a, c = args
        if not isinstance(a, torch.Tensor) and not isinstance(c, torch.Tensor):
            return min(a, c) if fn == "min" else max(a, c)
        a, c = torch.broadcast_tensors(*_same_dtype(a, c))
        return torch.minimum(a, c) if fn == "min" else torch.maximum(a, c)
    if fn == "where":
        cond, a, c = args
        cond = _tensor(cond)
        if not isinstance(a, torch.Tensor) and not isinstance(c, torch.Tensor):
            a = torch.as_tensor(a, device=cond.device)   # two constants: where(m, 0.0, -100.0)
        return torch.where(cond, *_same_dtype(a, c))
    if fn == "clamp":
        x, lo, hi = args
        return _call("min", [_call("max", [x, lo]), hi])
    raise ValueError(f"unknown score_mod function {fn!r}")


def _same_dtype(a: Value, c: Value) -> tuple:
    ta = a if isinstance(a, torch.Tensor) else None
    tc = c if isinstance(c, torch.Tensor) else None
    ref = ta if ta is not None else tc
    dtype = torch.promote_types(ta.dtype, tc.dtype) if ta is not None and tc is not None else ref.dtype
    if ta is None and isinstance(a, float) and not dtype.is_floating_point:
        dtype = torch.float32
    if tc is None and isinstance(c, float) and not dtype.is_floating_point:
        dtype = torch.float32
    conv = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=ref.device)
    return conv(a), conv(c)


def index_grids(batch: int, heads: int, q_positions: torch.Tensor, k_len: int, device) -> dict:
    """Broadcastable int64 index tensors for ``apply_score_mod`` on scores [B, H, Qc, K]:
    ``q_positions`` [Qc] are the absolute query positions of the chunk."""
    return {
        "b": torch.arange(batch, device=device).view(batch, 1, 1, 1),
        "h": torch.arange(heads, device=device).view(1, heads, 1, 1),
        "q": q_positions.to(device).view(1, 1, -1, 1),
        "k": torch.arange(k_len, device=device).view(1, 1, 1, k_len),
    }


__all__ = ["apply_score_mod", "evaluate", "index_grids", "math"]
