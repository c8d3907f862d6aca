"""The backend under DistributedDataParallel and FSDP2, on 2 CPU ranks with gloo.

Every scenario runs in one spawned job (spawning and importing torch cost more than the
scenarios), whose ranks write their measurements to files; the tests read them. The
reference is built differently from the code under test: KS launches per training step
of the same model compiled in a single process, and gradients of the *eager* model on
the concatenation of both ranks' batches (DDP and FSDP2 average the ranks' gradients).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ksfx
from ksfx.backend import KsfxCompiler
from tests.realworld.layers import BlockdiagLinear, MaskedTwoFactor, MonarchLinear

WORLD = 2
TIMEOUT_S = 300  # the whole job; a hung collective fails the tests instead of blocking them
TOL = {"rtol": 1e-4, "atol": 1e-5}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(not _has_fully_shard(), reason="FSDP2 (torch.distributed.fsdp.fully_shard) missing")


# ----------------------------------------------------------------------------- models (plain PyTorch)
class MonarchBlock(nn.Module):
    """``x + relu(Monarch(x))``, the Monarch layer written as fly/m2 write it (reshape, bmm, transpose, bmm)."""

    def __init__(self, features: int, nblocks: int):
        super().__init__()
        self.monarch = MonarchLinear(features, features, nblocks)

    def forward(self, x):
        return x + torch.relu(self.monarch(x))


class MaskedBlock(nn.Module):
    """``x + relu(h @ (mask2 * w2).t())`` with ``h = x @ (mask1 * w1).t()``: KS masks as buffers."""

    def __init__(self, features: int, nblocks: int):
        super().__init__()
        size = features // nblocks
        self.layer = MaskedTwoFactor((nblocks, size, size, 1), (1, size, size, nblocks))

    def forward(self, x):
        return x + torch.relu(self.layer(x))


class Shuffle(nn.Module):
    """The transpose between Monarch's two block-diagonal factors, as a layer of its own."""

    def __init__(self, nblocks: int):
        super().__init__()
        self.nblocks = nblocks

    def forward(self, x):
        return x.reshape(x.shape[0], self.nblocks, -1).transpose(1, 2).reshape(x.shape)


def monarch_sequential(features: int, nblocks: int) -> nn.Sequential:
    """One Monarch chain through three children of an ``nn.Sequential`` (m2's block-diagonal layers)."""
    return nn.Sequential(
        BlockdiagLinear(features, features, nblocks, bias=False),
        Shuffle(nblocks),
        BlockdiagLinear(features, features, nblocks),
    )


DEPTH = 3
ROWS = 4  # per rank


class Stack(nn.Module):
    """Blocks applied in turn by user code: one graph for the whole model (a bare
    ``nn.Sequential`` under DDP is compiled block by block, its loop being torch code)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


#: name -> (model, features); "large" models have more than DDP's 1 MB first bucket.
MODELS = {
    "monarch": (lambda: Stack(MonarchBlock(64, 8) for _ in range(DEPTH)), 64),
    # 384 kB per factor: DDP's 1 MB first bucket ends between the two factors of block 1
    "monarch_large": (lambda: Stack(MonarchBlock(768, 6) for _ in range(DEPTH)), 768),
    "masked": (lambda: Stack(MaskedBlock(16, 4) for _ in range(DEPTH)), 16),
    "masked_large": (lambda: Stack(MaskedBlock(512, 8) for _ in range(DEPTH)), 512),  # 1 MB per factor
    "sequential": (lambda: monarch_sequential(16, 4), 16),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ranks' inputs, and per-row loss weights (a loss whose gradient has no symmetry)."""
    features = MODELS[name][1]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * ROWS, features, generator=generator)
    return x, torch.linspace(-1, 1, WORLD * ROWS * features).reshape(x.shape)


