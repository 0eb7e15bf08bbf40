"""The quadratic form of linear attention with a fitted feature map: a short readable reference.

For query i and key j (logit ``s_ij = scale * q_i . k_j + b_ij``, b the additive mask, -inf for
masked keys):

* ``E_i``, the exact set: keys with ``|i - j| < local_window`` or ``j < sink_tokens`` (and, when
  causal, ``j <= i``); ``L_i``, the linear set: every other key the query may see;
* ``m_i = max_{j in E_i} s_ij`` (0 when E_i holds no finite logit);
* log weights ``w_ij = s_ij`` on E_i, ``gamma_h + m_i + b_ij + log(phi_q(q_i) . phi_k(k_j))`` on
  L_i, -inf elsewhere;
* ``out_i = softmax_j(w_ij) @ v`` (a row with no finite weight gives 0).

So one normaliser covers both parts: the linear part approximates ``exp(s_ij)`` by
``exp(gamma_h + m_i + b_ij) phi_q . phi_k`` (relative to the largest exact logit of the row).
Without a window or sinks E_i is empty, m_i = 0, gamma cancels, and this is normalised linear
attention ``phi_q(q_i)^T S / phi_q(q_i)^T z`` with key weights ``exp(b_ij)``; a window covering
every key is exact softmax attention. Everything is computed in float64 from an N x N matrix:
the oracle for ``torch.py`` and the Triton kernels, not a fast path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common import as_4d, as_additive
from .maps import FeatureMaps, apply_map, feature_inputs

__all__ = ["linear_attention_naive", "exact_sets", "forward"]


def exact_sets(nq: int, nk: int, is_causal: bool, local_window: int, sink_tokens: int,
               device=None, rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(exact, linear)`` [Nq, Nk] sets of the module docstring (masks not applied); with
    ``rows`` (query positions) only those rows, [len(rows), Nk]."""
    i = (torch.arange(nq, device=device) if rows is None else rows).unsqueeze(-1)
    j = torch.arange(nk, device=device)
    allowed = (j <= i) if is_causal else torch.ones(i.shape[0], nk, dtype=torch.bool, device=device)
    exact = allowed & (((j - i).abs() < local_window) | (j < sink_tokens))
    return exact, allowed & ~exact


def linear_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                           scale: float, is_causal: bool, maps: FeatureMaps) -> torch.Tensor:
    """q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] -> float64 [B, H, Nq, Dv]."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, _ = q.shape
    G = H // k.shape[1]
    xq, xk = feature_inputs(q, k, scale)
    phi_q = apply_map(maps.kind, [t.double() for t in maps.query], xq)
    phi_k = apply_map(maps.kind, [t.double() for t in maps.key], xk).repeat_interleave(G, 1)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    Nk = k.shape[2]
    bias = torch.zeros(1, 1, 1, Nk, dtype=torch.float64)
    if attn_mask is not None:
        bias = as_additive(as_4d(attn_mask), torch.float64)
    s = scale * q @ k.transpose(-1, -2) + bias
    exact, linear = exact_sets(Nq, Nk, is_causal, maps.local_window, maps.sink_tokens)
    m = s.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    gamma = maps.gamma.double().view(1, H, 1, 1)
    lin = gamma + m + bias + torch.log(phi_q @ phi_k.transpose(-1, -2))
    w = torch.where(exact, s, torch.where(linear, lin, torch.tensor(float("-inf"), dtype=torch.float64)))
    top = w.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(w - top)
    z = e.sum(-1, keepdim=True)
    return (e / torch.where(z > 0, z, torch.ones_like(z))) @ v


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
            is_causal: bool, params, *tensors: torch.Tensor) -> torch.Tensor:
    """The method's signature (``LinearParams`` resolved by ``bind``, then the op's tensors)."""
    maps = FeatureMaps.from_tensors(params.feature_map, tensors, local_window=params.local_window,
                                    sink_tokens=params.sink_tokens)
    return linear_attention_naive(q, k, v, attn_mask, scale, is_causal, maps)
