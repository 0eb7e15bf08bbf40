"""MonarchAttention (Yaras et al. 2025): softmax attention projected onto Monarch matrices.

Written from the math in DESIGN.md section 6 (no code from the reference implementation).

Notation. s = scale. Keys are split into M blocks of ``bk``: key n = k*bk + i; queries into M
blocks of ``bq``: query n = l*bq + j. The attention matrix is restricted to
``A[(l,j),(k,i)] = L_j[k,l] * R_k[j,i]`` with rows of every ``R_k`` stochastic over i and columns of
every ``L_j`` stochastic over k, and ``<A, S + bias> + H(A)`` (summed over valid query rows) is
maximised by exact block-coordinate ascent starting from ``L_j = I``:

* R-step: ``alpha_kj = sum_l L_j[k,l] q_lj``, ``c_kj = sum_l L_j[k,l]`` (valid query rows only),
  ``R_k[j,:] = softmax_i(s * alpha_kj . k_ki / c_kj + bias_ki)``;
* L-step: ``L_j[:,l] = softmax_k(s * q_lj . sum_i R_k[j,i] k_ki + H(R_k[j,:]) + sum_i R_k[j,i] bias_ki)``;
* output after ``num_steps`` (R, L) pairs: ``y_kj = sum_i R_k[j,i] v_ki``, ``z_lj = sum_k L_j[k,l] y_kj``.

We use the identity ``H(R) + sum_i R_i bias_i = lse_i(x_i + bias_i) - sum_i R_i x_i`` (x = the
unbiased R-logits, ``sum_i R_i x_i = s * alpha . kbar``), which is exact and needs no
``0 * log 0``. Masked keys carry the bias ``MASK_VALUE = -1e30`` instead of -inf inside the
computation: a partly masked block gives its masked keys exactly zero weight (exp underflows to
0), and a key block whose keys are ALL masked gets an L-logit of about -1e30, i.e. exactly zero
weight as well, with every intermediate finite (no NaN in the forward or the backward).

Decisions and deviations (the Triton kernel implements the same; keep them in sync):

1. Block sizes. ``bk = min(block_size or ceil(sqrt(Nk)), Nk)``, ``M = ceil(Nk / bk)``. Self
   attention (Nq == Nk) uses ``bq = bk`` (N' = M*b as in the paper); cross attention (Nq != Nk)
   uses the same M for queries and ``bq = ceil(Nq / M)``. Both exact limits hold for cross
   attention too (block_size=1: M = Nk, R = 1; block_size=Nk: M = 1, L = 1).
2. Rows with ``c_kj = 0`` (a padded query position with L = I, or weights that underflowed) do
   not enter the objective; we define their R row as ``softmax_i(bias_ki)`` (alpha = 0 exactly
   there, divided by 1 instead of 0). Such a row still feeds the next L-step, as in the algorithm.
3. Masks: none or key padding (bool True = keep, or additive float, broadcastable to
   [B, H, 1, Nk]); padded keys get bias -inf. ``forward`` also accepts a mask with a query axis
   whose rows are all equal (e.g. a materialised HF padding mask) and raises ValueError for a mask
   that truly varies along queries or for ``is_causal`` (``supports`` refuses these sites).
4. A query whose keys are all masked (-inf / False) gets output 0, like torch 2.13's SDPA
   (detected from the mask, since with MASK_VALUE such a row would otherwise be a finite average).
   Additive masks with finite values (e.g. -1e9 or finfo.min) are used as given, like SDPA.
5. fp16 / bf16 inputs are computed in fp32 end to end (CPU has no fast half matmul anyway); the
   output is cast back to the input dtype. float64 stays float64 (oracle tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from .base import Dim, Method, SiteShape
from .masks import as_additive, is_key_padding

__all__ = [
    "MonarchParams", "MonarchMethod", "monarch_forward", "monarch_blocks", "monarch_flops",
    "softmax_lse", "softmax_and_lse", "safe_softmax", "compute_dtype", "key_padding_bias",
]


# --------------------------------------------------------------------------------------------
# small shared helpers (also used by mra.py and topk.py)
# --------------------------------------------------------------------------------------------
def _is_sym(*xs) -> bool:
    return any(isinstance(x, sympy.Basic) for x in xs)


def ceil_div(a: Dim, b: Dim) -> Dim:
    """ceil(a / b) for ints or sympy expressions."""
    if _is_sym(a, b):
        return sympy.ceiling(sympy.sympify(a) / b)
    return -(-a // b)


def ceil_sqrt(n: Dim) -> Dim:
    """ceil(sqrt(n)) for ints or sympy expressions."""
    if _is_sym(n):
        return sympy.ceiling(sympy.sqrt(n))
    r = math.isqrt(n)
    return r if r * r == n else r + 1


def sym_min(a: Dim, b: Dim) -> Dim:
    """min(a, b) for ints or sympy expressions."""
    if _is_sym(a, b):
        return sympy.Min(a, b)
    return min(a, b)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_lse(logits: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and log-sum-exp along ``dim`` that are safe for rows of all -inf.

    Such rows get probabilities 0 and lse -inf, with finite (zero) gradients. The stabilising
    max is detached: the result does not depend on it, so the gradient stays exact.
    """
    m = logits.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    s = e.sum(dim, keepdim=True)
    alive = s > 0
    s1 = torch.where(alive, s, torch.ones_like(s))
    p = e / s1
    lse = torch.where(alive, torch.log(s1) + m, torch.full_like(s, float("-inf")))
    return p, lse.squeeze(dim)


