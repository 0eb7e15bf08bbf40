"""Helpers shared by the Triton kernels (no torch.fx, no methods/ imports beyond masks).

* ``interpreting()``: whether TRITON_INTERPRET=1 runs kernels on the CPU (then every kernel is
  built with ONE autotune config: the interpreter cannot benchmark several);
* ``configs(gpu, cpu)``: the config list for ``triton.autotune``;
* ``key_bias_view``: a key-padding mask as a float32 [B, H, Nk] *view* (broadcast dims get stride 0);
* ``general_mask_view``: any SDPA mask as a [B, H, Nq, Nk] view plus its kind (bool / additive);
* ``empty_output``: SDPA's result for inputs with an empty dimension (no launch);
* small integer helpers.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from ..methods.base import empty_result
from ..methods.masks import as_4d

#: mask kinds passed to kernels as a constexpr
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu: list, cpu: Optional[list] = None) -> list:
    """``gpu`` on a real device; under the interpreter the single ``cpu`` config (or gpu[0])."""
    if interpreting():
        return [cpu[0] if cpu else gpu[0]]
    return gpu


def next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def dtype_reason(q: torch.Tensor) -> Optional[str]:
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the kernels support float16, bfloat16 and float32, not {q.dtype}"
    return None


def head_dim_reason(q: torch.Tensor, v: torch.Tensor, limit: int = 128) -> Optional[str]:
    if q.shape[-1] > limit or v.shape[-1] > limit:
        return f"head_dim {q.shape[-1]} / value head_dim {v.shape[-1]} above the kernels' limit of {limit}"
    return None


def device_reason(q: torch.Tensor) -> Optional[str]:
    if q.is_cuda or (q.device.type == "cpu" and interpreting()):
        return None
    return f"tensors on {q.device} (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"


def strides4(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """When a dimension is empty (batch, heads, Nq, Nk or Dv = 0): SDPA's result (empty, or zeros
    for Nk = 0), written into ``out`` when given; otherwise None (the kernel has work to do)."""
    res = empty_result(q, k, v)
    if res is None:
        return None
    if out is None:
        return res
    return out.copy_(res)


def key_bias_view(attn_mask: Optional[torch.Tensor], batch: int, heads: int, nk: int) -> Optional[torch.Tensor]:
    """A key-padding mask (query axis of size 1) as an additive float32 ``[B, H, Nk]`` view.

    Bool masks become 0 / -inf. Only the (small) un-broadcast mask is converted; the result is an
    ``expand`` of it, so broadcast batch/head dims have stride 0 and nothing of size B*H*Nk is copied.
    """
    if attn_mask is None:
        return None
    m = as_4d(attn_mask)[..., 0, :]  # [b?, h?, Nk?]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    else:
        m = m.to(torch.float32)
    return m.expand(batch, heads, nk)


def general_mask_view(attn_mask: Optional[torch.Tensor], batch: int, heads: int, nq: int, nk: int):
    """(view [B, H, Nq, Nk] with broadcast strides 0, kind). Bool masks are viewed as uint8."""
    if attn_mask is None:
        return None, MASK_NONE
    m = as_4d(attn_mask)
    if m.dtype == torch.bool:
        kind = MASK_BOOL
        m = m.view(torch.uint8)
    else:
        kind = MASK_ADD
    return m.expand(batch, heads, nq, nk), kind


_BEST: dict = {}


def launch(kernel, grid, tune_key: tuple, *args, **meta):
    """Launch an autotuned kernel with fewer Python steps per call.

    The first call for ``tune_key`` (the caller's own tuple of everything the autotune key and the
    constexprs depend on) goes through ``triton.autotune``; its ``best_config`` is remembered and
    later calls launch the underlying JITFunction with that config directly, which skips the
    Autotuner's per-call key building (measurable at small N, where launches are CPU-bound).
    Under the interpreter (one config) the autotuner is always used.
    """
    if interpreting():
        return kernel[grid](*args, **meta)
    k = (id(kernel), tune_key)
    cfg = _BEST.get(k)
    if cfg is None:
        out = kernel[grid](*args, **meta)
        best = getattr(kernel, "best_config", None)
        if best is not None and not best.kwargs and getattr(best, "pre_hook", None) is None:
            _BEST[k] = best
        return out
    return kernel.fn[grid](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
