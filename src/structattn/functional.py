"""Direct calls to each method, with ``F.scaled_dot_product_attention``'s conventions.

q, k, v are ``[B, H, N, D]`` (k/v may have fewer heads that divide H: grouped-query attention);
``attn_mask`` is bool (True = keep) or additive float, broadcastable to ``[B, H, Nq, Nk]``;
``scale`` defaults to ``1/sqrt(head_dim)``. Every function goes through the method's
``torch.library`` op, so it works under ``torch.compile`` and autograd. ``impl`` picks the path:
``"auto"`` (Triton on CUDA when a kernel exists, else plain torch), ``"triton"`` or ``"torch"``.

Every registered method is reachable as ``<name>_attention``: the documented wrappers below, or,
for a method registered later, a generic one (module ``__getattr__``) taking the method's
parameters as keywords.

Score modifications (``attention`` and every wrapper): ``score_mod`` is an expression that maps the
scaled score ``s`` of entry (b, h, q, k) to its logit before the mask, in the small language of
``structattn.scoremod`` (``h`` is the query head; captured tensors ``t0``, ``t1``, ... are
``score_tensors``); ``sliding_window=(left, right)`` is a sliding window (key j visible from query i iff
``i - left <= j <= i + right``; None on a side = unbounded), a hard mask like ``is_causal``::

    attention("mra", q, k, v, is_causal=True, score_mod="50.0 * tanh(s / 50.0)")    # Gemma-2
    attention("topk", q, k, v, score_mod="s + t0[h, 0] * k", score_tensors=[slopes])  # ALiBi
    attention("exact", q, k, v, is_causal=True, sliding_window=(4095, 0))                     # Mistral

Each method applies them as its page under docs/methods/ says, or raises ValueError naming the
term it cannot keep (e.g. Monarch and soft-capping). Score tensors that require grad get gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .lowering.ops import IMPLS, check_inputs, check_mods, mod_args, op_for
from .methods import REGISTRY, get_method
from .methods.base import ScoreMods

__all__ = ["attention", "exact_attention", "monarch_attention", "mra_attention", "topk_attention",
           "linear_attention", "routing_attention"]


def attention(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /,
              attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              is_causal: bool = False, *, impl: str = "auto", score_mod: str = "",
              score_tensors: Sequence[torch.Tensor] = (), sliding_window: Optional[tuple] = None,
              tensors: Sequence[torch.Tensor] = (), **params) -> torch.Tensor:
    """Attention by the registered method ``method`` with its ``params`` (validated), the score
    modifications ``score_mod`` / ``score_tensors`` / ``sliding_window`` (module docstring), and ``tensors``,
    the constant tensors of a method that takes them (``Method.takes_tensors``)."""
    what = f"structattn.functional.{method}_attention"
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl must be one of {list(IMPLS)}; got {impl!r}")
    pargs = _param_args(method, tuple(sorted(params.items())))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else math.inf  # SDPA's default
    mods = ScoreMods(score_mod, tuple(score_tensors), *_window(sliding_window, what))
    if not torch.compiler.is_compiling():
        # eager only: under torch.compile the op's fake impl checks the inputs, and the method's
        # forward raises for a mask or causal flag it cannot serve
        check_inputs(q, k, v, attn_mask, what)
        check_mods(mods, what)
        _check_supported(method, q, k, v, attn_mask, is_causal, pargs, what, mods)
    extra = (list(tensors),) if get_method(method).takes_tensors else ()
    if tensors and not extra:
        raise ValueError(f"{what}: method {method!r} takes no tensors; got {len(tensors)}")
    return op_for(method)(q, k, v, attn_mask, float(scale), bool(is_causal), 0, impl, "", *mod_args(mods), *pargs,
                          *extra)


def _window(window: Optional[tuple], what: str) -> tuple[int, int]:
    """``(left, right)`` with None as -1 (unbounded); ValueError for anything else."""
    if window is None:
        return -1, -1
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"{what}: sliding_window must be None or a pair (left, right) of ints >= 0 or None; got {window!r}")
    out = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            out.append(-1)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out.append(value)
        else:
            raise ValueError(f"{what}: sliding_window {side} must be an int >= 0 or None (unbounded); got {value!r}")
    return out[0], out[1]


@torch.compiler.assume_constant_result
def _param_args(method: str, items: tuple) -> tuple:
    """Validated parameter values in op-schema order (a constant for dynamo: no graph break)."""
    m = get_method(method)
    params = m.make_params(dict(items), where=f"{method}_attention")
    return tuple(getattr(params, f.name) for f in m.param_fields())


def _check_supported(method: str, q, k, v, attn_mask, is_causal: bool, pargs: tuple, what: str,
                     mods: ScoreMods) -> None:
    from .methods.base import SiteShape, takes_mods
    from .scoremod.terms import terms_of

    m = get_method(method)
    if not mods.empty and not takes_mods(m.forward):
        raise ValueError(f"{what}: method {method!r} takes no score modifications ({mods.describe()})")
    site = SiteShape(
        batch=q.shape[0], num_heads=q.shape[1], num_kv_heads=k.shape[1], q_len=q.shape[2],
        kv_len=k.shape[2], head_dim=q.shape[3], v_head_dim=v.shape[3],
        mask=_mask_kind(attn_mask, is_causal), dtype=q.dtype,
        terms=terms_of(mods.text, mods.window_left, mods.window_right),
    )
    reason = m.supports(site, m.Params(*pargs))
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


def _mask_kind(attn_mask: Optional[torch.Tensor], is_causal: bool) -> str:
    from .methods.common import is_key_padding

    if attn_mask is None:
        return "causal" if is_causal else "none"
    if not is_key_padding(attn_mask):
        return "general"
    return "causal+key_padding" if is_causal else "key_padding"


def exact_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, impl="auto", **mods):
    """Exact softmax attention through ``structattn::exact_attention`` (SDPA underneath; score
    modifications as ``attention``'s keywords, applied exactly)."""
    return attention("exact", q, k, v, attn_mask, scale, is_causal, impl=impl, **_mods(mods, "exact_attention"))


def _mods(kw: dict, name: str) -> dict:
    unknown = set(kw) - {"score_mod", "score_tensors", "sliding_window"}
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(unknown)}")
    return kw


