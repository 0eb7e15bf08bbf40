"""Choosing one point per layer for an end-to-end budget: pure functions over Pareto fronts and an
``evaluate(picks)`` callable (nothing here runs a model).

A *front* is one layer's measured points (objects with ``flops`` and ``error``) that no other
point beats on both, by increasing FLOPs (so decreasing error), with exact attention last (error
0, the fallback). *Picks* hold one index per front. ``evaluate(picks) -> (passed, metrics)``
measures a configuration end to end; the all-exact configuration is evaluated once without
counting as a run (it needs no model run: the exact outputs are the reference).

The search (``search``), minimising FLOPs subject to the budget with at most ``max_evals`` runs:

1. the cheapest configuration first: if it passes, nothing can beat it;
2. a *sensitivity model*: the metric's deficit from exact (1 - cosine, or metric - exact metric)
   is close to additive over layers and quadratic in each layer's error,
   ``deficit ~= sum_l s_l * err_l**2`` (on MiniLM the sum of the six single-layer deficits was
   within 2% of the deficit with all six layers approximated), and ``s_l`` varies a lot between
   layers (MiniLM's last layer is about 4x as sensitive as the others). One run per layer (or per
   group of consecutive layers when runs are scarce) approximates only that layer near
   ``PROBE_ERROR`` and gives ``s_l`` (``fit_sensitivity``);
3. a multiple-choice knapsack (``allocate``, dynamic programming) picks the cheapest front point
   per layer, among those within the trust region, whose predicted deficit fits the budget; the
   run of that configuration rescales the model (measured / predicted) and the allocation is
   repeated a few times (``allocate_and_correct``);
4. if no configuration passed yet: a bisection on one error threshold shared by all layers;
5. single layers move one step further down their fronts, the move with the most FLOPs saved per
   unit of predicted deficit first, kept only when the budget still holds (``greedy``).

Every configuration returned was measured and met the budget (all-exact is the fallback).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .tuning import CORRECTIONS, DP_BINS, GOOD_ENOUGH, PROBE_ERROR, SENS_FLOOR, TRUST

Evaluate = Callable[[tuple], tuple]


# ------------------------------------------------------------------------------------------------
# fronts
# ------------------------------------------------------------------------------------------------
def pareto_front(points: Sequence, exact, cap: Optional[float] = None) -> list:
    """``points`` not dominated in (FLOPs, error), with finite error within ``cap`` and fewer FLOPs
    than ``exact``, by increasing FLOPs (so by decreasing error), then ``exact`` itself."""
    pool = [p for p in points if math.isfinite(p.error) and (cap is None or p.error <= cap) and p.flops < exact.flops]
    pool.sort(key=lambda p: (p.flops, p.error))
    front = []
    for p in pool:                 # from the cheapest: keep strictly lower errors only
        if not front or p.error < front[-1].error:
            front.append(p)
    return front + [exact]


def near_front(points: Sequence[tuple], slack: float) -> list[int]:
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


# ------------------------------------------------------------------------------------------------
# budgets
# ------------------------------------------------------------------------------------------------
def meets(budget: dict, metrics: dict) -> bool:
    """Whether end-to-end ``metrics`` meet every key of ``budget`` (``layer_error`` is enforced by
    the fronts; a missing or non-finite metric fails)."""
    for key, value in budget.items():
        if key == "layer_error":
            continue
        m = metrics.get(key)
        if m is None or not math.isfinite(m) or not (m <= value if key == "metric" else m >= value):
            return False
    return True


def allowed_deficits(budget: dict, exact_metrics: dict) -> dict:
    """How far from exact each end-to-end budget key lets its metric move."""
    out = {}
    for key, value in budget.items():
        if key in ("cosine", "min_cosine"):
            out[key] = 1.0 - value
        elif key == "metric":
            out[key] = value - exact_metrics.get("metric", 0.0)
    return out


def deficits(metrics: dict, exact_metrics: dict, allowed: dict) -> dict:
    """The measured distance from exact of each key in ``allowed``."""
    out = {}
    for key in allowed:
        if key in ("cosine", "min_cosine"):
            out[key] = 1.0 - metrics.get(key, -1.0)
        else:
            out[key] = metrics.get("metric", math.inf) - exact_metrics.get("metric", 0.0)
    return out


# ------------------------------------------------------------------------------------------------
# end-to-end runs
# ------------------------------------------------------------------------------------------------
class Runs:
    """``evaluate`` with a cache and a cap of ``max_evals`` counted runs; ``best`` is the cheapest
    configuration that passed so far."""

    def __init__(self, fronts: list, evaluate: Evaluate, max_evals: int, bar=None):
        self.fronts, self.evaluate, self.left, self.bar = fronts, evaluate, max_evals, bar
        self.cache: dict = {}

    def result(self, picks) -> tuple:
        """``(passed, metrics)`` of ``picks``, evaluated once (not counted: for the all-exact
        configuration and for picks already measured)."""
        picks = tuple(picks)
        if picks not in self.cache:
            self.cache[picks] = self.evaluate(picks)
        return self.cache[picks]

    def measure(self, picks) -> Optional[dict]:
        """The metrics of ``picks`` (a counted run if new), or None when out of runs."""
        picks = tuple(picks)
        if picks not in self.cache:
            if self.left <= 0:
                return None
            self.left -= 1
            if self.bar is not None:
                self.bar.update(1)
        return self.result(picks)[1]

    def passes(self, picks) -> bool:
        """Whether ``picks`` meets the budget (False when it cannot be run any more)."""
        return self.measure(picks) is not None and self.cache[tuple(picks)][0]

    def flops(self, picks) -> float:
        return sum(f[i].flops for f, i in zip(self.fronts, picks))

    def best(self, exact: tuple) -> tuple:
        ok = [p for p, (passed, _) in self.cache.items() if passed]
        return min(ok, key=self.flops) if ok else exact


# ------------------------------------------------------------------------------------------------
# the sensitivity model and the knapsack
# ------------------------------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """deficit_k(config) ~= sum over layers of s[k][layer] * error(layer)^2 (fitted from probes)."""

    s: dict          # budget key -> list of per-layer coefficients
    exact_metrics: dict
    limit: dict      # layer -> largest error the model may be trusted at (a multiple of its probe's)

    def weight(self, li: int, error: float, allowed: dict) -> float:
        """The share of the allowed deficit one layer uses at this error (max over budget keys)."""
        return max(self.s[k][li] * error * error / allowed[k] for k in allowed)


def probe_points(fronts: list, tunable: list) -> dict:
    """Per tunable layer, the front index whose error is closest to ``PROBE_ERROR`` (log scale)."""
    return {li: min(range(len(fronts[li]) - 1),
                    key=lambda i, li=li: abs(math.log(max(fronts[li][i].error, 1e-9) / PROBE_ERROR)))
            for li in tunable}


def fit_sensitivity(fronts: list, tunable: list, runs: Runs, exact: tuple, allowed: dict,
                    max_probes: int) -> Optional[Sensitivity]:
    """One run per group of tunable layers (at most ``max_probes`` groups of consecutive layers),
    each approximating only its group at the probe point; None when out of runs."""
    exact_metrics = runs.result(exact)[1]
    n_groups = min(len(tunable), max_probes)
    groups = [tunable[round(g * len(tunable) / n_groups):round((g + 1) * len(tunable) / n_groups)]
              for g in range(n_groups)]
    probe = probe_points(fronts, tunable)
    s = {k: [0.0] * len(fronts) for k in allowed}
    for group in groups:
        picks = tuple(probe[li] if li in group else i for li, i in enumerate(exact))
        metrics = runs.measure(picks)
        if metrics is None:
            return None
        d = deficits(metrics, exact_metrics, allowed)
        denom = sum(fronts[li][probe[li]].error ** 2 for li in group)
        for k in allowed:
            coef = max(d[k], 0.0) / max(denom, 1e-12) if math.isfinite(d[k]) else 1e12
            for li in group:
                s[k][li] = coef
    for k in allowed:
        vals = sorted(s[k][li] for li in tunable)
        typical = vals[len(vals) // 2] or (sum(vals) / len(vals))
        for li in tunable:
            s[k][li] = max(s[k][li], SENS_FLOOR * typical)
    limit = {li: TRUST * fronts[li][probe[li]].error for li in tunable}
    return Sensitivity(s, exact_metrics, limit)


def allocate(fronts: list, model: Sensitivity, allowed: dict, scale: float) -> tuple:
    """Cheapest picks with ``scale`` x the sum of predicted weights <= 1: a multiple-choice knapsack
    solved exactly by dynamic programming over the weight in ``DP_BINS`` bins (rounded up, so
    conservative); points beyond a layer's trust region are not considered."""
    bins = DP_BINS
    inf = math.inf
    cost = [0.0] + [inf] * bins          # cost[b]: least FLOPs with used weight b
    back = []
    for li, front in enumerate(fronts):
        options = []
        for i, p in enumerate(front):
            if p.error > model.limit.get(li, math.inf):
                continue
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


