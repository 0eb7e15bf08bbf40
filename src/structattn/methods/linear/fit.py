"""Fitting feature maps to a pretrained model's own attention (``structattn.fit_linear``).

The model's weights are never touched. Each layer's q, k, v are captured once by an exact run of
the model on the samples (the routed capture ``calibrate`` uses), then the layer's maps (one per
query head, one per kv head, plus the log gain gamma per query head when a window or sinks are
exact) are fitted by Adam on the CPU. Each step takes ``rows`` random query rows of one captured
(call, batch item), with all their keys, and compares the linear attention of ``naive.py``'s
formula (computed in fp32 for those rows only) with the layer's softmax attention by one of:

* ``"ce"``: cross-entropy between the softmax rows and the linear-attention rows (attention-weight
  distillation, as in Hedgehog), reported as the KL divergence (0 = same rows);
* ``"mse"``: relative squared error of the attention output, ||o_lin - o||^2 / ||o||^2.

Several feature maps and losses can be compared (``"auto"`` tries them all): each variant trains
for a quarter of ``steps``, the one with the lowest relative output error on held-out rows (rows of
the last captured item, or a fixed quarter of the rows when there is only one) trains on for the
rest. Padded query positions of self-attention (their key is masked) are never sampled. The
reported error is the relative output error ||Y_lin - Y||_F / ||Y||_F of the layer over every
captured call through the deployed path (``torch.py``), padded query rows left out.
Deterministic for a given ``seed`` on a given machine (same threads).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..common import FILL_MASKED_AT, as_4d, as_additive
from .maps import KINDS, FeatureMaps, apply_map, check_kind, feature_inputs
from .naive import exact_sets
from .store import save_maps
from .torch import linear_forward

__all__ = ["fit_linear", "fit_calls", "LinearFit", "LayerFit", "LOSSES"]

LOSSES = ("ce", "mse")
#: fraction of ``steps`` each variant gets when several are compared
_TRIAL_SHARE = 0.25
_LR = {"hedgehog": 1e-2, "gated": 3e-3, "mlp": 3e-3}


@dataclass
class LayerFit:
    """One layer's fit: what was chosen and how well it does."""

    layer: str
    feature_map: str
    loss: str
    loss_value: float           # final training loss (KL for "ce", relative MSE for "mse")
    error: float                # relative output error over all captured calls (deployed path)
    seconds: float
    trials: list = field(default_factory=list)   # (feature_map, loss, held-out error) per variant compared

    def to_dict(self) -> dict:
        return {"layer": self.layer, "feature_map": self.feature_map, "loss": self.loss,
                "loss_value": self.loss_value, "error": self.error, "seconds": self.seconds,
                "trials": [list(t) for t in self.trials]}


@dataclass
class LinearFit:
    """What ``fit_linear`` returns: the fitted maps per layer and a printable summary."""

    layers: dict                # layer FQN -> FeatureMaps
    fits: list                  # LayerFit per layer, in model order
    seconds: float = 0.0
    path: Optional[str] = None  # where it was saved (``save``)

    def save(self, path: str, *, merge: bool = False) -> str:
        """Write every layer's maps to ``path`` (one file; ``merge`` keeps other layers already in
        it) and return ``path``."""
        save_maps(path, self.layers, merge=merge)
        self.path = path
        return path

    def options(self, path: Optional[str] = None, **extra: Any) -> dict:
        """Backend options that run every fitted layer with its maps and the rest exact:
        ``{"method": "exact", "layers": {<layer>: {"method": "linear", "weights": path}}, **extra}``
        (saving first when ``path`` is given; layer names are escaped fnmatch patterns)."""
        if path is not None:
            self.save(path)
        if self.path is None:
            raise ValueError("LinearFit.options: save the maps first (fit.save(path) or fit.options(path))")
        layers = {_glob_escape(name): {"method": "linear", "weights": self.path} for name in self.layers}
        return {"method": "exact", **extra, "layers": {**layers, **extra.get("layers", {})}}

    def __str__(self) -> str:
        head = ("layer", "feature map", "loss", "final loss", "rel. error", "seconds")
        rows = [(f.layer or "<root>", f.feature_map, f.loss, f"{f.loss_value:.4f}", f"{f.error:.4f}",
                 f"{f.seconds:.1f}") for f in self.fits]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"fitted {len(self.fits)} layer(s) in {self.seconds:.1f} s"
                     + (f"; saved to {self.path}" if self.path else ""))
        return "\n".join(lines)

    __repr__ = __str__


