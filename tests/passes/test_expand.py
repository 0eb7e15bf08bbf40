"""nn.MultiheadAttention and nn.TransformerEncoderLayer (fast path) are expanded and rewritten."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import structattn
from testlib import rel_err

E, HEADS, L = 16, 2, 7


def _x():
    return torch.randn(2, L, E, generator=torch.Generator().manual_seed(7))


def _padding():
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1, 5:] = True  # MHA convention: True = ignore
    return kpm


MASKS = {
    "none": dict(),
    "key_padding": dict(key_padding_mask=_padding()),
    "causal_hint": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L), is_causal=True),
    "float_attn_mask": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L)),
    "bool_attn_and_padding": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L).isinf(), key_padding_mask=_padding()),
}
EXPECTED_KIND = {"none": "none", "key_padding": "key_padding", "causal_hint": "causal",
                 "float_attn_mask": "general", "bool_attn_and_padding": "general"}


class Wrap(nn.Module):
    def __init__(self, batch_first, kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).eval()
        self.kwargs = kwargs

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False, **self.kwargs)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    model = Wrap(batch_first, MASKS[mask]).eval()
    x = _x() if batch_first else _x().transpose(0, 1)
    with torch.no_grad():
        ref = model(x)
    report = structattn.explain(model, x, options={"method": "exact"})
    [site] = report.sites
    assert (site.layer, site.form, site.rewritten, site.mask) == ("attn", "sdpa", True, EXPECTED_KIND[mask])
    assert rel_err(report.output, ref) < 1e-5
    # and the rewritten op is really what runs: the poison method doubles the attention output,
    # which the (linear) out-projection turns into 2 * (out - bias) + bias
    doubled = structattn.explain(model, x, options={"method": "doubled"})
    bias = model.attn.out_proj.bias
    assert rel_err(doubled.output, 2 * ref - bias) < 1e-5


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "src_key_padding_mask", "src_mask"])
def test_transformer_encoder_layer_fast_path(norm_first, mask):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True, norm_first=norm_first, activation="gelu").eval()
    x = _x()
    kwargs = {"none": {}, "src_key_padding_mask": {"src_key_padding_mask": _padding()},
              "src_mask": {"src_mask": nn.Transformer.generate_square_subsequent_mask(L)}}[mask]
    with torch.no_grad():
        ref = layer(x, **kwargs)
    report = structattn.explain(layer, x, options={"method": "exact"}, **kwargs)
    [site] = report.sites
    assert site.rewritten and site.form == "sdpa"
    keep = ~_padding() if mask == "src_key_padding_mask" else torch.ones(2, L, dtype=torch.bool)
    assert rel_err(report.output[keep], ref[keep]) < 1e-5
    graph_targets = {str(n.target) for n in report.graph_after.graph.nodes}
    assert not any("_transformer_encoder_layer_fwd" in t for t in graph_targets)
