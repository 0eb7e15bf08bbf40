"""``structattn.calibrate``: pick a method and parameters per attention layer from sample inputs.

    options = structattn.calibrate(model, samples, budget={"cosine": 0.99}, output_fn=embedding)
    compiled = torch.compile(model, backend="structattn", options=options)
    print(options.summary)          # per layer: method, params, measured error, FLOP fraction

How it works (no recompiles, one exact capture run), one module per step:

1. **Capture** (``capture.py``). The model is compiled once with every attention site on a route
   (``RoutedModel``) and run exactly on every sample while each site records its inputs (q, k, v,
   mask, scale, is_causal) and its exact output.
2. **Per-layer table** (``measure.py``). For every layer (module name; its sites are pooled), every
   candidate (method, params) of the method's grid (``Method.candidates`` at the layer's shape),
   supported by every site and cheaper than exact attention, runs on the captured inputs: its
   relative output error and its FLOPs (the report's FLOP model). With many candidates a
   screening pass on a small probe keeps only those near the probe's Pareto front. Per layer the
   Pareto front (fewer FLOPs, lower error) is kept, followed by exact attention, the fallback.
3. **Choice.** ``budget={"layer_error": e}`` (or a plain float): each layer takes its cheapest
   front point with error <= e. End-to-end budgets (``"cosine"``, ``"min_cosine"``,
   ``"metric"``) are checked by running the whole routed model on the samples (a configuration
   is applied by editing the routes), searched by ``search.py``: a fitted sensitivity model, a
   knapsack with measured corrections and greedy steps, within ``max_evals`` runs. Every returned
   configuration was measured end to end and met the budget (all-exact needs no run).
4. **Result** (``api.py``). A plain ``options`` dict (a ``dict`` subclass carrying ``.summary``):
   top-level ``"method": "exact"`` (sites not seen during calibration stay exact) and one
   ``"layers"`` entry per calibrated layer with the chosen method and all its parameters, before
   the user's own rules. Tuning constants: ``tuning.py``.

Budgets are met on the calibration samples; check held-out data before trusting them elsewhere.
"""
from .api import calibrate, default_candidates, default_methods
from .capture import RoutedModel
from .results import CalibratedOptions, CalibrationSummary, Candidate, LayerChoice

__all__ = ["calibrate", "CalibratedOptions", "CalibrationSummary", "LayerChoice", "Candidate", "RoutedModel",
           "default_candidates", "default_methods"]
