"""``structattn.calibrate``: pick a method and parameters per attention layer from sample inputs.

    options = structattn.calibrate(model, samples, budget={"cosine": 0.99}, output_fn=embedding)
    compiled = torch.compile(model, backend="structattn", options=options)
    print(options.summary)          # per layer: method, params, measured error, FLOP fraction

How it works (no recompiles, one exact capture run):

1. **Capture.** The model is compiled once with the private backend option ``"_route": True`` (every
   attention site becomes ``structattn::routed_attention`` with a site key; see
   ``lowering/routed.py``) and the eager compiler, then run exactly on every sample while each site's
   route records its inputs (q, k, v, mask, scale, is_causal) and its exact output.
2. **Per-layer table.** For every layer (module FQN; several sites of one FQN are pooled), every
   candidate (method, params) from a grid derived from the layer's sequence length
   (``default_candidates``) and accepted by ``method.supports`` runs on the captured inputs. Its
   *layer error* is the relative Frobenius error ``||Y_approx - Y||_F / ||Y||_F`` of the attention
   output over all captured calls, with the layer's *exact* inputs (errors of earlier layers are not
   propagated). Query rows at key-padded positions of self-attention are left out: nothing
   downstream reads them. Its FLOPs come from the method's FLOP model (the one the report uses) at
   the captured shapes. With many candidates, a screening pass on a small probe (first call, two
   kv heads, four batch items) keeps only those near the probe's Pareto front for the full measure.
3. **Choice.** Per layer, the measured candidates on the Pareto front (fewer FLOPs, lower error)
   are kept, followed by exact attention (error 0), the fallback.
   * ``budget={"layer_error": e}`` (or a plain float): each layer takes its cheapest candidate with
     error <= e (optimal for that budget among the measured candidates).
   * end-to-end budgets (``"cosine"``, ``"min_cosine"``, ``"metric"``) are checked by running the
     whole routed model on the samples (a configuration is applied by editing the routes: no
     recompiles). The search (``_search``) runs the cheapest configuration first (done if it
     passes); then fits a *sensitivity model*: the metric's deficit from exact (1 - cosine, or
     metric - exact metric) is close to additive over layers and quadratic in each layer's error,
     ``deficit ~= sum_l s_l * err_l**2`` (on MiniLM the sum of the six single-layer deficits was
     within 2% of the deficit with all six layers approximated), and ``s_l`` varies a lot between
     layers (MiniLM's last layer is about 4x as sensitive as the others). One run per layer (or per
     group of consecutive layers when runs are scarce) approximates only that layer at an error near
     0.15 and gives ``s_l`` (floored at a tenth of the median: a probe that did no harm must not
     make a layer look free). A multiple-choice knapsack (dynamic programming) then picks the
     cheapest front point per layer, among those with at most twice the probe's error (the model
     is not trusted further out: on SmolLM2 a layer harmless at error 0.15 ruined perplexity at
     0.6), whose predicted deficit fits the budget; the run of that
     configuration rescales the model (measured / predicted), and the allocation is repeated a few
     times. Finally single layers move one step further down their fronts, the move with the most
     FLOPs saved per unit of predicted deficit first, kept only when the budget still holds (a
     rejected layer is not retried) until ``max_evals`` runs are spent. If no model-based
     configuration passed, a bisection on one error threshold shared by all layers comes first.
     Every returned configuration was measured end to end and met the budget (all-exact is the
     fallback and needs no run).
4. The result is a plain ``options`` dict (a ``dict`` subclass carrying ``.summary``): top-level
   ``"method": "exact"`` (sites not seen during calibration stay exact) and one ``"layers"`` entry per
   calibrated layer FQN with the chosen method and all its parameters, before the user's own rules.

Budgets are met on the calibration samples; check held-out data before trusting them elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from .config import Config
from .methods import SiteShape, exact_flops, get_method, REGISTRY
from .methods.exact import sdpa
from .methods.masks import MASKED_BELOW
from .methods.monarch import ceil_div, ceil_sqrt

__all__ = ["calibrate", "CalibratedOptions", "CalibrationSummary", "LayerChoice", "Candidate",
           "default_candidates", "DEFAULT_METHODS"]

#: methods tried when ``methods=None``
DEFAULT_METHODS = ("monarch", "mra", "topk")
_BUDGET_KEYS = ("layer_error", "cosine", "min_cosine", "metric")


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One (method, params) measured on a layer: relative error and FLOPs over the captured calls."""

    method: str
    params: dict
    error: float
    flops: float
    exact_flops: float

    @property
    def fraction(self) -> float:
        return self.flops / self.exact_flops if self.exact_flops else 1.0

    def label(self) -> str:
        if self.method == "exact":
            return "exact"
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in self.params.items()) + ")"

    def option(self) -> Union[str, dict]:
        """The value of this choice in ``options["layers"]``."""
        return "exact" if self.method == "exact" else {"method": self.method, **self.params}


@dataclass
class LayerChoice:
    """What calibration measured and chose for one layer (module FQN)."""

    layer: str
    mask: str                   # mask kind(s) of its sites, e.g. "none, key_padding"
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    calls: int
    candidates: list            # every measured Candidate (exact first)
    front: list                 # the Pareto front, by increasing FLOPs (exact last)
    chosen: Candidate
    refused: dict = field(default_factory=dict)   # method -> reason from ``supports``
    screened_out: int = 0       # candidates dropped by the screening pass (never fully measured)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("layer", "mask", "q_len", "kv_len", "num_heads", "num_kv_heads",
                                             "head_dim", "calls", "refused", "screened_out")}
        d["chosen"] = dataclasses.asdict(self.chosen)
        d["candidates"] = [dataclasses.asdict(c) for c in self.candidates]
        return d