# ------------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------------
def fit_linear(model: Any, samples: Any, *, layers: Optional[Sequence[str]] = None,
               feature_map: Union[str, Sequence[str]] = "auto", loss: Union[str, Sequence[str]] = "auto",
               steps: int = 300, seed: int = 0, local_window: int = 0, sink_tokens: int = 0,
               num_features: Optional[int] = None, rows: int = 128, lr: Optional[float] = None,
               path: Optional[str] = None, options: Optional[dict] = None, progress: bool = True,
               verbose: bool = True) -> LinearFit:
    """Fit linear-attention feature maps to every attention layer of ``model`` on ``samples``.

    Args:
        model: the model (``nn.Module`` or callable), as passed to ``torch.compile``; it runs in
            eval mode once per sample (exactly) and its weights are not changed.
        samples: one sample or a list (as for ``structattn.calibrate``: kwargs dicts, argument
            tuples or tensors).
        layers: fnmatch globs of the layers to fit (default: every attention layer).
        feature_map: "hedgehog", "gated", "mlp", a list of them, or "auto" (all three) to compare.
        loss: "ce" (attention-weight distillation), "mse" (output error), a list, or "auto" (both).
        steps: Adam steps per layer (shared as the module docstring says when comparing).
        seed: fixes initialisation and row sampling (same seed, same maps on one machine).
        local_window, sink_tokens: keys kept exact (see ``naive.py``); the maps are fitted for them
            and only valid with them.
        num_features: features per head (default 2 * head_dim for hedgehog, head_dim otherwise).
        rows: query rows per step. lr: Adam learning rate (default per map: 1e-2 hedgehog, 3e-3).
        path: save the maps there (one file; ``LinearFit.options()`` then names it).
        options: base backend options for the capture run (``causal`` declarations, ``layers``).
        progress: tqdm bars. verbose: print the per-layer summary.

    Returns:
        ``LinearFit`` (``.layers``: FQN -> FeatureMaps, ``.save(path)``, ``.options(path)``).
    """
    import copy
    import fnmatch

    from ... import backend as _backend
    from ...calibrate.api import _layers, _set_eval
    from ...calibrate.capture import RoutedModel, capture_calls, normalize_samples, progress_bar
    from ...config import Config

    t0 = time.time()
    kinds, losses = _variants(feature_map, loss)
    _check_settings(steps, seed, local_window, sink_tokens, num_features, rows, lr)
    if layers is not None and (isinstance(layers, str) or not all(isinstance(p, str) for p in layers)):
        raise ValueError(f"fit_linear: layers must be a list of fnmatch globs; got {layers!r}")
    norm = normalize_samples(samples)
    base = Config.checked_dict(options)
    base.pop("_route", None)
    Config.from_options(copy.deepcopy(base))
    rm = RoutedModel(model, copy.deepcopy(base))
    restore = _set_eval(model)
    fitted, fits = {}, []
    try:
        with rm.collecting() as session:
            store, _ = capture_calls(rm, norm, samples, None, False, progress)
        _backend.finish_collecting(session, rm.options, stacklevel=2)
        groups, masks = _layers(rm.sites)
        groups = {layer: keys for layer, keys in groups.items()
                  if layers is None or any(fnmatch.fnmatchcase(layer, p) for p in layers)}
        for layer, keys in progress_bar(groups.items(), progress, "fit_linear: layers"):
            calls = [c for key in keys for c in store.get(key, [])]
            general = [key for key in keys if masks[key] == "general"]
            if not calls or general:
                if general and verbose:
                    print(f"fit_linear: {layer or '<root>'} skipped: a general [Q, K] mask (linear attention "
                          f"serves key-padding and causal masks only)")
                continue
            t = time.time()
            maps = fit_calls(calls, feature_map=kinds, loss=losses, steps=steps, seed=seed,
                             local_window=local_window, sink_tokens=sink_tokens, num_features=num_features,
                             rows=rows, lr=lr, progress=progress, name=layer)
            fitted[layer] = maps
            info = maps.info
            fits.append(LayerFit(layer, maps.kind, info["loss"], info["loss_value"], info["error"], time.time() - t,
                                 info["trials"]))
    finally:
        rm.clear()
        torch._dynamo.reset()
        restore()
    result = LinearFit(fitted, fits, time.time() - t0)
    if path is not None:
        result.save(path)
    if not fitted:
        import warnings

        warnings.warn("fit_linear: no attention layer was fitted (none matched, or none ran)", stacklevel=2)
    if verbose:
        print(result)
    return result


