"""Routing attention (Roy et al. 2021, "Routing Transformer"), zero-shot: content clusters found at
run time by spherical k-means on each call's own keys.

Per (batch, kv head) (``plan.py``): keys are centred and scaled to unit length and clustered by
``iterations`` of spherical k-means (``clusters`` centroids, default about sqrt(Nk); a
deterministic start); keys, and the queries of each query head, are sorted by nearest centroid
and cut into blocks of ``window`` tokens (default about Nk / clusters), so every token is in
exactly one block and attention is a batch of fixed-size blocks; each query block attends its
``routes`` best key blocks, ranked by the average logit of its mean query with their mean key.

Query i then attends, with exact softmax weights, to the union of

* the keys of its query block's routed key blocks,
* its local window of ``local_window`` keys (ending at i when causal, around i otherwise;
  positions aligned top-left like SDPA's ``is_causal``; under ``is_causal`` it keeps every row
  non-empty),
* the first ``sink_tokens`` keys (causal LMs park attention on them),

each key counted once, under ``is_causal`` only keys j <= i, with the mask's biases added as they
are; with ``pooled`` every other key block adds one pooled key (MRA-2's low-resolution branch
over content blocks). ``naive.naive_attention`` is the definition; the parts are computed
separately and merged by log-sum-exp (``torch.py``, ``cpu.py``, ``triton.py``). Exact limits:
``window >= Nk`` (one block) or ``routes`` >= the number of key blocks is softmax attention.

Decisions (the Triton kernel implements the same; measurements in docs/methods/routing.md):

1. Balance by sorting and route query blocks to key blocks, instead of the original's top-w
   members per cluster with Q and K clustered together: that scheme, implemented first, covered
   17% of the attention mass of SmolLM2 and had about twice the error at the same cost.
2. Normalisation: centring over the sequence, then unit length (better than the paper's layer
   norm and plain unit norm on MiniLM and SmolLM2).
3. Self attention is Nq == Nk; then query i is token i, and a query whose key is masked for its
   head sorts after every live query of that head.
4. Causal: the clustering sees the whole sequence, so which earlier keys query i attends to may
   depend on later tokens (as in the original's routing); values of later tokens never reach it.
5. Masks: key padding (bool or additive, -inf the only hard mask) and ``is_causal``; a general
   [Q, K] mask is refused. fp16 / bf16 are computed in fp32, float64 stays float64.
6. The routing is piecewise constant: gradients flow through the attention weights only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import sympy

from ..base import Dim, Method, SiteShape
from ..common import ceil_div, ceil_sqrt, sym_min
from .plan import FIT_PER_CLUSTER, RoutingPlan, fit_stride, make_plan, plan_sizes
from .torch import routing_forward

__all__ = ["RoutingParams", "RoutingMethod", "routing_forward", "routing_flops", "make_plan", "plan_sizes",
           "RoutingPlan"]


@dataclass(frozen=True)
class RoutingParams:
    """``clusters``: k-means centroids (None: ceil(sqrt(Nk))); ``window``: tokens per block (None:
    ceil(Nk / clusters)); ``routes``: key blocks each query block attends; ``iterations`` of
    k-means; ``local_window``: keys around each query always attended; ``sink_tokens``: first
    keys always attended; ``pooled``: every other key block adds one pooled key (as MRA-2)."""

    clusters: Optional[int] = None
    window: Optional[int] = None
    routes: int = 4
    iterations: int = 2
    local_window: int = 32
    sink_tokens: int = 1
    pooled: bool = True


def _fit_stride(nk: Dim, c: Dim) -> Dim:
    """``plan.fit_stride`` for ints or sympy expressions."""
    if isinstance(nk, int) and isinstance(c, int):
        return fit_stride(nk, c)
    return sympy.Max(1, sympy.floor(nk / (FIT_PER_CLUSTER * c)))


def routing_flops(site: SiteShape, params: RoutingParams) -> Dim:
    """FLOPs (2 x multiply-adds) of one call: k-means on the keys (``iterations`` passes over the
    fit subset of about min(Nk, 32 C) keys, one assignment pass over all Nk, C x d each, per kv
    head) and the queries' assignment (Nq x C x d per query head),
    the block scores (Mq x Mk x d), the routed blocks (Nq x r x wk x (d + dv)), the pooled blocks
    (Nq x Mk x (d + dv)) and every query's band of 2*local_window - 1 keys plus the sink keys."""
    nq, nk, d, dv = site.q_len, site.kv_len, site.head_dim, site.v_head_dim
    b, h, hk = site.batch, site.num_heads, site.num_kv_heads
    c = sym_min(params.clusters if params.clusters is not None else ceil_sqrt(nk), nk)
    wk = sym_min(params.window if params.window is not None else ceil_div(nk, c), nk)
    wq = sym_min(wk, nq)
    mq, mk = ceil_div(nq, wq), ceil_div(nk, wk)
    r = sym_min(params.routes, mk)
    fit = ceil_div(nk, _fit_stride(nk, c))
    cluster = hk * (params.iterations * fit + nk) * c * d + h * nq * c * d
    attention = h * (mq * mk * d + nq * r * wk * (d + dv))
    if params.pooled:
        attention = attention + h * nq * mk * (d + dv)
    band = sym_min(2 * params.local_window - 1, nk) if params.local_window > 0 else 0
    static = h * nq * (band + sym_min(params.sink_tokens, nk)) * (d + dv)
    return 2 * b * (cluster + attention + static)


