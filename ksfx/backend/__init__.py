"""The ``ksfx`` torch.compile backend.

``torch.compile(model, backend="ksfx")`` (through the ``torch_dynamo_backends`` entry
point, no import needed) or ``torch.compile(model, backend=ksfx.backend(rewrite="always"))``;
``ksfx.export(model, args)`` for a ``torch.export`` program (AOTInductor) with the chains rewritten.
"""

from __future__ import annotations

from ksfx.backend.compile import GraphReport, KsfxCompiler
from ksfx.backend.explain import Report, explain
from ksfx.backend.export import export


def backend(
    rewrite: str = "auto",
    inner="inductor",
    cpu: str | None = None,
    cuda: str = "triton_op",
    epilogue_fusion: bool = False,
) -> KsfxCompiler:
    """A torch.compile backend that rewrites KS chains, then runs ``inner`` on the graph.

    ``rewrite``: ``"auto"`` (cost model), ``"always"`` or ``"never"``. ``inner``:
    ``"inductor"`` (default), ``"aot_eager"``, ``"eager"`` or a backend callable.
    ``cpu``: on CPU tensors a rewritten chain is inlined as aten ops the inner compiler
    fuses (``"aten"``, the default) or stays one ``ksfx::ks_chain`` call (``"op"``, the
    default under ``TRITON_INTERPRET=1``, where the op runs the Triton kernels).
    ``cuda``: on CUDA tensors it becomes the kernel launches themselves, which Inductor
    generates, CUDA-graphs and packages (``"triton_op"``, the default), or stays one
    ``ksfx::ks_chain`` call that launches them from Python (``"op"``). ``epilogue_fusion``:
    let Inductor fuse the pointwise op after such a chain into its kernel's store (Inductor's
    prototype ``epilogue_fusion_user_defined_triton_kernel``; off by default, unmeasured).
    """
    return KsfxCompiler(rewrite=rewrite, inner=inner, cpu=cpu, cuda=cuda, epilogue_fusion=epilogue_fusion)


def ksfx_backend(gm, example_inputs, mode: str | None = None, options: dict | None = None):
    """The entry point behind ``backend="ksfx"``: default options; torch.compile's ``mode``
    and ``options`` configure the inner Inductor."""
    return KsfxCompiler()(gm, example_inputs, mode=mode, options=options)


__all__ = ["GraphReport", "KsfxCompiler", "Report", "backend", "explain", "export", "ksfx_backend"]
