"""Lifting a bias tensor's producer graph into a score-modification expression: the expression,
evaluated with the captured tensors' real values, equals the tensor the graph computes, and the
classification (key-only / relative / general) is what the construction says."""
from __future__ import annotations

import pytest
import torch

from structattn.passes.lift import classify, lift
from structattn.passes.table import canonical
from structattn.scoremod.evaluate import apply_score_mod, index_grids

transformers = pytest.importorskip("transformers")


def _bias_node(gm):
    """The tensor added to the scores: SDPA's attn_mask, baddbmm's bias, or a `position_bias`."""
    for n in gm.graph.nodes:
        c = canonical(n)
        if c is None:
            continue
        if c.name == "sdpa" and c.get("attn_mask") is not None:
            return c.get("attn_mask")
        if c.name == "baddbmm":
            return c.get("bias")
        if c.name == "add" and "bias" in str(c.get("other")):
            return c.get("other")
    raise AssertionError("no bias in the graph")


def lifted_and_real(module, *args):
    """Compile ``module``, lift its bias, and return (Lifted, real bias [B?,H?,Q?,K], real captured)."""
    out = {}

    def backend(gm, example_inputs):
        node = _bias_node(gm)
        values = {}

        class Record(torch.fx.Interpreter):
            def run_node(self, n):
                values[n] = super().run_node(n)
                return values[n]

        Record(gm).run(*example_inputs)
        lf = lift(node)
        out.update(lifted=lf, real=values[node], captured=[values[c] for c in lf.captured] if lf else [])
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=backend)(*args)
    return out["lifted"], out["real"], out["captured"]


def _check(lf, real, captured):
    assert lf is not None
    r4 = real.reshape((1,) * (4 - real.dim()) + tuple(real.shape))
    B, H, Q, K = r4.shape
    s = torch.zeros(B, H, Q, K)
    got = apply_score_mod(lf.text(), s, tensors=captured, **index_grids(B, H, torch.arange(Q), K, "cpu"))
    assert torch.equal(got, r4.expand(B, H, Q, K).to(got.dtype))


class Alibi(torch.nn.Module):
    def __init__(self, heads=4, symmetric=False):
        super().__init__()
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))
        self.symmetric = symmetric

    def forward(self, q, k, v):
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        dist = (j - i).abs() if self.symmetric else j.expand(n, n)
        bias = -self.slopes[:, None, None] * dist if self.symmetric else self.slopes[:, None, None] * dist[:1]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class TableBias(torch.nn.Module):
    """Swin-style: a learned table gathered through a relative-position index buffer."""

    def __init__(self, n=6, heads=4):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(2 * n - 1, heads))
        coords = torch.arange(n)
        self.register_buffer("index", (coords[:, None] - coords[None, :]) + n - 1)

    def forward(self, q, k, v):
        bias = self.table[self.index.view(-1)].view(q.shape[-2], q.shape[-2], -1).permute(2, 0, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])


def _qkv(n=6, h=4):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, n, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("symmetric,kind", [(False, "key_only"), (True, "relative")])
def test_alibi(symmetric, kind):
    lf, real, captured = lifted_and_real(Alibi(symmetric=symmetric), *_qkv())
    _check(lf, real, captured)
    assert classify(lf) == kind


def test_table_through_index_buffer_is_general_but_exact():
    lf, real, captured = lifted_and_real(TableBias(), *_qkv())
    _check(lf, real, captured)
    assert classify(lf) == "general"   # the index buffer's values are not read at trace time


def test_t5_relative_buckets():
    cfg = transformers.T5Config(num_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=100,
                                relative_attention_num_buckets=8)
    model = transformers.T5EncoderModel(cfg).eval()
    lf, real, captured = lifted_and_real(model, torch.randint(0, 100, (1, 12)))
    _check(lf, real, captured)
    assert classify(lf) == "relative"


def test_mpt_alibi_is_key_only():
    cfg = transformers.MptConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=100, max_seq_len=32)
    model = transformers.MptModel(cfg).eval()
    lf, real, captured = lifted_and_real(model, torch.randint(0, 100, (1, 10)))
    _check(lf, real, captured)
    assert classify(lf) == "key_only"
