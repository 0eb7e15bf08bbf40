"""The routing decisions of routing attention: clusters, blocks and routes.

Per (batch, kv head):

1. **Clusters.** Keys are centred over the sequence and scaled to unit length (``normalise``);
   ``iterations`` of spherical k-means with ``clusters`` centroids run on the keys that may join
   (live and not sinks). The start is deterministic: those keys at evenly spaced ranks. An
   iteration assigns every key to the centroid of largest cosine and replaces each centroid by
   the normalised sum of its keys; a centroid that gets no key keeps its position. The fit uses
   every s-th position, s = max(1, Nk // (FIT_PER_CLUSTER * clusters)) (at most about 32 keys per
   centroid: k-means needs no more, and it keeps the fit linear in N); the sort below uses all keys.
2. **Balanced blocks.** Keys are sorted by (cluster, decreasing cosine to its centroid) and cut
   into blocks of ``window`` keys: every joining key is in exactly one block and every block but
   the last is full, so attention is a batch of fixed-size blocks. Keys that do not join (masked
   -inf for every query head of the kv head, or sink keys) sort last into empty slots. Queries of
   each query head are normalised the same way, assigned to their nearest centroid and sorted
   and cut the same way (blocks of ``window`` queries).
3. **Routes.** Every query block attends its ``routes`` best key blocks, ranked by the average
   logit between its mean query and the block's keys, ``s * qbar . kbar + beta - log(count)``,
   with ``kbar`` the bias-softmax-weighted mean key of the block and ``beta`` the logsumexp of
   its keys' biases (``kbar`` the plain mean and the score ``s * qbar . kbar`` for 0 / -inf
   biases). Candidates are blocks with a joining key; under ``is_causal`` also with a key at or
   before the block's last query.

Rules the attention paths rely on:

* A key *joins* when its bias is not -inf for at least one query head of the kv head and its
  position is at least ``sink_tokens``. In self attention (Nq == Nk) query i is token i, so a
  query whose key is masked for its head sorts after every live query of its head.
* Non-finite inputs cannot derail the routing: a vector with a NaN or +-inf entry normalises to
  0 (so cosines are always finite), and block scores are ranked with NaN below every real value
  and +-inf clamped, so every slot holds a valid index and every candidate stays one.
* Everything here runs without autograd: the routing is piecewise constant. ``kbar``, ``beta``
  and ``count`` are recomputed differentiably by the attention where it needs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..common import ceil_div, ceil_sqrt, compute_dtype, key_padding_bias

__all__ = ["RoutingPlan", "make_plan", "plan_sizes", "normalise", "NORMALISATIONS", "block_stats",
           "flat_key_bias"]

#: how q and k are normalised before clustering; "center" was chosen from measurements on
#: MiniLM and SmolLM2 (docs/methods/routing.md)
NORMALISATIONS = ("unit", "layer", "center")
DEFAULT_NORMALISATION = "center"

#: the k-means fit uses about this many keys per centroid (a strided subset; see step 1)
FIT_PER_CLUSTER = 32
#: ranks of real values are clamped to +-RANK_LIMIT (NaN -> -RANK_LIMIT)
RANK_LIMIT = 1e38
#: target size (elements) of the largest temporary (a similarity matrix) of one chunk of slices
CHUNK_ELEMS = 1 << 22

_NEG_INF = float("-inf")


@dataclass
class RoutingPlan:
    """Blocks and routes for q [B, H, Nq, D], k [B, Hk, Nk, D] (G = H / Hk query heads per kv head).

    wq, wk: query / key block sizes; Mq = ceil(Nq / wq), Mk = ceil(Nk / wk) blocks.
    q_order: int64 [B, H, Mq*wq], query positions in block order (slot s of block t at
        t*wq + s); slots past Nq hold Nq.
    k_order: int64 [B, Hk, Mk*wk], key positions in block order; empty slots hold Nk.
    routes: int64 [B, H, Mq, r], the key blocks each query block attends (best first).
    route_valid: bool [B, H, Mq, r]; an invalid route (fewer candidates than r) is ignored.
    """

    wq: int
    wk: int
    q_order: torch.Tensor
    k_order: torch.Tensor
    routes: torch.Tensor
    route_valid: torch.Tensor

    @property
    def q_blocks(self) -> int:
        return self.q_order.shape[-1] // self.wq

    @property
    def k_blocks(self) -> int:
        return self.k_order.shape[-1] // self.wk


def plan_sizes(nq: int, nk: int, clusters: Optional[int], window: Optional[int], routes: int) -> tuple[int, int, int, int]:
    """``(C, wq, wk, r)``: C = clusters or ceil(sqrt(Nk)) (at most Nk); wk = window or
    ceil(Nk / C) (at most Nk); wq = min(wk, Nq); r = min(routes, ceil(Nk / wk))."""
    c = clusters if clusters is not None else ceil_sqrt(nk)
    c = max(1, min(c, nk))
    wk = max(1, min(window if window is not None else ceil_div(nk, c), nk))
    return c, max(1, min(wk, nq)), wk, max(1, min(routes, ceil_div(nk, wk)))


def normalise(x: torch.Tensor, kind: str, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unit vectors for clustering from x [n, N, D] (float); rows that are not finite become 0.

    ``unit``: x / |x|. ``layer``: layer norm without scale or bias (x minus its mean over
    features), then unit length (a scale does not change cosines). ``center``: x minus its mean
    over the sequence (over the ``live`` rows [n, N] when given), then unit length: for keys this
    changes no attention weight (softmax ignores a shift shared by all keys) and removes the
    offset every key shares, which otherwise dominates the directions.
    """
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    elif kind == "center":
        finite = torch.isfinite(x.sum(-1, keepdim=True))                            # NaN / inf anywhere in the row
        w = finite if live is None else finite & live.unsqueeze(-1)
        mean = torch.where(w, x, 0.0).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1)
        x = x - mean
    elif kind != "unit":
        raise ValueError(f"normalisation must be one of {list(NORMALISATIONS)}; got {kind!r}")
    n = x.norm(dim=-1, keepdim=True)
    ok = torch.isfinite(n) & (n > 0)                                               # a non-finite entry makes n non-finite
    return torch.where(ok, x / torch.where(ok, n, 1.0), 0.0)


