"""``ksfx::ks_chain_triton``: the chain op that AOT tracing decomposes into kernel launches.

There is no GPU here, so the fixture makes the CUDA path run on CPU tensors: kernels are
generated for sm_90 (the source a GPU runs) as plain ``JITFunction``s, which
``wrap_triton`` can trace; Triton's mutation analysis compiles them to TTIR for sm_90,
as it would on a GPU; and a launch runs the kernel's Python function in Triton's
interpreter. The traced graph is therefore the one Inductor would get on a GPU, and
running it checks its arguments, grids and dataflow against dense float64 products.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch._inductor.config
import triton
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

import ksfx
import ksfx.ops.triton_op  # noqa: F401 - registers the op
from ksfx.backend import KsfxCompiler
from ksfx.backend import compile as compile_module
from ksfx.backend.compile import EPILOGUE_FUSION
from ksfx.codegen.census import compile_cubin
from ksfx.config import config
from ksfx.ops import race, triton_path
from ksfx.pattern import Chain, KSPattern
from tests.test_fusion import ONE_LAUNCH, MonarchMLP, _assert_close, _dense_chain, assert_matches_eager, butterfly
from tests.test_kernels import random_index_perm
from tests.test_race import TIMES, stand_in_clock

WRAPPER = torch.ops.higher_order.triton_kernel_wrapper_functional
TENSOR_CORE_CHAINS = {
    "table-between": ONE_LAUNCH["table-between"],  # 128 wide, an index table between the factors
    "monarch-256": [(1, 16, 16, 16), (16, 16, 16, 1)],
}


class _Sm90Driver:
    """What Triton's mutation analysis asks of the driver: the target to compile TTIR for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _interpreted_run(self, *args, grid, warmup, **kwargs):
    from triton.runtime.interpreter import InterpretedFunction

    for option in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
        kwargs.pop(option, None)
    return InterpretedFunction(self.fn).run(*args, grid=grid, warmup=warmup, **kwargs)


@pytest.fixture
def cuda_launches_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton.jit then makes JITFunctions
    monkeypatch.setattr(config, "interpret", True)  # CPU tensors may reach the kernels
    monkeypatch.setattr(triton_path, "device_target", lambda device: triton_path.Target((9, 0), 132, False))
    monkeypatch.setattr(JITFunction, "run", _interpreted_run)
    monkeypatch.setattr(triton.runtime.driver, "_active", _Sm90Driver())
    # launch plans cached by other tests hold interpreted kernels
    triton_path._forward_launch.cache_clear()
    triton_path._grad_launch.cache_clear()
    yield
    triton_path._forward_launch.cache_clear()
    triton_path._grad_launch.cache_clear()


def _traced(steps, batch_last: bool, dtype, n: int, bias: bool = False, epilogue=torch.sin):
    """The graphs of ``epilogue(chain(x) + bias)`` as AOT traces them (the forward now, the
    backward once it runs), the output, the inputs and the dense float64 reference.

    ``steps``: the chain leftmost first, patterns as tuples, permutations as they are."""
    chain = Chain(tuple(KSPattern(*s) if isinstance(s, tuple) else s for s in steps))
    spec = chain.to_spec()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    def f(x, b, *factors):
        return epilogue(torch.ops.ksfx.ks_chain_triton(x, list(factors), spec, batch_last, b, 0))

    g = torch.Generator().manual_seed(2)
    factors = [(torch.randn(p.as_tuple(), generator=g) / p.c**0.5).to(dtype).requires_grad_() for p in chain.patterns]
    shape = (chain.in_features, n) if batch_last else (n, chain.in_features)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    b = torch.randn(chain.out_features, generator=g).to(dtype).requires_grad_() if bias else None
    y = aot_function(f, fw_compiler=keep, bw_compiler=keep)(x, b, *factors)

    def reference(x, b, *factors):
        w = _dense_chain(chain.steps, factors)
        y = w @ x if batch_last else x @ w.T
        if b is not None:
            y = y + (b[:, None] if batch_last else b)
        return epilogue(y)

    return graphs, y, [x, b, *factors], reference


