"""Module paths: from dynamo's ``nn_module_stack`` to FQNs like ``encoder.layer.0.attention.self``."""
from __future__ import annotations

import re
from typing import Optional

from torch.fx import Node

_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]")
_MODULES_ITEM = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def normalize(source: str) -> str:
    """``L['self'].encoder.layer[0]`` / ``L['self']._modules['encoder']`` -> ``encoder.layer.0``.

    A local root (the compiled module itself) is dropped; a global root keeps its name
    (``G['model'].encoder`` -> ``model.encoder``) so layers of a model used by a compiled function
    read as in the user's code.
    """
    path = source
    prefix = ""
    root = _ROOT.match(path)
    if root:
        if root.group(0).startswith("G"):
            prefix = root.group(0)[3:-2]
        path = path[root.end():]
    path = _MODULES_ITEM.sub(r".\1", path)
    path = _ITEM.sub(r".\1", path)
    path = path.lstrip(".")
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    return path


def module_path(node: Node) -> str:
    """FQN of the innermost module that produced ``node`` ('' for the compiled root itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    source = list(stack.values())[-1]
    source = source[0] if isinstance(source, tuple) else str(source)
    return normalize(source)


def module_class(node: Node) -> Optional[str]:
    """Class name of the innermost module of ``node``, if known."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    entry = list(stack.values())[-1]
    cls = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else None
    return getattr(cls, "__name__", None) if cls is not None and not isinstance(cls, str) else cls


def all_module_paths(graph) -> set[str]:
    """Every module FQN that appears in ``graph``'s nodes (for the 'glob matches nothing' warning)."""
    out: set[str] = set()
    for node in graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            out.add(normalize(entry[0] if isinstance(entry, tuple) else str(entry)))
    return out
