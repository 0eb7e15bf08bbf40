"""Hugging Face transformers without compiling: ``attn_implementation="structattn"``.

    import structattn
    structattn.hf.register()                       # once per process; safe to repeat
    model = AutoModel.from_pretrained(name, attn_implementation="structattn")
    structattn.hf.apply(model, options)            # same options dict as the backend (or calibrate's)
    model(**inputs)                                # runs structattn's methods eagerly
    print(structattn.hf.report(model))             # per layer: method, mask, calls, FLOPs, reasons

``apply`` also switches a loaded model to ``"structattn"`` (``model.set_attn_implementation``), so
``structattn.hf.apply(AutoModel.from_pretrained(name), options)`` is enough on its own.

How the pieces meet. transformers calls the registered attention function with the attention
module as first argument. ``apply`` records every module of ``model.named_modules()`` with its
name (the module FQN, the same name the compiled path reports) and the validated ``Config``; the
attention function looks its module up, resolves the layer's method from the per-layer globs
(``Config.resolve``) and calls the method's ``structattn::<method>_attention`` op, so eager calls
and compiled sites share one dispatch (``min_seq_len``, ``impl``, kernels, autograd).

Masks. transformers builds masks through ``AttentionMaskInterface``; without an entry for our
name it builds none at all, so the "structattn" entry is registered with the attention function.
It returns what transformers' SDPA mask returns (``None`` for pure causal attention, which then
runs as ``is_causal=True`` with no N x N mask; a boolean keep-mask otherwise) except that a
bidirectional mask with padding comes back as a compact ``[B, 1, 1, K]`` key-padding mask. A
materialised ``[B, 1, Q, K]`` boolean mask (causal + padding, or one passed by the user) is
checked element by element: when it equals ``causal & last_row`` or has identical rows, the op
gets ``is_causal`` plus the ``[B, 1, 1, K]`` row, i.e. the mask kind the compiled pass proves
("causal+key_padding", "key_padding"); anything else is a ``general`` mask. The check is exact
(never a guess) and its result is cached per mask tensor, so it runs once per forward.

Sliding windows and soft-capping. transformers passes a sliding layer's ``sliding_window=w``
(Mistral, Gemma-2: key j is visible from query i iff ``j > i - w``, so the op's window is
``(w - 1, 0)``) and Gemma-2's ``softcap=c``; the mask it builds for such a layer already holds the
band. The band is dropped from the mask only when the mask is PROVEN to be exactly ``causal &
window & row`` (row: the keys any query keeps, i.e. the padding), element by element: then the op
gets ``is_causal``, the window and the row, and MRA / top-k serve the layer. Passing the band in
the mask as well would be harmless for exact and top-k but makes MRA refuse (a general mask), so
it is not done; a mask that is not exactly the band (a cache offset: bottom-right alignment, a
custom mask) stays ``general`` without the window, never a guess. ``softcap=c`` reaches the op as
the score modification ``c * tanh(s / c)`` of the scaled scores, as the compiled pass reads it.

Exact fallbacks, each recorded with its reason: a method that cannot serve the layer (``supports``,
e.g. Monarch on a causal layer or with soft-capping), ``output_attentions`` (the model's own eager
attention, which returns the weights), attention sinks (the model's eager attention), active
training dropout and ``position_bias`` (transformers' SDPA attention).

Under tracing (``torch.compile`` of a model that uses this implementation) masks are not analysed
(a materialised mask stays ``general``) and calls are not recorded: to compile, use
``backend="structattn"`` on the model's ``sdpa`` or ``eager`` implementation instead.
"""
from __future__ import annotations

import copy
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from .config import Config, Resolved
from .lowering.ops import mod_args, op_args, op_for
from .passes.cost import auto_min_seq_len, cost_reason
from .methods import SiteShape, exact_flops, get_method
from .methods.base import ScoreMods, takes_mods
from .methods.common import causal_keep
from .report import Site, _gflop, _heads
from .scoremod.terms import Mask, labels, terms_of

__all__ = ["NAME", "register", "apply", "report", "attention_forward", "build_mask", "plan_mask", "plan_window_mask", "HFReport", "HFSite"]

#: the ``attn_implementation`` name registered with transformers
NAME = "structattn"

#: call arguments that change the attention math and only transformers' eager functions apply
_EAGER_ONLY = ("s_aux", "sinks")