def allocate_and_correct(fronts: list, model: Sensitivity, runs: Runs, allowed: dict) -> None:
    """Allocate with the model; after each run rescale it by measured / predicted deficit."""
    scale = 1.0
    tried = set()
    for _ in range(CORRECTIONS):
        picks = allocate(fronts, model, allowed, scale)
        predicted = sum(model.weight(li, f[i].error, allowed) for li, (f, i) in enumerate(zip(fronts, picks)))
        if picks in tried:
            break
        tried.add(picks)
        metrics = runs.measure(picks)
        if metrics is None:
            break
        d = deficits(metrics, model.exact_metrics, allowed)
        measured = max(d[k] / allowed[k] for k in allowed)
        passed = runs.cache[picks][0]
        if passed and measured >= GOOD_ENOUGH:
            break
        if predicted <= 0 or not math.isfinite(measured):
            scale *= 1.5 if not passed else 0.75
        else:
            ratio = measured / predicted         # true scale of the model at this configuration
            scale = max(ratio, scale * 1.1) if not passed else min(ratio, scale / 1.05)


def bisect_threshold(fronts: list, runs: Runs, exact: tuple) -> None:
    """Bisection on one layer-error threshold shared by all layers (each layer at its cheapest
    point within it), while runs are left."""
    def at(threshold: float) -> tuple:
        return tuple(next(i for i, p in enumerate(f) if p.error <= threshold) for f in fronts)

    thresholds = sorted({p.error for f in fronts for p in f if p.error > 0})
    lo, hi = -1, len(thresholds)                 # thresholds[lo] passes (lo = -1: exact), hi fails
    while hi - lo > 1 and runs.left > 0:
        mid = (lo + hi) // 2
        picks = at(thresholds[mid])
        if picks == exact or runs.passes(picks):
            lo = mid
        else:
            hi = mid