class _SoftmaxLse(torch.autograd.Function):
    """``(softmax(x), logsumexp(x))`` over the last dim of a finite ``x``, sharing one exp pass
    (in-place inside the forward); the backward is the usual one (d lse / dx = softmax)."""

    @staticmethod
    def forward(ctx, x):
        m = x.amax(-1, keepdim=True)
        p = torch.sub(x, m)
        p.exp_()
        s = p.sum(-1, keepdim=True)
        p.div_(s)
        ctx.save_for_backward(p)
        return p, (m + torch.log(s)).squeeze(-1)

    @staticmethod
    def backward(ctx, gp, glse):
        (p,) = ctx.saved_tensors
        g = gp if gp is not None else torch.zeros_like(p)
        inner = (g * p).sum(-1, keepdim=True)
        if glse is not None:
            inner = inner - glse.unsqueeze(-1)
        return p * (g - inner)


def softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and log-sum-exp over the last dim of a tensor with finite entries (see MASK_VALUE)."""
    return _SoftmaxLse.apply(x)


def safe_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``; a row of all -inf gives zeros (SDPA's fully-masked-row behaviour)."""
    return softmax_lse(logits, dim)[0]


def key_padding_bias(attn_mask: Optional[torch.Tensor], nk: int, nk_pad: int, dtype: torch.dtype,
                     device: torch.device, what: str, clamp: Optional[float] = None) -> Optional[torch.Tensor]:
    """A key-padding mask as an additive bias ``[Bm, Hm, nk_pad]`` (Bm in {1, B}, Hm in {1, H}).

    Bool masks become 0 / -inf; float masks are used as they are (cast to ``dtype``), clamped from
    below at ``clamp`` when given. Keys beyond ``nk`` (block padding) get -inf (never clamped, so
    they stay below every real key). Returns None when there is neither a mask nor padding. A mask
    with a query axis is accepted when all its rows are equal; otherwise ValueError naming ``what``.
    """
    bias = None
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if not is_key_padding(m):
            if not bool((m == m[..., :1, :]).all()):
                raise ValueError(
                    f"{what} supports only key-padding masks (broadcastable to [B, H, 1, Nk]); got a "
                    f"mask of shape {tuple(attn_mask.shape)} that varies along queries. Use method "
                    f"'topk' or 'exact' for general masks."
                )
        m = m[..., 0, :]
        m = m.expand(m.shape[0], m.shape[1], nk)
        bias = as_additive(m, dtype)
        if clamp is not None:
            bias = bias.clamp_min(clamp)
    if nk_pad > nk:
        if bias is None:
            bias = torch.zeros(1, 1, nk, dtype=dtype, device=device)
        bias = F.pad(bias, (0, nk_pad - nk), value=float("-inf"))
    return bias


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    h, hk = q.shape[1], k.shape[1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    return h // hk


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MonarchParams:
    """``block_size``: keys per block (None = ceil(sqrt(Nk))); ``num_steps``: (R, L) step pairs."""

    block_size: Optional[int] = None
    num_steps: int = 1


def monarch_blocks(nq: int, nk: int, block_size: Optional[int]) -> tuple[int, int, int]:
    """``(M, bq, bk)``: number of blocks, query block size, key block size (see module docstring)."""
    bk = block_size if block_size is not None else ceil_sqrt(nk)
    bk = max(1, min(bk, nk))
    m = ceil_div(nk, bk)
    bq = bk if nq == nk else ceil_div(nq, m)
    return m, bq, bk


#: additive bias standing in for -inf inside the methods: exp(MASK_VALUE - m) is exactly 0 for any
#: finite row max m, and a row whose entries are all MASK_VALUE stays finite (no NaN, no 0/0)
MASK_VALUE = -1e30

#: target size (elements) of the largest temporary of one group of heads; groups of heads are
#: processed one after the other so temporaries stay small (allocator- and cache-friendly)
GROUP_ELEMS = 1 << 21


def head_groups(n_slices: int, elems_per_slice: int) -> list[tuple[int, int]]:
    """Split ``n_slices`` independent (batch, kv-head) slices into ranges of about GROUP_ELEMS work."""
    per = max(1, GROUP_ELEMS // max(1, elems_per_slice))
    return [(a, min(a + per, n_slices)) for a in range(0, n_slices, per)]


def finite_bias(bias: torch.Tensor) -> torch.Tensor:
    """Replace -inf (and anything below) by MASK_VALUE so every softmax row stays finite."""
    return bias.clamp_min(MASK_VALUE)


def dead_rows(attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """For a key-padding mask: bool [Bm, Hm, 1, 1], True where every key is masked (False / -inf),
    i.e. where SDPA returns 0; None when there is no such row."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m[..., :1, :]
    keep = m if m.dtype == torch.bool else m > float("-inf")
    dead = ~keep.any(-1, keepdim=True)
    return dead if bool(dead.any()) else None


def _flat_heads(t: Optional[torch.Tensor], B: int, Hk: int, G: int, H: int) -> Optional[torch.Tensor]:
    """[Bm, Hm, ...] (Hm in {1, H}) -> [B*Hk, G|1, ...] (copies only this small tensor)."""
    if t is None:
        return None
    rest = t.shape[2:]
    if t.shape[1] == H and H > 1:
        return t.expand(B, H, *rest).reshape(B * Hk, G, *rest)
    return t.expand(B, Hk, *rest).reshape(B * Hk, 1, *rest)


def _monarch_core(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  qvalid: Optional[torch.Tensor], steps: int) -> torch.Tensor:
    """One group of heads. qs [n,G,M,bq,D] (scaled, padded rows 0), k [n,1,M,bk,D], v [n,1,M,bk,Dv],
    bias [n,G|1,M,1,bk] finite or None, qvalid [bq,M,1] 0/1 or None -> z [n,G,M,bq,Dv] (a view)."""
    n, G, M, bq, D = qs.shape
    kT = k.transpose(-1, -2)                                               # [.., k, D, i]
    # q in L-step layout with a column of ones: [.., j, l, D+1]. The ones column turns the
    # L-step's additive term into part of the matmul, and gives c = sum_l L_j[k,l] in the R-step.
    qTa = torch.cat([qs.transpose(-3, -2), qs.new_ones(n, G, bq, M, 1)], dim=-1)
    Lt = None  # Lt[.., j, l, k] = L_j[k, l]; None means L_j = I
    R = None
    for _ in range(steps):
        # ---- R-step: a = s * alpha^R / c (for L = I: a = s*q; padded rows 0 -> R = softmax(bias))
        if Lt is None:
            a = qs                                                         # [.., k, j, D]
        else:
            Lv = Lt if qvalid is None else Lt * qvalid                     # drop padded query rows
            alpha = Lv.transpose(-1, -2) @ qTa                             # [.., j, k, D+1]
            c = alpha[..., D:]                                             # sum_l L_j[k,l] (valid l)
            c = torch.where(c > 0, c, torch.ones_like(c))                  # c = 0 -> alpha = 0
            a = (alpha[..., :D] / c).transpose(-3, -2)                     # [.., k, j, D]
        logits = a @ kT                                                    # x: [.., k, j, i]
        if bias is not None:
            logits.add_(bias)                                              # x + bias (matmul keeps no output)
        R, lse = softmax_and_lse(logits)                                   # [.., k, j, i], [.., k, j]
        # ---- L-step: logits s q_lj . kbar_jk + H(R_k[j,:]) + <R_k[j,:], bias_k>
        kbar = R @ k                                                       # sum_i R_k[j,i] k_ki
        ent_bias = lse - torch.linalg.vecdot(a, kbar)                      # H(R) + <R, bias> = lse - <R, x>
        kba = kbar.new_empty(n, G, bq, M, D + 1)                           # [.., j, k, D+1], one pass
        kba[..., :D] = kbar.transpose(-3, -2)
        kba[..., D] = ent_bias.transpose(-1, -2)
        Lt = torch.softmax(qTa @ kba.transpose(-1, -2), dim=-1)            # [.., j, l, k]
    y = R @ v                                                              # [.., k, j, Dv]
    return (Lt @ y.transpose(-3, -2)).transpose(-3, -2)                    # [.., l, j, Dv]


def monarch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    scale: float, params: MonarchParams) -> torch.Tensor:
    """MonarchAttention on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv].

    Block-batched: every step is a handful of batched matmuls and fused softmaxes on
    [n, G, M, b, *] views (G = H/Hk query heads per kv head, broadcast against k/v). Groups of
    (batch, kv-head) slices run one after another only to keep temporaries small.
    """
    what = "monarch attention"
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = _check_heads(q, k)
    cdt = compute_dtype(q.dtype)
    M, bq, bk = monarch_blocks(Nq, Nk, params.block_size)
    nqp, nkp = M * bq, M * bk

    # [B*Hk, G|1, N, *] views; padding, scaling and dtype casts happen per group of heads
    q4 = q.reshape(B * Hk, G, Nq, D)
    k4 = k.reshape(B * Hk, 1, Nk, D)
    v4 = v.reshape(B * Hk, 1, Nk, Dv)
    # masked keys: MASK_VALUE (finite); block padding: -inf (every block has a real key, so no
    # softmax row is all -inf)
    bias = key_padding_bias(attn_mask, Nk, nkp, cdt, q.device, what, clamp=MASK_VALUE)
    if bias is not None:
        bias = _flat_heads(bias, B, Hk, G, H)
        bias = bias.reshape(bias.shape[0], bias.shape[1], M, 1, bk)
    qvalid = None
    if nqp > Nq:
        qvalid = (torch.arange(nqp, device=q.device) < Nq).to(cdt).view(M, bq).transpose(0, 1).unsqueeze(-1)

    per_slice = G * nqp * max(bk, M, D, Dv)
    groups = head_groups(B * Hk, per_slice)
    z = None
    for a, b in groups:
        n = b - a
        qs = _pad_rows(q4[a:b].to(cdt) * scale, nqp).view(n, G, M, bq, D)
        kg = _pad_rows(k4[a:b].to(cdt), nkp).view(n, 1, M, bk, D)
        vg = _pad_rows(v4[a:b].to(cdt), nkp).view(n, 1, M, bk, Dv)
        zg = _monarch_core(qs, kg, vg, None if bias is None else bias[a:b], qvalid, params.num_steps)
        if len(groups) == 1:
            z = zg.contiguous()                                           # [n, G, l, j, Dv]
        else:
            if z is None:
                z = zg.new_empty(B * Hk, G, M, bq, Dv)
            z[a:b] = zg
    out = z.reshape(B, H, nqp, Dv)
    if nqp > Nq:
        out = out[:, :, :Nq]
    dead = dead_rows(attn_mask)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out.to(q.dtype)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad dim -2 of ``t`` to length ``n`` (contiguous; no copy when already so)."""
    if t.shape[-2] == n:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(*t.shape[:-2], n - t.shape[-2], t.shape[-1])], dim=-2)