@dataclass
class CalibrationSummary:
    """Everything ``calibrate`` measured; ``print(summary)`` shows the per-layer table and totals."""

    budget: dict
    layers: list                                   # LayerChoice per calibrated layer
    flops: float = 0.0                             # chosen attention FLOPs on the samples
    exact_flops: float = 0.0
    metrics: dict = field(default_factory=dict)    # end-to-end measurements of the chosen config
    evaluations: list = field(default_factory=list)  # (flop fraction, metrics, passed) per e2e run
    skipped: list = field(default_factory=list)    # sites that cannot be rewritten (and why)
    samples: int = 0
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.flops / self.exact_flops if self.exact_flops else 1.0

    def to_dict(self) -> dict:
        return {"budget": dict(self.budget), "layers": [l.to_dict() for l in self.layers], "flops": self.flops,
                "exact_flops": self.exact_flops, "fraction": self.fraction, "metrics": dict(self.metrics),
                "evaluations": list(self.evaluations), "skipped": list(self.skipped), "samples": self.samples,
                "seconds": self.seconds}

    def __str__(self) -> str:
        head = ("layer", "mask", "q x kv", "choice", "layer err", "FLOPs")
        rows = [(l.layer or "<root>", l.mask, f"{l.q_len}x{l.kv_len}", l.chosen.label(), f"{l.chosen.error:.4f}",
                 f"{100 * l.chosen.fraction:.1f}%") for l in self.layers]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        approx = sum(l.chosen.method != "exact" for l in self.layers)
        budget = ", ".join(f"{k} {'<=' if k in ('layer_error', 'metric') else '>='} {v:g}" for k, v in self.budget.items())
        lines.append(
            f"calibrated {len(self.layers)} layer(s) on {self.samples} sample(s) in {self.seconds:.1f} s: "
            f"{approx} approximated; attention FLOPs {100 * self.fraction:.1f}% of exact; budget {budget}"
        )
        if self.metrics:
            lines.append("end to end on the samples: " + ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
                         + f" ({len(self.evaluations)} end-to-end run(s))")
        for s in self.skipped:
            lines.append(f"not calibrated: {s}")
        return "\n".join(lines)

    __repr__ = __str__


class CalibratedOptions(dict):
    """The backend ``options`` dict returned by ``calibrate``; ``.summary`` holds the measurements."""

    summary: Optional[CalibrationSummary] = None

    def __deepcopy__(self, memo):
        out = CalibratedOptions(copy.deepcopy(dict(self), memo))
        out.summary = self.summary
        return out

    def __copy__(self):
        out = CalibratedOptions(self)
        out.summary = self.summary
        return out


# ------------------------------------------------------------------------------------------------
# candidate grids
# ------------------------------------------------------------------------------------------------
def _pow2_between(lo: float, hi: float) -> list[int]:
    out, p = [], 1
    while p <= hi:
        if p >= lo:
            out.append(p)
        p *= 2
    return out


_MRA_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 7 / 16, 1 / 2, 5 / 8, 3 / 4)


