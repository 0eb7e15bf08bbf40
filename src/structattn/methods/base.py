"""The contract every attention method fulfils (docs/architecture.md, "Adding a method").

A method is one folder ``methods/<name>/`` whose ``__init__.py`` holds its ``Params`` and a
``Method`` subclass, registered by one line in ``methods/__init__.py``. The subclass gives:

* ``Params``: a frozen dataclass of its tunable parameters (ints, floats, bools, strings or
  ``Optional[int]``); these become arguments of its ``torch.library`` op, so they are part of the
  graph and of inductor's cache key;
* ``forward``: the plain-torch computation (the CPU path and the function the generic backward
  differentiates), usually in ``<name>/torch.py``;
* ``supports(site, params)``: the TRACE-TIME check on a ``SiteShape`` (from the pass, or from
  ``functional`` before a call): ``None`` when the method can serve the site, else the reason it
  stays exact (shown in the report). The RUN-TIME check of a kernel on concrete tensors is
  ``<name>/triton.py``'s own ``supports(q, k, v, attn_mask, is_causal, params)``, reached only
  through the kernel dispatch (``lowering/ops.py``);
* ``flops(site, params)``: the estimated attention FLOPs of one call, an int or a sympy expression
  in symbolic sequence lengths;
* ``candidates(shape)``: the parameter grid ``calibrate`` tries on a site ([] = not calibrated);
* ``kernel_module``: the dotted name of its Triton module (``<name>/triton.py``), or None.

Its ``<name>/naive.py`` is the short float64 reference the tests check every path against.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

import torch

from .common import Dim

MaskKind = Literal["none", "key_padding", "causal", "causal+key_padding", "general"]
MASK_KINDS = ("none", "key_padding", "causal", "causal+key_padding", "general")


@dataclass(frozen=True)
class SiteShape:
    """Shapes and mask structure of one attention call, as the pass sees it.

    ``mask`` says what the mask handed to the op is: ``key_padding`` means it broadcasts to
    ``[B, H, 1, Nk]`` (a per-key keep flag or additive bias); ``causal`` means ``is_causal`` is set
    (top-left aligned, as in SDPA); ``general`` means a mask that varies along queries and keys
    in an unknown way.
    """

    batch: Dim
    num_heads: int
    num_kv_heads: int
    q_len: Dim
    kv_len: Dim
    head_dim: int
    v_head_dim: int
    mask: MaskKind = "none"
    dtype: torch.dtype = torch.float32

    @property
    def causal(self) -> bool:
        return self.mask.startswith("causal")

    @property
    def general_mask(self) -> bool:
        return self.mask == "general"


class Method:
    """Base class of a registered attention method. Subclasses set ``name`` and ``Params``."""

    name: ClassVar[str]
    Params: ClassVar[type]
    description: ClassVar[str] = ""
    #: what the method saves over exact attention: "flops" (the backend keeps a site exact where
    #: the FLOP model says it would not save any) or "memory" (no FLOP rule: top-k)
    saves: ClassVar[str] = "flops"
    #: dotted name of the module holding this method's Triton kernels, which exposes
    #: ``supports(q, k, v, attn_mask, is_causal, params)`` and ``forward(q, k, v, attn_mask, scale,
    #: is_causal, params)``; imported lazily by the kernel dispatch. None: no kernel.
    kernel_module: ClassVar[Optional[str]] = None

    # -- parameters -------------------------------------------------------------------------
    def param_fields(self) -> list[dataclasses.Field]:
        """The dataclass fields of ``Params`` in declaration order (the op's argument order)."""
        return list(dataclasses.fields(self.Params))

    def make_params(self, values: dict[str, Any] | None = None, *, where: str = "") -> Any:
        """Build validated ``Params`` from a dict; unknown keys and bad values raise ValueError."""
        values = dict(values or {})
        allowed = [f.name for f in self.param_fields()]
        for key in values:
            if key not in allowed:
                raise ValueError(
                    f"{where or self.name}: unknown parameter {key!r} for method {self.name!r}; "
                    f"allowed: {allowed or 'none'}"
                )
        hints = typing.get_type_hints(self.Params)
        for f in self.param_fields():
            if f.name in values:
                _check_type(f"{where or self.name}.{f.name}", values[f.name], hints[f.name])
        params = self.Params(**values)
        self.validate(params, where=where or self.name)
        return params

    def validate(self, params: Any, *, where: str) -> None:
        """Raise ValueError naming ``where.key`` when a parameter value is out of range."""

    @staticmethod
    def require_at_least(params: Any, *, where: str, **minimums: int) -> None:
        """Raise ValueError naming ``where.key`` for each int parameter below its minimum."""
        for key, lowest in minimums.items():
            value = getattr(params, key)
            if value < lowest:
                raise ValueError(f"{where}.{key} must be an int >= {lowest}; got {value!r}")

    # -- behaviour ---------------------------------------------------------------------------
    def supports(self, site: SiteShape, params: Any) -> Optional[str]:
        """Trace-time check: ``None`` if this method can serve ``site``, else a one-line reason."""
        return None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        scale: float,
        is_causal: bool,
        params: Any,
    ) -> torch.Tensor:
        """Plain-torch attention: q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv]."""
        raise NotImplementedError

    def flops(self, site: SiteShape, params: Any) -> Dim:
        """Estimated FLOPs (2 x multiply-adds) of one call over all batches and heads."""
        return exact_flops(site)

    def candidates(self, shape: SiteShape) -> list[dict]:
        """Parameter dicts ``calibrate`` tries on a site of this shape (before ``supports`` and
        the FLOP rule); [] means the method is not calibrated (and not among its defaults)."""
        return []


def exact_flops(site: SiteShape) -> Dim:
    """FLOPs of dense softmax attention: QK^T and PV, 2*B*H*Nq*Nk*(D + Dv)."""
    return 2 * site.batch * site.num_heads * site.q_len * site.kv_len * (site.head_dim + site.v_head_dim)


def empty_result(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """What SDPA returns when a dimension is empty, or None when there is work to do.

    An empty batch, head, query or value-feature dimension gives an empty ``[B, H, Nq, Dv]``
    result; no keys (``Nk = 0``) gives zeros, since a query with no key to attend to gets 0 (SDPA's
    fully masked row). The zeros are built as sums over empty slices of q, k and v, so they are
    part of the autograd graph (zero gradients, never NaN) like SDPA's result.
    """
    B, H, Nq = q.shape[0], q.shape[1], q.shape[2]
    Nk, Dv = k.shape[2], v.shape[3]
    if B and H and Nq and Dv and Nk:
        return None
    zero = (q[..., :0].sum(-1, keepdim=True)                      # [B, H, Nq, 1]
            + k[..., :0].sum((1, 2, 3), keepdim=True).to(q.dtype)  # [B, 1, 1, 1]
            + v[:, :, :0].sum((1, 2), keepdim=True).to(q.dtype))   # [B, 1, 1, Dv]
    return zero.expand(B, H, Nq, Dv).contiguous()


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin is Union else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return
        if opt is bool and isinstance(value, bool):
            return
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if opt is str and isinstance(value, str):
            return
    names = " or ".join("None" if o is type(None) else o.__name__ for o in options)
    raise ValueError(f"{key} must be {names}, got {value!r}")
