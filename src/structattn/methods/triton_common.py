"""Helpers shared by the methods' Triton modules (``<name>/triton.py``; no torch.fx here).

* ``configs(warps_stages)``: the config list for ``triton.autotune`` (ONE config under
  ``interpreting()``: the interpreter cannot benchmark several); ``launch``: autotuned launches
  with the best config remembered;
* ``NEG_INF`` (the masked logit inside kernels) and ``dot_precision(dtype)``, the constexpr
  ``input_precision`` of every ``tl.dot`` (IEEE fp32 for fp32 inputs, so kernels match torch's
  fp32 matmuls to rounding);
* ``split_head``, ``online_softmax``, ``inverse_or_zero``, ``log_sum``: the jit pieces every
  flash-style loop shares (program index -> batch / heads; one tile of a streaming softmax with
  SDPA's fully masked rows; the final normalisation);
* ``input_reason``: the run-time checks every kernel shares (device, dtype, head size);
* ``key_bias_view``: a key-padding mask as a float32 [B, H, Nk] *view* (broadcast dims get stride 0);
* ``general_mask_view``: any SDPA mask as a [B, H, Nq, Nk] view plus its kind (bool / additive);
* ``empty_output``: SDPA's result for inputs with an empty dimension (no launch);
* ``mods_reason`` / ``score_mod_args`` / ``window_meta``: a site's score modifications as a kernel
  takes them: the generated ``score_mod`` (a ``tl.constexpr`` function, ``scoremod.triton_gen``)
  with its captured-tensor arguments, and the sliding window as two ints plus two constexpr flags;
  ``window_tiles``: the key tiles a row tile can see under ``is_causal`` and the window;
  ``visible``: the causal / window part of a tile's mask; ``score_tile``: one key tile's logits
  (scores, score_mod, mask), shared by the top-k and exact kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..scoremod.triton_gen import KERNEL_DIMS, KERNEL_TENSORS, kernel_args, triton_score_mod
from .base import ScoreMods, empty_result
from .common import MASKED, as_4d, as_additive, interpreting

#: mask kinds passed to kernels as a constexpr
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
#: the masked logit inside kernels
NEG_INF = tl.constexpr(MASKED)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def split_head(bh, H, G):
    """(batch, query head, kv head) of a program's flat ``batch * H + head`` index (G query heads
    per kv head)."""
    h = bh % H
    return bh // H, h, h // G


@triton.jit
def online_softmax(m, lsum, x):
    """One tile ``x`` [rows, cols] of a streaming softmax: returns the new running row max, the
    factor ``alpha`` that rescales what was accumulated so far, the tile's weights ``p`` and the
    new running sum. A row with no finite logit yet keeps max -inf and gets weights 0 (its shift
    is taken as 0, so exp gives 0, not NaN); NaN and +inf propagate."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(x - m_safe[:, None])
    return m_new, alpha, p, lsum * alpha + tl.sum(p, 1)


@triton.jit
def inverse_or_zero(s):
    """``1 / s``, and 0 where ``s == 0`` (a row with no finite logit: output 0); NaN stays NaN."""
    dead = s == 0.0
    return tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, s))


@triton.jit
def log_sum(m, lsum):
    """The row log-sum-exp ``m + log(lsum)`` of a streaming softmax; -inf where ``lsum == 0``."""
    dead = lsum == 0.0
    return tl.where(dead, NEG_INF, m + tl.log(tl.where(dead, 1.0, lsum)))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot``: "ieee" for fp32 inputs, else triton's
    default "tf32" (which only fp32 operands see; fp16 / bf16 products are exact in fp32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def configs(warps_stages: list) -> list:
    """``triton.autotune`` configs, one per ``(num_warps, num_stages)``; under the interpreter only
    the first (it cannot benchmark several)."""
    pairs = warps_stages[:1] if interpreting() else warps_stages
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]


def next_pow2(x: int, lo: int = 16) -> int:
    """The next power of two >= x, at least ``lo`` (tile sizes)."""
    return max(lo, triton.next_power_of_2(int(x)))


def input_reason(q: torch.Tensor, v: torch.Tensor, head_dim_limit: int = 128) -> Optional[str]:
    """Why no kernel can take these inputs (device, dtype, head size), or None."""
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        return f"tensors on {q.device} (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the kernels support float16, bfloat16 and float32, not {q.dtype}"
    if q.shape[-1] > head_dim_limit or v.shape[-1] > head_dim_limit:
        return (f"head_dim {q.shape[-1]} / value head_dim {v.shape[-1]} above the kernels' limit of "
                f"{head_dim_limit}")
    return None


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
    return as_additive(as_4d(attn_mask)[..., 0, :], torch.float32).expand(batch, heads, nk)


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


# --------------------------------------------------------------------------------------------
# score modifications
# --------------------------------------------------------------------------------------------
#: number of trailing score_mod arguments after ``s, b, h, q, k`` (pointer, strides, sizes per tensor)
SCORE_MOD_ARGS = KERNEL_TENSORS * (1 + 2 * KERNEL_DIMS)