def rank_of(x: torch.Tensor) -> torch.Tensor:
    """Real values for ranking: NaN -> -RANK_LIMIT, +-inf clamped to +-RANK_LIMIT."""
    return x.nan_to_num(nan=-RANK_LIMIT).clamp(-RANK_LIMIT, RANK_LIMIT)


def _init_centroids(x: torch.Tensor, joins: torch.Tensor, c: int) -> torch.Tensor:
    """The joining rows (``joins`` [n, N]) of x [n, N, D] at evenly spaced ranks -> [n, C, D]."""
    n, _, d = x.shape
    order = torch.sort((~joins).to(torch.int8), dim=-1, stable=True).indices      # joining rows first
    count = joins.sum(-1, keepdim=True)
    ranks = ((torch.arange(c, device=x.device) * 2 + 1) * count) // (2 * c)        # floor((c + 1/2) n / C)
    ranks = torch.minimum(ranks, (count - 1).clamp_min(0))
    return x.gather(1, order.gather(-1, ranks).unsqueeze(-1).expand(n, c, d))


def kmeans(points: torch.Tensor, mu: torch.Tensor, iterations: int) -> torch.Tensor:
    """Spherical k-means from ``mu`` [n, C, D] on unit (or zero: left out) points [n, P, D]."""
    n, c, d = mu.shape
    base = (torch.arange(n, device=mu.device) * c).unsqueeze(-1)
    for _ in range(iterations):
        assign = (points @ mu.transpose(-1, -2)).argmax(-1)                        # [n, P] (cosines: finite)
        sums = mu.new_zeros(n * c, d).index_add_(0, (assign + base).reshape(-1), points.reshape(-1, d))
        sums = sums.view(n, c, d)
        norm = sums.norm(dim=-1, keepdim=True)
        mu = torch.where(norm > 0, sums / norm.clamp_min(1e-30), mu)
    return mu