def _assert_matches(y, inputs, reference, dtype):
    """``y`` and the gradients of ``(y * probe).sum()`` against float64."""
    leaves = [t for t in inputs if t is not None]
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = torch.autograd.grad((y * probe).sum(), leaves)
    inputs64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    want = reference(*inputs64)
    _assert_close(y.detach(), want.detach(), dtype)
    expected = torch.autograd.grad((want * probe.double()).sum(), [t for t in inputs64 if t is not None])
    for got, ref in zip(grads, expected, strict=True):
        _assert_close(got, ref, dtype)


def _aot_keeping(graphs: list):
    """AOT autograd as the inner compiler, appending each forward and backward graph to ``graphs``."""

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _launches(gm) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.target is WRAPPER]


@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_fused_butterfly_traces_to_one_launch_that_writes_only_its_output(
    cuda_launches_on_cpu, monkeypatch, batch_last, dtype
):
    monkeypatch.setattr(config, "fuse", "always")
    patterns = butterfly(16)
    graphs, y, inputs, reference = _traced(patterns, batch_last, dtype, n=40)
    launches = _launches(graphs[0])
    assert len(launches) == 1
    # the mutation analysis ran on sm_90 TTIR: only the output is written, nothing is copied back
    assert launches[0].kwargs["tensors_to_clone"] == ["y_ptr"]
    _assert_matches(y, inputs, reference, dtype)
    # backward: recompute + dx's transposed chain fused (storing every step), one dW per factor
    assert len(_launches(graphs[1])) == 2 + len(patterns)
    for graph in graphs:
        assert not [n for n in graph.graph.nodes if n.target is torch.ops.aten.copy_.default]


@pytest.mark.parametrize("name", ["table-between", "monarch-256"])
@pytest.mark.parametrize("fuse", ["always", "never"])
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_tensor_core_chains_with_tables_and_bias_trace_to_their_launches(
    cuda_launches_on_cpu, monkeypatch, name, fuse, batch_last
):
    """fp16 tensor-core factors, one launch per segment or per factor; an index table
    between the factors becomes a constant of the graph."""
    monkeypatch.setattr(config, "fuse", fuse)
    steps = TENSOR_CORE_CHAINS[name]
    graphs, y, inputs, reference = _traced(steps, batch_last, torch.float16, n=24, bias=True)
    factors = sum(isinstance(s, tuple) for s in steps)
    assert len(_launches(graphs[0])) == (1 if fuse == "always" else factors)
    tables = [n for n in graphs[0].graph.nodes if n.op == "get_attr"]
    assert len(tables) == (name == "table-between")
    _assert_matches(y, inputs, reference, torch.float16)
    assert len(_launches(graphs[1])) >= factors  # at least one weight gradient each


def test_dense_factors_lone_permutations_and_empty_batches_trace_like_the_custom_op(cuda_launches_on_cpu, monkeypatch):
    """The other forms of the op's forward, against the custom op on the plain-torch path: a
    factor standing for a dense product (its NaNs reach the blocks a dense matmul's would,
    through the functionalised in-place add), a chain that is one permutation (a gather,
    no kernel) and a batch of zero rows."""
    chain = Chain((KSPattern(4, 6, 5, 1), KSPattern(4, 5, 5, 1)))
    factors = [torch.randn(p.as_tuple()) for p in chain.patterns]
    x = torch.randn(3, 20)
    x[0, 3], x[1, 12] = float("inf"), float("nan")
    perm = Chain((random_index_perm(20, seed=4),))
    cases = [(chain, x, factors, 0b10), (perm, x, [], 0), (chain, x[:0], factors, 0)]
    for case_chain, inputs, values, dense in cases:
        spec = case_chain.to_spec()

        def f(x, *values, spec=spec, dense=dense):
            return torch.ops.ksfx.ks_chain_triton(x, list(values), spec, False, None, dense)

        got = aot_function(f, fw_compiler=lambda gm, _: make_boxed_func(gm))(inputs, *values)
        with monkeypatch.context() as plain:
            plain.setattr(config, "interpret", False)  # CPU tensors take the plain-torch path
            want = torch.ops.ksfx.ks_chain(inputs, values, spec, False, None, dense)
        assert got.shape == want.shape == (inputs.shape[0], case_chain.out_features)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-5, atol=1e-5)
        if dense:
            assert want[0].isnan().sum() > 5  # the non-finite input reached other blocks