def mods_reason(q: torch.Tensor, mods: ScoreMods) -> Optional[str]:
    """Why the kernels cannot apply ``mods`` to these inputs (too many or too wide captured tensors,
    a tensor on another device, an expression the generator cannot emit), or None."""
    if len(mods.tensors) > KERNEL_TENSORS:
        return (f"{len(mods.tensors)} captured score tensors; the kernels pass at most {KERNEL_TENSORS}")
    for i, t in enumerate(mods.tensors):
        if t.device != q.device:
            return f"captured score tensor t{i} is on {t.device}, the inputs on {q.device}"
        if t.dim() > KERNEL_DIMS:
            return f"captured score tensor t{i} has {t.dim()} dims; the kernels index at most {KERNEL_DIMS}"
        if t.is_complex():
            return f"captured score tensor t{i} is {t.dtype}; the kernels read real and integer tensors"
    try:
        triton_score_mod(mods.text)
    except ValueError as exc:
        return f"the score modification cannot be generated: {exc}"
    return None


def score_mod_args(mods: ScoreMods, like: torch.Tensor) -> tuple:
    """``(SCORE_MOD, args)``: the generated ``score_mod`` for ``mods.text`` and its
    ``SCORE_MOD_ARGS`` trailing arguments. Without an expression: the identity and ``None`` for
    every argument (constexprs: the compiled kernel is the one without modifications)."""
    if not mods.text:
        return triton_score_mod(""), [None] * SCORE_MOD_ARGS
    return triton_score_mod(mods.text), kernel_args(list(mods.tensors), like)


def window_meta(mods: ScoreMods) -> dict:
    """The window as kernel arguments: ``WL`` / ``WR`` (-1 unbounded) and the constexpr flags
    ``HAS_WL`` / ``HAS_WR`` (False compiles the bound out)."""
    return dict(WL=int(mods.window_left), WR=int(mods.window_right),
                HAS_WL=mods.window_left >= 0, HAS_WR=mods.window_right >= 0)


@triton.jit
def window_tiles(row0, rows, NK, WL, WR, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                 BN: tl.constexpr):
    """``(lo, hi)``: the keys ``[lo, hi)`` that query rows ``row0 .. row0 + rows - 1`` can see under
    ``is_causal`` (top-left) and the window; ``lo`` rounded down to a multiple of BN (tiles stay
    aligned). ``hi <= lo`` when no key is visible."""
    hi = NK
    if CAUSAL:
        hi = tl.minimum(hi, row0 + rows)
    if HAS_WR:
        hi = tl.minimum(hi, row0 + rows + WR)
    lo = 0
    if HAS_WL:
        lo = tl.maximum(row0 - WL, 0) // BN * BN
    return lo, hi


@triton.jit
def visible(ok, rm, rn, WL, WR, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """``ok`` [rows, cols] narrowed to the entries that ``is_causal`` and the window leave visible
    (query ``rm[i]``, key ``rn[j]``)."""
    if CAUSAL:
        ok = ok & (rn[None, :] <= rm[:, None])
    if HAS_WL:
        ok = ok & (rn[None, :] >= rm[:, None] - WL)
    if HAS_WR:
        ok = ok & (rn[None, :] <= rm[:, None] + WR)
    return ok


@triton.jit
def score_tile(q, k_base, m_base, b, h, rm, m_ok, n0, skn, skd, smq, smk, NK, D, scale, WL, WR,
               SCORE_MOD: tl.constexpr,
               T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
               T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
               T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
               T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3,
               DP: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
               HAS_WR: tl.constexpr, DOT: tl.constexpr, BN: tl.constexpr):
    """The logits of one key tile: scaled scores, the generated score_mod (query head ``h``, index
    vectors ``rm`` / ``rn``), the mask, then causal / window / padding entries set to -inf."""
    rn = n0 + tl.arange(0, BN)
    rd = tl.arange(0, DP)
    n_ok = rn < NK
    kt = tl.load(k_base + rn[:, None] * skn + rd[None, :] * skd, mask=n_ok[:, None] & (rd < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=DOT) * scale
    s = SCORE_MOD(s, b, h, rm[:, None], rn[None, :],
                  T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
                  T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
                  T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
                  T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3).to(tl.float32)
    ok = visible(m_ok[:, None] & n_ok[None, :], rm, rn, WL, WR, CAUSAL, HAS_WL, HAS_WR)
    if MASK_KIND == 1:
        keep = tl.load(m_base + rm[:, None] * smq + rn[None, :] * smk, mask=ok, other=0)
        ok = ok & (keep != 0)
    if MASK_KIND == 2:
        s = s + tl.load(m_base + rm[:, None] * smq + rn[None, :] * smk, mask=ok, other=0.0).to(tl.float32)
    s = tl.where(ok, s, NEG_INF)
    return s, rn, n_ok
