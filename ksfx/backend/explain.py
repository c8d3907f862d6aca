"""``ksfx.explain``: what the backend would find and rewrite, without changing the model."""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field

import torch

from ksfx.backend.compile import GraphReport, KsfxCompiler
from ksfx.codegen.fusion import describe, segments
from ksfx.ops.dispatch import gpu_ceilings
from ksfx.passes import ChainReport
from ksfx.pattern import split_chain


@dataclass
class Report:
    """Chains found in every graph Dynamo captured, graph breaks, and the rewritten graphs."""

    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: list = field(default_factory=list)
    graph_breaks_note: str = ""
    #: Under DDP: how Dynamo's DDP optimizer cut the model, which chains it split, what to set.
    ddp_note: str = ""
    ddp_cut_chains: list[list[tuple[int, int, int, int]]] = field(default_factory=list)

    @property
    def chains(self) -> list[ChainReport]:
        return [chain for graph in self.graphs for chain in graph.chains]

    def __str__(self) -> str:
        lines = [
            f"ksfx: {len(self.graphs)} graph(s), {len(self.chains)} chain(s), "
            f"{sum(c.rewritten for c in self.chains)} rewritten"
        ]
        header = f"{'graph':>5}  {'rewritten':<9}  {'layout':<11}  {'patterns (leftmost first)':<40}  reason"
        lines.append(header)
        lines.append("-" * len(header))
        for graph in self.graphs:
            if graph.note:
                lines.append(f"{graph.index:>5}  {graph.note}")
            if graph.specialised:
                lines.append(f"{graph.index:>5}  feature widths specialised (guarded): {', '.join(graph.specialised)}")
            for chain in graph.chains:
                layout = "" if chain.batch_last is None else ("batch-last" if chain.batch_last else "batch-first")
                if chain.plan is not None and chain.plan.inner_dims:
                    layout = "middle"  # batch dimensions on both sides of the features (N, C, H, W)
                patterns = ", ".join(str(p) for p in chain.patterns) or "-"
                lines.append(
                    f"{graph.index:>5}  {('yes' if chain.rewritten else 'no'):<9}  {layout:<11}  {patterns:<40}  "
                    f"{chain.reason}"
                )
                lines.append(f"{'':>5}  nodes {chain.root} -> {chain.end}: {' '.join(chain.nodes)}")
                if chain.stopped:
                    lines.append(f"{'':>5}  ends at {chain.end}, a later end failed: {chain.stopped}")
                if chain.chain:
                    lines.append(f"{'':>5}  W = {chain.chain}")
                if chain.permutations:
                    lines.append(f"{'':>5}  permutations: {'; '.join(chain.permutations)}")
                if chain.estimate is not None:
                    lines.append(f"{'':>5}  estimate: {chain.estimate}")
                if chain.verification:
                    lines.append(f"{'':>5}  check: {chain.verification}")
                if chain.rewritten and chain.plan is not None:
                    lines.append(f"{'':>5}  generated kernels: {_kernel_plan(chain)}")
        if self.ddp_note:
            lines.append("")
            lines.append(f"DDP: {self.ddp_note}")
        lines.append("")
        lines.append("graph breaks:")
        if self.graph_breaks:
            lines.extend(f"  {gb}" for gb in self.graph_breaks)
        else:
            lines.append(f"  {self.graph_breaks_note or 'none'}")
        for graph in self.graphs:
            if graph.code:
                lines.append("")
                lines.append(f"rewritten graph {graph.index}:")
                lines.append(graph.code.strip())
        return "\n".join(lines)


def _kernel_plan(chain: ChainReport) -> str:
    """How the generated kernels would run the chain: fused segments and single steps, under
    the interpreter and on a GPU (this machine's, else an H100) with fusion switched on."""
    plan = split_chain(chain.plan.chain)
    if not isinstance(plan, list):
        return "a single gather"
    here = describe(segments(plan, chain.plan.batch_last))
    value = chain.plan.root.meta.get("val")
    dtype = chain.plan.cast or (value.dtype if isinstance(value, torch.Tensor) else torch.float32)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "H100"
    ceil = gpu_ceilings(gpu, dtype)
    there = describe(segments(plan, chain.plan.batch_last, ceil=ceil))
    where = f"on {ceil.device} in {str(dtype).removeprefix('torch.')}"
    if dtype == torch.float32:
        where += f" (matmul precision {torch.get_float32_matmul_precision()!r})"
    there = ("the same" if there == here else there) + " (each fused segment timed at its first call)"
    return f"{here} under the interpreter; {where} by the roofline: {there}"


