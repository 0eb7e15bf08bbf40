"""Measuring: every candidate (method, params) of every layer on the layer's captured calls
(relative error of its output, FLOPs from the method's model), and whole configurations end to end.

A layer is a module name; its sites (one per compiled graph it appears in) are pooled. A
candidate's *layer error* is ``||Y_approx - Y||_F / ||Y||_F`` over all captured calls of the layer,
with the layer's exact inputs (errors of earlier layers are not propagated); query rows at
key-padded positions of self-attention are left out (nothing downstream reads them).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Callable, Optional

import torch

from ..lowering.ops import run_method
from ..methods import SiteShape, exact_flops, get_method
from ..methods.common import FILL_MASKED_AT, as_4d
from ..scoremod.terms import terms_of
from .capture import Call, RoutedModel, as_given, compared_output, progress_bar
from .results import Candidate, LayerChoice
from .search import meets, near_front, pareto_front
from .tuning import SCREEN_BATCH, SCREEN_KV_HEADS, SCREEN_MIN, SCREEN_SLACK


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------
def row_weights(call: Call) -> Optional[torch.Tensor]:
    """[B|1, H|1, Nq, 1] 0/1 weights of query rows that matter (self-attention with key padding:
    padded positions are never read downstream), or None for all rows."""
    nq, nk = call.q.shape[-2], call.k.shape[-2]
    if call.mask is None or nq != nk:
        return None
    m = as_4d(call.mask)
    if m.shape[-2] != 1:
        return None
    keep = m if m.dtype == torch.bool else m > FILL_MASKED_AT
    return keep.expand(*keep.shape[:-2], 1, nk).transpose(-1, -2).to(call.out.dtype)   # [B|1, H|1, N, 1]


def subsample(call: Call, max_kv_heads: Optional[int], max_batch: Optional[int] = None) -> Call:
    """``call`` restricted to its first ``max_batch`` batch items and ``max_kv_heads`` evenly spaced
    key/value heads (with their query heads); the mask follows (SDPA broadcasting)."""
    mask = None if call.mask is None else as_4d(call.mask)
    call = dataclasses.replace(call, mask=mask)
    if max_batch is not None and call.q.shape[0] > max_batch:
        if mask is not None and mask.shape[0] > 1:
            mask = mask[:max_batch]
        call = Call(call.q[:max_batch], call.k[:max_batch], call.v[:max_batch], mask, call.scale, call.is_causal,
                    call.out[:max_batch], call.mods)
    hk = call.k.shape[1]
    if max_kv_heads is None or hk <= max_kv_heads or call.mods.text:
        # a score modification reads the head index: its heads are measured as they are
        return call
    g = call.q.shape[1] // hk
    kv_idx = torch.linspace(0, hk - 1, max_kv_heads).round().long().unique()
    q_idx = (kv_idx.view(-1, 1) * g + torch.arange(g).view(1, -1)).reshape(-1)
    mask = call.mask
    if mask is not None and mask.shape[1] > 1:
        mask = mask[:, q_idx]
    return Call(call.q[:, q_idx], call.k[:, kv_idx], call.v[:, kv_idx], mask, call.scale, call.is_causal,
                call.out[:, q_idx], call.mods)


def shape_of(call: Call, mask_kind: str) -> SiteShape:
    """The ``SiteShape`` of a captured call, with its site's mask kind."""
    q, k, v = call.q, call.k, call.v
    return SiteShape(int(q.shape[0]), int(q.shape[1]), int(k.shape[1]), int(q.shape[2]), int(k.shape[2]),
                     int(q.shape[3]), int(v.shape[3]), mask_kind, q.dtype,
                     terms_of(call.mods.text, call.mods.window_left, call.mods.window_right))


def layer_error(method, params, calls: list, min_seq_len: int, impl: str, tensors: tuple = ()) -> float:
    """Relative Frobenius error of ``method`` over ``calls`` (weighted rows; inf if non-finite);
    ``tensors``: the layer's constants for a method that takes them (``Method.bind``)."""
    return output_error(calls, lambda call: run_method(
        method, call.q, call.k, call.v, call.mask, call.scale, call.is_causal, min_seq_len, impl, params,
        mods=call.mods, tensors=tensors))


def output_error(calls: list, run: Callable) -> float:
    """Relative Frobenius error of ``run(call)`` against each call's exact output, over ``calls``
    (query rows weighted by ``row_weights``); inf if non-finite."""
    num = den = 0.0
    for call in calls:
        diff = (run(call).to(call.out.dtype) - call.out).double()
        ref = call.out.double()
        w = row_weights(call)
        if w is not None:
            diff, ref = diff * w, ref * w
        num += float(diff.pow(2).sum())
        den += float(ref.pow(2).sum())
    if not math.isfinite(num):
        return math.inf
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def grid(name: str, shape: SiteShape, candidates) -> list[dict]:
    """The parameter dicts tried for method ``name``: the user's ``candidates[name]`` (a list, or
    ``fn(shape)``) or the method's own ``candidates(shape)``."""
    if candidates is not None and name in candidates:
        spec = candidates[name]
        return [dict(g) for g in (spec(shape) if callable(spec) else spec)]
    return get_method(name).candidates(shape)


