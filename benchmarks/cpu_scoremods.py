#!/usr/bin/env python
"""CPU speed of attention with score modifications (ALiBi, soft-capping) against SDPA given the
same modification materialised (``make bench`` runs it after ``cpu.py``).

Setting: fp32, batch 1, 12 heads, head_dim 64, causal self attention, N = 1K .. 8K, the setting
of a BLOOM-style (ALiBi) or Gemma-2-style (soft-capping 50) decoder layer at prefill.

* ``alibi``: logits ``s - slope[h] * (q - k)`` (BLOOM's slopes for 12 heads). The baseline is
  ``F.scaled_dot_product_attention`` with the bias and the causal mask materialised as one
  [1, H, N, N] float mask (what an eager model hands SDPA). structattn receives the expression
  ``s + t0[h] * k`` (key-only: the ``- slope * q`` part is constant along a row, which softmax
  ignores; the pass reads BLOOM's and MPT's ALiBi in this form).
* ``softcap``: logits ``50 * tanh(s / 50)``. SDPA has no soft-capping, so the baseline is the
  eager math every such model runs (scores, tanh, causal mask, softmax, matmul; N x N tensors).

Each row runs through ``structattn.functional.attention`` on the plain-torch CPU path, interleaved
with the baseline, median of the repeats. The error column is ||out - ref|| / ||ref|| against the
float64 result of the same modification on the ``local`` inputs of ``cpu.py`` (content-dependent,
local attention; the timed inputs are N(0, 1)). Prints a Markdown table; writes
benchmarks/out/cpu_scoremods.csv.

    python benchmarks/cpu_scoremods.py --sizes 1024 2048     # quick look
"""
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import structattn  # noqa: E402
from cpu import local_inputs, machine, write_csv  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SOFTCAP = 50.0
#: the baseline row of each modification
BASELINE = {"alibi": "sdpa + materialised", "softcap": "eager math"}

#: (label, modification, registered method, params); method None = the materialised baseline
ROWS = [
    ("sdpa + materialised", "alibi", None, {}),
    ("exact", "alibi", "exact", {}),
    ("mra2 b=32 r=8", "alibi", "mra", {"block_size": 32, "blocks_per_row": 8}),
    ("topk k=64", "alibi", "topk", {"k": 64}),
    ("eager math", "softcap", None, {}),
    ("exact", "softcap", "exact", {}),
    ("mra2 b=32 r=8", "softcap", "mra", {"block_size": 32, "blocks_per_row": 8}),
    ("topk k=64", "softcap", "topk", {"k": 64}),
]


def alibi_slopes(heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes (a geometric sequence; interleaved for non-powers of two)."""
    p = 2 ** math.floor(math.log2(heads))
    base = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    extra = [2 ** (-4 * (2 * i + 1) / p) for i in range(heads - p)]
    return torch.tensor(base + extra)


def materialised_bias(mod: str, slopes: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """The [1, H, N, N] additive mask an eager ALiBi model builds (bias + causal -inf)."""
    i = torch.arange(n)
    rel = (i.view(1, -1) - i.view(-1, 1)).to(dtype)                 # k - q
    bias = slopes.to(dtype).view(-1, 1, 1) * rel
    return bias.masked_fill(rel > 0, float("-inf")).unsqueeze(0)


def softcap_math(q, k, v):
    """Eager soft-capped causal attention (what Gemma-2's eager path computes)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = SOFTCAP * torch.tanh(s / SOFTCAP)
    n = q.shape[-2]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def make_call(mod: str, method, params: dict, q, k, v, slopes):
    """A zero-argument callable running one row on q, k, v."""
    if method is None:
        if mod == "alibi":
            bias = materialised_bias(mod, slopes, q.shape[-2], q.dtype)
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return lambda: softcap_math(q, k, v)
    if mod == "alibi":
        kw = dict(score_mod="s + t0[h] * k", score_tensors=[slopes.to(q.dtype)])
    else:
        kw = dict(score_mod=f"{SOFTCAP} * tanh(s / {SOFTCAP})")
    return lambda: structattn.functional.attention(method, q, k, v, is_causal=True, impl="torch", **kw, **params)


def run(sizes, heads, dim, repeats, rows, seed=0):
    slopes = alibi_slopes(heads)
    out_rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(seed + n)
        q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
        calls = [(label, mod, m, p, make_call(mod, m, p, q, k, v, slopes)) for label, mod, m, p in rows]
        times = {(label, mod): [] for label, mod, *_ in calls}
        reps = repeats or (5 if n <= 2048 else 3)
        with torch.inference_mode():
            for *_, fn in calls:
                fn()                                           # warm-up
            for _ in range(reps):                              # interleaved repeats
                for label, mod, _, _, fn in calls:
                    t0 = time.perf_counter()
                    fn()
                    times[(label, mod)].append(time.perf_counter() - t0)
            ql, kl, vl = local_inputs(n, heads, dim, g)
            sl = slopes.double()
            refs = {mod: make_call(mod, None, {}, ql.double(), kl.double(), vl.double(), sl)() for mod in ("alibi", "softcap")}
            for label, mod, m, p, _ in calls:
                out = make_call(mod, m, p, ql, kl, vl, slopes)()
                err = ((out.double() - refs[mod]).norm() / refs[mod].norm()).item()
                base = statistics.median(times[(BASELINE[mod], mod)])
                med = statistics.median(times[(label, mod)])
                row = dict(N=n, mod=mod, method=label, median_s=round(med, 5), repeats=reps,
                           speedup_vs_baseline=round(base / med, 2), err_local=f"{err:.3g}")
                out_rows.append(row)
                print(f"N={n:6d} {mod:8s} {label:20s} {med:9.4f}s  x{row['speedup_vs_baseline']:6.2f}  "
                      f"err {row['err_local']}", flush=True)
    return out_rows


def markdown(rows) -> str:
    sizes = sorted({r["N"] for r in rows})
    keys = list(dict.fromkeys((r["mod"], r["method"]) for r in rows))
    by = {(r["N"], r["mod"], r["method"]): r for r in rows}
    out = ["| modification | method | " + " | ".join(f"N={n}" for n in sizes) + " |",
           "|---|---|" + "---|" * len(sizes)]
    for mod, label in keys:
        cells = [f"{by[(n, mod, label)]['median_s']:.3g} s **x{by[(n, mod, label)]['speedup_vs_baseline']:.2f}**, "
                 f"err {float(by[(n, mod, label)]['err_local']):.2g}" for n in sizes]
        out.append(f"| {mod} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats per size (0: 5 up to 2K, else 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--mods", nargs="+", default=["alibi", "softcap"], choices=["alibi", "softcap"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {datetime.date.today()}", flush=True)
    rows = run(args.sizes, args.heads, args.dim, args.repeats, [r for r in ROWS if r[1] in args.mods])
    write_csv(rows, args.out / "cpu_scoremods.csv")
    print(f"wrote {args.out / 'cpu_scoremods.csv'}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
