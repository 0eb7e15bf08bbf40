"""calibrate's search on synthetic Pareto fronts, against brute force: no model runs.

The synthetic truth is the model the search assumes (a deficit additive over layers and quadratic
in each layer's error, with per-layer sensitivities the search does not know), so the optimum is
computable by enumerating every configuration; the tests check that every returned configuration
meets the budget, that runs stay within ``max_evals``, and how close to the optimum it gets."""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest

from structattn.calibrate import search as S


@dataclass(frozen=True)
class P:
    flops: float
    error: float


def front(errors_flops: list) -> list:
    """A front from (error, flops) pairs, by increasing FLOPs, exact attention (100 FLOPs, error 0) last."""
    pts = sorted((P(f, e) for e, f in errors_flops), key=lambda p: p.flops)
    return pts + [P(100.0, 0.0)]


def synthetic(n_layers: int, seed: int) -> tuple[list, list]:
    """Fronts of 5 points per layer (cheaper = worse) and hidden sensitivities."""
    rng = random.Random(seed)
    fronts, sens = [], []
    for _ in range(n_layers):
        errs = sorted((rng.uniform(0.02, 0.6) for _ in range(5)), reverse=True)
        flops = sorted(rng.uniform(5, 90) for _ in range(5))
        fronts.append(front(list(zip(errs, flops))))
        sens.append(rng.uniform(0.05, 0.6))
    return fronts, sens


class Truth:
    """evaluate(picks) for a cosine budget: cosine = 1 - sum s_l err_l^2; counts model runs."""

    def __init__(self, fronts, sens, budget):
        self.fronts, self.sens, self.budget, self.runs = fronts, sens, budget, []

    def cosine(self, picks) -> float:
        return 1.0 - sum(s * f[i].error ** 2 for f, s, i in zip(self.fronts, self.sens, picks))

    def __call__(self, picks):
        self.runs.append(tuple(picks))
        cos = self.cosine(picks)
        metrics = {"cosine": cos, "min_cosine": cos}
        return S.meets(self.budget, metrics), metrics


def flops(fronts, picks) -> float:
    return sum(f[i].flops for f, i in zip(fronts, picks))


def optimum(fronts, truth) -> float:
    """The least FLOPs of any configuration meeting the budget (brute force)."""
    best = math.inf
    for picks in itertools.product(*(range(len(f)) for f in fronts)):
        if truth.cosine(picks) >= truth.budget["cosine"]:
            best = min(best, flops(fronts, picks))
    return best


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.995, 0.98, 0.95])
def test_search_meets_the_budget_within_its_runs_and_near_the_optimum(seed, target):
    fronts, sens = synthetic(4, seed)
    budget = {"cosine": target}
    truth = Truth(fronts, sens, budget)
    max_evals = 2 * len(fronts) + 12
    picks, metrics = S.search(fronts, truth, budget, max_evals)
    exact = tuple(len(f) - 1 for f in fronts)
    counted = [p for p in dict.fromkeys(truth.runs) if p != exact]
    assert len(counted) <= max_evals
    assert truth.cosine(picks) >= target and metrics["cosine"] == pytest.approx(truth.cosine(picks))
    assert tuple(picks) in truth.runs or tuple(picks) == exact      # measured, never predicted
    best = optimum(fronts, truth)
    assert flops(fronts, picks) <= 1.10 * best, (flops(fronts, picks), best)   # measured: at most 1.05


def test_cheapest_configuration_that_passes_ends_the_search_after_one_run():
    fronts, sens = synthetic(3, 0)
    truth = Truth(fronts, sens, {"cosine": 0.0})
    picks, _ = S.search(fronts, truth, {"cosine": 0.0}, 20)
    assert picks == [0, 0, 0]
    assert [p for p in truth.runs if p != (5, 5, 5)] == [(0, 0, 0)]


@pytest.mark.parametrize("budget", [{"cosine": 1.0}, {"cosine": 0.999999}])
def test_unreachable_or_zero_budget_returns_all_exact(budget):
    fronts, sens = synthetic(3, 1)
    truth = Truth(fronts, sens, budget)
    picks, metrics = S.search(fronts, truth, budget, 20)
    assert picks == [5, 5, 5] and metrics["cosine"] == 1.0


def test_no_runs_allowed_keeps_every_layer_exact():
    fronts, sens = synthetic(3, 2)
    truth = Truth(fronts, sens, {"cosine": 0.9})
    picks, _ = S.search(fronts, truth, {"cosine": 0.9}, 0)
    assert picks == [5, 5, 5]
    assert set(truth.runs) <= {(5, 5, 5)}            # only the free all-exact evaluation


def test_layers_with_only_exact_are_left_alone():
    fronts = [[P(100.0, 0.0)], front([(0.3, 10.0), (0.1, 40.0)])]
    truth = Truth(fronts, [1.0, 0.1], {"cosine": 0.995})
    picks, _ = S.search(fronts, truth, {"cosine": 0.995}, 10)
    assert picks[0] == 0 and truth.cosine(picks) >= 0.995


