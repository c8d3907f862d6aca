"""The torch.compile glue: lower Dynamo's graph to aten, run the pass, hand over.

Dynamo gives the backend a torch-level graph whose parameters and buffers are
placeholders and whose ``example_inputs`` are the real tensors. We trace that graph to
aten with ``make_fx`` under Dynamo's own fake mode (symbolic batch sizes survive), run
the pass on the aten graph, and give the rewritten graph to the inner compiler
(Inductor by default), which runs AOT autograd on it: the KS op's registered autograd
provides the backward, so training needs no pattern matching on backward graphs.

When nothing is rewritten the *original* Dynamo graph goes to the inner compiler, so the
backend is exactly the inner compiler on graphs without KS work. Supports that depend on
tensor values (masks, index tables, frozen weights) are guarded at every call: if such a
tensor changed in a way that invalidates the rewrite, the call falls back to the
original graph (eagerly) and says so in a warning.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from ksfx.backend import lowerings
from ksfx.backend.timing import time_chains
from ksfx.backend.widths import specialise_widths
from ksfx.config import config
from ksfx.passes import AS_CUSTOM_OP, INLINE_ON_CPU, LAUNCHED_BY_INDUCTOR, ChainReport, retarget, run_pass
from ksfx.passes.cost import MODES

log = logging.getLogger("ksfx.passes")

INNER = ("inductor", "aot_eager", "eager")


@dataclass
class GraphReport:
    """What the pass did to one graph Dynamo captured."""

    index: int
    chains: list[ChainReport] = field(default_factory=list)
    code: str | None = None  # the rewritten aten graph, when something was rewritten
    note: str = ""
    specialised: list[str] = field(default_factory=list)  # symbolic widths guarded to their value
    ddp_piece: bool = False  # one of the graphs Dynamo's DDP optimizer cut a DDP model into
    ddp_container: str = ""  # compiled inside DDP whose wrapped module's forward is this torch code


def _inner_compiler(inner) -> Callable:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        lowerings.register()
        return compile_fx
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    raise ValueError(f"inner must be one of {INNER} or a callable (gm, example_inputs), got {inner!r}")


def _classify(gm: fx.GraphModule, example_inputs):
    """Placeholders that are weights, those whose values may shape supports (with the real
    tensors), the learnable ones.

    Module state is recognised by its Dynamo source: ``*_NN_MODULE`` guard sources, and
    ``*_FSDP_MODULE`` ones for modules wrapped by FSDP2's ``fully_shard`` (whose buffers,
    a KS mask say, are plain tensors). Dynamo's DDP optimizer compiles each piece of its
    split graph with *fake* example inputs; the real parameter or buffer is then read from
    the placeholder's graph argument, which Dynamo keeps on every piece's placeholders.
    """
    weights, known, learnable = [], {}, []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for k, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
        if not isinstance(value, torch.Tensor):
            continue
        grapharg = node.meta.get("grapharg")
        if isinstance(value, torch._subclasses.FakeTensor):
            real = getattr(grapharg, "example", None)
            if isinstance(real, torch.Tensor) and not isinstance(real, torch._subclasses.FakeTensor):
                value = real
        guard_source = getattr(getattr(grapharg, "source", None), "guard_source", None)
        if callable(guard_source):  # a method in older torch releases, a property in newer ones
            guard_source = guard_source()
        name = getattr(guard_source, "name", str(guard_source))
        from_module = "NN_MODULE" in name or "FSDP_MODULE" in name
        is_param = isinstance(value, torch.nn.Parameter)
        if not (is_param or from_module):
            continue
        weights.append(k)
        if is_param and value.requires_grad:
            learnable.append(k)
        elif not isinstance(value, torch._subclasses.FakeTensor):
            known[k] = value
    return weights, known, learnable


def lower(gm: fx.GraphModule, example_inputs, decompositions=None) -> fx.GraphModule:
    """``gm`` traced to aten (views, permutes, bmm…) with Dynamo's fake mode and metadata.

    ``decompositions`` (op → function) replace ops by what the functions trace to.
    """
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_type = torch._subclasses.FakeTensor
    fakes = [
        fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, fake_type) else x
        for x in example_inputs
    ]
    allowed = fake_mode.allow_non_fake_inputs
    if decompositions is not None:  # re-tracing a rewritten graph: its index tables are real constants
        fake_mode.allow_non_fake_inputs = True
    try:
        with fake_mode:
            aten_gm = make_fx(gm, decompositions, tracing_mode="real")(*fakes)
    finally:
        fake_mode.allow_non_fake_inputs = allowed
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(old) != len(new):
        raise RuntimeError(f"lowering changed the number of inputs ({len(old)} -> {len(new)})")
    for before, after in zip(old, new, strict=True):
        for key, value in before.meta.items():
            after.meta.setdefault(key, value)
        if hasattr(before, "_dynamo_source"):
            after._dynamo_source = before._dynamo_source
    aten_gm.meta.update(gm.meta)
    return aten_gm


def _custom_autograd(gm: fx.GraphModule) -> list[str]:
    """Names of ``autograd.Function`` calls Dynamo kept whole (``allow_in_graph``)."""
    found = []
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if "autograd_apply" in name or "autograd_function_apply" in name:
            found.append(node.name)
    return found


def _refusal(gm: fx.GraphModule, example_inputs) -> str | None:
    """Why no chain of this graph may be rewritten, if some reason holds for the whole graph.

    Lowering to aten runs an ``autograd.Function``'s forward and drops its hand-written
    backward; AOT autograd then differentiates the forward ops instead. That is only
    certain to be the same when no gradient is needed, so such graphs are rewritten for
    inference only.
    """
    custom = _custom_autograd(gm)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )
    if custom and needs_grad:
        return (
            f"the graph calls autograd.Function(s) ({', '.join(custom)}) whose custom backward would be "
            "replaced: rewritten for inference (torch.no_grad) only"
        )
    return None


def _ddp_piece(gm: fx.GraphModule) -> bool:
    """Whether Dynamo's DDP optimizer cut ``gm`` out of a larger graph (at a DDP
    gradient-bucket boundary): it marks every piece it compiles with its reason."""
    return "DDPOptimizer" in str(getattr(gm, "compile_subgraph_reason", ""))


def _ddp_container() -> str:
    """Compiling inside DDP's forward, the wrapped module's ``forward`` when it is torch code.

    DDP runs its own forward outside Dynamo (``_inside_ddp_forward`` is marked to be
    skipped) and Dynamo starts no graph in torch's own containers (``nn.Sequential``,
    ...): each child module of such a root is then compiled as a graph of its own, and a
    chain that runs through several children reaches the backend in parts.
    """
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None or isinstance(ddp.module, torch._dynamo.eval_frame.OptimizedModule):
        return ""  # DDP(torch.compile(module)): Dynamo starts its graph at the module itself
    forward = type(ddp.module).forward
    where = getattr(forward, "__module__", None) or ""
    return f"{where}.{forward.__qualname__}" if where.split(".")[0] == "torch" else ""


def _device_type(example_inputs) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device.type
    return "cpu"


#: How a rewritten chain runs on a CPU: inlined as aten ops that the inner compiler sees
#: (``"aten"``, :mod:`ksfx.ops.aten_chain`) or as the ``ksfx::ks_chain`` call (``"op"``).
CPU_CHAINS = ("aten", "op")


def default_cpu() -> str:
    """``"aten"``; ``"op"`` under ``TRITON_INTERPRET=1``, where the op runs the Triton kernels."""
    return "op" if config.interpret else "aten"


#: Inductor's (prototype) option to fuse a pointwise epilogue into a user-defined Triton kernel.
EPILOGUE_FUSION = "epilogue_fusion_user_defined_triton_kernel"


def _inductor_has(option: str) -> bool:
    from torch._inductor import config as inductor

    return hasattr(inductor, option)


#: How a rewritten chain runs on CUDA: as Triton launches Inductor generates and may fuse
#: epilogues into (``"triton_op"``, :mod:`ksfx.ops.triton_op`) or as the ``ksfx::ks_chain``
#: call, which launches them from Python (``"op"``). The same kernels either way.
CUDA_CHAINS = ("triton_op", "op")


class KsfxCompiler:
    """A torch.compile backend: ``KsfxCompiler(rewrite="auto", inner="inductor")(gm, example_inputs)``.

    ``cpu``: how rewritten chains run on CPU tensors, one of :data:`CPU_CHAINS`; ``cuda``:
    on CUDA tensors, one of :data:`CUDA_CHAINS`. ``epilogue_fusion``: let Inductor fuse a
    pointwise epilogue (GELU, a cast, ...) into the store of a chain it launches (its
    prototype ``epilogue_fusion_user_defined_triton_kernel``, set for these graphs only).
    """

    def __init__(
        self,
        rewrite: str = "auto",
        inner="inductor",
        reports: list | None = None,
        cpu: str | None = None,
        cuda: str = "triton_op",
        epilogue_fusion: bool = False,
    ):
        if rewrite not in MODES:
            raise ValueError(f"rewrite must be one of {MODES}, got {rewrite!r}")
        if cpu not in CPU_CHAINS + (None,):
            raise ValueError(f"cpu must be one of {CPU_CHAINS} (or None: {default_cpu()!r} here), got {cpu!r}")
        if cuda not in CUDA_CHAINS:
            raise ValueError(f"cuda must be one of {CUDA_CHAINS}, got {cuda!r}")
        if epilogue_fusion and not _inductor_has(EPILOGUE_FUSION):
            raise ValueError(
                f"epilogue_fusion needs Inductor's {EPILOGUE_FUSION} option, which torch {torch.__version__} lacks"
            )
        self.rewrite = rewrite
        self.cpu = cpu or default_cpu()
        self.cuda = cuda
        self.epilogue_fusion = epilogue_fusion
        self.inner = _inner_compiler(inner)
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "a callable")
        self.reports = reports
        self.count = 0
        self.warned_container = False

    def __call__(self, gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
        """Compile one Dynamo graph; ``mode`` and ``options`` are torch.compile's, for Inductor."""
        inner = self._inner_for(mode, options)
        report = GraphReport(self.count, ddp_piece=_ddp_piece(gm), ddp_container=_ddp_container())
        self.count += 1
        if report.ddp_container and not self.warned_container:
            self.warned_container = True
            log.warning(
                "ksfx: DDP wraps a module whose forward is torch code (%s): Dynamo compiles each of its "
                "children as a graph of its own, so KS chains that run through several children are cut; "
                'compile the module before wrapping it, DDP(torch.compile(module, backend="ksfx"))',
                report.ddp_container,
            )
        if self.reports is not None:
            self.reports.append(report)
        try:
            aten_gm = lower(gm, example_inputs)
        except Exception as err:  # noqa: BLE001 - any tracing failure means: leave this graph alone
            report.note = f"not analysed: lowering to aten failed ({type(err).__name__}: {err})"
            log.warning("ksfx: graph %d %s", report.index, report.note)
            return inner(gm, example_inputs)
        weights, known, learnable = _classify(gm, example_inputs)
        try:
            if self.rewrite != "never":
                report.specialised = specialise_widths(gm, example_inputs, aten_gm, weights, known)
            if report.specialised:  # the guarded widths are static in a new trace
                aten_gm = lower(gm, example_inputs)
            placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
            device_type = _device_type(example_inputs)
            inline = self.cpu == "aten" and device_type == "cpu"
            report.chains = run_pass(
                aten_gm,
                {placeholders[k] for k in weights},
                {placeholders[k]: v for k, v in known.items()},
                {placeholders[k] for k in learnable},
                mode=self.rewrite,
                device_type=device_type,
                refuse=_refusal(gm, example_inputs),
                inline=inline,
            )
        except Exception as err:  # noqa: BLE001 - a bug in the pass must never break the user's compile
            report.note = f"pass failed, graph left to the inner compiler ({type(err).__name__}: {err})"
            log.warning("ksfx: graph %d %s", report.index, report.note, exc_info=True)
            return inner(gm, example_inputs)
        rewritten = [c for c in report.chains if c.rewritten]
        launch = device_type == "cuda" and self.cuda == "triton_op"
        if not rewritten:  # chains the model itself calls (ks_matmul, KSLinear) launch the same way
            if launch and retarget(gm, LAUNCHED_BY_INDUCTOR):
                return self._compile(inner, gm, example_inputs, report)
            return inner(gm, example_inputs)
        launched = launch and retarget(aten_gm, LAUNCHED_BY_INDUCTOR)
        report.code = aten_gm.code
        if inline:  # the chains become aten ops Inductor fuses with their neighbours
            aten_gm = lower(aten_gm, example_inputs, INLINE_ON_CPU)
        compiled = self._compile(inner, aten_gm, example_inputs, report) if launched else inner(aten_gm, example_inputs)
        guards = sorted({placeholders.index(g) for c in rewritten for g in c.plan.guards})
        if not guards:
            return compiled
        return _guarded(compiled, gm, [(k, known.get(k, example_inputs[k])) for k in guards])

    def _inner_for(self, mode: str | None, options: dict | None) -> Callable:
        """The inner compiler with torch.compile's ``mode`` / ``options`` applied (Inductor's
        configuration: ``mode="reduce-overhead"`` turns on its CUDA graphs)."""
        if mode in (None, "default") and not options:
            return self.inner
        if self.inner_name != "inductor":
            raise ValueError(
                f"torch.compile's mode ({mode!r}) and options ({options!r}) configure Inductor, "
                f"but this ksfx backend's inner compiler is {self.inner_name!r}"
            )
        from torch._inductor import list_mode_options

        patches = {**list_mode_options(mode or "default"), **(options or {})}
        return functools.partial(self.inner, config_patches=patches)

    def _compile(self, inner, aten_gm: fx.GraphModule, example_inputs, report: GraphReport):
        """The inner compiler on a graph whose chains are ``triton_op`` calls; should it
        fail on them, on the same graph with ``ks_chain`` calls (the same kernels,
        launched from Python), and the report says why."""
        from torch._inductor import config as inductor

        patches = {EPILOGUE_FUSION: True} if self.epilogue_fusion else {}
        time_chains(aten_gm)  # the trace cannot time the kernels: decide here
        try:
            with inductor.patch(patches):
                return inner(aten_gm, example_inputs)
        except Exception as err:  # noqa: BLE001 - the custom_op form of the same chains is the fallback
            report.note = (
                f"the inner compiler failed on the chains as Triton launches ({type(err).__name__}: {err}); "
                "they run as ksfx::ks_chain calls"
            )
            log.warning("ksfx: graph %d: %s", report.index, report.note, exc_info=True)
            retarget(aten_gm, AS_CUSTOM_OP)
            report.code = aten_gm.code
            return inner(aten_gm, example_inputs)


