"""Backend options: parsing, validation, and per-layer resolution by module FQN glob.

    options = {
        "method": "monarch",                        # default method for matched sites
        "monarch": {"block_size": None, "num_steps": 2},   # per-method default params
        "layers": {"encoder.layer.0.*": "exact",     # fnmatch globs on module FQNs, first match wins
                   "encoder.layer.1?.*": {"method": "topk", "k": 32}},
        "min_seq_len": 0,                           # kv length below this runs exact at run time
        "compiler": "inductor",                     # inductor | aot_eager | eager
        "impl": "auto",                             # auto | triton | torch (kernel choice at run time)
        "causal": False,                            # declare every site's mask causal (see README)
        "exact_when_cheaper": True,                 # keep exact where the method costs more FLOPs
    }
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from .methods import REGISTRY, get_method

COMPILERS = ("inductor", "aot_eager", "eager")
IMPLS = ("auto", "triton", "torch")
DEFAULT_METHOD = "monarch"
_TOP_KEYS = ("method", "layers", "min_seq_len", "compiler", "impl", "causal", "exact_when_cheaper")
_PRIVATE_KEYS = ("_route",)  # "_route": True rewrites every site into structattn::routed_attention
_RULE_KEYS = ("method", "causal")


@dataclass(frozen=True)
class LayerRule:
    """One ``options["layers"]`` entry: a glob and what it selects."""

    pattern: str
    method: Optional[str] = None  # None: the default method
    params: Mapping[str, Any] = field(default_factory=dict)
    causal: Optional[bool] = None


@dataclass(frozen=True)
class Resolved:
    """What one site gets: method name, validated params object, causal declaration, the rule."""

    method: str
    params: Any
    causal: bool
    rule: Optional[str]


@dataclass(frozen=True)
class Config:
    """Validated backend options. Build with ``Config.from_options(options)``."""

    method: str = DEFAULT_METHOD
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layers: tuple[LayerRule, ...] = ()
    min_seq_len: Union[int, str] = 0
    compiler: str = "inductor"
    impl: str = "auto"
    causal: bool = False
    route: bool = False
    #: keep a site exact where the FLOP model says its method would not save anything
    exact_when_cheaper: bool = True

    @staticmethod
    def checked_dict(options: Any) -> dict:
        """``options`` as a new dict (None -> {}); ValueError when it is not a dict of settings."""
        if options is None:
            return {}
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict of settings such as {{'method': 'topk', 'topk': {{'k': 32}}}}; "
                             f"got {type(options).__name__} {options!r}")
        return dict(options)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]]) -> "Config":
        """Validate ``options`` (see module docstring); ValueError names the key and allowed values."""
        if isinstance(options, Config):
            return options
        options = cls.checked_dict(options)
        allowed = list(_TOP_KEYS) + sorted(REGISTRY)
        for key in options:
            if key not in allowed and key not in _PRIVATE_KEYS:
                raise ValueError(f"options: unknown key {key!r}; allowed: {allowed}")
        _check_int_range(options, "options")

        method = options.get("method", DEFAULT_METHOD)
        _check_method("options['method']", method)

        method_params: dict[str, dict[str, Any]] = {}
        for name in REGISTRY:
            if name in options:
                values = options[name]
                if not isinstance(values, Mapping):
                    raise ValueError(f"options[{name!r}] must be a dict of {name} parameters; got {values!r}")
                get_method(name).make_params(values, where=f"options[{name!r}]")
                method_params[name] = dict(values)

        min_seq_len = options.get("min_seq_len", 0)
        if min_seq_len != "auto" and (not isinstance(min_seq_len, int) or isinstance(min_seq_len, bool)
                                      or not 0 <= min_seq_len < 2**63):
            raise ValueError(f"options['min_seq_len'] must be an int >= 0 or \"auto\"; got {min_seq_len!r}")
        compiler = options.get("compiler", "inductor")
        if compiler not in COMPILERS:
            raise ValueError(f"options['compiler'] must be one of {list(COMPILERS)}; got {compiler!r}")
        impl = options.get("impl", "auto")
        if impl not in IMPLS:
            raise ValueError(f"options['impl'] must be one of {list(IMPLS)}; got {impl!r}")
        causal = options.get("causal", False)
        if not isinstance(causal, bool):
            raise ValueError(f"options['causal'] must be True or False; got {causal!r}")
        cheaper = options.get("exact_when_cheaper", True)
        if not isinstance(cheaper, bool):
            raise ValueError(f"options['exact_when_cheaper'] must be True or False; got {cheaper!r}")

        layers = options.get("layers", {}) or {}
        if not isinstance(layers, Mapping):
            raise ValueError(f"options['layers'] must be a dict of glob -> method name or dict; got {layers!r}")
        rules = tuple(_parse_rule(p, spec, method_params, method) for p, spec in layers.items())
        return cls(method, method_params, rules, min_seq_len, compiler, impl, causal, bool(options.get("_route", False)),
                   cheaper)

    def resolve(self, layer: str) -> Resolved:
        """The method, params and causal declaration for the module FQN ``layer`` (first glob wins)."""
        for rule in self.layers:
            if fnmatch.fnmatchcase(layer, rule.pattern):
                name = rule.method or self.method
                causal = self.causal if rule.causal is None else rule.causal
                return Resolved(name, self._params(name, rule.params, rule.pattern), causal, rule.pattern)
        return Resolved(self.method, self._params(self.method, {}, None), self.causal, None)

    def _params(self, name: str, overrides: Mapping[str, Any], pattern: Optional[str]) -> Any:
        values = {**self.method_params.get(name, {}), **overrides}
        where = f"options['layers'][{pattern!r}]" if pattern else f"options[{name!r}]"
        return get_method(name).make_params(values, where=where)

    def unmatched_globs(self, layers: list[str]) -> list[str]:
        """Globs in ``options['layers']`` that match none of ``layers``."""
        return [r.pattern for r in self.layers if not any(fnmatch.fnmatchcase(l, r.pattern) for l in layers)]


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _check_int_range(value: Any, where: str) -> None:
    """Every int in ``value`` (nested dicts/lists) must fit the int64 the attention ops take."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_int_range(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_int_range(item, f"{where}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{where} = {value} is outside the int64 range [-2**63, 2**63 - 1] the attention ops take")


def _check_method(key: str, name: Any) -> None:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"{key}: unknown method {name!r}; allowed: {sorted(REGISTRY)}")


def _parse_rule(pattern: Any, spec: Any, method_params: Mapping, default: str) -> LayerRule:
    where = f"options['layers'][{pattern!r}]"
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"options['layers']: keys must be non-empty glob strings; got {pattern!r}")
    if isinstance(spec, str):
        _check_method(where, spec)
        get_method(spec).make_params(method_params.get(spec, {}), where=where)
        return LayerRule(pattern, spec)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a method name or a dict with 'method' and its parameters; got {spec!r}")
    spec = dict(spec)
    name = spec.pop("method", None)
    if name is not None:
        _check_method(f"{where}['method']", name)
    causal = spec.pop("causal", None)
    if causal is not None and not isinstance(causal, bool):
        raise ValueError(f"{where}['causal'] must be True or False; got {causal!r}")
    get_method(name or default).make_params({**method_params.get(name or default, {}), **spec}, where=where)
    return LayerRule(pattern, name, spec, causal)