# ------------------------------------------------------------------------------------------------
# the pieces
# ------------------------------------------------------------------------------------------------
def test_pareto_front_drops_dominated_capped_and_non_finite_points():
    exact = P(100.0, 0.0)
    pts = [P(10, 0.5), P(20, 0.6), P(30, 0.2), P(30, 0.25), P(40, math.inf), P(50, 0.05), P(120, 0.01)]
    assert S.pareto_front(pts, exact) == [P(10, 0.5), P(30, 0.2), P(50, 0.05), exact]
    assert S.pareto_front(pts, exact, cap=0.3) == [P(30, 0.2), P(50, 0.05), exact]
    assert S.pareto_front([], exact) == [exact]


def test_near_front_keeps_the_front_and_its_near_misses():
    points = [(10, 0.5), (20, 0.55), (20, 0.9), (30, 0.2), (35, 0.23), (40, math.nan), (50, 0.3)]
    assert S.near_front(points, 1.2) == [0, 1, 3, 4]
    assert S.near_front(points, 1.0) == [0, 3]


def test_knapsack_is_the_optimum_of_the_predicted_model():
    """``allocate`` is exact for the model it is given (up to its weight bins): compare with brute
    force over every configuration whose predicted weight fits."""
    for seed in range(5):
        fronts, sens = synthetic(4, seed + 10)
        allowed = {"cosine": 0.02}
        model = S.Sensitivity({"cosine": sens}, {}, {})
        picks = S.allocate(fronts, model, allowed, 1.0)
        weight = lambda p: sum(model.weight(li, f[i].error, allowed) for li, (f, i) in enumerate(zip(fronts, p)))  # noqa: E731
        assert weight(picks) <= 1.0 + 1e-9
        best = min(flops(fronts, p) for p in itertools.product(*(range(len(f)) for f in fronts))
                   if weight(p) <= 1.0 - 4 * len(fronts) / S.DP_BINS)
        assert flops(fronts, picks) <= best + 1e-9


def test_knapsack_respects_the_trust_region():
    fronts = [front([(0.9, 5.0), (0.3, 20.0)])]
    model = S.Sensitivity({"cosine": [1e-6]}, {}, {0: 0.5})
    assert S.allocate(fronts, model, {"cosine": 0.01}, 1.0) == (1,)       # 0.9 is beyond the limit


def test_sensitivity_is_fitted_from_one_probe_per_layer():
    fronts, sens = synthetic(3, 3)
    truth = Truth(fronts, sens, {"cosine": 0.9})
    runs = S.Runs(fronts, truth, 10)
    exact = (5, 5, 5)
    model = S.fit_sensitivity(fronts, [0, 1, 2], runs, exact, {"cosine": 0.1}, 10)
    assert runs.left == 7                       # three probes, the all-exact one is free
    for li in range(3):
        assert model.s["cosine"][li] == pytest.approx(max(sens[li], S.SENS_FLOOR * sorted(sens)[1]))
    assert S.fit_sensitivity(fronts, [0, 1, 2], S.Runs(fronts, truth, 1), exact, {"cosine": 0.1}, 10) is None


def test_runs_cache_and_cap():
    fronts, sens = synthetic(2, 4)
    truth = Truth(fronts, sens, {"cosine": 0.5})
    runs = S.Runs(fronts, truth, 2)
    assert runs.result((5, 5))[0] and runs.left == 2            # free
    assert runs.passes((0, 0)) and runs.left == 1
    assert runs.passes((0, 0)) and runs.left == 1               # cached
    runs.measure((1, 1))
    assert runs.measure((2, 2)) is None and not runs.passes((2, 2))
    assert runs.best((5, 5)) == min([(0, 0), (1, 1)], key=lambda p: flops(fronts, p))


def test_greedy_moves_down_while_the_budget_holds():
    fronts = [front([(0.4, 10.0), (0.2, 20.0), (0.1, 30.0)]), front([(0.4, 10.0), (0.2, 20.0), (0.1, 30.0)])]
    truth = Truth(fronts, [0.1, 0.1], {"cosine": 0.985})    # 0.1*(0.2^2 + 0.2^2) = 0.008 fits, 0.4 does not
    runs = S.Runs(fronts, truth, 10)
    runs.result((3, 3))
    S.greedy(fronts, runs, (3, 3), None, {"cosine": 0.015})
    assert runs.best((3, 3)) == (1, 1)


def test_budget_helpers():
    assert S.meets({"cosine": 0.9, "layer_error": 0.1}, {"cosine": 0.95})
    assert not S.meets({"cosine": 0.9}, {"cosine": math.nan})
    assert not S.meets({"metric": 1.0}, {"metric": 1.5}) and S.meets({"metric": 1.0}, {"metric": 0.5})
    allowed = S.allowed_deficits({"cosine": 0.99, "metric": 1.2, "layer_error": 0.1}, {"metric": 1.0})
    assert allowed == pytest.approx({"cosine": 0.01, "metric": 0.2})
    assert S.deficits({"cosine": 0.97, "metric": 1.1}, {"metric": 1.0}, allowed) == pytest.approx(
        {"cosine": 0.03, "metric": 0.1})
