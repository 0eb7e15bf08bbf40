"""GPU check and timing of the generated score-mod kernels (exact and top-k) at full size.

    PYTHONPATH=src python3 benchmarks/gpu_scoremods.py [--budget 200] [--no-flex]
    PYTHONPATH=src python3 benchmarks/gpu_scoremods.py --dry      # CPU, interpreter, tiny sizes

For each size (B=1; N=4096 with H=32, D=64; N=16384 with H=16, D=128), dtype (bf16, fp32) and
modification (Gemma-style soft-cap, BLOOM-style ALiBi, a causal sliding window), all causal:

1. check: the exact kernel (``exact_attention(impl="triton")``), top-k at its exact limit (k = N)
   and top-k with k = 64, on a sample of query rows of two heads, against a float64 eager
   reference of the same rows (top-k k=64: a float64 top-k of those rows; a row whose k-th and
   (k+1)-th scores nearly tie may keep another key, so the count of such rows is reported);
   errors are relative (Frobenius) and marked BAD above 1e-4 (fp32) / 2e-2 (bf16);
2. time (``triton.testing.do_bench`` median): the kernels, ``F.scaled_dot_product_attention``
   with the modification materialised as an attention mask where one exists (ALiBi: a
   [1, H, N, N] bias; window: a bool [N, N] mask; soft-cap has none: plain causal SDPA is shown as
   the floor), and ``flex_attention`` compiled with the same score_mod / block mask (bf16, when
   it imports).

Prints a markdown table last; sections past ``--budget`` seconds are skipped (and said so).
``--dry`` runs the same code on the CPU under TRITON_INTERPRET=1 at tiny sizes (fp32, one call
per timing) to test the script itself.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

T0 = time.time()
DEV = "cpu" if DRY else "cuda"
ROWS: list = []
#: top-k's small budget (below N also under --dry)
KS = 8 if DRY else 64
SMALL = f"topk k={KS}"
NOTES: list = []


def log(*a) -> None:
    print(*a, flush=True)


def bench(fn) -> float:
    """Median ms of ``fn`` (one timed call under --dry)."""
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# the modifications: score_mod text, captured tensors, window, a torch logits fn for the
# reference, a materialised SDPA mask, a flex score_mod / mask_mod
# ------------------------------------------------------------------------------------------------
def cases(H: int, N: int, window: int):
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], device=DEV)
    return {
        "softcap 20": dict(
            text="20.0 * tanh(s / 20.0)", tensors=[], window=None,
            logits=lambda s, h, q, k: 20.0 * torch.tanh(s / 20.0),
            sdpa_mask=None,
            flex_score=lambda score, b, h, q, k: 20.0 * torch.tanh(score / 20.0), flex_window=None),
        "alibi": dict(
            text="s + t0[h] * (k - q)", tensors=[slopes], window=None,
            logits=lambda s, h, q, k: s + slopes.double()[h].view(-1, 1, 1) * (k - q).double(),
            sdpa_mask=lambda dtype: (slopes.view(1, H, 1, 1) * (torch.arange(N, device=DEV).view(1, -1)
                                     - torch.arange(N, device=DEV).view(-1, 1))).to(dtype)
            .masked_fill(~torch.ones(N, N, dtype=torch.bool, device=DEV).tril(), float("-inf")),
            flex_score=lambda score, b, h, q, k: score + slopes[h] * (k - q), flex_window=None),
        f"window {window}": dict(
            text="", tensors=[], window=(window - 1, 0),
            logits=lambda s, h, q, k: s.masked_fill(q - k >= window, float("-inf")),
            sdpa_mask=lambda dtype: (lambda i: (i.view(-1, 1) - i.view(1, -1) < window)
                                     & (i.view(1, -1) <= i.view(-1, 1)))(torch.arange(N, device=DEV)),
            flex_score=None, flex_window=window),
    }


def reference(q, k, v, scale, case, heads, rows, kk=None):
    """Float64 eager causal attention of query ``rows`` of ``heads`` (top-k with ``kk`` keys when given)."""
    qs = q[0, heads][:, rows].double()                              # [h, r, D]
    s = (qs @ k[0, heads].double().transpose(-1, -2)) * scale      # [h, r, N]
    hh = torch.tensor(heads, device=q.device).view(-1, 1, 1)
    qi = torch.tensor(rows, device=q.device).view(1, -1, 1)
    ki = torch.arange(k.shape[2], device=q.device).view(1, 1, -1)
    s = case["logits"](s, hh.view(-1), qi, ki).double()
    s = s.masked_fill(ki > qi, float("-inf"))
    if kk is not None and kk < s.shape[-1]:
        thr = s.topk(kk, dim=-1).values[..., -1:]
        s = s.masked_fill(s < thr, float("-inf"))
    return torch.softmax(s, -1) @ v[0, heads].double()


def row_errors(out, ref):
    """Per-row relative errors [rows]."""
    o, r = out.double().flatten(0, -2), ref.double().flatten(0, -2)
    return (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-300)


# ------------------------------------------------------------------------------------------------
def inputs(N: int, H: int, D: int, dtype):
    """Seeded q, k, v [1, H, N, D]; q scaled by 4 (peakier scores: the soft-cap bites)."""
    g = torch.Generator(device=DEV).manual_seed(N + D)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, generator=g) for _ in range(3))
    return (q * 4.0).to(dtype), k.to(dtype), v.to(dtype)


def window_of(N: int) -> int:
    """The sliding window's width at length N."""
    return max(4, N // 16)


def run_size(N: int, H: int, D: int, dtype, budget: float) -> None:
    import structattn.functional as SF
    q, k, v = inputs(N, H, D, dtype)
    scale = 1.0 / math.sqrt(D)
    heads = [0, H - 1]
    n_rows = min(N, 256)
    rows = sorted(set(list(range(0, n_rows // 2)) + list(range(N - n_rows // 2, N))))
    window = window_of(N)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, case in cases(H, N, window).items():
        if time.time() - T0 > budget:
            NOTES.append(f"skipped (budget): N={N} D={D} {dtype} {name}")
            continue
        row = {"N": N, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""), "mod": name}
        mods = dict(score_mod=case["text"], score_tensors=case["tensors"], sliding_window=case["window"])
        calls = {
            "exact": lambda: SF.exact_attention(q, k, v, None, scale, True, impl="triton", **mods),
            "topk k=N": lambda: SF.topk_attention(q, k, v, None, scale, True, k=N, impl="triton", **mods),
            SMALL: lambda: SF.topk_attention(q, k, v, None, scale, True, k=KS, impl="triton", **mods),
        }
        try:
            ref = reference(q, k, v, scale, case, heads, rows)
            ref_small = reference(q, k, v, scale, case, heads, rows, kk=KS)
            for label, fn in calls.items():
                out = fn()[0, heads][:, rows]
                if not torch.isfinite(out).all():
                    row[f"{label} err"] = "NaN/inf"
                    continue
                if label == SMALL:
                    errs = row_errors(out, ref_small)
                    bad = int((errs > 10 * tol).sum())
                    good = errs <= 10 * tol
                    err = rel(out.flatten(0, -2)[good], ref_small.flatten(0, -2)[good])
                    row[f"{label} err"] = f"{err:.1e}" + (f" ({bad} tie rows)" if bad else "")
                    ok = err < tol and bad <= max(1, len(errs) // 100)
                else:
                    err = rel(out, ref)
                    row[f"{label} err"] = f"{err:.1e}"
                    ok = err < tol
                if not ok:
                    row[f"{label} err"] += " BAD"
        except Exception as exc:
            NOTES.append(f"check N={N} {dtype} {name}: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        for label, fn in calls.items():
            try:
                row[label] = bench(fn)
            except Exception as exc:
                NOTES.append(f"time {label} N={N} {dtype} {name}: {type(exc).__name__}: {str(exc)[:200]}")
        try:
            if case["sdpa_mask"] is None:
                row["sdpa"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
                row["sdpa what"] = "causal, no soft-cap (floor)"
            else:
                m = case["sdpa_mask"](dtype)
                row["sdpa"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale))
                row["sdpa what"] = f"mask {list(m.shape)} materialised"
                del m
        except Exception as exc:
            NOTES.append(f"sdpa N={N} {dtype} {name}: {type(exc).__name__}: {str(exc)[:200]}")
        ROWS.append(row)
        log(row)
        if DEV == "cuda":
            torch.cuda.empty_cache()


_FLEX = {}


def flex_rows(budget: float) -> None:
    """``flex_attention`` (compiled) on the bf16 rows' inputs, while the budget lasts (each
    score_mod is one more inductor compile, so it runs after every kernel row)."""
    for row in ROWS:
        if row["dtype"] != "bfloat16":
            continue
        if time.time() - T0 > budget:
            NOTES.append(f"skipped (budget): flex N={row['N']} {row['mod']}")
            continue
        N, H, D = row["N"], row["H"], row["D"]
        q, k, v = inputs(N, H, D, torch.bfloat16)
        case = cases(H, N, window_of(N))[row["mod"]]
        try:
            row["flex"] = time_flex(q, k, v, 1.0 / math.sqrt(D), case, N)
            log(f"flex N={N} {row['mod']}: {row['flex']:.3f} ms")
        except Exception as exc:
            NOTES.append(f"flex N={N} {row['mod']}: {type(exc).__name__}: {str(exc)[:200]}")
        del q, k, v
        torch.cuda.empty_cache()


def time_flex(q, k, v, scale, case, N) -> float:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    w = case["flex_window"]
    if w is None:
        mask_mod = lambda b, h, qi, ki: qi >= ki
    else:
        mask_mod = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < w)
    block_mask = create_block_mask(mask_mod, None, None, N, N, device=DEV)
    fn = _FLEX["fn"]
    score_mod = case["flex_score"]
    return bench(lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale))


def compiled_site(budget: float) -> None:
    """A Gemma-style soft-capped causal attention written in eager torch, compiled with
    ``backend="structattn"`` (method exact, compiler eager): the pass finds the soft-cap, the site
    runs the exact kernel; its output against the uncompiled module."""
    import structattn
    if time.time() - T0 > budget:
        NOTES.append("skipped (budget): compiled site")
        return

    class SoftcapAttention(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            s = torch.tanh(s / 20.0) * 20.0    # Gemma-2's spelling
            n = q.shape[-2]
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            return torch.softmax(s, -1) @ v

    N, H, D = (40, 2, 16) if DRY else (4096, 8, 64)
    dtype = torch.float32 if DRY else torch.bfloat16
    torch.manual_seed(1)
    q, k, v = ((torch.randn(1, H, N, D, device=DEV) * (4.0 if i == 0 else 1.0)).to(dtype) for i in range(3))
    mod = SoftcapAttention()
    ref = mod(q.double(), k.double(), v.double())
    opts = {"method": "exact", "compiler": "eager", "impl": "triton"}
    out = torch.compile(mod, backend="structattn", options=opts)(q, k, v)
    report = str(structattn.last_report())
    ROWS.append({"N": N, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
                 "mod": "compiled softcap site (backend=structattn, exact)", "exact err": f"{rel(out, ref):.1e}"})
    log(report)


def table() -> str:
    timed = ("exact", "topk k=N", SMALL, "sdpa", "flex")
    cols = ["N", "H", "D", "dtype", "mod", *timed, "exact err", "topk k=N err", f"{SMALL} err", "sdpa what"]
    head = "| " + " | ".join(c + (" ms" if c in timed else "")
                             for c in cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for r in ROWS:
        cells = []
        for c in cols:
            x = r.get(c, "")
            cells.append(f"{x:.3f}" if isinstance(x, float) else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
    ap.add_argument("--budget", type=float, default=210.0, help="seconds after which sections are skipped")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    from structattn.backend import register
    register()   # run from a source tree (PYTHONPATH=src): no installed entry point
    if DRY:
        sizes, dtypes = [(40, 2, 16)], [torch.float32]
    else:
        sizes, dtypes = [(4096, 32, 64), (16384, 16, 128)], [torch.bfloat16, torch.float32]
        log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
            f"triton {__import__('triton').__version__}")
    for N, H, D in sizes:
        for dtype in dtypes:
            run_size(N, H, D, dtype, args.budget)
    if not args.no_flex and not DRY:
        flex_rows(args.budget)
    try:
        compiled_site(args.budget)
    except Exception as exc:
        NOTES.append(f"compiled site: {type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
    log("\n" + table())
    for n in NOTES:
        log("note: " + n)
    log(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