@dataclasses.dataclass
class LayerPlan:
    """What will be measured for one layer: its calls, their shapes, the candidates
    ``(method, params, params dict, FLOPs, constant tensors)`` every one of its sites supports, and
    the refusals."""

    layer: str
    kinds: str
    calls: list
    shapes: list
    todo: list
    refused: dict


def plan_layer(layer: str, calls: list, shapes: list, names: list, candidates, allowed: Optional[list],
               method_options: Optional[dict] = None, fit: Optional[Callable] = None) -> LayerPlan:
    """Candidates for one layer, before measuring: from each method's grid (at the first call's
    shape; ``method_options[name]``, e.g. ``options["linear"]``, fills what a candidate leaves
    unset), kept when every site supports them and they cost fewer FLOPs than exact attention.
    A method with per-layer constants (``takes_tensors``) gets them from ``fit(method, layer,
    calls, shapes, params) -> (params, tensors, reason)`` once the cheap checks passed."""
    todo, refused = [], {}
    if allowed is None or any(fnmatch.fnmatchcase(layer, p) for p in allowed):
        exact_f = sum(float(exact_flops(sh)) for sh in shapes)
        for name in names:
            method = get_method(name)
            for values in grid(name, shapes[0], candidates):
                values = {**(method_options or {}).get(name, {}), **values}
                params = method.make_params(values, where=f"calibrate candidates[{name!r}]")
                reason = next((r for r in (method.supports(sh, params) for sh in shapes) if r), None)
                if reason is None and sum(float(method.flops(sh, params)) for sh in shapes) >= exact_f:
                    continue
                tensors = ()
                if reason is None and method.takes_tensors:
                    if fit is None:
                        raise ValueError(f"calibrate: method {name!r} needs per-layer constants and no fit was given")
                    params, tensors, reason = fit(method, layer, calls, shapes, params)
                if reason is not None:
                    refused.setdefault(name, reason)
                    continue
                flops = sum(float(method.flops(sh, params)) for sh in shapes)
                if flops < exact_f:
                    full = {f.name: getattr(params, f.name) for f in method.param_fields()}
                    todo.append((method, params, full, flops, tensors))
    kinds = ", ".join(dict.fromkeys(sh.mask for sh in shapes))
    return LayerPlan(layer, kinds, calls, shapes, todo, refused)


def measure_layer(plan: LayerPlan, cap: Optional[float], max_kv_heads, min_seq_len: int, impl: str, screen: bool,
                  bar) -> LayerChoice:
    """Measure a layer's candidates (after a screening pass on a small probe when there are many)
    and keep its Pareto front; the choice starts as exact (the front's last point)."""
    sampled = [subsample(c, max_kv_heads) for c in plan.calls]
    exact_f = sum(float(exact_flops(sh)) for sh in plan.shapes)
    measured = [Candidate("exact", {}, 0.0, exact_f, exact_f)]
    # candidates with constants (fitted per layer for every head) are measured on every call and
    # head, never screened on a probe
    fixed = [c for c in plan.todo if c[4]]
    todo, screened_out = [c for c in plan.todo if not c[4]], 0
    with torch.no_grad():
        probe = [subsample(sampled[0], SCREEN_KV_HEADS, SCREEN_BATCH)]
        work = sum(c.q.numel() * c.k.shape[-2] for c in sampled)
        if screen and len(todo) > SCREEN_MIN and probe[0].q.numel() * probe[0].k.shape[-2] * 2 <= work:
            rough = []
            for cand in todo:
                rough.append((cand, layer_error(cand[0], cand[1], probe, min_seq_len, impl)))
                bar.update(1)
            kept = near_front([(c[3], e) for c, e in rough], SCREEN_SLACK)
            screened_out = len(todo) - len(kept)
            todo = [rough[i][0] for i in kept]
            bar.total += len(todo)
            bar.refresh()
        for method, params, full, flops, tensors in todo + fixed:
            err = layer_error(method, params, plan.calls if tensors else sampled, min_seq_len, impl, tensors)
            measured.append(Candidate(method.name, full, err, flops, exact_f))
            bar.update(1)
    front = pareto_front(measured[1:], measured[0], cap)
    sh = plan.shapes[0]
    return LayerChoice(plan.layer, plan.kinds, sh.q_len, sh.kv_len, sh.num_heads, sh.num_kv_heads, sh.head_dim,
                       len(plan.calls), measured, front, front[-1], plan.refused, screened_out)