class RoutingMethod(Method):
    """Routing attention: k-means clusters of queries and keys, exact softmax within them."""

    name = "routing"
    Params = RoutingParams
    description = "routing attention (Roy et al. 2021): run-time k-means clusters, local window, sinks"
    saves = "flops"
    kernel_module: ClassVar[Optional[str]] = "structattn.methods.routing.triton"

    def validate(self, params: RoutingParams, *, where: str) -> None:
        self.require_at_least(params, where=where, routes=1, iterations=0, local_window=0, sink_tokens=0)
        for key in ("clusters", "window"):
            value = getattr(params, key)
            if value is not None and value < 1:
                raise ValueError(f"{where}.{key} must be None or an int >= 1; got {value!r}")

    def supports(self, site: SiteShape, params: RoutingParams) -> Optional[str]:
        if site.general_mask:
            return ("routing supports key-padding and causal masks only, not a general [Q, K] mask; "
                    "use 'topk' for general masks")
        if site.causal and params.local_window == 0 and params.sink_tokens == 0:
            return ("routing on a causal site needs local_window >= 1 or sink_tokens >= 1 (a query whose "
                    "routed keys all lie after it would attend to nothing)")
        return None

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        return routing_forward(q, k, v, attn_mask, scale, is_causal, params)

    def flops(self, site: SiteShape, params: RoutingParams) -> Dim:
        return routing_flops(site, params)

    def candidates(self, shape: SiteShape) -> list[dict]:
        """The calibration grid: blocks of 8-16 tokens up to 512 keys, 16-32 up to 4K, 32-64 above
        (smaller blocks with more routes had lower error at the same number of exact keys on
        MiniLM and SmolLM2), routes giving about 1/16, 1/8 and 1/4 of the key blocks, a local
        window of 32 (causal) or 16, one sink. Sites under 64 keys are not calibrated."""
        n = int(shape.kv_len)
        if n < 64:
            return []
        windows = (8, 16) if n <= 512 else (16, 32) if n <= 4096 else (32, 64)
        out = []
        for w in windows:
            mk = ceil_div(n, w)
            for routes in sorted({max(1, round(f * mk)) for f in (1 / 16, 1 / 8, 1 / 4)}):
                if routes < mk:
                    out.append({"window": w, "routes": routes, "local_window": 32 if shape.causal else 16,
                                "sink_tokens": 1})
        return out
