"""Graph breaks that hide KS work: the report, and the opt-in fix for autograd.Functions.

The layer under test is the zoo's Monarch ``autograd.Function`` with ``torch.bmm(...,
out=<transposed view>)`` (``tests/realworld/layers.py``), the form Dynamo cannot trace.
Compiled numerics are checked against eager, forward and backward.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import ksfx
from ksfx.passes.graph_breaks import GraphBreak, find_graph_breaks, make_traceable, trace_autograd_functions
from tests.realworld import layers
from tests.realworld.zoo import ZOO_BY_NAME

LAYERS_FILE = inspect.getsourcefile(layers)


def _line_of(fn, text: str) -> int:
    lines, first = inspect.getsourcelines(inspect.unwrap(fn))
    return first + next(k for k, line in enumerate(lines) if text in line)


class _Block(torch.nn.Module):
    """LayerNorm → Monarch (via ``apply``) → ReLU: graph work on both sides of the layer."""

    def __init__(self, fn_cls, monarch: layers.MonarchLinear):
        super().__init__()
        self.fn_cls, self.monarch = fn_cls, monarch
        self.norm = torch.nn.LayerNorm(monarch.blkdiag1.shape[0] * monarch.blkdiag1.shape[2])

    def forward(self, x):
        y = self.fn_cls.apply(self.norm(x), self.monarch.blkdiag1, self.monarch.blkdiag2)
        return torch.relu(y + self.monarch.bias)


def _fresh_function() -> type:
    """A subclass of the zoo's Function, so that marking it does not leak into other tests."""
    return type("MonarchOutFnCopy", (layers.BlockdiagButterflyOutFn,), {})


def _block(fn_cls=layers.BlockdiagButterflyOutFn):
    monarch, x = ZOO_BY_NAME["monarch_autograd_out"].make()
    return _Block(fn_cls, monarch), x


def test_reports_out_bmm_breaks_with_source_line_and_hint():
    model, x = _block()
    breaks = find_graph_breaks(model, x)
    out_breaks = [b for b in breaks if "out=" in b.reason]
    fwd = layers.BlockdiagButterflyOutFn.forward
    expected_lines = {_line_of(fwd, "h = torch.bmm("), _line_of(fwd, "out = torch.bmm(")}
    assert {b.lineno for b in out_breaks} == expected_lines
    for b in out_breaks:
        assert isinstance(b, GraphBreak)
        assert b.filename == LAYERS_FILE and b.location == f"{LAYERS_FILE}:{b.lineno}"
        assert b.op == "torch.bmm" and "torch.bmm(" in b.source and "out=" in b.source
        assert b.autograd_function is layers.BlockdiagButterflyOutFn
        assert b.hides_ks_work
        assert "ksfx.make_traceable(BlockdiagButterflyOutFn)" in b.hint and "torch.bmm(a, b)" in b.hint
        assert "ksfx.trace_autograd_functions(model, *inputs)" in b.hint  # the top-level API the hint names
        assert "BlockdiagButterflyOutFn" in str(b) and b.source in str(b)
    # np.prod(batch_shape) makes the batch size a traced value: reported inside the Function too.
    assert all(b.autograd_function is layers.BlockdiagButterflyOutFn for b in breaks)
    traced_sizes = [b for b in breaks if "out=" not in b.reason]
    assert traced_sizes, "the np.prod(batch_shape) break is missing"
    for b in traced_sizes:
        assert b.lineno in {_line_of(fwd, "np.prod("), _line_of(fwd, "x_blocks = x.reshape(")}
        assert "math.prod" in b.hint


def test_no_breaks_for_plain_bmm_monarch():
    module, x = ZOO_BY_NAME["monarch_bmm_expand_bias"].make()
    assert find_graph_breaks(module, x) == []