def _glob_escape(layer: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in layer)


def _variants(feature_map, loss) -> tuple[list[str], list[str]]:
    kinds = list(KINDS) if feature_map == "auto" else [feature_map] if isinstance(feature_map, str) else list(feature_map)
    losses = list(LOSSES) if loss == "auto" else [loss] if isinstance(loss, str) else list(loss)
    if not kinds or not losses:
        raise ValueError("fit_linear: feature_map and loss need at least one value each")
    for k in kinds:
        check_kind(k, "fit_linear: feature_map")
    for l in losses:
        if l not in LOSSES:
            raise ValueError(f"fit_linear: loss must be one of {list(LOSSES)} or 'auto'; got {l!r}")
    return kinds, losses


def _check_settings(steps, seed, local_window, sink_tokens, num_features, rows, lr) -> None:
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    for name, value, low in (("steps", steps, 1), ("local_window", local_window, 0), ("sink_tokens", sink_tokens, 0),
                             ("rows", rows, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"fit_linear: {name} must be an int >= {low}; got {value!r}")
    if not is_int(seed):
        raise ValueError(f"fit_linear: seed must be an int; got {seed!r}")
    if num_features is not None and (not is_int(num_features) or num_features < 1):
        raise ValueError(f"fit_linear: num_features must be None or an int >= 1; got {num_features!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"fit_linear: lr must be None or a number > 0; got {lr!r}")


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One (call, batch item) of a layer's captured calls, in fp32, with its trainable rows."""

    q: torch.Tensor             # [H, Nq, D]
    k: torch.Tensor             # [Hk, Nk, D]
    v: torch.Tensor             # [Hk, Nk, Dv]
    bias: Optional[torch.Tensor]  # [Hm, 1, Nk] additive, or None
    scale: float
    causal: bool
    rows: torch.Tensor          # live query positions


def _items(calls: list) -> list[_Item]:
    out = []
    for c in calls:
        B, nq, nk = c.q.shape[0], c.q.shape[2], c.k.shape[2]
        bias = None
        if c.mask is not None:
            m = as_4d(c.mask)
            if m.shape[-2] != 1 and not bool((m == m[..., :1, :]).all()):
                raise ValueError("fit_linear: a layer with a general [Q, K] mask cannot use linear attention")
            bias = as_additive(m[..., :1, :], torch.float32).expand(B, m.shape[1], 1, nk)
        for b in range(B):
            live = torch.arange(nq)
            bb = None if bias is None else bias[b]
            if bb is not None and nq == nk:
                live = live[(bb[0, 0] > FILL_MASKED_AT)]          # padded positions of self-attention
            if live.numel() == 0:
                continue
            out.append(_Item(c.q[b].float(), c.k[b].float(), c.v[b].float(), bb, float(c.scale), bool(c.is_causal),
                             live))
    if not out:
        raise ValueError("fit_linear: the captured calls have no query row to fit on")
    return out


class _Trainable(torch.nn.Module):
    """Maps as trainable parameters (fp32)."""

    def __init__(self, maps: FeatureMaps):
        super().__init__()
        self.maps = maps
        self.gamma = torch.nn.Parameter(maps.gamma.clone().float())
        self.query = torch.nn.ParameterList([torch.nn.Parameter(t.clone().float()) for t in maps.query])
        self.key = torch.nn.ParameterList([torch.nn.Parameter(t.clone().float()) for t in maps.key])

    def export(self, info: dict) -> FeatureMaps:
        m = self.maps
        return FeatureMaps(m.kind, m.num_heads, m.num_kv_heads, m.head_dim, m.num_features, m.local_window,
                           m.sink_tokens, self.gamma.detach().clone(), [p.detach().clone() for p in self.query],
                           [p.detach().clone() for p in self.key], info)


def _rows_loss(model: _Trainable, item: _Item, rows: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, relative output error) of ``model`` on ``rows`` of ``item``."""
    m = model.maps
    H, hk = item.q.shape[0], item.k.shape[0]
    G = H // hk
    q = item.q[:, rows]                                                   # [H, R, D]
    k = item.k.repeat_interleave(G, 0)
    v = item.v.repeat_interleave(G, 0)
    nk = k.shape[1]
    bias = 0.0 if item.bias is None else item.bias.expand(H, 1, nk)
    s = item.scale * q @ k.transpose(-1, -2) + bias                       # [H, R, Nk]
    exact, linear = exact_sets(0, nk, item.causal, m.local_window, m.sink_tokens, rows=rows)   # [R, Nk]
    allowed = exact | linear
    target_logits = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(target_logits, -1)
    p = torch.nan_to_num(p, nan=0.0)
    o = p @ v
    xq, xk = feature_inputs(q.unsqueeze(0), item.k.unsqueeze(0), item.scale)
    fq = apply_map(m.kind, list(model.query), xq)[0]                      # [H, R, f]
    fk = apply_map(m.kind, list(model.key), xk)[0].repeat_interleave(G, 0)  # [H, Nk, f]
    mx = s.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    lin = model.gamma.view(H, 1, 1) + mx + bias + torch.log(fq @ fk.transpose(-1, -2))
    w = torch.where(exact, s, torch.where(linear, lin, torch.full_like(s, float("-inf"))))
    logp = torch.log_softmax(w, -1)
    out = torch.exp(logp) @ v
    err = (out - o).pow(2).sum() / o.pow(2).sum().clamp_min(1e-30)
    if loss == "mse":
        return err, err.detach().sqrt()
    logt = torch.log_softmax(target_logits, -1)
    kl = torch.where(p > 0, p * (logt - logp), torch.zeros_like(p)).sum(-1)
    return kl.mean(), err.detach().sqrt()


def _train(model: _Trainable, items: list, loss: str, steps: int, rows: int, lr: float, gen: torch.Generator,
           train_ids: list, bar) -> float:
    params = [p for n, p in model.named_parameters() if n != "gamma" or model.maps.local_window or model.maps.sink_tokens]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    avg = None
    for step in range(steps):
        item = items[train_ids[int(torch.randint(len(train_ids), (1,), generator=gen))]]
        n = item.rows.numel()
        pick = item.rows[torch.randperm(n, generator=gen)[:rows]] if n > rows else item.rows
        value, _ = _rows_loss(model, item, pick, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        v = float(value.detach())
        avg = v if avg is None else 0.9 * avg + 0.1 * v
        if bar is not None:
            bar.update(1)
    return float(avg if avg is not None else math.nan)


def _held_out(items: list, gen: torch.Generator, limit: int = 512) -> tuple[list, list]:
    """(training item ids, [(item id, rows)] held out)."""
    if len(items) > 1:
        last = items[-1]
        pick = last.rows[torch.randperm(last.rows.numel(), generator=gen)[:limit]]
        return list(range(len(items) - 1)), [(len(items) - 1, pick)]
    only = items[0]
    perm = only.rows[torch.randperm(only.rows.numel(), generator=gen)]
    cut = max(1, perm.numel() // 4)
    return [0], [(0, perm[:min(cut, limit)])]


def _held_out_error(model: _Trainable, items: list, held: list) -> float:
    num = den = 0.0
    with torch.no_grad():
        for idx, rows in held:
            for part in rows.split(128):
                _, err = _rows_loss(model, items[idx], part, "mse")
                ref = _ref_norm2(items[idx], part)
                num += float(err) ** 2 * ref
                den += ref
    return math.sqrt(num / den) if den > 0 else math.inf


def _ref_norm2(item: _Item, rows: torch.Tensor) -> float:
    H, hk = item.q.shape[0], item.k.shape[0]
    G = H // hk
    k, v = item.k.repeat_interleave(G, 0), item.v.repeat_interleave(G, 0)
    s = item.scale * item.q[:, rows] @ k.transpose(-1, -2) + (0.0 if item.bias is None else item.bias)
    if item.causal:
        s = s.masked_fill(torch.arange(k.shape[1]) > rows.unsqueeze(-1), float("-inf"))
    return float((torch.nan_to_num(torch.softmax(s, -1)) @ v).pow(2).sum())


def layer_error(maps: FeatureMaps, calls: list, chunk_size: int = 64) -> float:
    """Relative output error of ``maps`` over ``calls`` through the deployed path (padded query
    rows of self-attention left out)."""
    from ...calibrate.measure import output_error

    with torch.no_grad():
        return output_error(calls, lambda c: linear_forward(
            c.q, c.k, c.v, c.mask, c.scale, c.is_causal, maps.kind, maps.tensors(c.q.device), maps.local_window,
            maps.sink_tokens, chunk_size))


def fit_calls(calls: list, *, feature_map: Union[str, Sequence[str]] = "auto", loss: Union[str, Sequence[str]] = "auto",
              steps: int = 300, seed: int = 0, local_window: int = 0, sink_tokens: int = 0,
              num_features: Optional[int] = None, rows: int = 128, lr: Optional[float] = None,
              progress: bool = False, name: str = "") -> FeatureMaps:
    """Fit one layer's maps on its captured ``calls`` (objects with q, k, v, mask, scale,
    is_causal, out; see the module docstring). ``info`` of the result records the choice, the
    final loss, the relative output error over all calls and the variants compared."""
    from tqdm.auto import tqdm

    kinds, losses = _variants(feature_map, loss)
    _check_settings(steps, seed, local_window, sink_tokens, num_features, rows, lr)
    items = _items(calls)
    H, hk, d = items[0].q.shape[0], items[0].k.shape[0], items[0].q.shape[2]
    gen = torch.Generator().manual_seed(seed)
    train_ids, held = _held_out(items, gen)
    variants = [(k, l) for k in kinds for l in losses]
    trial = max(1, int(steps * _TRIAL_SHARE)) if len(variants) > 1 else steps
    total = trial * len(variants) + (steps - trial if len(variants) > 1 else 0)
    bar = tqdm(total=total, desc=f"fit {name or 'layer'}", disable=not progress, leave=False)
    t0 = time.time()
    best = None
    trials = []
    try:
        for kind, l in variants:
            init = FeatureMaps.init(kind, H, hk, d, num_features=num_features, local_window=local_window,
                                    sink_tokens=sink_tokens, seed=seed)
            model = _Trainable(init)
            rate = lr if lr is not None else _LR[kind]
            value = _train(model, items, l, trial, rows, rate, gen, train_ids, bar)
            err = _held_out_error(model, items, held)
            trials.append((kind, l, round(err, 5)))
            if best is None or err < best[0]:
                best = (err, kind, l, model, value, rate)
        err, kind, l, model, value, rate = best
        if len(variants) > 1 and steps > trial:
            value = _train(model, items, l, steps - trial, rows, rate, gen, train_ids, bar)
    finally:
        bar.close()
    info = {"loss": l, "loss_value": value, "steps": steps, "seed": seed, "rows": rows, "lr": rate,
            "trials": trials, "seconds": round(time.time() - t0, 2)}
    maps = model.export(info)
    maps.info["error"] = layer_error(maps, calls)
    maps.info["summary"] = f"{kind}/{l}, relative error {maps.info['error']:.4f}"
    return maps
