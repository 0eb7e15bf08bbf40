"""A method added from outside the package: one folder (written to a temporary directory) and one
``register`` call, nothing else. It is then usable in the backend options and its report, in
``structattn.functional``, in ``calibrate`` and in the kernel dispatch (a real Triton kernel,
interpreted on the CPU).

The toy is temperature attention, ``softmax(scale * q k^T / temperature) v``, claimed to cost half
of exact attention's FLOPs so that the cost rule and calibration have a reason to pick it."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structattn
from structattn import functional as SF
from structattn.calibrate import default_methods
from structattn.methods import REGISTRY, get_method, register

from testlib import TOL, make_qkv, rel_err

FOLDER = {
    "__init__.py": '''
        """Temperature attention: softmax(scale * q k^T / temperature) v."""
        from dataclasses import dataclass

        from structattn.methods.base import Method, exact_flops


        @dataclass(frozen=True)
        class ToyParams:
            temperature: float = 2.0


        class ToyMethod(Method):
            name = "toy"
            Params = ToyParams
            description = "temperature attention (a test's toy)"
            kernel_module = __name__ + ".triton"

            def validate(self, params, *, where):
                if not params.temperature > 0:
                    raise ValueError(f"{where}.temperature must be > 0; got {params.temperature!r}")

            def supports(self, site, params):
                return "toy attention has no causal form" if site.causal else None

            def forward(self, q, k, v, attn_mask, scale, is_causal, params):
                from .torch import forward
                return forward(q, k, v, attn_mask, scale, is_causal, params)

            def flops(self, site, params):
                return exact_flops(site) // 2

            def candidates(self, shape):
                return [{"temperature": 1.0}, {"temperature": 3.0}]
        ''',
    "torch.py": '''
        from structattn.methods.exact import sdpa


        def forward(q, k, v, attn_mask, scale, is_causal, params):
            return sdpa(q, k, v, attn_mask, scale / params.temperature, is_causal)
        ''',
    "naive.py": '''
        from structattn.methods.exact.naive import dense_attention


        def forward(q, k, v, attn_mask, scale, is_causal, params):
            return dense_attention(q, k, v, attn_mask, scale / params.temperature, is_causal)
        ''',
    "triton.py": '''
        import torch
        import triton
        import triton.language as tl

        from structattn.methods.exact import sdpa

        CALLS = []


        @triton.jit
        def _copy(X, Y, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


        def supports(q, k, v, attn_mask, is_causal, params):
            return "the toy kernel takes head_dim <= 16 only" if q.shape[-1] > 16 else None


        def forward(q, k, v, attn_mask, scale, is_causal, params):
            CALLS.append(tuple(q.shape))
            res = sdpa(q, k, v, attn_mask, scale / params.temperature, is_causal).contiguous()
            out = torch.empty_like(res)
            _copy[(triton.cdiv(res.numel(), 256),)](res, out, res.numel(), BLOCK=256)
            return out
        ''',
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy folder as an importable package ``toyattn``, registered for this module's tests."""
    root = tmp_path_factory.mktemp("toy")
    (root / "toyattn").mkdir()
    for name, text in FOLDER.items():
        (root / "toyattn" / name).write_text(textwrap.dedent(text).lstrip())
    sys.path.insert(0, str(root))
    try:
        import toyattn

        register(toyattn.ToyMethod())
        yield toyattn
    finally:
        REGISTRY.pop("toy", None)
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "toyattn" or m.startswith("toyattn.")]:
            del sys.modules[name]


class Block(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def eager_with_temperature(model, x, temperature):
    """The model's output with every attention at ``temperature`` (SDPA's scale divided by it)."""
    with torch.no_grad():
        for blk in model.layers:
            B, N, C = x.shape
            q, k, v = blk.qkv(x).view(B, N, 3, blk.heads, C // blk.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, scale=(C // blk.heads) ** -0.5 / temperature)
            x = x + blk.out(a.transpose(1, 2).reshape(B, N, C))
    return x


def test_options_and_report(toy):
    model, x = Tiny().eval(), torch.randn(2, 12, 16)
    report = structattn.explain(model, x, options={"method": "toy", "toy": {"temperature": 3.0}})
    assert [(s.method, s.params) for s in report.sites] == [("toy", {"temperature": 3.0})] * 2
    assert all(s.rewritten and s.flops == s.exact_flops // 2 for s in report.sites)
    assert rel_err(report.output, eager_with_temperature(model, x, 3.0)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="temperature"):
        structattn.explain(model, x, options={"method": "toy", "toy": {"temperature": -1.0}})


def test_functional_and_the_torch_path_against_naive(toy):
    import toyattn.naive as naive

    q, k, v = make_qkv(1, 2, 1, 9, 9, 8, 8, torch.float64, seed=4)
    out = SF.toy_attention(q, k, v, scale=0.5, temperature=2.5)
    assert rel_err(out, naive.forward(q, k, v, None, 0.5, False, get_method("toy").Params(2.5))) < TOL[torch.float64]
    assert torch.equal(out, SF.attention("toy", q, k, v, None, 0.5, temperature=2.5))
    with pytest.raises(ValueError, match="causal"):          # its trace-time supports
        SF.toy_attention(q, k, v, is_causal=True)


def test_kernel_dispatch(toy):
    import toyattn.triton as kernel

    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, 8, torch.float32, seed=5)
    before = len(kernel.CALLS)
    out = SF.toy_attention(q, k, v, impl="triton", temperature=2.0)
    assert len(kernel.CALLS) == before + 1                   # the dispatch found and ran it
    assert rel_err(out, SF.toy_attention(q, k, v, impl="torch", temperature=2.0)) < TOL[torch.float32]
    SF.toy_attention(q, k, v, temperature=2.0)               # impl="auto" on the CPU: the torch path
    assert len(kernel.CALLS) == before + 1
    wide = make_qkv(1, 2, 2, 9, 9, 32, 32, torch.float32, seed=6)
    with pytest.raises(ValueError, match="head_dim <= 16"):  # its run-time supports
        SF.toy_attention(*wide, impl="triton")


def test_calibrate(toy):
    assert "toy" in default_methods()
    model = Tiny().eval()
    samples = [(torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    options = structattn.calibrate(model, samples, budget=0.01, methods=["toy"], progress=False, verbose=False)
    # temperature 1 is exact attention at half the (claimed) FLOPs: every layer takes it
    assert options["layers"] == {f"layers.{i}": {"method": "toy", "temperature": 1.0} for i in range(2)}
    assert options.summary.fraction == pytest.approx(0.5)
    assert [c.method for c in options.summary.layers[0].candidates] == ["exact", "toy", "toy"]
