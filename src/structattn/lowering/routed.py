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

from ..methods.exact import sdpa
from .dead_rows import apply_dead_rows
from .ops import NAMESPACE, check_inputs, run_method

#: site key -> fn(q, k, v, attn_mask, scale, is_causal) -> Tensor; missing keys run exact attention
ROUTES: dict[str, Callable] = {}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("routed_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, "
            "bool is_causal, str site, str dead_rows='') -> Tensor")


def _impl(q, k, v, attn_mask, scale, is_causal, site, dead_rows=""):
    check_inputs(q, k, v, attn_mask, "structattn::routed_attention")
    fn = ROUTES.get(site)
    out = fn(q, k, v, attn_mask, scale, is_causal) if fn is not None else sdpa(q, k, v, attn_mask, scale, is_causal)
    out = apply_dead_rows(out, q, k, v, attn_mask, scale, is_causal, dead_rows)
    return out.to(q.dtype).contiguous()


def _fake(q, k, v, attn_mask, scale, is_causal, site, dead_rows=""):
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

    def fn(q, k, v, attn_mask, scale, is_causal):
        return run_method(method, q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, params, tensors=tensors)
    return fn
