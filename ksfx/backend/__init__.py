"""The ``ksfx`` torch.compile backend.

``torch.compile(model, backend="ksfx")`` (through the ``torch_dynamo_backends`` entry
point, no import needed) or ``torch.compile(model, backend=ksfx.backend(rewrite="always"))``;
``ksfx.export(model, args)`` for a ``torch.export`` program (AOTInductor) with the chains rewritten.
"""

from __future__ import annotations

from ksfx.backend.compile import GraphReport, KsfxCompiler
from ksfx.backend.explain import Report, explain
from ksfx.backend.export import export


def backend(rewrite: str = "auto", inner="inductor") -> KsfxCompiler:
    """A torch.compile backend that rewrites KS chains, then runs ``inner`` on the graph.

    ``rewrite``: ``"auto"`` (cost model), ``"always"`` or ``"never"``. ``inner``:
    ``"inductor"`` (default), ``"aot_eager"``, ``"eager"`` or a backend callable.
    """
    return KsfxCompiler(rewrite=rewrite, inner=inner)


def ksfx_backend(gm, example_inputs):
    """The entry point behind ``backend="ksfx"``: default options."""
    return KsfxCompiler()(gm, example_inputs)


__all__ = ["GraphReport", "KsfxCompiler", "Report", "backend", "explain", "export", "ksfx_backend"]