def _find_graph_breaks(model, example_inputs):
    if importlib.util.find_spec("ksfx.passes.graph_breaks") is None:
        return [], "graph-break reporting is not available in this build"
    from ksfx.passes.graph_breaks import find_graph_breaks

    breaks = find_graph_breaks(model, *example_inputs)
    return list(breaks), "" if breaks else "none"


def explain(
    model: torch.nn.Module, *example_inputs, rewrite: str = "auto", dynamic: bool | None = False, cpu: str | None = None
) -> Report:
    """Run Dynamo + the ksfx pass on ``model(*example_inputs)`` and report; the model is untouched.

    ``rewrite``, ``cpu``: as for :func:`ksfx.backend`; ``dynamic``: as for ``torch.compile``.

    Buffers (e.g. batch-norm statistics) and the RNG state are restored after the traced
    call; the model is called under ``torch.no_grad()``. For a ``DistributedDataParallel``
    model, the wrapped module is also traced alone, and the report names the chains that
    do not reach the backend whole under DDP, why, and what to change.
    """
    report = Report()
    _trace(model, example_inputs, KsfxCompiler(rewrite=rewrite, inner="eager", reports=report.graphs, cpu=cpu), dynamic)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        alone: list[GraphReport] = []
        alone_compiler = KsfxCompiler(rewrite=rewrite, inner="eager", reports=alone, cpu=cpu)
        _trace(model.module, example_inputs, alone_compiler, dynamic)
        report.ddp_cut_chains = _cut_chains(report.graphs, alone)
        report.ddp_note = _ddp_note(report.graphs, report.ddp_cut_chains)
    report.graph_breaks, report.graph_breaks_note = _find_graph_breaks(model, example_inputs)
    return report


def _trace(model, example_inputs, compiler: KsfxCompiler, dynamic) -> None:
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, torch.nn.Module) else []
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        compiled = torch.compile(model, backend=compiler, dynamic=dynamic)
        with torch.no_grad():
            compiled(*example_inputs)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _cut_chains(graphs: list[GraphReport], alone: list[GraphReport]) -> list[list[tuple[int, int, int, int]]]:
    """Chains of the module traced alone that no graph holds whole (compared by patterns, with multiplicity)."""
    found = Counter(tuple(chain.patterns) for graph in graphs for chain in graph.chains)
    cut = []
    for chain in (chain for graph in alone for chain in graph.chains):
        key = tuple(chain.patterns)
        if found[key] > 0:
            found[key] -= 1
        elif chain.patterns:
            cut.append(list(chain.patterns))
    return cut


def _ddp_note(graphs: list[GraphReport], cut: list) -> str:
    causes = []
    pieces = sum(graph.ddp_piece for graph in graphs)
    if pieces:
        causes.append(
            f"Dynamo's DDP optimizer cut the model into {pieces} graphs at DDP's gradient-bucket boundaries "
            "(set torch._dynamo.config.optimize_ddp = False, which overlaps no all-reduce with the compiled "
            "backward, or = 'python_reducer' with torch._dynamo.config.compiled_autograd = True before "
            "wrapping the model in DDP; a larger bucket_cap_mb moves the cuts)"
        )
    container = next((graph.ddp_container for graph in graphs if graph.ddp_container), "")
    if container:
        causes.append(
            f"the wrapped module's forward is torch code ({container}), in which Dynamo starts no graph, so "
            "each child module is a graph of its own (compile the module before wrapping it: "
            "DDP(torch.compile(module, backend=...)), or give it a forward of your own)"
        )
    if not cut:
        return "every KS chain of the module alone reaches the backend whole" + (
            f"; {'; '.join(causes)}" if causes else ""
        )
    chains = "; ".join(", ".join(str(p) for p in patterns) for patterns in cut)
    why = "; ".join(causes) if causes else "for a reason ksfx does not recognise"
    return (
        f"{len(cut)} KS chain(s) of the module alone reach the backend in parts under DDP ({chains}), each part "
        f"planned as a chain of its own: {why}."
    )
