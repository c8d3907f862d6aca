"""Dynamo graph breaks that hide KS work from the backend, and what can be done about them.

A backend only sees what Dynamo puts in its graphs. The most used Monarch layers run
their bmm's inside an ``autograd.Function`` with ``torch.bmm(..., out=<transposed
view>)``; Dynamo refuses non-contiguous ``out=`` tensors, so those matmuls run eagerly,
between graphs, where ksfx cannot rewrite them.

:func:`find_graph_breaks` reports each break with Dynamo's reason, the user's source line,
the op and ``autograd.Function`` involved, whether it hides KS-like work (a matmul-like
op), and a hint saying what the user can change. It uses ``torch._dynamo.explain``
(present with the same ``break_reasons`` / ``GraphCompileReason(reason, user_stack)``
shape in torch 2.11 and 2.13).

:func:`make_traceable` is the one fix that needs no edit of the user's code: it marks an
``autograd.Function`` with ``torch.compiler.allow_in_graph``, so Dynamo records
``Fn.apply`` as one call and AOTAutograd traces its forward and (custom) backward with
fake tensors, functionalising the ``out=`` bmm's into plain ``bmm`` nodes that the pass
sees. Why this is sound, and when it is not, is in ``docs/graph_breaks.md``; the checks
below refuse the cases we can detect (hidden tensor or mutable inputs read from globals
or closures).
"""

from __future__ import annotations

import dis
import inspect
import linecache
import logging
import os
import re
import types
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: Ops whose presence at a break means matmul work (possibly KS) runs outside the graphs.
MATMUL_OPS = frozenset(
    {"bmm", "mm", "matmul", "einsum", "linear", "addmm", "baddbmm", "addbmm", "tensordot", "block_diag"}
)

_TORCH_DIR = os.path.dirname(torch.__file__)
_OP_PATTERNS = (
    re.compile(r"<built-in method (\w+) of type object"),
    re.compile(r"<built-in function (\w+)>"),
    re.compile(r"<function (\w+) at 0x"),
)
_CALL_RE = re.compile(r"\b(\w+)\s*\(")
_DATA_DEPENDENT = ("Data dependent operator", "torch.* op returned non-Tensor")


@dataclass(frozen=True)
class GraphBreak:
    """One place where Dynamo split the graph.

    ``autograd_function`` is the ``torch.autograd.Function`` subclass whose ``forward`` or
    ``backward`` holds the break (None when the break is elsewhere); ``hides_ks_work`` is
    True when a matmul-like op (bmm, mm, matmul, einsum, linear, block_diag...) runs at the
    break or inside that Function, i.e. when work ksfx could rewrite escapes the graphs.
    """

    reason: str
    filename: str
    lineno: int
    source: str
    function: str
    op: str | None
    autograd_function: type | None
    hides_ks_work: bool
    hint: str
    message: str

    @property
    def location(self) -> str:
        return f"{self.filename}:{self.lineno}"

    def __str__(self) -> str:
        where = f"{self.location} in {self.function}"
        if self.autograd_function is not None:
            where += f" ({_qualname(self.autograd_function)})"
        lines = [f"graph break at {where}: {self.reason}"]
        if self.source:
            lines.append(f"    {self.source}")
        if self.hides_ks_work:
            lines.append("    hides matmul work from the backend")
        lines.append(f"    hint: {self.hint}")
        return "\n".join(lines)


def find_graph_breaks(model, *example_inputs, **example_kwargs) -> list[GraphBreak]:
    """Run ``model`` once under Dynamo's ``explain`` and report its graph breaks.

    The model's buffers and the RNG state are restored afterwards (a forward pass may
    update running statistics or draw dropout masks). ``torch._dynamo.explain`` resets
    Dynamo's caches before and after, as it always does: functions compiled earlier in the
    process recompile on their next call.
    """
    buffers = {name: buf.detach().clone() for name, buf in _named_buffers(model)}
    with torch.random.fork_rng():
        explanation = torch._dynamo.explain(model)(*example_inputs, **example_kwargs)
    if buffers:
        with torch.no_grad():
            for name, buf in _named_buffers(model):
                buf.copy_(buffers[name])

    functions = _autograd_function_lines()
    found: dict[tuple[str, str, int], GraphBreak] = {}
    for compile_reason in explanation.break_reasons:
        graph_break = _describe(compile_reason.reason, list(compile_reason.user_stack or []), functions)
        key = (graph_break.reason, graph_break.filename, graph_break.lineno)
        found.setdefault(key, graph_break)
    breaks = list(found.values())
    for graph_break in breaks:
        log.info("%s", graph_break)
    return breaks


