"""Differential fuzzing of the pass: composed spellings of attention against eager PyTorch.

A hypothesis draw composes one attention site from independent choices -- layout (rank 2/3/4,
cross attention, head_dim != value dim, [B, N, H, D] inputs, bmm on [B*H, N, D] views), score op,
key transpose, scales, mask terms with their fills and order, softmax form, dropout identity,
copies of the probabilities, output op, GQA form -- or an SDPA call, and runs it through the pass
at the dynamo level (``structattn.explain``, compiler "eager") or at the aten level (``make_fx`` /
``torch.export`` then ``rewrite_attention``), with method "exact" or an approximation at its
exact limit. Look-alikes (softmax over another axis, escaping intermediates, non-elementwise
score ops, head masks, channel attention, small fills, training dropout) are composed the same
way. Each draw checks:

* the match count: one rewritten site (with the method asked for where it supports the mask),
  or, for a look-alike, none and a reason;
* the output equals eager's (float32, relative error < 1e-5) on every row, fully masked rows
  included; where eager gives NaN (a row masked only with -inf) structattn gives 0, SDPA's
  documented convention.

The draws themselves (what they hold, how they become functions, the strategies) live in
``fuzz_spellings.py``. ``make test`` runs a fixed, derandomized budget (about a minute on 2
cores); set ``STRUCTATTN_FUZZ_EXAMPLES=2000`` for a long run (examples per test).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import structattn
from fuzz_spellings import (POISON_REASONS, RUNTIME_SCALES, SET_FORMS, Draw, Spelling, decomposed_draws,
                            look_alike_draws, sdpa_draws)
from structattn.config import Config
from structattn.passes import rewrite_attention
from testlib import rel_err

EXAMPLES = int(os.environ.get("STRUCTATTN_FUZZ_EXAMPLES", "0"))


def budget(default: int) -> settings:
    """Derandomized settings: ``default`` examples, or STRUCTATTN_FUZZ_EXAMPLES when set."""
    return settings(max_examples=EXAMPLES or default, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# -- running a draw --------------------------------------------------------------------------------
class Fn(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Result(NamedTuple):
    """What running a draw gives: eager's and structattn's outputs, the sites, the rewritten
    graph, and the spelled function's inputs by name."""

    ref: Any
    out: Any
    sites: list
    graph: torch.fx.GraphModule
    inputs: dict


