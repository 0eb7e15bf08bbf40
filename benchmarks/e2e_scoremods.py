#!/usr/bin/env python
"""Whole models whose attention modifies its scores, timed as a user feels them.

No checkpoint of these families ships in a PyPI package, so the models are built from configs at
SmolLM2-135M's width (hidden 576, 9 query / 3 key-value heads of 64, MLP 1536, 8 layers, a 2K
vocabulary) with random weights, in float32 on the CPU:

* ``Gemma-2 shaped``: soft-capping 50 on every layer's scores, a 512-token sliding window on every
  other layer (the family's eager attention: SDPA has no soft-capping);
* ``BLOOM shaped``: ALiBi through ``baddbmm`` (9 heads, no grouped k/v: BLOOM's layout).

Variants interleaved in one process (medians over rounds, compilation excluded and reported
apart, ``e2e._interleave``): uncompiled, default ``torch.compile``, structattn with every site
exact, structattn MRA (block 32, r = 1/8 of the key blocks at 4K, first block kept as a sink).
Quality beside each time: the relative error of the last hidden state against the uncompiled
model on the timed input (random weights spread attention widely, a hard case for any
approximation). Writes benchmarks/out/e2e_scoremods.csv; prints a markdown table.

    python benchmarks/e2e_scoremods.py --lengths 2048 --rounds 3
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from e2e import OUT, _interleave, machine  # noqa: E402

import structattn  # noqa: E402
import transformers  # noqa: E402

WIDTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_hidden_layers=8, vocab_size=2048)


def gemma2_shaped(length: int):
    """A Gemma-2 layout at SmolLM2-135M's width (random weights)."""
    return transformers.Gemma2Model(transformers.Gemma2Config(
        **WIDTH, num_key_value_heads=3, head_dim=64, max_position_embeddings=length, sliding_window=512,
        attn_logit_softcapping=50.0, final_logit_softcapping=None, attn_implementation="eager"))


def bloom_shaped(length: int):
    """A BLOOM layout (ALiBi) at SmolLM2-135M's width (random weights)."""
    return transformers.BloomModel(transformers.BloomConfig(
        n_layer=WIDTH["num_hidden_layers"], hidden_size=WIDTH["hidden_size"], n_head=WIDTH["num_attention_heads"],
        vocab_size=WIDTH["vocab_size"], attn_implementation="eager"))


MODELS = {"Gemma-2 shaped": gemma2_shaped, "BLOOM shaped": bloom_shaped}


def mra_options(length: int) -> dict:
    """MRA on every site: blocks of 32, an eighth of the key blocks exact, the first kept."""
    return {"method": "mra", "mra": {"block_size": 32, "blocks_per_row": max(2, length // 32 // 8), "sink_blocks": 1},
            "exact_when_cheaper": False}


def run(lengths: list[int], rounds: int, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        for length in lengths:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = MODELS[name](length).eval()
            ids = torch.randint(0, WIDTH["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = model(input_ids=ids).last_hidden_state
            approx = mra_options(length)
            variants = {
                "uncompiled": model,
                "inductor": torch.compile(model),
                "structattn exact": torch.compile(model, backend="structattn", options={"method": "exact"}),
                f"structattn mra b=32 r={approx['mra']['blocks_per_row']} sink=1":
                    torch.compile(model, backend="structattn", options=approx),
            }

            def quality(m):
                out = m(input_ids=ids).last_hidden_state
                return {"rel_err": round(float((out - ref).norm() / ref.norm()), 4)}

            new = _interleave(name, length, variants, rounds, lambda m: m(input_ids=ids), quality)
            report = structattn.explain(model, input_ids=ids[:, :256], options=approx)
            served = sum(s.method == "mra" for s in report.sites)
            print(f"  MRA serves {served} of {len(report.sites)} sites; terms: "
                  f"{sorted({s.terms for s in report.sites})}; reasons: {sorted({s.reason for s in report.sites if s.reason})}")
            for r in new:
                r["sites"] = f"{served}/{len(report.sites)} mra" if "mra" in r["variant"] else ""
            rows += new
            torch._dynamo.reset()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    rows = run(args.lengths, args.rounds, args.models)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "e2e_scoremods.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    print("\n| model | length | variant | seconds | vs best baseline | output rel. error | sites |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['length']} | {r['variant']} | {r['seconds']} | {r['speedup_vs_best_baseline']}x "
              f"| {r['rel_err']} | {r['sites']} |")


if __name__ == "__main__":
    main()