def make_traceable(fn_cls: type) -> None:
    """Let torch.compile trace ``fn_cls`` (an ``autograd.Function``) as one unit, without editing it.

    Marks the class with ``torch.compiler.allow_in_graph``: Dynamo writes ``fn_cls.apply``
    into its graph as one call instead of tracing (and breaking) inside ``forward``, and
    AOTAutograd traces ``forward`` and the user's ``backward`` on fake tensors. The mark is
    process-wide and permanent; it also covers the existing subclasses of ``fn_cls`` that
    inherit both methods (they run the same code, and Dynamo looks up the exact class).

    Raises ``TypeError`` for anything but an ``autograd.Function`` subclass with Python
    ``forward``/``backward``, and ``ValueError`` when they read tensors or mutable objects
    from globals or closures: those would be baked into the compiled graph without a guard.
    """
    if not (isinstance(fn_cls, type) and issubclass(fn_cls, torch.autograd.Function)):
        raise TypeError(f"make_traceable expects a torch.autograd.Function subclass, got {fn_cls!r}")
    hidden = []
    for method in ("forward", "backward", "setup_context"):
        fn = _user_method(fn_cls, method)
        if fn is None:
            if method != "setup_context":
                raise TypeError(f"{_qualname(fn_cls)}.{method} is not a Python function; it cannot be traced")
            continue
        hidden += [f"{method}: {item}" for item in _hidden_inputs(fn)]
    if hidden:
        raise ValueError(
            f"{_qualname(fn_cls)} reads values that torch.compile would bake in without a guard "
            f"({'; '.join(hidden)}); pass them as arguments of apply() instead"
        )
    for cls in _sharing_code(fn_cls):
        torch.compiler.allow_in_graph(cls)
        log.info("%s marked allow_in_graph: AOTAutograd traces its forward and backward", _qualname(cls))


def trace_autograd_functions(model, *example_inputs, **example_kwargs) -> list[type]:
    """The opt-in fix: :func:`make_traceable` every ``autograd.Function`` whose break hides matmul work.

    Returns the classes marked. Breaks that are not inside an ``autograd.Function`` are
    left as they are (see :func:`find_graph_breaks` for what to change by hand).
    """
    marked: list[type] = []
    for graph_break in find_graph_breaks(model, *example_inputs, **example_kwargs):
        fn_cls = graph_break.autograd_function
        if fn_cls is not None and graph_break.hides_ks_work and fn_cls not in marked:
            make_traceable(fn_cls)
            marked.append(fn_cls)
    return marked


# ----------------------------------------------------------------------------- describing one break
def _describe(message: str, stack: list, functions: dict) -> GraphBreak:
    reason = _first_line(message)
    frame = _user_frame(stack)
    if frame is None:
        filename, lineno, source, function = "<unknown>", 0, "", "<unknown>"
    else:
        filename, lineno, function = frame.filename, frame.lineno or 0, frame.name
        source = (frame.line or "").strip()
    fn_cls = _function_at(functions, filename, lineno)
    op = _op_of(message, source)
    hides = _is_matmul(op) or any(_is_matmul(name) for name in _CALL_RE.findall(source))
    if fn_cls is not None and not hides:
        hides = any(_is_matmul(name) for name in _called_names(fn_cls))
    return GraphBreak(
        reason=reason,
        filename=filename,
        lineno=lineno,
        source=source,
        function=function,
        op=op,
        autograd_function=fn_cls,
        hides_ks_work=hides,
        hint=_hint(message, reason, filename, lineno, op, fn_cls),
        message=message,
    )


def _hint(message: str, reason: str, filename: str, lineno: int, op: str | None, fn_cls: type | None) -> str:
    parts = []
    if "out=" in reason:
        name = op or "the op"
        parts.append(
            f"Dynamo cannot trace {name}(..., out=<non-contiguous tensor>): call {name}(a, b) and use its result "
            "(then .transpose/.reshape it as the out= view did)"
        )
    elif reason.startswith(_DATA_DEPENDENT) and re.search(r"\b(np|numpy)\.prod\(", _preceding_lines(filename, lineno)):
        parts.append("np.prod of a shape is traced as an array and forces a tensor-to-int conversion: use math.prod")
    elif reason.startswith(_DATA_DEPENDENT):
        parts.append(
            "a Python number is read out of a tensor here (.item(), int(), numpy on sizes): keep sizes as ints"
        )
    else:
        dynamo_hints = [line.split("Hint:", 1)[1].strip() for line in message.splitlines() if "Hint:" in line]
        parts.append(" ".join(dynamo_hints) if dynamo_hints else "see GraphBreak.message for Dynamo's explanation")
    if fn_cls is not None:
        parts.append(
            f"or, without editing the code, call ksfx.make_traceable({fn_cls.__qualname__}) (or "
            "ksfx.trace_autograd_functions(model, *inputs) for every such Function) before torch.compile so that "
            "AOTAutograd traces the whole autograd.Function (docs/graph_breaks.md)"
        )
    return "; ".join(parts)