def measure_layers(groups: dict, masks: dict, store: dict, names: list, candidates, allowed, cap, max_kv_heads,
                   min_seq_len: int, impl: str, screen: bool, progress: bool, method_options: Optional[dict] = None,
                   fit: Optional[Callable] = None) -> list[LayerChoice]:
    """One ``LayerChoice`` per layer with captured calls (``groups``: layer -> site keys; ``masks``:
    site key -> mask kind; ``store``: site key -> calls; ``method_options`` and ``fit`` as in
    ``plan_layer``)."""
    plans = []
    for layer, keys in groups.items():
        calls = [c for key in keys for c in store.get(key, [])]
        if calls:
            shapes = [shape_of(c, masks[key]) for key in keys for c in store.get(key, [])]
            plans.append(plan_layer(layer, calls, shapes, names, candidates, allowed, method_options, fit))
    bar = progress_bar(None, progress, "calibrate: layer errors", total=sum(len(p.todo) for p in plans))
    choices = [measure_layer(p, cap, max_kv_heads, min_seq_len, impl, screen, bar) for p in plans]
    bar.close()
    return choices


def _bound(method, choice: LayerChoice, params) -> tuple:
    """(params, tensors) of ``method.bind`` for the layer of ``choice`` (a refusal here means the
    weights changed since the layer was measured: an error)."""
    shape = SiteShape(1, choice.num_heads, choice.num_kv_heads, choice.q_len, choice.kv_len, choice.head_dim,
                      choice.head_dim)
    bound = method.bind(choice.layer, shape, params)
    if isinstance(bound, str):
        raise RuntimeError(f"calibrate: {method.name} on {choice.layer!r} was measured but now refuses: {bound}")
    return bound


# ------------------------------------------------------------------------------------------------
# whole configurations
# ------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


class EndToEnd:
    """``evaluate(picks)`` for ``search.search``: runs the routed model on the samples with each
    layer on its picked front point and measures the budget's metrics against the exact outputs.
    The all-exact configuration is the reference itself (no model run). Each real run is logged."""

    def __init__(self, rm: RoutedModel, samples: list, choices: list, groups: dict, min_seq_len: int, impl: str,
                 output_fn: Optional[Callable], metric_fn: Optional[Callable], exact_outputs: list, budget: dict,
                 log: list):
        self.rm, self.samples, self.choices, self.groups = rm, samples, choices, groups
        self.min_seq_len, self.impl = min_seq_len, impl
        self.output_fn, self.metric_fn, self.exact_outputs = output_fn, metric_fn, exact_outputs
        self.budget, self.log = budget, log
        self.exact_total = sum(c.front[-1].flops for c in choices)

    def __call__(self, picks: tuple) -> tuple[bool, dict]:
        if all(i == len(c.front) - 1 for c, i in zip(self.choices, picks)):
            return True, self._metrics(self.exact_outputs, exact=True)
        for c, i in zip(self.choices, picks):
            cand = c.front[i]
            for key in self.groups[c.layer]:
                if cand.method == "exact":
                    self.rm.route(key, None)
                else:
                    method = get_method(cand.method)
                    params, tensors = method.make_params(cand.params), ()
                    if method.takes_tensors:        # the constants the compiled site will get
                        params, tensors = _bound(method, c, params)
                    self.rm.route_method(key, method, params, self.min_seq_len, self.impl, tensors)
        outs = []
        for s in self.samples:
            out = self.rm(*s[0], **s[1])
            outs.append(compared_output(self.output_fn, out, s))
            del out
        self.rm.clear()                          # back to capture-free exact routes
        metrics = self._metrics(outs)
        ok = meets(self.budget, metrics)
        flops = sum(c.front[i].flops for c, i in zip(self.choices, picks))
        self.log.append({"fraction": flops / self.exact_total if self.exact_total else 1.0, **metrics, "passed": ok})
        return ok, metrics

    def _metrics(self, outs: list, exact: bool = False) -> dict:
        """The budget's end-to-end metrics of ``outs`` against the exact outputs."""
        metrics = {}
        if "cosine" in self.budget or "min_cosine" in self.budget:
            if exact:
                metrics.update(cosine=1.0, min_cosine=1.0)
            else:
                cos = torch.cat([torch.nn.functional.cosine_similarity(_rows(a), _rows(e), dim=-1)
                                 for a, e in zip(outs, self.exact_outputs)])
                cos = torch.nan_to_num(cos, nan=-1.0)
                metrics["cosine"] = float(cos.mean())
                metrics["min_cosine"] = float(cos.min())
        if "metric" in self.budget:
            metrics["metric"] = float(self.metric_fn(outs, self.exact_outputs, [as_given(s) for s in self.samples]))
        return metrics