def test_the_backend_hands_inductor_the_launches_of_a_ks_mlp_block(cuda_launches_on_cpu, monkeypatch):
    """``backend="ksfx"`` with CUDA inputs: each chain of ``x + down(gelu(up(x)))`` reaches the
    inner compiler as a ``triton_op`` call, and AOT (the first step of Inductor's compile)
    turns it into one fused launch; outputs and gradients equal eager's."""
    monkeypatch.setattr(compile_module, "_device_type", lambda example_inputs: "cuda")
    torch.manual_seed(0)
    model = MonarchMLP(256, 512, 16)
    x = torch.randn(6, 256)
    graphs, reports = [], []

    inner = _aot_keeping(graphs)
    compiled = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner=inner, reports=reports))
    y = compiled(x.clone().requires_grad_())
    assert "ksfx.ks_chain_triton.default" in reports[0].code and "ksfx.ks_chain.default" not in reports[0].code
    assert len(_launches(graphs[0])) == 2
    assert not [n for n in graphs[0].graph.nodes if "ksfx" in str(n.target)]
    assert_matches_eager(y, model(x.clone().requires_grad_()), list(model.parameters()))
    assert _launches(graphs[1])  # the backward's kernels, traced the same way


def test_a_trace_without_a_decision_times_nothing_and_launches_per_step(cuda_launches_on_cpu, monkeypatch):
    """AOT traces the op's body with functional tensors wrapping fake ones: no race can run
    there, and a segment nobody timed runs one launch per step."""
    monkeypatch.setattr(config, "fuse", "auto")
    monkeypatch.setattr(race, "applies", lambda x: True)
    monkeypatch.setattr(race, "_measure", lambda sides: pytest.fail("timed inside a trace"))
    race.forget()
    graphs, y, inputs, reference = _traced(butterfly(16), False, torch.float32, n=24)
    assert len(_launches(graphs[0])) == 4 and not race.races()
    _assert_matches(y, inputs, reference, torch.float32)


@pytest.mark.parametrize(
    "fused_wins, dynamic", [(True, False), (False, False), (True, True)], ids=["fused-wins", "steps-win", "dynamic"]
)
def test_the_backend_times_each_chain_before_the_trace_launches_the_faster(
    cuda_launches_on_cpu, monkeypatch, fused_wins, dynamic
):
    """Under ``fuse = "auto"`` on CUDA the trace cannot time a fused segment: the backend
    runs each chain first (forward and dx here; a symbolic batch at its hint), and the
    trace launches what won."""
    monkeypatch.setattr(compile_module, "_device_type", lambda example_inputs: "cuda")
    monkeypatch.setattr(config, "fuse", "auto")
    monkeypatch.setattr(race, "applies", lambda x: True)
    monkeypatch.setattr(race, "_measure", stand_in_clock({**TIMES, "fused": 1.0 if fused_wins else 3.0}))
    race.forget()
    torch.manual_seed(0)
    model = MonarchMLP(256, 512, 16)
    x = torch.randn(6, 256)
    graphs = []

    inner = _aot_keeping(graphs)
    compiled = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner=inner), dynamic=dynamic)
    y = compiled(x.clone().requires_grad_())
    fusions = [
        (r.subject.endswith("storing every step"), r.winner, r.batch) for r in race.races() if "fusing" in r.subject
    ]
    race.forget()
    winner = "fused" if fused_wins else "one by one"
    assert fusions == [(False, winner, 6), (True, winner, 6)] * 2  # up and down, forward and dx
    launches = _launches(graphs[0])
    assert len(launches) == (2 if fused_wins else 4)
    assert all(isinstance(launch.kwargs["kwargs"]["n"], torch.fx.Node) == dynamic for launch in launches)
    assert_matches_eager(y, model(x.clone().requires_grad_()), list(model.parameters()))


