#!/usr/bin/env python
"""Routing attention on the real attention inputs of MiniLM and SmolLM2, layer by layer.

Captures q, k, v (and mask / causal flag) of every attention call of the two ``make quality``
models, then measures for routing settings the relative error ||out - exact|| / ||exact|| over
real (unpadded) query rows, averaged over calls. Used to choose the normalisation before
clustering and the defaults (docs/methods/routing.md). Untimed.

``--what paper`` compares the implemented routing with the issue's literal scheme, written here
as a dense-mask reference (``paper_attention``): queries and keys clustered together, each
cluster taking its ``w`` nearest queries and keys (balanced top-w), exact softmax over the union of
a query's clusters' keys plus a local window and sinks.

    python benchmarks/routing_probe.py --model smollm2 --what norm
    python benchmarks/routing_probe.py --model minilm --what paper
    python benchmarks/routing_probe.py --model minilm --what sweep --settings "[{'routes': 8}]"
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import data  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from structattn.methods.exact import sdpa  # noqa: E402
from structattn.methods.routing import make_plan  # noqa: E402
from structattn.methods.common import as_additive, as_4d  # noqa: E402
from structattn.methods.routing.naive import local_keep  # noqa: E402
from structattn.methods.routing.plan import NORMALISATIONS, normalise  # noqa: E402
from structattn.methods.routing.torch import attend  # noqa: E402


def capture(model, inputs: dict) -> list[dict]:
    """q, k, v, mask, is_causal, scale of every SDPA call during one forward."""
    calls = []
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append({"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone(),
                      "mask": None if attn_mask is None else attn_mask.detach().clone(), "causal": is_causal,
                      "scale": scale if scale is not None else 1 / math.sqrt(q.shape[-1])})
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = spy
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        F.scaled_dot_product_attention = orig
        torch.nn.functional.scaled_dot_product_attention = orig
    return calls


def measure(call: dict, live_rows, clusters, window, routes, iterations, local_window, sink_tokens, pooled,
            norm) -> float:
    """Relative error over live query rows of one call."""
    q, k, v, mask, causal, scale = (call[x] for x in ("q", "k", "v", "mask", "causal", "scale"))
    ref = sdpa(q, k, v, mask, scale, causal)
    plan = make_plan(q, k, mask, scale, causal, clusters, window, routes, iterations, sink_tokens, norm)
    out = attend(q, k, v, mask, scale, causal, plan, local_window, sink_tokens, pooled)
    rows = live_rows.view(q.shape[0], 1, q.shape[2], 1).expand_as(ref)
    return float((out - ref)[rows].norm() / ref[rows].norm())


def paper_attention(q, k, v, mask, scale, causal, clusters, window, iterations, local_window, sink_tokens):
    """The issue's literal scheme as a dense mask (quality only, untimed), per (batch, kv head):
    centred unit-length queries (of the G heads) and keys clustered together by spherical k-means
    (start: evenly spaced tokens); cluster c takes the ``window`` keys and, per query head, the
    ``window`` queries of largest cosine with its centroid (padded keys and their queries never
    join); query i attends exactly the union of the keys of its clusters, its local window and
    the sinks (under ``causal`` keys j <= i). Also returns the share of queries in no cluster."""
    B, H, N, D = q.shape
    Hk = k.shape[1]
    G = H // Hk
    bias = torch.zeros(B, 1, 1, N) if mask is None else as_additive(as_4d(mask), torch.float32)
    bias = bias[..., :1, :].expand(B, H, 1, N)[:, :, 0]                                    # [B, H, N] key biases
    live = torch.isfinite(bias)
    allowed = local_keep(N, N, local_window, causal).expand(B, H, N, N).clone()
    allowed[..., :sink_tokens] = True
    uncovered = 0
    for b in range(B):
        for hk in range(Hk):
            heads = range(hk * G, (hk + 1) * G)
            lk = live[b, hk * G]
            kn = normalise(k[b, hk][None].float(), "center", lk[None])[0]
            qn = normalise(q[b, hk * G:(hk + 1) * G].float(), "center", live[b, hk * G:(hk + 1) * G])
            pts = torch.cat([kn[lk]] + [qn[g][live[b, h]] for g, h in enumerate(heads)])
            cent = pts[torch.linspace(0, len(pts) - 1, clusters).round().long()]
            for _ in range(iterations):
                assign = (pts @ cent.T).argmax(-1)
                sums = torch.zeros_like(cent).index_add_(0, assign, pts)
                cent = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), cent)
            w = min(window, int(lk.sum()))
            k_in = torch.zeros(clusters, N)
            k_in.scatter_(1, (kn @ cent.T).masked_fill(~lk[:, None], -2).T.topk(w, -1).indices, 1.0)
            for g, h in enumerate(heads):
                q_in = torch.zeros(clusters, N)
                q_in.scatter_(1, (qn[g] @ cent.T).masked_fill(~live[b, h][:, None], -2).T.topk(w, -1).indices, 1.0)
                allowed[b, h] |= (q_in.T @ k_in) > 0
                uncovered += int(((q_in.sum(0) == 0) & live[b, h]).sum())
    if causal:
        allowed &= torch.ones(N, N, dtype=torch.bool).tril()
    kr, vr = k.repeat_interleave(G, 1).float(), v.repeat_interleave(G, 1).float()
    logits = (scale * q.float() @ kr.transpose(-1, -2) + bias[:, :, None]).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return p @ vr, uncovered / float(live.sum())


def measure_paper(call: dict, live_rows, clusters, window, iterations, local_window, sink_tokens) -> tuple:
    """(relative error over live query rows, share of live queries in no cluster) of one call."""
    q, k, v, mask, causal, scale = (call[x] for x in ("q", "k", "v", "mask", "causal", "scale"))
    ref = sdpa(q, k, v, mask, scale, causal)
    out, uncovered = paper_attention(q, k, v, mask, scale, causal, clusters, window, iterations, local_window,
                                     sink_tokens)
    rows = live_rows.view(q.shape[0], 1, q.shape[2], 1).expand_as(ref)
    return float((out - ref)[rows].norm() / ref[rows].norm()), uncovered


def load(model_name: str, n: int, count: int):
    torch.manual_seed(0)
    if model_name == "minilm":
        model, tok = data.load_minilm()
        docs = data.lee_background()[:count]
        batch = data.minilm_batches(tok, docs, n, batch_size=count)[0]
        return capture(model, batch), batch["attention_mask"].bool()
    model, tok = data.load_smollm2()
    wins = data.lm_windows(data.lee_token_stream(tok), n, count)
    calls = []
    for w in wins:
        calls += capture(model, {"input_ids": w[None]})
    return calls, torch.ones(1, n, dtype=torch.bool)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--n", type=int, default=None, help="sequence length (MiniLM 512, SmolLM2 1024)")
    ap.add_argument("--count", type=int, default=None, help="stories (MiniLM 8) / windows (SmolLM2 2)")
    ap.add_argument("--what", choices=("norm", "sweep", "paper"), default="norm")
    ap.add_argument("--layers", type=str, default=None, help="comma-separated layer indices (default all)")
    ap.add_argument("--settings", type=str, default=None,
                    help="--what sweep: a Python list of dicts overriding the defaults, e.g. \"[{'routes': 8}]\"")
    args = ap.parse_args(argv)
    n = args.n or (512 if args.model == "minilm" else 1024)
    count = args.count or (8 if args.model == "minilm" else 2)
    calls, live = load(args.model, n, count)
    per_window = len(calls) // (1 if args.model == "minilm" else count)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(per_window))
    chosen = [c for i, c in enumerate(calls) if i % per_window in layers]
    print(f"{args.model} N={n}: {len(chosen)} attention calls, shapes q {tuple(chosen[0]['q'].shape)} "
          f"k {tuple(chosen[0]['k'].shape)}, causal {chosen[0]['causal']}, mask "
          f"{None if chosen[0]['mask'] is None else tuple(chosen[0]['mask'].shape)}", flush=True)
    base = dict(clusters=None, window=None, routes=4, iterations=2, local_window=32, sink_tokens=1, pooled=True,
                norm="center")
    if args.what == "paper":
        c = math.isqrt(n - 1) + 1
        local = 32 if chosen[0]["causal"] else 16
        for clusters, window in ((c, -(-n // c)), (n // 128, 128), (n // 64, 128)):
            res = [measure_paper(x, live, clusters, window, 2, local, 1) for x in chosen]
            errs = [e for e, _ in res]
            print(f"  paper C={clusters} w={window} L={local} sink=1: rel err mean {sum(errs) / len(errs):.4f} "
                  f"max {max(errs):.4f}, queries in no cluster {sum(u for _, u in res) / len(res):.1%}", flush=True)
        settings = [{**base, "local_window": local, **extra} for extra in
                    ({"pooled": False, "window": 128, "routes": 1}, {"pooled": False, "window": 16, "routes": 8},
                     {"window": 16, "routes": 8}, {})]
    elif args.what == "norm":
        settings = [{**base, "norm": nm, "local_window": lw, "pooled": pl}
                    for pl in (True, False) for lw in (32, 0) for nm in NORMALISATIONS]
    else:
        settings = [{**base, **extra} for extra in eval(args.settings)] if args.settings else [base]
    for st in settings:
        errs = [measure(c, live, **st) for c in chosen]
        print(f"  {st}: rel err mean {sum(errs) / len(errs):.4f} max {max(errs):.4f} | "
              f"{' '.join(f'{e:.2f}' for e in errs)}", flush=True)

if __name__ == "__main__":
    main()
