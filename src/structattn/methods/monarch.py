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
``0 * log 0``. Biases are used as they are: -inf for masked keys and block padding (exp gives
exactly 0), finite values however negative (-1e4, ``finfo.min``) as biases. A softmax row with no
finite logit gives 0 with log-sum-exp -inf (``softmax.softmax_and_lse``): a key block whose keys
are ALL masked gets R = 0 and an L-logit of -inf, i.e. exactly zero weight, and a query whose keys
are all masked gets L = 0, output 0. The L-logits are ``q . kbar`` plus the separate broadcast
term ``H(R) + <R, bias>`` (or, for finite inputs, with -inf blocks masked after the matmul), so
a -inf never enters a matmul (its backward would form 0 * inf).

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
4. A query whose keys are all masked (-inf / False) gets output 0, like torch 2.13's SDPA. A row
   whose keys all carry the same finite bias (-1e4, ``finfo.min``) is an ordinary softmax row, as
   in SDPA (s + finfo.min rounds to finfo.min: the uniform average of v).
5. A softmax over one element is 1, whatever its logit: with one key per block (``bk = 1``)
   R = 1, kbar = k and H(R) + <R, bias> = bias exactly; with one block (M = 1) L = 1. Both exact
   limits are therefore exact also with +-inf / NaN in q, k or v: a non-finite value poisons the
   output rows it poisons in SDPA (its own query row; the rows whose logit with a poisoned key is
   +inf or NaN; every row's value column for a poisoned value) and no other. In between (1 < bk <
   Nk), R and L mix rows and blocks, so a non-finite value spreads further: a poisoned query row
   (block l, position j) poisons its R row, which every query at position j reads in the L-step,
   so all of them turn NaN; a poisoned key poisons the R rows of its block that see a +inf / NaN
   logit, and through them the queries at those positions (typically all); a poisoned value, as
   in SDPA, its column. Empty inputs (a dimension of size 0) return SDPA's result.