def test_ks_linear_under_the_backend_on_cuda_is_the_launches_too(cuda_launches_on_cpu, monkeypatch):
    """ksfx's own layer calls the chain op itself, so the pass has nothing to rewrite; on
    CUDA the backend still hands Inductor its launches. Plain AOT keeps the opaque op."""
    monkeypatch.setattr(compile_module, "_device_type", lambda example_inputs: "cuda")
    torch.manual_seed(0)
    layer = ksfx.KSLinear(butterfly(16))
    x = torch.randn(5, 16)
    graphs = []

    inner = _aot_keeping(graphs)
    for backend, launches in ((inner, 0), (KsfxCompiler(inner=inner), 1)):  # 1: the fused butterfly
        graphs.clear()
        torch._dynamo.reset()
        y = torch.compile(layer, backend=backend)(x)
        assert len(_launches(graphs[0])) == launches
        assert bool([n for n in graphs[0].graph.nodes if "ksfx" in str(n.target)]) == (launches == 0)
        with monkeypatch.context() as plain:
            plain.setattr(config, "interpret", False)  # eager reference on the plain-torch path
            y_eager = layer(x)
        assert_matches_eager(y, y_eager, list(layer.parameters()))


def test_a_failing_inner_compile_falls_back_to_the_custom_op(monkeypatch):
    """Should the inner compiler reject the launches, the same chains compile as ``ks_chain`` calls."""
    monkeypatch.setattr(compile_module, "_device_type", lambda example_inputs: "cuda")
    seen = []

    def inner(gm, example_inputs):
        targets = {str(n.target) for n in gm.graph.nodes if "ksfx" in str(n.target)}
        seen.append(targets)
        if "ksfx.ks_chain_triton.default" in targets:
            raise RuntimeError("no launch for you")
        return gm.forward

    reports = []
    model = MonarchMLP(64, 128, 8)
    x = torch.randn(3, 64)
    y = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner=inner, reports=reports))(x)
    assert seen == [{"ksfx.ks_chain_triton.default"}, {"ksfx.ks_chain.default"}]
    assert "no launch for you" in reports[0].note and "ksfx.ks_chain.default" in reports[0].code
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


def test_a_symbolic_batch_gives_symbolic_grids_one_compile_for_every_batch(cuda_launches_on_cpu, monkeypatch):
    """Tiles are chosen for the batch's hint; the grid and the scalars stay symbolic."""
    monkeypatch.setattr(compile_module, "_device_type", lambda example_inputs: "cuda")
    monkeypatch.setattr(config, "fuse", "never")  # per-factor kernels: the forward and the grad grids
    torch.manual_seed(0)
    model = MonarchMLP(64, 128, 8)
    graphs = []

    inner = _aot_keeping(graphs)
    compiled = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner=inner), dynamic=True)
    for n in (40, 77):
        x = torch.randn(n, 64, requires_grad=True)
        y = compiled(x)
        y_eager = model(x)
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
        got = torch.autograd.grad(y.square().sum(), x)[0]
        torch.testing.assert_close(got, torch.autograd.grad(y_eager.square().sum(), x)[0], rtol=1e-4, atol=1e-4)
    assert len(graphs) == 2  # one forward, one backward: no recompile for the second batch
    launches = _launches(graphs[0])
    assert len(launches) == 4
    assert all(isinstance(launch.kwargs["kwargs"]["n"], torch.fx.Node) for launch in launches)