def greedy(fronts: list, runs: Runs, best: tuple, model: Optional[Sensitivity], allowed: dict) -> None:
    """One layer one step cheaper at a time, most FLOPs saved per unit of predicted damage first
    (layer error increase without a model); a move that fails is not retried."""
    rejected: set = set()
    while runs.left > 0:
        moves = []
        for li, (f, i) in enumerate(zip(fronts, best)):
            if i == 0 or li in rejected:
                continue
            cur, nxt = f[i], f[i - 1]
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
            if runs.left <= 0 and picks not in runs.cache:
                return
            if runs.passes(picks):
                best = picks
                break
            rejected.add(li)
        else:
            return


def search(fronts: list, evaluate: Evaluate, budget: dict, max_evals: int, bar=None) -> tuple[list, dict]:
    """Minimise FLOPs subject to the end-to-end ``budget`` (module docstring) with at most
    ``max_evals`` counted runs of ``evaluate``. Returns the picks (an index into each front) and
    the measured metrics of the chosen configuration."""
    if not fronts:
        return [], {}
    runs = Runs(fronts, evaluate, max_evals, bar)
    exact = tuple(len(f) - 1 for f in fronts)
    tunable = [i for i, f in enumerate(fronts) if len(f) > 1]
    exact_metrics = runs.result(exact)[1]
    allowed = allowed_deficits(budget, exact_metrics)
    if not tunable or any(a <= 0 for a in allowed.values()):
        return list(exact), exact_metrics
    cheapest = tuple(0 for _ in fronts)
    if runs.passes(cheapest):
        return list(cheapest), runs.result(cheapest)[1]
    model = fit_sensitivity(fronts, tunable, runs, exact, allowed, max(1, max_evals // 2))
    if model is not None:
        allocate_and_correct(fronts, model, runs, allowed)
    if runs.best(exact) == exact:
        bisect_threshold(fronts, runs, exact)
    greedy(fronts, runs, runs.best(exact), model, allowed)
    best = runs.best(exact)
    return list(best), runs.result(best)[1]
