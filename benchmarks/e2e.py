"""Whole-model timings as a user feels them (``make bench-e2e``).

For each model and length, the variants run interleaved in one process (one call of each per
round, medians over rounds), each after its own warm-up (compilation excluded, reported apart):

* ``uncompiled``: the Hugging Face model as loaded (SDPA attention);
* ``inductor``: ``torch.compile(model)`` with the default backend;
* ``structattn exact``: ``backend="structattn"``, every site exact (what the pass and the exact op
  cost on their own);
* ``structattn <config>``: the approximation (a calibrated or fixed per-layer configuration).

Beside each time, the quality: SmolLM2's perplexity on the timed windows and held-out ones,
MiniLM's embedding cosine to the uncompiled model. A ``generate()`` row times a 4K prompt plus 64
greedy tokens (prefill approximated, decode exact). Writes ``benchmarks/out/e2e.csv`` and
``docs/e2e.png``; prints a markdown table for the README.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

import structattn  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def machine() -> str:
    """One line naming the machine, torch and the date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def smollm2_options(window: int) -> dict:
    """The approximation timed for SmolLM2: MRA with an attention-sink block on every layer, its
    budget r growing like sqrt(N) (r * b / N: 25% at 2K, 12.5% at 8K)."""
    r = {2048: 16, 4096: 16, 8192: 32, 16384: 32}.get(window, max(8, int(math.sqrt(window) / 4)))
    return {"method": "mra", "mra": {"block_size": 32, "blocks_per_row": r, "sink_blocks": 1}}


def calibrated_options(model, stream, window: int, budget: float = 0.04) -> dict:
    """``structattn.calibrate`` on two windows taken from the END of the stream (never timed or
    evaluated): the cheapest per-layer configuration whose perplexity increase on them is <= budget."""
    calib = stream[-2 * window:].view(2, window)
    samples = [{"input_ids": w[None]} for w in calib]

    def nll(out, sample):
        return F.cross_entropy(out.logits[0, :-1].float(), sample["input_ids"][0, 1:], reduction="none")

    def ppl_increase(approx, exact, samples):
        return float(torch.exp(torch.cat(approx).double().mean() - torch.cat(exact).double().mean()) - 1)

    t0 = time.perf_counter()
    options = structattn.calibrate(model, samples, budget={"metric": budget}, methods=["mra"], output_fn=nll,
                                   metric_fn=ppl_increase, max_kv_heads=1 if window > 2048 else None,
                                   progress=False)
    print(f"  calibrate at {window}: {time.perf_counter() - t0:.0f} s", flush=True)
    return dict(options)


