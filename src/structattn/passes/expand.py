"""Expand fused torch modules into their parts so their attention can be matched.

``nn.MultiheadAttention`` is one ``F.multi_head_attention_forward`` call in the dynamo graph, and
``nn.TransformerEncoderLayer`` in eval/no_grad is one ``torch._transformer_encoder_layer_fwd`` call
(its fast path). Both are replaced here by in-projections, an SDPA call and the out-projection
(plus norms, feed-forward and residuals for the encoder layer), which the matcher then sees as an
ordinary ``sdpa`` site. A call that cannot be expanded faithfully is left alone and reported.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .build import NodeBuilder
from .canonical import erase_dead
from .fqn import module_path
from .match import Match
from .table import example

_MHA_ARGS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
    "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
    "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal",
)
_MHA_DEFAULTS = {
    "training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
    "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
    "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
    "is_causal": False,
}
_TEL_ARGS = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
    "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2",
    "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type",
)


def _bind(node: Node, names: tuple, defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def expand_fused_modules(gm: GraphModule) -> list[Match]:
    """Expand every fused MHA / encoder-layer call in ``gm``; return refusals for the report."""
    refused: list[Match] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is F.multi_head_attention_forward:
            why = _expand_mha(gm, node)
        elif node.target is getattr(torch, "_transformer_encoder_layer_fwd", None):
            why = _expand_encoder_layer(gm, node)
        else:
            continue
        if why is not None:
            refused.append(Match("fused", node, layer=module_path(node), reason=why))
    return refused


# -- nn.MultiheadAttention ----------------------------------------------------------------------
def _expand_mha(gm: GraphModule, node: Node) -> Optional[str]:
    a = _bind(node, _MHA_ARGS, _MHA_DEFAULTS)
    weights_used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    if any(u.target is not operator.getitem for u in node.users):
        return "the MultiheadAttention result tuple is used whole"
    if a["need_weights"] and weights_used:
        return "MultiheadAttention returns attention weights that are used (need_weights=True)"
    for key in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[key] is not None:
            return f"MultiheadAttention with {key} is not expanded"
    if a["add_zero_attn"]:
        return "MultiheadAttention with add_zero_attn is not expanded"
    if a["training"] and a["dropout_p"] not in (0, 0.0):
        return f"MultiheadAttention attention dropout is active (p={a['dropout_p']}, training)"
    qv = example(a["query"])
    if qv is None or qv.dim() != 3:
        return "unbatched MultiheadAttention input is not expanded"
    b = NodeBuilder(gm.graph, node, node)
    heads = a["num_heads"]
    w, bias = _in_projections(b, a)
    # inputs are [L, N, E] (sequence first) here; heads to [N, H, L, hd]
    q, k, v = (_heads_seq_first(b, b.call(F.linear, x, wi, bi), heads) for x, wi, bi in zip((a["query"], a["key"], a["value"]), w, bias))
    mask, is_causal = _mha_mask(b, a, heads)
    out = b.call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal)
    out = b.call("permute", out, 2, 0, 1, 3, method=True)
    out = b.call("reshape", out, _size(b, a["query"], 0), _size(b, a["query"], 1), -1, method=True)
    out = b.call(F.linear, out, a["out_proj_weight"], a["out_proj_bias"])
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
    erase_dead(list(node.users) + [node])
    return None


def _in_projections(b: NodeBuilder, a: dict) -> tuple:
    if a["use_separate_proj_weight"]:
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        weights = _thirds(b, a["in_proj_weight"])
    biases = _thirds(b, a["in_proj_bias"]) if a["in_proj_bias"] is not None else (None, None, None)
    return weights, biases


def _thirds(b: NodeBuilder, t: Node) -> tuple:
    chunks = b.call(torch.chunk, t, 3)
    return tuple(b.call(operator.getitem, chunks, i) for i in range(3))


def _size(b: NodeBuilder, t: Node, dim: int) -> Any:
    size = example(t).shape[dim]
    return size if isinstance(size, int) else b.call("size", t, dim, method=True)


def _heads_seq_first(b: NodeBuilder, x: Node, heads: int) -> Node:
    x = b.call("view", x, _size(b, x, 0), _size(b, x, 1), heads, -1, method=True)
    return b.call("permute", x, 1, 2, 0, 3, method=True)


def _mha_mask(b: NodeBuilder, a: dict, heads: int) -> tuple:
    """SDPA-convention mask (bool keep or additive float) from MHA's key_padding_mask/attn_mask."""
    kpm, am = a["key_padding_mask"], a["attn_mask"]
    if a["is_causal"] and kpm is None:
        return None, True
    terms = []
    if kpm is not None:
        kv = example(kpm)
        kpm4 = b.call("view", kpm, _size(b, kpm, 0), 1, 1, _size(b, kpm, 1), method=True)
        terms.append(_keep_or_additive(b, kpm4, kv.dtype))
    if am is not None:
        av = example(am)
        if av.dim() == 3:
            am = b.call("view", am, -1, heads, _size(b, am, 1), _size(b, am, 2), method=True)
        terms.append(_keep_or_additive(b, am, av.dtype))
    if not terms:
        return None, False
    if len(terms) == 1:
        return terms[0], False
    left, right = terms
    if example(left).dtype == torch.bool and example(right).dtype == torch.bool:
        return b.call(torch.logical_and, left, right), False
    return b.call(operator.add, _additive(b, left), _additive(b, right)), False


