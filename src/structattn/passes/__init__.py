"""Pure FX passes: expand fused modules, find attention sites, rewrite them, describe them."""
from __future__ import annotations

from typing import Any

from dataclasses import replace

import sympy
import torch
from torch.fx import GraphModule

from ..config import Config
from ..methods import SiteShape, exact_flops, get_method
from ..methods.base import takes_mods
from ..scoremod.terms import labels
from ..report import Site
from ..lowering.crossover import NEVER
from .canonical import erase_dead, functionalize_inplace
from .cost import auto_min_seq_len, cost_reason
from .expand import expand_fused_modules
from .masks import plan_mask
from .terms import biases_into_mod, site_terms
from .windows import implied_window, window_plan
from .match import Match, find_sites
from .rewrite import rewrite_site
from .shield import shield_softmax
from .table import example

__all__ = ["rewrite_attention", "find_sites"]


def rewrite_attention(gm: GraphModule, config: Config, graph_index: int = 0) -> list[Site]:
    """Rewrite every attention site of ``gm`` (and of its subgraph modules) in place."""
    functionalize_inplace(gm.graph)
    sites: list[Site] = [_handle(gm, m, config, graph_index) for m in expand_fused_modules(gm)]
    # Match again after every rewrite: a later site may read an earlier site's output (stacked
    # layers), and must see the node that replaced it.
    done: set = set()
    declined: list = []
    while True:
        pending = [m for m in find_sites(gm.graph) if m.anchor not in done]
        if not pending:
            break
        done.add(pending[0].anchor)
        sites.append(_handle(gm, pending[0], config, graph_index))
        if pending[0].reason is not None and pending[0].form == "decomposed":
            declined.append(pending[0].anchor)
    if config.compiler == "inductor":
        # inductor's own attention patterns must not fire on what structattn declined
        for anchor in declined:
            shield_softmax(gm.graph, anchor)
    for name, sub in _subgraph_modules(gm):
        # constants a rewrite stores in a subgraph are buffers of the root module too: they are
        # declared to AOT autograd under their qualified name (rewrite._register_constant)
        sources, prefix = getattr(gm, "_structattn_scope", (getattr(gm, "_param_name_to_source", None), ""))
        sub._structattn_scope = (sources, f"{prefix}{name}.")
        sites.extend(rewrite_attention(sub, config, graph_index))
    gm.graph.lint()
    gm.recompile()
    return sites


def _subgraph_modules(gm: GraphModule):
    """GraphModules called by higher-order ops (activation checkpoint bodies ``wrap_body_*``...)."""
    seen = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sub = getattr(gm, node.target, None)
            if isinstance(sub, GraphModule) and id(sub) not in seen:
                seen.add(id(sub))
                yield node.target, sub