def monarch_flops(site: SiteShape, params: MonarchParams) -> Dim:
    """FLOPs (2 x MACs) of ``monarch_forward``: per head Nq'[(T-1)2(bk+M)d + 2 bk d + bk dv + M d + M dv]."""
    nq, nk, d, dv, T = site.q_len, site.kv_len, site.head_dim, site.v_head_dim, params.num_steps
    bk = params.block_size if params.block_size is not None else ceil_sqrt(nk)
    bk = sym_min(bk, nk)
    m = ceil_div(nk, bk)
    if _is_sym(nq, nk):
        bq = bk if sympy.simplify(sympy.sympify(nq) - nk) == 0 else ceil_div(nq, m)
    else:
        bq = bk if nq == nk else ceil_div(nq, m)
    nqp = m * bq
    macs = nqp * ((T - 1) * 2 * (bk + m) * d + 2 * bk * d + bk * dv + m * d + m * dv)
    return 2 * site.batch * site.num_heads * macs


class MonarchMethod(Method):
    """MonarchAttention: alternating exact (R, L) steps of entropy-regularised softmax on Monarch matrices."""

    name = "monarch"
    Params = MonarchParams
    description = "MonarchAttention (Yaras et al. 2025): softmax projected onto Monarch matrices"

    def validate(self, params: MonarchParams, *, where: str) -> None:
        if params.block_size is not None and params.block_size < 1:
            raise ValueError(
                f"{where}.block_size must be None (about sqrt(N)) or an int >= 1; got {params.block_size!r}"
            )
        self.require_at_least(params, where=where, num_steps=1)

    def supports(self, site: SiteShape, params: MonarchParams) -> Optional[str]:
        if site.causal:
            return "monarch has no causal form (is_causal / causal mask); use 'mra' or 'topk' for causal attention"
        if site.general_mask:
            return "monarch supports only key-padding masks, not a general [Q, K] mask; use 'topk' for general masks"
        return None

    def forward(self, q, k, v, attn_mask, scale, is_causal, params):
        if is_causal:
            raise ValueError("monarch attention has no causal form; use method 'mra', 'topk' or 'exact'")
        return monarch_forward(q, k, v, attn_mask, scale, params)

    def flops(self, site: SiteShape, params: MonarchParams) -> Dim:
        return monarch_flops(site, params)
