"""Expand fused torch modules so their attention becomes visible (filled in below)."""
from __future__ import annotations

from torch.fx import GraphModule


def expand_fused_modules(gm: GraphModule) -> int:
    """Replace ``F.multi_head_attention_forward`` / ``torch._transformer_encoder_layer_fwd`` calls
    by their parts. Returns the number of nodes expanded."""
    return 0
