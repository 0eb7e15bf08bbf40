"""A model compiled once with every attention site on a switchable route, and the capture of each
site's inputs and exact output on the calibration samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .. import backend as _backend
from ..lowering import routed
from ..methods.exact import sdpa
from ..report import Report


@dataclass
class Call:
    """One captured call of an attention site: its inputs and its exact output (detached)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    is_causal: bool
    out: torch.Tensor


class RoutedModel:
    """``model`` compiled once with the private backend option ``_route`` (and the eager compiler):
    every attention site becomes ``structattn::routed_attention`` with a site key, and what each
    site computes is switched at run time by editing its route (``lowering/routed.py``), without
    recompiling. Sites appear in ``report`` as graphs compile, within ``collecting()``.

    Used by ``calibrate`` and by ``benchmarks/quality.py``'s sweeps. Routes are global state read
    at run time: a tool for measurements, never for deployed models.
    """

    def __init__(self, model: Any, options: Optional[Mapping] = None, *, dynamic: Optional[bool] = None):
        self.model = model
        self.options = {**(options or {}), "_route": True, "method": "exact", "compiler": "eager"}
        self.report = Report(options=dict(self.options))
        self.keys: set = set()
        torch._dynamo.reset()
        self.compiled = torch.compile(model, backend=_backend.structattn_backend, options=self.options,
                                      dynamic=dynamic)

    def collecting(self):
        """Context manager: graphs compiled inside join ``report``, named against ``model``
        (``backend.collecting``; yields the session for ``backend.finish_collecting``)."""
        return _backend.collecting(self.report, root=self.model)

    def __call__(self, *args, **kwargs):
        """The compiled model on these arguments, without autograd."""
        with torch.no_grad():
            return self.compiled(*args, **kwargs)

    @property
    def sites(self) -> list:
        """The routed sites compiled so far (``Site.route_key`` set), in compile order."""
        return [s for s in self.report.sites if s.route_key is not None]

    def route(self, key: str, fn: Optional[Callable]) -> None:
        """Site ``key`` runs ``fn(q, k, v, attn_mask, scale, is_causal)`` (exact when None)."""
        routed.route(key, fn)
        if fn is None:
            self.keys.discard(key)
        else:
            self.keys.add(key)

    def route_method(self, key: str, method, params, min_seq_len: int = 0, impl: str = "auto") -> None:
        """Site ``key`` runs ``method`` with ``params`` as its rewritten op would (same dispatch)."""
        self.route(key, routed.method_route(method, params, min_seq_len, impl))

    def clear(self) -> None:
        """Every site back to exact attention."""
        for key in list(self.keys):
            self.route(key, None)


# ------------------------------------------------------------------------------------------------
# samples and outputs
# ------------------------------------------------------------------------------------------------
def normalize_samples(sample_inputs: Any) -> list[tuple[tuple, dict]]:
    """``calibrate``'s ``sample_inputs`` as ``[(args, kwargs), ...]``; ValueError naming a bad one."""
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


def as_given(sample: tuple[tuple, dict]) -> Any:
    """A sample as the user gave it: the kwargs dict, the args tuple, or ``(args, kwargs)``."""
    args, kwargs = sample
    return kwargs if kwargs and not args else args if args and not kwargs else (args, kwargs)


def main_tensor(output: Any) -> torch.Tensor:
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


def compared_output(output_fn: Optional[Callable], output: Any, sample: tuple[tuple, dict]) -> torch.Tensor:
    """What end-to-end budgets compare for one sample: ``output_fn(output, sample)`` (a tensor,
    else ValueError) or the model output's main tensor, detached."""
    if output_fn is None:
        return main_tensor(output).detach()
    res = output_fn(output, as_given(sample))
    if not isinstance(res, torch.Tensor):
        raise ValueError(f"calibrate: output_fn(output, sample) must return a torch.Tensor (what the end-to-end "
                         f"budget compares); got {type(res).__name__} {res!r:.80}")
    return res.detach()


def run_sample(model: Callable, sample: tuple[tuple, dict], sample_inputs: Any) -> Any:
    """``model(*args, **kwargs)`` of one sample; a tuple given as ``sample_inputs`` is one sample's
    positional arguments, and a call that does not fit says so."""
    try:
        return model(*sample[0], **sample[1])
    except TypeError as err:
        if isinstance(sample_inputs, tuple):
            raise TypeError(f"calibrate: sample_inputs is a tuple of {len(sample_inputs)} item(s), which means ONE "
                            f"sample of positional arguments, model(*sample_inputs), and that call failed: {err}. "
                            f"Pass several samples as a list, e.g. [(x1,), (x2,)] or [x1, x2].") from err
        raise


def progress_bar(items: Optional[Iterable], progress: bool, desc: str, total: Optional[int] = None):
    """A tqdm bar (disabled unless ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=not progress, leave=False)


# ------------------------------------------------------------------------------------------------
# capture
# ------------------------------------------------------------------------------------------------
def capture_calls(rm: RoutedModel, samples: list, sample_inputs: Any, output_fn: Optional[Callable],
                  keep_outputs: bool, progress: bool) -> tuple[dict, list]:
    """Run every sample exactly once through ``rm`` (inside its ``collecting()``) with every site
    recording its calls. Returns ``{site key: [Call, ...]}`` and, with ``keep_outputs``, what the
    end-to-end budget compares per sample (else Nones).

    A sample that compiles new graphs (their sites had no recording route yet) is run again with
    every site routed, its partial recordings dropped."""
    store: dict[str, list] = {}

    def recorder(key):
        def fn(q, k, v, mask, scale, is_causal):
            out = sdpa(q, k, v, mask, scale, is_causal)
            store.setdefault(key, []).append(Call(q.detach(), k.detach(), v.detach(),
                                                  None if mask is None else mask.detach(), float(scale),
                                                  bool(is_causal), out.detach()))
            return out
        return fn

    outputs = []
    for s in progress_bar(samples, progress, "calibrate: exact run"):
        for _attempt in range(3):
            before = {key: len(calls) for key, calls in store.items()}
            n_keys = len(rm.keys)
            out = run_sample(rm, s, sample_inputs)
            for site in rm.sites:
                if site.route_key not in rm.keys:
                    rm.route(site.route_key, recorder(site.route_key))
            if len(rm.keys) == n_keys:
                break
            for key in list(store):
                del store[key][before.get(key, 0):]
            del out
        else:
            raise RuntimeError("calibrate: the model keeps compiling new graphs on the same sample")
        outputs.append(compared_output(output_fn, out, s) if keep_outputs else None)
        del out
    return store, outputs
