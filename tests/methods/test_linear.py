"""Learned-kernel linear attention: the fast path against float64 oracles (the quadratic form of
naive.py and, independently, the textbook normalised formula), its exact limits, masks, GQA,
dtypes and gradients; the op extension (constant tensors in the rewritten graph); the weights
file and the options that name it; fitting (deterministic, better than the initial maps)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structattn
from structattn.methods import SiteShape, get_method
from structattn.methods.exact.naive import dense_attention
from structattn.methods.linear import FeatureMaps, LinearParams, linear_flops, load_maps, save_maps
from structattn.methods.linear.maps import KINDS, apply_map, feature_inputs
from structattn.methods.linear.naive import linear_attention_naive
from structattn.methods.linear.torch import linear_forward

from testlib import make_qkv, rel_err

METHOD = get_method("linear")


def run(q, k, v, mask, scale, causal, maps, chunk=4):
    return linear_forward(q, k, v, mask, scale, causal, maps.kind, maps.tensors(), maps.local_window,
                          maps.sink_tokens, chunk)


def random_maps(kind, H, Hk, D, seed, window=0, sinks=0):
    maps = FeatureMaps.init(kind, H, Hk, D, local_window=window, sink_tokens=sinks, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    maps.gamma = torch.randn(H, generator=g)
    maps.query = [t + 0.3 * torch.randn(t.shape, generator=g) for t in maps.query]
    maps.key = [t + 0.3 * torch.randn(t.shape, generator=g) for t in maps.key]
    return maps


def key_mask(kind, B, H, nk, seed):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, 1, 1, nk, generator=g) > 0.3
        m[:, ..., 0] = True
        return m
    if kind == "additive":
        m = torch.randn(B, 1, 1, nk, generator=g, dtype=torch.float64)
        m[0, ..., 2] = float("-inf")
        return m
    if kind == "per_head":
        return torch.rand(B, H, 1, nk, generator=g) > 0.4
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------------
# the fast path against the oracles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal,window,sinks", [(False, 0, 0), (True, 0, 0), (True, 5, 0), (True, 3, 2),
                                                  (False, 4, 0), (False, 3, 2), (True, 0, 3)])
@pytest.mark.parametrize("mask", [None, "bool", "additive", "per_head"])
def test_fast_path_equals_quadratic_form(kind, causal, window, sinks, mask, seed):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=19, Nk=19, D=8, Dv=6, seed=seed)
    maps = random_maps(kind, 4, 2, 8, seed, window, sinks)
    m = key_mask(mask, 2, 4, 19, seed)
    out = run(q, k, v, m, 0.4, causal, maps)
    ref = linear_attention_naive(q, k, v, m, 0.4, causal, maps)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("causal,window,sinks", [(True, 0, 0), (True, 4, 1), (False, 3, 0), (False, 30, 0)])
@pytest.mark.parametrize("nq,nk", [(9, 23), (23, 9)])
def test_cross_lengths_and_window_past_the_sequence(causal, window, sinks, nq, nk, seed):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=nq, Nk=nk, D=8, seed=seed)
    maps = random_maps("hedgehog", 2, 1, 8, seed, window, sinks)
    out = run(q, k, v, None, 0.3, causal, maps, chunk=4)
    assert rel_err(out, linear_attention_naive(q, k, v, None, 0.3, causal, maps)) < 1e-10


def test_pure_linear_is_the_normalised_kernel_formula(seed):
    """Without window or sinks: out_i = phi_q(q_i)^T S / phi_q(q_i)^T z, S = sum_j phi_k(k_j) v_j^T
    (non-causal: over all keys; causal: over j <= i), written out per row in float64."""
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=11, Nk=11, D=8, Dv=3, seed=seed)
    maps = random_maps("gated", 2, 2, 8, seed)
    xq, xk = feature_inputs(q, k, 0.5)
    fq = apply_map("gated", [t.double() for t in maps.query], xq)[0]
    fk = apply_map("gated", [t.double() for t in maps.key], xk)[0]
    for causal in (False, True):
        ref = torch.zeros(2, 11, 3, dtype=torch.float64)
        for h in range(2):
            for i in range(11):
                n = i + 1 if causal else 11
                state = fk[h, :n].T @ v[0, h, :n]
                z = fk[h, :n].sum(0)
                ref[h, i] = fq[h, i] @ state / (fq[h, i] @ z)
        assert rel_err(run(q, k, v, None, 0.5, causal, maps)[0], ref) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_every_key_is_exact_attention(causal, seed):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Nq=17, Nk=17, D=8, seed=seed)
    mask = key_mask("additive", 2, 4, 17, seed)
    maps = random_maps("mlp", 4, 2, 8, seed, window=17)
    ref = dense_attention(q, k, v, mask, 0.35, causal)
    assert rel_err(run(q, k, v, mask, 0.35, causal, maps), ref) < 1e-12
    sinks = random_maps("hedgehog", 4, 2, 8, seed, sinks=17)
    assert rel_err(run(q, k, v, mask, 0.35, causal, sinks), ref) < 1e-12


def test_masked_keys_contribute_nothing(seed):
    """Changing a masked key's k (even to inf) and v changes no output row."""
    q, k, v = make_qkv(B=2, H=2, Hk=1, Nq=16, Nk=16, D=8, seed=seed)
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[:, ..., 10:] = False
    for window, sinks in ((0, 0), (3, 1)):
        maps = random_maps("hedgehog", 2, 1, 8, seed, window, sinks)
        a = run(q, k, v, mask, 0.3, True, maps)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 10:] = float("inf")
        v2[:, :, 12:] = 1e6
        b = run(q, k2, v2, mask, 0.3, True, maps)
        assert torch.equal(a, b)


