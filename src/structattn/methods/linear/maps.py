"""Feature maps phi of learned-kernel linear attention, and one layer's fitted maps.

Every map is a small per-head network from ``head_dim`` inputs to ``num_features`` strictly
positive features (a floor of ``FEATURE_FLOOR`` is added to every feature, so ``phi(q) . phi(k)``
is never 0 and every query with a key has a positive normaliser). Queries and keys have separate
maps: queries one per query head, keys one per key/value head (so grouped-query layers keep one
linear-attention state per kv head). Parameters carry the head as their leading dimension.

* ``"hedgehog"`` (Zhang et al. 2024): ``u = x W + b``; ``phi = [softmax(u), softmax(-u)]`` over the
  feature axis (``num_features = 2 * width of W``). Bounded in (0, 1]: safe in half precision.
* ``"gated"`` (Yorsh & Kovalenko 2022, the gated orthogonal kernel stacked twice): a block is
  ``f(x W_o + b_o) * sigmoid(x W_g + b_g)`` with W_o orthogonally initialised; the first block
  has f = identity (``head_dim`` -> ``head_dim``), the second f = softplus (-> ``num_features``).
* ``"mlp"`` (the same paper's feed-forward kernel): ``softplus_beta(gelu(x W_1 + b_1) W_2 + b_2)``
  with ``beta = 2.5``.

The map's input is ``x = q * sqrt(|scale|)`` (times the sign of ``scale``) for queries and
``x = k * sqrt(|scale|)`` for keys, so ``x_q . x_k`` is the layer's attention logit.

``FeatureMaps`` holds one layer's maps plus the per-query-head log gain ``gamma`` (the scale of
the linear part against the exact local window, see ``naive.py``) and the settings they were
fitted with. ``tensors()`` flattens them in the order the op takes: ``[gamma, *query params,
*key params]`` (each side in ``PARAM_NAMES[kind]`` order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["KINDS", "PARAM_NAMES", "FEATURE_FLOOR", "FeatureMaps", "apply_map", "feature_inputs",
           "default_num_features", "init_params", "map_macs"]

KINDS = ("hedgehog", "gated", "mlp")
#: parameter names of one side (queries or keys), in the op's tensor order
PARAM_NAMES = {
    "hedgehog": ("w", "b"),
    "gated": ("w_o1", "b_o1", "w_g1", "b_g1", "w_o2", "b_o2", "w_g2", "b_g2"),
    "mlp": ("w1", "b1", "w2", "b2"),
}
FEATURE_FLOOR = 1e-6
MLP_BETA = 2.5


def default_num_features(kind: str, head_dim: int) -> int:
    """Features per head when not given: 2 * head_dim for hedgehog (its +/- halves), else head_dim."""
    return 2 * head_dim if kind == "hedgehog" else head_dim


def check_kind(kind: str, where: str = "feature_map") -> None:
    """ValueError naming ``where`` unless ``kind`` is a known feature map."""
    if kind not in KINDS:
        raise ValueError(f"{where} must be one of {list(KINDS)}; got {kind!r}")


def feature_inputs(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps' inputs: ``(q * sign(scale) * sqrt(|scale|), k * sqrt(|scale|))``, whose dot
    product is the attention logit ``scale * q . k``."""
    root = math.sqrt(abs(scale))
    return q * (root if scale >= 0 else -root), k * root


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head affine map: x [B, Hx, N, i] @ w [Hx, i, o] + b [Hx, o] -> [B, Hx, N, o]."""
    return torch.matmul(x, w) + b.unsqueeze(-2)


def apply_map(kind: str, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``phi(x)`` for x [B, Hx, N, head_dim] with one side's ``params`` (leading dim Hx) ->
    [B, Hx, N, num_features], computed in x's dtype (callers pass fp32 or fp64)."""
    p = [t.to(x.dtype) for t in params]
    if kind == "hedgehog":
        u = _linear(x, p[0], p[1])
        phi = torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1)
    elif kind == "gated":
        h = _linear(x, p[0], p[1]) * torch.sigmoid(_linear(x, p[2], p[3]))
        phi = F.softplus(_linear(h, p[4], p[5])) * torch.sigmoid(_linear(h, p[6], p[7]))
    elif kind == "mlp":
        phi = F.softplus(_linear(F.gelu(_linear(x, p[0], p[1])), p[2], p[3]), beta=MLP_BETA)
    else:
        check_kind(kind)
    return phi + FEATURE_FLOOR