def run(d: Draw) -> Result:
    """Run draw ``d`` eagerly and through the pass (at the draw's level, with the draw's method)."""
    fn, args, names = Spelling(d).build()
    inputs = dict(zip(names, args))
    # The cost rule would keep these tiny sites exact; the fuzz checks the rewrite itself.
    options = {"method": d.method, "compiler": "eager", "exact_when_cheaper": False}
    if d.params:
        options[d.method] = dict(d.params)
    seed = d.seed
    torch.manual_seed(seed)
    with torch.no_grad():
        ref = fn(*args)
    if d.level == "dynamo":
        torch.manual_seed(seed)
        report = structattn.explain(Fn(fn), *args, options=options)
        return Result(ref, report.output, report.sites, report.graph_after, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if d.level == "make_fx":
            gm = make_fx(fn)(*args)
        else:
            gm = torch.export.export(Fn(fn), tuple(args)).module()
    sites = rewrite_attention(gm, Config.from_options(options))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = gm(*args)
    return Result(ref, out, sites, gm, inputs)


# -- oracles ---------------------------------------------------------------------------------------
def expected_kind(d: Draw) -> str:
    """The mask kind the report must give: the structure the draw's mask provably has."""
    causal = padding = general = False
    if d.family == "sdpa":
        return {"none": "none", "bool_padding": "key_padding", "bool_both": "causal+key_padding",
                "additive_padding": "key_padding", "float_bias": "general", "additive_input": "key_padding",
                "is_causal": "causal"}[d.sdpa_mask]
    if d.score_op == "baddbmm":
        general, padding = general or d.seed % 2 == 0, padding or d.seed % 2 == 1
    for step in d.steps:
        if step.kind == "bias":
            general, padding = general or step.how == "general", padding or step.how == "key"
        elif step.kind == "number":
            general, padding = general or step.value == 1.0, padding or step.value == 0.0
        elif step.kind == "mask":
            term = step.term
            if term.form == "add_input" and term.what != "padding":
                general = True   # a materialised [.., Q, K] float mask: nothing to prove it causal
            causal = causal or term.what != "padding"
            padding = padding or term.what != "causal"
    if general:
        return "general"
    if causal:
        return "causal+key_padding" if padding else "causal"
    return "key_padding" if padding else "none"


def serves(method: str, kind: str) -> bool:
    """Does ``method`` serve a site with this mask kind (else the site stays exact, with a reason)?"""
    if method == "monarch":
        return kind in ("none", "key_padding")
    if method == "mra":
        return kind != "general"
    return True


def dead_rows(d: Draw, keep: torch.Tensor) -> torch.Tensor:
    """Bool, shaped like the output: the query rows whose every key the draw's key padding (and
    causality) masks."""
    if d.family == "sdpa":
        padded, causal = d.sdpa_mask in ("bool_padding", "bool_both", "additive_padding", "additive_input"), \
            d.sdpa_mask == "bool_both"
    else:
        padded = any(t.what != "causal" for t in d.terms)
        causal = any(t.what != "padding" for t in d.terms)
    s = d.shape
    dead = torch.zeros(keep.shape[0], s.nq, dtype=torch.bool)
    if padded:
        for i in range(s.nq):
            dead[:, i] = ~keep[:, : min(i, s.nk - 1) + 1 if causal else None].any(-1)
    if s.rank == 4:
        dead = dead[:, None, :, None].expand(s.batch, s.heads, s.nq, s.dv)
        return dead.transpose(1, 2) if d.heads_last else dead
    if s.rank == 3:
        return dead[:, :, None].expand(s.batch, s.nq, s.dv)
    return dead[0][:, None].expand(s.nq, s.dv)


def fill_noise(d: Draw) -> float:
    """How far fp32 rounding moves the logits of a fully masked row, relative to their size: a
    finite fill that does not swallow the scores (|fill| < 1e6, e.g. -1e4) leaves logits of about
    |fill| * scale, known to eager itself only to a few ulps (the softmax of such a row is noise
    at that level, in eager as in any other order of the same sums). 0 when fills swallow the
    scores (finfo.min, -1e9: every logit of the row is exactly the fill)."""
    fills = [abs(t.fill) for t in d.terms if t.fill != float("-inf")]
    if d.family == "sdpa" and d.sdpa_mask in ("additive_padding", "additive_input") and d.fill != float("-inf"):
        fills.append(abs(d.fill))
    if not fills or sum(fills) >= 1e6:
        return 0.0
    bound = {"tensor0": 1.5, "div_tensor0": 1 / 0.7, "per_head": 1.5}
    scale = 1.0
    for step in d.steps:
        if step.kind == "scale":
            factor = bound.get(step.how, 1 / step.value if step.how == "div" else step.value)
            scale *= max(1.0, factor)
    return 16 * 2.0**-23 * sum(fills) * scale


def finite_fills(d: Draw) -> bool:
    if d.family == "sdpa":
        return d.sdpa_mask in ("additive_padding", "additive_input") and d.fill != float("-inf")
    return any(t.fill != float("-inf") for t in d.terms)


def op_mask_is_float(gm: torch.fx.GraphModule) -> bool:
    """Does the structattn op in ``gm`` receive a floating (additive) attn_mask?"""
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("structattn."):
            mask = node.args[3]
            val = mask.meta.get("example_value", mask.meta.get("val")) if isinstance(mask, torch.fx.Node) else None
            return mask is not None and (val is None or val.is_floating_point())
    return False


def logit_precision(d: Draw, inputs: dict) -> float:
    """The relative precision fp32 leaves the attention output at: 1e-5, or more when the logits
    are large (|logit| <= L rounds by ~L * eps, which moves each softmax weight by that much,
    relative; two orders of the same sums each do). L bounds |scale * q.k| by the draw's scales
    and the largest q and k rows, plus the biases added."""
    scale = 1.0
    for _, how, value in d.operand_scales:
        scale *= value if how == "mul" else 1 / value
    runtime = {"tensor0": inputs.get("scale0"), "div_tensor0": inputs.get("divisor0"), "per_head": inputs.get("temperature")}
    for step in d.steps:
        if step.kind == "scale":
            factor = runtime.get(step.how)
            if factor is not None:
                factor = factor.abs().max().item()
                scale *= 1 / inputs["divisor0"].item() if step.how == "div_tensor0" else factor
            else:
                scale *= 1 / step.value if step.how == "div" else step.value
    if d.score_op == "baddbmm":
        scale *= d.baddbmm[1]
    if d.family == "sdpa":
        scale = d.sdpa_scale if d.sdpa_scale is not None else d.shape.d ** -0.5
    q, k = inputs["q"], inputs["k"]
    bound = scale * q.norm(dim=-1).max().item() * k.norm(dim=-1).max().item()
    bound += sum(t.float().abs().max().item() for n, t in inputs.items() if n.startswith(("bias", "number", "alibi")))
    return max(1e-5, 8 * 2.0**-23 * bound)


def assert_eager(out: torch.Tensor, ref: torch.Tensor, noisy: Optional[torch.Tensor] = None, noise: float = 0.0,
                 precision: float = 1e-5) -> None:
    """``out`` equals eager's ``ref`` on every element, except that where eager gives NaN (a row
    masked only with -inf: softmax of all -inf) structattn gives 0, as SDPA does. The tolerance is
    relative error < ``precision`` (1e-5 unless the logits are large, see ``logit_precision``).
    Elements in ``noisy`` (fully masked rows with a finite, non-swallowing fill) are compared to
    ``noise`` times the largest |ref|, the precision eager itself has there (see ``fill_noise``)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    nan = torch.isnan(ref)
    assert torch.equal(out[nan], torch.zeros_like(out[nan])), "rows that are NaN in eager must be 0"
    assert not torch.isnan(out[~nan]).any(), "NaN where eager is finite"
    exact = ~nan if noisy is None or not noise else ~nan & ~noisy
    o, r = out[exact], ref[exact]
    if r.numel():
        assert rel_err(o, r) < precision or (r.norm() == 0 and o.norm() < 1e-6), rel_err(o, r)
        torch.testing.assert_close(o, r, rtol=10 * precision, atol=precision * max(1.0, r.abs().max().item()))
    loose = ~nan & noisy if noisy is not None and noise else None
    if loose is not None and loose.any():
        torch.testing.assert_close(out[loose], ref[loose], rtol=0, atol=noise * max(1.0, ref[loose].abs().max().item()))


def constant_scale_after(d: Draw, index: int) -> float:
    """The product of the constant scales the draw applies to the scores after step ``index``."""
    scale = 1.0
    for step in d.steps[index + 1:]:
        if step.kind == "scale" and step.how not in RUNTIME_SCALES:
            scale *= 1 / step.value if step.how == "div" else step.value
    return scale


def weak_fill(d: Draw) -> bool:
    """Does a masked_fill / where write a fill that the constant scales after it shrink above
    -1e3 (-1e4 * 0.125 * 0.5)? Eager then gives masked keys a small weight: not a mask."""
    return any(s.kind == "mask" and s.term.form in SET_FORMS and s.term.fill * constant_scale_after(d, i) > -1e3
               for i, s in enumerate(d.steps))


def mixed_fills(d: Draw) -> bool:
    """Does the draw write a finite fill on masked entries AND add a bias to the scores, or scale
    such a fill at run time? The op's one mask cannot always carry eager's fully masked rows then:
    the pass passes eager's additive terms as they are (mask kind key_padding or general), or
    leaves the site alone with that reason."""
    if d.family == "sdpa":
        return False
    bias = d.score_op == "baddbmm" or any(
        s.kind in ("bias", "number") or (s.kind == "mask" and (s.term.form == "add_input" or s.term.late))
        for s in d.steps)
    finite = [i for i, s in enumerate(d.steps) if s.kind == "mask" and s.term.form != "add_input"
              and s.term.fill != float("-inf")]
    runtime = any(s.kind == "scale" and s.how in RUNTIME_SCALES for s in d.steps[min(finite, default=len(d.steps)):])
    return bool(finite) and (bias or runtime)


def bias_masks_and_fill_differs(d: Draw) -> bool:
    """A documented limit: a precomputed additive mask (a bias that masks keys itself, with its
    own fill) followed by a masked_fill / where writing a DIFFERENT finite fill. The op's mask
    then marks the bias's masked entries like the others, and a fully masked row gets the later
    fill on all of them, where eager keeps the bias's own fill on its entries."""
    biases = [i for i, s in enumerate(d.steps) if s.kind == "mask" and s.term.form == "add_input"]
    return bool(biases) and any(
        i > biases[0] and s.kind == "mask" and s.term.form in SET_FORMS and s.term.fill != float("-inf")
        and s.term.fill != d.steps[biases[0]].term.fill for i, s in enumerate(d.steps))


def check_rewritten(d: Draw) -> None:
    """A valid spelling: one site, rewritten (with the method asked for when it serves the mask),
    computing eager's output (see the module docstring for the documented exceptions)."""
    ref, out, sites, gm, inputs = run(d)
    precision = logit_precision(d, inputs)
    assert len(sites) == 1, [(s.rewritten, s.reason) for s in sites]
    site = sites[0]
    if weak_fill(d):
        assert not site.rewritten and "not a mask" in site.reason, (site.rewritten, site.reason)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        return
    if mixed_fills(d) and not site.rewritten:
        assert "finite fill" in site.reason, site.reason
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        return
    assert site.rewritten, site.reason
    kind = expected_kind(d)
    if d.shape.nq == 1 or mixed_fills(d):
        # one query row: every [.., Q, K] term is query-independent (a causal one too); mixed
        # fills: eager's own additive terms may be what the op gets
        kind = site.mask.split(" ")[0]
    assert site.mask.split(" ")[0] == kind, (site.mask, kind)
    if serves(d.method, kind):
        assert site.method == d.method, (site.method, site.reason)
    else:
        assert site.method == "exact" and d.method in (site.reason or ""), (site.method, site.reason)
    dead = dead_rows(d, Spelling(d).keep)
    if d.method == "mra" and op_mask_is_float(gm) and finite_fills(d) and dead.any():
        # MRA still reads finite additive values <= -1e4 as "masked", so a fully masked row of such
        # a bias gets 0, not eager's softmax (being fixed in methods/mra): compare the count only
        return
    if bias_masks_and_fill_differs(d):
        assert_eager(out[~dead], ref[~dead], precision=precision)   # the documented limit: every other row
        return
    assert_eager(out, ref, dead, fill_noise(d), precision)


# -- the fuzz tests --------------------------------------------------------------------------------
@budget(110)
@given(decomposed_draws())
def test_decomposed_spellings_match_eager(d):
    check_rewritten(d)


@budget(50)
@given(sdpa_draws())
def test_sdpa_spellings_match_eager(d):
    check_rewritten(d)


@budget(60)
@given(st.one_of(decomposed_draws(levels=("make_fx", "export")), sdpa_draws(levels=("make_fx", "export"))))
def test_aten_level_spellings_match_eager(d):
    check_rewritten(d)


@budget(60)
@given(look_alike_draws())
def test_look_alikes_are_declined(d):
    ref, out, sites, _, _ = run(d)
    assert sites and not any(s.rewritten for s in sites), [(s.rewritten, s.reason) for s in sites]
    assert all(s.reason for s in sites), [s.reason for s in sites]
    if d.level == "dynamo" and POISON_REASONS[d.poison]:
        assert any(POISON_REASONS[d.poison] in s.reason for s in sites), [s.reason for s in sites]
    refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6, equal_nan=True)

