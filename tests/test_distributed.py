"""A model compiled with ``backend="structattn"`` under DDP and FSDP2 on 2 gloo CPU ranks.

The test starts the ranks itself (``torch.multiprocessing.spawn``, rendezvous through a file). Each
rank runs its half of the batch forward and backward; outputs and gradients must equal the
single-process compiled model on the whole batch (DDP and FSDP2 average gradients over ranks, and
the loss is a mean over equal halves), and each rank's ``last_report()`` must list its sites.
All variants run in one spawn to pay the process start-up once.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import structattn

WORLD = 2
BATCH, SEQ, DIM, HEADS = 4, 16, 32, 4
MONARCH = {"method": "monarch", "monarch": {"block_size": 4}}
# layer 0 Monarch, layer 1 MRA: per-layer globs must resolve to the same layers on every rank
GLOBS = {**MONARCH, "layers": {"layers.1": {"method": "mra", "block_size": 4, "blocks_per_row": 1}}}
# variant -> (wrapping, options, compiler)
VARIANTS = {
    "ddp": ("ddp", GLOBS, "aot_eager"),
    "ddp_inductor": ("ddp", GLOBS, "inductor"),
    "fsdp2": ("fsdp_root", GLOBS, "aot_eager"),
    "fsdp2_per_layer": ("fsdp_layers", MONARCH, "aot_eager"),
}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


class Block(nn.Module):
    """Pre-norm transformer block with SDPA attention and a key-padding mask."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.out(a.transpose(1, 2).reshape(b, n, DIM))
        return x + self.mlp(self.norm2(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x, keep):
        for layer in self.layers:
            x = layer(x, keep)
        return self.head(x)


def make_model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # a wide initialisation makes attention far from uniform
        for layer in model.layers:
            layer.qkv.weight.mul_(4.0)
    return model


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=g)
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[1, 12:] = False
    keep[3, 9:] = False
    return x, keep


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


def step(model, x, keep, owner):
    """Forward and backward; returns (output, {param name: full gradient})."""
    out = model(x, keep)
    loss_of(out).backward()
    grads = {}
    for name, p in owner.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out.detach(), grads


def _wrap(model, wrapping):
    if wrapping == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    if wrapping == "fsdp_layers":
        for layer in model.layers:
            fully_shard(layer)
    fully_shard(model)
    return model


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, keep = make_batch()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for variant, (wrapping, options, compiler) in VARIANTS.items():
            torch._dynamo.reset()
            model = make_model()
            wrapped = _wrap(model, wrapping)
            compiled = torch.compile(wrapped, backend="structattn", options={**options, "compiler": compiler})
            out, grads = step(compiled, x[half], keep[half], model)
            report = structattn.last_report()
            sites = [(s.layer, s.method, s.rewritten, s.mask) for s in report.sites] if report else []
            results[variant] = {"out": out, "grads": grads, "sites": sites}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per rank, per variant: output of its half, full gradients, report sites."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank_main, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The single-process compiled model on the whole batch, per options, and the exact model's output
    (compiler "eager": the same rewritten graph and ops, without AOT tracing)."""
    x, keep = make_batch()
    out = {}
    for name, options in (("globs", GLOBS), ("monarch", MONARCH)):
        torch._dynamo.reset()
        model = make_model()
        compiled = torch.compile(model, backend="structattn", options={**options, "compiler": "eager"})
        out[name] = step(compiled, x, keep, model)
    torch._dynamo.reset()
    with torch.no_grad():
        out["exact"] = make_model()(x, keep)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ranks_equal_single_process(ranks, single, variant):
    _, options, compiler = VARIANTS[variant]
    ref_out, ref_grads = single["globs" if options is GLOBS else "monarch"]
    assert _rel(ref_out, single["exact"]) > 1e-3  # the approximation really changes the output
    tol = 1e-4 if compiler == "inductor" else 1e-5
    outs = [r[variant]["out"] for r in ranks]
    assert _rel(torch.cat(outs), ref_out) < tol
    for r in ranks:
        assert set(r[variant]["grads"]) == set(ref_grads)
        for name, g in r[variant]["grads"].items():
            assert _rel(g, ref_grads[name]) < tol, (variant, name)


@pytest.mark.parametrize("variant", ["ddp", "ddp_inductor", "fsdp2"])
def test_each_rank_reports_every_site(ranks, variant):
    for r in ranks:
        assert r[variant]["sites"] == [("layers.0", "monarch", True, "key_padding"),
                                       ("layers.1", "mra", True, "key_padding")]


def test_per_layer_fully_shard_reports_rewritten_sites(ranks):
    """With every layer its own FSDP unit, dynamo compiles each layer as a separate frame; the
    report of the last compiled frame lists that frame's sites, rewritten like the others (the
    numerics test above checks that every layer ran the method)."""
    for r in ranks:
        sites = r["fsdp2_per_layer"]["sites"]
        assert sites and all(method == "monarch" and rewritten for _, method, rewritten, _ in sites)
