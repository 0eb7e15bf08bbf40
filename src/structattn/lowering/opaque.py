"""``structattn::softmax``: softmax as an op inductor cannot see into.

Attention sites that structattn declines (look-alikes such as a softmax over the query axis, or
channel attention) would otherwise still reach inductor's own scaled-dot-product pattern
rewrites, which have given wrong results on such graphs. Every real attention site is already a
structattn op when inductor runs, so the backend hands declined sites' softmax to inductor as this
opaque op: eager's exact result, with nothing for a pattern to match.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("structattn::softmax", mutates_args=())
def opaque_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.softmax(x, dim)``, opaque to graph pattern matchers."""
    return torch.softmax(x, dim)


@opaque_softmax.register_fake
def _(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return y * (grad - (grad * y).sum(ctx.dim, keepdim=True)), None


opaque_softmax.register_autograd(_backward, setup_context=_setup)

OPAQUE_SOFTMAX = torch.ops.structattn.softmax.default
