"""Aten-level graphs (torch.export, make_fx, decomposed SDPA) are matched like dynamo's torch-level
graphs: the same sites, the same mask analysis, and the rewritten graph computes eager's result."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from structattn.config import Config
from structattn.passes import find_sites, rewrite_attention
from testlib import B, D, H, N, Fn, padding, qkv, rel_err


class Attn(nn.Module):
    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * 0.3
        s = s.masked_fill(~keep[:, None, None, :], torch.finfo(s.dtype).min)
        return torch.softmax(s.float(), -1).to(q.dtype) @ v


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, q, k, v, keep):
        return self.attn(q, k, v, keep)


class Causal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SafeSoftmax(nn.Module):
    def forward(self, q, k, v):
        return torch.ops.aten._safe_softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


def _graphs(module, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args)
        return {"export": ep.module(), "export_decomposed": ep.run_decompositions().module(),
                "make_fx": make_fx(module)(*args)}


def _rewrite(gm, args, method="doubled"):
    with torch.no_grad():
        ref = gm(*args)
    sites = rewrite_attention(gm, Config.from_options({"method": method, "compiler": "eager"}))
    with torch.no_grad():
        out = gm(*args)
    return sites, ref, out


@pytest.mark.parametrize("kind", ["export", "export_decomposed", "make_fx"])
def test_masked_attention_at_aten_level(kind):
    args = (*qkv(), padding())
    gm = _graphs(Model(), args)[kind]
    sites, ref, out = _rewrite(gm, args)
    assert [(s.rewritten, s.mask) for s in sites] == [(True, "key_padding")], sites
    assert rel_err(out, 2 * ref) < 1e-5


@pytest.mark.parametrize("kind", ["export", "export_decomposed"])
def test_causal_sdpa_and_its_decomposition(kind):
    args = qkv()
    gm = _graphs(Causal(), args)[kind]
    sites, ref, out = _rewrite(gm, args)
    assert [(s.rewritten, s.mask) for s in sites] == [(True, "causal")], sites
    assert rel_err(out, 2 * ref) < 1e-5


def test_safe_softmax_op():
    args = qkv()
    gm = make_fx(SafeSoftmax())(*args)
    assert any(n.target is torch.ops.aten._safe_softmax.default for n in gm.graph.nodes)
    sites, ref, out = _rewrite(gm, args)
    assert [s.rewritten for s in sites] == [True]
    assert rel_err(out, 2 * ref) < 1e-5


def test_decomposed_look_alike_is_still_declined():
    # softmax over the query axis, at the aten level
    gm = make_fx(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v)(*qkv())
    assert [m.reason is not None for m in find_sites(gm.graph)] == [True]


def _make_fx(fn, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_fx(fn)(*args)


def test_make_fx_rank_two_in_place_scale_and_one_d_bias():
    # aten.mm, aten.mul_ (from `s *= c`), and a [Nk] bias whose fake values come from two modes
    def fn(q, k, v, b):
        s = q @ k.transpose(-2, -1) * 1.0
        s *= 0.3
        return torch.softmax(s + b, -1) @ v

    q, k, v = (t[0, 0] for t in qkv())
    args = (q, k, v, torch.randn(N))
    sites, ref, out = _rewrite(_make_fx(fn, args), args)
    assert [s.rewritten for s in sites] == [True], sites
    assert rel_err(out, 2 * ref) < 1e-5


def test_export_mT_and_T():
    args = qkv()
    gm = _graphs(Fn(lambda q, k, v: torch.softmax(q @ k.mT, -1) @ v), args)["export"]
    sites, ref, out = _rewrite(gm, args)
    assert [s.rewritten for s in sites] == [True] and rel_err(out, 2 * ref) < 1e-5
    args2 = tuple(t[0, 0] for t in args)
    gm = _graphs(Fn(lambda q, k, v: torch.softmax(q @ k.T, -1) @ v), args2)["export"]
    sites, ref, out = _rewrite(gm, args2)
    assert [s.rewritten for s in sites] == [True] and rel_err(out, 2 * ref) < 1e-5


def test_make_fx_heads_last_repeat_interleave():
    # non-contiguous operands: aten's matmul is view(clone(expand(x))); repeat_interleave is
    # unsqueeze / expand / clone / view
    q, k, v = qkv(heads=4, kv_heads=2)
    args = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())

    def fn(q, k, v):
        q, v = q.transpose(1, 2), v.transpose(1, 2).repeat_interleave(2, dim=1)
        kt = k.permute(0, 2, 3, 1).repeat_interleave(2, dim=1)
        return (torch.softmax(q @ kt * 0.3, -1) @ v).transpose(1, 2)

    sites, ref, out = _rewrite(_make_fx(fn, args), args)
    assert [s.rewritten for s in sites] == [True], sites
    assert rel_err(out, 2 * ref) < 1e-5


@pytest.mark.parametrize("kind", ["causal", "mask_and_scale", "enable_gqa"])
def test_make_fx_fused_sdpa_kernel(kind):
    # make_fx / AOT graphs hold the kernel SDPA dispatches to (on CPU
    # aten._scaled_dot_product_flash_attention_for_cpu, returning (output, logsumexp))
    q, k, v = qkv(heads=4, kv_heads=2 if kind == "enable_gqa" else 4)
    if kind == "causal":
        fn, args = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), (q, k, v)
    elif kind == "mask_and_scale":
        fn, args = (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)), \
            (q, k, v, padding()[:, None, None, :])
    else:
        fn, args = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), (q, k, v)
    gm = _make_fx(fn, args)
    assert any("_scaled_dot_product_flash_attention_for_cpu" in str(n.target) for n in gm.graph.nodes)
    sites, ref, out = _rewrite(gm, args)
    assert [s.rewritten for s in sites] == [True], sites
    assert rel_err(out, 2 * ref) < 1e-5
    assert not any("_scaled_dot_product" in str(n.target) for n in gm.graph.nodes)   # the kernel is gone


@pytest.mark.parametrize("kind", ["export", "make_fx"])
def test_bmm_on_merged_views_with_softmax_in_the_merged_view(kind):
    # aten reads bmm(q.reshape(B*H, ..), kT.reshape(B*H, ..)).view(B, H, ..) as a 4-D matmul of
    # q and kT, while the softmax runs in the [B*H, ..] view: the operands are merged back; the
    # key was transposed (and scaled) in 4-D before its reshape (make_fx adds a clone there)
    def fn(q, k, v, b):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kt = k.transpose(-2, -1) * 0.5
        s = torch.bmm(q.reshape(B * H, N, D), kt.reshape(B * H, D, N)).view(B, H, N, N) + b
        p = torch.softmax(s.reshape(B * H, N, N), -1)
        return torch.bmm(p, v.reshape(B * H, N, D)).view(B, H, N, D)

    q, k, v = qkv()
    args = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            torch.randn(B, 1, 1, N))
    gm = _make_fx(fn, args) if kind == "make_fx" else _graphs(Fn(fn), args)["export"]
    sites, ref, out = _rewrite(gm, args)
    assert [s.rewritten for s in sites] == [True], sites
    assert rel_err(out, 2 * ref) < 1e-5