def default_candidates(method: str, shape: SiteShape) -> list[dict]:
    """The parameter grid tried for ``method`` on a site of this shape (before ``supports``).

    * monarch: block size b a power of two in [N/32, N/4] (and >= 2) plus ceil(sqrt(N)); steps T in 1..2
      (T = 3 was never on a measured Pareto front);
    * mra: variant mra2 with blocks b in {8, 16} for N <= 512 and {16, 32} above (smaller blocks had
      lower error at equal FLOPs on every real layer we measured); ``blocks_per_row`` r giving about
      1/32 .. 3/4 of the key blocks (r < number of key blocks); on causal sites also with
      ``sink_blocks=1`` (the first key block always exact: on SmolLM2 at 1K tokens, b=32 r=4 on
      all layers went from perplexity 63.8 to 34.2 with it, exact 30.2);
    * topk: k in {N/32, N/16, N/8, N/4} (k >= 4, k < N);
    * a method with its own ``candidates(shape)`` (routing): that grid;
    * any other registered method: its default parameters.
    Candidates whose estimated FLOPs are not below exact attention's are dropped later.
    """
    own = getattr(REGISTRY.get(method), "candidates", None)
    if own is not None:
        return own(shape)
    n = int(shape.kv_len)
    if method == "monarch":
        blocks = sorted(set(_pow2_between(max(2, n / 32), n / 4)) | ({ceil_sqrt(n)} if n >= 4 else set()))
        return [{"block_size": b, "num_steps": t} for t in (1, 2) for b in blocks if 2 <= b < n]
    if method == "mra":
        out = []
        for b in ((8, 16) if n <= 512 else (16, 32)):
            mk = ceil_div(n, b)
            if mk < 2:
                continue
            rs = sorted({max(1, round(f * mk)) for f in _MRA_FRACTIONS})
            sinks = (0, 1) if shape.causal and mk > 2 else (0,)
            out += [{"block_size": b, "blocks_per_row": r, "variant": "mra2", "sink_blocks": s}
                    for r in rs if r < mk for s in sinks if s < r]
        return out
    if method == "topk":
        ks = sorted({n // d for d in (32, 16, 8, 4) if 4 <= n // d < n})
        return [{"k": k, "chunk_size": 1024} for k in ks]
    if method == "exact":
        return []
    return [{}]


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _normalize_samples(sample_inputs: Any) -> list[tuple[tuple, dict]]:
    def one(s: Any, where: str) -> tuple[tuple, dict]:
        if isinstance(s, Mapping):
            if not all(isinstance(k, str) for k in s):
                raise ValueError(f"calibrate: {where} is a dict whose keys are not all argument names")
            return (), dict(s)
        if isinstance(s, tuple):
            return s, {}
        if isinstance(s, torch.Tensor):
            return (s,), {}
        raise ValueError(f"calibrate: {where} must be a dict of keyword arguments, a tuple of positional "
                         f"arguments or a tensor; got {type(s).__name__}")

    if isinstance(sample_inputs, list):
        if not sample_inputs:
            raise ValueError("calibrate: sample_inputs is an empty list; give at least one sample")
        return [one(s, f"sample_inputs[{i}]") for i, s in enumerate(sample_inputs)]
    return [one(sample_inputs, "sample_inputs")]


def _normalize_budget(budget: Any, metric_fn: Optional[Callable]) -> dict:
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"calibrate: budget must be a float (per-layer relative error) or a dict with keys "
                         f"{list(_BUDGET_KEYS)}; got {budget!r}")
    if isinstance(budget, (int, float)):
        budget = {"layer_error": float(budget)}
    if not isinstance(budget, Mapping) or not budget:
        raise ValueError(f"calibrate: budget must be a float (per-layer relative error) or a non-empty dict "
                         f"with keys {list(_BUDGET_KEYS)}; got {budget!r}")
    out = {}
    for key, value in budget.items():
        if key not in _BUDGET_KEYS:
            raise ValueError(f"calibrate: unknown budget key {key!r}; allowed: {list(_BUDGET_KEYS)}")
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


def _main_tensor(output: Any) -> torch.Tensor:
    """The tensor a model output stands for: itself, ``last_hidden_state``, ``logits``, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("last_hidden_state", "logits"):
        t = getattr(output, name, None)
        if isinstance(t, torch.Tensor):
            return t
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for t in items:
        if isinstance(t, torch.Tensor):
            return t
    raise ValueError(f"calibrate: cannot find a tensor in the model output of type {type(output).__name__}; "
                     f"pass output_fn(output, sample) -> Tensor")


def _call_output_fn(output_fn: Optional[Callable], output: Any, sample: tuple[tuple, dict]) -> Any:
    if output_fn is None:
        return _main_tensor(output).detach()
    args, kwargs = sample
    inputs = kwargs if kwargs and not args else args if args and not kwargs else (args, kwargs)
    res = output_fn(output, inputs)
    if not isinstance(res, torch.Tensor):
        raise ValueError(f"calibrate: output_fn(output, sample) must return a torch.Tensor (what the end-to-end "
                         f"budget compares); got {type(res).__name__} {res!r:.80}")
    return res.detach()


# ------------------------------------------------------------------------------------------------
# capture
# ------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    is_causal: bool
    out: torch.Tensor


def _row_weights(call: _Call) -> Optional[torch.Tensor]:
    """[B|1, H|1, Nq, 1] 0/1 weights of query rows that matter (self-attention with key padding:
    padded positions are never read downstream), or None for all rows."""
    m = call.mask
    nq, nk = call.q.shape[-2], call.k.shape[-2]
    if m is None or nq != nk:
        return None
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-2] != 1:
        return None
    keep = m if m.dtype == torch.bool else m > MASKED_BELOW
    w = keep.expand(*keep.shape[:-2], 1, nk).transpose(-1, -2).to(call.out.dtype)   # [B|1, H|1, N, 1]
    return w


def _subsample_heads(call: _Call, max_kv_heads: Optional[int], max_batch: Optional[int] = None) -> _Call:
    """``call`` restricted to its first ``max_batch`` batch items and ``max_kv_heads`` evenly spaced
    key/value heads (with their query heads); the mask follows (SDPA broadcasting)."""
    if call.mask is not None and call.mask.dim() < 4:
        mask = call.mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        call = dataclasses.replace(call, mask=mask)
    if max_batch is not None and call.q.shape[0] > max_batch:
        mask = call.mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[:max_batch]
        call = _Call(call.q[:max_batch], call.k[:max_batch], call.v[:max_batch], mask, call.scale, call.is_causal,
                     call.out[:max_batch])
    hk = call.k.shape[1]
    if max_kv_heads is None or hk <= max_kv_heads:
        return call
    g = call.q.shape[1] // hk
    kv_idx = torch.linspace(0, hk - 1, max_kv_heads).round().long().unique()
    q_idx = (kv_idx.view(-1, 1) * g + torch.arange(g).view(1, -1)).reshape(-1)
    mask = call.mask
    if mask is not None and mask.shape[1] > 1:
        mask = mask[:, q_idx]
    return _Call(call.q[:, q_idx], call.k[:, kv_idx], call.v[:, kv_idx], mask, call.scale, call.is_causal,
                 call.out[:, q_idx])


def _shape_of(call: _Call, mask_kind: str) -> SiteShape:
    q, k, v = call.q, call.k, call.v
    return SiteShape(int(q.shape[0]), int(q.shape[1]), int(k.shape[1]), int(q.shape[2]), int(k.shape[2]),
                     int(q.shape[3]), int(v.shape[3]), mask_kind, q.dtype)


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
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
            replacing ``default_candidates`` for that method.
        max_kv_heads: measure layer errors on at most this many (evenly spaced) key/value heads and
            their query heads, to bound time on long inputs (FLOPs are still for all heads).
        max_evals: cap on end-to-end model runs in the search, an int >= 0 (default
            ``2 * layers + 12``; with 0 an end-to-end budget keeps every layer exact).
        screen: with more than 6 candidates for a layer, first measure them all on a small probe
            (the first call, <= 2 kv heads, <= 4 batch items) and measure in full only those within
            1.2x of the probe's Pareto front (a 2-5x saving; ``False`` measures every candidate).
        progress: show tqdm progress bars. verbose: print the summary.

    Returns:
        ``CalibratedOptions``, a dict accepted by ``torch.compile(model, backend="structattn",
        options=...)``; ``.summary`` is the ``CalibrationSummary``.

    Calibration resets dynamo (``torch._dynamo.reset()``) before and after, like ``explain``.
    """
    from . import backend as _backend
    from .lowering import routed
    from .lowering.ops import run_method
    from .report import Report

    t_start = time.time()
    samples = _normalize_samples(sample_inputs)
    budget = _normalize_budget(budget, metric_fn)
    e2e = any(k in budget for k in ("cosine", "min_cosine", "metric"))
    names = _check_methods(methods)
    base = Config.checked_dict(options)
    for key in ("_route",):
        base.pop(key, None)
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
    if candidates is not None:
        for name in candidates:
            _check_methods([name])
    min_seq_len, impl = int(base.get("min_seq_len", 0)), base.get("impl", "auto")

    capture_opts = {**copy.deepcopy(base), "_route": True, "method": "exact", "compiler": "eager"}
    restore_training = _set_eval(model)
    report = Report(options=dict(capture_opts))
    store: dict[str, list] = {}
    keys: list[str] = []
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=_backend.structattn_backend, options=capture_opts)

        # ---- 1. capture: one exact run per sample, every site's inputs and output recorded --------
        def capture(key):
            def fn(q, k, v, mask, scale, is_causal):
                out = sdpa(q, k, v, mask, scale, is_causal)
                store.setdefault(key, []).append(_Call(q.detach(), k.detach(), v.detach(),
                                                       None if mask is None else mask.detach(), float(scale),
                                                       bool(is_causal), out.detach()))
                return out
            return fn

        exact_outputs = []
        with _backend.collect(report, root=model) as session:
            with torch.no_grad():
                for s in _bar(samples, progress, "calibrate: exact run"):
                    for _attempt in range(3):
                        before = {key: len(calls) for key, calls in store.items()}
                        n_keys = len(keys)
                        out = _run_sample(compiled, s, sample_inputs)
                        _route_all_new(report, routed, capture, keys)
                        if len(keys) == n_keys:
                            break
                        # graphs compiled during this run had no capture routes yet: drop what this
                        # run captured and run the sample again with every site routed
                        for key in list(store):
                            del store[key][before.get(key, 0):]
                        del out
                    else:
                        raise RuntimeError("calibrate: the model keeps compiling new graphs on the same sample")
                    exact_outputs.append(_call_output_fn(output_fn, out, s) if e2e else None)
                    del out
        _backend.finish_collecting(session, capture_opts, stacklevel=2)
        missing = sorted(s.route_key for s in report.sites if s.route_key and not store.get(s.route_key))
        if missing:
            warnings.warn(f"calibrate: sites {missing} were compiled but never ran on the samples; they stay "
                          f"exact", stacklevel=2)

        # ---- 2. per-layer table of (method, params) -> error, FLOPs --------------------------------
        skipped = [f"{s.layer or '<root>'}: {s.reason}" for s in report.sites if s.route_key is None]
        groups: dict[str, list] = {}
        masks: dict[str, str] = {}       # route key -> the mask kind of that site
        for s in report.sites:
            if s.route_key is None:
                continue
            groups.setdefault(s.layer, []).append(s.route_key)
            # sites of one layer may differ in mask (samples with and without attention_mask
            # compile separate graphs): each keeps its own kind, and a candidate must support all
            masks[s.route_key] = s.mask.replace(" (declared)", "")
        choices = _measure_layers(groups, masks, store, names, candidates, layers, budget, max_kv_heads,
                                  min_seq_len, impl, run_method, screen, progress)
        exact_total = sum(c.front[-1].flops for c in choices)

        # ---- 3. choose --------------------------------------------------------------------------
        evaluations: list = []
        metrics: dict = {}
        if not e2e:
            picks = [0 for _ in choices]      # the front holds only candidates within layer_error
        else:
            evaluator = _Evaluator(compiled, samples, choices, groups, routed, min_seq_len, impl,
                                   output_fn, metric_fn, exact_outputs, budget, exact_total, evaluations)
            limit = max_evals if max_evals is not None else 2 * len(choices) + 12
            picks, metrics = _search(choices, evaluator, limit, progress)
        for c, i in zip(choices, picks):
            c.chosen = c.front[i]
    finally:
        for key in keys:
            routed.route(key, None)
        store.clear()
        torch._dynamo.reset()
        restore_training()

    # ---- 4. options and summary ------------------------------------------------------------------
    rules: dict[str, Any] = {}
    for c in choices:
        rules[_glob_escape(c.layer)] = c.chosen.option()
    for pattern, spec in (base.get("layers") or {}).items():
        rules.setdefault(pattern, spec)
    result = CalibratedOptions({k: v for k, v in base.items() if k != "layers"})
    result["method"] = "exact"
    result["layers"] = rules
    Config.from_options(copy.deepcopy(dict(result)))
    summary = CalibrationSummary(
        budget=budget, layers=choices, flops=sum(c.chosen.flops for c in choices), exact_flops=exact_total,
        metrics=metrics, evaluations=evaluations, skipped=skipped, samples=len(samples),
        seconds=time.time() - t_start,
    )
    result.summary = summary
    if not choices:
        warnings.warn("calibrate: no attention site could be calibrated in this model", stacklevel=2)
    if verbose:
        print(summary)
    return result


