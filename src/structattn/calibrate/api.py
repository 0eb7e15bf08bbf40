"""The public ``calibrate``: validate the arguments, capture, measure, search, return options."""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .. import backend as _backend
from ..config import Config
from ..methods import REGISTRY, Method, SiteShape, get_method
from .capture import RoutedModel, capture_calls, normalize_samples, progress_bar
from .measure import EndToEnd, measure_layers
from .results import CalibratedOptions, CalibrationSummary
from .search import search
from .tuning import EVALS_EXTRA, EVALS_PER_LAYER

BUDGET_KEYS = ("layer_error", "cosine", "min_cosine", "metric")
E2E_KEYS = ("cosine", "min_cosine", "metric")


def default_methods() -> list[str]:
    """The methods tried when ``methods=None``: every registered method with a candidate grid
    (``Method.candidates`` overridden), exact excluded, in registry order."""
    return [name for name, m in REGISTRY.items()
            if name != "exact" and type(m).candidates is not Method.candidates]


def default_candidates(method: str, shape: SiteShape) -> list[dict]:
    """The parameter grid tried for ``method`` on a site of this shape (before ``supports`` and the
    FLOP rule): ``get_method(method).candidates(shape)``."""
    return get_method(method).candidates(shape)


def calibrate(
    model: Any,
    sample_inputs: Any,
    budget: Union[float, Mapping[str, float]] = 0.05,
    methods: Optional[Sequence[str]] = None,
    *,
    output_fn: Optional[Callable] = None,
    metric_fn: Optional[Callable] = None,
    options: Optional[Mapping[str, Any]] = None,
    layers: Optional[Sequence[str]] = None,
    candidates: Optional[Mapping[str, Union[Sequence[Mapping], Callable]]] = None,
    max_kv_heads: Optional[int] = None,
    max_evals: Optional[int] = None,
    screen: bool = True,
    progress: bool = True,
    verbose: bool = True,
) -> CalibratedOptions:
    """Choose a method and parameters for every attention layer of ``model`` that minimise attention
    FLOPs while meeting ``budget`` on ``sample_inputs``; return backend ``options``.

    Args:
        model: the model (``nn.Module`` or callable) to convert, as passed to ``torch.compile``.
            It runs in eval mode during calibration (its mode is restored afterwards).
        sample_inputs: one sample or a list of samples. A sample is a dict of keyword arguments
            (``model(**sample)``), a tuple of positional arguments (``model(*sample)``) or a tensor.
            Several samples must be a list: a tuple ``(x1, x2)`` is ONE sample, ``model(x1, x2)``.
            Samples may differ in shape and in which arguments they pass (e.g. some with and some
            without ``attention_mask``): each layer's candidates are measured on every call with
            that call's own mask, and only candidates every one of its sites supports are kept.
        budget: a float: the per-layer relative error ``||Y~ - Y||_F / ||Y||_F`` of each attention
            layer's output (exact layer inputs), same as ``{"layer_error": e}``. Or a dict with any of
            ``"layer_error"`` (per-layer cap), ``"cosine"`` (mean cosine between approximate and
            exact ``output_fn`` results, over the last dim, >= value), ``"min_cosine"`` (their
            minimum >= value), ``"metric"`` (``metric_fn(...) <= value``). The end-to-end keys are
            measured on the whole model.
        methods: method names to try (default ``("monarch", "mra", "topk")``); exact is always allowed.
        output_fn: ``output_fn(output, sample) -> Tensor`` (``sample`` is the dict / tuple given;
            anything but a tensor is a ValueError),
            what end-to-end budgets compare (e.g. pooled sentence embeddings, or per-token NLL for a
            ``metric_fn``). Default: the output tensor (``last_hidden_state`` / ``logits`` / first).
        metric_fn: ``metric_fn(approx, exact, samples) -> float``, lower is better, where ``approx``
            and ``exact`` are lists (one per sample) of ``output_fn`` results; with budget
            ``{"metric": m}`` the config must give ``metric_fn(...) <= m`` (e.g. relative increase
            of perplexity).
        options: base backend options (``compiler``, ``min_seq_len``, ``impl``, ``causal``, ``layers``
            for declared-causal rules...). They are used for capture and kept in the result; the
            calibrated per-layer entries come first in ``"layers"``.
        layers: fnmatch globs of the layers that may be approximated (default: all); others stay exact.
        candidates: per method, a list of parameter dicts or ``fn(SiteShape) -> list of dicts``
            replacing that method's own grid (``Method.candidates``).
        max_kv_heads: measure layer errors on at most this many (evenly spaced) key/value heads and
            their query heads, to bound time on long inputs (FLOPs are still for all heads).
        max_evals: cap on end-to-end model runs in the search, an int >= 0 (default
            ``2 * layers + 12``, ``tuning.py``; with 0 an end-to-end budget keeps every layer exact).
        screen: with more than 6 candidates for a layer, first measure them all on a small probe
            (the first call, <= 2 kv heads, <= 4 batch items) and measure in full only those within
            1.2x of the probe's Pareto front (a 2-5x saving; ``False`` measures every candidate).
        progress: show tqdm progress bars. verbose: print the summary.

    Returns:
        ``CalibratedOptions``, a dict accepted by ``torch.compile(model, backend="structattn",
        options=...)``; ``.summary`` is the ``CalibrationSummary``.

    Calibration resets dynamo (``torch._dynamo.reset()``) before and after, like ``explain``.
    """
    t_start = time.time()
    samples = normalize_samples(sample_inputs)
    budget = normalize_budget(budget, metric_fn)
    names = check_methods(methods)
    base = _check_options(options, layers, max_kv_heads, max_evals, candidates)
    min_seq_len, impl = int(base.get("min_seq_len", 0)), base.get("impl", "auto")
    e2e = any(k in budget for k in E2E_KEYS)

    rm = RoutedModel(model, copy.deepcopy(base))        # compiles lazily: nothing runs yet
    restore_training = _set_eval(model)
    try:
        # 1. capture: one exact run per sample, every site's inputs and output recorded
        with rm.collecting() as session:
            store, exact_outputs = capture_calls(rm, samples, sample_inputs, output_fn, e2e, progress)
        _backend.finish_collecting(session, rm.options, stacklevel=2)
        missing = sorted(s.route_key for s in rm.sites if not store.get(s.route_key))
        if missing:
            warnings.warn(f"calibrate: sites {missing} were compiled but never ran on the samples; they stay "
                          f"exact", stacklevel=2)
        # 2. per layer: every candidate's error and FLOPs, and the Pareto front
        groups, masks = _layers(rm.sites)
        choices = measure_layers(groups, masks, store, names, candidates, layers, budget.get("layer_error"),
                                 max_kv_heads, min_seq_len, impl, screen, progress)
        # 3. choose
        evaluations: list = []
        metrics: dict = {}
        picks = [0 for _ in choices]            # without an end-to-end budget: the fronts hold only
        if e2e:                                 # candidates within layer_error
            evaluate = EndToEnd(rm, samples, choices, groups, min_seq_len, impl, output_fn, metric_fn,
                                exact_outputs, budget, evaluations)
            limit = max_evals if max_evals is not None else EVALS_PER_LAYER * len(choices) + EVALS_EXTRA
            bar = progress_bar(None, progress, "calibrate: end-to-end search", total=limit)
            try:
                picks, metrics = search([c.front for c in choices], evaluate, budget, limit, bar)
            finally:
                bar.close()
        for c, i in zip(choices, picks):
            c.chosen = c.front[i]
        skipped = [f"{s.layer or '<root>'}: {s.reason}" for s in rm.report.sites if s.route_key is None]
    finally:
        rm.clear()
        torch._dynamo.reset()
        restore_training()

    # 4. options and summary
    result = _options(base, choices)
    result.summary = CalibrationSummary(
        budget=budget, layers=choices, flops=sum(c.chosen.flops for c in choices),
        exact_flops=sum(c.front[-1].flops for c in choices), metrics=metrics, evaluations=evaluations,
        skipped=skipped, samples=len(samples), seconds=time.time() - t_start,
    )
    if not choices:
        warnings.warn("calibrate: no attention site could be calibrated in this model", stacklevel=2)
    if verbose:
        print(result.summary)
    return result


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def normalize_budget(budget: Any, metric_fn: Optional[Callable]) -> dict:
    """``budget`` as a dict of floats (a plain float is ``{"layer_error": value}``); ValueError
    naming the bad key or value."""
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"calibrate: budget must be a float (per-layer relative error) or a dict with keys "
                         f"{list(BUDGET_KEYS)}; got {budget!r}")
    if isinstance(budget, (int, float)):
        budget = {"layer_error": float(budget)}
    if not isinstance(budget, Mapping) or not budget:
        raise ValueError(f"calibrate: budget must be a float (per-layer relative error) or a non-empty dict "
                         f"with keys {list(BUDGET_KEYS)}; got {budget!r}")
    out = {}
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise ValueError(f"calibrate: unknown budget key {key!r}; allowed: {list(BUDGET_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"calibrate: budget[{key!r}] must be a finite number; got {value!r}")
        value = float(value)
        if key == "layer_error" and value <= 0:
            raise ValueError(f"calibrate: budget['layer_error'] must be > 0 (a relative error); got {value}")
        if key in ("cosine", "min_cosine") and not -1.0 < value <= 1.0:
            raise ValueError(f"calibrate: budget[{key!r}] must be in (-1, 1]; got {value}")
        out[key] = value
    if "metric" in out and metric_fn is None:
        raise ValueError("calibrate: budget['metric'] needs metric_fn(approx_outputs, exact_outputs, samples) "
                         "-> float (lower is better)")
    return out


def check_methods(methods: Optional[Sequence[str]]) -> list[str]:
    """The method names to try (exact dropped, duplicates removed); ValueError for an unknown one."""
    if methods is None:
        return default_methods()
    if isinstance(methods, str):
        methods = [methods]
    out = []
    for name in methods:
        if not isinstance(name, str) or name not in REGISTRY:
            raise ValueError(f"calibrate: unknown method {name!r}; allowed: {sorted(REGISTRY)}")
        if name != "exact" and name not in out:
            out.append(name)
    return out


def _check_options(options, layers, max_kv_heads, max_evals, candidates) -> dict:
    """The user's base options (validated, ``_route`` dropped) after checking the other arguments."""
    base = Config.checked_dict(options)
    base.pop("_route", None)
    if "layers" in base and not isinstance(base["layers"], Mapping):
        raise ValueError(f"calibrate: options['layers'] must be a dict; got {base['layers']!r}")
    Config.from_options(copy.deepcopy(base))   # validate the user's options first
    if layers is not None and (isinstance(layers, str) or not all(isinstance(p, str) for p in layers)):
        raise ValueError(f"calibrate: layers must be a list of fnmatch globs; got {layers!r}")
    if max_kv_heads is not None and (not isinstance(max_kv_heads, int) or max_kv_heads < 1):
        raise ValueError(f"calibrate: max_kv_heads must be an int >= 1 or None; got {max_kv_heads!r}")
    if max_evals is not None and (isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 0):
        raise ValueError(f"calibrate: max_evals must be an int >= 0 (end-to-end runs of the search) or None; "
                         f"got {max_evals!r}")
    for name in candidates or ():
        check_methods([name])
    return base


def _set_eval(model: Any) -> Callable[[], None]:
    if isinstance(model, torch.nn.Module) and model.training:
        model.eval()
        return lambda: model.train(True)
    return lambda: None


# ------------------------------------------------------------------------------------------------
# sites and results
# ------------------------------------------------------------------------------------------------
def _layers(sites: list) -> tuple[dict, dict]:
    """``({layer: [site keys]}, {site key: mask kind})``. Sites of one layer may differ in mask
    (samples with and without attention_mask compile separate graphs): each keeps its own kind,
    and a candidate must support all of them."""
    groups: dict[str, list] = {}
    masks: dict[str, str] = {}
    for s in sites:
        groups.setdefault(s.layer, []).append(s.route_key)
        masks[s.route_key] = s.shape.mask
    return groups, masks


def _glob_escape(layer: str) -> str:
    """``layer`` as an fnmatch pattern matching exactly itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in layer)


def _options(base: dict, choices: list) -> CalibratedOptions:
    """The backend options: the user's, top-level method exact, the calibrated layers first."""
    rules: dict[str, Any] = {_glob_escape(c.layer): c.chosen.option() for c in choices}
    for pattern, spec in (base.get("layers") or {}).items():
        rules.setdefault(pattern, spec)
    result = CalibratedOptions({k: v for k, v in base.items() if k != "layers"})
    result["method"] = "exact"
    result["layers"] = rules
    Config.from_options(copy.deepcopy(dict(result)))
    return result