def _keep_or_additive(b: NodeBuilder, mask: Node, dtype: torch.dtype) -> Node:
    # MHA's bool masks mark positions NOT allowed to attend; SDPA's mark the allowed ones
    return b.call(torch.logical_not, mask) if dtype == torch.bool else mask


def _additive(b: NodeBuilder, mask: Node) -> Node:
    if example(mask).dtype != torch.bool:
        return mask
    return b.call(torch.where, mask, 0.0, float("-inf"))


# -- nn.TransformerEncoderLayer fast path ---------------------------------------------------------
def _expand_encoder_layer(gm: GraphModule, node: Node) -> Optional[str]:
    a = _bind(node, _TEL_ARGS, {"mask": None, "mask_type": None})
    sv = example(a["src"])
    if sv is None or sv.dim() != 3:
        return "TransformerEncoderLayer fast path on unbatched or nested input is not expanded"
    b = NodeBuilder(gm.graph, node, node)
    heads, eps, embed = a["num_heads"], a["eps"], a["embed_dim"]

    def norm(x, i):
        return b.call(F.layer_norm, x, (embed,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], eps)

    def self_attention(x):
        w, bias = _thirds(b, a["qkv_weight"]), _thirds(b, a["qkv_bias"])
        q, k, v = (_heads_batch_first(b, b.call(F.linear, x, wi, bi), heads) for wi, bi in zip(w, bias))
        mask = _encoder_mask(b, a, heads)
        out = b.call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = b.call("transpose", out, 1, 2, method=True)
        out = b.call("reshape", out, _size(b, x, 0), _size(b, x, 1), embed, method=True)
        return b.call(F.linear, out, a["proj_weight"], a["proj_bias"])

    def feed_forward(x):
        h = b.call(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
        h = b.call(F.gelu if a["use_gelu"] else F.relu, h)
        return b.call(F.linear, h, a["ffn_weight_2"], a["ffn_bias_2"])

    x = a["src"]
    if a["norm_first"]:
        x = b.call(operator.add, x, self_attention(norm(x, 1)))
        x = b.call(operator.add, x, feed_forward(norm(x, 2)))
    else:
        x = norm(b.call(operator.add, x, self_attention(x)), 1)
        x = norm(b.call(operator.add, x, feed_forward(x)), 2)
    node.replace_all_uses_with(x)
    erase_dead([node])
    return None


def _heads_batch_first(b: NodeBuilder, x: Node, heads: int) -> Node:
    x = b.call("view", x, _size(b, x, 0), _size(b, x, 1), heads, -1, method=True)
    return b.call("transpose", x, 1, 2, method=True)


def _encoder_mask(b: NodeBuilder, a: dict, heads: int) -> Optional[Node]:
    """The fast path's merged mask: type 0 = [L, L] attn mask, 1 = [N, L] key padding, 2 = [N, H, L, L]."""
    mask, mask_type = a["mask"], a["mask_type"]
    if mask is None:
        return None
    mv = example(mask)
    if mask_type == 1 or (mask_type is None and mv.dim() == 2 and mv.shape[0] == example(a["src"]).shape[0] and mv.shape[0] != mv.shape[1]):
        mask = b.call("view", mask, _size(b, mask, 0), 1, 1, _size(b, mask, 1), method=True)
    return _keep_or_additive(b, mask, mv.dtype)