# ------------------------------------------------------------------------------------------------
# helpers of calibrate
# ------------------------------------------------------------------------------------------------
def _run_sample(compiled: Callable, sample: tuple[tuple, dict], sample_inputs: Any) -> Any:
    """``compiled(*args, **kwargs)`` of one sample; a tuple given as ``sample_inputs`` is one
    sample's positional arguments, and a call that does not fit says so."""
    try:
        return compiled(*sample[0], **sample[1])
    except TypeError as err:
        if isinstance(sample_inputs, tuple):
            raise TypeError(f"calibrate: sample_inputs is a tuple of {len(sample_inputs)} item(s), which means ONE "
                            f"sample of positional arguments, model(*sample_inputs), and that call failed: {err}. "
                            f"Pass several samples as a list, e.g. [(x1,), (x2,)] or [x1, x2].") from err
        raise


def _check_methods(methods: Optional[Sequence[str]]) -> list[str]:
    if methods is None:
        return [m for m in DEFAULT_METHODS if m in REGISTRY]
    if isinstance(methods, str):
        methods = [methods]
    out = []
    for name in methods:
        if not isinstance(name, str) or name not in REGISTRY:
            raise ValueError(f"calibrate: unknown method {name!r}; allowed: {sorted(REGISTRY)}")
        if name != "exact" and name not in out:
            out.append(name)
    return out