def loss_of(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (y * weights).sum()


# ----------------------------------------------------------------------------- what each rank measures
def _launches(stats: dict[str, int], kind: str) -> int:
    return sum(v for k, v in stats.items() if k.endswith(kind))


def _step(model, x, weights) -> dict:
    """KS launches in one training step, forward and total (compiling launches nothing: fake tensors)."""
    ksfx.stats(reset=True)
    y = model(x)
    forward = _launches(ksfx.stats(), ".forward")
    loss_of(y, weights).backward()
    stats = ksfx.stats()
    return {"forward": forward, "total": _launches(stats, ".forward"), "grad_values": _launches(stats, ".grad_values")}


def _compiled(model, rewrite: str, reports: list):
    torch._dynamo.reset()
    return torch.compile(model, backend=KsfxCompiler(rewrite=rewrite, inner="aot_eager", reports=reports, cpu="op"))


def _chains(reports) -> list[dict]:
    return [
        {"patterns": c.patterns, "rewritten": c.rewritten, "verification": c.verification}
        for graph in reports
        for c in graph.chains
    ]


def _single(name: str, rewrite: str, rank: int) -> dict:
    """The same model compiled in this process alone (no wrapper) on this rank's rows."""
    model = build(name)
    x, weights = batch(name)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    reports: list = []
    result = _step(_compiled(model, rewrite, reports), x[rows], weights[rows])
    result["chains"] = _chains(reports)
    return result


def _ddp(
    name: str,
    rewrite: str,
    rank: int,
    bucket_cap_mb: float = 25.0,
    explain: bool = False,
    mode: str = "ddp_optimizer",
    compile_inside: bool = False,
) -> dict:
    """``mode``: Dynamo's ``optimize_ddp`` ("python_reducer" runs the backward under compiled
    autograd); ``compile_inside``: ``DDP(torch.compile(module))`` instead of ``torch.compile(DDP(module))``."""
    from torch.nn.parallel import DistributedDataParallel

    x, weights = batch(name)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    result = {}
    reports: list = []
    with torch._dynamo.config.patch(optimize_ddp=mode, compiled_autograd=mode == "python_reducer"):
        module = build(name)
        model = DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb)  # reads optimize_ddp
        if explain:
            torch._dynamo.reset()
            report = ksfx.explain(model, x[rows], rewrite=rewrite)
            result["explain"] = str(report)
            result["cut"] = report.ddp_cut_chains
        if compile_inside:
            model.module = _compiled(module, rewrite, reports)
            compiled = model
        else:
            compiled = _compiled(model, rewrite, reports)
        result.update(_step(compiled, x[rows], weights[rows]))
    result["chains"] = _chains(reports)
    result["pieces"] = sum(graph.ddp_piece for graph in reports)
    result["containers"] = sorted({graph.ddp_container for graph in reports})
    result["grads"] = {n: p.grad.clone() for n, p in module.named_parameters()}
    return result


