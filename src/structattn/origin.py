"""Where a graph handed to the backend comes from: which ``torch.compile`` call, which modules.

Dynamo calls a backend with only the graph and example inputs. Two things the backend needs are
found in the running interpreter instead (private dynamo/torch internals, each lookup guarded: when
one fails the caller falls back to reading dynamo's source strings and to one report per graph):

* ``compile_identity()``: an object that is the same for every graph of one ``torch.compile``
  call (new shapes and graph breaks included) and different for another call: torch wraps a
  non-inductor backend per call in ``torch._TorchCompileWrapper``, the object that calls us (it
  holds the ``options`` dict); without it, dynamo's per-call context object.
* ``compile_roots()`` and ``frame_roots(gm)``: the modules names are relative to: the callable
  given to ``torch.compile`` (or the module it is bound to) with the arguments of the current call,
  and the modules the traced frame reaches its layers through (``L['self']``, ``L['args'][0]``,
  ``G['model']``).
"""
from __future__ import annotations

import inspect
import re
import sys
from typing import Any, Optional

import torch

_MAX_DEPTH = 400
_ROOT = re.compile(r"""^\s*([LG])\[(['"])(.*?)\2\]""")


def _dynamo_context_class() -> Optional[type]:
    try:
        from torch._dynamo.eval_frame import _TorchDynamoContext
    except ImportError:      # pragma: no cover - depends on the torch version
        return None
    return _TorchDynamoContext


def _frames():
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def compile_identity() -> Optional[Any]:
    """The per-``torch.compile``-call object on the current call stack (see module docstring), or
    None when called outside a dynamo compile or on a torch without these internals."""
    wrapper_cls = getattr(torch, "_TorchCompileWrapper", None)
    ctx_cls = _dynamo_context_class()
    ctx = None
    for frame in _frames():
        owner = frame.f_locals.get("self")
        if wrapper_cls is not None and isinstance(owner, wrapper_cls):
            return owner
        if ctx is None and ctx_cls is not None and isinstance(owner, ctx_cls):
            ctx = owner
    return ctx


def compile_roots() -> list[tuple[torch.nn.Module, str]]:
    """Modules of the innermost ``torch.compile``d call on the stack, as ``(module, prefix)``:
    the compiled module (or the module a compiled bound method belongs to) and modules passed
    as its arguments with prefix ''; the modules a compiled function reads from its globals
    with their global name as prefix (as dynamo's ``G['name']`` sources read)."""
    ctx_cls = _dynamo_context_class()
    if ctx_cls is None:
        return []
    for frame in _frames():
        local = frame.f_locals
        if isinstance(local.get("self"), ctx_cls) and callable(local.get("fn")) and "args" in local:
            fn = local["fn"]
            roots: list = []
            owner = owning_module(fn)
            if owner is not None:
                roots.append((owner, ""))
            roots += [(m, "") for m in _modules_in(local.get("args"))]
            roots += [(m, "") for m in _modules_in(local.get("kwargs"))]
            user_fn = _unwrap(fn)
            code, globs = getattr(user_fn, "__code__", None), getattr(user_fn, "__globals__", None)
            if owner is None and code is not None and isinstance(globs, dict):
                roots += [(globs[n], n) for n in code.co_names if isinstance(globs.get(n), torch.nn.Module)]
            return roots
    return []


def owning_module(fn: Any) -> Optional[torch.nn.Module]:
    """The module ``fn`` is, is bound to, or wraps (``functools.wraps`` chains)."""
    for _ in range(8):
        for candidate in (fn, getattr(fn, "__self__", None)):
            if isinstance(candidate, torch.nn.Module):
                return getattr(candidate, "_orig_mod", candidate)
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
    return None


def _unwrap(fn: Any) -> Any:
    for _ in range(8):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    return fn


