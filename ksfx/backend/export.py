"""``ksfx.export``: a ``torch.export.ExportedProgram`` whose graph holds the rewritten chains.

The model is exported (``strict=False``) and lowered with ``run_decompositions`` to core
ATen, keeping the data-movement ops the pass reads as they are: the aten form the pass
reads under torch.compile too (views, permutes, bmm, addmm, ``block_diag``). Parameters,
buffers and lifted constants are placeholders there and the graph signature says which is
which, so the pass gets the same weight / value-known / learnable classification as
Dynamo's placeholders give it in :mod:`ksfx.backend.compile`.
The pass rewrites ``ep.graph_module`` in place; the program is then rebuilt around it:

* nodes the pass inserted get ``meta["val"]`` (fake tensors, symbolic batch sizes from
  ``dynamic_shapes`` included), which the export verifier and AOTInductor read;
* constant index tables the rewrite stores on the graph module (``get_attr``) are lifted
  to ``CONSTANT_TENSOR`` inputs, as export lifts constants itself;
* user inputs are unchanged; outputs keep their kinds, with the names of the new nodes.

A later ``run_decompositions()`` on the result keeps the op and the checks below.

Supports that depend on tensor values (masks, constant index tables, frozen weights:
``plan.guards``) cannot be re-checked by a wrapper around the program (the compile
backend's guard), because ``ep.module()`` and an AOTInductor package run the graph alone
and their weights can be replaced after export. The check therefore goes *into* the graph:
for each such tensor an ``aten._assert_async`` that fails when a mask or frozen weight has
gained a nonzero outside the support the rewrite assumed, or an index table changed. A
changed tensor raises at run time; it is never silently wrong.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputSpec,
    TensorArgument,
)
from torch.fx.node import map_arg

from ksfx.backend.compile import GraphReport, _device_type, _support_signature
from ksfx.backend.explain import Report
from ksfx.backend.timing import time_chains
from ksfx.passes import LAUNCHED_BY_INDUCTOR, retarget, run_pass
from ksfx.passes.cost import MODES
from ksfx.passes.weights import DATA_MOVEMENT

log = logging.getLogger("ksfx.passes")
aten = torch.ops.aten

#: Note put on the report: export fails instead of breaking the graph.
NO_GRAPH_BREAKS = "none: torch.export captures the whole model in one graph (or fails)"


def export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    dynamic_shapes=None,
    rewrite: str = "auto",
    report: Report | None = None,
) -> ExportedProgram:
    """``torch.export.export(model, args, kwargs, dynamic_shapes=..., strict=False)`` in core
    ATen, with every KS chain the pass accepts replaced by ``torch.ops.ksfx.ks_chain``
    (on CUDA its ``triton_op`` twin ``ksfx.ks_chain_triton``, which AOTInductor compiles into
    the kernels it packages).

    ``rewrite``: ``"auto"`` (cost model, per device), ``"always"`` or ``"never"`` (the plain
    core-ATen export). ``report``: a :class:`ksfx.backend.Report` that receives one graph
    report (chains found, why each was or was not rewritten, the rewritten graph), printed
    as ``ksfx.explain`` prints. A program with rewritten chains needs ``import ksfx`` in the
    process that runs it, ``ep.module()`` and AOTInductor packages alike (the op is a
    Python custom op; see README).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if rewrite not in MODES:
        raise ValueError(f"rewrite must be one of {MODES}, got {rewrite!r}")
    if report is not None and not isinstance(report, Report):
        raise TypeError(f"report must be a ksfx.backend.Report or None, got {type(report).__name__}")

    exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    ep = exported.run_decompositions(_decompositions())
    graph_report = GraphReport(len(report.graphs) if report is not None else 0)
    if report is not None:
        report.graphs.append(graph_report)
        report.graph_breaks_note = NO_GRAPH_BREAKS
    try:
        program = _rewrite(ep, rewrite, graph_report)
    except Exception as err:  # noqa: BLE001 - a bug in the pass must never break the user's export
        graph_report.note = f"pass failed, the plain core-ATen export is returned ({type(err).__name__}: {err})"
        graph_report.chains, graph_report.code = [], None
        log.warning("ksfx.export: %s", graph_report.note, exc_info=True)
        return exported.run_decompositions(_decompositions())  # the failed pass may have left ep's graph half rewritten
    rewritten = sum(c.rewritten for c in graph_report.chains)
    log.info("ksfx.export: %d chain(s) found, %d rewritten", len(graph_report.chains), rewritten)
    return program


def _rewrite(ep: ExportedProgram, mode: str, graph_report: GraphReport) -> ExportedProgram:
    """Run the pass on ``ep``'s graph (in place) and rebuild the program around it."""
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights, known, learnable = _classify(ep, placeholders)
    device_type = _device_type([n.meta.get("val") for n in placeholders])
    graph_report.chains = run_pass(gm, weights, known, learnable, mode=mode, device_type=device_type)
    rewritten = [c for c in graph_report.chains if c.rewritten]
    if not rewritten:
        return ep
    if device_type == "cuda":  # AOTInductor decomposes it into kernels it packages: no Python op left
        retarget(gm, LAUNCHED_BY_INDUCTOR)
        time_chains(gm, backward=False)  # AOTInductor's trace, in this process, finds the timings
    names = {node: spec.target for node, spec in zip(placeholders, ep.graph_signature.input_specs, strict=True)}
    for node in sorted({g for c in rewritten for g in c.plan.guards}, key=placeholders.index):
        if node not in known:
            raise RuntimeError(f"the support of a rewritten chain depends on {node.name}, whose value is unknown")
        _insert_check(gm, node, names[node], known[node])
    _fill_meta(gm, placeholders)
    program = _rebuild(ep, gm)
    graph_report.code = program.graph_module.code
    return program