def _kernel_and_arguments(launch: torch.fx.Node):
    """The ``JITFunction`` of a traced launch and its arguments (fake tensors, constexprs)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(launch.kwargs["kernel_idx"])
    arguments = dict(kernel_side_table.get_constant_args(launch.kwargs["constant_args_idx"]))
    for name, value in launch.kwargs["kwargs"].items():
        arguments[name] = value.meta["val"] if isinstance(value, torch.fx.Node) else value
    configs = getattr(kernel, "configs", [])
    if configs:  # launch options become a one-config autotuner
        arguments.update(configs[0].kwargs)
        kernel = kernel.fn
    return kernel, arguments


@pytest.mark.parametrize(
    ("steps", "fuse", "batch_last"),
    [
        (butterfly(16), "always", False),  # small blocks
        (TENSOR_CORE_CHAINS["monarch-256"], "always", True),  # the last factor stores tile by tile
        (TENSOR_CORE_CHAINS["table-between"], "never", False),  # per-factor dot kernels, a table
        ([(1, 16, 32, 4)], "never", False),  # d > 1 batch-first: the δ-tiled kernel
        ([(4, 2, 2, 8)], "never", True),  # small blocks, one factor
    ],
    ids=["fused-fma", "fused-dot", "dot", "dot3", "fma"],
)
def test_forward_kernels_can_take_an_epilogue(cuda_launches_on_cpu, monkeypatch, steps, fuse, batch_last):
    """Inductor fuses a pointwise epilogue into a launched kernel (with
    ``epilogue_fusion_user_defined_triton_kernel``) only if its source has one ``tl.store``
    and its sm_90 TTIR writes one tensor once: every forward kernel meets both."""
    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    if not hasattr(wrap, "identify_accessed_tensors"):
        pytest.skip(f"torch {torch.__version__} cannot fuse epilogues into user-defined Triton kernels")
    identify_accessed_tensors, identify_triton_stores = wrap.identify_accessed_tensors, wrap.identify_triton_stores

    monkeypatch.setattr(config, "fuse", fuse)
    graphs, *_ = _traced(steps, batch_last, torch.float16, n=24)
    launches = _launches(graphs[0])
    assert launches
    for launch in launches:
        kernel, arguments = _kernel_and_arguments(launch)
        assert len(identify_triton_stores(kernel.src).stores) == 1
        assert identify_accessed_tensors(kernel, arguments, {}).can_fuse_epilogue


# ----------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize(
    "options",
    [{}, {"epilogue_fusion": True}, {"mode": "reduce-overhead"}, {"cuda": "op"}],
    ids=["triton_op", "epilogue", "cudagraphs", "custom_op"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_inductor_runs_the_ks_mlp_block_like_eager(options, dtype):
    """Inductor itself compiles and launches the chains (every form), forward and backward."""
    options = dict(options)
    if options.get("epilogue_fusion") and not hasattr(torch._inductor.config, EPILOGUE_FUSION):
        pytest.skip(f"torch {torch.__version__} has no {EPILOGUE_FUSION}")
    mode = options.pop("mode", None)
    torch.manual_seed(0)
    model = MonarchMLP(256, 512, 16).cuda().to(dtype)
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    reports = []
    torch._dynamo.reset()
    backend = KsfxCompiler(rewrite="always", reports=reports, **options)
    compiled = torch.compile(model, backend=lambda gm, inputs: backend(gm, inputs, mode=mode))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for _ in range(2):  # the second call replays the CUDA graph
        y = compiled(x.clone().requires_grad_())
        y_eager = model(x.clone().requires_grad_())
        torch.testing.assert_close(y, y_eager, rtol=tol, atol=tol)
    assert not reports[0].note, reports[0].note  # no fallback to the custom op
    assert_matches_eager(y, y_eager, list(model.parameters()), tol, grad_tol=4 * tol)


@cuda
@pytest.mark.parametrize("backend", ["inductor", "ksfx"])
def test_cuda_compiled_ks_linear_equals_eager(backend):
    """Plain Inductor (the opaque op) and backend="ksfx" (the launches)."""
    torch.manual_seed(0)
    layer = ksfx.KSLinear(butterfly(256)).cuda()
    x = torch.randn(300, 256, device="cuda")
    torch._dynamo.reset()
    y = torch.compile(layer, backend=backend)(x)
    assert_matches_eager(y, layer(x), list(layer.parameters()))


AOTI_LOADER = """
import sys
import torch