def _traced_frame() -> Optional[tuple[dict, dict, Any]]:
    """(locals, globals, code) of the frame dynamo is tracing, or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        f_locals, f_globals, code = tx.f_locals, tx.f_globals, tx.f_code
    except Exception:       # private API: absent, renamed, or no frame being traced
        return None
    if not isinstance(f_locals, dict) or not isinstance(f_globals, dict):
        return None
    return f_locals, f_globals, code


def frame_module() -> Optional[torch.nn.Module]:
    """The module whose method is the frame dynamo is tracing (see ``_frame_module``)."""
    found = _frame_module()
    return found[0] if found is not None else None


def guard_frame_module(module: torch.nn.Module) -> bool:
    """Make the graph being compiled valid only for this very ``module`` (an identity guard on
    the frame local it came from); True when installed.

    Dynamo traces a layer's ``forward`` as its own frame when a graph break sits in the loop over
    layers, and then guards the layer only on its type: one graph would serve every layer of that
    class, with the per-layer rewrite chosen for the first. The guard makes it one graph per layer."""
    found = _frame_module()
    if found is None or found[0] is not module:
        return False
    try:
        from torch._dynamo.guards import GuardBuilder, install_guard
        from torch._dynamo.source import GetItemSource, LocalSource

        local, index = found[1]
        source = LocalSource(local) if index is None else GetItemSource(LocalSource(local), index)
        install_guard(source.make_guard(GuardBuilder.ID_MATCH))
    except Exception:       # private API: absent or changed
        return False
    return True


def _frame_module() -> Optional[tuple[torch.nn.Module, tuple[str, Optional[int]]]]:
    """(module, (local name, index)) of the module whose method is the frame dynamo is tracing
    (its ``self``: ops of that frame carry no ``nn_module_stack`` entry), or None for a plain
    function or an unknown frame.

    That is the frame's ``self`` local, else its first argument, else the first item of its
    ``*args`` (a forward wrapped by a decorator), when that is a module. A graph break inside a
    loop makes dynamo run the loop eagerly and trace each layer's own ``forward`` as a frame."""
    frame = _traced_frame()
    if frame is None:
        return None
    f_locals, _, code = frame
    if isinstance(f_locals.get("self"), torch.nn.Module):
        return f_locals["self"], ("self", None)
    names = getattr(code, "co_varnames", ())
    argc = getattr(code, "co_argcount", 0)
    if argc and names and isinstance(f_locals.get(names[0]), torch.nn.Module):
        return f_locals[names[0]], (names[0], None)
    if getattr(code, "co_flags", 0) & inspect.CO_VARARGS and len(names) > argc + code.co_kwonlyargcount:
        name = names[argc + code.co_kwonlyargcount]
        varargs = f_locals.get(name)
        if not argc and isinstance(varargs, tuple) and varargs and isinstance(varargs[0], torch.nn.Module):
            return varargs[0], (name, 0)
    return None


def frame_roots(sources: list[str]) -> list[tuple[torch.nn.Module, str]]:
    """Modules the frame dynamo is tracing reaches through the roots of ``sources``
    (``L['self']``, ``L['args'][0]``, ``G['model']``...), from the frame's real locals and globals."""
    frame = _traced_frame()
    if frame is None:
        return []
    f_locals, f_globals, _ = frame
    roots: list = []
    seen: set = set()
    for source in sources:
        m = _ROOT.match(source)
        if not m or (m.group(1), m.group(3)) in seen:
            continue
        seen.add((m.group(1), m.group(3)))
        scope = f_locals if m.group(1) == "L" else f_globals
        if not isinstance(scope, dict) or m.group(3) not in scope:
            continue
        value = scope[m.group(3)]
        if m.group(1) == "L":
            roots += [(mod, "") for mod in _modules_in(value)]
        elif isinstance(value, torch.nn.Module):
            roots.append((value, m.group(3)))
        else:
            roots += [(mod, f"{m.group(3)}.{i}") for i, mod in _indexed_modules(value)]
    return roots


def _modules_in(value: Any) -> list[torch.nn.Module]:
    """``value`` if it is a module, else the modules directly inside a tuple/list/dict value."""
    if isinstance(value, torch.nn.Module):
        return [value]
    return [m for _, m in _indexed_modules(value)]


def _indexed_modules(value: Any) -> list[tuple[Any, torch.nn.Module]]:
    if isinstance(value, (tuple, list)):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    else:
        return []
    return [(k, v) for k, v in items if isinstance(v, torch.nn.Module)]