def test_row_without_keys_is_zero_and_gradients_stay_finite(seed):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Nq=8, Nk=8, D=8, dtype=torch.float32, seed=seed)
    mask = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    mask[..., 5:] = True                         # causal rows 0-4 see no key
    q.requires_grad_(True)
    maps = random_maps("hedgehog", 2, 2, 8, seed, window=2, sinks=1)
    out = run(q, k, v, mask, 0.3, True, maps)
    assert out[:, :, :5].abs().max() == 0 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("window,sinks", [(0, 0), (4, 2)])
def test_grouped_heads_equal_repeated_heads(window, sinks, seed):
    q, k, v = make_qkv(B=1, H=6, Hk=2, Nq=13, Nk=13, D=8, seed=seed)
    maps = random_maps("hedgehog", 6, 2, 8, seed, window, sinks)
    rep = FeatureMaps(maps.kind, 6, 6, 8, maps.num_features, window, sinks, maps.gamma, maps.query,
                      [t.repeat_interleave(3, 0) for t in maps.key])
    a = run(q, k, v, None, 0.3, True, maps)
    b = run(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), None, 0.3, True, rep)
    assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype, seed):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=40, Nk=40, D=16, dtype=torch.float32, seed=seed)
    q, k, v = (t * 4 for t in (q, k, v))         # large logits: exp would overflow fp16
    maps = random_maps("gated", 2, 1, 16, seed, window=4, sinks=1)
    out = run(q.to(dtype), k.to(dtype), v.to(dtype), None, 0.25, True, maps)
    ref = linear_attention_naive(q.to(dtype), k.to(dtype), v.to(dtype), None, 0.25, True, maps)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 1e-2)


def test_features_are_positive_and_finite_for_extreme_inputs():
    x = torch.tensor([-1e4, -80.0, 0.0, 80.0, 1e4]).view(1, 1, 5, 1).expand(1, 2, 5, 8).contiguous()
    for kind in KINDS:
        maps = FeatureMaps.init(kind, 2, 2, 8, seed=3)
        phi = apply_map(kind, maps.query, x)
        assert torch.isfinite(phi).all() and (phi > 0).all(), kind


