"""``ksfx.explain``: what the backend would find and rewrite, without changing the model."""

from __future__ import annotations

import importlib.util
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
    call; the model is called under ``torch.no_grad()``.
    """
    report = Report()
    compiler = KsfxCompiler(rewrite=rewrite, inner="eager", reports=report.graphs)
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, torch.nn.Module) else []
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        compiled = torch.compile(model, backend=compiler, dynamic=dynamic)
        with torch.no_grad():
            compiled(*example_inputs)
        report.graph_breaks, report.graph_breaks_note = _find_graph_breaks(model, example_inputs)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return report
