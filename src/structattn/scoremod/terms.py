"""Score terms: what a site does to its scores between QK^T and softmax, in eager's order.

The pass finds them in the graph (``passes/terms.py``, a rule table); ``functional`` and
``calibrate`` read them off a call's score modification (``terms_of``). Each method's trace-time
``supports(site, params)`` inspects ``site.terms`` and refuses, with a reason, what it cannot
keep; the report shows them in a column.

* ``Scale(value)``: a constant (or "per-head" / "symbolic") factor on the scores;
* ``Mask(form, left, right)``: ``key_padding``, ``causal``, ``sliding_window`` (keys j with
  ``i - left <= j <= i + right``, -1 = unbounded) or ``general``;
* ``Bias(form, text)``: an additive bias, ``key_only`` (b, h, k; up to per-row constants),
  ``relative`` (a function of k - q) or ``general``; ``text`` its expression when known;
* ``Softcap(cap)``: ``cap * tanh(x / cap)``;
* ``ScoreMod(text)``: any other element-wise chain over the score, head and positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .analysis import bias_form, join, softcap_of, summands
from .expr import BinOp, Const, Var, parse, unparse, variables


@dataclass(frozen=True)
class Scale:
    value: Union[float, str]
    kind = "scale"

    def label(self) -> str:
        return f"scale({self.value:.4g})" if isinstance(self.value, float) else f"scale({self.value})"


@dataclass(frozen=True)
class Mask:
    form: str
    left: int = -1
    right: int = -1
    kind = "mask"

    def label(self) -> str:
        if self.form == "sliding_window":
            return f"window({_bound(self.left)},{_bound(self.right)})"
        return {"key_padding": "padding"}.get(self.form, self.form)


@dataclass(frozen=True)
class Bias:
    form: str
    text: str = ""
    kind = "bias"

    def label(self) -> str:
        return f"bias({self.form})"


@dataclass(frozen=True)
class Softcap:
    cap: float
    kind = "softcap"

    def label(self) -> str:
        return f"softcap({self.cap:g})"


@dataclass(frozen=True)
class ScoreMod:
    text: str
    kind = "score_mod"

    def label(self) -> str:
        return f"score_mod({self.text})"


Term = Union[Scale, Mask, Bias, Softcap, ScoreMod]


def _bound(x: int) -> str:
    return "inf" if x < 0 else str(x)


def terms_of(text: str, window_left: int = -1, window_right: int = -1) -> tuple:
    """The terms of a score modification ``text`` (and a sliding window), in eager's order:
    the expression is peeled from the outside (a sum of biases around a core; a soft-cap around
    its argument); a core that is neither ``s`` nor a soft-cap is one ``ScoreMod``."""
    out: list = []
    if text:
        out = _terms(parse(text))
    if window_left >= 0 or window_right >= 0:
        out.append(Mask("sliding_window", window_left, window_right))
    return tuple(out)


def _terms(tree) -> list:
    parts = summands(tree)
    core = [p for p in parts if "s" in variables(p)]
    biases = [p for p in parts if "s" not in variables(p)]
    if len(core) != 1:
        return [ScoreMod(unparse(tree))]
    c = core[0]
    if isinstance(c, Var):
        inner = []
    elif softcap_of(c) is not None:
        cap, arg = softcap_of(c)
        inner = _terms(arg) + [Softcap(cap)]
    elif isinstance(c, BinOp) and c.op in ("*", "/") and isinstance(c.left, Var) and isinstance(c.right, Const):
        value = float(c.right.value) if c.op == "*" else 1.0 / float(c.right.value)
        inner = [Scale(value)]
    else:
        inner = [ScoreMod(unparse(c))]
    biases = [b for b in biases if not (isinstance(b, Const) and b.value == 0)]
    if not biases:
        return inner
    total = join(biases)
    return inner + [Bias(bias_form(total), unparse(total))]


def labels(terms: tuple) -> str:
    """The report's terms column: the labels joined by ', ' ('-' when there are none)."""
    return ", ".join(t.label() for t in terms) or "-"
