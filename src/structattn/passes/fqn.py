"""Module paths: which module of the user's model a graph node came from, as its FQN (the name
``model.named_modules()`` gives it, e.g. ``encoder.layer.0.attention.self``).

Dynamo records ``node.meta["nn_module_stack"]`` as ``{key: (source, class)}`` where ``key`` is
``str(id(module))`` (``"<id>@<n>"`` for the n-th extra call of the same module) and ``source`` is how
the traced frame reached the module (``L['self'].encoder.layer.0``, ``L['args'][0].layers.0``,
``G['model'].h[1]``...). Names are resolved in two ways:

* by identity: ``names_by_id(roots)`` maps the id of every module under known root modules to its
  name; ``stack_names(gm, ids)`` turns that into ``{stack key: FQN}`` for one graph. This is exact
  whatever wrapper, decorator or frame the module was reached through.
* by reading the source string (``normalize``), for modules no root covers.

The backend sets the names of the graph it is rewriting with ``naming(...)``; ``module_path(node)``
(used by the matcher) reads them.
"""
from __future__ import annotations

import contextlib
import re
from contextvars import ContextVar
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch.fx import GraphModule, Node

#: key of the names mapping for nodes with an empty ``nn_module_stack``: ops of the traced frame's
#: own code, which belong to the module whose method that frame is (the compiled model itself, or
#: one layer when dynamo traces layers as separate frames)
FRAME_KEY = "<frame>"

#: ``{nn_module_stack key: FQN}`` of the graph being rewritten (set by ``naming``)
_ACTIVE: ContextVar[Optional[Mapping[str, str]]] = ContextVar("structattn_module_names", default=None)

_ROOT = re.compile(r"""^\s*([LG])\[(['"])(.*?)\2\]""")
_ATTR = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_INT = re.compile(r"\[\s*(-?\d+)\s*\]")
_STR = re.compile(r"""\[\s*(['"])(.*?)\1\s*\]""")
_SLICE = re.compile(r"\[\s*slice\(\s*(None|-?\d+)\s*,\s*(None|-?\d+)\s*,\s*(None|-?\d+)\s*\)\s*\]")
_CONTAINER_ATTRS = ("_modules", "_parameters", "_buffers")


def normalize(source: str) -> str:
    """The FQN a dynamo source string spells, read without the module objects.

    ``L['self'].encoder.layer[0]``, ``L['self']._modules['encoder']`` and
    ``L['args'][0].encoder.layer.0`` all give ``encoder.layer.0``: a local root (the traced frame's
    own module, also when it sits in the frame's ``args``/``kwargs``) is dropped, with the
    subscripts that pick it out of its container. A global root keeps its name
    (``G['model'].encoder`` -> ``model.encoder``), so layers of a model used by a compiled function
    read as in the user's code. Slices of ``ModuleList``/``Sequential`` followed by an index
    (``layers[1:3][0]``) give the index in the full list when the slice start is known.
    """
    text = source.strip()
    root = _ROOT.match(text)
    parts: list[str] = []
    rest = text
    local_root = False
    if root:
        rest = text[root.end():]
        if root.group(1) == "G":
            parts.append(root.group(3))
        else:
            local_root = True
    leading = local_root     # subscripts right after a local root select the module in its container
    pending_slice: Optional[tuple] = None
    while rest:
        m = _ATTR.match(rest)
        if m:
            leading = False
            pending_slice = None
            if m.group(1) not in _CONTAINER_ATTRS:
                parts.append(m.group(1))
            rest = rest[m.end():]
            continue
        m = _SLICE.match(rest)
        if m:
            start, _, step = (None if g == "None" else int(g) for g in m.groups())
            pending_slice = (start or 0, step or 1) if (start or 0) >= 0 and (step or 1) > 0 else None
            rest = rest[m.end():]
            continue
        m = _INT.match(rest) or _STR.match(rest)
        if m:
            item = m.group(1) if m.re is _INT else m.group(2)
            if pending_slice is not None and m.re is _INT and int(item) >= 0:
                item = str(pending_slice[0] + int(item) * pending_slice[1])
            pending_slice = None
            if not leading:
                parts.append(item)
            rest = rest[m.end():]
            continue
        # an expression this reader does not know: keep its dotted words as they are
        parts.extend(w for w in re.split(r"[^A-Za-z0-9_]+", rest) if w and w not in _CONTAINER_ATTRS)
        break
    return ".".join(parts)


