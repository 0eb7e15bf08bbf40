"""GPU check and timing of the Triton kernels, in one call.

    PYTHONPATH=src python3 benchmarks/gpu.py [--quick] [--sizes 256,1024,...] [--out DIR]

1. environment and the two ceilings (device copy bandwidth, bf16 matmul rate);
2. correctness at full size: each kernel vs its method's plain-torch reference (fp32 math on the
   same bf16 inputs) and the approximation error vs exact SDPA; a sweep of dtypes / head dims /
   masks / steps for Monarch, masks and causal for MRA and top-k, and FlexAttention-MRA vs reference;
3. ``triton.testing.do_bench`` medians vs ``F.scaled_dot_product_attention`` (flash backend), bf16,
   batch 1 x 12 heads, d = 64, N in --sizes: Monarch T=1/T=2, MRA-2 (own kernel, its Triton part
   alone, and the FlexAttention variant), top-k (k=64);
4. end to end: torch.compile (inductor) of a tiny bf16 model calling structattn.functional.*,
   forward + backward, and a backward pass through each op.

Full logs and a JSON of every number go to --out (default $OUT, else benchmarks/out); the short
table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

LOG = []
SKIP = set()
RESULTS = {"checks": [], "timings": [], "env": {}, "e2e": []}
T0 = time.time()


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench(fn, warmup=25, rep=100):
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    except TypeError:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])


def graph_bench(fn):
    """Median replay time of ``fn`` captured in a CUDA graph: GPU time without Python launch cost."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(lambda: g.replay())


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def section(name):
    log(f"\n===== {name}  (t = {time.time() - T0:.0f}s)")