def _preceding_lines(filename: str, lineno: int, count: int = 6) -> str:
    """The break's line and the few before it: a value traced as data often comes from just above."""
    return "".join(linecache.getline(filename, k) for k in range(max(1, lineno - count + 1), lineno + 1))


def _first_line(message: str) -> str:
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith("Encountered graph break when attempting to trace"):
            return line
    return message.strip()


def _user_frame(stack: list):
    """Innermost frame outside torch itself (the decorators and wrappers of torch are skipped)."""
    for frame in reversed(stack):
        if not os.path.abspath(frame.filename).startswith(_TORCH_DIR + os.sep):
            return frame
    return stack[-1] if stack else None


def _op_of(message: str, source: str) -> str | None:
    for pattern in _OP_PATTERNS:
        match = pattern.search(message)
        if match:
            return f"torch.{match.group(1)}" if "built-in method" in pattern.pattern else match.group(1)
    calls = [name for name in _CALL_RE.findall(source) if _is_matmul(name)]
    return calls[0] if calls else None


def _is_matmul(name: str | None) -> bool:
    return name is not None and name.rsplit(".", 1)[-1] in MATMUL_OPS


# ----------------------------------------------------------------------------- autograd.Function lookup
def _all_subclasses(cls: type) -> list[type]:
    found, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _user_method(fn_cls: type, name: str):
    """The user's Python function behind ``fn_cls.name`` (decorators such as custom_fwd unwrapped)."""
    raw = inspect.getattr_static(fn_cls, name, None)
    if isinstance(raw, staticmethod | classmethod):
        raw = raw.__func__
    if raw is None:
        return None
    fn = inspect.unwrap(raw)
    if not isinstance(fn, types.FunctionType):
        return None
    if fn.__qualname__.startswith(("Function.", "_SingleLevelFunction.", "FunctionCtx.")):
        return None  # torch's default, not the user's
    return fn


def _sharing_code(fn_cls: type) -> list[type]:
    """``fn_cls`` and its subclasses that run its very forward and backward."""
    own = [_user_method(fn_cls, method) for method in ("forward", "backward")]
    subclasses = _all_subclasses(fn_cls)
    return [fn_cls] + [sub for sub in subclasses if [_user_method(sub, m) for m in ("forward", "backward")] == own]


def _line_range(code: types.CodeType) -> tuple[int, int]:
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return (min(lines), max(lines)) if lines else (code.co_firstlineno, code.co_firstlineno)


def _autograd_function_lines() -> dict[str, list[tuple[int, int, type]]]:
    """``filename -> [(first, last, cls)]`` for the forward/backward of every autograd.Function subclass."""
    table: dict[str, list[tuple[int, int, type]]] = {}
    for cls in _all_subclasses(torch.autograd.Function):
        for method in ("forward", "backward"):
            fn = _user_method(cls, method)
            if fn is not None and method in vars(cls):  # the class defining the code, not its heirs
                first, last = _line_range(fn.__code__)
                table.setdefault(fn.__code__.co_filename, []).append((first, last, cls))
    return table


def _function_at(table: dict, filename: str, lineno: int) -> type | None:
    for first, last, cls in table.get(filename, ()):
        if first <= lineno <= last:
            return cls
    return None


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _called_names(fn_cls: type) -> set[str]:
    names: set[str] = set()
    for method in ("forward", "backward"):
        fn = _user_method(fn_cls, method)
        if fn is not None:
            for code in _codes(fn.__code__):
                names.update(code.co_names)
    return names


# ----------------------------------------------------------------------------- hidden inputs
_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _hidden_inputs(fn: types.FunctionType) -> list[str]:
    """Globals and closure cells ``fn`` reads that are neither code (modules, classes,
    functions) nor immutable constants: tensors, lists, dicts, arbitrary objects."""
    hidden = []
    global_names = set()
    for code in _codes(fn.__code__):
        for instruction in dis.get_instructions(code):
            if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                global_names.add(instruction.argval)
    for name in sorted(global_names):
        if name in fn.__globals__ and not _is_static(fn.__globals__[name]):
            hidden.append(f"global {name!r} ({type(fn.__globals__[name]).__name__})")
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if not _is_static(value):
            hidden.append(f"closure {name!r} ({type(value).__name__})")
    return hidden


def _is_static(value) -> bool:
    if isinstance(value, types.ModuleType | type | types.FunctionType | types.BuiltinFunctionType):
        return True
    if isinstance(value, types.MethodType | types.MethodWrapperType | types.WrapperDescriptorType):
        return True
    if isinstance(value, tuple | frozenset):
        return all(_is_static(item) for item in value)
    if isinstance(value, _IMMUTABLE):
        return True
    return callable(value) and not isinstance(value, torch.Tensor | torch.nn.Module)


def _named_buffers(model):
    return model.named_buffers() if isinstance(model, torch.nn.Module) else ()


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