def _fsdp2(name: str, rewrite: str, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = build(name)
    for block in model.blocks:  # a Stack
        fully_shard(block)
    fully_shard(model)
    x, weights = batch(name)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    reports: list = []
    result = _step(_compiled(model, rewrite, reports), x[rows], weights[rows])
    result["chains"] = _chains(reports)
    result["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # gathers the shards
    return result


#: scenario -> (function, model, rewrite mode, options)
SCENARIOS = {
    "single/monarch": (_single, "monarch", "always", {}),
    "single/monarch_large": (_single, "monarch_large", "always", {}),
    "single/masked": (_single, "masked", "always", {}),
    "single/masked_large": (_single, "masked_large", "auto", {}),
    "single/sequential": (_single, "sequential", "always", {}),
    "ddp/monarch": (_ddp, "monarch", "always", {}),
    "ddp/monarch_large": (_ddp, "monarch_large", "always", {"explain": True}),
    "ddp/masked_large": (_ddp, "masked_large", "auto", {"bucket_cap_mb": 1.0}),
    "ddp-no_optimization/monarch_large": (_ddp, "monarch_large", "always", {"mode": "no_optimization"}),
    "ddp-python_reducer/monarch_large": (_ddp, "monarch_large", "always", {"mode": "python_reducer"}),
    "ddp/sequential": (_ddp, "sequential", "always", {"explain": True}),
    "ddp-compile_inside/sequential": (_ddp, "sequential", "always", {"compile_inside": True}),
}
if _has_fully_shard():
    SCENARIOS["fsdp2/monarch"] = (_fsdp2, "monarch", "always", {})
    SCENARIOS["fsdp2/masked"] = (_fsdp2, "masked", "always", {})


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {}
        for key, (run, name, rewrite, options) in SCENARIOS.items():
            results[key] = run(name, rewrite, rank, **options)
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), None)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``[rank0, rank1]``: each a dict scenario -> measurements."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("distributed")
    init_method = f"file://{out_dir / 'store'}"  # a file rendezvous: no port to find or to race for
    interface = _loopback_interface()
    with pytest.MonkeyPatch.context() as env:
        if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
            env.setenv("GLOO_SOCKET_IFNAME", interface)  # the ranks' children inherit it
        context = mp.start_processes(
            _worker, args=(init_method, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {WORLD}-rank job did not finish within {TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def _reference_grads(name: str) -> dict[str, torch.Tensor]:
    """Eager, one process, both ranks' rows: the average of the ranks' gradients."""
    model = build(name)
    x, weights = batch(name)
    (loss_of(model(x), weights) / WORLD).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_grads(got: dict, name: str) -> None:
    want = _reference_grads(name)
    assert got.keys() == want.keys()
    for key in want:
        scale = max(float(want[key].abs().max()), 1.0)
        torch.testing.assert_close(got[key], want[key], rtol=TOL["rtol"], atol=TOL["atol"] * scale, msg=key)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_rewrites_the_same_chains_as_one_process(results, rank):
    ddp, single = results[rank]["ddp/monarch"], results[rank]["single/monarch"]
    assert ddp["pieces"] == 0  # the model fits DDP's first bucket: one graph
    assert [c["patterns"] for c in ddp["chains"]] == [c["patterns"] for c in single["chains"]]
    assert all(c["rewritten"] for c in ddp["chains"]) and len(ddp["chains"]) == DEPTH
    for kind in ("forward", "total", "grad_values"):
        assert ddp[kind] == single[kind] > 0, kind
    _assert_grads(ddp["grads"], "monarch")


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_optimizer_cut_is_reported_with_the_setting(results, rank):
    """DDP's default buckets, and the first (1 MB) ends between the two factors of block 1:
    every factor still runs as the KS op, with the blocks of one process, and explain names
    the chain cut and what keeps it whole. (The backward saves the cut intermediate
    instead of recomputing it: one forward launch fewer in total.)"""
    ddp, single = results[rank]["ddp/monarch_large"], results[rank]["single/monarch_large"]
    assert ddp["pieces"] > 1
    (whole,) = {tuple(c["patterns"]) for c in single["chains"]}  # every block has the same chain
    assert ddp["cut"] == [list(whole)]
    assert "1 KS chain(s) of the module alone reach the backend in parts under DDP" in ddp["explain"]
    assert "Dynamo's DDP optimizer cut the model into" in ddp["explain"]
    assert "torch._dynamo.config.optimize_ddp = False" in ddp["explain"]
    assert "'python_reducer' with torch._dynamo.config.compiled_autograd = True" in ddp["explain"]
    # The parts are the same factors; a lone factor may keep its permutations beside it
    # instead of in its (a, d) indices: compare blocks (b, c) and their count a * d.
    blocks = sorted((b, c, a * d) for chain in ddp["chains"] for a, b, c, d in chain["patterns"])
    assert blocks == sorted((b, c, a * d) for _ in range(DEPTH) for a, b, c, d in whole)
    assert all(c["rewritten"] and c["verification"].startswith("reproduces") for c in ddp["chains"])
    assert ddp["forward"] == single["forward"] and ddp["grad_values"] == single["grad_values"]
    _assert_grads(ddp["grads"], "monarch_large")


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_optimizer_pieces_read_masks(results, rank):
    """Each 1 MB masked factor fills a bucket: the DDP optimizer compiles every factor alone
    on fake inputs; the masks are read from the real buffers and each factor is rewritten
    (rewrite="auto": the masked dense product computes 8x the KS factor)."""
    ddp, single = results[rank]["ddp/masked_large"], results[rank]["single/masked_large"]
    assert ddp["pieces"] == 2 * DEPTH
    assert all(c["rewritten"] for c in single["chains"]) and len(single["chains"]) == DEPTH
    assert all(c["rewritten"] and len(c["patterns"]) == 1 for c in ddp["chains"]) and len(ddp["chains"]) == 2 * DEPTH
    assert ddp["forward"] == single["forward"] and ddp["grad_values"] == single["grad_values"]
    _assert_grads(ddp["grads"], "masked_large")


@pytest.mark.parametrize("mode", ["no_optimization", "python_reducer"])
@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_settings_explain_recommends_keep_the_chain_whole(results, rank, mode):
    """``optimize_ddp = False`` ("no_optimization") or "python_reducer": one graph, the
    chains and launches of one process, on the model whose chain the DDP optimizer cuts."""
    ddp, single = results[rank][f"ddp-{mode}/monarch_large"], results[rank]["single/monarch_large"]
    assert ddp["pieces"] == 0
    assert [c["patterns"] for c in ddp["chains"]] == [c["patterns"] for c in single["chains"]]
    for kind in ("forward", "total", "grad_values"):
        assert ddp[kind] == single[kind] > 0, kind
    _assert_grads(ddp["grads"], "monarch_large")


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_of_a_sequential_names_the_cause_and_compiling_inside_keeps_the_chain(results, rank):
    """``torch.compile(DDP(nn.Sequential(...)))``: Dynamo compiles each child apart, with or
    without the DDP optimizer, and a chain through the children is cut; explain says so
    and what to do. ``DDP(torch.compile(sequential))``: the chains and launches of one process."""
    cut, inside, single = (
        results[rank][key] for key in ("ddp/sequential", "ddp-compile_inside/sequential", "single/sequential")
    )
    (whole,) = [c["patterns"] for c in single["chains"]]
    assert len(whole) == 2 and cut["cut"] == [whole]
    assert "torch.nn.modules.container.Sequential.forward" in cut["explain"]
    assert "DDP(torch.compile(module, backend=...))" in cut["explain"]
    _assert_grads(cut["grads"], "sequential")  # cut, each part rewritten alone: still right
    assert cut["containers"] == ["torch.nn.modules.container.Sequential.forward"]
    assert inside["containers"] == [""]  # compiled inside DDP: nothing to warn about
    assert [c["patterns"] for c in inside["chains"]] == [whole]
    for kind in ("forward", "total", "grad_values"):
        assert inside[kind] == single[kind] > 0, kind
    _assert_grads(inside["grads"], "sequential")


@needs_fsdp2
@pytest.mark.parametrize("name", ["monarch", "masked"])
@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_rewrites_the_same_chains_as_one_process(results, rank, name):
    """One graph per ``fully_shard`` block (FSDP2's hooks run between them); the masks of
    FSDP-managed modules are module state, not activations."""
    fsdp, single = results[rank][f"fsdp2/{name}"], results[rank][f"single/{name}"]
    (whole,) = {tuple(c["patterns"]) for c in single["chains"]}
    assert {tuple(c["patterns"]) for c in fsdp["chains"]} == {whole}
    assert all(c["rewritten"] for c in fsdp["chains"])
    for kind in ("forward", "total", "grad_values"):
        assert fsdp[kind] == single[kind] > 0, kind
    _assert_grads(fsdp["grads"], name)
