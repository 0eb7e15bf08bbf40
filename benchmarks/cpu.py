#!/usr/bin/env python
"""CPU speed of the structured attentions against ``F.scaled_dot_product_attention`` (``make bench``).

Setting: fp32, batch 1, 12 heads, head_dim 64, N = 1K .. 16K, self attention without a mask.
Timed inputs: q, k, v ~ N(0, 1). Every method runs through its ``structattn.functional`` op on
the plain-torch CPU path, in the same process and on the same inputs as SDPA, interleaved with
it; we report the median wall time of the repeats, the speed-up over SDPA, the peak extra
resident memory of one call (Linux peak-RSS counter, reset before the call) next to the size of
the dense fp32 score matrix B*H*N*N*4 bytes that exact attention would materialise, the CPU
used by other processes meanwhile (``other_load_cores``: timings are only meaningful near 0 on a
shared machine), and the relative error ||out - exact|| / ||exact|| on two inputs:

* ``err_randn``: the timed N(0, 1) inputs. Their attention is nearly uniform (entropy ~ log N),
  so the exact output is a tiny average and every sparse or structured approximation has a
  relative error near or above 1: a worst case, not a quality measure.
* ``err_local``: q = s + 0.5 e1, k = s + 0.5 e2 with s a moving average (32 tokens) of white
  noise and e1, e2 white noise: attention is local plus content-dependent, mean entropy about
  4 nats at N = 2K (closer to trained models). Untimed.

Linear attention needs feature maps fitted to a model; here it runs with freshly initialised
hedgehog maps (f = 2 * head_dim = 128; the time does not depend on their values), so its errors are
not meaningful and are left blank.

Writes benchmarks/out/cpu.csv and, when matplotlib is installed, benchmarks/out/cpu.png; prints a
Markdown table (the one in README.md).

    python benchmarks/cpu.py                     # full run (several minutes on 2 cores)
    python benchmarks/cpu.py --sizes 1024 2048   # quick look
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import structattn  # noqa: E402
from structattn.methods import SiteShape, get_method  # noqa: E402

OUT = ROOT / "benchmarks" / "out"

#: (label, registered method, params); "sdpa" is the baseline, called directly
METHODS = [
    ("sdpa", "exact", {}),
    ("monarch T=1", "monarch", {"num_steps": 1}),
    ("monarch T=2", "monarch", {"num_steps": 2}),
    ("mra2 r=4", "mra", {"blocks_per_row": 4}),
    ("mra2s r=4", "mra", {"blocks_per_row": 4, "variant": "mra2s"}),
    ("topk k=64", "topk", {"k": 64}),
    ("linear", "linear", {"feature_map": "hedgehog", "local_window": 0}),
    ("linear w=64", "linear", {"feature_map": "hedgehog", "local_window": 64}),
    ("routing r=4", "routing", {}),
]


# ------------------------------------------------------------------------------------------------
# peak memory: reset the kernel's peak-RSS counter, run once, read it back
# ------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def peak_extra_mib(fn) -> float:
    """Peak resident memory of ``fn()`` above the resident memory before it, in MiB (NaN if the
    platform has no resettable peak-RSS counter). Free heap memory is returned to the OS first
    (malloc_trim) so that reusing it counts."""
    try:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:
        fn()
        return float("nan")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies used by this process) from /proc, or (0, 0)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])          # utime + stime
        return busy, own
    except (OSError, ValueError, IndexError):
        return 0, 0


# ------------------------------------------------------------------------------------------------
def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, nproc={os.cpu_count()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def default_repeats(n: int) -> int:
    return 5 if n <= 2048 else 3 if n <= 8192 else 2


def make_call(name: str, params: dict, q, k, v):
    if name == "exact":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if name == "linear":   # unfitted maps: timing only (see the module docstring)
        from structattn.methods.linear import FeatureMaps

        maps = FeatureMaps.init(params["feature_map"], q.shape[1], k.shape[1], q.shape[-1],
                                local_window=params["local_window"])
        return lambda: structattn.functional.linear_attention(q, k, v, maps=maps, impl="torch")
    return lambda: structattn.functional.attention(name, q, k, v, impl="torch", **params)


def model_gflop(name: str, params: dict, b: int, h: int, n: int, d: int) -> float:
    m = get_method(name)
    site = SiteShape(batch=b, num_heads=h, num_kv_heads=h, q_len=n, kv_len=n, head_dim=d, v_head_dim=d)
    return float(m.flops(site, m.make_params(params))) / 1e9


def local_inputs(n: int, heads: int, dim: int, g: torch.Generator, window: int = 32):
    """The ``err_local`` inputs (see the module docstring)."""
    z = torch.randn(1, heads, n + window, dim, generator=g)
    c = z.cumsum(2)
    smooth = (c[:, :, window:] - c[:, :, :-window]) / window ** 0.5
    q = smooth + 0.5 * torch.randn(1, heads, n, dim, generator=g)
    k = smooth + 0.5 * torch.randn(1, heads, n, dim, generator=g)
    v = torch.randn(1, heads, n, dim, generator=g)
    return q, k, v


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def run(sizes, heads, dim, repeats, methods, seed=0):
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(seed + n)
        q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
        calls = [(label, name, params, make_call(name, params, q, k, v)) for label, name, params in methods]
        times = {label: [] for label, *_ in calls}
        mem, err_randn, err_local = {}, {}, {}
        reps = repeats or default_repeats(n)
        busy0, own0, t_start = *_cpu_jiffies(), time.perf_counter()
        with torch.inference_mode():
            for label, _, _, fn in calls:           # warm-up call = memory measurement
                mem[label] = peak_extra_mib(fn)
            ref = None
            for rep in range(reps):                 # interleaved repeats
                for label, _, _, fn in calls:
                    t0 = time.perf_counter()
                    out = fn()
                    times[label].append(time.perf_counter() - t0)
                    if rep == reps - 1:
                        if label == "sdpa":
                            ref = out
                        err_randn[label] = _rel(out, ref)
                    del out
            del ref
            busy1, own1, t_end = *_cpu_jiffies(), time.perf_counter()
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            # CPU used by other processes while we timed, in cores (0 = quiet machine)
            others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / hz / max(t_end - t_start, 1e-9))
            # the same calls on the "local" inputs (untimed)
            ql, kl, vl = local_inputs(n, heads, dim, g)
            ref_local = make_call("exact", {}, ql, kl, vl)()
            for label, name, params, _ in calls:
                err_local[label] = _rel(make_call(name, params, ql, kl, vl)(), ref_local)
            del ql, kl, vl, ref_local
        base = statistics.median(times["sdpa"])
        dense_mib = heads * n * n * 4 / 2**20
        for label, name, params, _ in calls:
            med = statistics.median(times[label])
            row = dict(
                N=n, method=label, params=";".join(f"{a}={b}" for a, b in params.items()),
                median_s=round(med, 5), min_s=round(min(times[label]), 5), repeats=reps,
                speedup_vs_sdpa=round(base / med, 2),
                err_randn="" if name == "linear" else f"{err_randn[label]:.3g}",
                err_local="" if name == "linear" else f"{err_local[label]:.3g}", peak_mem_mib=round(mem[label], 1),
                dense_scores_mib=round(dense_mib, 1),
                model_gflop=round(model_gflop(name, params, 1, heads, n, dim), 3),
                other_load_cores=round(others, 2),
            )
            rows.append(row)
            print(f"N={n:6d} {label:12s} {med:9.4f}s  x{row['speedup_vs_sdpa']:7.2f}  err randn "
                  f"{row['err_randn'] or '-':>7s} local {row['err_local'] or '-':>7s}  peak {row['peak_mem_mib']:8.1f} MiB "
                  f"(dense scores {dense_mib:.0f} MiB)  other load {others:.2f} cores", flush=True)
    return rows


def write_csv(rows, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown(rows) -> str:
    sizes = sorted({r["N"] for r in rows})
    labels = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["N"], r["method"]): r for r in rows}
    out = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |",
           "|---|" + "---|" * len(sizes)]
    for label in labels:
        cells = []
        for n in sizes:
            r = by.get((n, label))
            if r is None:
                cells.append("")
            elif label == "sdpa":
                cells.append(f"{r['median_s']:.3g} s, {r['peak_mem_mib']:.0f} MiB")
            elif r["err_local"] == "":
                cells.append(f"{r['median_s']:.3g} s **x{r['speedup_vs_sdpa']:.1f}**, {r['peak_mem_mib']:.0f} MiB")
            else:
                cells.append(f"{r['median_s']:.3g} s **x{r['speedup_vs_sdpa']:.1f}**, err {float(r['err_local']):.2f} / "
                             f"{float(r['err_randn']):.2f}, {r['peak_mem_mib']:.0f} MiB")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    dense = " | ".join(f"{by[(n, labels[0])]['dense_scores_mib']:.0f} MiB" for n in sizes)
    out.append(f"| (dense fp32 scores) | {dense} |")
    return "\n".join(out)


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped the plot {path} (pip install matplotlib to get it); "
              f"the CSV has every number")
        return False
    labels = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for label in labels:
        rs = [r for r in rows if r["method"] == label]
        ns = [r["N"] for r in rs]
        axes[0].plot(ns, [r["median_s"] for r in rs], marker="o", label=label)
        axes[1].plot(ns, [r["speedup_vs_sdpa"] for r in rs], marker="o", label=label)
        axes[2].plot(ns, [r["peak_mem_mib"] for r in rs], marker="o", label=label)
    ns = sorted({r["N"] for r in rows})
    axes[2].plot(ns, [r["dense_scores_mib"] for r in rows if r["method"] == labels[0]], "k--",
                 label="dense fp32 scores")
    for ax, title in zip(axes, ["median time [s]", "speed-up vs SDPA", "peak extra memory [MiB]"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"structattn CPU, fp32, B=1, H=12, d=64 - {machine()}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats per size (0: 5 / 3 / 2 by size)")
    ap.add_argument("--methods", nargs="+", default=None, help="labels to run (sdpa always runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if args.methods is None or m[0] == "sdpa" or m[0] in args.methods]
    print(f"machine: {machine()}; {datetime.date.today()}", flush=True)
    rows = run(args.sizes, args.heads, args.dim, args.repeats, methods)
    write_csv(rows, args.out / "cpu.csv")
    print(f"wrote {args.out / 'cpu.csv'}")
    if plot(rows, args.out / "cpu.png"):
        print(f"wrote {args.out / 'cpu.png'}")
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
