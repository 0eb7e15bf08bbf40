"""``structattn::routed_attention``: one op whose behaviour is chosen at run time per site.

Calibration compiles a model once with every site rewritten into this op (backend option
``"_route": True``), then switches what each site computes by editing ``ROUTES`` (site key ->
callable) without recompiling: capture the site's inputs, try a candidate method, or run exact.
It is an internal tool, not a public API: the choice is global state read at run time, so it must
not be used for models that are meant to be deployed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..methods.base import ScoreMods
from ..methods.exact import exact_forward
from .dead_rows import apply_dead_rows
from .ops import NAMESPACE, check_inputs, check_mods, run_method

#: site key -> fn(q, k, v, attn_mask, scale, is_causal, mods) -> Tensor (``mods`` a ``ScoreMods``);
#: missing keys run exact attention
ROUTES: dict[str, Callable] = {}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("routed_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, "
            "bool is_causal, str site, str dead_rows, str score_mod, Tensor[] score_tensors, int window_left, "
            "int window_right) -> Tensor")


def _impl(q, k, v, attn_mask, scale, is_causal, site, dead_rows="", score_mod="", score_tensors=(),
          window_left=-1, window_right=-1):
    what = "structattn::routed_attention"
    check_inputs(q, k, v, attn_mask, what)
    mods = ScoreMods(score_mod, tuple(score_tensors), window_left, window_right)
    check_mods(mods, what)
    fn = ROUTES.get(site)
    if fn is not None:
        out = fn(q, k, v, attn_mask, scale, is_causal, mods)
    else:
        out = exact_forward(q, k, v, attn_mask, scale, is_causal, mods)
    out = apply_dead_rows(out, q, k, v, attn_mask, scale, is_causal, dead_rows, mods)
    return out.to(q.dtype).contiguous()


def _fake(q, k, v, attn_mask, scale, is_causal, site, dead_rows="", score_mod="", score_tensors=(),
          window_left=-1, window_right=-1):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


_LIB.impl("routed_attention", _impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::routed_attention", _fake, lib=_LIB)

ROUTED_OP = torch.ops.structattn.routed_attention.default


def route(site: str, fn: Optional[Callable]) -> None:
    """Make site ``site`` run ``fn`` (or exact attention when ``fn`` is None)."""
    if fn is None:
        ROUTES.pop(site, None)
    else:
        ROUTES[site] = fn


def method_route(method, params, min_seq_len: int = 0, impl: str = "auto", tensors: tuple = ()) -> Callable:
    """A route that runs ``method`` with ``params`` (and the site's constant ``tensors``, see
    ``Method.bind``) as its rewritten op would (same dispatch)."""

    def fn(q, k, v, attn_mask, scale, is_causal, mods=None):
        return run_method(method, q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, params, mods=mods,
                          tensors=tensors)
    return fn
