"""GPU check of what came after ``benchmarks/gpu.py``: linear and routing kernels, score
modifications on CUDA, and one whole model in bf16. One call, a deadline per section.

    PYTHONPATH=src python3 benchmarks/gpu_methods.py [--sizes 4096,16384] [--e2e-len 16384]

1. correctness at full size (bf16, 1 x 12 heads, d = 64): each method's Triton path vs its torch
   path on the same inputs, causal and not; score modifications (ALiBi, soft-cap, window) on CUDA
   through ``functional`` vs a float64 eager oracle;
2. ``triton.testing.do_bench`` medians vs ``F.scaled_dot_product_attention`` (flash backend);
3. a SmolLM2-135M-shaped Llama (random weights: no weights on that machine, so time only) in bf16
   at one prefill length: uncompiled, default ``torch.compile``, structattn exact, structattn MRA.

Writes ``gpu_methods.json`` under $OUT (else benchmarks/out); prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

RESULTS: dict = {"checks": [], "timings": [], "e2e": [], "failures": []}
T0 = time.time()
DEV = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: to try the checks here


def log(*a) -> None:
    print(*a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_flash(q, k, v, causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float, exact=None) -> None:
    err = rel(out, ref)
    ok = bool(torch.isfinite(out).all()) and err < tol
    row = {"name": name, "err_vs_ref": err, "ok": ok}
    if exact is not None:
        row["err_vs_exact"] = rel(out, exact)
    RESULTS["checks"].append(row)
    log(("ok  " if ok else "BAD ") + json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}))


def guarded(name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:
        RESULTS["failures"].append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()


def methods_at(N: int) -> list:
    """(label, method name, functional kwargs, causal) rows timed and checked at length N."""
    from structattn.methods import REGISTRY
    from structattn.methods.linear.maps import FeatureMaps

    rows = []
    maps = FeatureMaps.init("hedgehog", 12, 12, 64, seed=0)
    rows.append(("linear", "linear", {"maps": maps}, False))
    rows.append(("linear causal", "linear", {"maps": maps}, True))
    wmaps = FeatureMaps.init("hedgehog", 12, 12, 64, local_window=64, sink_tokens=4, seed=0)
    rows.append(("linear window64 causal", "linear", {"maps": wmaps}, True))
    if "routing" in REGISTRY:
        rows.append(("routing", "routing", {}, False))
        rows.append(("routing causal", "routing", {}, True))
    rows.append(("mra r=16 sink causal", "mra", {"block_size": 32, "blocks_per_row": 16, "sink_blocks": 1}, True))
    return rows


def call(method: str, q, k, v, causal: bool, impl: str, kw: dict):
    import structattn.functional as SF
    fn = getattr(SF, f"{method}_attention")
    return fn(q, k, v, is_causal=causal, impl=impl, **kw)


def kernels(sizes: list[int], deadline: float) -> None:
    H, D = 12, 64
    for N in sizes:
        if time.time() - T0 > deadline:
            log(f"kernels: deadline before N={N}")
            return
        torch.manual_seed(N)
        q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        row = {"N": N, "sdpa_flash": bench(lambda: sdpa_flash(q, k, v)),
               "sdpa_flash_causal": bench(lambda: sdpa_flash(q, k, v, True))}
        for label, method, kw, causal in methods_at(N):
            try:
                out = call(method, q, k, v, causal, "triton", kw)
                ref = call(method, q.float(), k.float(), v.float(), causal, "torch", kw)
                check(f"{label} triton vs torch bf16 N={N}", out, ref, 2e-2, sdpa_flash(q, k, v, causal))
                row[label] = bench(lambda: call(method, q, k, v, causal, "triton", kw))
            except Exception as exc:
                RESULTS["failures"].append(f"{label} N={N}: {type(exc).__name__}: {str(exc)[:300]}")
                log(f"!! {label} N={N}: {type(exc).__name__}: {str(exc)[:300]}")
        RESULTS["timings"].append(row)
        log(json.dumps({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in row.items()}))
        del q, k, v
        torch.cuda.empty_cache()


def score_mods() -> None:
    """ALiBi, soft-cap and a sliding window through exact and top-k on CUDA vs a float64 oracle."""
    import structattn.functional as SF
    torch.manual_seed(0)
    B, H, N, D = 1, 4, 1024, 64
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=torch.float32) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device=DEV)
    s = 1 / math.sqrt(D)
    i = torch.arange(N, device=DEV)
    logits = (q.double() @ k.double().transpose(-1, -2)) * s
    cases = {
        "alibi": ("s + t0[h] * (k - q)", [slopes],
                  logits + slopes.double().view(1, H, 1, 1) * (i.view(1, -1) - i.view(-1, 1)).double(), None),
        "softcap 30": ("30.0 * tanh(s / 30.0)", [], 30 * torch.tanh(logits / 30), None),
        "window 128 causal": ("", [], logits.masked_fill((i.view(-1, 1) - i.view(1, -1) > 128), float("-inf")),
                              (128, 0)),
    }
    causal = torch.ones(N, N, dtype=torch.bool, device=DEV).tril()
    for name, (text, tensors, scores, window) in cases.items():
        ref = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v.double()
        for method, kw in (("exact", {}), ("topk", {"k": N})):
            fn = getattr(SF, f"{method}_attention")
            out = fn(q, k, v, None, s, True, score_mod=text, score_tensors=tensors, sliding_window=window, **kw)
            check(f"score mod {name}: {method} (k = N) causal fp32 N={N}", out, ref, 1e-4)


def e2e(length: int, family: str = "llama") -> None:
    """SmolLM2-135M's shape (30 layers, 9 heads / 3 kv heads, d 64) with random weights, bf16;
    ``family`` "gemma2": the same width as a Gemma-2 layout (soft-capping 50 on every layer, a
    4096-token sliding window on every other one; eager attention, as the family needs for
    soft-capping)."""
    import structattn
    from structattn.backend import register
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
    register()   # run from a source tree (PYTHONPATH=src): no installed entry point
    width = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=length, tie_word_embeddings=True)
    torch.manual_seed(0)
    if family == "gemma2":
        cfg = Gemma2Config(**width, head_dim=64, sliding_window=4096, attn_logit_softcapping=50.0,
                           final_logit_softcapping=None, attn_implementation="eager")
        model = Gemma2ForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(**width, rope_theta=100000.0))
    model = model.to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, width["vocab_size"], (1, length), device=DEV)
    mra = {"method": "mra", "mra": {"block_size": 32, "blocks_per_row": 16, "sink_blocks": 1}}
    variants = {
        "uncompiled": model,
        "inductor": torch.compile(model),
        "structattn exact": torch.compile(model, backend="structattn", options={"method": "exact"}),
        "structattn mra b=32 r=16 sink": torch.compile(model, backend="structattn", options=mra),
    }
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        for name, m in variants.items():
            t0 = time.time()
            out = m(input_ids=ids).logits.float()
            torch.cuda.synchronize()
            first = time.time() - t0
            ms = bench(lambda: m(input_ids=ids))
            err = rel(out, ref)
            RESULTS["e2e"].append({"variant": f"{family} {name}", "length": length, "ms": ms, "first_call_s": first,
                                   "logits_rel_err_vs_uncompiled": err})
            log(f"e2e {name}: {ms:.2f} ms (first call {first:.1f} s), logits rel err {err:.2e}")
            if name.startswith("structattn"):
                log(str(structattn.last_report()).splitlines()[-1])


def table() -> str:
    lines = [f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}"]
    for row in RESULTS["timings"]:
        base, based = row["sdpa_flash"], row["sdpa_flash_causal"]
        cells = [f"N={row['N']} flash {base:.3f} ms, flash causal {based:.3f} ms"]
        for kk, t in row.items():
            if kk in ("N", "sdpa_flash", "sdpa_flash_causal"):
                continue
            ref = based if "causal" in kk else base
            cells.append(f"{kk} {t:.3f} ms ({ref / t:.2f}x)")
        lines.append(" | ".join(cells))
    bad = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    lines.append(f"checks {len(RESULTS['checks']) - len(bad)}/{len(RESULTS['checks'])} ok" + (f"; BAD {bad}" if bad else ""))
    for r in RESULTS["e2e"]:
        base = next((x["ms"] for x in RESULTS["e2e"]
                     if x["variant"] == r["variant"].split()[0] + " uncompiled" and x["length"] == r["length"]), None)
        lines.append(f"e2e {r['length']} {r['variant']}: {r['ms']:.2f} ms"
                     + (f" ({base / r['ms']:.2f}x uncompiled)" if base else "")
                     + f", logits err {r['logits_rel_err_vs_uncompiled']:.2e}, first call {r['first_call_s']:.0f} s")
    if RESULTS["failures"]:
        lines.append("FAILURES: " + " | ".join(RESULTS["failures"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--e2e-len", type=int, default=16384)
    ap.add_argument("--e2e-models", default="llama", help="comma-separated: llama, gemma2")
    ap.add_argument("--deadline", type=float, default=200.0)
    ap.add_argument("--skip", default="")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    os.makedirs(a.out, exist_ok=True)
    try:
        if "mods" not in skip:
            guarded("score mods", score_mods)
        if "kernels" not in skip:
            guarded("kernels", lambda: kernels([int(x) for x in a.sizes.split(",")], a.deadline))
        if "e2e" not in skip:
            for family in a.e2e_models.split(","):
                guarded(f"e2e {family}", lambda: e2e(a.e2e_len, family))
    finally:
        t = table()
        with open(os.path.join(a.out, "gpu_methods.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
        print(t, flush=True)


if __name__ == "__main__":
    main()
