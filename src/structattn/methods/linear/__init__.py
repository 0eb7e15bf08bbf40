"""Learned-kernel linear attention (Yorsh & Kovalenko 2022), fitted to a pretrained model.

``exp(q . k)`` is replaced by ``phi_q(q) . phi_k(k)`` for small per-head feature maps fitted to
each layer's own softmax attention on sample inputs (``structattn.fit_linear``; ``fit.py``), so
attention costs O(N f (d + f)) instead of O(N^2 d). Optionally the nearest keys
(``local_window``) and the first ``sink_tokens`` keys stay exact softmax, merged with the linear
rest under one normaliser. The formula is in ``naive.py``, the fast path in ``torch.py``, the
Triton kernels in ``triton.py``, the maps in ``maps.py`` and the weights file in ``store.py``.

Options name the weights file; the layer's entry is found by its module FQN when the site is
compiled (``LinearMethod.bind``), and its tensors become constants of the rewritten graph::

    {"method": "linear", "linear": {"weights": "phi.pt"}}
    {"layers": {"model.layers.2?.*": {"method": "linear", "weights": "phi.pt"}}}

A layer without an entry in the file stays exact, with the reason in the report.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

from ..base import Binding, Dim, Method, SiteShape
from ..common import sym_min
from .maps import KINDS, FeatureMaps, default_num_features, map_macs
from .store import load_maps, maps_tensors, save_maps
from .torch import linear_forward

__all__ = ["LinearParams", "LinearMethod", "FeatureMaps", "linear_flops", "load_maps", "save_maps", "KINDS"]


@dataclass(frozen=True)
class LinearParams:
    """``weights``: the file written by ``structattn.fit_linear``. ``feature_map``,
    ``num_features``, ``local_window`` and ``sink_tokens`` are filled in from the layer's entry
    ("auto" / 0 / None = as fitted; a value that differs from the fit is a ValueError: the maps
    are only valid for the settings they were fitted with). ``chunk_size``: queries per chunk of
    the causal prefix sums and the exact window."""

    weights: str = ""
    feature_map: str = "auto"
    num_features: int = 0
    local_window: Optional[int] = None
    sink_tokens: Optional[int] = None
    chunk_size: int = 64


def linear_flops(site: SiteShape, params: LinearParams) -> Dim:
    """FLOPs (2 x multiply-adds, all batches and heads), linear in the sequence lengths:

    feature maps ``(H Nq + Hk Nk) * map_macs``; linear part ``Hk Nk f e + H Nq f e`` (state and
    read-out, e = Dv + 1 for the normaliser) plus, when causal or windowed, the intra-chunk
    products ``H Nq C (f + e)`` (twice for a non-causal window: both directions); exact part
    ``H Nq (span + sinks) (D + Dv)`` with span = C + w - 1 (+ w - 1 non-causal) keys per query.
    Unresolved parameters count as the default hedgehog map without window.
    """
    nq, nk, d, dv = site.q_len, site.kv_len, site.head_dim, site.v_head_dim
    kind = params.feature_map if params.feature_map in KINDS else "hedgehog"
    f = params.num_features or default_num_features(kind, d)
    w, sinks = params.local_window or 0, params.sink_tokens or 0
    h, hk, e = site.num_heads, site.num_kv_heads, dv + 1
    chunk = sym_min(params.chunk_size, nq)
    macs = (h * nq + hk * nk) * map_macs(kind, d, f)
    state = hk * nk * f * e + h * nq * f * e
    if site.causal:
        macs += state + h * nq * chunk * (f + e)
    elif w:
        macs += 2 * (state + h * nq * chunk * (f + e))
    else:
        macs += state
    if w:
        span = chunk + w - 1 + (0 if site.causal else w - 1)
        macs += h * nq * span * (d + dv)
    if sinks:
        macs += h * nq * sym_min(sinks, nk) * (d + dv)
    return 2 * site.batch * macs


class LinearMethod(Method):
    """Normalised linear attention with per-layer fitted feature maps (+ exact window / sinks)."""

    name = "linear"
    Params = LinearParams
    description = "learned-kernel linear attention, fitted per layer (Yorsh & Kovalenko 2022)"
    takes_tensors = True
    kernel_module: ClassVar[Optional[str]] = "structattn.methods.linear.triton"

    def validate(self, params: LinearParams, *, where: str) -> None:
        self.require_at_least(params, where=where, num_features=0, chunk_size=1)
        if params.feature_map not in ("auto",) + KINDS:
            raise ValueError(f"{where}.feature_map must be one of {['auto', *KINDS]}; got {params.feature_map!r}")
        for key in ("local_window", "sink_tokens"):
            value = getattr(params, key)
            if value is not None and value < 0:
                raise ValueError(f"{where}.{key} must be None (as fitted) or an int >= 0; got {value!r}")

    def supports(self, site: SiteShape, params: LinearParams) -> Optional[str]:
        # a score modification (a bias lifted into a per-(query, key) expression, should the site
        # carry one) has no place in phi(q) . phi(k): refused like a general mask
        mods = [t.label() for t in site.terms
                if t.kind in ("bias", "softcap", "score_mod") or getattr(t, "form", "") == "sliding_window"]
        if mods:
            return (f"linear attention cannot apply the score modification {', '.join(mods)} (its kernel "
                    "phi(q) . phi(k) has no per-(query, key) term); use 'exact' or a method that takes score mods")
        if site.general_mask:
            return ("linear supports key-padding and causal masks only, not a general [Q, K] mask "
                    "(its state sums over keys shared by every query)")
        return None

    def bind(self, layer: str, site: SiteShape, params: LinearParams, device: Any = None) -> Union[Binding, str]:
        """The layer's fitted maps from ``params.weights``: params completed from the entry and its
        tensors; a reason when the file has no entry for ``layer``; ValueError when no file is
        named, it cannot be read, or the entry does not fit the site (another model) or params."""
        if not params.weights:
            raise ValueError(
                "method 'linear' needs fitted feature maps: set 'weights' to the file written by "
                "structattn.fit_linear, e.g. options={'method': 'linear', 'linear': {'weights': 'phi.pt'}} or a "
                "per-layer {'method': 'linear', 'weights': 'phi.pt'}")
        layers = load_maps(params.weights)
        maps = layers.get(layer)
        if maps is None:
            known = sorted(layers)
            shown = ", ".join(known[:3]) + (", ..." if len(known) > 3 else "")
            return f"no feature map fitted for layer {layer!r} in {params.weights!r} (it has {len(known)}: {shown})"
        return Binding(resolve_params(params, maps, layer, site), maps_tensors(params.weights, layer, maps, device))

    def example_binding(self, site: SiteShape, params: LinearParams, seed: int = 0) -> Binding:
        """Freshly initialised maps (``FeatureMaps.init``; hedgehog when ``feature_map`` is "auto")
        with the window, sinks and feature count of ``params``, and a random log gain per head."""
        import torch   # the real package: this module's name "torch" is the sibling torch.py

        kind = params.feature_map if params.feature_map in KINDS else "hedgehog"
        maps = FeatureMaps.init(kind, site.num_heads, site.num_kv_heads, site.head_dim,
                                num_features=params.num_features or None, local_window=params.local_window or 0,
                                sink_tokens=params.sink_tokens or 0, seed=seed)
        maps.gamma = torch.randn(site.num_heads, generator=torch.Generator().manual_seed(seed + 1))
        return Binding(resolve_params(params, maps, "<example>", site), maps.tensors())

    def forward(self, q, k, v, attn_mask, scale, is_causal, params, *tensors):
        check_bound(params, tensors)
        return linear_forward(q, k, v, attn_mask, scale, is_causal, params.feature_map, tensors,
                              params.local_window, params.sink_tokens, params.chunk_size)

    def flops(self, site: SiteShape, params: LinearParams) -> Dim:
        return linear_flops(site, params)

    def candidates(self, shape: SiteShape) -> list[dict]:
        """Calibration: one fit per layer, with the settings of options['linear'] (calibrate merges
        them in), so the grid is a single entry."""
        return [{}]

    def fit_site(self, layer: str, calls: list, params: LinearParams, *, progress: bool = False,
                 verbose: bool = False, **settings: Any) -> LinearParams:
        """Calibration hook: fit maps for ``layer`` on its captured ``calls`` (objects with q, k,
        v, mask, scale, is_causal, out) with the window, sinks, feature map and feature count of
        ``params`` and ``settings`` (``fit_calls`` arguments: steps, loss, rows, lr, seed), add them
        to ``params.weights`` and return the params."""
        from .fit import fit_calls

        if not params.weights:
            raise ValueError("calibrate with method 'linear' fits feature maps and saves them to a file the "
                             "options reference: pass options={'linear': {'weights': 'phi.pt'}}")
        for key in ("feature_map", "num_features", "local_window", "sink_tokens"):
            if key in settings:
                raise ValueError(f"calibrate fit_options['linear']: set {key!r} in options['linear'] (the op's "
                                 f"parameters), not in the fit settings")
        settings = {"feature_map": params.feature_map, "num_features": params.num_features or None,
                    "local_window": params.local_window or 0, "sink_tokens": params.sink_tokens or 0, **settings}
        maps = fit_calls(calls, progress=progress, name=layer, **settings)
        save_maps(params.weights, {layer: maps}, merge=True)
        if verbose:
            print(f"calibrate: fitted linear feature maps for {layer}: {maps.info.get('summary', '')}")
        return params


def resolve_params(params: LinearParams, maps: FeatureMaps, layer: str, site: Optional[SiteShape]) -> LinearParams:
    """``params`` with the fitted settings of ``maps`` filled in; ValueError when an explicit
    setting or the site's shape disagrees with the fit."""
    where = f"linear feature maps of {layer!r}" + (f" in {params.weights!r}" if params.weights else "")
    if site is not None:
        want = (maps.num_heads, maps.num_kv_heads, maps.head_dim)
        have = (site.num_heads, site.num_kv_heads, site.head_dim)
        if have[2] is not None and want != have:
            raise ValueError(f"{where} were fitted for (heads, kv heads, head_dim) = {want}, but the site has "
                             f"{have}: the file belongs to another model")
    fitted = {"feature_map": maps.kind, "num_features": maps.num_features, "local_window": maps.local_window,
              "sink_tokens": maps.sink_tokens}
    unset = {"feature_map": "auto", "num_features": 0, "local_window": None, "sink_tokens": None}
    for key, value in fitted.items():
        given = getattr(params, key)
        if given != unset[key] and given != value:
            raise ValueError(f"{where}: {key}={given!r} was asked for, but they were fitted with {key}={value!r}; "
                             f"fit again with that setting or leave {key} out of the options")
    return dataclasses.replace(params, **fitted)


def check_bound(params: LinearParams, tensors: tuple) -> None:
    """ValueError unless ``params`` is resolved (``bind``) and ``tensors`` fit its feature map."""
    from .maps import PARAM_NAMES

    if params.feature_map not in KINDS or params.local_window is None or params.sink_tokens is None or not tensors:
        raise ValueError(
            "linear attention needs fitted feature maps: compile with options naming a weights file "
            "({'method': 'linear', 'weights': path}) or call structattn.functional.linear_attention(q, k, v, "
            "maps=...) with FeatureMaps; got params without them")
    want = 1 + 2 * len(PARAM_NAMES[params.feature_map])
    if len(tensors) != want:
        raise ValueError(f"linear attention with feature_map={params.feature_map!r} takes {want} tensors; "
                         f"got {len(tensors)}")
