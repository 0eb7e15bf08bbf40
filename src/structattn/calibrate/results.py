"""What ``calibrate`` returns: the options dict with its summary, and the measurements behind it."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union


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
