"""What the backend did: one ``Site`` per attention found, collected in a ``Report``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import networkx as nx
import sympy
import torch

from .methods.base import SiteShape

#: the shape attributes a Site reads from its SiteShape (None when the shape is unknown)
SHAPE_FIELDS = ("q_len", "kv_len", "head_dim", "num_heads", "num_kv_heads", "v_head_dim", "batch")


@dataclass
class Site:
    """One attention site. ``rewritten`` means it now runs a structattn op; ``reason`` (if set)
    says why it runs exact instead of the method that was asked for. ``shape`` is what the
    methods saw (None when the site's operands were not understood); its sizes read as
    ``site.q_len``, ``site.kv_len``, ``site.head_dim``, ``site.num_heads``, ``site.num_kv_heads``,
    ``site.v_head_dim`` and ``site.batch``. ``mask`` is the mask kind as reported (a causal
    mask declared by ``options["causal"]`` says so)."""

    layer: str
    form: str
    method: str
    params: dict
    rewritten: bool
    reason: Optional[str]
    shape: Optional[SiteShape] = None
    requested: Optional[str] = None
    mask: str = "none"
    scale: Optional[float] = None
    flops: Any = None
    exact_flops: Any = None
    node: str = ""
    graph: int = 0
    backward: str = ""
    #: traced values of symbolic sizes, e.g. {"s50": 16}, used to print numbers for expressions
    size_hints: dict = field(default_factory=dict)
    #: with the private option ``_route``: the key of this site in ``lowering.routed.ROUTES``
    route_key: Optional[str] = None
    #: with ``min_seq_len="auto"``: the kv length below which this site runs exact, and why
    min_seq_len: Optional[str] = None

    q_len = property(lambda self: self._size("q_len"))
    kv_len = property(lambda self: self._size("kv_len"))
    head_dim = property(lambda self: self._size("head_dim"))
    num_heads = property(lambda self: self._size("num_heads"))
    num_kv_heads = property(lambda self: self._size("num_kv_heads"))
    v_head_dim = property(lambda self: self._size("v_head_dim"))
    batch = property(lambda self: self._size("batch"))

    def _size(self, name: str) -> Any:
        return None if self.shape is None else getattr(self.shape, name)

    def to_dict(self) -> dict:
        """JSON-friendly dict: every field, the shape as its sizes (sympy expressions become strings)."""
        out = {}
        for f in fields(self):
            if f.name == "shape":
                out.update({k: self._size(k) for k in SHAPE_FIELDS})
            else:
                out[f.name] = getattr(self, f.name)
        return {k: _plain(v) for k, v in out.items()}


@dataclass
class GraphRecord:
    """One graph the backend compiled: the dynamo graph before and after rewriting."""

    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    sites: list
    #: ``{nn_module_stack key: module FQN}`` as resolved when the graph was compiled
    module_names: dict = field(default_factory=dict)


@dataclass
class Report:
    """Sites found in every graph of one compile (or one ``explain`` call)."""

    graphs: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    #: what the model returned during ``explain`` (None for a report made by torch.compile)
    output: Any = None

    @property
    def sites(self) -> list:
        return [s for g in self.graphs for s in g.sites]

    @property
    def graph_before(self) -> Optional[torch.fx.GraphModule]:
        """The dynamo graph before rewriting (the first one if dynamo produced several)."""
        return self.graphs[0].before if self.graphs else None

    @property
    def graph_after(self) -> Optional[torch.fx.GraphModule]:
        """The graph after rewriting, as handed to the compiler."""
        return self.graphs[0].after if self.graphs else None

    def total_flops(self) -> tuple:
        """(estimated attention FLOPs, exact attention FLOPs), summed over sites."""
        known = [s for s in self.sites if s.flops is not None and s.exact_flops is not None]
        return (sum((s.flops for s in known), 0), sum((s.exact_flops for s in known), 0))

    def hints(self) -> dict:
        """Traced values of every symbolic size in the report."""
        out: dict = {}
        for s in self.sites:
            out.update(s.size_hints)
        return out

    def flop_fraction(self, **sizes) -> Optional[float]:
        """Estimated/exact attention FLOPs as a float. Symbolic lengths take their traced values
        unless given, e.g. ``flop_fraction(s0=4096)`` (each site's own traced values: graphs of
        one compile may reuse a symbol name for another size)."""
        est, exact = self._totals_at(sizes)
        if exact == 0:
            return None
        try:
            return float(sympy.sympify(est) / sympy.sympify(exact))
        except TypeError:
            return None

    def _totals_at(self, sizes: dict) -> tuple:
        """(estimated, exact) FLOPs summed over sites, each at ``sizes`` then its traced sizes."""
        known = [s for s in self.sites if s.flops is not None and s.exact_flops is not None]
        return (sum((_at(s.flops, {**s.size_hints, **sizes}) for s in known), 0),
                sum((_at(s.exact_flops, {**s.size_hints, **sizes}) for s in known), 0))

    # -- rendering -----------------------------------------------------------------------------
    def __str__(self) -> str:
        head = ("layer", "form", "method", "params", "q x kv", "heads", "d", "mask", "GFLOP est/exact", "note")
        # symbolic sizes print as their names; FLOPs print at the traced sizes
        rows = []
        for s in self.sites:
            params = ",".join(f"{k}={v}" for k, v in s.params.items() if v is not None)
            if s.min_seq_len:
                params += f" (min_seq_len {s.min_seq_len})"
            note = s.reason or ("" if s.rewritten else "")
            rows.append((
                s.layer or "<root>", s.form, s.method + ("" if s.rewritten else " (kept)"), params or "-",
                f"{_fmt(s.q_len)}x{_fmt(s.kv_len)}", _heads(s), _fmt(s.head_dim), s.mask,
                f"{_gflop(s.flops, s.size_hints)}/{_gflop(s.exact_flops, s.size_hints)}", note,
            ))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head[:-1])]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head[:-1], widths)) + "  " + head[-1]]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
        n = len(self.sites)
        rewritten = sum(s.rewritten for s in self.sites)
        approx = sum(s.rewritten and s.method != "exact" for s in self.sites)
        est, exact = self._totals_at({})
        frac = self.flop_fraction()
        summary = (
            f"{n} attention site(s) in {len(self.graphs)} graph(s): {rewritten} rewritten, "
            f"{approx} approximated. Attention GFLOP {_gflop(est, {})} vs exact {_gflop(exact, {})}"
        )
        if frac is not None:
            summary += f" ({100 * frac:.1f}%{self._traced_sizes()})"
        return "\n".join(lines + [summary] + [f"warning: {w}" for w in self.warnings])

    def _traced_sizes(self) -> str:
        """' at traced sizes s0=128, s1=2' for the symbolic sizes the FLOP figures were evaluated
        at (those the sites' FLOP expressions contain; the first few, then how many more)."""
        values: dict = {}
        for s in self.sites:
            for v in (s.flops, s.exact_flops):
                if isinstance(v, sympy.Basic):
                    for sym in v.free_symbols:
                        if str(sym) in s.size_hints:
                            values.setdefault(str(sym), set()).add(s.size_hints[str(sym)])
        if not values:
            return ""
        names = sorted(values, key=lambda k: (len(k), k))
        shown = ", ".join(f"{k}={'|'.join(str(v) for v in sorted(values[k]))}" for k in names[:_SHOWN_SIZES])
        more = len(names) - _SHOWN_SIZES
        return f" at traced sizes {shown}" + (f" and {more} more" if more > 0 else "")

    __repr__ = __str__

    def to_dict(self) -> dict:
        """Everything in plain Python types (for JSON)."""
        est, exact = self.total_flops()
        return {
            "sites": [s.to_dict() for s in self.sites],
            "graphs": len(self.graphs),
            "flops": _plain(est),
            "exact_flops": _plain(exact),
            "options": self.options,
            "warnings": list(self.warnings),
        }

    def to_networkx(self, which: str = "after") -> nx.DiGraph:
        """The rewritten (or ``which="before"``) FX graphs as one networkx DiGraph.

        Nodes are ``"g<i>:<name>"`` with attributes op, target, layer and, for structattn ops,
        the site's method; edges follow data flow.
        """
        from .passes.fqn import module_path

        g = nx.DiGraph()
        for i, rec in enumerate(self.graphs):
            gm = rec.after if which == "after" else rec.before
            site_by_node = {s.node: s for s in rec.sites}
            for node in gm.graph.nodes:
                attrs = {"op": node.op, "target": _target(node), "graph": i}
                if node.meta.get("nn_module_stack"):
                    attrs["layer"] = module_path(node, rec.module_names)
                if "structattn." in attrs["target"]:
                    attrs["method"] = attrs["target"].split("structattn.")[1].split("_attention")[0]
                if node.name in site_by_node:
                    attrs["site"] = site_by_node[node.name].layer
                g.add_node(f"g{i}:{node.name}", **attrs)
                for inp in node.all_input_nodes:
                    g.add_edge(f"g{i}:{inp.name}", f"g{i}:{node.name}")
        return g

    def to_dot(self, which: str = "after") -> str:
        """Graphviz DOT text of ``to_networkx(which)``; structattn ops are highlighted."""
        g = self.to_networkx(which)
        lines = ["digraph structattn {", "  node [shape=box, fontsize=10];"]
        for name, attrs in g.nodes(data=True):
            label = f"{name.split(':', 1)[1]}\\n{attrs['target']}"
            style = ', style=filled, fillcolor="#ffd27f"' if "method" in attrs else ""
            lines.append(f'  "{name}" [label="{label}"{style}];')
        for a, b in g.edges():
            lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines)


def _target(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "name", None)
    if callable(name):
        return str(t)
    return getattr(t, "__qualname__", None) and f"{getattr(t, '__module__', '')}.{t.__qualname__}" or str(t)


def _plain(v: Any) -> Any:
    if isinstance(v, sympy.Basic):
        return int(v) if v.is_Integer else str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, sympy.Basic) and not v.is_Number:
        return str(v)
    return str(int(v)) if v is not None else "?"