def test_op_backward_matches_the_float64_quadratic_form(seed):
    q, k, v = make_qkv(B=1, H=4, Hk=2, Nq=14, Nk=14, D=8, dtype=torch.float32, seed=seed)
    maps = random_maps("hedgehog", 4, 2, 8, seed, window=3, sinks=1)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = structattn.functional.linear_attention(*leaves, is_causal=True, maps=maps, chunk_size=4)
    g = torch.randn_like(out)
    out.backward(g)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    linear_attention_naive(*ref_leaves, None, 8 ** -0.5, True, maps).backward(g.double())
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-4


def test_empty_inputs_follow_sdpa():
    maps = FeatureMaps.init("hedgehog", 2, 2, 8)
    q, k, v = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    assert structattn.functional.linear_attention(q, k, v, maps=maps).shape == (1, 2, 0, 8)
    out = structattn.functional.linear_attention(torch.randn(1, 2, 3, 8), k[:, :, :0], v[:, :, :0], maps=maps)
    assert out.shape == (1, 2, 3, 8) and out.abs().max() == 0


def test_functional_under_compile_equals_eager(seed):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Nq=20, Nk=20, D=8, dtype=torch.float32, seed=seed)
    maps = random_maps("gated", 2, 1, 8, seed, window=3)
    fn = torch.compile(lambda q, k, v: structattn.functional.linear_attention(q, k, v, is_causal=True, maps=maps),
                       backend="aot_eager", fullgraph=True)
    eager = structattn.functional.linear_attention(q, k, v, is_causal=True, maps=maps)
    assert torch.equal(fn(q, k, v), eager)


# ------------------------------------------------------------------------------------------------
# method contract: FLOPs, params, supports
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,window,sinks", [(False, 0, 0), (True, 0, 0), (True, 64, 4), (False, 32, 0)])
def test_flops_are_linear_in_length(causal, window, sinks):
    p = LinearParams(feature_map="hedgehog", num_features=128, local_window=window, sink_tokens=sinks)
    mask = "causal" if causal else "none"

    def f(n):
        return float(linear_flops(SiteShape(1, 12, 4, n, n, 64, 64, mask), p))

    assert f(16384) / f(8192) == pytest.approx(2.0, rel=1e-9)
    assert f(16384) < 0.1 * float(2 * 12 * 16384 ** 2 * 128)          # far below exact at 16K


def test_params_validation_names_the_key():
    with pytest.raises(ValueError, match=r"options\['linear'\].feature_map"):
        structattn.Config.from_options({"method": "linear", "linear": {"feature_map": "rbf"}})
    with pytest.raises(ValueError, match="local_window"):
        structattn.Config.from_options({"method": "linear", "linear": {"local_window": -1}})
    with pytest.raises(ValueError, match="chunk_size"):
        structattn.Config.from_options({"method": "linear", "linear": {"chunk_size": 0}})


def test_general_masks_are_refused():
    site = SiteShape(1, 2, 2, 8, 8, 8, 8, "general")
    assert "general" in METHOD.supports(site, LinearParams())
    assert METHOD.supports(SiteShape(1, 2, 2, 8, 8, 8, 8, "causal+key_padding"), LinearParams()) is None


def test_score_modified_sites_are_refused():
    from structattn.scoremod.terms import Bias, Mask, Softcap

    plain = SiteShape(1, 2, 2, 8, 8, 8, 8, "causal", terms=(Mask("causal"),))
    assert METHOD.supports(plain, LinearParams()) is None
    for term, label in [(Bias("relative", "s + (k - q)"), "bias(relative)"), (Softcap(30.0), "softcap(30)"),
                        (Mask("sliding_window", 4, 0), "window(4,0)")]:
        reason = METHOD.supports(SiteShape(1, 2, 2, 8, 8, 8, 8, "causal", terms=(term,)), LinearParams())
        assert reason is not None and "score modification" in reason and label in reason, reason