def _set_eval(model: Any) -> Callable[[], None]:
    if isinstance(model, torch.nn.Module) and model.training:
        model.eval()
        return lambda: model.train(True)
    return lambda: None


def _bar(items: Optional[Iterable], progress: bool, desc: str, total: Optional[int] = None):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=not progress, leave=False)


def _route_all_new(report, routed, capture, keys: list) -> None:
    for s in report.sites:
        if s.route_key is not None and s.route_key not in keys:
            keys.append(s.route_key)
            routed.route(s.route_key, capture(s.route_key))


def _glob_escape(layer: str) -> str:
    """``layer`` as an fnmatch pattern matching exactly itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in layer)


def _layer_error(method, params, calls: list, min_seq_len: int, impl: str, run_method) -> float:
    num = den = 0.0
    for call in calls:
        out = run_method(method, call.q, call.k, call.v, call.mask, call.scale, call.is_causal, min_seq_len, impl,
                         params).to(call.out.dtype)
        diff = (out - call.out).double()
        ref = call.out.double()
        w = _row_weights(call)
        if w is not None:
            diff, ref = diff * w, ref * w
        num += float(diff.pow(2).sum())
        den += float(ref.pow(2).sum())
    if not math.isfinite(num):
        return math.inf
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _measure_layers(groups, masks, store, names, candidates, allowed, budget, max_kv_heads, min_seq_len, impl,
                    run_method, screen, progress) -> list[LayerChoice]:
    exact = get_method("exact")
    plan = []   # (layer, calls, sampled calls, shapes, [(method, params dict)], refused)
    total = 0
    for layer, keys in groups.items():
        calls = [c for key in keys for c in store.get(key, [])]
        if not calls:
            continue
        shapes = [_shape_of(c, masks[key]) for key in keys for c in store.get(key, [])]
        kinds = ", ".join(dict.fromkeys(sh.mask for sh in shapes))
        todo, refused = [], {}
        if allowed is None or any(fnmatch.fnmatchcase(layer, p) for p in allowed):
            for name in names:
                method = get_method(name)
                grid = _grid(name, shapes[0], candidates)
                for values in grid:
                    params = method.make_params(dict(values), where=f"calibrate candidates[{name!r}]")
                    reason = next((r for r in (method.supports(sh, params) for sh in shapes) if r), None)
                    if reason is not None:
                        refused.setdefault(name, reason)
                        continue
                    flops = sum(float(method.flops(sh, params)) for sh in shapes)
                    exact_f = sum(float(exact_flops(sh)) for sh in shapes)
                    if flops >= exact_f:
                        continue
                    full = {f.name: getattr(params, f.name) for f in method.param_fields()}
                    todo.append((method, params, full, flops))
        total += len(todo)
        plan.append((layer, kinds, calls, shapes, todo, refused))

    choices = []
    bar = _bar(None, progress, "calibrate: layer errors", total=total)
    for layer, kinds, calls, shapes, todo, refused in plan:
        sampled = [_subsample_heads(c, max_kv_heads) for c in calls]
        exact_f = sum(float(exact_flops(sh)) for sh in shapes)
        measured = [Candidate("exact", {}, 0.0, exact_f, exact_f)]
        screened_out = 0
        with torch.no_grad():
            probe = [_subsample_heads(sampled[0], _SCREEN_KV_HEADS, _SCREEN_BATCH)]
            work = sum(c.q.numel() * c.k.shape[-2] for c in sampled)
            if screen and len(todo) > _SCREEN_MIN and probe[0].q.numel() * probe[0].k.shape[-2] * 2 <= work:
                # screening: every candidate on a small probe (first call, <= 2 kv heads, <= 4 batch
                # items); only those near the probe's Pareto front are measured in full
                rough = []
                for cand in todo:
                    rough.append((cand, _layer_error(cand[0], cand[1], probe, min_seq_len, impl, run_method)))
                    bar.update(1)
                kept = _near_front([(c[3], e) for c, e in rough], _SCREEN_SLACK)
                screened_out = len(todo) - len(kept)
                todo = [rough[i][0] for i in kept]
                bar.total += len(todo)
                bar.refresh()
            for method, params, full, flops in todo:
                err = _layer_error(method, params, sampled, min_seq_len, impl, run_method)
                measured.append(Candidate(method.name, full, err, flops, exact_f))
                bar.update(1)
        front = _pareto(measured, budget.get("layer_error"))
        sh = shapes[0]
        choices.append(LayerChoice(layer, kinds, sh.q_len, sh.kv_len, sh.num_heads, sh.num_kv_heads,
                                   sh.head_dim, len(calls), measured, front, front[-1], refused, screened_out))
    bar.close()
    return choices


_SCREEN_KV_HEADS, _SCREEN_BATCH, _SCREEN_MIN, _SCREEN_SLACK = 2, 4, 6, 1.2


def _near_front(points: list, slack: float) -> list[int]:
    """Indices of (flops, error) points whose error is at most ``slack`` x the lowest error among
    points with no more FLOPs (the Pareto front and its near misses), in the input order."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    kept, best = [], math.inf
    for i in order:
        err = points[i][1]
        if not math.isfinite(err):
            continue
        if err <= slack * best or not kept:
            kept.append(i)
        best = min(best, err)
    return sorted(kept)


