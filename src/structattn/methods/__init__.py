"""The method registry. Adding a method is one folder ``methods/<name>/`` plus one import and one
``register`` line below (docs/architecture.md, "Adding a method")."""
from __future__ import annotations

from .base import MASK_KINDS, Method, SiteShape, exact_flops
from .exact import ExactMethod
from .linear import LinearMethod
from .monarch import MonarchMethod
from .mra import MraMethod
from .topk import TopkMethod
from .routing import RoutingMethod

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its ``name`` must be new)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; ValueError listing the allowed names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {sorted(REGISTRY)}") from None


register(ExactMethod())
register(MonarchMethod())
register(MraMethod())
register(TopkMethod())
register(LinearMethod())
register(RoutingMethod())

__all__ = ["Method", "SiteShape", "MASK_KINDS", "REGISTRY", "register", "get_method", "exact_flops"]