def names_by_id(roots: Iterable[tuple[torch.nn.Module, str]],
                more: Iterable[tuple[torch.nn.Module, str]] = ()) -> dict[int, str]:
    """``{id(module): FQN}`` for every module under the root modules (``(module, prefix)`` pairs).

    ``roots`` are authoritative and go first (the compiled model, the module ``explain`` was
    given); each names what no earlier one did. ``more`` (modules found in a traced frame) only
    name modules none of ``roots`` covers, and one that sits inside another root adds nothing, so
    names are relative to the outermost module known."""
    roots = [(_unwrapped(m), p) for m, p in roots]
    more = [(_unwrapped(m), p) for m, p in more]
    trees = {}
    for module, prefix in roots + more:
        if isinstance(module, torch.nn.Module) and (id(module), prefix) not in trees:
            trees[(id(module), prefix)] = {id(sub): name for name, sub in module.named_modules(prefix=prefix)}
    out: dict[int, str] = {}
    for module, prefix in roots:
        for key, name in trees.get((id(module), prefix), {}).items():
            out.setdefault(key, name)
    for module, prefix in more:
        ids = trees.get((id(module), prefix))
        if ids is None or id(module) in out:
            continue
        if any(id(module) in other for key, other in trees.items() if key != (id(module), prefix)):
            continue
        for key, name in ids.items():
            out.setdefault(key, name)
    return out


#: data-parallel wrappers whose ``.module`` is the user's model: layers are named inside it, so
#: the same ``options["layers"]`` globs serve the model with and without the wrapper
_WRAPPERS = ("DistributedDataParallel", "DataParallel")


def _unwrapped(module):
    while type(module).__name__ in _WRAPPERS and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


def stack_names(gm: GraphModule, ids: Mapping[int, str], frame_module: Optional[torch.nn.Module] = None) -> dict[str, str]:
    """``{nn_module_stack key: FQN}`` for every module in ``gm`` and its subgraph modules:
    by identity when ``ids`` knows the module, else read from the source string; plus
    ``FRAME_KEY`` -> the name of ``frame_module`` (the traced frame's own module) when known."""
    out: dict[str, str] = {}
    if frame_module is not None and id(frame_module) in ids:
        out[FRAME_KEY] = ids[id(frame_module)]
    for graph in _graphs(gm):
        for node in graph.nodes:
            for key, entry in (node.meta.get("nn_module_stack") or {}).items():
                if key not in out:
                    module_id = _module_id(key)
                    out[key] = ids[module_id] if module_id in ids else normalize(_source(entry))
    return out


@contextlib.contextmanager
def naming(names: Optional[Mapping[str, str]]) -> Iterator[None]:
    """Within this block ``module_path`` names modules by ``names`` (``stack_names`` output)."""
    token = _ACTIVE.set(names)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def module_path(node: Node, names: Optional[Mapping[str, str]] = None) -> str:
    """FQN of the innermost module that produced ``node`` ('' for the compiled root itself; for a
    node of the traced frame's own code, the name of that frame's module when known).

    ``names`` (default: the ones set by ``naming``) maps stack keys to FQNs; keys it lacks are
    read from their source string."""
    stack = node.meta.get("nn_module_stack") or {}
    names = _ACTIVE.get() if names is None else names
    if not stack:
        return names.get(FRAME_KEY, "") if names is not None else ""
    key, entry = list(stack.items())[-1]
    if names is not None and key in names:
        return names[key]
    return normalize(_source(entry))


def all_module_paths(graph, names: Optional[Mapping[str, str]] = None) -> set[str]:
    """Every module FQN that appears in ``graph``'s nodes (for the 'glob matches nothing' warning)."""
    names = _ACTIVE.get() if names is None else names
    out: set[str] = set()
    if names is not None and FRAME_KEY in names:
        out.add(names[FRAME_KEY])
    for node in graph.nodes:
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            out.add(names[key] if names is not None and key in names else normalize(_source(entry)))
    return out


def _source(entry) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)


def _module_id(key: str) -> Optional[int]:
    """The module id in a stack key (``"<id>"`` or ``"<id>@<n>"``); None for other key formats."""
    head = str(key).split("@", 1)[0]
    return int(head) if head.isdigit() else None


def _graphs(gm: GraphModule):
    seen: set = set()
    todo = [gm]
    while todo:
        g = todo.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        yield g.graph
        todo.extend(m for m in g.modules() if isinstance(m, GraphModule) and m is not g)