def _handle(gm: GraphModule, m: Match, config: Config, graph_index: int) -> Site:
    resolved = config.resolve(m.layer)
    shape = _site_shape(m)
    site = Site(
        layer=m.layer, form=m.form, method="exact", params={}, rewritten=False, reason=m.reason, shape=shape,
        requested=resolved.method, scale=m.scale if m.reason is None else None,
        node=m.anchor.name, graph=graph_index, size_hints=_size_hints(m),
    )
    if shape is not None and shape.head_dim is not None:
        site.exact_flops = site.flops = exact_flops(shape)
    if m.reason is not None:
        site.reason = f"not rewritten: {m.reason}"
        return site

    plan = plan_mask(m.masks, m.is_causal, tuple(m.scores_shape[-2:]) if m.scores_shape else None)
    if plan.reason is not None:
        m.refuse(plan.reason)
        site.reason, site.scale = f"not rewritten: {plan.reason}", None
        return site
    plan = biases_into_mod(m, plan)
    # a declared causal mask replaces a mask that stays general (and the window it implied with
    # it); a mask proven to be causal & window (& padding) needs no declaration
    proven = window_plan(plan) if plan.kind == "general" else None
    if proven is not None:
        # a general mask proven to be exactly causal & window: the op gets is_causal and the window
        plan, m.window = proven
        m.masks = []
    elif plan.kind == "general" and not resolved.causal:
        m.window = implied_window(plan)
    kind = plan.kind
    if resolved.causal and kind == "general":
        kind = "causal"
    terms = site_terms(m, kind, plan)
    shape = site.shape = replace(shape, mask=kind, terms=terms)
    site.mask = kind + (" (declared)" if resolved.causal and plan.kind == "general" else "")
    site.terms = labels(terms)

    method, params = get_method(resolved.method), resolved.params
    tensors = ()
    with torch._subclasses.fake_tensor.unset_fake_temporarily():   # real constants, not fakes
        bound = method.bind(m.layer, shape, params, example(m.q.node).device)
    if isinstance(bound, str):
        reason = bound
    else:
        params, tensors = bound
        reason = method.supports(shape, params)
    if reason is None and (m.score_mod or m.window != (-1, -1)) and not takes_mods(method.forward):
        reason = f"takes no score modifications ({site.terms})"
    if reason is None and config.exact_when_cheaper and not config.route:
        reason = cost_reason(method, shape, params, site.size_hints)
    min_seq_len = config.min_seq_len
    if reason is None and min_seq_len == "auto":
        device = example(m.q.node).device
        min_seq_len = auto_min_seq_len(method, params, shape, device)
        site.min_seq_len = f"auto: {min_seq_len}" if min_seq_len < NEVER else "auto: never faster here"
    if reason is None and isinstance(shape.kv_len, int) and shape.kv_len < min_seq_len:
        reason = f"kv length {shape.kv_len} < min_seq_len {min_seq_len}" + (" (auto)" if config.min_seq_len == "auto" else "")
    if reason is not None:
        site.reason = f"{method.name}: {reason}"
        method = get_method("exact")
        params, tensors = method.Params(), ()
    if min_seq_len == "auto" or method.name == "exact":
        min_seq_len = 0
    if config.route:
        site.route_key = f"{graph_index}:{m.layer}:{m.anchor.name}"
    rewrite_site(gm.graph, m, plan, method, params, min_seq_len, config.impl, resolved.causal,
                 route_key=site.route_key, tensors=tensors, owner=gm)
    erase_dead([m.output])
    if m.form == "sdpa" and m.anchor is not m.output:
        # a fused SDPA kernel: its unused logsumexp items, then the kernel (dropout_p is 0, so
        # its "nondeterministic" tag does not keep it alive)
        erase_dead([u for u in m.anchor.users if not u.users])
        if not m.anchor.users and not getattr(m.anchor, "_erased", False):
            gm.graph.erase_node(m.anchor)
    site.rewritten = True
    site.method = method.name
    site.params = {f.name: getattr(params, f.name) for f in method.param_fields()}
    site.flops = method.flops(shape, params)
    site.backward = "" if method.name == "exact" else "reference autograd (recomputed in torch)"
    return site


def _dim(x: Any) -> Any:
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return int(x)


def _size_hints(m: Match) -> dict:
    """Traced values of the symbolic sizes in this site's shapes ({symbol name: int})."""
    hints = {}
    for op in (m.q, m.k, m.v):
        val = example(op.node) if op is not None else None
        for size in (val.shape if val is not None else ()):
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                values = getattr(env, "backed_var_to_val", None) or env.var_to_val  # renamed in torch 2.13
                for sym in size.node.expr.free_symbols:
                    if sym in values:
                        hints[str(sym)] = int(values[sym])
    return hints


def _site_shape(m: Match) -> SiteShape | None:
    shapes = [m.operand_shape(n) for n in ("q", "k", "v")]
    if any(s is None for s in shapes):
        return _shape_from_scores(m)
    q, k, v = shapes
    if len(q) == 4:
        batch, heads, kv_heads = _dim(q[0]), _dim(q[1]), _dim(k[1])
    elif len(q) == 3:
        batch, heads, kv_heads = 1, _dim(q[0]), _dim(q[0])
    else:
        batch, heads, kv_heads = 1, 1, 1
    dtype = example(m.q.node).dtype
    return SiteShape(batch, heads, kv_heads, _dim(q[-2]), _dim(k[-2]), _dim(q[-1]), _dim(v[-1]), "none", dtype)


def _shape_from_scores(m: Match) -> SiteShape | None:
    s = m.scores_shape
    if not s:
        return None
    lead = [_dim(x) for x in s[:-2]]
    batch = lead[0] if len(lead) >= 2 else 1
    heads = lead[-1] if lead else 1
    return SiteShape(batch, heads, heads, _dim(s[-2]), _dim(s[-1]), None, None)


