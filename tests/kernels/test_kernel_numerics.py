"""Kernel numerics under TRITON_INTERPRET=1, against SDPA (float64) and the torch references:

* finite additive biases are biases at each kernel's exact limit (no "masked below" threshold);
* +-inf / NaN planted in q, k or v poison what SDPA poisons and no more; NaN is never turned into 0;
* empty tensors return SDPA's result without a launch; masks of 1 to 4 dims are accepted.
"""
import pytest
import torch
import torch.nn.functional as F

import structattn.functional as SF
from structattn.methods import get_method
from structattn.methods.monarch import MonarchParams
from structattn.methods.monarch import triton as KMO
from structattn.methods.mra import MraParams
from structattn.methods.mra import triton as KMRA
from structattn.methods.topk import TopkParams
from structattn.methods.topk import triton as KT

from testlib import TOL, make_qkv, poisoned, rel_err, sdpa_reference

INF, NAN = float("inf"), float("nan")

#: (label, kernel module, params at an exact limit, is_causal)
EXACT_LIMITS = [
    ("mra2", KMRA, MraParams(block_size=4, blocks_per_row=100), True),
    ("mra2s", KMRA, MraParams(block_size=4, blocks_per_row=100, variant="mra2s"), True),
    ("monarch-b1-T2", KMO, MonarchParams(block_size=1, num_steps=2), False),
    ("monarch-bN", KMO, MonarchParams(block_size=100), False),
    ("topk-kN", KT, TopkParams(k=100), True),
]
IDS = [c[0] for c in EXACT_LIMITS]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf / NaN


@pytest.mark.parametrize("label,K,params,causal", EXACT_LIMITS, ids=IDS)
def test_finite_biases_at_exact_limits(label, K, params, causal):
    """Per (batch, head): every key at -2e4; every key at finfo.min (the mean of v); keys at 0 and
    -1e4 (the -1e4 ones get weight ~0, not dropped by a rule); signed biases with a +50 block."""
    q, k, v = make_qkv(2, 2, 1, 13, 13, 16, 8, torch.float32, seed=11)
    mask = torch.zeros(2, 2, 1, 13)
    mask[0, 0] = -2e4
    mask[0, 1] = torch.finfo(torch.float32).min
    mask[1, 0, :, ::3] = -1e4
    mask[1, 1] = torch.randn(13, generator=torch.Generator().manual_seed(3)) * 3
    mask[1, 1, :, 4:8] += 50.0
    out = K.forward(q, k, v, mask, 0.5, causal, params, out=poisoned(2, 2, 13, 8, torch.float32))
    ref = sdpa_reference(q, k, v, mask, 0.5, causal, torch.float64)
    assert torch.isfinite(out).all()
    # fp32 rounds s - 2e4 to ~1e-3: the bound separates that from a dropped row (error ~1)
    assert rel_err(out[0, 0], ref[0, 0]) < 1e-2
    if not causal:
        assert rel_err(out[0, 1], v[0, 0].double().mean(0).expand(13, 8)) < 1e-6
    for b, h in ((0, 1), (1, 0), (1, 1)):
        assert rel_err(out[b, h], ref[b, h]) < TOL[torch.float32], (b, h)


def test_mra_kernel_is_shift_invariant_below_the_limit():
    """A bias of -1e4 on every key selects the same blocks and gives the same output as no mask."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, 8, torch.float32, seed=5)
    p = MraParams(block_size=8, blocks_per_row=2)
    shift = torch.full((40,), -1e4)
    got, plain = KMRA.select(q, k, shift, 0.5, True, p), KMRA.select(q, k, None, 0.5, True, p)
    assert torch.equal(got.block_idx, plain.block_idx) and torch.equal(got.block_valid, plain.block_valid)
    out, ref = KMRA.forward(q, k, v, shift, 0.5, True, p), KMRA.forward(q, k, v, None, 0.5, True, p)
    assert rel_err(out, ref) < 1e-2 and out.abs().max() > 0.1


def _poison(q, k, v, where):
    """+inf in one element of row 3, NaN in row 9 (q); +inf in key 6 and -inf in key 2 (k); NaN in
    value row 6 (v). Distinct query blocks of 4, so MRA's block structure is exercised."""
    if where == "q":
        q[0, 0, 3, 1], q[0, 1, 9, 2] = INF, NAN
    elif where == "k":
        k[0, 0, 6, 1], k[0, 0, 2, 3] = INF, -INF
    else:
        v[0, 0, 6, 1] = NAN