def guarded(name, fn):
    try:
        fn()
    except Exception as exc:  # keep going: one failing section must not hide the others
        log(f"!! {name} failed: {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
        RESULTS.setdefault("failures", []).append(f"{name}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------
def env():
    import triton
    import triton.language as tl

    p = torch.cuda.get_device_properties(0)
    e = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "tl.topk": hasattr(tl, "topk"),
        "tl.sort": hasattr(tl, "sort"),
    }
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    e["copy_TBps"] = 2 * x.numel() / ms / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    e["bf16_mm_TFLOPs"] = 2 * 8192 ** 3 / ms / 1e9
    del x, y, a, b
    RESULTS["env"] = e
    log(json.dumps(e))


# ------------------------------------------------------------------------------------------------
FLEX_OPTS = [None, {"BLOCK_M": 32, "BLOCK_N": 32}, {"BLOCK_M": 64, "BLOCK_N": 32}]
FLEX_STATE = {}


def flex(q, k, v, s, p, selection=None):
    """FlexAttention MRA-2; the first kernel_options that compile for this block size are kept."""
    import mra_flex

    if "opts" in FLEX_STATE:
        return mra_flex.forward_flex(q, k, v, None, s, False, p, selection=selection, kernel_options=FLEX_STATE["opts"])
    last = None
    for opts in FLEX_OPTS:
        try:
            out = mra_flex.forward_flex(q, k, v, None, s, False, p, selection=selection, kernel_options=opts)
            torch.cuda.synchronize()
            FLEX_STATE["opts"] = opts
            RESULTS["env"]["flex_kernel_options"] = opts
            log(f"flex kernel_options: {opts}")
            return out
        except Exception as exc:
            last = exc
            log(f"flex with kernel_options {opts} failed: {type(exc).__name__}: {str(exc)[:200]}")
            torch._dynamo.reset()
            mra_flex._FLEX.clear()
    raise last


def check(name, out, ref, tol, exact=None):
    ok = bool(torch.isfinite(out).all()) and rel(out, ref) < tol
    row = {"name": name, "err_vs_ref": rel(out, ref), "tol": tol, "ok": ok}
    if exact is not None:
        row["err_vs_exact"] = rel(out, exact)
    RESULTS["checks"].append(row)
    log(f"{'ok ' if ok else 'BAD'} {name:60s} err_vs_ref {row['err_vs_ref']:.2e} (tol {tol:.0e})"
        + (f"  approx err vs exact {row['err_vs_exact']:.3f}" if exact is not None else ""))


def poisoned_like(q, dv):
    return torch.full((*q.shape[:3], dv), float("nan"), device=q.device, dtype=q.dtype)


def correctness(sizes, quick):
    from structattn.methods.monarch import triton as KM
    from structattn.methods.mra import triton as KR
    from structattn.methods.topk import triton as KT
    from structattn.methods import get_method
    from structattn.methods.monarch import MonarchParams
    from structattn.methods.mra import MraParams
    from structattn.methods.topk import TopkParams

    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
    H, D = 12, 64

    def ref(method, q, k, v, mask, scale, causal, p):
        return get_method(method).forward(q.float(), k.float(), v.float(), mask, scale, causal, p)

    # full size, the benchmark's configuration
    for N in sizes:
        torch.manual_seed(N)
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        s = 1 / math.sqrt(D)
        exact = sdpa_flash(q, k, v)
        for T in (1, 2):
            p = MonarchParams(num_steps=T)
            out = KM.forward(q, k, v, None, s, False, p, out=poisoned_like(q, D))
            check(f"monarch T={T} bf16 N={N}", out, ref("monarch", q, k, v, None, s, False, p), tol[q.dtype], exact)
        p = MraParams()
        out = KR.forward(q, k, v, None, s, False, p, out=poisoned_like(q, D))
        check(f"mra2 own bf16 N={N}", out, ref("mra", q, k, v, None, s, False, p), tol[q.dtype], exact)
        try:
            if "flex" in SKIP:
                raise RuntimeError("skipped (--skip flex)")
            out = flex(q, k, v, s, p)
            check(f"mra2 flex bf16 N={N}", out, ref("mra", q, k, v, None, s, False, p), tol[q.dtype], exact)
        except Exception as exc:
            log(f"!! flex N={N}: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            KR.SELECT_IMPL = "compiled"
            out = KR.forward(q, k, v, None, s, False, p, out=poisoned_like(q, D))
            check(f"mra2 own + compiled selection bf16 N={N}", out, ref("mra", q, k, v, None, s, False, p),
                  tol[q.dtype], exact)
        finally:
            KR.SELECT_IMPL = "eager"
        p = TopkParams(k=64)
        out = KT.forward(q, k, v, None, s, False, p, out=poisoned_like(q, D))
        check(f"topk k=64 bf16 N={N}", out, ref("topk", q, k, v, None, s, False, p), tol[q.dtype], exact)
        p = TopkParams(k=32)
        out = KT.forward(q, k, v, None, s, True, p, out=poisoned_like(q, D))
        check(f"topk k=32 causal bf16 N={N}", out, ref("topk", q, k, v, None, s, True, p), tol[q.dtype])
        del q, k, v, exact
        torch.cuda.empty_cache()



def sweep(quick, deadline):
    """dtypes, head dims, masks, GQA, HF transposed views, N not a block multiple, causal."""
    from structattn.methods.monarch import triton as KM
    from structattn.methods.mra import triton as KR
    from structattn.methods.topk import triton as KT
    from structattn.methods import get_method
    from structattn.methods.monarch import MonarchParams
    from structattn.methods.mra import MraParams
    from structattn.methods.topk import TopkParams

    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}

    def ref(method, q, k, v, mask, scale, causal, p):
        return get_method(method).forward(q.float(), k.float(), v.float(), mask, scale, causal, p)

    N = 1000 if quick else 3000
    combos = [(dt, 64) for dt in (torch.bfloat16, torch.float16, torch.float32)]
    if not quick:
        combos += [(torch.bfloat16, 16), (torch.bfloat16, 32), (torch.bfloat16, 128)]
    for dtype, D in combos:
            if time.time() - T0 > deadline:
                log(f"sweep stopped at the deadline ({deadline}s)")
                return
            torch.manual_seed(D)
            B, H, Hk = 2, 4, 2
            q = torch.randn(B, N, H, D, device="cuda", dtype=dtype).transpose(1, 2)
            k = torch.randn(B, N, Hk, D, device="cuda", dtype=dtype).transpose(1, 2)
            v = torch.randn(B, N, Hk, D, device="cuda", dtype=dtype).transpose(1, 2)
            mask = torch.rand(B, 1, 1, N, device="cuda") > 0.2
            mask[1, ..., :200] = False  # fully masked blocks
            s = 1 / math.sqrt(D)
            for T in (1, 3):
                p = MonarchParams(num_steps=T)
                out = KM.forward(q, k, v, mask, s, False, p, out=poisoned_like(q, D))
                check(f"monarch T={T} {str(dtype)[6:]} d={D} GQA mask N={N}", out,
                      ref("monarch", q, k, v, mask, s, False, p), tol[dtype])
            for causal in (False, True):
                for variant in ("mra2", "mra2s"):
                    p = MraParams(variant=variant, blocks_per_row=4)
                    out = KR.forward(q, k, v, mask, s, causal, p, out=poisoned_like(q, D))
                    check(f"{variant} {str(dtype)[6:]} d={D} causal={causal} mask N={N}", out,
                          ref("mra", q, k, v, mask, s, causal, p), tol[dtype])
                p = TopkParams(k=50)
                gmask = torch.rand(1, 1, N, N, device="cuda") > 0.1
                out = KT.forward(q, k, v, gmask, s, causal, p, out=poisoned_like(q, D))
                # fp32: the kernel and the reference round scores differently (~1e-7), so a few rows
                # out of 24000 pick a different k-th key on a near-tie: a discontinuity, not drift
                check(f"topk k=50 {str(dtype)[6:]} d={D} causal={causal} gmask N={N}", out,
                      ref("topk", q, k, v, gmask, s, causal, p), max(tol[dtype], 5e-3))
    # Monarch at 64K with a key-padding mask (the published kernel fails to compile at >= 16K)
    if not quick and time.time() - T0 < deadline:
        N = 65536
        q, k, v = (torch.randn(1, 2, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(1, 1, 1, N, device="cuda", dtype=torch.bool)
        mask[..., -3000:] = False
        p = MonarchParams(num_steps=2)
        out = KM.forward(q, k, v, mask, 0.125, False, p, out=poisoned_like(q, 64))
        check(f"monarch T=2 bf16 mask N={N}", out, ref("monarch", q, k, v, mask, 0.125, False, p), 2e-2)


# ------------------------------------------------------------------------------------------------
def timings(sizes, topk_max, deadline):
    from structattn.methods.monarch import triton as KM
    from structattn.methods.mra import triton as KR
    from structattn.methods.topk import triton as KT
    from structattn.methods.monarch import MonarchParams
    from structattn.methods.mra import MraParams, mra_select
    from structattn.methods.topk import TopkParams

    H, D = 12, 64
    for N in sizes:
        if time.time() - T0 > deadline:
            log(f"timings stopped at the deadline before N={N}")
            break
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        s = 1 / math.sqrt(D)
        row = {"N": N}
        row["sdpa_flash"] = bench(lambda: sdpa_flash(q, k, v))
        for T in (1, 2):
            p = MonarchParams(num_steps=T)
            row[f"monarch_T{T}"] = bench(lambda: KM.forward(q, k, v, None, s, False, p))
        p = MraParams()
        row["mra2_own"] = bench(lambda: KR.forward(q, k, v, None, s, False, p))
        sel = mra_select(q, k, None, s, False, p)
        row["mra2_select"] = bench(lambda: mra_select(q, k, None, s, False, p))
        row["mra2_own_triton_part"] = bench(lambda: KR.forward(q, k, v, None, s, False, p, selection=sel))
        try:
            if "flex" in SKIP:
                raise RuntimeError("skipped (--skip flex)")
            flex(q, k, v, s, p)
            row["mra2_flex"] = bench(lambda: flex(q, k, v, s, p))
            row["mra2_flex_after_select"] = bench(lambda: flex(q, k, v, s, p, selection=sel))
        except Exception as exc:
            log(f"!! flex timing N={N}: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            KR.SELECT_IMPL = "compiled"
            KR.forward(q, k, v, None, s, False, p)
            row["mra2_own_csel"] = bench(lambda: KR.forward(q, k, v, None, s, False, p))
        finally:
            KR.SELECT_IMPL = "eager"
        # GPU time alone (CUDA-graph replay, no Python launch cost)
        try:
            row["g_sdpa_flash"] = graph_bench(lambda: sdpa_flash(q, k, v))
            for T in (1, 2):
                pm = MonarchParams(num_steps=T)
                row[f"g_monarch_T{T}"] = graph_bench(lambda: KM.forward(q, k, v, None, s, False, pm))
            row["g_mra2_triton_part"] = graph_bench(lambda: KR.forward(q, k, v, None, s, False, p, selection=sel))
        except Exception as exc:
            log(f"!! graph timing N={N}: {type(exc).__name__}: {str(exc)[:300]}")
        if N <= topk_max:
            pt = TopkParams(k=64)
            row["topk64"] = bench(lambda: KT.forward(q, k, v, None, s, False, pt), rep=100 if N < 65536 else 400)
        RESULTS["timings"].append(row)
        log(json.dumps({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in row.items()}))
        del q, k, v, sel
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
def end_to_end():
    import structattn.functional as SF

    class Tiny(torch.nn.Module):
        def __init__(self, d=256, h=4):
            super().__init__()
            self.h = h
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.out = torch.nn.Linear(3 * d, d)

        def forward(self, x):
            B, N, d = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            a = SF.monarch_attention(q, k, v, num_steps=2)
            b = SF.mra_attention(q, k, v, is_causal=True, blocks_per_row=2)
            c = SF.topk_attention(q, k, v, k=32)
            y = torch.cat([a, b, c], -1).transpose(1, 2).reshape(B, N, 3 * d)
            return self.out(y)

    torch.manual_seed(0)
    model = Tiny().cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model)
    y = compiled(x)
    y.float().pow(2).mean().backward()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    e = rel(y, eager)
    RESULTS["e2e"].append({"what": "torch.compile(inductor) tiny bf16 model, fwd+bwd", "err_vs_eager": e,
                           "grads_finite": grads_ok})
    log(f"e2e compiled vs eager rel err {e:.2e}; grads finite: {grads_ok}")

    # backward through each op on CUDA (autograd through the reference math) vs the torch path
    for name, fn, kw in [("monarch", SF.monarch_attention, {"num_steps": 2}),
                         ("mra", SF.mra_attention, {"is_causal": True}),
                         ("topk", SF.topk_attention, {"k": 16})]:
        leaves = [torch.randn(1, 4, 500, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        out = fn(*leaves, impl="auto", **kw)
        out.float().pow(2).sum().backward()
        g_auto = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        out_t = fn(*leaves, impl="torch", **kw)
        out_t.float().pow(2).sum().backward()
        errs = [rel(a, b.grad) for a, b in zip(g_auto, leaves)]
        fin = all(bool(torch.isfinite(g).all()) for g in g_auto)
        RESULTS["e2e"].append({"what": f"backward {name}", "grad_err_vs_torch_path": max(errs),
                               "fwd_err_vs_torch_path": rel(out, out_t), "finite": fin})
        log(f"backward {name}: fwd err {rel(out, out_t):.2e}, grad err vs torch path {max(errs):.2e}, finite {fin}")


# ------------------------------------------------------------------------------------------------
def table():
    lines = []
    e = RESULTS["env"]
    lines.append(f"device {e.get('device')} | torch {e.get('torch')} | triton {e.get('triton')} | {e.get('date')}"
                 f" | copy {e.get('copy_TBps', 0):.2f} TB/s | bf16 mm {e.get('bf16_mm_TFLOPs', 0):.0f} TFLOP/s")
    cols = ["sdpa_flash", "monarch_T1", "monarch_T2", "mra2_own", "mra2_own_csel", "mra2_flex", "mra2_select",
            "mra2_own_triton_part", "mra2_flex_after_select", "topk64"]
    gcols = ["g_sdpa_flash", "g_monarch_T1", "g_monarch_T2", "g_mra2_triton_part"]
    lines.append("median ms (speed-up vs SDPA flash), bf16, B=1, H=12, d=64")
    lines.append("N      " + " ".join(f"{c:>20s}" for c in cols))
    for row in RESULTS["timings"]:
        base = row["sdpa_flash"]
        cells = []
        for c in cols:
            t = row.get(c)
            cells.append(f"{'-':>20s}" if t is None else
                         (f"{t:9.4f}" + (f" ({base / t:6.2f}x)" if c != "sdpa_flash" else " " * 10)).rjust(20))
        lines.append(f"{row['N']:<6d} " + " ".join(cells))
    lines.append("CUDA-graph replay (GPU time only), median ms (speed-up vs SDPA flash replay)")
    lines.append("N      " + " ".join(f"{c:>20s}" for c in gcols))
    for row in RESULTS["timings"]:
        base = row.get("g_sdpa_flash")
        cells = []
        for c in gcols:
            t = row.get(c)
            cells.append(f"{'-':>20s}" if t is None or base is None else
                         (f"{t:9.4f}" + (f" ({base / t:6.2f}x)" if c != "g_sdpa_flash" else " " * 10)).rjust(20))
        lines.append(f"{row['N']:<6d} " + " ".join(cells))
    bad = [c for c in RESULTS["checks"] if not c["ok"]]
    lines.append(f"checks: {len(RESULTS['checks']) - len(bad)}/{len(RESULTS['checks'])} ok"
                 + ("; BAD: " + ", ".join(c["name"] for c in bad) if bad else ""))
    for r in RESULTS["e2e"]:
        lines.append("e2e: " + json.dumps(r))
    if RESULTS.get("failures"):
        lines.append("FAILED sections: " + " | ".join(RESULTS["failures"]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sweep; sizes 256,4096,16384")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--check-sizes", default=None, help="full-size correctness sizes (default: --sizes)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: env,check,time,e2e,sweep,flex")
    ap.add_argument("--deadline", type=float, default=500.0, help="seconds after which the sweep / timings stop")
    ap.add_argument("--topk-max", type=int, default=1 << 30, help="largest N for the top-k timing")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    a = ap.parse_args()
    sizes = [int(x) for x in (a.sizes or ("256,4096,16384" if a.quick else "256,1024,4096,16384,65536")).split(",")]
    csizes = [int(x) for x in a.check_sizes.split(",")] if a.check_sizes else sizes
    skip = set(a.skip.split(","))
    SKIP.update(skip)
    os.makedirs(a.out, exist_ok=True)
    try:
        if "env" not in skip:
            section("environment")
            guarded("env", env)
        if "e2e" not in skip:
            section("end to end")
            guarded("e2e", end_to_end)
        if "check" not in skip:
            section("correctness")
            guarded("correctness", lambda: correctness(csizes, a.quick))
        if "time" not in skip:
            section("timings")
            guarded("timings", lambda: timings(sizes, a.topk_max, a.deadline))
        if "sweep" not in skip:
            section("correctness sweep")
            guarded("sweep", lambda: sweep(a.quick, a.deadline))
    finally:
        section("summary")
        t = table()
        with open(os.path.join(a.out, "gpu_results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
        with open(os.path.join(a.out, "gpu_log.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n\n" + t + "\n")
        print(t, flush=True)


if __name__ == "__main__":
    main()