def test_linear_is_tried_by_calibrate_only_when_named():
    from structattn.calibrate import default_methods

    assert "linear" not in default_methods()
    assert {"monarch", "mra", "topk"} <= set(default_methods())


def test_unbound_params_raise_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="needs fitted feature maps"):
        structattn.functional.attention("linear", q, q, q)


# ------------------------------------------------------------------------------------------------
# the weights file and the options that name it (constants of the rewritten graph)
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim=32, heads=2, kv_heads=1):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)

    def qkv(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(x.shape))


class Net(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = b(x, mask)
        return x


def by_hand(net, x, maps_by_layer, mask=None):
    """The network with each listed layer's attention replaced by the functional op."""
    with torch.no_grad():
        for i, blk in enumerate(net.blocks):
            q, k, v = blk.qkv(x)
            maps = maps_by_layer.get(f"blocks.{i}")
            if maps is None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            else:
                a = structattn.functional.linear_attention(q, k, v, mask, is_causal=mask is None, maps=maps)
            x = x + blk.o(a.transpose(1, 2).reshape(x.shape))
    return x


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_options_naming_a_weights_file_rewrite_with_constants(tmp_path, compiler):
    net = Net().eval()
    x = torch.randn(2, 24, 32)
    maps = {"blocks.0": random_maps("hedgehog", 2, 1, 16, 1, window=4, sinks=1),
            "blocks.2": random_maps("gated", 2, 1, 16, 2)}
    path = str(tmp_path / "phi.pt")
    save_maps(path, maps)
    # short sequences, where exact attention is cheaper: the cost rule would keep them exact
    options = {"method": "linear", "linear": {"weights": path}, "compiler": compiler, "exact_when_cheaper": False}
    report = structattn.explain(net, x, options=options)
    by_layer = {s.layer: s for s in report.sites}
    assert [by_layer[f"blocks.{i}"].method for i in range(3)] == ["linear", "exact", "linear"]
    assert "no feature map fitted for layer 'blocks.1'" in by_layer["blocks.1"].reason
    assert by_layer["blocks.0"].params["local_window"] == 4 and by_layer["blocks.2"].params["feature_map"] == "gated"
    consts = [n for n in report.graph_after.graph.nodes if n.op == "get_attr" and "structattn_const" in str(n.target)]
    assert len(consts) == 5 + 17          # hedgehog: gamma + 2 per side; gated: gamma + 8 per side
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="structattn", options=options)
    with torch.no_grad():
        out = compiled(x)
    assert rel_err(out, by_hand(net, x, maps)) < 1e-6


def test_per_layer_entries_and_key_padding(tmp_path):
    net = Net(2).eval()
    x = torch.randn(2, 20, 32)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., 14:] = False
    maps = {"blocks.1": random_maps("mlp", 2, 1, 16, 3)}
    path = str(tmp_path / "one.pt")
    save_maps(path, maps)
    options = {"method": "exact", "compiler": "eager", "exact_when_cheaper": False,
               "layers": {"blocks.1": {"method": "linear", "weights": path}}}
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(net, backend="structattn", options=options)(x, mask)
    assert rel_err(out, by_hand(net, x, maps, mask)) < 1e-6


def test_weights_errors_are_precise(tmp_path):
    net = Net(1).eval()
    x = torch.randn(1, 8, 32)
    with pytest.raises(Exception, match="needs fitted feature maps"):
        structattn.explain(net, x, options={"method": "linear", "compiler": "eager"})
    with pytest.raises(Exception, match="does not exist"):
        structattn.explain(net, x, options={"method": "linear", "linear": {"weights": str(tmp_path / "no.pt")},
                                            "compiler": "eager"})
    path = str(tmp_path / "other.pt")
    save_maps(path, {"blocks.0": random_maps("hedgehog", 4, 4, 8, 0)})        # another model's shapes
    with pytest.raises(Exception, match="belongs to another model"):
        structattn.explain(net, x, options={"method": "linear", "linear": {"weights": path}, "compiler": "eager"})
    save_maps(path, {"blocks.0": random_maps("hedgehog", 2, 1, 16, 0, window=8)})
    with pytest.raises(Exception, match="fitted with local_window=8"):
        structattn.explain(net, x, options={"method": "linear", "linear": {"weights": path, "local_window": 0},
                                            "compiler": "eager"})
    bad = tmp_path / "junk.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(Exception, match="not a structattn linear-attention weights file"):
        load_maps(str(bad))