runner = torch._inductor.aoti_load_package(sys.argv[1])
data = torch.load(sys.argv[2])
torch.testing.assert_close(runner(data["x"]), data["y"], rtol=1e-4, atol=1e-4)
assert "ksfx" not in sys.modules
print("OK")
"""


@cuda
def test_cuda_aoti_package_holds_the_kernels_and_runs_without_ksfx(tmp_path):
    """On CUDA ``ksfx.export`` puts the triton_op in the program; AOTInductor compiles its
    kernels into the package, which then runs in a process that never imports ksfx."""
    import os
    import subprocess
    import sys

    import ksfx

    torch.manual_seed(0)
    model = MonarchMLP(256, 512, 16).cuda()
    x = torch.randn(32, 256, device="cuda")
    ep = ksfx.export(model, (x,), rewrite="always")
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.ksfx.ks_chain_triton.default) == 2
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "mlp.pt2"))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "data.pt")
    (tmp_path / "load.py").write_text(AOTI_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "load.py", path, "data.pt"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stderr[-3000:]


@pytest.mark.parametrize(
    ("steps", "fuse", "batch_last", "kernels"),
    [
        (butterfly(16), "always", False, set()),
        (TENSOR_CORE_CHAINS["table-between"], "never", True, set()),
        # dot3 with d = 3, batch-first: its forward, dx and weight gradient regroup δ with tl.gather
        ([(1, 16, 32, 3), (3, 32, 16, 1)], "never", False, {"forward_dot3", "grad_dot3"}),
    ],
    ids=["fused-butterfly", "dot-with-table", "gathered-delta"],
)
def test_inductors_copy_of_every_kernel_compiles_for_sm90(
    cuda_launches_on_cpu, monkeypatch, tmp_path, steps, fuse, batch_last, kernels
):
    """Inductor re-emits a launched kernel from its source and the globals it reads
    (``user_defined_triton_kernel_transitive_closure_source_code``): that copy, alone in a
    module, compiles for sm_90 with the launch's arguments, forward and backward kernels."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    monkeypatch.setattr(config, "fuse", fuse)
    graphs, y, *_ = _traced(steps, batch_last, torch.float16, n=32)
    y.sum().backward()
    missing = set(kernels)
    for k, launch in enumerate(_launches(graphs[0]) + _launches(graphs[1])):
        kernel, arguments = _kernel_and_arguments(launch)
        source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
        path = tmp_path / f"inductor_copy_{k}.py"
        path.write_text(f"import triton\nimport triton.language as tl\n\n@triton.jit\n{source}\n")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        copy = getattr(module, kernel.__name__)
        constexprs = {p.name for p in copy.params if p.is_constexpr}
        args = tuple(arguments[name] for name in copy.arg_names if name not in constexprs)
        options = {name: arguments.pop(name, default) for name, default in (("num_warps", 4), ("num_stages", 3))}
        cubin, _ = compile_cubin(copy, args, {n: arguments[n] for n in constexprs}, capability=90, **options)
        assert cubin
        missing.discard(kernel.__name__)
    assert not missing, f"not launched: {missing}"