@pytest.mark.parametrize("label,K,params,causal", EXACT_LIMITS, ids=IDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_non_finite_inputs_at_exact_limits(label, K, params, causal, where):
    q, k, v = make_qkv(1, 2, 1, 13, 13, 16, 8, torch.float32, seed=7)
    _poison(q, k, v, where)
    mask = torch.randn(1, 2, 1, 13, generator=torch.Generator().manual_seed(1))
    mask[..., 11] = -INF
    out = K.forward(q, k, v, mask, 0.5, causal, params, out=poisoned(1, 2, 13, 8, torch.float32))
    ref = sdpa_reference(q, k, v, mask, 0.5, causal, torch.float64)
    finite = torch.isfinite(ref)
    assert not finite.all()
    assert torch.isfinite(out[finite]).all()
    assert torch.allclose(out.double()[finite], ref[finite], rtol=1e-4, atol=2e-5)
    if where == "q" or (where == "k" and not causal):
        assert torch.equal(torch.isfinite(out), finite)
    elif where == "k":
        # SDPA's causal mask is additive, so a +inf / NaN logit above the diagonal still makes
        # its row NaN; ours leaves rows that cannot see the poisoned key 6 finite
        assert torch.equal(torch.isfinite(out[:, :, 6:]), finite[:, :, 6:])
    else:
        # SDPA's 0 * NaN poisons the whole value column 1; ours stays within that column
        assert torch.isfinite(out[..., [0, 2, 3, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize("kk", [3, 13])
def test_topk_kernel_propagates_nan(kk):
    """NaN is never turned into 0: NaN / +inf scores make their row NaN (as the torch path does);
    every other row equals the torch path."""
    q, k, v = make_qkv(1, 2, 2, 13, 13, 16, 8, torch.float32, seed=2)
    q[0, 0, 4, 0] = NAN        # one NaN score row
    q[0, 1, 7, :] = INF        # a row of +inf / -inf scores: the k-th largest may be +inf itself
    p = TopkParams(k=kk)
    out = KT.forward(q, k, v, None, 0.5, False, p, out=poisoned(1, 2, 13, 8, torch.float32))
    ref = get_method("topk").forward(q.double(), k.double(), v.double(), None, 0.5, False, p)
    bad = ~torch.isfinite(ref)
    assert bad[0, 0, 4].all() and bad[0, 1, 7].all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert rel_err(out[~bad], ref[~bad]) < TOL[torch.float32]
    k[0, 1, 5, 2] = NAN        # a NaN key: every row of head 1 sees a NaN score
    out = KT.forward(q, k, v, None, 0.5, False, p)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0, :4]).all()


@pytest.mark.parametrize("K", [KMRA, KMO], ids=["mra", "monarch"])
def test_nan_rows_stay_nan_below_the_limit(K):
    """Below the exact limit too, a NaN query row comes out NaN (the old guards made it 0)."""
    q, k, v = make_qkv(1, 1, 1, 16, 16, 16, 8, torch.float32, seed=4)
    q[0, 0, 5, 3] = NAN
    params = MraParams(block_size=4, blocks_per_row=1, variant="mra2s") if K is KMRA else MonarchParams(block_size=4)
    out = K.forward(q, k, v, None, 0.5, False, params)
    assert torch.isnan(out[0, 0, 5]).all()


EMPTY_SHAPES = [(0, 4, 2, 5, 5, 16, 8), (1, 4, 2, 0, 5, 16, 8), (2, 4, 2, 5, 0, 16, 8), (1, 0, 0, 5, 5, 16, 8),
                (1, 2, 2, 5, 5, 16, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=["batch0", "q_len0", "k_len0", "heads0", "v_dim0"])
def test_empty_inputs(shape):
    B, H, Hk, Nq, Nk, D, Dv = shape
    q, k, v = torch.randn(B, H, Nq, D), torch.randn(B, Hk, Nk, D), torch.randn(B, Hk, Nk, Dv)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hk)
    for name, K, params, causal in (("mra", KMRA, MraParams(), True), ("monarch", KMO, MonarchParams(), False),
                                    ("topk", KT, TopkParams(k=4), True)):
        out = K.forward(q, k, v, None, 0.3, causal, params)
        assert out.shape == ref.shape and torch.equal(out, ref)
        buf = poisoned(B, H, Nq, Dv, torch.float32)
        assert K.forward(q, k, v, torch.ones(Nk, dtype=torch.bool), 0.3, False, params, out=buf) is buf
        assert torch.equal(buf, ref)
        assert torch.equal(SF.attention(name, q, k, v, None, 0.3, False, impl="triton"), ref)


@pytest.mark.parametrize("fn,kw", [
    (SF.monarch_attention, {"block_size": 1}),
    (SF.mra_attention, {"block_size": 4, "blocks_per_row": 100}),
    (SF.topk_attention, {"k": 100}),
])
def test_one_dimensional_and_three_dimensional_masks(fn, kw):
    q, k, v = make_qkv(1, 2, 1, 13, 13, 16, 8, torch.float32, seed=9)
    keep = torch.rand(13, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[0] = True
    bias = torch.randn(2, 1, 13, generator=torch.Generator().manual_seed(1))
    for mask in (keep, bias):
        out = fn(q, k, v, mask, 0.5, impl="triton", **kw)
        assert rel_err(out, sdpa_reference(q, k, v, mask.expand(1, 2, 13, 13), 0.5, False, torch.float64)) < TOL[torch.float32]