6. fp16 / bf16 inputs are computed in fp32 end to end (CPU has no fast half matmul anyway); the
   output is cast back to the input dtype. float64 stays float64 (oracle tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from .base import Dim, Method, SiteShape, empty_result
from .masks import as_4d, as_additive, is_key_padding
from .softmax import safe_softmax, softmax_and_lse, softmax_lse

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


def key_padding_bias(attn_mask: Optional[torch.Tensor], nk: int, nk_pad: int, dtype: torch.dtype,
                     device: torch.device, what: str) -> Optional[torch.Tensor]:
    """A key-padding mask as an additive bias ``[Bm, Hm, nk_pad]`` (Bm in {1, B}, Hm in {1, H}).

    Bool masks become 0 / -inf; float masks are used as they are (cast to ``dtype``). Keys beyond
    ``nk`` (block padding) get -inf. Returns None when there is neither a mask nor padding. A mask
    with a query axis is accepted when all its rows are equal; otherwise ValueError naming ``what``.
    """
    bias = None
    if attn_mask is not None:
        m = as_4d(attn_mask)
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
    if nk_pad > nk:
        if bias is None:
            bias = torch.zeros(1, 1, nk, dtype=dtype, device=device)
        bias = F.pad(bias, (0, nk_pad - nk), value=float("-inf"))
    return bias


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    """G = H / Hk, the query heads per key/value head; ValueError when Hk does not divide H."""
    h, hk = q.shape[1], k.shape[1]
    if hk == 0 or h % hk:
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


#: target size (elements) of the largest temporary of one group of heads; groups of heads are
#: processed one after the other so temporaries stay small (allocator- and cache-friendly)
GROUP_ELEMS = 1 << 21


def head_groups(n_slices: int, elems_per_slice: int) -> list[tuple[int, int]]:
    """Split ``n_slices`` independent (batch, kv-head) slices into ranges of about GROUP_ELEMS work."""
    per = max(1, GROUP_ELEMS // max(1, elems_per_slice))
    return [(a, min(a + per, n_slices)) for a in range(0, n_slices, per)]


def _flat_heads(t: Optional[torch.Tensor], B: int, Hk: int, G: int, H: int) -> Optional[torch.Tensor]:
    """[Bm, Hm, ...] (Hm in {1, H}) -> [B*Hk, G|1, ...] (copies only this small tensor)."""
    if t is None:
        return None
    rest = t.shape[2:]
    if t.shape[1] == H and H > 1:
        return t.expand(B, H, *rest).reshape(B * Hk, G, *rest)
    return t.expand(B, Hk, *rest).reshape(B * Hk, 1, *rest)


def _l_step(qTa: torch.Tensor, kbar: torch.Tensor, ent_bias: torch.Tensor, finite: bool) -> torch.Tensor:
    """Lt [.., j, l, k] = L_j[k, l] = softmax_k(s q_lj . kbar_kj + ent_kj) from qTa [.., j, l, D+1]
    (q with a column of ones), kbar [.., k, j, D] and ent_bias [.., k, j] (-inf: a key block with no
    finite R-logit, which gets no weight).

    ``finite``: q, k and the biases hold no NaN / +-inf. Then the additive term rides in the matmul
    through the ones column (with -inf blocks set to 0 there and masked after, so the backward
    never forms 0 * inf) and torch's fused softmax serves every row with a finite logit. Otherwise
    the logits are computed as plain arithmetic (q.kbar + ent, so inf - inf is NaN as in SDPA) and
    softmaxed with ``softmax_and_lse`` (rows of no finite logit -> 0).
    """
    n, G, bq, M, D1 = qTa.shape
    D = D1 - 1
    ent_t = ent_bias.transpose(-1, -2)                                    # [.., j, k]
    if not finite:
        logits = qTa[..., :D] @ kbar.transpose(-3, -2).transpose(-1, -2)
        logits.add_(ent_t.unsqueeze(-2))
        return softmax_and_lse(logits)[0]
    dead = ent_t == float("-inf")
    kba = kbar.new_empty(n, G, bq, M, D + 1)                               # [.., j, k, D+1], one pass
    kba[..., :D] = kbar.transpose(-3, -2)
    kba[..., D] = ent_t.masked_fill(dead, 0.0)
    logits = qTa @ kba.transpose(-1, -2)
    if bool(dead.any()):
        logits.masked_fill_(dead.unsqueeze(-2), float("-inf"))
        if bool(dead.all(-1).any()):                                      # a query that sees no key
            return softmax_and_lse(logits)[0]
    return torch.softmax(logits, dim=-1)


def _monarch_core(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  qvalid: Optional[torch.Tensor], steps: int, finite: bool) -> torch.Tensor:
    """One group of heads. qs [n,G,M,bq,D] (scaled, padded rows 0), k [n,1,M,bk,D], v [n,1,M,bk,Dv],
    bias [n,G|1,M,1,bk] (-inf = masked) or None, qvalid [bq,M,1] 0/1 or None, ``finite``: q, k and
    the biases hold no NaN / +-inf -> z [n,G,M,bq,Dv] (a view)."""
    n, G, M, bq, D = qs.shape
    bk = k.shape[-2]
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
        if bk == 1:
            # a softmax over one key is 1 whatever its logit (+-inf included): R = 1, kbar = k and
            # H(R) + <R, bias> = bias exactly (the lse identity below would give inf - inf)
            R = None
            kbar = k.expand(n, G, M, bq, D)
            ent_bias = (bias[..., 0] if bias is not None else qs.new_zeros(())).expand(n, G, M, bq)
        else:
            logits = a @ kT                                                # x: [.., k, j, i]
            if bias is not None:
                logits.add_(bias)                                          # x + bias (matmul keeps no output)
            R, lse = softmax_and_lse(logits)                               # [.., k, j, i], [.., k, j]
            kbar = R @ k                                                   # sum_i R_k[j,i] k_ki
            ent_bias = lse - torch.linalg.vecdot(a, kbar)                  # H(R) + <R, bias> = lse - <R, x>
        if M == 1:
            # one key block: L_j = 1 whatever its logit (no L-step to compute)
            Lt = qs.new_ones(n, G, bq, 1, 1)
            continue
        # ---- L-step: logits s q_lj . kbar_jk + H(R_k[j,:]) + <R_k[j,:], bias_k> (-inf: no weight)
        Lt = _l_step(qTa, kbar, ent_bias, finite)                          # [.., j, l, k]
    y = v.expand(n, G, M, bq, v.shape[-1]) if R is None else R @ v       # [.., k, j, Dv]
    return (Lt @ y.transpose(-3, -2)).transpose(-3, -2)                    # [.., l, j, Dv]


def monarch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    scale: float, params: MonarchParams) -> torch.Tensor:
    """MonarchAttention on q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv] -> [B,H,Nq,Dv].

    Block-batched: every step is a handful of batched matmuls and fused softmaxes on
    [n, G, M, b, *] views (G = H/Hk query heads per kv head, broadcast against k/v). Groups of
    (batch, kv-head) slices run one after another only to keep temporaries small.
    """
    what = "monarch attention"
    empty = empty_result(q, k, v)
    if empty is not None:
        return empty
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
    # the mask's biases as they are; block padding: -inf
    bias = key_padding_bias(attn_mask, Nk, nkp, cdt, q.device, what)
    if bias is not None:
        bias = _flat_heads(bias, B, Hk, G, H)
        bias = bias.reshape(bias.shape[0], bias.shape[1], M, 1, bk)
    # no NaN / +-inf in q, k or the biases (-inf biases are masks): the L-step's fast path is exact.
    # A sum is non-finite whenever an element is (a finite sum that overflows only costs the fast path)
    finite = bool(torch.isfinite(q.sum(dtype=cdt) + k.sum(dtype=cdt))) and (
        bias is None or not bool((bias.isnan() | (bias == float("inf"))).any()))
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
        zg = _monarch_core(qs, kg, vg, None if bias is None else bias[a:b], qvalid, params.num_steps, finite)
        if len(groups) == 1:
            z = zg.contiguous()                                           # [n, G, l, j, Dv]
        else:
            if z is None:
                z = zg.new_empty(B * Hk, G, M, bq, Dv)
            z[a:b] = zg
    out = z.reshape(B, H, nqp, Dv)
    if nqp > Nq:
        out = out[:, :, :Nq]
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