# ------------------------------------------------------------------------------------------------
# registration and binding
# ------------------------------------------------------------------------------------------------
def register() -> None:
    """Register ``"structattn"`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (needed before ``from_pretrained(..., attn_implementation=
    "structattn")``). Safe to call more than once."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, build_mask)


@dataclass
class _Binding:
    """What ``apply`` stored for one model: its validated options and its report."""

    config: Config
    report: "HFReport"
    resolved: dict = field(default_factory=dict)  # layer FQN -> Resolved

    def resolve(self, layer: str) -> Resolved:
        if layer not in self.resolved:
            self.resolved[layer] = self.config.resolve(layer)
        return self.resolved[layer]


# module -> (its FQN in the applied model, the model's binding); weak so models can be freed
_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, _Binding]]" = weakref.WeakKeyDictionary()
_ROOTS: "weakref.WeakKeyDictionary[torch.nn.Module, _Binding]" = weakref.WeakKeyDictionary()


def apply(model: torch.nn.Module, options: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """Run ``model``'s attention through structattn with ``options`` (the backend's options dict,
    or what ``structattn.calibrate`` returned, as is). Returns ``model``.

    Every module of ``model.named_modules()`` is bound to its name, so the per-layer globs of
    ``options["layers"]`` match the names the compiled path reports. ``options["compiler"]`` has
    no effect here (nothing is compiled). Calling ``apply`` again rebinds with the new options and
    a fresh report. A ``PreTrainedModel`` is switched to ``attn_implementation="structattn"``; for
    other modules, set it on the transformers models they contain.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"structattn.hf.apply: model must be a torch.nn.Module; got {type(model).__name__}")
    register()
    config = Config.from_options(copy.deepcopy(dict(options or {})))
    binding = _Binding(config, HFReport(options=dict(options or {})))
    names = []
    for name, module in model.named_modules():
        _MODULES[module] = (name, binding)
        names.append(name)
    _ROOTS[model] = binding
    for pattern in config.unmatched_globs(names):
        msg = f"structattn.hf: options['layers'] glob {pattern!r} matches no module of {type(model).__name__}"
        binding.report.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    return model


def report(model: torch.nn.Module) -> "HFReport":
    """The ``HFReport`` of the attention calls made since ``apply(model, ...)``."""
    binding = _ROOTS.get(model)
    if binding is None:
        raise ValueError(
            f"structattn.hf.report: {type(model).__name__} was not passed to structattn.hf.apply(model, options)"
        )
    return binding.report


def _binding_of(module: torch.nn.Module) -> tuple[str, _Binding]:
    entry = _MODULES.get(module)
    if entry is None:
        raise RuntimeError(
            f"structattn: the attention module {type(module).__name__} runs with attn_implementation="
            f"'structattn' but its model was not configured; call structattn.hf.apply(model, options) "
            f"after loading it (options as for torch.compile(..., backend='structattn'))"
        )
    return entry