def run_smollm2(windows: list[int], rounds: int, calibrated: dict, calibrate_up_to: int = 0) -> list[dict]:
    model, tok = data.load_smollm2()
    stream = data.lee_token_stream(tok)
    rows = []
    for window in windows:
        count = max(1, min(4, stream.numel() // window - 3))
        wins = data.lm_windows(stream, window, count + 1)
        timed_w, held = wins[:1], wins[1:]
        approx = calibrated.get(str(window))
        if approx is None and window <= calibrate_up_to:
            approx = calibrated_options(model, stream, window)
            calibrated[str(window)] = approx
        approx = approx or smollm2_options(window)
        variants = {
            "uncompiled": model,
            "inductor": torch.compile(model),
            "structattn exact": torch.compile(model, backend="structattn", options={"method": "exact"}),
            f"structattn {_label(approx)}": torch.compile(model, backend="structattn", options=approx),
        }
        rows += _interleave("SmolLM2-135M", window, variants, rounds, lambda m: m(input_ids=timed_w),
                            lambda m: _perplexity(m, torch.cat([timed_w, held])))
        torch._dynamo.reset()
    return rows


def run_minilm(rounds: int, length: int = 512) -> list[dict]:
    model, tok = data.load_minilm()
    batch = data.minilm_batches(tok, data.lee_background(16), length, batch_size=16)[0]
    with torch.no_grad():
        ref = data.embed(model, batch)
    approx = {"method": "monarch", "layers": {"encoder.layer.0.*": "exact", "encoder.layer.1.*": "exact"},
              "monarch": {"num_steps": 2}}
    variants = {
        "uncompiled": model,
        "inductor": torch.compile(model),
        "structattn exact": torch.compile(model, backend="structattn", options={"method": "exact"}),
        f"structattn {_label(approx)}": torch.compile(model, backend="structattn", options=approx),
    }

    def quality(m):
        emb = data.embed(m, batch)
        return {"cosine": round(float(F.cosine_similarity(emb, ref, dim=-1).mean()), 4)}

    return _interleave("all-MiniLM-L6-v2 (batch 16)", length, variants, rounds, lambda m: m(**batch), quality)


def _label(options: dict) -> str:
    method = options.get("method", "monarch")
    p = options.get(method, {})
    layers = " (per-layer)" if options.get("layers") else ""
    return method + " " + ",".join(f"{k}={v}" for k, v in p.items()) + layers


def _perplexity(model, windows: torch.Tensor) -> dict:
    nll = []
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        nll.append(F.cross_entropy(logits, w[1:], reduction="none"))
    return {"ppl": round(math.exp(float(torch.cat(nll).double().mean())), 3)}


def _interleave(model_name, length, variants, rounds, call, quality) -> list[dict]:
    times = {k: [] for k in variants}
    warm = {}
    with torch.no_grad():
        for name, m in variants.items():
            warm[name] = timed(lambda: call(m))          # includes compilation
            print(f"  {model_name} {length}: {name} warm-up {warm[name]:.1f}s", flush=True)
        for _ in range(rounds):
            for name, m in variants.items():
                times[name].append(timed(lambda: call(m)))
        qual = {name: quality(m) for name, m in variants.items()}
    base = min(statistics.median(times["uncompiled"]), statistics.median(times["inductor"]))
    rows = []
    for name in variants:
        med = statistics.median(times[name])
        rows.append({"model": model_name, "length": length, "variant": name, "seconds": round(med, 3),
                     "speedup_vs_best_baseline": round(base / med, 2), "first_call_s": round(warm[name], 1),
                     **qual[name]})
        print(f"  {name:<45} {med:8.3f}s  x{base / med:5.2f}  {qual[name]}", flush=True)
    return rows


def run_generate(rounds: int, prompt: int = 4096, new_tokens: int = 64) -> list[dict]:
    model, tok = data.load_smollm2()
    ids = data.lm_windows(data.lee_token_stream(tok), prompt, 1)
    compiled = data.load_smollm2()[0]
    compiled.forward = torch.compile(compiled.forward, backend="structattn", options=smollm2_options(prompt))
    variants = {"uncompiled": model, f"structattn {_label(smollm2_options(prompt))}": compiled}
    times = {k: [] for k in variants}
    tokens = {}
    with torch.no_grad():
        for name, m in variants.items():
            tokens[name] = m.generate(ids, max_new_tokens=new_tokens, do_sample=False)   # warm-up
        for _ in range(rounds):
            for name, m in variants.items():
                times[name].append(timed(lambda: m.generate(ids, max_new_tokens=new_tokens, do_sample=False)))
    base = statistics.median(times["uncompiled"])
    ref = tokens["uncompiled"][0, prompt:]
    rows = []
    for name in variants:
        med = statistics.median(times[name])
        agree = float((tokens[name][0, prompt:] == ref).double().mean())
        rows.append({"model": "SmolLM2-135M generate", "length": f"{prompt}+{new_tokens}", "variant": name,
                     "seconds": round(med, 3), "speedup_vs_best_baseline": round(base / med, 2),
                     "token_agreement": round(agree, 3)})
        print(f"  generate {name:<40} {med:8.3f}s  x{base / med:5.2f}  tokens agree {agree:.3f}", flush=True)
    return rows


def write(rows: list[dict]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "e2e.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def markdown(rows: list[dict]) -> str:
    lines = ["| model | length | variant | time (s) | vs faster baseline | quality |", "|---|---|---|---|---|---|"]
    for r in rows:
        q = ", ".join(f"{k} {r[k]}" for k in ("ppl", "cosine", "token_agreement") if k in r)
        lines.append(f"| {r['model']} | {r['length']} | {r['variant']} | {r['seconds']} | "
                     f"{r['speedup_vs_best_baseline']}x | {q} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lm = [r for r in rows if r["model"] == "SmolLM2-135M"]
    if not lm:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in dict.fromkeys(r["variant"] for r in lm):
        pts = [(r["length"], r["seconds"]) for r in lm if r["variant"] == variant]
        ax.plot(*zip(*pts), marker="o", label=variant if not variant.startswith("structattn mra") else "structattn MRA")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (prefill)")
    ax.set_ylabel("seconds per forward (median)")
    ax.set_title("SmolLM2-135M prefill, fp32, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(data.ROOT / "docs" / "e2e.png", dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, nargs="*", default=[2048, 4096, 8192, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calibrated", type=Path, help="JSON {window: options} to time instead of the fixed MRA rule")
    p.add_argument("--calibrate-up-to", type=int, default=4096,
                   help="run structattn.calibrate (perplexity <= +4%% on held-out windows) for windows up to this")
    p.add_argument("--skip", nargs="*", default=[], choices=["smollm2", "minilm", "generate"])
    args = p.parse_args(argv)
    print(machine(), flush=True)
    calibrated = json.loads(args.calibrated.read_text()) if args.calibrated else {}
    rows = []
    if "minilm" not in args.skip:
        rows += run_minilm(args.rounds)
    if "smollm2" not in args.skip:
        rows += run_smollm2(args.windows, args.rounds, calibrated, args.calibrate_up_to)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "e2e_options.json").write_text(json.dumps(calibrated, indent=1, default=str))
    if "generate" not in args.skip:
        rows += run_generate(args.rounds)
    print("wrote", write(rows))
    plot(rows)
    print(machine())
    print(markdown(rows))


if __name__ == "__main__":
    main()
