"""Cost-aware rewriting: keep a site exact where its method would cost more than exact attention.

Two rules, both about what a user feels:

* at trace time, from the method's FLOP model: a site whose method needs at least as many FLOPs
  as exact attention (causal exact attention counted as the half SDPA's causal kernel computes)
  stays exact, with the reason in the report. Symbolic lengths are judged at their traced values
  and at 16x them, and the site stays exact only when the method loses at both (a dynamic graph
  traced on a short input must still approximate long ones). Decode steps (q_len 1) are the
  typical case: MRA's pooling alone costs as much as attending to every key once.
* at run time, ``min_seq_len``: kv lengths below it run exact. ``min_seq_len="auto"`` takes, per
  method, parameters, head dims, dtype and device, the larger of the FLOP-model crossover and the
  measured one (``lowering.crossover``).
"""
from __future__ import annotations

from typing import Any, Optional

import sympy

from ..methods import Method, SiteShape, exact_flops

#: symbolic lengths are also judged at this multiple of their traced values
_FAR = 16


def exact_cost(shape: SiteShape) -> Any:
    """FLOPs exact attention really spends: the causal kernel skips the upper triangle."""
    full = exact_flops(shape)
    return full / 2 if shape.causal else full


def cost_reason(method: Method, shape: SiteShape, params: Any, hints: dict) -> Optional[str]:
    """Why ``method`` should not run at this site (it costs at least exact attention), or None."""
    if method.name == "exact" or method.saves != "flops" or shape.head_dim is None or shape.v_head_dim is None:
        return None
    ratio = sympy.sympify(method.flops(shape, params)) / sympy.sympify(exact_cost(shape))
    near = _at(ratio, hints, 1)
    if near is None or near < 1:
        return None
    if ratio.free_symbols:
        far = _at(ratio, hints, _FAR)
        if far is None or far < 1:
            return None
    what = "causal " if shape.causal else ""
    return (f"at q_len={_show(shape.q_len, hints)}, kv_len={_show(shape.kv_len, hints)} it would cost "
            f"{100 * near:.0f}% of {what}exact attention's FLOPs, so exact is cheaper")


def _at(expr: Any, hints: dict, factor: int) -> Optional[float]:
    values = {s: hints[str(s)] * factor for s in expr.free_symbols if str(s) in hints}
    try:
        return float(expr.subs(values))
    except (TypeError, ValueError):
        return None


def _show(value: Any, hints: dict) -> str:
    if isinstance(value, sympy.Basic) and value.free_symbols:
        return f"{value} (traced {value.subs({s: hints.get(str(s), s) for s in value.free_symbols})})"
    return str(value)


def flop_crossover(method: Method, params: Any, shape: SiteShape) -> int:
    """The shortest kv length of ``lowering.crossover.GRID`` from which ``method`` needs fewer FLOPs
    than exact attention (self attention, q_len = kv_len), or ``NEVER``."""
    from dataclasses import replace

    from ..lowering.crossover import GRID, NEVER

    for n in GRID:
        at = replace(shape, batch=1, num_heads=1, num_kv_heads=1, q_len=n, kv_len=n)
        if float(method.flops(at, params)) < float(exact_cost(at)):
            return n
    return NEVER


def auto_min_seq_len(method: Method, params: Any, shape: SiteShape, device: Any) -> int:
    """``min_seq_len="auto"`` for one site: the larger of the FLOP-model and measured crossovers."""
    import torch

    from ..lowering.crossover import measured_crossover
    from ..lowering.ops import run_method

    if method.name == "exact" or method.saves != "flops":
        return 0
    if method.takes_tensors:
        # its op needs the site's constants (fitted weights), which a timing run on stand-in
        # shapes does not have: the FLOP model's crossover alone
        return flop_crossover(method, params, shape)

    def run(m, p, q, k, v, scale, causal):
        return run_method(m, q, k, v, None, scale, causal, 0, "auto", p)

    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        measured = measured_crossover(method, params, head_dim=int(shape.head_dim), v_head_dim=int(shape.v_head_dim),
                                      dtype=shape.dtype, device=torch.device(device), causal=shape.causal, run=run)
    return max(flop_crossover(method, params, shape), measured)
