"""The score-modification language: parsing, refusals, and the torch evaluator against hand-written
torch for each construct; the generated Triton function against the evaluator (interpreter)."""
from __future__ import annotations

import os

import pytest
import torch

from structattn.scoremod import ScoreModError, parse, unparse
from structattn.scoremod.evaluate import apply_score_mod, index_grids

B, H, Q, K = 2, 3, 5, 7
G = torch.Generator().manual_seed(0)
S = torch.randn(B, H, Q, K, generator=G) * 4
SLOPES = torch.rand(H, 1, generator=G)
TABLE = torch.randn(16, H, generator=G)
REL = (torch.arange(K)[None, :] - torch.arange(Q)[:, None] + 8)
qi, ki = torch.arange(Q).view(Q, 1), torch.arange(K).view(1, K)
hi = torch.arange(H).view(H, 1, 1)

CASES = {
    "50.0 * tanh(s / 50.0)": 50.0 * torch.tanh(S / 50.0),
    "s + t0[h, 0] * k": S + SLOPES.view(1, H, 1, 1) * ki,
    "s - t0[h, 0] * abs(q - k)": S - SLOPES.view(1, H, 1, 1) * (qi - ki).abs(),
    "s + t1[t0[q, k], h]": S + TABLE[REL].permute(2, 0, 1)[None],
    "where(k <= q, s, -1e9)": torch.where(ki <= qi, S, torch.tensor(-1e9)),
    # an integer bucket index: abs keeps it an integer (the generated code must too)
    "s + t0[where(k > q, 8, 0) + min(abs(k - q) // 2, 7), h]": (
        S + TABLE[torch.where(ki > qi, 8, 0)
                  + torch.div((ki - qi).abs(), 2, rounding_mode="floor").clamp(max=7)].permute(2, 0, 1)[None]),
    "s + t0[min(abs(k - q) // 2, 7) + 8, h]": (
        S + TABLE[torch.div((ki - qi).abs(), 2, rounding_mode="floor").clamp(max=7) + 8].permute(2, 0, 1)[None]),
    "where((k > q - 3) and (k <= q), s, float('-inf'))": None,   # refused: a string constant
    "max(min(s, 2.0), -2.0) + clamp(s, -1, 1)": S.clamp(-2, 2) + S.clamp(-1, 1),
    "s * sigmoid(float(h)) - (k - q) // 2 + (k - q) % 3 + sqrt(abs(s)) + exp(-s * s) + s ** 2": (
        S * torch.sigmoid(hi.float()) - torch.div(ki - qi, 2, rounding_mode="floor")
        + torch.remainder(ki - qi, 3) + S.abs().sqrt() + torch.exp(-S * S) + S * S),
    "s if not (q > k) else s - 1.0": torch.where(~(qi > ki), S, S - 1.0),
    "log(1.0 + exp(s)) + floor(s) + ceil(s) + int(s * 2.5)": (
        torch.log1p(torch.exp(S)) + torch.floor(S) + torch.ceil(S) + (S * 2.5).long()),
}


def _tensors(text):
    if "abs(k - q) // 2" in text:
        return [TABLE]
    return [TABLE, REL] if "t1[t0" in text else [SLOPES] if "t0" in text else []


@pytest.mark.parametrize("text", [t for t, v in CASES.items() if v is not None])
def test_torch_evaluator(text):
    grids = index_grids(B, H, torch.arange(Q), K, "cpu")
    tensors = [REL, TABLE] if "t1[t0" in text else _tensors(text)
    out = apply_score_mod(text, S, tensors=tensors, **grids)
    assert torch.allclose(out, CASES[text].to(out.dtype).expand_as(out), atol=1e-5, rtol=1e-5)
    assert parse(unparse(parse(text))) == parse(text)


@pytest.mark.parametrize("text,what", [
    ("s + x", "the name 'x'"), ("s + t0", "without an index"), ("s + foo(1)", "the call"),
    ("tanh(s, 2)", "tanh with 2 arguments"), ("s ** k", "non-constant exponent"),
    ("s + 'a'", "the constant 'a'"), ("lambda: s", "`lambda"), ("s +", "not an expression"),
    ("s + t9[0]", "t9"),
])
def test_refusals_name_what_is_not_allowed(text, what):
    with pytest.raises(ScoreModError, match="not allowed|not an expression") as err:
        parse(text)
    assert what in str(err.value)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("text", [t for t, v in CASES.items() if v is not None])
def test_generated_triton_matches_torch(text, tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTATTN_CACHE_DIR", str(tmp_path))
    import triton
    import triton.language as tl

    from structattn.scoremod.triton_gen import kernel_args, triton_score_mod

    tensors = [REL, TABLE] if "t1[t0" in text else _tensors(text)
    mod = triton_score_mod(text)

    @triton.jit
    def apply(S_ptr, O_ptr, H: tl.constexpr, QN: tl.constexpr, KN: tl.constexpr, SCORE_MOD: tl.constexpr,
              T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
              T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
              T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
              T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        q = tl.arange(0, QN)[:, None]
        k = tl.arange(0, KN)[None, :]
        s = tl.load(S_ptr + bh * QN * KN + q * KN + k)
        out = SCORE_MOD(s, b, h, q, k, T0, T0_S0, T0_S1, T0_S2, T0_S3, T0_N0, T0_N1, T0_N2, T0_N3,
                        T1, T1_S0, T1_S1, T1_S2, T1_S3, T1_N0, T1_N1, T1_N2, T1_N3,
                        T2, T2_S0, T2_S1, T2_S2, T2_S3, T2_N0, T2_N1, T2_N2, T2_N3,
                        T3, T3_S0, T3_S1, T3_S2, T3_S3, T3_N0, T3_N1, T3_N2, T3_N3)
        tl.store(O_ptr + bh * QN * KN + q * KN + k, out.to(tl.float32))

    # power-of-two tile: pad the score grid (entries outside [Q, K] are never compared)
    QN, KN = 8, 8
    s = torch.zeros(B, H, QN, KN)
    s[..., :Q, :K] = S
    out = torch.full_like(s, float("nan"))
    args = kernel_args(tensors, like=s)
    apply[(B * H,)](s, out, H, QN, KN, mod, *args)
    grids = index_grids(B, H, torch.arange(Q), K, "cpu")
    ref = apply_score_mod(text, S, tensors=tensors, **grids)
    assert torch.allclose(out[..., :Q, :K], ref.float(), atol=1e-4, rtol=1e-4)
