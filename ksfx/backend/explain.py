"""``ksfx.explain``: what the backend would find and rewrite, without changing the model."""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field

import torch

from ksfx.backend.compile import GraphReport, KsfxCompiler
from ksfx.passes import ChainReport


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
            for chain in graph.chains:
                layout = "" if chain.batch_last is None else ("batch-last" if chain.batch_last else "batch-first")
                patterns = ", ".join(str(p) for p in chain.patterns) or "-"
                lines.append(
                    f"{graph.index:>5}  {('yes' if chain.rewritten else 'no'):<9}  {layout:<11}  {patterns:<40}  "
                    f"{chain.reason}"
                )
                lines.append(f"{'':>5}  nodes {chain.root} -> {chain.end}: {' '.join(chain.nodes)}")
                if chain.chain:
                    lines.append(f"{'':>5}  W = {chain.chain}")
                if chain.permutations:
                    lines.append(f"{'':>5}  permutations: {'; '.join(chain.permutations)}")
                if chain.estimate is not None:
                    lines.append(f"{'':>5}  estimate: {chain.estimate}")
                if chain.verification:
                    lines.append(f"{'':>5}  check: {chain.verification}")
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


def _find_graph_breaks(model, example_inputs):
    if importlib.util.find_spec("ksfx.passes.graph_breaks") is None:
        return [], "graph-break reporting is not available in this build"
    from ksfx.passes.graph_breaks import find_graph_breaks

    breaks = find_graph_breaks(model, *example_inputs)
    return list(breaks), "" if breaks else "none"


def explain(model: torch.nn.Module, *example_inputs, rewrite: str = "auto", dynamic: bool | None = False) -> Report:
    """Run Dynamo + the ksfx pass on ``model(*example_inputs)`` and report; the model is untouched.

    Buffers (e.g. batch-norm statistics) and the RNG state are restored after the traced
    call; the model is called under ``torch.no_grad()``. When Dynamo's DDP optimizer cuts
    a DDP model into one graph per gradient bucket, the model is traced a second time with
    ``optimize_ddp=False`` and the report names the chains the cuts split.
    """
    report = Report()
    _trace(model, example_inputs, rewrite, dynamic, report.graphs)
    pieces = sum(graph.ddp_piece for graph in report.graphs)
    if pieces:
        whole: list[GraphReport] = []
        with torch._dynamo.config.patch(optimize_ddp=False):
            _trace(model, example_inputs, rewrite, dynamic, whole)
        report.ddp_cut_chains = _cut_chains(report.graphs, whole)
        report.ddp_note = _ddp_note(pieces, report.ddp_cut_chains)
    report.graph_breaks, report.graph_breaks_note = _find_graph_breaks(model, example_inputs)
    return report


def _trace(model, example_inputs, rewrite: str, dynamic, graphs: list[GraphReport]) -> None:
    compiler = KsfxCompiler(rewrite=rewrite, inner="eager", reports=graphs)
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


def _cut_chains(pieces: list[GraphReport], whole: list[GraphReport]) -> list[list[tuple[int, int, int, int]]]:
    """Chains of the uncut graphs that no piece holds whole (compared by patterns, with multiplicity)."""
    found = Counter(tuple(chain.patterns) for graph in pieces for chain in graph.chains)
    cut = []
    for chain in (chain for graph in whole for chain in graph.chains):
        key = tuple(chain.patterns)
        if found[key] > 0:
            found[key] -= 1
        elif chain.patterns:
            cut.append(list(chain.patterns))
    return cut


def _ddp_note(pieces: int, cut: list) -> str:
    split = f"Dynamo's DDP optimizer cut the model into {pieces} graphs at DDP's gradient-bucket boundaries"
    if not cut:
        return f"{split}; no KS chain crosses a cut."
    chains = "; ".join(", ".join(str(p) for p in patterns) for patterns in cut)
    return (
        f"{split}, splitting {len(cut)} KS chain(s) ({chains}): each part is planned as a chain of its own, "
        "with its own ops. To keep every chain whole, set torch._dynamo.config.optimize_ddp = False "
        "(the compiled backward then starts no all-reduce before it ends), or = 'python_reducer' with "
        "torch._dynamo.config.compiled_autograd = True before wrapping the model in DDP; a larger bucket_cap_mb "
        "moves the cuts."
    )