def monarch_attention(q, k, v, attn_mask=None, scale=None, *, block_size=None, num_steps=1, impl="auto", **mods):
    """MonarchAttention (Yaras et al. 2025): softmax projected onto Monarch matrices.

    ``block_size=None`` picks about sqrt(N); ``num_steps`` is the number of alternating (R, L)
    steps. Supports key-padding masks only (a causal or general mask raises ValueError), and of
    the score modifications only biases that depend on the key alone.
    """
    return attention("monarch", q, k, v, attn_mask, scale, False, impl=impl,
                     block_size=block_size, num_steps=num_steps, **_mods(mods, "monarch_attention"))


def mra_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, block_size=32,
                  blocks_per_row=4, variant="mra2", sink_blocks=0, impl="auto", **mods):
    """MRA-2 multi-resolution attention (Zeng et al. 2022).

    Exact scores in the ``blocks_per_row`` highest-scoring key blocks of each query block, pooled
    block averages elsewhere (``variant="mra2"``) or nothing elsewhere (``"mra2s"``). The first
    ``sink_blocks`` key blocks are always among the selected (after the causal diagonal): causal
    LMs park attention on their first tokens, which a pooled block average cannot represent.
    """
    return attention("mra", q, k, v, attn_mask, scale, is_causal, impl=impl, block_size=block_size,
                     blocks_per_row=blocks_per_row, variant=variant, sink_blocks=sink_blocks,
                     **_mods(mods, "mra_attention"))


def topk_attention(q, k, v, /, attn_mask=None, scale=None, is_causal=False, *, chunk_size=1024, impl="auto", **kw):
    """Top-k attention (Gupta et al. 2021): per query, softmax over its ``k`` largest scores.

    Call as ``topk_attention(q, k, v, k=64)``: the tensors are positional, the budget ``k`` is a
    keyword. Queries are processed ``chunk_size`` at a time so peak memory is O(chunk*N + N*k).
    """
    budget = kw.pop("k", 64)
    return attention("topk", q, k, v, attn_mask, scale, is_causal, impl=impl, k=budget, chunk_size=chunk_size,
                     **_mods(kw, "topk_attention"))


def linear_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, maps, chunk_size=64, impl="auto"):
    """Learned-kernel linear attention (Yorsh & Kovalenko 2022) with fitted feature maps.

    ``maps`` is a ``structattn.methods.linear.FeatureMaps`` (one layer's fitted maps: from
    ``structattn.fit_linear(...).layers[name]``, ``structattn.methods.linear.load_maps(path)[name]``
    or ``FeatureMaps.init`` for unfitted ones); its ``local_window`` and ``sink_tokens`` (exact
    softmax over the nearest keys and the first keys, merged with the linear rest under one
    normaliser) are the ones it was fitted with. Key-padding and causal masks only.
    """
    from .methods.linear.maps import FeatureMaps

    if not isinstance(maps, FeatureMaps):
        raise ValueError(f"linear_attention: maps must be a structattn.methods.linear.FeatureMaps; "
                         f"got {type(maps).__name__}")
    return attention("linear", q, k, v, attn_mask, scale, is_causal, impl=impl, tensors=maps.tensors(q.device),
                     feature_map=maps.kind, num_features=maps.num_features, local_window=maps.local_window,
                     sink_tokens=maps.sink_tokens, chunk_size=chunk_size)


def routing_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, clusters=None, window=None, routes=4,
                      iterations=2, local_window=32, sink_tokens=1, pooled=True, impl="auto"):
    """Routing attention (Roy et al. 2021), zero-shot: k-means clusters found at run time.

    Keys (per batch and kv head) are clustered by ``iterations`` of spherical k-means into
    ``clusters`` (None: about sqrt(N)), sorted by cluster and cut into blocks of ``window`` keys
    (None: N / clusters); queries are sorted and cut the same way. Each query block attends its
    ``routes`` best key blocks exactly and, with ``pooled``, every other block as one pooled key;
    every query also attends its ``local_window`` neighbours and the first ``sink_tokens`` keys.
    ``window >= N`` (or ``routes`` >= the number of blocks) is exact softmax attention.
    """
    return attention("routing", q, k, v, attn_mask, scale, is_causal, impl=impl, clusters=clusters, window=window,
                     routes=routes, iterations=iterations, local_window=local_window, sink_tokens=sink_tokens,
                     pooled=pooled)


def __getattr__(name: str):
    """``<method>_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, impl="auto",
    **params)`` for a registered method without a wrapper above."""
    method = name[: -len("_attention")] if name.endswith("_attention") else None
    if method not in REGISTRY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def call(q, k, v, /, attn_mask=None, scale=None, is_causal=False, *, impl="auto", **params):
        return attention(method, q, k, v, attn_mask, scale, is_causal, impl=impl, **params)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{REGISTRY[method].description or method}: ``attention({method!r}, ...)``."
    return call
