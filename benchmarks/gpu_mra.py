"""MRA-2 on the GPU with the Triton pooling/selection (methods/mra/triton.py): check and time.

    PYTHONPATH=src python3 benchmarks/gpu_mra.py

1. selection: Triton vs the torch path's ``mra_select`` (same selected block sets, pooled logits);
2. full MRA-2 forward vs the plain-torch reference (bf16 inputs, fp32 math) and vs exact SDPA;
3. ``do_bench`` medians, bf16, 1 x 12 heads, d = 64, per call from Python and CUDA-graph replay,
   against ``F.scaled_dot_product_attention`` (flash), for both selection paths.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from structattn.methods import get_method  # noqa: E402
from structattn.methods.mra import MraParams, mra_select  # noqa: E402
from structattn.methods.mra import triton as K  # noqa: E402
from gpu import bench, graph_bench, rel  # noqa: E402  (benchmarks/gpu.py)


def main():
    dev = "cuda"
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    p = MraParams()
    rows = []
    for n in (256, 1024, 4096, 16384, 65536):
        q, k, v = (torch.randn(1, 12, n, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        s = 64 ** -0.5
        causal = n == 4096
        got, ref = K.select(q, k, None, s, causal, p), mra_select(q, k, None, s, causal, p)
        a = torch.where(got.block_valid, got.block_idx, -1).sort(-1).values
        b = torch.where(ref.block_valid, ref.block_idx, -1).sort(-1).values
        same_rows = (a == b).all(-1).float().mean().item()
        K.SELECT_IMPL = "triton"
        out = K.forward(q, k, v, None, s, causal, p)
        if n <= 16384:
            r_ref = get_method("mra").forward(q, k, v, None, s, causal, p)
            err_ref = rel(out, r_ref)
        else:
            err_ref = float("nan")
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        err_exact = rel(out, exact)
        bad = bool(torch.isnan(out).any())
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        g_sdpa = graph_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        t = {}
        for impl in ("triton", "eager"):
            K.SELECT_IMPL = impl
            t[impl] = bench(lambda: K.forward(q, k, v, None, s, causal, p))
        K.SELECT_IMPL = "triton"
        g_tri = graph_bench(lambda: K.forward(q, k, v, None, s, causal, p))
        rows.append((n, causal, same_rows, err_ref, err_exact, bad, t_sdpa, t["triton"], t["eager"], g_sdpa, g_tri))
        print(rows[-1], flush=True)
    print("\n| N | causal | rows with identical selection | rel err vs reference | rel err vs exact | NaN | SDPA per call ms | MRA-2 per call ms (Triton select) | speed-up | MRA-2 per call (torch select) | SDPA graph ms | MRA-2 graph ms | graph speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, c, same, er, ee, bad, ts, tt, te, gs, gt in rows:
        print(f"| {n} | {c} | {same:.4f} | {er:.2e} | {ee:.3f} | {bad} | {ts:.4f} | {tt:.4f} | {ts / tt:.2f}x | {te:.4f} | {gs:.4f} | {gt:.4f} | {gs / gt:.2f}x |")


if __name__ == "__main__":
    main()