def fit_stride(nk: int, clusters: int) -> int:
    """The stride s of the k-means fit positions (0, s, 2s, ...)."""
    return max(1, nk // (FIT_PER_CLUSTER * clusters))


def _cluster_order(x: torch.Tensor, mu: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Positions [n, N] sorted by (nearest centroid, decreasing cosine); non-members last."""
    sim = x @ mu.transpose(-1, -2)                                                 # [n, N, C] cosines (finite)
    best, cluster = sim.max(-1)
    cluster = torch.where(member, cluster, mu.shape[1])                            # non-members: past the last
    by_sim = torch.sort(best, dim=-1, descending=True, stable=True).indices
    by_cluster = torch.sort(cluster.gather(-1, by_sim), dim=-1, stable=True).indices
    return by_sim.gather(-1, by_cluster)


def _cut(order: torch.Tensor, count: torch.Tensor, n_tokens: int, blocks: int, w: int) -> torch.Tensor:
    """The first ``count`` [n, 1] entries of ``order`` [n, N] in ``blocks`` blocks of ``w`` slots
    ([n, blocks*w]); the other slots hold ``n_tokens``."""
    n, N = order.shape
    slots = blocks * w
    if slots > N:
        order = torch.cat([order, order.new_full((n, slots - N), n_tokens)], -1)
    slot = torch.arange(slots, device=order.device)
    return torch.where(slot < count, order, n_tokens)


def flat_key_bias(attn_mask: Optional[torch.Tensor], B: int, H: int, Hk: int, nk: int, dtype: torch.dtype,
                  device: torch.device) -> Optional[torch.Tensor]:
    """A key-padding mask as an additive bias [B*Hk, G|1, Nk] (broadcast where it can), or None."""
    bias = key_padding_bias(attn_mask, nk, nk, dtype, device, "routing attention")
    if bias is None:
        return None
    if bias.shape[1] == H and H > 1:
        return bias.expand(B, H, nk).reshape(B * Hk, H // Hk, nk)
    return bias.expand(B, Hk, nk).reshape(B * Hk, 1, nk)


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` [n, ...] (values < t.shape[1]) of t [n, N, E] -> [n, ..., E]."""
    n, N, E = t.shape
    base = (torch.arange(n, device=t.device) * N).view(n, *([1] * (idx.dim() - 1)))
    return t.reshape(n * N, E).index_select(0, (idx + base).reshape(-1)).view(*idx.shape, E)


def block_stats(k: torch.Tensor, bias: Optional[torch.Tensor], k_order: torch.Tensor, wk: int,
                extra: Optional[torch.Tensor] = None):
    """Per key block: ``(kbar, beta, count[, vbar])`` from k [n, Nk, D], bias [n, G|1, Nk] or None,
    k_order [n, Mk*wk] (empty slots = Nk); ``extra`` (values [n, Nk, Dv]) is pooled the same way.

    kbar [n, G|1, Mk, D] is the mean of the block's keys weighted by the softmax of their biases,
    beta [n, G|1, Mk] the logsumexp of those biases (-inf for a block without a key of finite
    bias), count [n, G|1, Mk] the number of keys of bias > -inf. Differentiable in k (and ``extra``).
    """
    n, nk, d = k.shape
    mk = k_order.shape[-1] // wk
    rows = k_order.clamp(max=nk - 1)
    filled = (k_order < nk).view(n, 1, mk, wk)
    if bias is None:
        b = torch.where(filled, 0.0, _NEG_INF).to(k.dtype)
    else:
        b = bias.gather(-1, rows.unsqueeze(1).expand(n, bias.shape[1], -1)).view(n, bias.shape[1], mk, wk)
        b = b.masked_fill(~filled, _NEG_INF)
    top = b.amax(-1, keepdim=True)
    top = top.masked_fill(top == _NEG_INF, 0.0)
    e = torch.exp(b - top)
    total = e.sum(-1, keepdim=True)
    beta = (top + torch.log(total)).squeeze(-1)
    weight = e / total.masked_fill(total == 0, 1.0)                                # [n, G|1, Mk, wk]
    count = (b != _NEG_INF).sum(-1).to(k.dtype)
    w5 = weight.unsqueeze(-2)                                                      # [n, G|1, Mk, 1, wk]
    kbar = (w5 @ _rows(k, rows.view(n, mk, wk)).unsqueeze(1)).squeeze(-2)          # [n, G|1, Mk, D]
    if extra is None:
        return kbar, beta, count
    return kbar, beta, count, (w5 @ _rows(extra, rows.view(n, mk, wk)).unsqueeze(1)).squeeze(-2)


@torch.no_grad()
def make_plan(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float, is_causal: bool,
              clusters: Optional[int], window: Optional[int], routes: int, iterations: int, sink_tokens: int,
              normalisation: str = DEFAULT_NORMALISATION) -> RoutingPlan:
    """Cluster, block and route q [B, H, Nq, D], k [B, Hk, Nk, D] (non-empty); see the module docstring.

    ``attn_mask``: key padding (bool keep or additive float, broadcastable to [B, H, 1, Nk]; a
    query axis with equal rows is accepted).
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    cdt = compute_dtype(q.dtype)
    c, wq, wk, r = plan_sizes(Nq, Nk, clusters, window, routes)
    mq, mk = ceil_div(Nq, wq), ceil_div(Nk, wk)
    shared = Nq == Nk
    n_slices = B * Hk

    bias = flat_key_bias(attn_mask, B, H, Hk, Nk, cdt, dev)                          # [BHk, G|1, Nk]
    live_h = None if bias is None else (bias > _NEG_INF)
    joins = torch.ones(n_slices, Nk, dtype=torch.bool, device=dev) if live_h is None else live_h.any(1)
    joins[:, :min(sink_tokens, Nk)] = False
    q_live = None
    if shared and live_h is not None:
        q_live = live_h.expand(n_slices, G, Nk)

    q3 = q.reshape(n_slices, G, Nq, D)
    k3 = k.reshape(n_slices, Nk, D)
    per = max(1, CHUNK_ELEMS // max(1, (G * Nq + Nk) * max(c, mk)))
    q_order = torch.empty(n_slices, G, mq * wq, dtype=torch.int64, device=dev)
    k_order = torch.empty(n_slices, mk * wk, dtype=torch.int64, device=dev)
    route_idx = torch.empty(n_slices, G, mq, r, dtype=torch.int64, device=dev)
    route_ok = torch.empty(n_slices, G, mq, r, dtype=torch.bool, device=dev)
    for a0 in range(0, n_slices, per):
        a1 = min(a0 + per, n_slices)
        n = a1 - a0
        jn = joins[a0:a1]
        kc = k3[a0:a1].to(cdt)
        xk = normalise(kc, normalisation, jn)
        stride = fit_stride(Nk, c)
        fit = (xk * jn.unsqueeze(-1).to(cdt))[:, ::stride]
        mu = kmeans(fit, _init_centroids(xk, jn, c), iterations)
        ko = _cut(_cluster_order(xk, mu, jn), jn.sum(-1, keepdim=True), Nk, mk, wk)
        k_order[a0:a1] = ko

        qc = q3[a0:a1].to(cdt)
        ql = None if q_live is None else q_live[a0:a1]
        xq = normalise(qc.reshape(n * G, Nq, D), normalisation, None if ql is None else ql.reshape(n * G, Nq))
        member = torch.ones(n * G, Nq, dtype=torch.bool, device=dev) if ql is None else ql.reshape(n * G, Nq)
        qo = _cluster_order(xq, mu.repeat_interleave(G, 0), member)
        # every query is placed (masked ones after the live ones of their head)
        qo = _cut(qo, torch.full((n * G, 1), Nq, device=dev), Nq, mq, wq).view(n, G, mq * wq)
        q_order[a0:a1] = qo

        # routes: average logit of each (query block, key block) pair
        bc = None if bias is None else bias[a0:a1]
        kbar, beta, count = block_stats(kc, bc, ko, wk)                           # [n, G|1, Mk, D], [n, G|1, Mk]
        filled = (qo < Nq).view(n, G, mq, wq)
        qrows = _rows(qc.reshape(n, G * Nq, D), (qo.clamp(max=Nq - 1) + (torch.arange(G, device=dev) * Nq).view(1, G, 1)))
        qbar = (qrows.view(n, G, mq, wq, D) * filled.unsqueeze(-1)).sum(-2) / filled.sum(-1, keepdim=True).clamp_min(1)
        score = scale * (qbar @ kbar.transpose(-1, -2)) + (beta - torch.log(count.clamp_min(1))).unsqueeze(-2)
        cand = (count > 0).unsqueeze(-2).expand(n, G, mq, mk)
        if is_causal:
            kfirst = torch.where(ko < Nk, ko, Nk).view(n, mk, wk).amin(-1)         # [n, Mk]
            qlast = torch.where(filled, qo.view(n, G, mq, wq), -1).amax(-1)        # [n, G, Mq]
            cand = cand & (kfirst.view(n, 1, 1, mk) <= qlast.unsqueeze(-1))
        rank = torch.where(cand, rank_of(score), _NEG_INF)
        top, idx = torch.topk(rank, r, dim=-1)
        route_idx[a0:a1] = idx
        route_ok[a0:a1] = top > _NEG_INF
    return RoutingPlan(
        wq=wq, wk=wk, q_order=q_order.view(B, H, mq * wq), k_order=k_order.view(B, Hk, mk * wk),
        routes=route_idx.view(B, H, mq, r), route_valid=route_ok.view(B, H, mq, r),
    )