def _gflop(v: Any, hints: dict) -> str:
    if v is None:
        return "?"
    if isinstance(v, sympy.Basic) and not v.is_Number:
        v = v.subs({sym: hints[str(sym)] for sym in v.free_symbols if str(sym) in hints})
        if not v.is_Number:
            return "symbolic"
    return f"{float(v) / 1e9:.3g}"


_SHOWN_SIZES = 4


def _at(v: Any, values: dict) -> Any:
    """``v`` with the symbols named in ``values`` replaced by them."""
    if isinstance(v, sympy.Basic) and v.free_symbols:
        return v.subs({sym: values[str(sym)] for sym in v.free_symbols if str(sym) in values})
    return v


def _heads(s: Site) -> str:
    if s.num_kv_heads is not None and s.num_kv_heads != s.num_heads:
        return f"{s.num_heads}/{s.num_kv_heads}"
    return str(s.num_heads)


_LAST: list = [None]


def set_last(report: Report) -> None:
    _LAST[0] = report


def last_report() -> Optional[Report]:
    """The Report of the latest structattn compile in this process (None before any): every graph
    compiled so far for that ``torch.compile`` call (graph breaks, recompiles for new shapes), or
    the report of the latest ``explain``/``calibrate`` run."""
    return _LAST[0]