# ------------------------------------------------------------------------------------------------
# the mask function transformers calls (AttentionMaskInterface)
# ------------------------------------------------------------------------------------------------
def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                   allow_is_bidirectional_skip: bool = False, **kwargs: Any) -> Optional[torch.Tensor]:
    """transformers' SDPA mask (``None`` for pure causal, a boolean keep-mask otherwise), except
    that a plain bidirectional mask with padding is returned as a compact ``[B, 1, 1, K]``."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    plain_bidirectional = mask_function is bidirectional_mask_function and kwargs.get("local_size") is None
    if plain_bidirectional and allow_is_bidirectional_skip:
        if attention_mask is None:
            return None
        padding = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        if padding.shape[-1] == kv_length:  # else: let transformers pad it (prefix tuning)
            if not _tracing(padding) and bool(padding.all()):
                return None
            return padding[:, None, None, :]
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def _tracing(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(
        t, torch._subclasses.FakeTensor)


# ------------------------------------------------------------------------------------------------
# mask analysis: what the op gets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MaskPlan:
    kind: str                       # none | key_padding | causal | causal+key_padding | general
    causal: bool
    keypad: Optional[torch.Tensor]  # [.., 1, K] row for key_padding kinds, else None
    window: tuple = (-1, -1)        # the op's (window_left, window_right) the mask was proven to hold


_CACHE_SIZE = 4
_cache: list = []  # (weakref to mask, mask._version, q_len, kv_len, plan); a few masks per forward
_cache_lock = threading.Lock()


def plan_mask(mask: Optional[torch.Tensor], causal: bool, q_len: int,
              kv_len: int) -> tuple[Optional[torch.Tensor], bool, str]:
    """(mask for the op, is_causal, mask kind) for an SDPA-style ``mask`` plus the causal flag.

    ``causal`` applies only without a mask (transformers' SDPA convention). A mask that is exactly
    ``causal & row`` or has identical query rows is split into ``is_causal`` and that ``[.., 1, K]``
    row; an all-keep row is dropped. The split is verified element by element, never assumed.
    """
    return plan_window_mask(mask, causal, q_len, kv_len, None)[:3]


def plan_window_mask(mask: Optional[torch.Tensor], causal: bool, q_len: int, kv_len: int,
                     sliding_window: Optional[int]) -> tuple[Optional[torch.Tensor], bool, str, tuple]:
    """``plan_mask`` for a layer that transformers calls with ``sliding_window`` (None: none), plus
    the op's window ``(left, right)`` ((-1, -1): none): a boolean ``mask`` that is exactly
    ``causal & (j > i - sliding_window) & row`` becomes ``is_causal``, the window ``(w - 1, 0)``
    and that ``[.., 1, K]`` row (verified element by element)."""
    none = (-1, -1)
    if mask is None:
        causal = bool(causal) and q_len > 1
        return None, causal, "causal" if causal else "none", none
    if _tracing(mask):
        return mask, False, "key_padding" if mask.dim() >= 2 and mask.shape[-2] == 1 else "general", none
    left = int(sliding_window) - 1 if isinstance(sliding_window, int) and sliding_window >= 1 else None
    plan = _cached_plan(mask, q_len, kv_len, left)
    if plan.kind == "general":
        return mask, False, "general", none
    return plan.keypad, plan.causal, plan.kind, plan.window


def _cached_plan(mask: torch.Tensor, q_len: int, kv_len: int, left: Optional[int] = None) -> _MaskPlan:
    with _cache_lock:
        for ref, version, q, k, w, plan in _cache:
            if ref() is mask and version == mask._version and (q, k, w) == (q_len, kv_len, left):
                return plan
    plan = _analyse(mask, q_len, kv_len, left)
    with _cache_lock:
        _cache.insert(0, (weakref.ref(mask), mask._version, q_len, kv_len, left, plan))
        del _cache[_CACHE_SIZE:]
    return plan


def _analyse(mask: torch.Tensor, q_len: int, kv_len: int, left: Optional[int] = None) -> _MaskPlan:
    if mask.dim() < 2 or mask.shape[-2] == 1:
        row = mask
    else:
        row = mask[..., -1:, :]
        if not torch.equal(mask, row.expand_as(mask)):
            if mask.dtype != torch.bool or q_len < 2:
                return _MaskPlan("general", False, None)
            keep = causal_keep(q_len, kv_len, mask.device)
            if left is not None and mask.shape[-2:] == keep.shape:
                banded = _banded(mask, keep, left)
                if banded is not None:
                    return banded
            if mask.shape[-2:] != keep.shape or not torch.equal(mask, (row & keep).expand_as(mask)):
                return _MaskPlan("general", False, None)
            if bool(row.all()):
                return _MaskPlan("causal", True, None)
            return _MaskPlan("causal+key_padding", True, row.clone())  # a copy: never keep the N x N mask alive
        row = row.clone()
    all_keep = bool(row.all()) if row.dtype == torch.bool else bool((row == 0).all())
    return _MaskPlan("none", False, None) if all_keep else _MaskPlan("key_padding", False, row)


def _banded(mask: torch.Tensor, causal: torch.Tensor, left: int) -> Optional[_MaskPlan]:
    """The plan of a bool ``mask`` [.., Q, K] that equals ``causal & window(left, 0) & row``, with
    ``row`` the keys some query keeps; None when it is not exactly that."""
    q = torch.arange(causal.shape[0], device=mask.device).view(-1, 1)
    band = causal & (torch.arange(causal.shape[1], device=mask.device).view(1, -1) >= q - left)
    row = mask.any(-2, keepdim=True)
    if not torch.equal(mask, (band & row).expand_as(mask)):
        return None
    if bool(row.all()):
        return _MaskPlan("causal", True, None, (left, 0))
    return _MaskPlan("causal+key_padding", True, row, (left, 0))


# ------------------------------------------------------------------------------------------------
# the attention function transformers calls (AttentionInterface)
# ------------------------------------------------------------------------------------------------
def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers attention function: q [B, H, Q, D], k/v [B, Hk, K, D] (grouped heads as
    given, no copies) -> ([B, Q, H, Dv], attention weights or None)."""
    layer, binding = _binding_of(module)
    resolved = binding.resolve(layer)
    config = binding.config
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    flag = getattr(module, "is_causal", True) if is_causal is None else is_causal
    call = dict(kwargs, dropout=dropout, scaling=scaling)
    if is_causal is not None:
        call["is_causal"] = is_causal

    fallback = _fallback_reason(module, dropout, kwargs)
    if fallback is not None:
        reason, runner = fallback
        out, weights = runner(module, query, key, value, attention_mask, call)
        kind = plan_mask(attention_mask, flag, query.shape[2], key.shape[2])[2]
        _record(binding, layer, resolved, query, key, value, "exact", None, reason, False, kind)
        return out, weights

    q_len = query.shape[2]
    sliding = kwargs.get("sliding_window")
    mask, causal, kind, window = plan_window_mask(attention_mask, flag, q_len, key.shape[2], sliding)
    softcap = kwargs.get("softcap")
    mods = ScoreMods(f"{float(softcap)!r} * tanh(s / {float(softcap)!r})" if softcap is not None else "", [],
                     *window)
    if causal and mask is None and key.shape[2] > q_len:
        # An empty static cache in prefill: top-left causal never reaches keys past q_len (as in
        # transformers' SDPA attention, which slices them off the same way).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    shown = kind
    if resolved.causal and kind == "general":
        mask, causal, kind, shown = None, True, "causal", "causal (declared)"

    method, params = get_method(resolved.method), resolved.params
    terms = terms_of(mods.text, mods.window_left, mods.window_right) + tuple(
        Mask(k) for k in ({"general": ("general",)}.get(kind) or [k for k in kind.split("+") if k != "none"]))
    site = SiteShape(query.shape[0], query.shape[1], key.shape[1], q_len, key.shape[2], query.shape[3],
                     value.shape[3], kind, query.dtype, terms=terms)
    tensors = ()
    bound = method.bind(layer, site, params, query.device)      # fitted constants (``linear``)
    if isinstance(bound, str):
        reason = bound
    else:
        params, tensors = bound
        reason = method.supports(site, params)
    if reason is None and not mods.empty and not takes_mods(method.forward):
        reason = f"takes no score modifications ({labels(terms)})"
    if reason is not None:
        where = f" (sliding_window={sliding})" if sliding is not None and kind == "general" else ""
        reason = f"{method.name}: {reason}{where}"
        method, params = get_method("exact"), get_method("exact").Params()
    elif config.exact_when_cheaper and cost_reason(method, site, params, {}) is not None:
        reason = f"{method.name}: {cost_reason(method, site, params, {})}"
        method, params = get_method("exact"), get_method("exact").Params()
    else:
        threshold = config.min_seq_len
        if threshold == "auto":
            threshold = auto_min_seq_len(method, params, site, query.device)
        if method.name != "exact" and key.shape[2] < threshold:
            reason = f"kv length below min_seq_len {threshold}" + (" (auto)" if config.min_seq_len == "auto" else "")
    # decided above: the op runs what was chosen (min_seq_len 0), so the record tells the truth
    out = op_for(method)(query, key, value, mask, scale, bool(causal), 0 if reason is None else 1 << 62,
                         config.impl, "", *mod_args(mods), *op_args(method, params, tensors))
    ran = method.name if reason is None else "exact"
    _record(binding, layer, resolved, query, key, value, ran, params if reason is None else None, reason,
            True, shown, labels(terms))
    return out.transpose(1, 2).contiguous(), None


def _fallback_reason(module: torch.nn.Module, dropout: float, kwargs: dict):
    """(reason, runner) when this call must run transformers' own exact attention, else None."""
    wants = kwargs.get("output_attentions")
    if wants is None:
        wants = getattr(getattr(module, "config", None), "output_attentions", False)
    if wants:
        return "output_attentions: attention weights come from exact eager attention", _run_eager
    for name in _EAGER_ONLY:
        if kwargs.get(name) is not None:
            what = "logit soft-capping" if name == "softcap" else "attention sinks"
            return f"{name}: no structattn method applies {what}; exact eager attention", _run_eager
    if dropout and module.training:
        return (f"dropout p={dropout} in training: structattn methods have no attention dropout; "
                f"exact SDPA with dropout"), _run_sdpa
    if kwargs.get("position_bias") is not None:
        return "position_bias: exact SDPA with the bias as an additive mask", _run_sdpa
    return None


def _run_sdpa(module, query, key, value, mask, call):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, **call)