def _grid(name: str, shape: SiteShape, candidates) -> list:
    if candidates is not None and name in candidates:
        spec = candidates[name]
        grid = spec(shape) if callable(spec) else spec
        return [dict(g) for g in grid]
    return default_candidates(name, shape)


def _pareto(measured: list, cap: Optional[float]) -> list:
    """Candidates not dominated in (FLOPs, error) and within ``cap``, by increasing FLOPs (so by
    decreasing error), then exact attention, always last (the fallback of every search)."""
    exact = next(c for c in measured if c.method == "exact")
    pool = [c for c in measured if c.method != "exact" and math.isfinite(c.error)
            and (cap is None or c.error <= cap) and c.flops < exact.flops]
    pool.sort(key=lambda c: (c.flops, c.error))
    front = []
    for c in pool:                 # from the cheapest: keep strictly lower errors only
        if not front or c.error < front[-1].error:
            front.append(c)
    return front + [exact]


class _Evaluator:
    """Runs the routed model end to end for one per-layer choice (indices into each front)."""

    def __init__(self, compiled, samples, choices, groups, routed, min_seq_len, impl, output_fn,
                 metric_fn, exact_outputs, budget, exact_total, log):
        self.compiled, self.samples, self.choices, self.groups = compiled, samples, choices, groups
        self.routed, self.min_seq_len, self.impl = routed, min_seq_len, impl
        self.output_fn, self.metric_fn, self.exact_outputs = output_fn, metric_fn, exact_outputs
        self.budget, self.exact_total, self.log = budget, exact_total, log
        self.cache: dict = {}

    def flops(self, picks) -> float:
        return sum(c.front[i].flops for c, i in zip(self.choices, picks))

    def __call__(self, picks: tuple) -> tuple[bool, dict]:
        picks = tuple(picks)
        if picks in self.cache:
            return self.cache[picks]
        if all(i == len(c.front) - 1 for c, i in zip(self.choices, picks)):
            # all exact: the reference itself, feasible by definition
            metrics = {}
            if "cosine" in self.budget or "min_cosine" in self.budget:
                metrics.update(cosine=1.0, min_cosine=1.0)
            if "metric" in self.budget:
                metrics["metric"] = float(self.metric_fn(self.exact_outputs, self.exact_outputs,
                                                         [self._inputs(s) for s in self.samples]))
            self.cache[picks] = (True, metrics)
            return self.cache[picks]
        for c, i in zip(self.choices, picks):
            cand = c.front[i]
            fn = None
            if cand.method != "exact":
                method = get_method(cand.method)
                fn = self.routed.method_route(method, method.make_params(cand.params), self.min_seq_len, self.impl)
            for key in self.groups[c.layer]:
                self.routed.route(key, fn)
        outs = []
        with torch.no_grad():
            for s in self.samples:
                out = self.compiled(*s[0], **s[1])
                outs.append(_call_output_fn(self.output_fn, out, s))
                del out
        for c in self.choices:                 # back to capture-free exact routes
            for key in self.groups[c.layer]:
                self.routed.route(key, None)
        metrics = {}
        if "cosine" in self.budget or "min_cosine" in self.budget:
            cos = torch.cat([torch.nn.functional.cosine_similarity(_rows(a), _rows(e), dim=-1)
                             for a, e in zip(outs, self.exact_outputs)])
            cos = torch.nan_to_num(cos, nan=-1.0)
            metrics["cosine"] = float(cos.mean())
            metrics["min_cosine"] = float(cos.min())
        if "metric" in self.budget:
            metrics["metric"] = float(self.metric_fn(outs, self.exact_outputs, [self._inputs(s) for s in self.samples]))
        ok = all(self._meets(k, v, metrics) for k, v in self.budget.items())
        self.log.append({"fraction": self.flops(picks) / self.exact_total if self.exact_total else 1.0,
                         **metrics, "passed": ok})
        self.cache[picks] = (ok, metrics)
        return ok, metrics

    @staticmethod
    def _meets(key, value, metrics) -> bool:
        if key == "layer_error":
            return True          # enforced by the fronts
        m = metrics.get(key)
        if m is None or not math.isfinite(m):
            return False
        return m <= value if key == "metric" else m >= value

    @staticmethod
    def _inputs(s):
        args, kwargs = s
        return kwargs if kwargs and not args else args if args and not kwargs else (args, kwargs)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def _search(choices: list, evaluate: _Evaluator, max_evals: int, progress: bool) -> tuple[list, dict]:
    """Minimise FLOPs subject to the end-to-end budget (module docstring, step 3). Returns the picks
    (an index into each layer's front) and the measured metrics of the chosen configuration."""
    if not choices:
        return [], {}
    exact = tuple(len(c.front) - 1 for c in choices)
    tunable = [i for i, c in enumerate(choices) if len(c.front) > 1]
    exact_metrics = evaluate(exact)[1]          # free: no model run
    allowed = _allowed(evaluate.budget, exact_metrics)
    bar = _bar(None, progress, "calibrate: end-to-end search", total=max_evals)
    runs = _Runs(evaluate, max_evals, bar)
    try:
        if not tunable or any(a <= 0 for a in allowed.values()):
            return list(exact), exact_metrics
        # 1. the cheapest configuration: if it passes nothing can beat it
        cheapest = tuple(0 for _ in choices)
        if runs.passes(cheapest):
            return list(cheapest), evaluate(cheapest)[1]
        # 2. probes: one layer group at a time at a moderate error, to fit the sensitivity model
        model = _fit_sensitivity(choices, tunable, runs, exact, allowed, max(1, max_evals // 2))
        # 3. allocate with the model, correct its scale from measurements
        if model is not None:
            _allocate_and_correct(choices, model, runs, allowed)
        # 4. if nothing passed yet: bisection on a layer-error threshold shared by all layers
        if runs.best(exact) == exact:
            _bisect_threshold(choices, runs, exact)
        # 5. greedy single-layer steps down the fronts from the best configuration
        _greedy(choices, runs, runs.best(exact), model)
        best = runs.best(exact)
        return list(best), evaluate(best)[1]
    finally:
        bar.close()


class _Runs:
    """End-to-end runs with a cap: ``passes(picks)`` evaluates (cached), ``best`` is the cheapest pass."""

    def __init__(self, evaluate: _Evaluator, max_evals: int, bar):
        self.evaluate, self.left, self.bar = evaluate, max_evals, bar

    def passes(self, picks: tuple) -> bool:
        return self.measure(picks) is not None and self.evaluate.cache[picks][0]

    def measure(self, picks: tuple) -> Optional[dict]:
        """The metrics of ``picks`` (running the model if needed), or None when out of runs."""
        picks = tuple(picks)
        if picks not in self.evaluate.cache:
            if self.left <= 0:
                return None
            self.left -= 1
            self.bar.update(1)
        return self.evaluate(picks)[1]

    def best(self, exact: tuple) -> tuple:
        ok = [p for p, (passed, _) in self.evaluate.cache.items() if passed]
        return min(ok, key=self.evaluate.flops) if ok else exact


def _allowed(budget: dict, exact_metrics: dict) -> dict:
    """Allowed deficit per end-to-end budget key (how far from exact the metric may move)."""
    out = {}
    for key, value in budget.items():
        if key in ("cosine", "min_cosine"):
            out[key] = 1.0 - value
        elif key == "metric":
            out[key] = value - exact_metrics.get("metric", 0.0)
    return out


def _deficits(metrics: dict, exact_metrics: dict, allowed: dict) -> dict:
    out = {}
    for key in allowed:
        if key in ("cosine", "min_cosine"):
            out[key] = 1.0 - metrics.get(key, -1.0)
        else:
            out[key] = metrics.get("metric", math.inf) - exact_metrics.get("metric", 0.0)
    return out


@dataclass
class _Sensitivity:
    """deficit_k(config) ~= sum over layers of s[k][layer] * error(layer)^2 (fitted from probes)."""

    s: dict          # budget key -> list of per-layer coefficients
    exact_metrics: dict
    limit: dict      # layer -> largest error the model may be trusted at (a multiple of its probe's)

    def weight(self, li: int, error: float, allowed: dict) -> float:
        """The share of the allowed deficit one layer uses at this error (max over budget keys)."""
        return max(self.s[k][li] * error * error / allowed[k] for k in allowed)


def _fit_sensitivity(choices, tunable, runs: _Runs, exact, allowed, max_probes) -> Optional[_Sensitivity]:
    exact_metrics = runs.evaluate(exact)[1]
    n_groups = min(len(tunable), max_probes)
    groups = [tunable[round(g * len(tunable) / n_groups):round((g + 1) * len(tunable) / n_groups)]
              for g in range(n_groups)]
    # probe point: the front point with error closest to _PROBE_ERROR (log scale)
    probe = {li: min(range(len(choices[li].front) - 1),
                     key=lambda i, li=li: abs(math.log(max(choices[li].front[i].error, 1e-9) / _PROBE_ERROR)))
             for li in tunable}
    s = {k: [0.0] * len(choices) for k in allowed}
    for group in groups:
        picks = tuple(probe[li] if li in group else i for li, i in enumerate(exact))
        metrics = runs.measure(picks)
        if metrics is None:
            return None
        d = _deficits(metrics, exact_metrics, allowed)
        denom = sum(choices[li].front[probe[li]].error ** 2 for li in group)
        for k in allowed:
            coef = max(d[k], 0.0) / max(denom, 1e-12) if math.isfinite(d[k]) else 1e12
            for li in group:
                s[k][li] = coef
    # A probe that did no measurable harm (or even helped) says little about larger errors: floor
    # every coefficient at a tenth of the typical one, so no layer looks free.
    for k in allowed:
        vals = sorted(s[k][li] for li in tunable)
        typical = vals[len(vals) // 2] or (sum(vals) / len(vals))
        for li in tunable:
            s[k][li] = max(s[k][li], _SENS_FLOOR * typical)
    limit = {li: _TRUST * choices[li].front[probe[li]].error for li in tunable}
    return _Sensitivity(s, exact_metrics, limit)


def _allocate(choices, model: _Sensitivity, allowed: dict, scale: float) -> tuple:
    """Cheapest picks with scale * sum of weights <= 1: a multiple-choice knapsack solved exactly by
    dynamic programming over the weight discretised in _DP_BINS bins (rounded up: conservative)."""
    bins = _DP_BINS
    inf = math.inf
    cost = [0.0] + [inf] * bins          # cost[b]: least FLOPs with used weight b
    back = []
    for li, c in enumerate(choices):
        options = []
        for i, p in enumerate(c.front):
            if p.error > model.limit.get(li, math.inf):
                continue       # beyond the probed range: the quadratic model is not trusted there
            w = scale * model.weight(li, p.error, allowed) if p.error > 0 else 0.0
            wb = math.ceil(w * bins - 1e-9) if w > 0 else 0
            if wb <= bins:
                options.append((i, wb, p.flops))
        new = [inf] * (bins + 1)
        arg = [-1] * (bins + 1)
        for i, wb, f in options:
            for b in range(wb, bins + 1):
                v = cost[b - wb] + f
                if v < new[b]:
                    new[b], arg[b] = v, i
        cost = new
        back.append((arg, {i: wb for i, wb, _ in options}))
    b = min(range(bins + 1), key=lambda x: cost[x])
    picks = []
    for arg, wbs in reversed(back):
        i = arg[b]
        picks.append(i)
        b -= wbs[i]
    return tuple(reversed(picks))


def _allocate_and_correct(choices, model: _Sensitivity, runs: _Runs, allowed: dict) -> None:
    """Allocate with the model; after each run rescale it by measured / predicted deficit."""
    scale = 1.0
    tried = set()
    for _ in range(_CORRECTIONS):
        picks = _allocate(choices, model, allowed, scale)
        predicted = sum(model.weight(li, c.front[i].error, allowed) for li, (c, i) in enumerate(zip(choices, picks)))
        if picks in tried:
            break
        tried.add(picks)
        metrics = runs.measure(picks)
        if metrics is None:
            break
        d = _deficits(metrics, model.exact_metrics, allowed)
        measured = max(d[k] / allowed[k] for k in allowed)
        passed = runs.evaluate.cache[picks][0]
        if passed and measured >= _GOOD_ENOUGH:
            break
        if predicted <= 0 or not math.isfinite(measured):
            scale *= 1.5 if not passed else 0.75
        else:
            ratio = measured / predicted         # true scale of the model at this configuration
            scale = max(ratio, scale * 1.1) if not passed else min(ratio, scale / 1.05)


def _bisect_threshold(choices, runs: _Runs, exact: tuple) -> None:
    def at(threshold: float) -> tuple:
        return tuple(next(i for i, p in enumerate(c.front) if p.error <= threshold) for c in choices)

    thresholds = sorted({p.error for c in choices for p in c.front if p.error > 0})
    lo, hi = -1, len(thresholds)                 # thresholds[lo] passes (lo = -1: exact), hi fails
    while hi - lo > 1 and runs.left > 0:
        mid = (lo + hi) // 2
        picks = at(thresholds[mid])
        if picks == exact or runs.passes(picks):
            lo = mid
        else:
            hi = mid


def _greedy(choices, runs: _Runs, best: tuple, model: Optional[_Sensitivity]) -> None:
    """One layer one step cheaper at a time, most FLOPs saved per unit of predicted damage first
    (layer error increase without a model); a move that fails is not retried."""
    rejected: set = set()
    allowed = _allowed(runs.evaluate.budget, runs.evaluate(tuple(len(c.front) - 1 for c in choices))[1])
    while runs.left > 0:
        moves = []
        for li, (c, i) in enumerate(zip(choices, best)):
            if i == 0 or li in rejected:
                continue
            cur, nxt = c.front[i], c.front[i - 1]
            if model is not None and allowed:
                cost = model.weight(li, nxt.error, allowed) - model.weight(li, cur.error, allowed)
            else:
                cost = nxt.error - cur.error
            moves.append(((cur.flops - nxt.flops) / max(cost, 1e-12), li))
        if not moves:
            return
        moves.sort(reverse=True)
        for _, li in moves:
            picks = tuple(i - 1 if j == li else i for j, i in enumerate(best))
            if runs.left <= 0 and picks not in runs.evaluate.cache:
                return
            if runs.passes(picks):
                best = picks
                break
            rejected.add(li)
        else:
            return


#: probe error level, DP resolution, allocation rounds, "close enough to the budget" share
_PROBE_ERROR, _DP_BINS, _CORRECTIONS, _GOOD_ENOUGH = 0.15, 1000, 5, 0.97
#: sensitivity floor (share of the median coefficient); trust region (multiple of the probe's error)
_SENS_FLOOR, _TRUST = 0.1, 2.0