def map_macs(kind: str, head_dim: int, num_features: int) -> int:
    """Multiply-adds of one map on one token (the FLOP model's feature cost)."""
    d, f = head_dim, num_features
    if kind == "hedgehog":
        return d * (f // 2)
    if kind == "gated":
        return 2 * d * d + 2 * d * f
    return d * d + d * f


def _orthogonal(heads: int, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """[heads, rows, cols] with orthonormal columns (or rows, when cols > rows) per head."""
    a = torch.randn(heads, max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return (qm if rows >= cols else qm.transpose(-1, -2)).float()


def init_params(kind: str, heads: int, head_dim: int, num_features: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Initial parameters of one side (``heads`` maps), float32, in ``PARAM_NAMES[kind]`` order.

    hedgehog: W = identity (padded / cut to num_features / 2 columns, plus 1% noise), b = 0;
    gated: W_o orthogonal, W_g = 0 (gates start at 1/2); mlp: W_1 orthogonal, W_2 scaled normal.
    """
    check_kind(kind)
    d, f = head_dim, num_features
    if kind == "hedgehog":
        if f % 2:
            raise ValueError(f"num_features of the hedgehog map must be even (two halves); got {f}")
        eye = torch.eye(d, f // 2).expand(heads, d, f // 2)
        w = eye + 0.01 * torch.randn(heads, d, f // 2, generator=gen)
        return [w.contiguous(), torch.zeros(heads, f // 2)]
    if kind == "gated":
        return [_orthogonal(heads, d, d, gen), torch.zeros(heads, d), torch.zeros(heads, d, d), torch.zeros(heads, d),
                _orthogonal(heads, d, f, gen), torch.zeros(heads, f), torch.zeros(heads, d, f), torch.zeros(heads, f)]
    return [_orthogonal(heads, d, d, gen), torch.zeros(heads, d),
            torch.randn(heads, d, f, generator=gen) / math.sqrt(d), torch.zeros(heads, f)]


@dataclass
class FeatureMaps:
    """One layer's fitted maps (see the module docstring). ``info`` holds the fit's record."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_features: int
    local_window: int
    sink_tokens: int
    gamma: torch.Tensor                     # [num_heads] log gain of the linear part
    query: list                             # tensors, leading dim num_heads
    key: list                               # tensors, leading dim num_kv_heads
    info: dict = field(default_factory=dict)

    @classmethod
    def init(cls, kind: str, num_heads: int, num_kv_heads: int, head_dim: int, *,
             num_features: Optional[int] = None, local_window: int = 0, sink_tokens: int = 0,
             seed: int = 0) -> "FeatureMaps":
        """Freshly initialised (unfitted) maps; deterministic in ``seed``."""
        check_kind(kind)
        f = default_num_features(kind, head_dim) if num_features is None else num_features
        if f < 1:
            raise ValueError(f"num_features must be >= 1; got {f}")
        gen = torch.Generator().manual_seed(seed)
        query = init_params(kind, num_heads, head_dim, f, gen)
        key = init_params(kind, num_kv_heads, head_dim, f, gen)
        return cls(kind, num_heads, num_kv_heads, head_dim, f, local_window, sink_tokens,
                   torch.zeros(num_heads), query, key)

    def tensors(self, device=None) -> tuple:
        """``(gamma, *query params, *key params)`` as float32 tensors on ``device``."""
        return tuple(t.detach().to(device=device, dtype=torch.float32)
                     for t in (self.gamma, *self.query, *self.key))

    @classmethod
    def from_tensors(cls, kind: str, tensors: Sequence[torch.Tensor], *, local_window: int = 0,
                     sink_tokens: int = 0) -> "FeatureMaps":
        """The inverse of ``tensors()`` (shapes are checked by ``check``)."""
        check_kind(kind)
        n = len(PARAM_NAMES[kind])
        if len(tensors) != 1 + 2 * n:
            raise ValueError(f"a {kind!r} feature map takes {1 + 2 * n} tensors (gamma, {n} per side); "
                             f"got {len(tensors)}")
        gamma, query, key = tensors[0], list(tensors[1:1 + n]), list(tensors[1 + n:])
        d = query[0].shape[1]
        # the last weight's width (hedgehog: two halves of W's width)
        f = 2 * query[0].shape[-1] if kind == "hedgehog" else query[-2].shape[-1]
        maps = cls(kind, gamma.shape[0], key[0].shape[0], d, f, local_window, sink_tokens, gamma, query, key)
        maps.check()
        return maps

    def check(self, where: str = "feature maps") -> None:
        """ValueError naming ``where`` when a tensor's shape does not fit the declared sizes."""
        check_kind(self.kind, f"{where}: kind")
        d, f = self.head_dim, self.num_features
        names = PARAM_NAMES[self.kind]
        if self.kind == "hedgehog":
            shapes = [(d, f // 2), (f // 2,)]
        elif self.kind == "gated":
            shapes = [(d, d), (d,), (d, d), (d,), (d, f), (f,), (d, f), (f,)]
        else:
            shapes = [(d, d), (d,), (d, f), (f,)]
        if tuple(self.gamma.shape) != (self.num_heads,):
            raise ValueError(f"{where}: gamma must have shape [{self.num_heads}]; got {tuple(self.gamma.shape)}")
        for side, heads, params in (("query", self.num_heads, self.query), ("key", self.num_kv_heads, self.key)):
            if len(params) != len(names):
                raise ValueError(f"{where}: {side} map needs {len(names)} tensors {list(names)}; got {len(params)}")
            for name, t, shape in zip(names, params, shapes):
                if tuple(t.shape) != (heads, *shape):
                    raise ValueError(f"{where}: {side} {name} must have shape {[heads, *shape]}; "
                                     f"got {list(t.shape)}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{where}: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.local_window < 0 or self.sink_tokens < 0:
            raise ValueError(f"{where}: local_window and sink_tokens must be >= 0; got {self.local_window}, "
                             f"{self.sink_tokens}")

    def to_dict(self) -> dict:
        """Plain types and tensors (what the weights file stores for the layer)."""
        names = PARAM_NAMES[self.kind]
        return {"feature_map": self.kind, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "num_features": self.num_features, "local_window": self.local_window,
                "sink_tokens": self.sink_tokens, "gamma": self.gamma.detach().float().contiguous(),
                "query": {n: t.detach().float().contiguous() for n, t in zip(names, self.query)},
                "key": {n: t.detach().float().contiguous() for n, t in zip(names, self.key)},
                "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "feature maps") -> "FeatureMaps":
        """The inverse of ``to_dict``; ValueError naming ``where`` for a missing or bad entry."""
        try:
            kind = d["feature_map"]
            check_kind(kind, f"{where}: feature_map")
            names = PARAM_NAMES[kind]
            maps = cls(kind, int(d["num_heads"]), int(d["num_kv_heads"]), int(d["head_dim"]),
                       int(d["num_features"]), int(d["local_window"]), int(d["sink_tokens"]), d["gamma"],
                       [d["query"][n] for n in names], [d["key"][n] for n in names], dict(d.get("info", {})))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: not a fitted linear-attention entry (missing {err})") from None
        maps.check(where)
        return maps