def test_file_round_trip_keeps_every_tensor(tmp_path):
    maps = {"a.b": random_maps("gated", 4, 2, 8, 5, window=3, sinks=2), "c": random_maps("mlp", 2, 2, 8, 6)}
    maps["a.b"].info = {"error": 0.25}
    path = str(tmp_path / "w.pt")
    save_maps(path, maps)
    back = load_maps(path)
    assert set(back) == {"a.b", "c"} and back["a.b"].info["error"] == 0.25
    for name, m in maps.items():
        assert all(torch.equal(a, b) for a, b in zip(m.tensors(), back[name].tensors()))
        assert (back[name].local_window, back[name].sink_tokens) == (m.local_window, m.sink_tokens)
    save_maps(path, {"d": random_maps("hedgehog", 2, 2, 8, 7)}, merge=True)
    assert set(load_maps(path)) == {"a.b", "c", "d"}


# ------------------------------------------------------------------------------------------------
# fitting
# ------------------------------------------------------------------------------------------------
def smooth_inputs(n=2, batch=2, seq=40, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, seq, dim, generator=g).cumsum(1) / 4,) for _ in range(n)]


def test_fit_is_deterministic_and_beats_the_initial_maps(tmp_path):
    net = Net(2).eval()
    samples = smooth_inputs()
    kw = dict(feature_map="hedgehog", loss="ce", steps=40, rows=32, progress=False, verbose=False)
    a = structattn.fit_linear(net, samples, seed=3, **kw)
    b = structattn.fit_linear(net, samples, seed=3, **kw)
    c = structattn.fit_linear(net, samples, seed=4, **kw)
    assert set(a.layers) == {"blocks.0", "blocks.1"}
    for name in a.layers:
        assert all(torch.equal(x, y) for x, y in zip(a.layers[name].tensors(), b.layers[name].tensors()))
    assert not all(torch.equal(x, y) for x, y in zip(a.layers["blocks.0"].tensors(), c.layers["blocks.0"].tensors()))
    # the reported error is the deployed path's over every captured call, and below the unfitted maps'
    num = den = num0 = 0.0
    init = FeatureMaps.init("hedgehog", 2, 1, 16, seed=3)
    with torch.no_grad():
        for (x,) in samples:
            q, k, v = net.blocks[0].qkv(x)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out = structattn.functional.linear_attention(q, k, v, is_causal=True, maps=a.layers["blocks.0"])
            out0 = structattn.functional.linear_attention(q, k, v, is_causal=True, maps=init)
            num, den, num0 = num + (out - ref).pow(2).sum(), den + ref.pow(2).sum(), num0 + (out0 - ref).pow(2).sum()
    assert a.fits[0].error == pytest.approx(math.sqrt(num / den), rel=1e-4)
    assert a.fits[0].error < 0.8 * math.sqrt(num0 / den)


def test_fit_compares_variants_and_options_compile(tmp_path):
    net = Net(2).eval()
    samples = smooth_inputs(seed=1)
    fit = structattn.fit_linear(net, samples, layers=["blocks.1"], feature_map=["hedgehog", "mlp"], loss="auto",
                                steps=24, rows=16, local_window=4, sink_tokens=1, progress=False, verbose=False)
    assert list(fit.layers) == ["blocks.1"]
    trials = fit.fits[0].trials
    assert {(t[0], t[1]) for t in trials} == {("hedgehog", "ce"), ("hedgehog", "mse"), ("mlp", "ce"), ("mlp", "mse")}
    best = min(trials, key=lambda t: t[2])
    assert (fit.fits[0].feature_map, fit.fits[0].loss) == (best[0], best[1])
    options = fit.options(str(tmp_path / "fit.pt"), compiler="eager", exact_when_cheaper=False)
    assert options["layers"] == {"blocks.1": {"method": "linear", "weights": str(tmp_path / "fit.pt")}}
    x = samples[0][0]
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(net, backend="structattn", options=options)(x)
    assert rel_err(out, by_hand(net, x, fit.layers)) < 1e-6
    assert "blocks.1" in str(fit) and "fitted 1 layer(s)" in str(fit)


