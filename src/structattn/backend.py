"""The ``structattn`` torch.compile backend: options -> Config, rewrite, compile.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="structattn", options={...})`` works without importing structattn.

One ``Report`` covers every graph of one ``torch.compile`` call: graph breaks, recompiles for new
shapes and later recompiles all append to it (``origin.compile_identity`` tells the calls apart;
``torch._dynamo.reset()`` starts fresh reports, as it starts fresh compiles).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch.fx import GraphModule

from . import origin
from .config import Config
from .passes import rewrite_attention
from .passes.fqn import FRAME_KEY, all_module_paths, names_by_id, naming, stack_names
from .report import GraphRecord, Report, set_last

# explain()/calibrate() collect every graph of their run into one session (see ``collecting``)
_COLLECTING: list = []
# per torch.compile call: id(identity object) -> (weak reference to it, its _Session)
_SESSIONS: dict = {}


class _Session:
    """What the backend keeps across the graphs of one compile: the Report, the root modules names
    are resolved against, the names seen so far, the globs already warned about."""

    def __init__(self, report: Report, roots=(), defer_warnings: bool = False):
        self.report = report
        self.roots: list = []               # (weak reference to a module, prefix): the compiled model...
        self.frame_roots: list = []         # ...and modules met in traced frames (see names_by_id)
        self.defer_warnings = defer_warnings
        self.known_names: set = set()       # every module name under the roots, every layer seen
        self.has_modules = False            # some root module is known: known_names is complete
        self.warned: set = set()
        self.add_roots(roots)

    def add_roots(self, roots, into: Optional[list] = None) -> None:
        into = self.roots if into is None else into
        have = {(id(r()), p) for r, p in into}
        for module, prefix in roots:
            if isinstance(module, torch.nn.Module) and (id(module), prefix) not in have:
                into.append((weakref.ref(module), prefix))
                have.add((id(module), prefix))

    @staticmethod
    def _alive(refs: list) -> list:
        return [(r(), p) for r, p in refs if r() is not None]

    def names_for(self, gm: GraphModule) -> dict:
        """``{nn_module_stack key: FQN}`` for ``gm``: by identity under the session's roots, the
        innermost compiled call's roots and the traced frame's roots; else from source strings."""
        sources = [e[0] if isinstance(e, tuple) else str(e)
                   for node in gm.graph.nodes for e in (node.meta.get("nn_module_stack") or {}).values()]
        own = origin.frame_module()
        self.add_roots(origin.compile_roots())
        self.add_roots(origin.frame_roots(sources) + ([(own, "")] if own is not None else []), self.frame_roots)
        ids = names_by_id(self._alive(self.roots), self._alive(self.frame_roots))
        if ids:
            self.has_modules = True
            self.known_names.update(ids.values())
        return stack_names(gm, ids, own)

    def warn_unmatched(self, config: Config, stacklevel: int) -> None:
        """Warn once per glob of ``options['layers']`` that matches no known name."""
        attention = sorted({s.layer for s in self.report.sites})
        for pattern in config.unmatched_globs(sorted(self.known_names)):
            if pattern in self.warned:
                continue
            self.warned.add(pattern)
            shown = ", ".join(a or "<root>" for a in attention[:4]) + (", ..." if len(attention) > 4 else "")
            msg = (f"structattn: options['layers'] glob {pattern!r} matches no layer of the compiled model "
                   f"(attention layers: {shown or 'none'})")
            self.report.warnings.append(msg)
            warnings.warn(msg, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def collecting(report: Report, root: Any = None) -> Iterator[_Session]:
    """Within this block every graph the backend compiles goes to ``report`` (one session), layer
    names are resolved against ``root`` (a module, or the callable that was compiled) first, and
    unmatched-glob warnings wait for ``finish_collecting``."""
    owner = origin.owning_module(root) if root is not None else None
    session = _Session(report, [(owner, "")] if owner is not None else [], defer_warnings=True)
    _COLLECTING.append(session)
    try:
        yield session
    finally:
        _COLLECTING.remove(session)


def finish_collecting(session: _Session, options: Any, stacklevel: int = 2) -> None:
    """Warn about globs that matched no layer in any graph of a ``collecting`` run."""
    session.warn_unmatched(Config.from_options(copy.deepcopy(Config.checked_dict(options))), stacklevel + 1)


def structattn_backend(gm: GraphModule, example_inputs: list, options: Optional[dict] = None, **kwargs: Any) -> Callable:
    """Dynamo backend: rewrite attention sites of ``gm`` per ``options`` and compile the result."""
    if kwargs:
        raise ValueError(f"structattn backend: unexpected arguments {sorted(kwargs)}; pass settings in options={{...}}")
    # torch.compile hands `options` over as given (a list or a string too): Config says what is wrong
    config = Config.from_options(copy.deepcopy(Config.checked_dict(options)))
    session = _session_for(options)
    report = session.report
    names = session.names_for(gm)
    if names.get(FRAME_KEY):
        _pin_or_note_layer_frame(session, config, names[FRAME_KEY])
    before = _copy_graph_module(gm)
    with naming(names):
        sites = rewrite_attention(gm, config, graph_index=len(report.graphs))
    after = _copy_graph_module(gm)
    # compile first: a compiler that raises (dynamo's restart-analysis signals among others) makes
    # dynamo discard this graph and trace again, so it must not appear in the report
    compiled = _compile(gm, example_inputs, config.compiler)
    report.graphs.append(GraphRecord(before, after, sites, module_names=names))
    session.known_names.update(s.layer for s in sites)
    session.known_names.update(all_module_paths(gm.graph, names))
    # Decided at each new graph when the model's modules are known (all its names are, so a glob
    # that matches none of them never will); explain/calibrate decide once, after their run; a
    # compile that reaches no module (plain functions) cannot tell and does not warn.
    if not session.defer_warnings and session.has_modules:
        session.warn_unmatched(config, stacklevel=2)
    set_last(report)
    return compiled


def _pin_or_note_layer_frame(session: _Session, config: Config, name: str) -> None:
    """The graph is one layer's own frame (dynamo runs the loop over layers eagerly after a graph
    break in it) and dynamo guards that layer by its type only, so the graph would serve every
    layer of the class. With per-layer rules (or calibration routes) pin it to this layer with an
    identity guard; otherwise the shared graph is right for all of them and the report says so."""
    own = origin.frame_module()
    if own is None:
        return
    siblings = [m for root, _ in session._alive(session.roots + session.frame_roots)
                for m in root.modules() if type(m) is type(own)]
    if len({id(m) for m in siblings}) < 2:
        return                       # the only module of its class: nothing else can reuse the graph
    if config.layers or config.route:
        if origin.guard_frame_module(own):
            return
        msg = (f"structattn: dynamo traces each {type(own).__name__} layer as its own frame and may reuse one "
               f"graph for all of them; structattn could not pin the graph to {name}, so per-layer rules "
               f"of options['layers'] may reach other {type(own).__name__} layers as they reach {name}")
        if msg not in session.report.warnings:
            session.report.warnings.append(msg)
            warnings.warn(msg, stacklevel=3)
        return
    note = (f"structattn: dynamo traces each {type(own).__name__} layer as its own frame and guards it by type "
            f"only, so one graph may serve several of them: its sites are reported under the layer traced "
            f"first ({name})")
    if note not in session.report.warnings:
        session.report.warnings.append(note)


def _session_for(options: Optional[Mapping]) -> _Session:
    if _COLLECTING:
        return _COLLECTING[-1]
    identity = origin.compile_identity()
    fresh = _Session(Report(options=dict(options or {})))
    if identity is None:
        return fresh                 # no per-compile object found: one report per graph
    key = id(identity)
    entry = _SESSIONS.get(key)
    if entry is not None and entry[0]() is identity:
        return entry[1]
    try:
        ref = weakref.ref(identity, lambda r, key=key: _forget(key, r))
    except TypeError:
        return fresh
    _SESSIONS[key] = (ref, fresh)
    return fresh


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _SESSIONS.get(key)
    if entry is not None and entry[0] is ref:
        del _SESSIONS[key]


def _reset_sessions() -> None:
    """Called by ``torch._dynamo.reset()`` (through torch's backend wrapper): compiled code is gone,
    so the next graphs of a compiled model start a new report."""
    _SESSIONS.clear()


structattn_backend.reset = _reset_sessions


def _compile(gm: GraphModule, example_inputs: list, compiler: str) -> Callable:
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    """A structural copy of ``gm`` (nodes and subgraph modules; parameters shared, meta shallow)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    root = torch.nn.Module()
    for name, child in gm.named_children():
        setattr(root, name, _copy_graph_module(child) if isinstance(child, GraphModule) else child)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for node in gm.graph.nodes:  # plain tensor attributes referenced by get_attr
        if node.op == "get_attr" and not hasattr(root, node.target.split(".")[0]):
            try:
                setattr(root, node.target, getattr(gm, node.target))
            except AttributeError:
                pass
    return GraphModule(root, graph, gm.__class__.__name__)


def register() -> None:
    """Register ``backend="structattn"`` with dynamo by hand (only needed when the package is not
    installed, so its entry point is missing). Safe to call more than once."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "structattn" not in _BACKENDS or _BACKENDS.get("structattn") is None:
        register_backend(structattn_backend, name="structattn")