def _run_eager(module, query, key, value, mask, call):
    """The model's own ``eager_attention_forward`` (it returns the weights), with an eager-style
    additive mask; a plain eager attention for models that define none."""
    q_len, kv_len = query.shape[2], key.shape[2]
    flag = call.get("is_causal")
    flag = getattr(module, "is_causal", True) if flag is None else flag
    if mask is None and flag and q_len > 1:
        mask = causal_keep(q_len, kv_len, query.device)[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None:
        return eager(module, query, key, value, mask, **call)
    return _plain_eager(module, query, key, value, mask, call)


def _plain_eager(module, query, key, value, mask, call):
    if call.get("s_aux") is not None or call.get("sinks") is not None:
        raise NotImplementedError(
            f"structattn: {type(module).__name__} passes attention sinks but its modeling file defines no "
            f"eager_attention_forward to run them; use attn_implementation='eager' for this model"
        )
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling = call.get("scaling")
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if call.get("softcap") is not None:
        scores = torch.tanh(scores / call["softcap"]) * call["softcap"]
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=call.get("dropout") or 0.0, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclass
class HFSite(Site):
    """One row of an ``HFReport``: calls of one layer that ran the same way. ``shape`` (so
    ``q_len``/``kv_len``...) is the latest call's; ``flops``/``exact_flops`` are summed over ``calls``. ``rewritten``
    means a structattn op ran (the method, or exact when ``reason`` says why); False means
    transformers' own exact attention ran (output_attentions, softcap, dropout...)."""

    calls: int = 0


@dataclass
class HFReport:
    """What ``attn_implementation="structattn"`` did, per layer, since ``apply``."""

    options: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # (layer, method, mask, reason) -> HFSite
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def sites(self) -> list:
        """One ``HFSite`` per (layer, method, mask, reason), in first-call order."""
        return list(self.rows.values())

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.sites)

    def clear(self) -> None:
        """Forget the calls recorded so far (options and warnings stay)."""
        with self._lock:
            self.rows.clear()

    def total_flops(self) -> tuple:
        """(estimated attention FLOPs, exact attention FLOPs) over every recorded call."""
        return sum(s.flops for s in self.sites), sum(s.exact_flops for s in self.sites)

    def __str__(self) -> str:
        head = ("layer", "method", "params", "q x kv", "heads", "d", "mask", "terms", "calls", "GFLOP est/exact", "note")
        rows = []
        for s in self.sites:
            params = ",".join(f"{k}={v}" for k, v in s.params.items() if v is not None)
            method = s.method + ("" if s.rewritten else " (transformers)")
            rows.append((s.layer or "<root>", method, params or "-", f"{s.q_len}x{s.kv_len}", _heads(s),
                         str(s.head_dim), s.mask, s.terms, str(s.calls),
                         f"{_gflop(s.flops, {})}/{_gflop(s.exact_flops, {})}", s.reason or ""))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head[:-1])]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head[:-1], widths)) + "  " + head[-1]]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        layers = {s.layer for s in self.sites}
        approx = {s.layer for s in self.sites if s.method != "exact"}
        est, exact = self.total_flops()
        frac = f" ({100 * est / exact:.1f}%)" if exact else ""
        lines.append(f"{len(layers)} attention layer(s), {self.calls} call(s): {len(approx)} layer(s) approximated. "
                     f"Attention GFLOP {_gflop(est, {})} vs exact {_gflop(exact, {})}{frac}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    __repr__ = __str__

    def to_dict(self) -> dict:
        """Everything in plain Python types (for JSON)."""
        est, exact = self.total_flops()
        return {"sites": [s.to_dict() for s in self.sites], "calls": self.calls, "flops": est,
                "exact_flops": exact, "options": self.options, "warnings": list(self.warnings)}


def _record(binding: _Binding, layer: str, resolved: Resolved, query, key, value, method: str,
            params: Any, reason: Optional[str], rewritten: bool, mask: str, terms: str = "-") -> None:
    if torch.compiler.is_compiling():
        return
    shape = SiteShape(query.shape[0], query.shape[1], key.shape[1], query.shape[2], key.shape[2], query.shape[3],
                      value.shape[3], mask.split(" ")[0], query.dtype)
    exact = int(exact_flops(shape))
    flops = exact if params is None else int(get_method(method).flops(shape, params))
    report = binding.report
    with report._lock:
        row = report.rows.get((layer, method, mask, reason))
        if row is None:
            values = {} if params is None else {f.name: getattr(params, f.name)
                                                for f in get_method(method).param_fields()}
            row = HFSite(layer=layer, form="hf", method=method, params=values, rewritten=rewritten, reason=reason,
                         requested=resolved.method, mask=mask, flops=0, exact_flops=0, terms=terms)
            report.rows[(layer, method, mask, reason)] = row
        row.calls += 1
        row.shape = shape
        row.scale = None
        row.flops += flops
        row.exact_flops += exact
