"""Softmax helpers with SDPA's handling of non-finite logits, shared by the methods.

* A row whose logits are all -inf (no key it may attend to) gets probabilities 0, log-sum-exp
  -inf and zero gradients: torch 2.13 SDPA's fully masked row.
* NaN and +inf are not special: a NaN logit, or a +inf one (``inf - inf``), makes its row NaN, as
  in SDPA. Nothing is ever replaced by 0 silently.
* Finite logits are used as they are, however negative (``finfo.min`` included): softmax is
  shift invariant, so a row whose logits all carry the same large negative bias is an ordinary row.
"""
from __future__ import annotations

import torch

__all__ = ["softmax_and_lse", "softmax_lse", "safe_softmax"]

_NEG_INF = float("-inf")


def _row_shift(m: torch.Tensor) -> torch.Tensor:
    """The row max used as the stabilising shift, with -inf (a row of no finite logit) -> 0 so
    that ``exp(x - shift)`` is 0 there instead of NaN; NaN and +inf stay (they must propagate)."""
    return m.masked_fill(m == _NEG_INF, 0.0)


class _SoftmaxLse(torch.autograd.Function):
    """``(softmax(x), logsumexp(x))`` over the last dim, sharing one exp pass (in place inside the
    forward); the backward is the usual one (d lse / dx = softmax). Rows of all -inf give 0 / -inf."""

    @staticmethod
    def forward(ctx, x):
        m = _row_shift(x.amax(-1, keepdim=True))
        p = torch.sub(x, m)
        p.exp_()
        s = p.sum(-1, keepdim=True)
        lse = (m + torch.log(s)).squeeze(-1)            # log(0) = -inf for a row of all -inf
        p.div_(s.masked_fill(s == 0, 1.0))
        ctx.save_for_backward(p)
        return p, lse

    @staticmethod
    def backward(ctx, gp, glse):
        (p,) = ctx.saved_tensors
        g = gp if gp is not None else torch.zeros_like(p)
        inner = (g * p).sum(-1, keepdim=True)
        if glse is not None:
            inner = inner - glse.unsqueeze(-1)
        return p * (g - inner)


def softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and log-sum-exp over the last dim (see the module docstring for non-finite rows)."""
    return _SoftmaxLse.apply(x)


def softmax_lse(logits: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_and_lse`` along any ``dim``: probabilities (same shape) and lse (``dim`` removed)."""
    if dim in (-1, logits.dim() - 1):
        return softmax_and_lse(logits)
    p, lse = softmax_and_lse(logits.movedim(dim, -1))
    return p.movedim(-1, dim), lse


def safe_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``; a row of all -inf gives zeros (SDPA's fully-masked-row behaviour)."""
    return softmax_lse(logits, dim)[0]