def _guarded(compiled, original: fx.GraphModule, guarded: list[tuple[int, torch.Tensor]]):
    """Check, before each call, that the tensors whose values shaped supports still allow them."""
    expected = {k: _support_signature(t) for k, t in guarded}
    seen = {k: (t, _version(t)) for k, t in guarded}
    state = {"fallback": False}

    def still_valid(args) -> bool:
        for k in expected:
            tensor = args[k]
            ref, version = seen[k]
            if tensor is ref and version is not None and _version(tensor) == version:
                continue
            if not _compatible(expected[k], tensor):
                return False
            seen[k] = (tensor, _version(tensor))
        return True

    def run(*args):
        if any(isinstance(args[k], torch._subclasses.FakeTensor) for k in expected):
            # Dynamo's DDP optimizer runs each compiled piece on fake tensors at compile
            # time to get the next piece's inputs: there are no values to check.
            return compiled(*args)
        if not state["fallback"] and not still_valid(args):
            state["fallback"] = True
            warnings.warn(
                "ksfx: a mask, index table or frozen weight changed after compilation in a way that "
                "invalidates a rewritten KS chain; running the original graph from now on "
                "(call torch._dynamo.reset() to recompile)",
                RuntimeWarning,
                stacklevel=3,
            )
        if state["fallback"]:
            return original(*args)
        return compiled(*args)

    return run


def _version(tensor: torch.Tensor):
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter: always re-check
        return None


def _support_signature(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        return (tensor.detach() != 0).clone()
    return tensor.detach().clone()


def _compatible(signature: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Same index table, or a support that did not grow (zeros that stay zeros)."""
    if tensor.shape != signature.shape or tensor.device != signature.device:
        return False
    if signature.dtype == torch.bool:
        return not bool(((tensor.detach() != 0) & ~signature).any())
    return bool(torch.equal(tensor.detach(), signature))
