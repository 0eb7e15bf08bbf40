"""Feature maps x distillation losses of ``structattn.fit_linear``, compared per layer.

For each layer, every (feature map, loss) pair trains for the same number of steps from the same
seed on the calibration samples, and is scored by the relative output error
``||Y_lin - Y||_F / ||Y||_F`` on held-out rows (``fit.py``: the last captured call). Prints one
row per layer and the mean per variant, and writes benchmarks/out/linear_compare_<model>.csv.

    python benchmarks/linear_compare.py --model minilm --length 256
    python benchmarks/linear_compare.py --model smollm2 --length 1024 --layers 0 10 20 29
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import data  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)
import torch  # noqa: E402

import structattn  # noqa: E402

OUT = HERE / "out"


def samples_for(model_name: str, length: int, tok) -> list:
    """Calibration samples: the last 32 Lee stories (MiniLM, 2 batches of 16) or 4 windows of
    ``length`` tokens from token 16K on (SmolLM2), as in quality.py."""
    if model_name == "minilm":
        return data.minilm_batches(tok, data.lee_background()[-32:], length, batch_size=16)
    stream = data.lee_token_stream(tok)
    start = 16384 // length
    return [{"input_ids": w[None]} for w in data.lm_windows(stream, length, start + 4)[start:]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="*", help="layer indices (default: all)")
    p.add_argument("--steps", type=int, default=200, help="steps of EACH variant")
    p.add_argument("--local-window", type=int, default=0)
    p.add_argument("--sink-tokens", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = data.load_minilm() if args.model == "minilm" else data.load_smollm2()
    samples = samples_for(args.model, args.length, tok)
    layers = None
    if args.layers is not None:
        prefix = "encoder.layer" if args.model == "minilm" else "model.layers"
        layers = [f"{prefix}.{i}.*" for i in args.layers]
    rows = []
    for kind in structattn.methods.linear.KINDS:
        for loss in ("ce", "mse"):
            t = time.time()
            fit = structattn.fit_linear(model, samples, layers=layers, feature_map=kind, loss=loss,
                                        steps=args.steps, local_window=args.local_window,
                                        sink_tokens=args.sink_tokens, seed=0, progress=False, verbose=False)
            secs = time.time() - t
            for f in fit.fits:
                held_out = f.trials[0][2] if f.trials else float("nan")
                rows.append({"layer": f.layer, "feature_map": kind, "loss": loss, "held_out_error": held_out,
                             "error_all_calls": round(f.error, 5), "seconds": round(f.seconds, 1)})
            mean = sum(r["error_all_calls"] for r in rows[-len(fit.fits):]) / max(1, len(fit.fits))
            print(f"{kind:9s} {loss:4s} mean rel. error {mean:.4f}  ({len(fit.fits)} layers, {secs:.0f} s)",
                  flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"linear_compare_{args.model}_{args.length}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