def _decompositions():
    """Core ATen, except the data-movement ops the pass reads as they are (``block_diag``,
    ``stack``, ``unbind``…): their core decompositions (zeros + ``slice_scatter``…) would hide
    which weight entry lands where. ``make_fx`` under torch.compile keeps them too."""
    table = torch.export.default_decompositions()
    for op in DATA_MOVEMENT:
        table.pop(op, None)
    return table


def _classify(ep: ExportedProgram, placeholders: list[fx.Node]):
    """``(weights, known, learnable)`` placeholders, read from the graph signature.

    Parameters that require grad are learnable (values random in the pass's check, never
    read); buffers, lifted constants and frozen parameters are value-known: their values may
    shape a support, and then the rewrite checks them in the graph.
    """
    weights, known, learnable = set(), {}, set()
    for node, spec in zip(placeholders, ep.graph_signature.input_specs, strict=True):
        if spec.kind == InputKind.PARAMETER:
            value = ep.state_dict[spec.target]
        elif spec.kind == InputKind.BUFFER:
            value = ep.state_dict[spec.target] if spec.persistent else ep.constants[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            value = ep.constants[spec.target]
        else:
            continue
        if not isinstance(value, torch.Tensor):
            continue
        weights.add(node)
        if spec.kind == InputKind.PARAMETER and value.requires_grad:
            learnable.add(node)
        else:
            known[node] = value
    return weights, known, learnable


def _insert_check(gm: fx.GraphModule, node: fx.Node, target: str, value: torch.Tensor) -> None:
    """An in-graph assertion that ``node`` still allows the supports it shaped at export."""
    graph = gm.graph
    signature = _support_signature(value)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        reference = graph.get_attr(_register(gm, "_ksfx_guard", signature))
        if signature.dtype == torch.bool:
            nonzero = graph.call_function(aten.ne.Scalar, (node, 0))
            outside = graph.call_function(
                aten.logical_and.default, (nonzero, graph.call_function(aten.logical_not.default, (reference,)))
            )
            ok = graph.call_function(aten.logical_not.default, (graph.call_function(aten.any.default, (outside,)),))
            what = "has a nonzero outside the support"
        else:
            ok = graph.call_function(aten.all.default, (graph.call_function(aten.eq.Tensor, (node, reference)),))
            what = "differs from the index table"
        message = (
            f"ksfx: {target} {what} that the exported program's KS chains were rewritten for; "
            "export the model again (ksfx.export) after changing it"
        )
        graph.call_function(aten._assert_async.msg, (ok, message))


def _register(gm: fx.GraphModule, prefix: str, tensor: torch.Tensor) -> str:
    k = 0
    while hasattr(gm, f"{prefix}_{k}"):
        k += 1
    name = f"{prefix}_{k}"
    gm.register_buffer(name, tensor)
    return name


def _fill_meta(gm: fx.GraphModule, placeholders: list[fx.Node]) -> None:
    """``meta["val"]`` for the nodes the rewrite added, run on the export's fake tensors."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta["val"] for n in placeholders if "val" in n.meta])
    # no_grad: the program is inference IR; static constants: new sizes would become guards
    with fake_mode, torch.no_grad():
        for node in gm.graph.nodes:
            if "val" in node.meta or node.op == "output":
                continue
            if node.op == "get_attr":
                node.meta["val"] = fake_mode.from_tensor(getattr(gm, node.target), static_shapes=True)
            elif node.op == "call_function":
                args = map_arg(node.args, lambda n: n.meta["val"])
                kwargs = map_arg(node.kwargs, lambda n: n.meta["val"])
                out = node.target(*args, **kwargs)
                if out is not None:
                    node.meta["val"] = out


def _rebuild(ep: ExportedProgram, gm: fx.GraphModule) -> ExportedProgram:
    """The program around the rewritten graph: constants lifted, output names updated."""
    graph = gm.graph
    input_specs = list(ep.graph_signature.input_specs)
    constants = dict(ep.constants)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user = [k for k, spec in enumerate(input_specs) if spec.kind == InputKind.USER_INPUT]
    position = user[0] if user else len(input_specs)
    # lifted constants go after the existing ones, before the user inputs (export's order)
    anchor = placeholders[position] if user else next(n for n in graph.nodes if n.op != "placeholder")
    readers: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(gm, node.target), torch.Tensor):
            readers.setdefault(node.target, []).append(node)
    for attr, nodes in readers.items():
        tensor = getattr(gm, attr)
        target = attr
        while target in constants:
            target = f"{target}_"
        with graph.inserting_before(anchor):
            lifted = graph.placeholder(f"c{target}")
        lifted.meta.update(nodes[0].meta)
        for node in nodes:
            node.replace_all_uses_with(lifted)
            graph.erase_node(node)
        delattr(gm, attr)
        constants[target] = tensor
        input_specs.insert(position, InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(lifted.name), target))
        position += 1
    output = next(n for n in graph.nodes if n.op == "output")
    output_specs = []
    for spec, arg in zip(ep.graph_signature.output_specs, output.args[0], strict=True):
        if isinstance(spec.arg, TensorArgument):
            spec = OutputSpec(spec.kind, TensorArgument(arg.name), spec.target)
        output_specs.append(spec)
    graph.lint()
    gm.recompile()
    return ExportedProgram(
        root=gm,
        graph=graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=ep.state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=constants,
        verifiers=ep.verifiers,
    )