def test_fit_on_a_key_padded_bidirectional_layer():
    """Non-causal sites with a key-padding mask: padded query rows are never fitted on, and the
    reported error leaves them out (they are recomputed here with the padded rows zeroed)."""
    net = Net(1).eval()
    x = smooth_inputs(1, seq=32)[0][0]
    mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    mask[1, ..., 20:] = False
    fit = structattn.fit_linear(net, [(x, mask)], feature_map="gated", loss="mse", steps=20, rows=16,
                                local_window=3, progress=False, verbose=False)
    with torch.no_grad():
        q, k, v = net.blocks[0].qkv(x)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = structattn.functional.linear_attention(q, k, v, mask, maps=fit.layers["blocks.0"])
    live = mask.reshape(2, 1, 32, 1).double()
    err = ((out - ref).double() * live).norm() / (ref.double() * live).norm()
    assert fit.fits[0].error == pytest.approx(float(err), rel=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"feature_map": "rbf"}, "feature_map must be one of"),
    ({"loss": "l1"}, "loss must be one of"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"local_window": -2}, "local_window must be an int >= 0"),
    ({"layers": "blocks.0"}, "layers must be a list"),
])
def test_fit_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        structattn.fit_linear(Net(1).eval(), smooth_inputs(1), progress=False, verbose=False, **kwargs)


def test_constants_inside_a_checkpoint_body_and_dynamic_lengths(tmp_path):
    """Sites inside an activation-checkpoint body get their constants too (AOT autograd lifts them
    as buffers of the root), backward included; one dynamic graph serves several lengths."""
    from torch.utils.checkpoint import checkpoint

    net = Net(2)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            for blk in self.net.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
            return x

    maps = {"blocks.0": random_maps("hedgehog", 2, 1, 16, 1, window=4), "blocks.1": random_maps("gated", 2, 1, 16, 2)}
    save_maps(str(tmp_path / "ck.pt"), {f"net.{k}": v for k, v in maps.items()})
    options = {"method": "linear", "linear": {"weights": str(tmp_path / "ck.pt")}, "compiler": "aot_eager",
               "exact_when_cheaper": False}
    x = torch.randn(2, 24, 32, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(Wrapped().train(), backend="structattn", options=options)(x)
    assert {s.method for s in structattn.last_report().sites} == {"linear"}
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert rel_err(out.detach(), by_hand(net, x.detach(), maps)) < 1e-6

    save_maps(str(tmp_path / "plain.pt"), maps)
    torch._dynamo.reset()
    compiled = torch.compile(net.eval(), backend="structattn", dynamic=True,
                             options={**options, "linear": {"weights": str(tmp_path / "plain.pt")}})
    with torch.no_grad():
        for n in (24, 40):
            x = torch.randn(2, n, 32)
            assert rel_err(compiled(x), by_hand(net, x, maps)) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_maps_from_op_tensors_round_trip(kind):
    maps = FeatureMaps.init(kind, 4, 2, 8, num_features=6, local_window=3, sink_tokens=1, seed=5)
    back = FeatureMaps.from_tensors(kind, maps.tensors(), local_window=3, sink_tokens=1)
    assert (back.num_heads, back.num_kv_heads, back.head_dim, back.num_features) == (4, 2, 8, 6)
    for a, b in zip(maps.tensors(), back.tensors()):
        assert torch.equal(a, b)