def test_break_outside_autograd_function_without_matmul():
    class Printing(torch.nn.Module):
        def forward(self, x):
            y = x.sin()
            print("", end="")
            return y.cos()

    (graph_break,) = find_graph_breaks(Printing(), torch.randn(3))
    assert graph_break.autograd_function is None and graph_break.op is None
    assert not graph_break.hides_ks_work
    assert graph_break.function == "forward" and "print(" in graph_break.source
    assert "make_traceable" not in graph_break.hint and graph_break.hint


def test_report_restores_buffers_and_rng():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    x = torch.randn(8, 4) + 3
    before = model[0].running_mean.clone()
    state = torch.random.get_rng_state()
    find_graph_breaks(model, x)
    assert torch.equal(model[0].running_mean, before)
    assert torch.equal(torch.random.get_rng_state(), state)


def _recording_backend(graphs: list):
    def compiler(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)

    return backend


def _bmm_count(gm) -> int:
    return sum(node.target is torch.ops.aten.bmm.default for node in gm.graph.nodes)


def test_the_fix_is_top_level_api():
    assert ksfx.make_traceable is make_traceable and ksfx.trace_autograd_functions is trace_autograd_functions
    assert {"make_traceable", "trace_autograd_functions"} <= set(ksfx.__all__)


def test_make_traceable_puts_the_function_in_one_graph_with_same_numerics():
    fn_cls = _fresh_function()
    model, x = _block(fn_cls)
    assert len(find_graph_breaks(model, x)) >= 2
    make_traceable(fn_cls)
    assert find_graph_breaks(model, x) == []

    graphs: list = []
    compiled = torch.compile(model, backend=_recording_backend(graphs))
    for batch_shape in ((2, 3), (5,)):
        x = torch.randn(*batch_shape, 16, requires_grad=True)
        y, y_ref = compiled(x), model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(y)
        params = [x, *model.parameters()]
        got = torch.autograd.grad(y, params, grad)
        want = torch.autograd.grad(y_ref, params, grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    forward_graph, backward_graph = graphs[0], graphs[1]
    # The out= bmm's became plain aten.bmm nodes that the KS pass can see, in both graphs.
    assert _bmm_count(forward_graph) == 2
    assert _bmm_count(backward_graph) == 4


def test_trace_autograd_functions_marks_the_function_and_heirs_sharing_its_code(monkeypatch):
    marked = []
    monkeypatch.setattr(torch.compiler, "allow_in_graph", marked.append)  # record, do not leak the mark
    heir = _fresh_function()
    model, x = _block(heir)
    assert trace_autograd_functions(model, x) == [layers.BlockdiagButterflyOutFn]
    assert marked[0] is layers.BlockdiagButterflyOutFn and heir in marked
    marked.clear()
    plain, x = ZOO_BY_NAME["monarch_bmm_square"].make()
    assert trace_autograd_functions(plain, x) == [] and marked == []


_HIDDEN_SCALE = torch.ones(3)


class _ReadsGlobalTensor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * _HIDDEN_SCALE

    @staticmethod
    def backward(ctx, grad):
        return grad * _HIDDEN_SCALE


def _closure_function():
    table = [1.0, 2.0]

    class ReadsClosureList(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * table[0]

        @staticmethod
        def backward(ctx, grad):
            return grad

    return ReadsClosureList


@pytest.mark.parametrize(
    ("fn_cls", "error", "needle"),
    [
        (_ReadsGlobalTensor, ValueError, "global '_HIDDEN_SCALE' (Tensor)"),
        (_closure_function(), ValueError, "closure 'table' (list)"),
        (torch.nn.Linear, TypeError, "autograd.Function subclass"),
        (torch.autograd.Function, TypeError, "forward is not a Python function"),
    ],
    ids=["global-tensor", "closure-list", "not-a-function", "no-forward"],
)
def test_make_traceable_refuses_hidden_inputs(fn_cls, error, needle):
    with pytest.raises(error) as excinfo:
        make_traceable(fn_cls)
    assert needle in str(excinfo.value)
